//! systemd integration in a few system calls (no libsystemd): state notifications on
//! `$NOTIFY_SOCKET` (`READY=1`, `STOPPING=1`, `WATCHDOG=1`) and listening sockets passed
//! by socket activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`).

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;
use std::time::Duration;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

struct NotifyTarget {
    socket: UnixDatagram,
    addr: SocketAddr,
}

fn target() -> Option<&'static NotifyTarget> {
    static TARGET: OnceLock<Option<NotifyTarget>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let path = std::env::var_os("NOTIFY_SOCKET")?;
            let path = path.to_str()?;
            // "@name" is a socket in the abstract namespace.
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(path).ok()?,
            };
            let socket = UnixDatagram::unbound().ok()?;
            Some(NotifyTarget { socket, addr })
        })
        .as_ref()
}

/// Whether the service manager listens for notifications.
pub fn notify_enabled() -> bool {
    target().is_some()
}

/// Sends `state` (newline-separated `KEY=value` lines) to the service manager; false
/// when there is none or the send failed.
pub fn notify(state: &str) -> bool {
    match target() {
        Some(t) => t.socket.send_to_addr(state.as_bytes(), &t.addr).is_ok(),
        None => false,
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// The watchdog interval systemd expects pings within (`WATCHDOG_USEC`), if it is meant
/// for this process (`WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Listeners passed by socket activation.
#[derive(Debug, Default)]
pub struct Activated {
    /// The WebSocket listener: the one socket not named `admin`.
    pub websocket: Option<TcpListener>,
    /// The admin listener: only ever a socket named `admin` (`FileDescriptorName=admin`),
    /// so that no extra `ListenStream=` line can put the admin API on a public address.
    pub admin: Option<TcpListener>,
}

/// Takes the sockets systemd passed to this process, if any, and removes the
/// `LISTEN_*` variables so that nothing started later mistakes them for its own.
/// Call before any other thread starts.
pub fn take_listeners() -> io::Result<Activated> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    if !ours || count <= 0 {
        return Ok(Activated::default());
    }
    let names: Vec<&str> = names.split(':').collect();
    let mut out = Activated::default();
    for i in 0..count {
        let fd = LISTEN_FDS_START + i;
        let listener = listening_tcp(fd)?;
        let admin = names.get(i as usize).copied() == Some("admin");
        let slot = if admin {
            &mut out.admin
        } else {
            &mut out.websocket
        };
        if slot.is_some() {
            return Err(too_many(count, &names, admin));
        }
        *slot = Some(listener);
    }
    Ok(out)
}

/// The refusal of a second WebSocket (or admin) socket: every worker accepts from one
/// WebSocket listener, and guessing which extra socket is which could publish the admin API.
fn too_many(count: i32, names: &[&str], admin: bool) -> io::Error {
    let what = if admin {
        "two sockets named `admin`"
    } else {
        "more than one WebSocket socket (any socket not named `admin`)"
    };
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "systemd passed {count} sockets (LISTEN_FDNAMES={}) with {what}; arcgate takes one \
             WebSocket listener and at most one admin listener: keep one ListenStream= in \
             arcgate.socket, and give the admin API its own socket unit with \
             FileDescriptorName=admin (or let it bind admin_listen)",
            names.join(":")
        ),
    )
}

fn sockopt(fd: RawFd, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live i32.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Adopts descriptor `fd` if it is a listening TCP socket; marks it close-on-exec.
fn listening_tcp(fd: RawFd) -> io::Result<TcpListener> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} passed by systemd is {what}; arcgate.socket must hold TCP stream listeners"),
        )
    };
    let stream = sockopt(fd, libc::SO_TYPE).map_err(|_| bad("not a socket"))?;
    let domain = sockopt(fd, libc::SO_DOMAIN)?;
    if stream != libc::SOCK_STREAM || !matches!(domain, libc::AF_INET | libc::AF_INET6) {
        return Err(bad("not a TCP socket"));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN)? != 1 {
        return Err(bad("not listening"));
    }
    // SAFETY: systemd handed this descriptor to the process; nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(TcpListener::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_that_is_not_a_listener_is_refused() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let fd = a.as_raw_fd();
        let err = listening_tcp(fd).unwrap_err();
        assert!(err.to_string().contains("not a TCP socket"), "{err}");
        // listening_tcp did not take ownership on failure.
        assert!(a.local_addr().is_ok());
        let connected = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = listening_tcp(connected.as_raw_fd()).unwrap_err();
        assert!(err.to_string().contains("not a TCP socket"), "{err}");
        let unbound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = unbound.as_raw_fd();
        assert_eq!(sockopt(fd, libc::SO_ACCEPTCONN).unwrap(), 1);
    }
}
