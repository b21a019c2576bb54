//! Checkpoint, kill and restart real processes and check they carry on where they were.

mod common;

use common::*;
use kerfs_ghost::*;
use std::path::Path;

/// Counter + heap + every protection + files + SIGUSR1: the main scenario.
fn counter_scenario(prog: &Path, dir: &Path, heap_mb: usize) {
    let log = dir.join("log");
    let app = dir.join("app");
    let mut child = spawn(
        prog,
        &[
            &heap_mb.to_string(),
            log.to_str().unwrap(),
            app.to_str().unwrap(),
        ],
    );
    let pid = child.id() as i32;
    wait_for(&log, "first counters", 60, |s| counters(s).len() >= 5);
    let img = dir.join("img");
    let mut w = FileWriter::create(&img).unwrap();
    let rep = export_process(pid, &ExportOptions { after: After::Kill }, &mut w).expect("export");
    let st = child.wait().unwrap();
    assert!(!st.success(), "original must have been killed");
    assert!(
        rep.page_bytes >= (heap_mb as u64) << 20,
        "image stores {} page bytes, less than the {} MiB heap",
        rep.page_bytes,
        heap_mb
    );
    let before = counters(&read(&log));
    let last = *before.last().unwrap();
    let apps_before = read(&app).lines().count();

    let mut r = FileReader::open(&img).unwrap();
    let imp = import_process(&mut r, &ImportOptions::default()).expect("import");
    assert!(
        imp.same_pid,
        "the PID of the dead original is free and must be taken back"
    );
    assert_eq!(imp.pid, pid);
    let after = wait_for(&log, "counting after restart", 30, |s| {
        counters(s).len() >= before.len() + 10
    });
    let all = counters(&after);
    for (i, c) in all.iter().enumerate() {
        assert_eq!(
            *c,
            i as u64 + 1,
            "counter sequence broken at line {i}: {all:?}"
        );
    }
    assert!(all.len() as u64 > last);
    // SIGUSR1: the restored handler runs and the whole memory checks out.
    // SAFETY: signal to our restored child.
    unsafe { libc::kill(imp.pid, libc::SIGUSR1) };
    let s = wait_for(&log, "memory check", 60, |s| s.contains("CHECK "));
    assert!(
        s.contains("CHECK OK 1"),
        "memory check after restart failed:\n{s}"
    );
    let apps = read(&app);
    let a: Vec<&str> = apps.lines().collect();
    assert!(a.len() > apps_before);
    for (i, l) in a.iter().enumerate() {
        assert_eq!(*l, format!("a{}", i + 1), "appended file broken");
    }
    kill(imp.pid);
}

#[test]
fn counter_heap_maps_files_signal_dynamic() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "counter", &[]);
    counter_scenario(&prog, d.path(), 512);
}

#[test]
fn counter_static_binary() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "counter", &["-static"]);
    counter_scenario(&prog, d.path(), 64);
}
