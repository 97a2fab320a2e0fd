//! The epoll loop (through mio), for hosts where io_uring is unavailable: the same
//! connection table and handler as the io_uring loop, with plain non-blocking sockets.

use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::conns::{ConnId, Conns, State};
use super::{sleep_for, Handler, Notifier};

const LISTENER: Token = Token(usize::MAX);
const WAKE: Token = Token(usize::MAX - 1);
const READ_BUF: usize = 64 * 1024;
const MAX_IOVECS: usize = 64;

/// One worker's epoll loop.
pub struct EpollLoop {
    poll: Poll,
    events: Events,
    /// Dropped when the handler stops accepting, so that the port's other listeners (a
    /// newer process with `SO_REUSEPORT`) get the new connections.
    listener: Option<TcpListener>,
    notifier: Arc<Notifier>,
    accepting: bool,
    read_buf: Vec<u8>,
    iov: Vec<libc::iovec>,
    dirty: Vec<u32>,
}

impl EpollLoop {
    pub fn new(listener: TcpListener, notifier: Arc<Notifier>) -> io::Result<EpollLoop> {
        let poll = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        poll.registry()
            .register(&mut SourceFd(&notifier.fd()), WAKE, Interest::READABLE)?;
        Ok(EpollLoop {
            poll,
            events: Events::with_capacity(1024),
            listener: Some(listener),
            notifier,
            accepting: true,
            read_buf: vec![0; READ_BUF],
            iov: Vec::with_capacity(MAX_IOVECS),
            dirty: Vec::new(),
        })
    }

    /// Runs until the handler says it is finished.
    pub fn run<H: Handler>(&mut self, conns: &mut Conns, handler: &mut H) -> io::Result<()> {
        while !handler.finished(conns) {
            let wait = sleep_for(Instant::now(), handler.next_deadline());
            if let Err(e) = self.poll.poll(&mut self.events, Some(wait)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let now = Instant::now();
            let tokens: Vec<(Token, bool, bool)> = self
                .events
                .iter()
                .map(|e| {
                    (
                        e.token(),
                        e.is_readable() || e.is_read_closed() || e.is_error(),
                        e.is_writable(),
                    )
                })
                .collect();
            for (token, readable, writable) in tokens {
                match token {
                    LISTENER => self.accept(conns, handler, now),
                    WAKE => {
                        self.notifier.drain();
                        handler.on_wake(conns, now);
                    }
                    Token(t) => {
                        let id = ConnId::from_u64(t as u64);
                        if readable {
                            self.read(conns, handler, id, now);
                        }
                        if writable && conns.get(id).is_some_and(|s| s.unsent()) {
                            conns.mark_dirty(id);
                        }
                    }
                }
            }
            handler.on_tick(conns, now);
            if !handler.accepting() && self.accepting {
                self.accepting = false;
                if let Some(listener) = self.listener.take() {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&listener.as_raw_fd()));
                }
            }
            while let Some(id) = conns.pop_expired_linger(now) {
                self.teardown(conns, handler, id, now);
            }
            self.flush(conns, handler, now);
        }
        Ok(())
    }

    fn accept<H: Handler>(&mut self, conns: &mut Conns, handler: &mut H, now: Instant) {
        let Some(listener) = self.listener.as_ref().map(|l| l.as_raw_fd()) else {
            return;
        };
        loop {
            // SAFETY: accept4 with null address arguments.
            let fd = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                    tracing::debug!(error = %e, "accept failed");
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let id = conns.insert(fd);
            let token = Token(id.to_u64() as usize);
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&fd),
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(error = %e, "epoll register failed");
                // SAFETY: fd is ours.
                unsafe { libc::close(fd) };
                conns.remove(id);
                continue;
            }
            handler.on_accept(conns, id, now);
        }
    }

    fn read<H: Handler>(&mut self, conns: &mut Conns, handler: &mut H, id: ConnId, now: Instant) {
        loop {
            let Some(s) = conns.get(id) else { return };
            let (fd, state) = (s.fd, s.state);
            // SAFETY: reads into our buffer, within its length.
            let n = unsafe {
                libc::recv(
                    fd,
                    self.read_buf.as_mut_ptr().cast(),
                    self.read_buf.len(),
                    0,
                )
            };
            if n > 0 {
                if state == State::Open {
                    handler.on_data(conns, id, &mut self.read_buf[..n as usize], now);
                }
                continue;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return,
                    io::ErrorKind::Interrupted => continue,
                    _ => {}
                }
            }
            // End of stream or a socket error.
            self.teardown(conns, handler, id, now);
            return;
        }
    }

    fn teardown<H: Handler>(
        &mut self,
        conns: &mut Conns,
        handler: &mut H,
        id: ConnId,
        now: Instant,
    ) {
        let Some(s) = conns.get_mut(id) else { return };
        let fd = s.fd;
        s.state = State::Teardown;
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        // SAFETY: fd is ours and closed once.
        unsafe { libc::close(fd) };
        handler.on_close(conns, id, now);
        conns.remove(id);
    }

    fn flush<H: Handler>(&mut self, conns: &mut Conns, handler: &mut H, now: Instant) {
        let mut dirty = std::mem::take(&mut self.dirty);
        conns.take_dirty(&mut dirty);
        for &slot in &dirty {
            let id = conns.id_of(slot);
            if !self.write(conns, id) {
                self.teardown(conns, handler, id, now);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Writes as much of `id`'s queue as the socket takes; false on a socket error.
    fn write(&mut self, conns: &mut Conns, id: ConnId) -> bool {
        let Some(s) = conns.get_mut(id) else {
            return true;
        };
        if !matches!(s.state, State::Open | State::Flushing) {
            return true;
        }
        s.seal();
        while !s.wire().is_empty() {
            self.iov.clear();
            s.wire().iovecs(&mut self.iov, MAX_IOVECS);
            // SAFETY: an all-zero msghdr is valid; iov points at live frames.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_iov = self.iov.as_mut_ptr();
            hdr.msg_iovlen = self.iov.len();
            // SAFETY: hdr and its iovecs are valid for the call.
            let n = unsafe { libc::sendmsg(s.fd, &hdr, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return true,
                    io::ErrorKind::Interrupted => continue,
                    _ => return false,
                }
            }
            s.wire().advance(n as usize);
        }
        if s.state == State::Flushing {
            s.state = State::Lingering;
            // SAFETY: shuts down writing on our socket.
            unsafe { libc::shutdown(s.fd, libc::SHUT_WR) };
        }
        true
    }
}
