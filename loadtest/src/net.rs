//! Non-blocking TCP sockets bound to a chosen source address before connecting, so that
//! one machine can open more connections than one source address has ports.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::FromRawFd;

use arcgate::io::listener::{check, set_opt, sockaddr};

/// Starts a non-blocking connect to `dst`, bound first to `src` (port chosen at connect
/// time: IP_BIND_ADDRESS_NO_PORT) when given and of the same family.
pub fn connect(src: Option<Ipv4Addr>, dst: SocketAddr) -> io::Result<mio::net::TcpStream> {
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the descriptor is owned right below.
    let fd = check(unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: `fd` is a fresh socket nobody else owns; the stream closes it on drop.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    set_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    if let (Some(src), true) = (src, dst.is_ipv4()) {
        set_opt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        let (addr, len) = sockaddr(SocketAddr::new(src.into(), 0));
        // SAFETY: `addr` holds a sockaddr_in of `len` bytes.
        check(unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_storage).cast(), len) })?;
    }
    let (addr, len) = sockaddr(dst);
    // SAFETY: `addr` holds a sockaddr of `len` bytes.
    let ret = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_storage).cast(), len) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(mio::net::TcpStream::from_std(stream))
}

/// A short name for why a socket operation failed (the report's failure causes).
pub fn cause(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused".into(),
        ConnectionReset => "reset".into(),
        ConnectionAborted => "aborted".into(),
        BrokenPipe => "broken_pipe".into(),
        TimedOut => "timeout".into(),
        AddrNotAvailable => "addr_not_available".into(),
        AddrInUse => "addr_in_use".into(),
        _ => match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_open_files".into(),
            Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => "unreachable".into(),
            Some(n) => format!("errno_{n}"),
            None => "io_error".into(),
        },
    }
}

/// Raises the soft open-files limit to the hard one; returns the limit in force.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn connects_from_a_chosen_source() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        let mut s = connect(Some(Ipv4Addr::new(127, 0, 0, 3)), dst).unwrap();
        let (mut peer, from) = listener.accept().unwrap();
        assert_eq!(from.ip(), Ipv4Addr::new(127, 0, 0, 3));
        peer.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        let mut got = 0;
        for _ in 0..200 {
            match s.read(&mut buf[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
            if got == 2 {
                break;
            }
        }
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn refused_is_named() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let s = connect(None, dst).unwrap();
        let mut err = None;
        for _ in 0..200 {
            if let Ok(Some(e)) = s.take_error() {
                err = Some(e);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(cause(&err.expect("the connect must fail")), "refused");
    }
}
