//! `as-user UID GID GROUPS OP ARGS...`: takes on a user's identity (real, effective and
//! saved uid and gid, supplementary GROUPS as `a,b` or `-` for none, umask 0), makes one
//! filesystem call and prints one line saying how it went: `ok`, `ok RESULT` or
//! `err ERRNO-NAME`. The permission tests of tests/mount_perms.rs run it on a KerFS mount
//! and on local ext4, and compare the lines, so results hold no inode numbers or times.
//!
//! OPs: `read P` (prints the bytes), `write P DATA`, `open P MODE` (MODE: r, w, rw, rn, wn
//! for O_NONBLOCK opens of FIFOs, rwt for O_TRUNC), `create P OCTAL`, `mkdir P OCTAL`,
//! `mkfifo P OCTAL`, `stat P` (type, mode, uid, gid, size of regular files), `chmod P OCTAL`,
//! `chown P UID GID` (-1 keeps), `truncate P SIZE`, `link FROM TO`, `symlink TARGET P`,
//! `unlink P`, `rmdir P`, `rename FROM TO`, `list P` (sorted names), `access P MASK`
//! (r/w/x letters), `utime P` (now), `hold P DATA OCTAL` (see [`hold`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EXDEV => "EXDEV",
        libc::ENXIO => "ENXIO",
        libc::EBUSY => "EBUSY",
        libc::ELOOP => "ELOOP",
        libc::EROFS => "EROFS",
        libc::EBADF => "EBADF",
        libc::EIO => "EIO",
        libc::ETIMEDOUT => "ETIMEDOUT",
        _ => return format!("E{e}"),
    };
    name.to_string()
}

fn c_path(p: &str) -> Result<CString, String> {
    CString::new(std::path::Path::new(p).as_os_str().as_bytes())
        .map_err(|_| format!("bad path {p:?}"))
}

fn octal(s: &str) -> Result<libc::mode_t, String> {
    libc::mode_t::from_str_radix(s, 8).map_err(|_| format!("bad mode {s:?}"))
}

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number {s:?}"))
}

/// `ok` for a call that returned 0 or more, `err NAME` for -1.
fn outcome(r: libc::c_int) -> String {
    if r < 0 {
        format!("err {}", errno_name(errno()))
    } else {
        "ok".into()
    }
}

/// Opens `p` with `flags`, runs `then` on the descriptor, closes it.
fn with_open(p: &str, flags: libc::c_int, then: impl FnOnce(libc::c_int) -> String) -> String {
    let Ok(c) = c_path(p) else {
        return format!("bad path {p:?}");
    };
    // SAFETY: a valid C string; the mode is used only with O_CREAT.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return format!("err {}", errno_name(errno()));
    }
    let out = then(fd);
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    out
}

fn read_all(fd: libc::c_int) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return format!("err {}", errno_name(errno()));
        }
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n as usize]);
    }
    format!("ok {}", String::from_utf8_lossy(&data))
}

fn stat_line(p: &str) -> Result<String, String> {
    let c = c_path(p)?;
    // SAFETY: st is written by lstat before being read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::lstat(c.as_ptr(), &mut st) } < 0 {
        return Ok(format!("err {}", errno_name(errno())));
    }
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => "dir",
        libc::S_IFREG => "file",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        _ => "other",
    };
    // Directory sizes differ between filesystems (ext4 counts blocks): files only.
    let size = if kind == "file" { st.st_size } else { 0 };
    Ok(format!(
        "ok {kind} {:o} {}:{} {size}",
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid
    ))
}

fn run(op: &str, args: &[String]) -> Result<String, String> {
    let a = |i: usize| -> Result<&str, String> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("{op}: missing argument {}", i + 1))
    };
    // SAFETY (every libc call below): valid C strings and plain integer arguments.
    Ok(match op {
        "read" => with_open(a(0)?, libc::O_RDONLY, read_all),
        "write" => {
            let data = a(1)?.as_bytes().to_vec();
            with_open(a(0)?, libc::O_WRONLY, move |fd| {
                let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
                outcome(n as libc::c_int)
            })
        }
        "open" => {
            let flags = match a(1)? {
                "r" => libc::O_RDONLY,
                "w" => libc::O_WRONLY,
                "rw" => libc::O_RDWR,
                "rn" => libc::O_RDONLY | libc::O_NONBLOCK,
                "wn" => libc::O_WRONLY | libc::O_NONBLOCK,
                "rwt" => libc::O_RDWR | libc::O_TRUNC,
                m => return Err(format!("open: bad mode {m:?}")),
            };
            with_open(a(0)?, flags, |_| "ok".into())
        }
        "create" => {
            let c = c_path(a(0)?)?;
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                    octal(a(1)?)?,
                )
            };
            if fd >= 0 {
                unsafe { libc::close(fd) };
            }
            outcome(fd)
        }
        "mkdir" => outcome(unsafe { libc::mkdir(c_path(a(0)?)?.as_ptr(), octal(a(1)?)?) }),
        "mkfifo" => outcome(unsafe { libc::mkfifo(c_path(a(0)?)?.as_ptr(), octal(a(1)?)?) }),
        "stat" => stat_line(a(0)?)?,
        "chmod" => outcome(unsafe { libc::chmod(c_path(a(0)?)?.as_ptr(), octal(a(1)?)?) }),
        "hold" => hold(a(0)?, a(1)?, octal(a(2)?)?)?,
        "chown" => {
            let id = |s: &str| -> Result<u32, String> {
                if s == "-1" {
                    Ok(u32::MAX)
                } else {
                    number(s)
                }
            };
            outcome(unsafe { libc::lchown(c_path(a(0)?)?.as_ptr(), id(a(1)?)?, id(a(2)?)?) })
        }
        "truncate" => outcome(unsafe { libc::truncate(c_path(a(0)?)?.as_ptr(), number(a(1)?)?) }),
        "link" => outcome(unsafe { libc::link(c_path(a(0)?)?.as_ptr(), c_path(a(1)?)?.as_ptr()) }),
        "symlink" => {
            outcome(unsafe { libc::symlink(c_path(a(0)?)?.as_ptr(), c_path(a(1)?)?.as_ptr()) })
        }
        "unlink" => outcome(unsafe { libc::unlink(c_path(a(0)?)?.as_ptr()) }),
        "rmdir" => outcome(unsafe { libc::rmdir(c_path(a(0)?)?.as_ptr()) }),
        "rename" => {
            outcome(unsafe { libc::rename(c_path(a(0)?)?.as_ptr(), c_path(a(1)?)?.as_ptr()) })
        }
        "list" => match std::fs::read_dir(a(0)?) {
            Ok(entries) => {
                let mut names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                format!("ok {}", names.join(" "))
            }
            Err(e) => format!("err {}", errno_name(e.raw_os_error().unwrap_or(0))),
        },
        "access" => {
            let mut mask = 0;
            for ch in a(1)?.chars() {
                mask |= match ch {
                    'r' => libc::R_OK,
                    'w' => libc::W_OK,
                    'x' => libc::X_OK,
                    _ => return Err(format!("access: bad mask {:?}", a(1)?)),
                };
            }
            outcome(unsafe { libc::access(c_path(a(0)?)?.as_ptr(), mask) })
        }
        "utime" => outcome(unsafe {
            libc::utimensat(libc::AT_FDCWD, c_path(a(0)?)?.as_ptr(), std::ptr::null(), 0)
        }),
        _ => return Err(format!("unknown operation {op:?}")),
    })
}

/// `hold P DATA OCTAL`: creates P (0600), writes DATA and fchmods it to OCTAL the way tar
/// does, prints `ready`, and keeps it open until stdin ends; the result line is the close's.
/// Other processes' calls meanwhile see a file held open by a process that is not their
/// parent (a child would close its inherited copy, which flushes the file).
fn hold(p: &str, data: &str, mode: libc::mode_t) -> Result<String, String> {
    use std::io::{Read, Write};
    let c = c_path(p)?;
    // SAFETY: valid path; plain integer flags.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Ok(outcome(fd));
    }
    // SAFETY: fd is ours; the buffer is valid for its length.
    let wrote = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if wrote < 0 {
        return Ok(outcome(-1));
    }
    // SAFETY: fd is ours.
    if unsafe { libc::fchmod(fd, mode) } < 0 {
        return Ok(outcome(-1));
    }
    println!("ready");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    // SAFETY: fd is ours, closed once.
    Ok(outcome(unsafe { libc::close(fd) }))
}

/// Becomes `uid`/`gid` with `groups`, for good (real, effective and saved ids).
fn become_user(uid: u32, gid: u32, groups: &[libc::gid_t]) -> Result<(), String> {
    // SAFETY: plain syscalls on this single-threaded process; groups is valid for its length.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(format!("setgroups: errno {}", errno()));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(format!("setresgid({gid}): errno {}", errno()));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(format!("setresuid({uid}): errno {}", errno()));
        }
        libc::umask(0);
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = (|| -> Result<String, String> {
        let [uid, gid, groups, op, rest @ ..] = args.as_slice() else {
            return Err("usage: as-user UID GID GROUPS|- OP ARGS...".into());
        };
        let groups: Vec<libc::gid_t> = if groups == "-" {
            Vec::new()
        } else {
            groups.split(',').map(number).collect::<Result<_, _>>()?
        };
        become_user(number(uid)?, number(gid)?, &groups)?;
        run(op, rest)
    })();
    match result {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("as-user: {e}");
            std::process::exit(2);
        }
    }
}
