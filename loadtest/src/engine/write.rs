//! Writing: frames into a connection's buffer, queued while disconnected, flushed.

use std::io::{self, Write};

use arcgate::protocol::codec::OP_TEXT;

use crate::stats::C;
use crate::util::mono_ns;
use crate::{net, ws};

use super::conn::{Kind, Queued, State};
use super::Engine;

/// Unsent bytes one connection may hold before it is given up.
const MAX_BACKLOG: usize = 8 << 20;

impl Engine {
    pub(super) fn mark_dirty(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(i as u32);
        }
    }

    pub(super) fn write_text(&mut self, i: usize, payload: &[u8]) {
        let mask = self.rng.mask();
        ws::push_frame(&mut self.conns[i].wbuf, OP_TEXT, payload, mask);
        self.c.inc(C::MsgsOut);
        self.c.add(C::BytesOut, payload.len() as u64);
        self.mark_dirty(i);
    }

    pub(super) fn send_close(&mut self, i: usize, code: u16) {
        let mask = self.rng.mask();
        ws::push_close(&mut self.conns[i].wbuf, code, mask);
        self.mark_dirty(i);
    }

    /// Writes an agent's message on its live connection, counting it by kind.
    pub(super) fn write_msg(&mut self, i: usize, kind: Kind, payload: &[u8], sent_ns: u64) {
        self.write_text(i, payload);
        let counter = match kind {
            Kind::Heartbeat => C::Heartbeats,
            Kind::Metrics => C::Metrics,
            Kind::Status => C::Statuses,
            Kind::Player => C::Players,
            Kind::Response => C::ResponsesSent,
            Kind::Command => C::CommandsSent,
        };
        self.c.inc(counter);
        if matches!(kind, Kind::Status | Kind::Player) && self.in_window(sent_ns) {
            let cluster = self.conns[i].cluster as usize;
            self.sent_by_cluster[cluster] += 1;
        }
    }

    /// Sends the message in `scratch` now, or keeps it for after the reconnect.
    pub(super) fn send_or_queue(&mut self, i: usize, kind: Kind, sent_ns: u64) {
        let payload = std::mem::take(&mut self.scratch);
        match self.conns[i].state {
            State::Ready => self.write_msg(i, kind, &payload, sent_ns),
            State::Stopped => {}
            _ => {
                let limit = self.plan.queue_limit as usize;
                let conn = &mut self.conns[i];
                if conn.queue.len() >= limit.max(1) {
                    conn.queue.pop_front();
                    self.c.inc(C::QueueDropped);
                }
                if limit > 0 {
                    conn.queue.push_back(Queued {
                        payload: payload.clone(),
                        sent_ns,
                        kind,
                    });
                }
            }
        }
        self.scratch = payload;
    }

    pub(super) fn flush(&mut self, i: usize, now: u64) {
        let conn = &mut self.conns[i];
        let Some(sock) = conn.sock.as_mut() else {
            return;
        };
        if conn.state == State::Connecting {
            return;
        }
        // wss://: TLS records the socket did not take last time.
        if let Err(e) = sock.flush() {
            if e.kind() != io::ErrorKind::WouldBlock {
                let cause = net::cause(&e);
                return self.drop_conn(i, &cause, None, now);
            }
            return;
        }
        while conn.wpos < conn.wbuf.len() {
            match sock.write(&conn.wbuf[conn.wpos..]) {
                Ok(n) => conn.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A gateway that stopped reading must not make this process grow
                    // without bound.
                    if conn.wbuf.len() - conn.wpos > MAX_BACKLOG {
                        self.drop_conn(i, "write_backlog", None, now);
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let cause = net::cause(&e);
                    return self.drop_conn(i, &cause, None, now);
                }
            }
        }
        conn.wbuf.clear();
        conn.wpos = 0;
        if conn.wbuf.capacity() > 256 * 1024 {
            conn.wbuf.shrink_to(16 * 1024);
        }
    }

    pub(super) fn flush_dirty(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let now = mono_ns();
        let dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            self.conns[i as usize].dirty = false;
            self.flush(i as usize, now);
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }
}
