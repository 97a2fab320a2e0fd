//! Opening a connection: TCP connect, the upgrade, and reading what comes back.

use std::io::{self, Read};

use arcgate::protocol::codec::Decoder;
use mio::{Interest, Token};

use crate::net;
use crate::stats::C;
use crate::tls::Stream;
use crate::util::mono_ns;
use crate::ws::{self, Upgrade};

use super::conn::{role_index, Role, State};
use super::{Engine, TimerKind, MS};

impl Engine {
    pub(super) fn set_state(&mut self, i: usize, state: State) {
        let conn = &mut self.conns[i];
        let was = conn.state;
        if was == state {
            return;
        }
        let r = role_index(conn.role);
        if conn.in_progress() {
            self.attempting -= 1;
        }
        if was == State::Ready {
            self.held[conn.url as usize].ready[r] -= 1;
        }
        conn.state = state;
        if conn.in_progress() {
            self.attempting += 1;
        }
        let held = &mut self.held[conn.url as usize];
        match state {
            State::Ready => held.ready[r] += 1,
            State::Stopped => held.stopped[r] += 1,
            _ => {}
        }
    }

    fn next_src(&mut self) -> Option<std::net::Ipv4Addr> {
        if self.plan.sources.is_empty() {
            return None;
        }
        let s = self.plan.sources[self.next_source % self.plan.sources.len()];
        self.next_source += 1;
        Some(s)
    }

    pub(super) fn start_attempt(&mut self, i: usize, now: u64) {
        self.c.inc(C::Attempts);
        let src = self.next_src();
        let url = self.conns[i].url as usize;
        let connected = net::connect(src, self.plan.targets[url].addr);
        let connector = self.connectors[url].as_ref();
        let mut sock = match connected.and_then(|s| Stream::new(s, connector)) {
            Ok(s) => s,
            Err(e) => {
                let cause = net::cause(&e);
                self.set_state(i, State::Connecting);
                self.drop_conn(i, &cause, None, now);
                return;
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            let cause = net::cause(&e);
            self.set_state(i, State::Connecting);
            self.drop_conn(i, &cause, None, now);
            return;
        }
        let conn = &mut self.conns[i];
        conn.sock = Some(sock);
        conn.attempt_ns = now;
        conn.retry_after_ms = 0;
        self.set_state(i, State::Connecting);
        self.arm(
            now + self.plan.attempt_timeout_ms * MS,
            TimerKind::Attempt,
            i,
        );
    }

    pub(super) fn on_event(
        &mut self,
        i: usize,
        writable: bool,
        read_closed: bool,
        rbuf: &mut [u8],
    ) {
        let now = mono_ns();
        match self.conns[i].state {
            State::Connecting => {
                self.on_connecting(i, now);
                // A gateway that refuses at once (503) may have answered and closed
                // before this first event: its edge is gone, so read now.
                if self.conns[i].state == State::Upgrading {
                    self.read_all(i, rbuf, read_closed);
                }
            }
            State::Upgrading | State::Authing | State::Ready => {
                if writable {
                    self.flush(i, now);
                }
                self.read_all(i, rbuf, read_closed);
            }
            _ => {}
        }
    }

    fn on_connecting(&mut self, i: usize, now: u64) {
        let Some(sock) = self.conns[i].sock.as_ref() else {
            return;
        };
        match sock.take_error() {
            Ok(Some(e)) | Err(e) => {
                let cause = net::cause(&e);
                return self.drop_conn(i, &cause, None, now);
            }
            Ok(None) => {}
        }
        match sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => {
                let cause = net::cause(&e);
                return self.drop_conn(i, &cause, None, now);
            }
        }
        let target = &self.plan.targets[self.conns[i].url as usize];
        let path = match self.conns[i].role {
            Role::Agent => format!("{}/ws/agent", target.base_path),
            _ => format!("{}/ws/client", target.base_path),
        };
        let req = ws::upgrade_request(&target.host, &path, &mut self.rng);
        self.conns[i].wbuf.extend_from_slice(&req);
        self.set_state(i, State::Upgrading);
        self.flush(i, now);
    }

    /// Reads until the socket is empty. After a short read the socket is known to be empty
    /// and data arriving later raises a new edge, so the read that would only say EAGAIN is
    /// saved, unless the peer's FIN already came with this event (no edge would follow).
    fn read_all(&mut self, i: usize, rbuf: &mut [u8], read_closed: bool) {
        loop {
            let gen = self.conns[i].gen;
            let Some(sock) = self.conns[i].sock.as_mut() else {
                return;
            };
            let result = sock.read(rbuf);
            // Taken after the read: everything in the buffer was sent before it.
            let now = mono_ns();
            match result {
                Ok(0) => return self.drop_conn(i, "eof", None, now),
                Ok(n) => {
                    self.c.add(C::BytesIn, n as u64);
                    self.on_bytes(i, &mut rbuf[..n], now);
                    if self.conns[i].gen != gen || (n < rbuf.len() && !read_closed) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let cause = net::cause(&e);
                    return self.drop_conn(i, &cause, None, now);
                }
            }
        }
    }

    fn on_bytes(&mut self, i: usize, buf: &mut [u8], now: u64) {
        if self.conns[i].state == State::Upgrading {
            let conn = &mut self.conns[i];
            conn.head.extend_from_slice(buf);
            match ws::parse_upgrade(&conn.head) {
                Upgrade::Partial => {}
                Upgrade::Garbage => self.drop_conn(i, "bad_upgrade_response", None, now),
                Upgrade::Refused {
                    status,
                    retry_after,
                } => {
                    conn.retry_after_ms = retry_after.unwrap_or(0) * 1000;
                    self.drop_conn(i, &format!("http_{status}"), None, now);
                }
                Upgrade::Switched { head_len } => {
                    let mut rest = conn.head.split_off(head_len);
                    conn.head = Vec::new();
                    self.set_state(i, State::Authing);
                    self.send_auth(i);
                    if !rest.is_empty() {
                        self.decode(i, &mut rest, now);
                    }
                }
            }
            return;
        }
        self.decode(i, buf, now);
    }

    fn decode(&mut self, i: usize, buf: &mut [u8], now: u64) {
        let gen = self.conns[i].gen;
        let mut dec = std::mem::replace(&mut self.conns[i].dec, Decoder::new_client(0));
        let result = dec.decode(buf, |m| self.on_message(i, gen, m, now));
        if self.conns[i].gen != gen {
            return;
        }
        self.conns[i].dec = dec;
        if let Err(reason) = result {
            let code = reason.code();
            self.send_close(i, code);
            self.flush(i, now);
            self.drop_conn(i, &format!("protocol_error_{code}"), None, now);
        }
    }
}
