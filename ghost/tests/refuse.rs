//! Nothing is lost by a checkpoint: `krg checkpoint` refuses a process holding something a
//! restart could not rebuild (a pipe or socket to the outside, a TCP connection, a memfd, a
//! device), names it, and leaves the process running; `--drop FD` restores the fd as
//! /dev/null and `--external FD` has it handed in with `krg restart --inherit-fd`. Files
//! deleted while open are saved in the image and come back open and unlinked; pipes with
//! both ends in the process come back with the bytes buffered in them.

mod common;

use common::*;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test program built into the scratch directory `dir`, the reaper of its processes,
/// and its log and image paths there.
fn holdfd(dir: &Path) -> (PathBuf, Reaper, PathBuf, PathBuf) {
    let prog = build(dir, "holdfd", &[]);
    let reap = Reaper(prog.clone());
    (prog, reap, dir.join("log"), dir.join("img"))
}

/// Starts `prog LOG args...` with stdio on /dev/null, `give` (if any) as its fd 5 and no
/// other fd above 2, and returns once it counts (its state is set up).
fn start(prog: &Path, log: &Path, args: &[&str], give: Option<RawFd>) -> Child {
    let child = spawn_holdfd(prog, log, args, give);
    wait_for(log, "counters", 10, |s| counters(s).len() >= 3);
    child
}

fn spawn_holdfd(prog: &Path, log: &Path, args: &[&str], give: Option<RawFd>) -> Child {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(prog);
    // SAFETY: dup2, fcntl and close_range are async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            if let Some(g) = give {
                if libc::dup2(g, 5) != 5 || libc::fcntl(5, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::close_range(3, 4, 0);
            libc::close_range(6, u32::MAX, 0);
            Ok(())
        });
    }
    c.arg(log)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start holdfd")
}

/// The process is running, untraced and not stopped, and its counter advances.
fn assert_left_running(pid: i32, log: &Path) {
    assert!(alive(pid), "the refused process {pid} is gone");
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        field("TracerPid:"),
        "0",
        "the refused process is still traced"
    );
    assert!(
        !field("State:").starts_with('T') && !field("State:").starts_with('t'),
        "the refused process is stopped: {}",
        field("State:")
    );
    let n = counters(&read(log)).len();
    wait_for(log, "the refused process to go on counting", 10, |s| {
        counters(s).len() >= n + 10
    });
}

/// Sends `sig` to `pid` and waits for a log line starting with `prefix` after the
/// `already`-th such line.
fn ask(pid: i32, sig: i32, log: &Path, prefix: &str) -> String {
    let before = read(log).lines().filter(|l| l.starts_with(prefix)).count();
    // SAFETY: signalling the test program.
    unsafe { libc::kill(pid, sig) };
    let s = wait_for(log, prefix, 10, |s| {
        s.lines().filter(|l| l.starts_with(prefix)).count() > before
    });
    s.lines()
        .filter(|l| l.starts_with(prefix))
        .nth(before)
        .unwrap_or_default()
        .to_string()
}

/// Restarts `img` detached with `extra` arguments; `give` = (fd here, number it gets in krg).
fn restart(img: &Path, extra: &[&str], give: Option<(RawFd, RawFd)>, err: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(krg());
    if let Some((from, to)) = give {
        // SAFETY: dup2 is async-signal-safe; the duplicate is not close-on-exec.
        unsafe {
            c.pre_exec(move || {
                if libc::dup2(from, to) != to || libc::fcntl(to, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c.args(["restart", img.to_str().unwrap(), "--detach"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(err).unwrap())
        .status()
        .expect("run krg restart")
        .success()
}

/// The whole scenario for one kind of resource at fd 5: `--kill` (and `--stop` and a
/// leave-running checkpoint) refused with a message naming it, the process left running;
/// then `--drop 5 --kill` succeeds and the restarted process finds /dev/null at fd 5.
fn refused_then_dropped(args: &[&str], give: Option<RawFd>, expect: &[&str]) {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, img) = holdfd(d.path());
    let mut child = start(&prog, &log, args, give);
    let pid = child.id() as i32;
    for after in [&["--kill"][..], &["--stop"], &[]] {
        let out = checkpoint(pid, &img, after);
        let e = stderr(&out);
        assert!(!out.status.success(), "checkpoint {after:?} succeeded: {e}");
        assert_eq!(out.status.code(), Some(1), "{e}");
        for want in [
            &format!("process {pid} (holdfd)"),
            "fd 5: ",
            "--drop FD",
            "--external FD",
        ]
        .into_iter()
        .chain(expect.iter().copied())
        {
            assert!(e.contains(want), "the refusal does not say {want:?}: {e}");
        }
        assert!(
            !img.exists(),
            "a refused checkpoint wrote {}",
            img.display()
        );
        assert_left_running(pid, &log);
    }
    let out = checkpoint(pid, &img, &["--kill", "--drop", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL), "--kill kills it");
    let n = counters(&read(&log)).len();
    let err = d.path().join("restart.err");
    assert!(restart(&img, &[], None, &err), "{}", read(&err));
    let s = wait_for(&log, "counting after restart", 10, |s| {
        counters(s).len() >= n + 10
    });
    assert_consecutive(&s, n + 10);
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "one restored process: {pids:?}");
    assert_eq!(
        ask(pids[0], libc::SIGUSR1, &log, "FD5 "),
        "FD5 devnull",
        "--drop 5 must give the restarted process /dev/null at fd 5"
    );
    kill(pids[0]);
}

/// A pipe made here, the program holding its write end.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0i32; 2];
    // SAFETY: p is a 2-int array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds from pipe2, owned from here on.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

#[test]
fn pipe_to_the_outside_is_refused_then_dropped() {
    let (_rd, wr) = pipe();
    refused_then_dropped(
        &["inherited"],
        Some(wr.as_raw_fd()),
        &["pipe:[", "a pipe whose other end is outside the process"],
    );
}

#[test]
fn unix_socketpair_is_refused_then_dropped() {
    let (_mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    refused_then_dropped(
        &["inherited"],
        Some(theirs.as_raw_fd()),
        &["socket:[", "Unix stream socket, connected"],
    );
}

#[test]
fn tcp_connection_to_an_outside_listener_is_refused_then_dropped() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // Accepted on a thread and held: the connection stays established while the test runs.
    let held = std::thread::spawn(move || l.accept().map(|(s, _)| s));
    let want = format!("-> 127.0.0.1:{port} (ESTABLISHED)");
    refused_then_dropped(
        &["tcp", &port.to_string()],
        None,
        &["socket:[", "TCP 127.0.0.1:", &want],
    );
    drop(held.join());
}

#[test]
fn memfd_is_refused_then_dropped() {
    refused_then_dropped(&["memfd"], None, &["/memfd:holdfd (deleted), a memfd"]);
}

#[test]
fn device_is_refused_then_dropped() {
    // /dev/kmsg keeps a read position in the kernel log per open: reopening it is not the
    // same file. (/dev/null, /dev/urandom and the like are reopened, see below.)
    refused_then_dropped(
        &["device", "/dev/kmsg"],
        None,
        &["device /dev/kmsg (char 1:11)"],
    );
}

/// Stateless devices are restorable: the checkpoint succeeds without any option.
#[test]
fn urandom_is_reopened() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, img) = holdfd(d.path());
    let mut child = start(&prog, &log, &["device", "/dev/urandom"], None);
    let out = checkpoint(child.id() as i32, &img, &["--kill"]);
    assert!(out.status.success(), "{}", stderr(&out));
    child.wait().unwrap();
    let err = d.path().join("restart.err");
    assert!(restart(&img, &[], None, &err), "{}", read(&err));
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let link = std::fs::read_link(format!("/proc/{}/fd/5", pids[0])).unwrap();
    assert_eq!(link, Path::new("/dev/urandom"));
    kill(pids[0]);
}

/// `--external 5`: the restart is refused (and creates no process) until fd 5 is handed in;
/// with `--inherit-fd 5=7` the restarted process writes into the pipe given as krg's fd 7.
#[test]
fn external_fd_must_be_handed_in_at_restart() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, img) = holdfd(d.path());
    let (_rd, wr) = pipe();
    let mut child = start(&prog, &log, &["inherited"], Some(wr.as_raw_fd()));
    let out = checkpoint(child.id() as i32, &img, &["--kill", "--external", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    child.wait().unwrap();
    let n = counters(&read(&log)).len();

    let err = d.path().join("restart.err");
    assert!(
        !restart(&img, &[], None, &err),
        "restart without fd 5 succeeded"
    );
    let e = read(&err);
    assert!(
        e.contains("fd 5 (pipe:[")
            && e.contains("--inherit-fd 5=")
            && e.contains("no process was created"),
        "unclear refusal: {e}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        pids_of(&prog).is_empty(),
        "a refused restart left a process"
    );
    assert_eq!(
        counters(&read(&log)).len(),
        n,
        "a refused restart ran the program"
    );

    let (mut new_rd, new_wr) = {
        let (r, w) = pipe();
        (std::fs::File::from(r), w)
    };
    assert!(
        restart(
            &img,
            &["--inherit-fd", "5=7"],
            Some((new_wr.as_raw_fd(), 7)),
            &err
        ),
        "{}",
        read(&err)
    );
    drop(new_wr);
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(ask(pids[0], libc::SIGUSR2, &log, "PING"), "PING ok");
    let mut got = [0u8; 5];
    let t = Instant::now();
    new_rd.read_exact(&mut got).unwrap();
    assert_eq!(
        &got, b"ping\n",
        "fd 5 of the restarted process is the pipe handed in"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    kill(pids[0]);
}

/// The export itself refuses (not only krg's early check): nothing is written and the
/// process is released running.
#[test]
fn export_refuses_before_writing_anything() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, _) = holdfd(d.path());
    let (_rd, wr) = pipe();
    let mut child = start(&prog, &log, &["inherited"], Some(wr.as_raw_fd()));
    let pid = child.id() as i32;
    let mut w = kerfs_ghost::MemWriter::default();
    let res = kerfs_ghost::export_process(
        pid,
        &kerfs_ghost::ExportOptions {
            after: kerfs_ghost::After::Kill,
            ..Default::default()
        },
        &mut w,
    );
    match res {
        Err(kerfs_ghost::GhostError::Unrestorable {
            pid: p, problems, ..
        }) => {
            assert_eq!(p, pid);
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].fd, Some(5));
        }
        other => panic!("export of a process holding a pipe: {other:?}"),
    }
    assert!(
        w.buf.is_empty(),
        "{} bytes written by a refused export",
        w.buf.len()
    );
    assert_left_running(pid, &log);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// (pos, flags) of fd `fd` of `pid` from its fdinfo.
fn fdinfo(pid: i32, fd: i32) -> (String, String) {
    let s = read(Path::new(&format!("/proc/{pid}/fdinfo/{fd}")));
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (field("pos:"), field("flags:"))
}

/// A file deleted while open (two fds on it: read-write at the end, read-only at offset 3)
/// is checkpointed with `--kill` and comes back as one open, unlinked file with the same
/// contents, mode, offsets and flags; a write through one fd is read through the other.
#[test]
fn deleted_open_file_is_saved_and_restored() {
    use std::os::unix::fs::MetadataExt;
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, img) = holdfd(d.path());
    let path = d.path().join("scratch");
    let mut child = start(&prog, &log, &["deleted", path.to_str().unwrap()], None);
    let pid = child.id() as i32;
    assert!(!path.exists());
    let before = [fdinfo(pid, 5), fdinfo(pid, 6)];
    let mut content = "x".repeat(5000);
    content.push_str("hello\n");
    assert_eq!(read(Path::new(&format!("/proc/{pid}/fd/5"))), content);
    let out = checkpoint(pid, &img, &["--kill"]);
    assert!(out.status.success(), "{}", stderr(&out));
    child.wait().unwrap();

    let err = d.path().join("restart.err");
    assert!(restart(&img, &[], None, &err), "{}", read(&err));
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let p = pids[0];
    let fd = |n: i32| format!("/proc/{p}/fd/{n}");
    let link = std::fs::read_link(fd(5)).unwrap();
    assert!(
        link.to_string_lossy().ends_with(" (deleted)"),
        "fd 5 is not an unlinked file: {}",
        link.display()
    );
    let (m5, m6) = (
        std::fs::metadata(fd(5)).unwrap(),
        std::fs::metadata(fd(6)).unwrap(),
    );
    assert_eq!(m5.nlink(), 0, "the restored file has a name");
    assert_eq!(m5.mode() & 0o7777, 0o640, "mode");
    assert_eq!(
        (m5.dev(), m5.ino()),
        (m6.dev(), m6.ino()),
        "fds 5 and 6 are one file again"
    );
    assert_eq!(read(Path::new(&fd(5))), content, "contents");
    assert_eq!(
        [fdinfo(p, 5), fdinfo(p, 6)],
        before,
        "offsets and flags of fds 5 and 6"
    );
    assert_eq!(ask(p, libc::SIGUSR2, &log, "PING"), "PING ok");
    content.push_str("ping\n");
    assert_eq!(
        read(Path::new(&fd(6))),
        content,
        "a write through fd 5 is seen through fd 6"
    );
    assert_eq!(fdinfo(p, 6).0, "3", "fd 6 keeps its own offset");
    kill(p);
}

/// An image of format 1 (no restore method recorded per fd) is still restored, its fds taken
/// the way format 1 did: files reopened by path.
#[test]
fn format_1_images_are_still_restored() {
    use kerfs_ghost::image::{ProcessImage, HEADER_LEN, TRAILER_LEN};
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, _) = holdfd(d.path());
    let mut child = start(&prog, &log, &["device", "/dev/urandom"], None);
    let v2 = export_killed(child.id() as i32).buf;
    child.wait().unwrap();
    // Rewritten as format 1 wrote it: version 1 in the header, no restore methods.
    let meta_len = u64::from_le_bytes(v2[16..24].try_into().unwrap()) as usize;
    let mut meta: ProcessImage =
        prost::Message::decode(&v2[HEADER_LEN..HEADER_LEN + meta_len]).unwrap();
    for f in &mut meta.fds {
        f.restore = 0;
    }
    let meta_bytes = prost::Message::encode_to_vec(&meta);
    let mut v1 = v2[..HEADER_LEN].to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    v1[16..24].copy_from_slice(&(meta_bytes.len() as u64).to_le_bytes());
    v1.extend_from_slice(&meta_bytes);
    v1.extend_from_slice(&v2[HEADER_LEN + meta_len..v2.len() - TRAILER_LEN]);
    let hash = blake3::hash(&v1);
    v1.extend_from_slice(hash.as_bytes());
    v1.extend_from_slice(kerfs_ghost::image::END_MAGIC);
    let loaded = kerfs_ghost::load_image(&mut kerfs_ghost::MemReader::new(&v1)).unwrap();
    assert_eq!(loaded.format_version, 1);
    let rep = kerfs_ghost::import_image(&loaded, &kerfs_ghost::ImportOptions::default())
        .expect("a format 1 image restores");
    let link = std::fs::read_link(format!("/proc/{}/fd/5", rep.pid)).unwrap();
    assert_eq!(link, Path::new("/dev/urandom"));
    let n = counters(&read(&log)).len();
    wait_for(&log, "counting after restart", 10, |s| {
        counters(s).len() >= n + 10
    });
    kill(rep.pid);
}

/// A pipe with both ends in the process: a leave-running checkpoint does not consume its
/// buffer (the original still reads every byte), and a restart from that image refills it:
/// the restored process reads the same 30000 bytes, then what it writes itself; the read
/// end keeps O_NONBLOCK.
#[test]
fn pipe_within_the_process_keeps_its_buffered_bytes() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, img) = holdfd(d.path());
    let mut child = start(&prog, &log, &["pipe-self"], None);
    let pid = child.id() as i32;
    let before = [fdinfo(pid, 5).1, fdinfo(pid, 6).1];
    let out = checkpoint(pid, &img, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        ask(pid, libc::SIGHUP, &log, "DRAIN"),
        "DRAIN 30000 ok ",
        "the checkpoint consumed bytes of the pipe"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let err = d.path().join("restart.err");
    assert!(restart(&img, &[], None, &err), "{}", read(&err));
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let p = pids[0];
    assert_eq!(
        [fdinfo(p, 5).1, fdinfo(p, 6).1],
        before,
        "flags of both ends"
    );
    let (m5, m6) = (
        std::fs::metadata(format!("/proc/{p}/fd/5")).unwrap(),
        std::fs::metadata(format!("/proc/{p}/fd/6")).unwrap(),
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        m5.ino(),
        m6.ino(),
        "fds 5 and 6 are the two ends of one pipe"
    );
    assert_eq!(ask(p, libc::SIGUSR2, &log, "PING"), "PING ok");
    assert_eq!(ask(p, libc::SIGHUP, &log, "DRAIN"), "DRAIN 30005 ok ping|");
    kill(p);
}

/// A pipe whose both ends the process holds, but that another process holds too, is not
/// internal: the checkpoint is refused and names that process.
#[test]
fn pipe_within_the_process_also_held_elsewhere_is_refused() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, img) = holdfd(d.path());
    let mut child = start(&prog, &log, &["pipe-self"], None);
    let pid = child.id() as i32;
    // SAFETY: pidfd_open/pidfd_getfd on our own child; results checked.
    let copy = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        assert!(pidfd >= 0);
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, 6, 0);
        libc::close(pidfd as i32);
        assert!(fd >= 0);
        OwnedFd::from_raw_fd(fd as i32)
    };
    let out = checkpoint(pid, &img, &["--kill"]);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    let me = format!("but process {} (", std::process::id());
    assert!(
        e.contains("fd 5: pipe:[") && e.contains("fd 6: pipe:["),
        "{e}"
    );
    assert!(e.contains(&me) && e.contains("holds it too"), "{e}");
    assert_left_running(pid, &log);
    drop(copy);
    let out = checkpoint(pid, &img, &["--kill"]);
    assert!(out.status.success(), "{}", stderr(&out));
    child.wait().unwrap();
}

/// Refusals of what is not an fd: the checkpoint (with `--kill`) fails naming it and the
/// process is left running.
fn refused(args: &[&str], expect: &[&str]) {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, img) = holdfd(d.path());
    let mut child = start(&prog, &log, args, None);
    let pid = child.id() as i32;
    let out = checkpoint(pid, &img, &["--kill"]);
    let e = stderr(&out);
    assert!(!out.status.success(), "checkpoint succeeded: {e}");
    for want in [&format!("process {pid} (holdfd)")]
        .into_iter()
        .map(String::as_str)
        .chain(expect.iter().copied())
    {
        assert!(e.contains(want), "the refusal does not say {want:?}: {e}");
    }
    assert!(!img.exists());
    assert_left_running(pid, &log);
    // The child of the "child" case first (it is reparented, not killed, with its parent).
    let kids = read(Path::new(&format!("/proc/{pid}/task/{pid}/children")));
    for k in kids
        .split_whitespace()
        .filter_map(|k| k.parse::<i32>().ok())
    {
        // SAFETY: signalling a process this test's program forked.
        unsafe { libc::kill(k, libc::SIGKILL) };
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_process_with_a_child_is_refused() {
    refused(&["child"], &["it has child processes", "(holdfd)"]);
}

#[test]
fn a_deleted_working_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let gone = d.path().join("gone");
    let want = format!("its working directory {} (deleted)", gone.display());
    refused(&["cwd-gone", gone.to_str().unwrap()], &[&want]);
}

#[test]
fn system_v_shared_memory_is_refused() {
    refused(
        &["sysv"],
        &["/SYSV00000000 (deleted)", "System V shared memory"],
    );
}

#[test]
fn a_file_lock_is_refused_then_dropped() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("locked");
    let want = format!("{} holds file lock(s) POSIX WRITE 0-EOF", path.display());
    refused_then_dropped(&["lock", path.to_str().unwrap()], None, &[&want]);
}

#[test]
fn a_posix_timer_is_refused() {
    refused(&["timer"], &["it has 1 POSIX timer(s)"]);
}

/// A deleted file that another process also holds is refused: restored, it would be a new
/// file that process does not see.
#[test]
fn deleted_file_also_held_elsewhere_is_refused() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, img) = holdfd(d.path());
    let path = d.path().join("scratch");
    let mut child = start(&prog, &log, &["deleted", path.to_str().unwrap()], None);
    let pid = child.id() as i32;
    let held = std::fs::File::open(format!("/proc/{pid}/fd/5")).unwrap();
    let out = checkpoint(pid, &img, &["--kill"]);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    let me = format!("a deleted file, but process {} (", std::process::id());
    assert!(e.contains("fd 5: ") && e.contains(&me), "{e}");
    assert_left_running(pid, &log);
    drop(held);
    let out = checkpoint(pid, &img, &["--kill"]);
    assert!(out.status.success(), "{}", stderr(&out));
    child.wait().unwrap();
}

/// `krg migrate` refuses what the receiver could not rebuild before contacting it (the
/// process stays here, running), and `--drop FD` lets the migration go through.
#[test]
fn migrate_is_refused_then_dropped() {
    use std::io::{BufRead, BufReader};
    require_root();
    let d = tempfile::tempdir().unwrap();
    let (prog, _reap, log, _) = holdfd(d.path());
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
    let (_rd, wr) = pipe();
    let mut child = start(&prog, &log, &["inherited"], Some(wr.as_raw_fd()));
    let pid = child.id() as i32;
    let migrate = |extra: &[&str]| {
        Command::new(krg())
            .args(["migrate", &pid.to_string(), &addr])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = migrate(&[]);
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("fd 5: pipe:[") && e.contains("--drop FD"), "{e}");
    assert_left_running(pid, &log);
    assert_eq!(pids_of(&prog), vec![pid], "nothing arrived at the receiver");
    let out = migrate(&["--drop", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    child.wait().unwrap();
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(ask(pids[0], libc::SIGUSR1, &log, "FD5 "), "FD5 devnull");
    kill(pids[0]);
    listen.kill().unwrap();
    listen.wait().unwrap();
}
