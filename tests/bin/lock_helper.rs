//! The lock-holding process of tests/mount_locks.rs: POSIX locks belong to processes, so the
//! tests drive separate processes that open files on the mounts and lock them, one command per
//! line on stdin, one answer per line on stdout ("ok", "err ERRNO", "fd N", a lock...).

use std::ffi::CString;
use std::io::{BufRead, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

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

/// One command; returns the answer line, or None for a command not understood.
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

/// Reads commands from stdin and answers each with one line.
fn main() {
    let out = |s: &str| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
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
