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
    let comm = read(Path::new(&format!("/proc/{pid}/comm")));
    let img = dir.join("img");
    let mut w = FileWriter::create(&img).unwrap();
    let rep = export_process(
        pid,
        &ExportOptions {
            after: After::Kill,
            ..Default::default()
        },
        &mut w,
    )
    .expect("export");
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
    assert_eq!(
        read(Path::new(&format!("/proc/{pid}/comm"))),
        comm,
        "the restored process goes by its own name, not the restorer's"
    );
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

/// A process blocked in read(2) on a pipe re-runs the read after restart and gets the data
/// written to the pipe afterwards.
#[test]
fn blocked_pipe_read_is_restarted() {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "piperead", &[]);
    let log = d.path().join("log");
    let mut p = [0i32; 2];
    // SAFETY: p is a 2-int array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds from pipe2.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let keep_rd = rd.try_clone().unwrap();
    let mut wr = std::fs::File::from(wr);
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(&prog);
        // SAFETY: close_range is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::close_range(3, u32::MAX, 0);
                Ok(())
            });
        }
        c.arg(&log)
            .stdin(std::process::Stdio::from(rd))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let pid = child.id() as i32;
    wr.write_all(b"one\n").unwrap();
    wait_for(&log, "first line", 10, |s| s.contains("got one"));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let w = export_killed(pid);
    child.wait().unwrap();
    let imp = import_process(
        &mut MemReader::new(&w.buf),
        &ImportOptions {
            inherit_fds: vec![(0, keep_rd.as_raw_fd())],
            ..Default::default()
        },
    )
    .expect("import");
    drop(keep_rd);
    wr.write_all(b"two\n").unwrap();
    let s = wait_for(&log, "line after restart", 10, |s| s.contains("got two"));
    assert_eq!(
        s, "got one\ngot two\n",
        "the restarted read must neither fail nor repeat"
    );
    assert!(alive(imp.pid));
    drop(wr);
    let s = wait_for(&log, "EOF", 10, |s| s.contains("EOF"));
    assert!(s.ends_with("EOF 0\n"), "read must see a clean EOF: {s}");
    kill(imp.pid);
}

/// Values kept in AVX registers (upper halves included) survive checkpoint and restart.
#[test]
fn avx_registers_survive() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "avx", &["-mavx2"]);
    let log = d.path().join("log");
    let mut child = spawn(&prog, &[log.to_str().unwrap()]);
    let pid = child.id() as i32;
    wait_for(&log, "ok lines", 20, |s| s.lines().count() >= 3);
    let w = export_killed(pid);
    child.wait().unwrap();
    let n = read(&log).lines().count();
    let imp =
        import_process(&mut MemReader::new(&w.buf), &ImportOptions::default()).expect("import");
    let s = wait_for(&log, "ok lines after restart", 20, |s| {
        s.contains("BAD") || s.lines().count() >= n + 3
    });
    assert!(
        !s.contains("BAD"),
        "vector registers changed across restart"
    );
    assert!(s.lines().all(|l| l == "ok"));
    kill(imp.pid);
}

/// Damaged images are refused before any process is created; the error says why.
#[test]
fn damaged_images_are_refused() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "counter", &[]);
    let log = d.path().join("log");
    let app = d.path().join("app");
    let mut child = spawn(&prog, &["4", log.to_str().unwrap(), app.to_str().unwrap()]);
    let pid = child.id() as i32;
    wait_for(&log, "counters", 20, |s| counters(s).len() >= 3);
    let mut w = MemWriter::default();
    export_process(pid, &ExportOptions::default(), &mut w).expect("export");
    // Left running: it keeps counting.
    let n = counters(&read(&log)).len();
    wait_for(&log, "counting after export", 20, |s| {
        counters(s).len() > n + 3
    });
    let good = w.buf;
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    cases.push(("truncated", good[..good.len() / 2].to_vec(), "truncated"));
    cases.push(("header only", good[..20].to_vec(), "truncated"));
    let mut flip = good.clone();
    let mid = flip.len() / 2;
    flip[mid] ^= 0x10;
    cases.push(("bit flip in pages", flip, "checksum"));
    let mut flip = good.clone();
    flip[40] ^= 0x01;
    cases.push(("bit flip in metadata", flip, "checksum"));
    let mut bad = good.clone();
    bad[0] = b'X';
    cases.push(("wrong magic", bad, "not a ghost image"));
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    cases.push(("newer format", newer, "newer"));
    let mut longer = good.clone();
    longer.push(0);
    cases.push(("trailing garbage", longer, "after the end"));
    for (what, img, needle) in cases {
        let e = import_process(&mut MemReader::new(&img), &ImportOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{what}: a damaged image was imported"));
        // BadImage is only produced while reading the image, before clone.
        assert!(
            matches!(e, GhostError::BadImage(_)),
            "{what}: wrong error {e:?}"
        );
        assert!(
            e.to_string().contains(needle),
            "{what}: message {e} lacks '{needle}'"
        );
    }
    // The same through a file, which import maps instead of reading.
    let f = d.path().join("flipped");
    let mut flip = good.clone();
    let at = flip.len() - 100;
    flip[at] ^= 0x80;
    std::fs::write(&f, &flip).unwrap();
    let e = import_process(
        &mut FileReader::open(&f).unwrap(),
        &ImportOptions::default(),
    )
    .expect_err("a damaged image file was imported");
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(alive(pid), "refusing images must not touch the original");
    // The intact image is accepted but its PID is taken; SameOrAny gives another one.
    let imp = import_process(&mut MemReader::new(&good), &ImportOptions::default()).unwrap();
    assert!(!imp.same_pid && imp.pid != pid);
    kill(imp.pid);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Ghost size of Modified Gram-Schmidt grows with the matrix like the heap does (the ghost
/// process paper's table; smaller matrices here to keep the test short).
#[test]
fn mgs_image_size_grows_with_matrix() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "mgs", &[]);
    let mut sizes = Vec::new();
    for n in [200u64, 400, 800] {
        let log = d.path().join(format!("log{n}"));
        let mut child = spawn(&prog, &[&n.to_string(), log.to_str().unwrap()]);
        wait_for(&log, "MGS done", 60, |s| s.contains("ready"));
        let mut w = MemWriter::default();
        let rep = export_process(
            child.id() as i32,
            &ExportOptions {
                after: After::Kill,
                ..Default::default()
            },
            &mut w,
        )
        .expect("export");
        child.wait().unwrap();
        assert_eq!(rep.image_bytes, w.buf.len() as u64);
        // A is fully written; R is calloc'ed (fresh zero pages) and only its upper triangle is
        // written, so between 0 and all of its pages are stored depending on n.
        let a = n * n * 8;
        assert!(rep.page_bytes >= a, "n={n}: {} < {a}", rep.page_bytes);
        assert!(
            rep.page_bytes <= 2 * a + (4 << 20),
            "n={n}: {} stored",
            rep.page_bytes
        );
        sizes.push((n, rep.page_bytes));
    }
    // Growth between two sizes is at least that of A and at most that of A and R.
    for w in sizes.windows(2) {
        let (n0, b0) = w[0];
        let (n1, b1) = w[1];
        let grow = b1 as f64 - b0 as f64;
        let heap = ((n1 * n1 - n0 * n0) * 8) as f64;
        assert!(
            grow > 0.95 * heap && grow < 2.05 * heap,
            "image grew by {grow} from n={n0} to n={n1}, matrices by {heap}"
        );
    }
}

/// Migration through the TCP resource access objects, library only: the receiving thread
/// imports the ghost and acks, then the sender destroys the original.
#[test]
fn migrate_over_tcp_stream_library() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "counter", &[]);
    let (log, app) = (d.path().join("log"), d.path().join("app"));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    // The importing thread is the restored process's parent and tracer: it also reaps it.
    let receiver = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let rep = serve_migration(s, &ImportOptions::default()).expect("remote import");
        rep.pid
    });
    let mut child = spawn(&prog, &["16", log.to_str().unwrap(), app.to_str().unwrap()]);
    let pid = child.id() as i32;
    wait_for(&log, "counters", 20, |s| counters(s).len() >= 5);
    let mut w = TcpWriter::connect(&addr).unwrap();
    export_process(
        pid,
        &ExportOptions {
            after: After::Stop,
            ..Default::default()
        },
        &mut w,
    )
    .expect("export");
    let ack = w.wait_ack().unwrap();
    // The stopped original still holds its PID, so the receiver had to take another one.
    let MigrationAck::Restored(_) = ack else {
        panic!("remote failed: {ack:?}")
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let new_pid = receiver.join().unwrap();
    assert_ne!(new_pid, pid);
    let n = counters(&read(&log)).len();
    let s = wait_for(&log, "counting after migration", 20, |s| {
        counters(s).len() >= n + 10
    });
    assert_consecutive(&s, n + 10);
    // The receiving thread has exited; the restored process was reparented and is not ours.
    // SAFETY: kill(2) of the migrated test program.
    unsafe { libc::kill(new_pid, libc::SIGKILL) };
}
