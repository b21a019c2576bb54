//! Record locks across two mounts of one cluster, through the kernel: real `kerfsd`
//! processes, two `kerfs` mounts, and lock holders that are separate processes (this test
//! binary run again as `lock_helper`, driven line by line over its stdin/stdout), because
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

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kerfs_tests::{init_tracing, require_root_and_fuse, KerfsCluster, KerfsClusterOptions, Mount};
use tracing::info;

/// Each test starts a cluster on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Marks the helper's answers among whatever else the test harness prints.
const TAG: &str = "@@ ";

/// How long a request that should block is watched before we call it blocked.
const BLOCKED_FOR: Duration = Duration::from_millis(800);
/// How long a request that should complete may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ mounts

/// Mount options of every mount here: no kernel attribute or entry caching, so each mount
/// sees the other's changes at once.
const NO_CACHE: &str = ",attr_timeout=0,entry_timeout=0";

// ------------------------------------------------------------------ the helper process

/// A lock-holding process: this test binary running `lock_helper`, one command per line.
struct Helper {
    name: String,
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
}

impl Helper {
    fn spawn(name: &str) -> Result<Helper> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "lock_helper",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KERFS_LOCK_HELPER", "1")
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
                // The harness may have printed "test lock_helper ... " on the same line.
                if let Some((_, a)) = line.split_once(TAG) {
                    if tx.send(a.to_string()).is_err() {
                        return;
                    }
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

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn answer_of(r: libc::c_int) -> String {
    if r < 0 {
        format!("err {}", errno())
    } else {
        "ok".into()
    }
}

fn lock_type(t: &str) -> Option<libc::c_short> {
    match t {
        "r" => Some(libc::F_RDLCK as libc::c_short),
        "w" => Some(libc::F_WRLCK as libc::c_short),
        "u" => Some(libc::F_UNLCK as libc::c_short),
        _ => None,
    }
}

fn flock_of(t: libc::c_short, start: i64, len: i64) -> libc::flock {
    // SAFETY: struct flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = t;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// One helper command (see `lock_helper`); returns the answer line.
fn helper_command(fds: &mut Vec<libc::c_int>, words: &[&str]) -> Option<String> {
    let fd =
        |i: &str, fds: &Vec<libc::c_int>| i.parse::<usize>().ok().and_then(|i| fds.get(i).copied());
    Some(match words {
        ["open", path] => {
            let p = CString::new(Path::new(path).as_os_str().as_bytes()).ok()?;
            // SAFETY: a valid C string.
            let r = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
            if r < 0 {
                format!("err {}", errno())
            } else {
                fds.push(r);
                format!("fd {}", fds.len() - 1)
            }
        }
        ["close", i] => {
            // SAFETY: closing a descriptor this process opened.
            let r = unsafe { libc::close(fd(i, fds)?) };
            answer_of(r)
        }
        // fcntl F_SETLK (nb) / F_SETLKW (wait), or the OFD variants.
        [cmd @ ("lock" | "ofd"), i, t, start, len, how] => {
            let fl = flock_of(lock_type(t)?, start.parse().ok()?, len.parse().ok()?);
            let op = match (*cmd, *how) {
                ("lock", "nb") => libc::F_SETLK,
                ("lock", "wait") => libc::F_SETLKW,
                ("ofd", "nb") => libc::F_OFD_SETLK,
                ("ofd", "wait") => libc::F_OFD_SETLKW,
                _ => return None,
            };
            // SAFETY: fcntl with a valid struct flock.
            answer_of(unsafe { libc::fcntl(fd(i, fds)?, op, &fl) })
        }
        // F_GETLK: "unlocked" or "TYPE START LEN PID" of the lock in the way.
        ["getlk", i, t, start, len] => {
            let mut fl = flock_of(lock_type(t)?, start.parse().ok()?, len.parse().ok()?);
            // SAFETY: fcntl with a valid struct flock.
            let r = unsafe { libc::fcntl(fd(i, fds)?, libc::F_GETLK, &mut fl) };
            if r < 0 {
                format!("err {}", errno())
            } else if fl.l_type == libc::F_UNLCK as libc::c_short {
                "unlocked".into()
            } else {
                let t = if fl.l_type == libc::F_WRLCK as libc::c_short {
                    "w"
                } else {
                    "r"
                };
                format!("{t} {} {} {}", fl.l_start, fl.l_len, fl.l_pid)
            }
        }
        // F_SETLKW of the whole file, with a SIGUSR1 sent to this very thread 500 ms in; the
        // handler has SA_RESTART if `restart` is 1.
        ["intr", i, restart] => {
            let fd = fd(i, fds)?;
            extern "C" fn on_usr1(_: libc::c_int) {}
            // SAFETY: installs a handler that does nothing; plain libc calls.
            let (pid, tid) = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_usr1 as *const () as usize;
                sa.sa_flags = if *restart == "1" { libc::SA_RESTART } else { 0 };
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
                (libc::getpid(), libc::gettid())
            };
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                // SAFETY: signals a thread of this process.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1) };
            });
            let fl = flock_of(libc::F_WRLCK as libc::c_short, 0, 0);
            // SAFETY: fcntl with a valid struct flock.
            answer_of(unsafe { libc::fcntl(fd, libc::F_SETLKW, &fl) })
        }
        ["flock", i, how] => {
            let op = match *how {
                "ex" => libc::LOCK_EX,
                "sh" => libc::LOCK_SH,
                "un" => libc::LOCK_UN,
                "exnb" => libc::LOCK_EX | libc::LOCK_NB,
                "shnb" => libc::LOCK_SH | libc::LOCK_NB,
                _ => return None,
            };
            // SAFETY: flock on a descriptor.
            answer_of(unsafe { libc::flock(fd(i, fds)?, op) })
        }
        _ => return None,
    })
}

/// Not a test: the lock-holding process the tests start (see [`Helper`]). Reads commands
/// from stdin and answers each with one line starting with [`TAG`].
#[test]
#[ignore = "helper process of the lock tests; they run it"]
fn lock_helper() {
    if std::env::var_os("KERFS_LOCK_HELPER").is_none() {
        return;
    }
    let out = |s: &str| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{TAG}{s}");
        let _ = o.flush();
    };
    out("ok");
    let mut fds = Vec::new();
    for line in std::io::stdin().lock().lines().map_while(|l| l.ok()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words == ["exit"] {
            return;
        }
        match helper_command(&mut fds, &words) {
            Some(a) => out(&a),
            None => out(&format!("bad command {line:?}")),
        }
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
    let r = tokio::task::spawn_blocking(move || test(&pa, &pb))
        .await
        .expect("test thread");
    if let Err(e) = r {
        for m in [&a, &b] {
            eprintln!(
                "--- tail of the log of {} ---\n{}",
                m.path().display(),
                m.log_tail()
            );
        }
        return Err(e);
    }
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
    let r = tokio::task::spawn_blocking(move || -> Result<()> {
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
    .await
    .expect("test thread");
    if let Err(e) = r {
        for m in [&a, &b] {
            eprintln!(
                "--- tail of the log of {} ---\n{}",
                m.path().display(),
                m.log_tail()
            );
        }
        return Err(e);
    }
    b.unmount()?;
    Ok(())
}
