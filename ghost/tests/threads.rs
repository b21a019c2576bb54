//! Multi-threaded processes through `krg run` / `krg checkpoint --kill` / `krg restart`: a
//! thread pool checkpointed with work in flight finishes with the result of an uninterrupted
//! run, every thread under the TID it had.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Tasks the pool works through: a few seconds, so that the checkpoint lands mid-work.
const TASKS: &str = "600";

/// TIDs of `pid`'s threads in its own PID namespace, with their names.
fn ns_tids(pid: i32) -> BTreeSet<(i32, String)> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let s = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        if let Some(t) = s
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|p| p.parse().ok())
        {
            let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.insert((t, name.trim().to_string()));
        }
    }
    out
}

fn result_line(s: &str) -> Option<String> {
    s.lines()
        .find(|l| l.starts_with("RESULT "))
        .map(str::to_string)
}

fn done_count(s: &str) -> usize {
    s.lines()
        .filter_map(|l| l.strip_prefix("DONE "))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn thread_pool_checkpointed_mid_work_finishes_with_the_same_result_and_tids() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "threadpool", &[]);
    let _reap = Reaper(prog.clone());

    // The uninterrupted run, for the result to compare with.
    let plain = d.path().join("plain.log");
    let mut c = spawn(&prog, &[plain.to_str().unwrap(), TASKS]);
    assert!(c.wait().unwrap().success());
    let want = result_line(&read(&plain)).expect("the uninterrupted run prints its RESULT");
    assert!(read(&plain).contains("TIDS OK"), "{}", read(&plain));

    let (log, img) = (d.path().join("log"), d.path().join("img"));
    let mut run = Command::new(krg())
        .args(["run", "--"])
        .arg(&prog)
        .args([log.to_str().unwrap(), TASKS])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(run.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line
        .split("as pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected krg output: {line}"));
    wait_for(&log, "work in flight", 60, |s| done_count(s) >= 60);
    let before = ns_tids(pid);
    assert_eq!(
        before.len(),
        10,
        "main, 8 workers and the waiter: {before:?}"
    );
    let out = checkpoint(pid, &img, &["--kill"]);
    assert!(out.status.success(), "{}", stderr(&out));
    run.wait().unwrap();
    let at_kill = read(&log);
    assert!(
        result_line(&at_kill).is_none() && done_count(&at_kill) < 600,
        "the checkpoint must land mid-work:\n{at_kill}"
    );

    let err = d.path().join("restart.err");
    let st = Command::new(krg())
        .args(["restart", img.to_str().unwrap(), "--detach"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(st.success(), "{}", read(&err));
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "exactly one restored process: {pids:?}");
    assert_eq!(
        ns_tids(pids[0]),
        before,
        "every thread is back under its TID and its name"
    );
    let s = wait_for(&log, "the result after restart", 120, |s| {
        s.contains("TIDS ")
    });
    assert_eq!(result_line(&s), Some(want), "{s}");
    assert!(s.contains("TIDS OK"), "a thread saw its TID change:\n{s}");
    assert!(
        s.contains("WOKEN"),
        "the thread blocked in read() resumed:\n{s}"
    );
    assert!(
        done_count(&s) > done_count(&at_kill),
        "work went on after restart"
    );
}

/// An image of a multi-threaded process cannot be restored under another PID: its threads
/// would come back with TIDs other than those glibc cached.
#[test]
fn threads_need_their_pid_kept() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "threadpool", &[]);
    let _reap = Reaper(prog.clone());
    let log = d.path().join("log");
    let mut c = spawn(&prog, &[log.to_str().unwrap(), "100000"]);
    wait_for(&log, "start", 30, |s| s.contains("STARTED"));
    let w = export_killed(c.id() as i32);
    c.wait().unwrap();
    let mut r = kerfs_ghost::MemReader::new(&w.buf);
    let e = kerfs_ghost::import_process(
        &mut r,
        &kerfs_ghost::ImportOptions {
            pid: kerfs_ghost::PidChoice::Any,
            ..Default::default()
        },
    )
    .expect_err("refused");
    assert!(e.to_string().contains("TIDs must come back"), "{e}");
    assert!(pids_of(&prog).is_empty(), "nothing was started");
}

/// A checkpoint that leaves the process running lets every thread go where it was: the pool
/// finishes with the uninterrupted result, and the image holds every thread.
#[test]
fn thread_pool_left_running_after_a_checkpoint_finishes_unharmed() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "threadpool", &[]);
    let _reap = Reaper(prog.clone());
    let plain = d.path().join("plain.log");
    assert!(spawn(&prog, &[plain.to_str().unwrap(), "200"])
        .wait()
        .unwrap()
        .success());
    let want = result_line(&read(&plain)).expect("RESULT");
    let log = d.path().join("log");
    let mut c = spawn(&prog, &[log.to_str().unwrap(), "200"]);
    wait_for(&log, "work in flight", 60, |s| done_count(s) >= 20);
    let mut w = kerfs_ghost::MemWriter::default();
    let rep = kerfs_ghost::export_process(
        c.id() as i32,
        &kerfs_ghost::ExportOptions::default(),
        &mut w,
    )
    .expect("export");
    assert_eq!(rep.threads, 10, "main, 8 workers and the waiter");
    let img = kerfs_ghost::load_image(&mut kerfs_ghost::MemReader::new(&w.buf)).unwrap();
    assert_eq!(img.meta.threads.len(), 9);
    assert!(img.meta.threads.iter().all(|t| t.clear_child_tid != 0));
    assert!(c.wait().unwrap().success());
    let s = read(&log);
    assert_eq!(result_line(&s), Some(want), "{s}");
    assert!(s.contains("TIDS OK"), "{s}");
}
