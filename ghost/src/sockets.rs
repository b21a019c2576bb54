//! Sockets: what a checkpoint records of a socket fd, and how a restart makes it again.
//!
//! Checkpoint side ([`inspect`], [`peek_queue`]): the socket is looked at through a copy of
//! the process's fd (pidfd_getfd, same socket), so that getsockname, getsockopt, TCP_INFO
//! and MSG_PEEK run in krg, not injected into the process. Unix sockets are also looked up
//! with sock_diag (NETLINK_SOCK_DIAG, unix_diag) for what no getsockopt tells: the peer's
//! inode, a listener's backlog and pending connections, the inode of the bound file.
//!
//! What is restored ([`SocketState`] in the image):
//! * TCP, UDP (IPv4/IPv6) and Unix sockets that are unbound, bound or listening, with their
//!   address, SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY, listen backlog and (UDP) the address
//!   they are connected to ([`FdRestore::Socket`]); a Unix path is bound again after
//!   removing the stale socket file the dead process left (only a socket nobody listens on).
//! * Unix socketpairs (stream, datagram, seqpacket) whose both ends the process holds, with
//!   the bytes queued in each direction, message boundaries kept ([`FdRestore::SocketPair`]).
//!
//! Refused (the reason is returned, export turns it into a [`crate::Problem`]): connections
//! to peers outside the process (TCP, a Unix peer in another process), pending connections on
//! a listener, data queued on a UDP or unconnected datagram socket (its senders cannot be
//! recreated), a shut-down socket, fds in flight (SCM_RIGHTS), other families.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::image::{FdRestore, SocketState};

/// Largest datagram peeked; a bigger one (MSG_TRUNC) refuses the socket.
const PEEK_MAX: usize = 1 << 20;
/// Bytes queued in one socket beyond which the checkpoint is refused (they are held in
/// memory while the process is frozen).
const QUEUE_MAX: u64 = 64 << 20;
const TCP_LISTEN: u8 = 10;
const TCP_CLOSE: u8 = 7;
const SO_MEMINFO: libc::c_int = 55;

/// How fd `fd` (socket inode `ino`) of `pid` is restored, with its state, or why it cannot
/// be. `own` lists the socket inodes the process holds (a Unix peer among them is a
/// socketpair to rebuild). `frozen`: the process is stopped, so queues may be peeked
/// (SO_PEEK_OFF is moved for that, which a running process could notice).
pub(crate) fn inspect(
    pid: i32,
    fd: i32,
    ino: u64,
    own: &[u64],
    frozen: bool,
) -> Result<(FdRestore, SocketState), String> {
    let pidfd = crate::sys::pidfd_open(pid).map_err(|e| e.to_string())?;
    let s = crate::sys::pidfd_getfd(&pidfd, fd).map_err(|e| format!("pidfd_getfd: {e}"))?;
    let raw = s.as_raw_fd();
    let family = opt_int(raw, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let sotype = opt_int(raw, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let protocol = opt_int(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let mut st = SocketState {
        inode: ino,
        family,
        sotype,
        protocol,
        bound: sockname(raw, false).unwrap_or_default(),
        ..Default::default()
    };
    match family {
        libc::AF_INET | libc::AF_INET6 => inspect_inet(raw, st),
        libc::AF_UNIX => inspect_unix(pid, raw, &mut st, own, frozen).map(|r| (r, st)),
        f => Err(format!(
            "a socket of address family {f}: only TCP, UDP and Unix sockets are restored"
        )),
    }
}

fn inspect_inet(raw: RawFd, mut st: SocketState) -> Result<(FdRestore, SocketState), String> {
    st.reuseaddr = opt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR)? != 0;
    st.reuseport = opt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT)? != 0;
    if st.family == libc::AF_INET6 {
        st.v6only = opt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0;
    }
    if !inet_bound(&st.bound) {
        st.bound.clear();
    }
    match (st.sotype, st.protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => {
            // tcp_info: state at 0; a listener's pending connections (unacked) and
            // backlog (sacked) at 24 and 28.
            let mut info = [0u8; 104];
            let mut len = info.len() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into info.
            let r = unsafe {
                libc::getsockopt(
                    raw,
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    info.as_mut_ptr() as *mut libc::c_void,
                    &mut len,
                )
            };
            if r != 0 || len < 32 {
                return Err(format!("TCP_INFO: {}", io::Error::last_os_error()));
            }
            let word =
                |o: usize| u32::from_ne_bytes([info[o], info[o + 1], info[o + 2], info[o + 3]]);
            match info[0] {
                TCP_LISTEN => {
                    let pending = word(24);
                    if pending > 0 {
                        return Err(format!(
                            "{pending} connection(s) wait to be accepted: they are connections to peers outside the process, which a restart cannot bring back (checkpoint it once they are accepted, or close them)"
                        ));
                    }
                    st.listen_backlog = Some(word(28) as i32);
                }
                TCP_CLOSE => {}
                _ => {
                    return Err(
                        "a TCP connection to a peer outside the process: a restart cannot re-establish it with its peer (close it before the checkpoint)".into(),
                    )
                }
            }
        }
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => {
            let queued = rmem_alloc(raw)?;
            if queued > 0 {
                return Err(format!(
                    "{queued} bytes of datagrams are queued unread: their senders' addresses cannot be given back to them by a restart (checkpoint it once it has read them)"
                ));
            }
            st.connected_to = sockname(raw, true).unwrap_or_default();
        }
        (t, p) => {
            return Err(format!(
            "an internet socket of type {t}, protocol {p}: only TCP and UDP sockets are restored"
        ))
        }
    }
    Ok((FdRestore::Socket, st))
}

fn inspect_unix(
    pid: i32,
    raw: RawFd,
    st: &mut SocketState,
    own: &[u64],
    frozen: bool,
) -> Result<FdRestore, String> {
    if !matches!(
        st.sotype,
        libc::SOCK_STREAM | libc::SOCK_DGRAM | libc::SOCK_SEQPACKET
    ) {
        return Err(format!("a Unix socket of type {}", st.sotype));
    }
    let d = unix_diag(st.inode).map_err(|e| format!("sock_diag: {e}"))?;
    if d.shutdown != 0 {
        return Err("it was shut down (shutdown(2)), which is not restored yet".into());
    }
    let path = unix_path(&st.bound);
    if path.is_none() && !unix_abstract(&st.bound) {
        // Unnamed: binding the bare family would autobind it at restart.
        st.bound.clear();
    }
    if let Some(p) = &path {
        if !p.starts_with('/') {
            return Err(format!(
                "bound to the relative path {p}, which a restart from another directory could not bind again (bind to an absolute path)"
            ));
        }
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        // The socket file must still be the one it is bound to: recreating a removed one
        // would make the socket reachable again.
        let md = std::fs::symlink_metadata(p).ok();
        if !md
            .as_ref()
            .is_some_and(|m| m.file_type().is_socket() && Some(m.ino() as u32) == d.vfs_ino)
        {
            return Err(format!(
                "bound to {p}, but that socket file was removed or replaced since: a restart would bind a socket reachable again"
            ));
        }
        st.path_mode = md.map_or(0, |m| m.mode() & 0o7777);
    }
    if d.listening {
        if d.rqueue > 0 {
            return Err(format!(
                "{} connection(s) wait to be accepted: their peers are outside the process and cannot be brought back (checkpoint it once they are accepted)",
                d.rqueue
            ));
        }
        st.listen_backlog = Some(d.wqueue as i32);
        return Ok(FdRestore::Socket);
    }
    let Some(peer) = d.peer.filter(|&p| p != 0) else {
        if rmem_alloc(raw)? > 0 {
            return Err(
                "datagrams from other sockets are queued unread: their senders cannot be recreated by a restart (checkpoint it once it has read them)".into(),
            );
        }
        if st.sotype != libc::SOCK_DGRAM && d.state != TCP_CLOSE {
            return Err(format!("a Unix socket in state {}", d.state));
        }
        return Ok(FdRestore::Socket);
    };
    if !own.contains(&peer) {
        let holder = crate::restorable::holder_of_socket(pid, peer);
        return Err(match holder {
            Some(h) => format!(
                "connected to socket:[{peer}], held by {h}: a restart cannot reconnect it to another process (checkpoint that process's connection away, or close it)"
            ),
            None => format!(
                "connected to socket:[{peer}], which no process holds any more (its peer closed): not restored (close it before the checkpoint)"
            ),
        });
    }
    let back = unix_diag(peer).map_err(|e| format!("sock_diag of its peer: {e}"))?;
    if back.peer != Some(st.inode) {
        return Err(format!(
            "a datagram socket connected one way to socket:[{peer}] of the process: only socketpairs (each end connected to the other) are restored"
        ));
    }
    if path.is_some() || unix_abstract(&st.bound) {
        return Err(
            "a connection to a named Unix socket of the process (accepted from its own listener): only unnamed socketpairs are restored".into(),
        );
    }
    let back_named = back.name_len > 0;
    if back_named {
        return Err(format!(
            "connected to socket:[{peer}] of the process, which has a name: only unnamed socketpairs are restored"
        ));
    }
    st.peer_inode = peer;
    st.bound.clear();
    if frozen {
        let peek_off = opt_int(raw, libc::SOL_SOCKET, libc::SO_PEEK_OFF)?;
        if peek_off >= 0 {
            return Err(format!(
                "it uses SO_PEEK_OFF ({peek_off}), which is not restored yet"
            ));
        }
        let messages = peek_all(raw, st.sotype)?;
        st.messages = messages.iter().map(|m| m.len() as u32).collect();
        let total: u64 = messages.iter().map(|m| m.len() as u64).sum();
        if total > QUEUE_MAX {
            return Err(format!(
                "{total} bytes are queued in it, more than the {} MiB a checkpoint saves",
                QUEUE_MAX >> 20
            ));
        }
        st.queued = total;
    }
    Ok(FdRestore::SocketPair)
}

/// The bytes queued in the receive queue of socketpair end `fd` of `pid` (the process is
/// frozen), checked against the message lengths `st` recorded in the survey.
pub(crate) fn peek_queue(pidfd: &OwnedFd, fd: i32, st: &SocketState) -> Result<Vec<u8>, String> {
    let s = crate::sys::pidfd_getfd(pidfd, fd).map_err(|e| format!("pidfd_getfd: {e}"))?;
    let messages = peek_all(s.as_raw_fd(), st.sotype)?;
    let lens: Vec<u32> = messages.iter().map(|m| m.len() as u32).collect();
    if lens != st.messages {
        return Err(format!(
            "its queue changed while the process was frozen ({} then {} messages): another process holds it",
            st.messages.len(),
            lens.len()
        ));
    }
    Ok(messages.concat())
}

/// Every message queued in the receive queue of `raw`, without consuming any: a stream is
/// peeked whole (one piece); datagrams and seqpackets one by one with SO_PEEK_OFF moving
/// past each (set to 0 for that, put back to -1 afterwards).
fn peek_all(raw: RawFd, sotype: i32) -> Result<Vec<Vec<u8>>, String> {
    if sotype == libc::SOCK_STREAM {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCINQ writes one int.
        if unsafe { libc::ioctl(raw, libc::FIONREAD, &mut n) } != 0 {
            return Err(format!("SIOCINQ: {}", io::Error::last_os_error()));
        }
        if n <= 0 {
            return Ok(Vec::new());
        }
        let m = peek_one(raw, n as usize)?;
        if m.len() != n as usize {
            return Err(format!(
                "only {} of the {n} queued bytes could be read without consuming them",
                m.len()
            ));
        }
        return Ok(vec![m]);
    }
    set_peek_off(raw, 0)?;
    let mut out = Vec::new();
    let res = (|| loop {
        match peek_one(raw, PEEK_MAX) {
            Ok(m) => out.push(m),
            Err(e) if e.is_empty() => return Ok(()),
            Err(e) => return Err(e),
        }
        if out.len() > 1 << 16 {
            return Err("more than 65536 messages are queued".to_string());
        }
    })();
    let back = set_peek_off(raw, -1);
    res.and(back)?;
    Ok(out)
}

/// One MSG_PEEK of up to `max` bytes. Err("") when nothing is queued.
fn peek_one(raw: RawFd, max: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; max];
    let mut cbuf = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: recvmsg into our buffers.
    let n = unsafe { libc::recvmsg(raw, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Err(String::new());
        }
        return Err(format!("recvmsg(MSG_PEEK): {e}"));
    }
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    let mut fds_in_flight = false;
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                fds_in_flight = true;
                // The peek gave us copies of the fds in flight: close them.
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..n {
                    libc::close(*data.add(i));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if fds_in_flight || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(
            "fds are in flight in its queue (SCM_RIGHTS), which are not restored yet".into(),
        );
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(format!("a message of more than {max} bytes is queued"));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn set_peek_off(raw: RawFd, v: libc::c_int) -> Result<(), String> {
    // SAFETY: setsockopt with an int.
    let r = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            &v as *const libc::c_int as *const libc::c_void,
            4,
        )
    };
    if r != 0 {
        return Err(format!("SO_PEEK_OFF {v}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn opt_int(raw: RawFd, level: libc::c_int, name: libc::c_int) -> Result<i32, String> {
    let mut v: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: getsockopt writes one int.
    let r = unsafe {
        libc::getsockopt(
            raw,
            level,
            name,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!(
            "getsockopt({level}, {name}): {}",
            io::Error::last_os_error()
        ));
    }
    Ok(v)
}

/// Bytes allocated to the receive queue (SO_MEMINFO, SK_MEMINFO_RMEM_ALLOC).
fn rmem_alloc(raw: RawFd) -> Result<u32, String> {
    let mut m = [0u32; 9];
    let mut len = std::mem::size_of_val(&m) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            m.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!("SO_MEMINFO: {}", io::Error::last_os_error()));
    }
    Ok(m[0])
}

/// getsockname (or getpeername) as raw sockaddr bytes; None if it fails (not connected).
fn sockname(raw: RawFd, peer: bool) -> Option<Vec<u8>> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of_val(&ss) as libc::socklen_t;
    let p = &mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr;
    // SAFETY: the kernel writes at most `len` bytes.
    let r = unsafe {
        if peer {
            libc::getpeername(raw, p, &mut len)
        } else {
            libc::getsockname(raw, p, &mut len)
        }
    };
    if r != 0 {
        return None;
    }
    let len = (len as usize).min(std::mem::size_of_val(&ss));
    // SAFETY: reading the `len` bytes written.
    Some(unsafe { std::slice::from_raw_parts(p as *const u8, len) }.to_vec())
}

/// Whether an inet sockaddr names a port (bound).
fn inet_bound(addr: &[u8]) -> bool {
    addr.len() >= 4 && u16::from_be_bytes([addr[2], addr[3]]) != 0
}

/// The path of a Unix sockaddr bound to a path name.
pub(crate) fn unix_path(addr: &[u8]) -> Option<String> {
    let name = addr.get(2..)?;
    if name.is_empty() || name[0] == 0 {
        return None;
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Whether a Unix sockaddr is an abstract name.
fn unix_abstract(addr: &[u8]) -> bool {
    addr.len() > 2 && addr[2] == 0
}

/// A sockaddr, printed for messages.
pub(crate) fn describe_addr(addr: &[u8]) -> String {
    if addr.len() < 2 {
        return "unbound".into();
    }
    let family = u16::from_ne_bytes([addr[0], addr[1]]) as i32;
    match family {
        libc::AF_INET if addr.len() >= 8 => {
            let ip = std::net::Ipv4Addr::new(addr[4], addr[5], addr[6], addr[7]);
            format!("{ip}:{}", u16::from_be_bytes([addr[2], addr[3]]))
        }
        libc::AF_INET6 if addr.len() >= 24 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&addr[8..24]);
            format!(
                "[{}]:{}",
                std::net::Ipv6Addr::from(b),
                u16::from_be_bytes([addr[2], addr[3]])
            )
        }
        libc::AF_UNIX => match unix_path(addr) {
            Some(p) => p,
            None if unix_abstract(addr) => format!(
                "@{}",
                String::from_utf8_lossy(&addr[3..]).replace('\0', "@")
            ),
            None => "unnamed".into(),
        },
        _ => format!("family {family}"),
    }
}

/// What unix_diag tells of one Unix socket.
#[derive(Debug, Default)]
struct UnixDiag {
    state: u8,
    listening: bool,
    peer: Option<u64>,
    /// Listener: pending connections; else bytes queued to read.
    rqueue: u32,
    /// Listener: backlog.
    wqueue: u32,
    vfs_ino: Option<u32>,
    shutdown: u8,
    name_len: usize,
}

/// One exact unix_diag query for socket `ino` in krg's network namespace (the process's:
/// checked by the caller).
fn unix_diag(ino: u64) -> io::Result<UnixDiag> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_NAME: u32 = 1;
    const UDIAG_SHOW_VFS: u32 = 2;
    const UDIAG_SHOW_PEER: u32 = 4;
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let s = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // struct unix_diag_req
    req.push(libc::AF_UNIX as u8);
    req.push(0);
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&(ino as u32).to_ne_bytes());
    req.extend_from_slice(
        &(UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes(),
    );
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // SAFETY: sending our buffer on our socket (to the kernel: no address needed).
    if unsafe {
        libc::send(
            s.as_raw_fd(),
            req.as_ptr() as *const libc::c_void,
            req.len(),
            0,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: receiving into our buffer.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let b = &buf[..n as usize];
    let u16_at = |o: usize| b.get(o..o + 2).map(|x| u16::from_ne_bytes([x[0], x[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|x| u32::from_ne_bytes([x[0], x[1], x[2], x[3]]))
    };
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short sock_diag answer");
    let ty = u16_at(4).ok_or_else(bad)?;
    if ty == libc::NLMSG_ERROR as u16 {
        let errno = u32_at(16).ok_or_else(bad)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    // nlmsghdr (16) + unix_diag_msg (16), then attributes.
    let mut d = UnixDiag {
        state: *b.get(18).ok_or_else(bad)?,
        ..Default::default()
    };
    d.listening = d.state == TCP_LISTEN;
    let end = (u32_at(0).ok_or_else(bad)? as usize).min(b.len());
    let mut o = 32;
    while o + 4 <= end {
        let len = u16_at(o).ok_or_else(bad)? as usize;
        let kind = u16_at(o + 2).ok_or_else(bad)?;
        if len < 4 {
            break;
        }
        let p = o + 4;
        match kind {
            0 => d.name_len = len - 4,
            1 => d.vfs_ino = u32_at(p),
            2 => d.peer = u32_at(p).map(u64::from),
            4 => {
                d.rqueue = u32_at(p).unwrap_or(0);
                d.wqueue = u32_at(p + 4).unwrap_or(0);
            }
            6 => d.shutdown = b.get(p).copied().unwrap_or(0),
            _ => {}
        }
        o += (len + 3) & !3;
    }
    Ok(d)
}

// ---- restart side ----

/// A socket made again from `st` ([`FdRestore::Socket`]), with the O_NONBLOCK of `flags`.
pub(crate) fn make_socket(st: &SocketState, flags: u32) -> io::Result<File> {
    // SAFETY: socket(2); the result is checked.
    let r = unsafe { libc::socket(st.family, st.sotype | libc::SOCK_CLOEXEC, st.protocol) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    let file = unsafe { File::from_raw_fd(r) };
    let raw = file.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, v: bool| -> io::Result<()> {
        let v = v as libc::c_int;
        // SAFETY: setsockopt with an int.
        let r = unsafe {
            libc::setsockopt(
                raw,
                level,
                name,
                &v as *const libc::c_int as *const libc::c_void,
                4,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if st.family != libc::AF_UNIX {
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR, st.reuseaddr)?;
        set(libc::SOL_SOCKET, libc::SO_REUSEPORT, st.reuseport)?;
    }
    if st.family == libc::AF_INET6 {
        set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, st.v6only)?;
    }
    if !st.bound.is_empty() {
        let path = if st.family == libc::AF_UNIX {
            unix_path(&st.bound)
        } else {
            None
        };
        if let Some(p) = &path {
            clear_stale(p)?;
        }
        bind_raw(raw, &st.bound).map_err(|e| {
            // The connections the dead process closed first stay in TIME_WAIT for up to 60 s
            // with its listener's SO_REUSEADDR (children inherit it): without it, the kernel
            // refuses a bind beside them, as it would to the program restarting itself.
            let tcp = st.family != libc::AF_UNIX && st.sotype == libc::SOCK_STREAM;
            let hint = if tcp && e.raw_os_error() == Some(libc::EADDRINUSE) {
                if st.reuseaddr {
                    " (another socket listens there: stop it to restart)"
                } else {
                    " (another socket listens there, or connections the process closed are still in TIME_WAIT, which a socket without SO_REUSEADDR cannot bind beside: retry within a minute)"
                }
            } else {
                ""
            };
            io::Error::new(
                e.kind(),
                format!("binding {}: {e}{hint}", describe_addr(&st.bound)),
            )
        })?;
        if let (Some(p), true) = (&path, st.path_mode != 0) {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(st.path_mode))?;
        }
    }
    if st.listen_backlog.is_some() && st.reuseport && listening_here(&st.bound) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} has a listener already (SO_REUSEPORT would let this one take a share of its connections): stop it to restart",
                describe_addr(&st.bound)
            ),
        ));
    }
    if let Some(backlog) = st.listen_backlog {
        // SAFETY: listen(2) on our socket.
        if unsafe { libc::listen(raw, backlog) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if !st.connected_to.is_empty() {
        let a = &st.connected_to;
        // SAFETY: connect with the recorded sockaddr bytes.
        if unsafe { libc::connect(raw, a.as_ptr() as *const libc::sockaddr, a.len() as u32) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    crate::import::own_fd(file_into_raw(file) as libc::c_long, flags)
}

/// Whether a TCP socket listens on exactly the inet address `addr` (raw sockaddr), from
/// /proc/net/tcp{,6}: each 32-bit word of the address in host order, then the port.
fn listening_here(addr: &[u8]) -> bool {
    let family = addr
        .get(..2)
        .map(|f| u16::from_ne_bytes([f[0], f[1]]) as i32);
    let (table, ip) = match (family, addr.get(4..8), addr.get(8..24)) {
        (Some(libc::AF_INET), Some(ip), _) => ("tcp", ip),
        (Some(libc::AF_INET6), _, Some(ip)) => ("tcp6", ip),
        _ => return false,
    };
    let mut want: String = ip
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    want.push_str(&format!(":{:04X}", u16::from_be_bytes([addr[2], addr[3]])));
    let text = std::fs::read_to_string(format!("/proc/self/net/{table}")).unwrap_or_default();
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
    })
}

fn file_into_raw(f: File) -> RawFd {
    use std::os::fd::IntoRawFd;
    f.into_raw_fd()
}

fn bind_raw(raw: RawFd, addr: &[u8]) -> io::Result<()> {
    // SAFETY: bind with the recorded sockaddr bytes.
    if unsafe {
        libc::bind(
            raw,
            addr.as_ptr() as *const libc::sockaddr,
            addr.len() as u32,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the socket file at `path` left by the dead process, if it is a socket no live
/// socket is bound to; anything else there is an error. Whether one is bound is read from
/// /proc/net/unix (the bound name of every live Unix socket), not by connecting: a test
/// connection would be queued on a live listener, which its owner would then accept.
fn clear_stale(path: &str) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !md.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{path} exists and is not a socket: remove it to restart"),
        ));
    }
    let table = std::fs::read_to_string("/proc/self/net/unix")?;
    let suffix = format!(" {path}");
    if table.lines().skip(1).any(|l| l.ends_with(&suffix)) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{path} is a socket in use by another process: stop it to restart"),
        ));
    }
    std::fs::remove_file(path)
}

/// A socketpair made again for ends `a` (recorded as `sa`, queue `qa`) and `b`: each end
/// gets back the bytes that were queued to it (sent through the other), one send per
/// message, and the O_NONBLOCK of its first fd.
pub(crate) fn make_pair(
    sa: &SocketState,
    qa: &[u8],
    fa: u32,
    sb: &SocketState,
    qb: &[u8],
    fb: u32,
) -> io::Result<(File, File)> {
    let mut p = [0i32; 2];
    // SAFETY: socketpair into a 2-int array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            sa.sotype | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            p.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    let (a, b) = unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) };
    refill(&b, sa, qa)?;
    refill(&a, sb, qb)?;
    let a = crate::import::own_fd(file_into_raw(a) as libc::c_long, fa)?;
    let b = crate::import::own_fd(file_into_raw(b) as libc::c_long, fb)?;
    Ok((a, b))
}

/// Sends `queue` (the messages of `st`) through `via`, so that they are queued at its peer.
fn refill(via: &File, st: &SocketState, queue: &[u8]) -> io::Result<()> {
    let mut off = 0usize;
    let lens: Vec<usize> = if st.sotype == libc::SOCK_STREAM {
        vec![queue.len()]
    } else {
        st.messages.iter().map(|&l| l as usize).collect()
    };
    for len in lens {
        let msg = queue
            .get(off..off + len)
            .ok_or_else(|| io::Error::other("the image holds fewer queued bytes than recorded"))?;
        let mut sent = 0;
        loop {
            // SAFETY: send from our buffer on our socket (non-blocking).
            let n = unsafe {
                libc::send(
                    via.as_raw_fd(),
                    msg[sent..].as_ptr() as *const libc::c_void,
                    msg.len() - sent,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            sent += n as usize;
            if sent >= msg.len() || st.sotype != libc::SOCK_STREAM {
                break;
            }
        }
        off += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_described() {
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(describe_addr(&v4), "127.0.0.1:8080");
        assert!(inet_bound(&v4));
        let mut un = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        un.extend_from_slice(b"/run/x.sock\0");
        assert_eq!(unix_path(&un).as_deref(), Some("/run/x.sock"));
        let mut ab = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
        ab.extend_from_slice(b"\0name");
        assert_eq!(unix_path(&ab), None);
        assert_eq!(describe_addr(&ab), "@name");
        assert_eq!(
            describe_addr(&(libc::AF_UNIX as u16).to_ne_bytes()),
            "unnamed"
        );
    }
}
