//! Event and timer fds, as an event loop holds them: a process with eventfds, timerfds, a
//! signalfd and an epoll fd watching a pipe and eventfds is checkpointed with `krg checkpoint
//! --kill`, restarted with `krg restart`, and then checks its own state (tests/c/eventloop.c):
//! counters, semaphore mode, flags, the signal mask, the epoll set with its data, edge-triggered
//! and oneshot behaviour, timers firing within their time left and then at their interval,
//! an unread expiration, inotify watches with their descriptors. What cannot be restored (an
//! epoll registration of an fd closed since, an inotify fd with unread events) refuses the checkpoint and leaves the process running.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Starts eventloop with `extra` and waits until it has set everything up.
fn start(d: &Path, extra: &[&str]) -> (PathBuf, PathBuf, PathBuf, std::process::Child) {
    let prog = build(d, "eventloop", &[]);
    // GO in a directory of its own: the inotify fd watches it, and must see nothing else.
    let (log, go) = (d.join("log"), d.join("w").join("go"));
    std::fs::create_dir(d.join("w")).unwrap();
    let mut args = vec![log.to_str().unwrap(), go.to_str().unwrap()];
    args.extend_from_slice(extra);
    let child = spawn(&prog, &args);
    wait_for(&log, "READY", 10, |s| {
        s.contains("READY") || s.contains("SETUP")
    });
    assert!(read(&log).contains("READY"), "{}", read(&log));
    (prog, log, go, child)
}

#[test]
fn event_timer_signal_and_epoll_fds_come_back_with_their_state() {
    checkpoint_restart_check(&[], 20);
}

#[test]
fn inotify_watches_come_back_with_their_descriptors() {
    let s = checkpoint_restart_check(&["inotify"], 22);
    assert!(s.contains("OK inotify\n"), "{s}");
}

/// Starts eventloop with `extra`, checkpoints it with `--kill`, restarts it, has it check
/// its state and returns its log, asserting that at least `checks` checks passed and none
/// failed.
fn checkpoint_restart_check(extra: &[&str], checks: usize) -> String {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, log, go, mut child) = start(d.path(), extra);
    let _reap = Reaper(prog.clone());
    let img = d.path().join("img");
    let out = checkpoint(child.id() as i32, &img, &["--kill"]);
    assert!(out.status.success(), "checkpoint: {}", stderr(&out));
    child.wait().unwrap();
    let err = d.path().join("restart.err");
    let ok = Command::new(krg())
        .args(["restart", img.to_str().unwrap(), "--detach"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .expect("run krg restart")
        .success();
    assert!(ok, "restart: {}", read(&err));
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "one restored process: {pids:?}");
    // Blocked in the restored process: it must be queued for the signalfd to read.
    // SAFETY: signalling the test program.
    unsafe { libc::kill(pids[0], libc::SIGUSR2) };
    std::fs::write(&go, "").unwrap();
    let s = wait_for(&log, "the verdict", 30, |s| s.contains("VERDICT"));
    let bad: Vec<&str> = s.lines().filter(|l| l.starts_with("BAD")).collect();
    assert!(
        bad.is_empty() && s.contains("VERDICT ok"),
        "the restored process found its fds changed:\n{}",
        bad.join("\n")
    );
    assert!(
        s.lines().filter(|l| l.starts_with("OK ")).count() >= checks,
        "not every check ran:\n{s}"
    );
    s
}

/// `--kill` refused with every piece of `expect` in the message, the process left running.
fn refused(extra: &str, expect: &[&str]) {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _log, _go, child) = start(d.path(), &[extra]);
    let _reap = Reaper(prog);
    let pid = child.id() as i32;
    let img = d.path().join("img");
    let out = checkpoint(pid, &img, &["--kill"]);
    let e = stderr(&out);
    assert!(!out.status.success(), "checkpoint succeeded: {e}");
    for want in expect {
        assert!(e.contains(want), "the refusal does not say {want:?}: {e}");
    }
    assert!(!img.exists(), "a refused checkpoint wrote an image");
    assert!(alive(pid), "the refused process is gone");
}

#[test]
fn epoll_watching_a_closed_fd_is_refused() {
    refused(
        "stale",
        &[
            "anon_inode:[eventpoll], an epoll instance",
            "which was closed or now names another file",
            "EPOLL_CTL_DEL",
        ],
    );
}

#[test]
fn inotify_with_unread_events_is_refused_with_what_to_do() {
    refused(
        "inotify-unread",
        &[
            "an inotify instance",
            "queued unread",
            "add its watches again after the restart",
            "--drop",
        ],
    );
}
