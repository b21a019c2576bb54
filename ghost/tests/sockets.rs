//! Sockets across `krg checkpoint --kill` and `krg restart` (tests/c/sockets.c): TCP
//! listeners on 127.0.0.1 and [::1], a bound UDP socket, Unix listeners on a path and on an
//! abstract name come back at their addresses with their options, accepting connections the
//! test makes after the restart; seqpacket, stream and datagram socketpairs come back with the
//! messages queued in each direction. A TCP connection, a Unix connection to another process
//! and a listener with a connection waiting refuse the checkpoint, the process left running
//! and its connections working.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A port free on both 127.0.0.1 and [::1] for TCP and UDP, as far as one can tell.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let free = std::net::TcpListener::bind(("::1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
}

/// The listen backlog of TCP listener `fd` of `pid`, from TCP_INFO (tcpi_sacked) on a copy of
/// the fd (/proc/net/tcp does not show it).
fn backlog(pid: i32, fd: i32) -> u32 {
    // SAFETY: pidfd_open/pidfd_getfd/getsockopt with valid arguments; fds closed below.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        assert!(
            copy >= 0,
            "pidfd_getfd: {}",
            std::io::Error::last_os_error()
        );
        let mut info = [0u8; 104];
        let mut len = info.len() as libc::socklen_t;
        let r = libc::getsockopt(
            copy,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        );
        libc::close(copy);
        libc::close(pidfd);
        assert_eq!(r, 0, "TCP_INFO");
        assert_eq!(info[0], 10, "fd {fd} is not listening");
        u32::from_ne_bytes([info[28], info[29], info[30], info[31]])
    }
}

fn restart(img: &Path, err: &Path) {
    let ok = Command::new(krg())
        .args(["restart", img.to_str().unwrap(), "--detach"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(err).unwrap())
        .status()
        .expect("run krg restart")
        .success();
    assert!(ok, "restart: {}", read(err));
}

/// Connects to each listener of the restored process and sends "hi" to each.
fn talk_to(port: u16, path: &Path, name: &str) {
    let hi = |s: &mut dyn Write| s.write_all(b"hi").unwrap();
    let mut t4 = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect tcp4");
    hi(&mut t4);
    let mut t6 = std::net::TcpStream::connect(("::1", port)).expect("connect tcp6");
    hi(&mut t6);
    let mut up = UnixStream::connect(path).expect("connect unix path");
    hi(&mut up);
    // An abstract seqpacket socket: std has neither, so through libc.
    // SAFETY: plain socket/connect/send with a valid sockaddr_un.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
        assert!(s >= 0);
        let mut a: libc::sockaddr_un = std::mem::zeroed();
        a.sun_family = libc::AF_UNIX as u16;
        for (i, b) in name.bytes().enumerate() {
            a.sun_path[1 + i] = b as libc::c_char;
        }
        let len = (2 + 1 + name.len()) as libc::socklen_t;
        assert_eq!(
            libc::connect(s, &a as *const _ as *const libc::sockaddr, len),
            0,
            "connect abstract: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(
            libc::send(s, b"hi".as_ptr() as *const libc::c_void, 2, 0),
            2
        );
    }
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.send_to(b"hi", ("127.0.0.1", port)).unwrap();
    // Kept open until the process has read them.
    std::thread::sleep(Duration::from_millis(300));
    let _ = (t4, t6, up);
}

/// The sockets program in `serve` mode, set up and listening.
struct Served {
    prog: std::path::PathBuf,
    _reap: Reaper,
    child: std::process::Child,
    log: std::path::PathBuf,
    path: std::path::PathBuf,
    port: u16,
    /// Its abstract Unix socket name: `tag` and this test process's pid.
    name: String,
}

/// Builds the sockets program in `d` and starts it serving; returns once it is READY.
fn serve(d: &Path, tag: &str) -> Served {
    let prog = build(d, "sockets", &[]);
    let _reap = Reaper(prog.clone());
    let (log, path) = (d.join("log"), d.join("srv.sock"));
    let port = free_port();
    let name = format!("{tag}{}", std::process::id());
    let child = spawn(
        &prog,
        &[
            log.to_str().unwrap(),
            "serve",
            &port.to_string(),
            path.to_str().unwrap(),
            &name,
        ],
    );
    let s = wait_for(&log, "READY", 10, |s| {
        s.contains("READY") || s.contains("SETUP")
    });
    assert!(s.contains("READY"), "{s}");
    Served {
        prog,
        _reap,
        child,
        log,
        path,
        port,
        name,
    }
}

#[test]
fn listeners_and_socketpairs_come_back_with_their_addresses_and_queues() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let Served {
        prog,
        _reap,
        mut child,
        log,
        path,
        port,
        name,
    } = serve(d.path(), "krg-test-");
    let img = d.path().join("img");
    let out = checkpoint(child.id() as i32, &img, &["--kill"]);
    assert!(out.status.success(), "checkpoint: {}", stderr(&out));
    child.wait().unwrap();
    assert!(
        std::fs::symlink_metadata(&path).is_ok(),
        "the dead process's socket file is left for the restart to replace"
    );
    restart(&img, &d.path().join("restart.err"));
    let pids = pids_of(&prog);
    assert_eq!(pids.len(), 1, "one restored process: {pids:?}");
    assert_eq!(backlog(pids[0], 3), 7, "backlog of the tcp4 listener");
    assert_eq!(backlog(pids[0], 4), 3, "backlog of the tcp6 listener");
    // SAFETY: signalling the test program.
    unsafe { libc::kill(pids[0], libc::SIGUSR1) };
    wait_for(&log, "ACCEPTING", 20, |s| {
        s.contains("ACCEPTING") || s.contains("VERDICT")
    });
    talk_to(port, &path, &name);
    let s = wait_for(&log, "the verdict", 30, |s| s.contains("VERDICT"));
    let bad: Vec<&str> = s.lines().filter(|l| l.starts_with("BAD")).collect();
    assert!(
        bad.is_empty() && s.contains("VERDICT ok"),
        "the restored process found its sockets changed:\n{}",
        bad.join("\n")
    );
    let oks = s.lines().filter(|l| l.starts_with("OK ")).count();
    assert!(oks >= 34, "not every check ran ({oks}):\n{s}");
    // The process closed the connections it accepted first, which left its port in
    // TIME_WAIT: a restart now cannot bind the tcp4 listener, which has no SO_REUSEADDR
    // (nor could the program itself); it is refused before any process is created, saying
    // why and when to retry.
    let tw = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let hex_port = format!(":{port:04X} ");
    assert!(
        tw.lines()
            .any(|l| l.contains(&hex_port) && l.split_whitespace().nth(3) == Some("06")),
        "no TIME_WAIT connection on port {port}: the second restart would test nothing"
    );
    let out = checkpoint(pids[0], &img, &["--kill"]);
    assert!(out.status.success(), "second checkpoint: {}", stderr(&out));
    for _ in 0..100 {
        if !alive(pids[0]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = d.path().join("restart2.err");
    let ok = Command::new(krg())
        .args(["restart", img.to_str().unwrap(), "--detach"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap()
        .success();
    let e = read(&err);
    assert!(!ok, "bound beside TIME_WAIT without SO_REUSEADDR: {e}");
    for want in [
        "no process was created",
        "fd 3 (socket:[",
        &format!("binding 127.0.0.1:{port}"),
        "TIME_WAIT",
        "retry within a minute",
    ] {
        assert!(
            e.contains(want),
            "the restart refusal does not say {want:?}: {e}"
        );
    }
    assert!(
        pids_of(&prog).is_empty(),
        "a refused restart left a process"
    );
}

#[test]
fn a_checkpoint_leaving_the_process_running_takes_nothing_and_a_restart_beside_it_is_refused() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let Served {
        prog,
        _reap,
        child: _child,
        log,
        path,
        port,
        name,
    } = serve(d.path(), "krg-test-run-");
    let pid = _child.id() as i32;
    let img = d.path().join("img");
    let out = checkpoint(pid, &img, &[]);
    assert!(out.status.success(), "checkpoint: {}", stderr(&out));
    // The original still listens everywhere: the restart must refuse before creating a
    // process, and must not remove the original's socket file.
    let err = d.path().join("restart.err");
    let ok = Command::new(krg())
        .args(["restart", img.to_str().unwrap(), "--detach"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .expect("run krg restart")
        .success();
    let e = read(&err);
    assert!(!ok, "a restart beside the running original succeeded");
    for want in [
        "no process was created",
        &format!("binding 127.0.0.1:{port}"),
        "in use by another process",
        &format!("[::1]:{port} has a listener already (SO_REUSEPORT"),
    ] {
        assert!(
            e.contains(want),
            "the restart refusal does not say {want:?}: {e}"
        );
    }
    assert_eq!(pids_of(&prog), vec![pid], "only the original runs");
    // SAFETY: signalling the test program.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    wait_for(&log, "ACCEPTING", 20, |s| {
        s.contains("ACCEPTING") || s.contains("VERDICT")
    });
    talk_to(port, &path, &name);
    let s = wait_for(&log, "the verdict", 30, |s| s.contains("VERDICT"));
    let bad: Vec<&str> = s.lines().filter(|l| l.starts_with("BAD")).collect();
    assert!(
        bad.is_empty() && s.contains("VERDICT ok"),
        "the checkpointed process found its sockets changed:\n{}",
        bad.join("\n")
    );
}

#[test]
fn outside_connections_and_pending_ones_refuse_the_checkpoint_and_the_process_runs_on() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let prog = build(d.path(), "sockets", &[]);
    let _reap = Reaper(prog.clone());
    let log = d.path().join("log");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let upath = d.path().join("peer.sock");
    let unix = UnixListener::bind(&upath).unwrap();
    let lport = free_port();
    let child = spawn(
        &prog,
        &[
            log.to_str().unwrap(),
            "refuse",
            &port.to_string(),
            upath.to_str().unwrap(),
            &lport.to_string(),
        ],
    );
    let _child = child;
    let pid = _child.id() as i32;
    let (mut tc, _) = tcp.accept().unwrap();
    let (mut uc, _) = unix.accept().unwrap();
    let s = wait_for(&log, "READY", 10, |s| {
        s.contains("READY") || s.contains("SETUP")
    });
    assert!(s.contains("READY"), "{s}");
    // A connection the process never accepts.
    let _pending = std::net::TcpStream::connect(("127.0.0.1", lport)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let img = d.path().join("img");
    // fd 6 dropped: its other end, fd 7, would be connected to nothing.
    let out = checkpoint(pid, &img, &["--kill", "--drop", "6"]);
    let e = stderr(&out);
    assert!(!out.status.success(), "checkpoint succeeded: {e}");
    for want in [
        &format!("process {pid}"),
        "fd 7: socket:[",
        "whose other end",
        "is to be dropped or handed in",
        "fd 3: socket:[",
        "TCP 127.0.0.1:",
        &format!("-> 127.0.0.1:{port} (ESTABLISHED)"),
        "a restart cannot re-establish it",
        "fd 4: socket:[",
        "held by process",
        "fd 5: socket:[",
        &format!("TCP listening on 127.0.0.1:{lport}"),
        "1 connection(s) wait to be accepted",
        "--drop FD",
        "--external FD",
        "left running",
    ] {
        assert!(e.contains(want), "the refusal does not say {want:?}: {e}");
    }
    assert!(!img.exists(), "a refused checkpoint wrote an image");
    assert!(alive(pid), "the refused process is gone");
    // Unharmed: both connections still carry data.
    // SAFETY: signalling the test program.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let s = wait_for(&log, "PING", 10, |s| s.contains("QUEUES"));
    assert!(s.contains("PING ok"), "{s}");
    assert!(
        s.contains("QUEUES ok"),
        "the refused checkpoint took from the socketpair's queues:\n{s}"
    );
    let mut b = [0u8; 5];
    tc.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tc.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping\n");
    uc.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    uc.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping\n");
}
