//! The `krg` command line on real processes: run/checkpoint/restart in PID namespaces,
//! migration to a `krg listen` over TCP loopback, freeze/unfreeze.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

fn wait_pid_from_stderr(child: &mut std::process::Child) -> i32 {
    let err = child.stderr.take().unwrap();
    let mut line = String::new();
    BufReader::new(err).read_line(&mut line).unwrap();
    // "krg: PROG runs as pid N (pid 2 in its own PID namespace)"
    line.split("as pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected krg output: {line}"))
}

/// Builds the counter program (DIR/counter) and starts it under `krg run` (`mb` MiB of memory,
/// logging to DIR/log): the `krg run` child, the program's pid and the log.
fn run_counter(dir: &Path, mb: &str) -> (std::process::Child, i32, std::path::PathBuf) {
    let prog = build(dir, "counter", &[]);
    let (log, app) = (dir.join("log"), dir.join("app"));
    let mut run = Command::new(krg())
        .args(["run", "--"])
        .arg(&prog)
        .args([mb, log.to_str().unwrap(), app.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = wait_pid_from_stderr(&mut run);
    (run, pid, log)
}

#[test]
fn run_checkpoint_kill_restart_keeps_pid() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    // Big enough for the image to be hashed, and the pages written, by several threads.
    let (mut run, pid, log) = run_counter(d.path(), "80");
    let img = d.path().join("img");
    assert_eq!(
        ns_pid(pid),
        2,
        "krg run must start the command as pid 2 of a new namespace"
    );
    wait_for(&log, "counters", 20, |s| counters(s).len() >= 5);
    let st = Command::new(krg())
        .args([
            "checkpoint",
            &pid.to_string(),
            "--to",
            img.to_str().unwrap(),
            "--kill",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let st = run.wait().unwrap();
    assert_eq!(
        st.code(),
        Some(137),
        "krg run reports the SIGKILL of its command"
    );
    let n = counters(&read(&log)).len();
    // The command's stderr was the pipe to this test, which cannot be reopened: the restored
    // process takes krg restart's stderr instead, so that goes to a file, not to a pipe whose
    // EOF we would wait for.
    let err = d.path().join("restart.err");
    let st = Command::new(krg())
        .args(["restart", img.to_str().unwrap(), "--detach"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(st.success(), "{}", read(&err));
    let s = wait_for(&log, "counting after restart", 20, |s| {
        counters(s).len() >= n + 10
    });
    assert_consecutive(&s, n + 10);
    let pids = pids_of(&d.path().join("counter"));
    assert_eq!(pids.len(), 1, "exactly one restored process: {pids:?}");
    assert_eq!(
        ns_pid(pids[0]),
        2,
        "the restored process has its old PID in its namespace"
    );
    // SAFETY: signalling the restored test process: its whole memory checks out.
    unsafe { libc::kill(pids[0], libc::SIGUSR1) };
    let s = wait_for(&log, "memory check", 20, |s| s.contains("CHECK "));
    assert!(s.contains("CHECK OK 1"), "{s}");
    kill(pids[0]);
}

#[test]
fn restart_refuses_damaged_file() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img");
    std::fs::write(&img, b"KRGGHOST\x01\0\0\0 \0\0\0garbage").unwrap();
    let out = Command::new(krg())
        .args(["restart", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("truncated"), "unclear message: {e}");
}

#[test]
fn migrate_to_krg_listen_over_loopback() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "counter", &[]);
    let (log, app) = (d.path().join("log"), d.path().join("app"));
    let mut listen = Command::new(krg())
        .args(["listen", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(listen.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    let mut child = spawn(&prog, &["32", log.to_str().unwrap(), app.to_str().unwrap()]);
    let pid = child.id() as i32;
    wait_for(&log, "counters", 20, |s| counters(s).len() >= 5);
    let out = Command::new(krg())
        .args(["migrate", &pid.to_string(), &addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "the original is destroyed after the ack"
    );
    let n = counters(&read(&log)).len();
    let s = wait_for(&log, "counting on the receiver", 20, |s| {
        counters(s).len() >= n + 10
    });
    assert_consecutive(&s, n + 10);
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(ns_pid(pids[0]), pid, "same PID in the receiver's namespace");
    // SIGUSR1 handler and memory survived the trip.
    // SAFETY: signal to the migrated test program.
    unsafe { libc::kill(pids[0], libc::SIGUSR1) };
    let s = wait_for(&log, "memory check", 20, |s| s.contains("CHECK "));
    assert!(s.contains("CHECK OK 1"), "{s}");
    kill(pids[0]);
    listen.kill().unwrap();
    listen.wait().unwrap();
}

#[test]
fn freeze_and_unfreeze() {
    require_root();
    // Looked up before the program starts: a missing krg must not leave it running.
    let krg = krg();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "counter", &[]);
    let (log, app) = (d.path().join("log"), d.path().join("app"));
    let mut child = spawn(&prog, &["1", log.to_str().unwrap(), app.to_str().unwrap()]);
    let pid = child.id().to_string();
    wait_for(&log, "counters", 20, |s| counters(s).len() >= 3);
    assert!(Command::new(&krg)
        .args(["freeze", &pid])
        .status()
        .unwrap()
        .success());
    let n = counters(&read(&log)).len();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        counters(&read(&log)).len(),
        n,
        "a frozen process must not run"
    );
    assert!(Command::new(&krg)
        .args(["unfreeze", &pid])
        .status()
        .unwrap()
        .success());
    wait_for(&log, "counting again", 20, |s| counters(s).len() > n + 3);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A krg killed in the middle of a dump must leave the process running on: here the image goes
/// into a FIFO nobody reads, so krg is certainly blocked mid-dump when it is killed.
#[test]
fn killed_krg_mid_checkpoint_leaves_the_process_running() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (mut run, pid, log) = run_counter(d.path(), "8");
    let fifo = d.path().join("fifo");
    wait_for(&log, "counters", 20, |s| counters(s).len() >= 3);
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // Held open for reading (never read) so that krg's open succeeds and its writes block.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let mut ckpt = Command::new(krg())
        .args([
            "checkpoint",
            &pid.to_string(),
            "--to",
            fifo.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until krg traces the process (it is frozen), then give it time to fill the FIFO.
    let traced = |p: i32| {
        read(Path::new(&format!("/proc/{p}/status")))
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
    };
    for _ in 0..200 {
        if traced(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(traced(pid), "krg never froze the process");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        ckpt.try_wait().unwrap().is_none(),
        "krg ended though nobody read its image"
    );
    ckpt.kill().unwrap();
    ckpt.wait().unwrap();
    let n = counters(&read(&log)).len();
    let s = wait_for(&log, "counting after krg died", 20, |s| {
        counters(s).len() >= n + 5
    });
    assert_consecutive(&s, n + 5);
    assert!(alive(pid));
    kill(pid);
    let _ = run.wait();
}
