//! Record locks across two mounts of one cluster, through the kernel: real `kerfsd`
//! processes, two `kerfs` mounts, and lock holders that are separate processes (`lock-helper`,
//! tests/bin/lock_helper.rs, driven line by line over its stdin/stdout), because
//! POSIX locks belong to processes and must be seen to die with them.
//!
//! - `fcntl_locks_across_two_mounts`: F_SETLK/F_GETLK/F_SETLKW, EINTR and SA_RESTART of a
//!   waiter, EDEADLK across mounts, shared read locks, disjoint and split ranges, release on
//!   close of another descriptor, OFD locks, a holder and a waiter killed with SIGKILL.
//! - `flock_across_two_mounts`: LOCK_EX/LOCK_SH/LOCK_NB, a blocking flock, flock and fcntl
//!   locks not seeing each other, release on close and on SIGKILL.
//! - `a_dead_mount_frees_its_locks`: kill -9 of the `kerfs` process of one mount; its locks
//!   go when its session lease (`-o lease=2`) runs out, and a waiter on the other mount
//!   gets them.
//!
//! Needs root, /dev/fuse and fuse3; fails (does not skip) without them.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kerfs_tests::{
    blocking, init_tracing, require_root_and_fuse, KerfsCluster, KerfsClusterOptions, Mount,
};
use tracing::info;

/// Each test starts a cluster on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a request that should block is watched before we call it blocked.
const BLOCKED_FOR: Duration = Duration::from_millis(800);
/// How long a request that should complete may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ mounts

/// Mount options of every mount here: no kernel attribute or entry caching, so each mount
/// sees the other's changes at once.
const NO_CACHE: &str = ",attr_timeout=0,entry_timeout=0";

// ------------------------------------------------------------------ the helper process

/// A lock-holding process: `lock-helper`, one command per line.
struct Helper {
    name: String,
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
}

impl Helper {
    fn spawn(name: &str) -> Result<Helper> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lock-helper"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a lock helper")?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut h = Helper {
            name: name.to_string(),
            child,
            stdin,
            answers,
        };
        h.expect("ready", "ok")?;
        Ok(h)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}").with_context(|| format!("{}: sending {cmd}", self.name))?;
        self.stdin.flush()?;
        Ok(())
    }

    /// The next answer, waiting at most `within`.
    fn answer(&mut self, what: &str, within: Duration) -> Result<String> {
        self.answers.recv_timeout(within).map_err(|e| {
            anyhow!(
                "{}: no answer to {what:?} within {within:?} ({e})",
                self.name
            )
        })
    }

    fn expect(&mut self, what: &str, want: &str) -> Result<()> {
        self.expect_within(what, want, ANSWER_WITHIN)
    }

    fn expect_within(&mut self, what: &str, want: &str, within: Duration) -> Result<()> {
        let got = self.answer(what, within)?;
        ensure!(
            got == want,
            "{}: {what:?} answered {got:?}, expected {want:?}",
            self.name
        );
        Ok(())
    }

    /// Runs a command that must complete with `want`.
    fn run(&mut self, cmd: &str, want: &str) -> Result<()> {
        self.send(cmd)?;
        self.expect(cmd, want)
    }

    /// Sends a command that must block: no answer for [`BLOCKED_FOR`].
    fn start_blocked(&mut self, cmd: &str) -> Result<()> {
        self.send(cmd)?;
        match self.answers.recv_timeout(BLOCKED_FOR) {
            Err(RecvTimeoutError::Timeout) => Ok(()),
            Ok(a) => bail!("{}: {cmd:?} should block but answered {a:?}", self.name),
            Err(e) => bail!("{}: {cmd:?}: helper gone ({e})", self.name),
        }
    }

    /// kill -9, and wait until it is reaped (within `within`: a process stuck in the
    /// filesystem would not die).
    fn kill9(mut self, within: Duration) -> Result<()> {
        self.child.kill()?;
        let start = Instant::now();
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            ensure!(
                start.elapsed() < within,
                "{}: still alive {within:?} after SIGKILL",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn quit(mut self) -> Result<()> {
        self.send("exit")?;
        let st = self.child.wait()?;
        ensure!(st.success(), "{}: exited with {st}", self.name);
        Ok(())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ the tests

fn eagain() -> String {
    format!("err {}", libc::EAGAIN)
}

async fn with_two_mounts<F>(test: F) -> Result<()>
where
    F: FnOnce(&Path, &Path) -> Result<()> + Send + 'static,
{
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let a = Mount::new(&cluster, "a", NO_CACHE)?;
    let b = Mount::new(&cluster, "b", NO_CACHE)?;
    let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
    blocking(&[&a, &b], move || test(&pa, &pb)).await;
    a.unmount()?;
    b.unmount()?;
    Ok(())
}

fn fcntl_locks(a: &Path, b: &Path) -> Result<()> {
    let (fa, fb) = (a.join("f"), b.join("f"));
    std::fs::write(&fa, vec![7u8; 4096])?;
    let mut ha = Helper::spawn("holder on A")?;
    let mut hb = Helper::spawn("contender on B")?;
    ha.run(&format!("open {}", fa.display()), "fd 0")?;
    hb.run(&format!("open {}", fb.display()), "fd 0")?;

    info!("A write-locks bytes 0..100: B's F_SETLK fails, F_GETLK shows A's lock");
    ha.run("lock 0 w 0 100 nb", "ok")?;
    hb.run("lock 0 w 50 10 nb", &eagain())?;
    hb.run("lock 0 r 0 1 nb", &eagain())?;
    hb.run("getlk 0 r 0 0", &format!("w 0 100 {}", ha.pid()))?;
    info!("disjoint bytes are free on B");
    hb.run("lock 0 w 100 100 nb", "ok")?;
    ha.run("lock 0 w 150 1 nb", &eagain())?;
    hb.run("lock 0 u 100 100 nb", "ok")?;

    info!("A unlocks the middle (a split): B gets the middle, not the ends");
    ha.run("lock 0 u 40 20 nb", "ok")?;
    hb.run("lock 0 w 40 20 nb", "ok")?;
    hb.run("lock 0 w 39 1 nb", &eagain())?;
    hb.run("lock 0 w 60 1 nb", &eagain())?;
    hb.run("lock 0 u 0 0 nb", "ok")?;

    info!("F_SETLKW on B blocks until A unlocks, then gets the lock");
    hb.start_blocked("lock 0 w 0 0 wait")?;
    let t = Instant::now();
    ha.run("lock 0 u 0 0 nb", "ok")?;
    hb.expect("F_SETLKW after the unlock", "ok")?;
    info!(after = ?t.elapsed(), "B's waiter got the lock");
    ha.run("lock 0 r 0 1 nb", &eagain())?;
    ha.run("getlk 0 w 10 10", &format!("w 0 0 {}", hb.pid()))?;
    hb.run("lock 0 u 0 0 nb", "ok")?;

    info!("a signal ends a blocked F_SETLKW with EINTR, or restarts it under SA_RESTART");
    ha.run("lock 0 w 0 0 nb", "ok")?;
    let t = Instant::now();
    hb.run("intr 0 0", &format!("err {}", libc::EINTR))?;
    ensure!(
        t.elapsed() >= Duration::from_millis(400),
        "F_SETLKW returned EINTR after {:?}, before the signal",
        t.elapsed()
    );
    hb.start_blocked("intr 0 1")?;
    ha.run("lock 0 u 0 0 nb", "ok")?;
    hb.expect("F_SETLKW restarted after the signal", "ok")?;
    hb.run("lock 0 u 0 0 nb", "ok")?;

    info!("F_SETLKW that would close a cycle of waiters across mounts fails with EDEADLK");
    ha.run("lock 0 w 0 1 nb", "ok")?;
    hb.run("lock 0 w 1 1 nb", "ok")?;
    ha.start_blocked("lock 0 w 1 1 wait")?;
    hb.run("lock 0 w 0 1 wait", &format!("err {}", libc::EDEADLK))?;
    hb.run("lock 0 u 0 0 nb", "ok")?;
    ha.expect("F_SETLKW once the other side gave up", "ok")?;
    ha.run("lock 0 u 0 0 nb", "ok")?;

    info!("read locks are shared across mounts, a writer is kept out");
    ha.run("lock 0 r 0 0 nb", "ok")?;
    hb.run("lock 0 r 0 0 nb", "ok")?;
    hb.run("lock 0 w 0 0 nb", &eagain())?;
    let mut hc = Helper::spawn("third process on A")?;
    hc.run(&format!("open {}", fa.display()), "fd 0")?;
    hc.run("lock 0 w 5 5 nb", &eagain())?;
    hc.run("lock 0 r 5 5 nb", "ok")?;
    ha.run("lock 0 u 0 0 nb", "ok")?;
    hb.run("lock 0 u 0 0 nb", "ok")?;
    hc.run("lock 0 u 0 0 nb", "ok")?;

    info!("two processes on one mount: a waiter there is woken by the unlock");
    ha.run("lock 0 w 0 0 nb", "ok")?;
    hc.start_blocked("lock 0 w 0 0 wait")?;
    let t = Instant::now();
    ha.run("lock 0 u 0 0 nb", "ok")?;
    hc.expect("F_SETLKW after an unlock on the same mount", "ok")?;
    info!(after = ?t.elapsed(), "the waiter on A got the lock");
    hb.run("lock 0 r 0 1 nb", &eagain())?;
    hc.run("lock 0 u 0 0 nb", "ok")?;

    info!("closing another descriptor of the file drops the process's POSIX locks");
    ha.run("lock 0 w 0 0 nb", "ok")?;
    ha.run(&format!("open {}", fa.display()), "fd 1")?;
    ha.run("close 1", "ok")?;
    hb.run("lock 0 w 0 0 nb", "ok")?;
    hb.run("lock 0 u 0 0 nb", "ok")?;

    info!("OFD locks: held by the open file, released with its close");
    ha.run("ofd 0 w 0 10 nb", "ok")?;
    hb.run("ofd 0 w 5 1 nb", &eagain())?;
    hb.run("lock 0 r 0 1 nb", &eagain())?;
    ha.run("close 0", "ok")?;
    // The kernel sends the release of the last close in the background: wait for it.
    hb.run("ofd 0 w 5 1 wait", "ok")?;
    hb.run("ofd 0 u 0 0 nb", "ok")?;

    info!("a holder killed with SIGKILL loses its locks; B's waiter gets them");
    ha.run(&format!("open {}", fa.display()), "fd 2")?;
    ha.run("lock 2 w 0 0 nb", "ok")?;
    hb.run("lock 0 w 0 0 nb", &eagain())?;
    hb.start_blocked("lock 0 w 0 0 wait")?;
    ha.kill9(Duration::from_secs(10))?;
    hb.expect("F_SETLKW after the holder died", "ok")?;

    info!("a waiter killed with SIGKILL dies at once and takes nothing");
    hc.start_blocked("lock 0 w 0 0 wait")?;
    hc.kill9(Duration::from_secs(5))?;
    hb.run("lock 0 u 0 0 nb", "ok")?;
    let mut hd = Helper::spawn("last process on A")?;
    hd.run(&format!("open {}", fa.display()), "fd 0")?;
    hd.run("lock 0 w 0 0 nb", "ok")?;
    hd.quit()?;
    hb.quit()?;
    Ok(())
}

fn flocks(a: &Path, b: &Path) -> Result<()> {
    let (fa, fb) = (a.join("g"), b.join("g"));
    std::fs::write(&fa, b"flock me")?;
    let mut ha = Helper::spawn("flock holder on A")?;
    let mut hb = Helper::spawn("flock contender on B")?;
    ha.run(&format!("open {}", fa.display()), "fd 0")?;
    hb.run(&format!("open {}", fb.display()), "fd 0")?;
    let ewouldblock = format!("err {}", libc::EWOULDBLOCK);

    info!("LOCK_EX on A: LOCK_EX|LOCK_NB and LOCK_SH|LOCK_NB on B fail");
    ha.run("flock 0 ex", "ok")?;
    hb.run("flock 0 exnb", &ewouldblock)?;
    hb.run("flock 0 shnb", &ewouldblock)?;

    info!("flock and fcntl locks do not see each other (as on Linux)");
    hb.run("lock 0 w 0 0 nb", "ok")?;
    hb.run("lock 0 u 0 0 nb", "ok")?;

    info!("a blocking flock on B waits for A's LOCK_UN");
    hb.start_blocked("flock 0 ex")?;
    ha.run("flock 0 un", "ok")?;
    hb.expect("blocking flock after LOCK_UN", "ok")?;
    ha.run("flock 0 shnb", &ewouldblock)?;

    info!("shared flocks are shared across mounts");
    hb.run("flock 0 sh", "ok")?; // downgrade
    ha.run("flock 0 shnb", "ok")?;
    hb.run("flock 0 exnb", &ewouldblock)?;
    ha.run("flock 0 un", "ok")?;
    hb.run("flock 0 exnb", "ok")?; // upgrade once alone

    info!("closing the descriptor drops the flock");
    hb.run("close 0", "ok")?;
    // The release of the last close comes in the background: a blocking flock waits for it.
    ha.run("flock 0 ex", "ok")?;

    info!("a flock holder killed with SIGKILL loses it; a blocked flock gets it");
    hb.run(&format!("open {}", fb.display()), "fd 1")?;
    hb.start_blocked("flock 1 ex")?;
    ha.kill9(Duration::from_secs(10))?;
    hb.expect("blocking flock after the holder died", "ok")?;
    hb.quit()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fcntl_locks_across_two_mounts() -> Result<()> {
    with_two_mounts(fcntl_locks).await
}

#[tokio::test(flavor = "multi_thread")]
async fn flock_across_two_mounts() -> Result<()> {
    with_two_mounts(flocks).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_mount_frees_its_locks() -> Result<()> {
    require_root_and_fuse();
    init_tracing();
    let _serial = SERIAL.lock().await;
    let cluster = KerfsCluster::start(KerfsClusterOptions::default()).await?;
    let a = Mount::new(&cluster, "a", &format!("{NO_CACHE},lease=2"))?;
    let b = Mount::new(&cluster, "b", NO_CACHE)?;
    let a_pid = a.daemon_pid()?;
    let (pa, pb) = (a.path().join("h"), b.path().join("h"));
    blocking(&[&a, &b], move || -> Result<()> {
        std::fs::write(&pa, b"held by a mount that dies")?;
        let mut ha = Helper::spawn("holder on A")?;
        let mut hb = Helper::spawn("waiter on B")?;
        ha.run(&format!("open {}", pa.display()), "fd 0")?;
        hb.run(&format!("open {}", pb.display()), "fd 0")?;
        ha.run("lock 0 w 0 0 nb", "ok")?;
        ha.run("flock 0 ex", "ok")?;
        hb.run("lock 0 r 0 0 nb", &eagain())?;
        hb.run("flock 0 shnb", &format!("err {}", libc::EWOULDBLOCK))?;
        hb.start_blocked("lock 0 w 0 0 wait")?;
        info!(pid = a_pid, "kill -9 of mount A's kerfs process");
        // SAFETY: signals the kerfs process this test started.
        ensure!(
            unsafe { libc::kill(a_pid, libc::SIGKILL) } == 0,
            "kill failed"
        );
        let t = Instant::now();
        hb.expect_within("F_SETLKW after mount A died", "ok", Duration::from_secs(30))?;
        info!(after = ?t.elapsed(), "the lease of the dead mount ran out; B got the lock");
        ensure!(
            t.elapsed() >= Duration::from_millis(1000),
            "the lock came free {:?} after the kill, before A's lease could end",
            t.elapsed()
        );
        hb.run("flock 0 ex", "ok")?;
        hb.quit()?;
        drop(ha); // on a dead mount: killed
        Ok(())
    })
    .await;
    b.unmount()?;
    Ok(())
}
