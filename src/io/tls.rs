//! TLS as a byte layer between the socket and the handler (rustls): received records are
//! decrypted before the handler sees them, and a connection's queued frames are sealed
//! into its records when the loop flushes, so a relay frame is still built once.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rustls::{ServerConfig, ServerConnection};

use super::conns::{ConnId, Conns, OutQueue, Slot, State};
use super::Handler;

/// One connection's TLS state: rustls's connection and the records not yet written.
#[derive(Debug)]
pub(crate) struct Tls {
    conn: ServerConnection,
    /// Records (handshake, sealed frames, alerts) waiting for the socket; a send in
    /// flight points into them.
    wire: OutQueue,
    /// close_notify was queued.
    notified: bool,
}

impl Tls {
    fn new(config: Arc<ServerConfig>) -> Result<Tls, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        // The connection's own outbound cap (`max_outbound_bytes`) bounds what is sealed.
        conn.set_buffer_limit(None);
        Ok(Tls {
            conn,
            wire: OutQueue::default(),
            notified: false,
        })
    }

    /// Feeds received bytes to rustls and appends the application data they carried.
    fn receive(&mut self, mut data: &[u8], plain: &mut Vec<u8>) -> Result<(), rustls::Error> {
        while !data.is_empty() {
            // rustls takes at most its read size per call; process between calls so its
            // buffer never fills.
            self.conn
                .read_tls(&mut data)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            let state = self.conn.process_new_packets()?;
            if state.plaintext_bytes_to_read() > 0 {
                // Ends with WouldBlock once everything decrypted so far is read.
                let _ = self.conn.reader().read_to_end(plain);
            }
        }
        Ok(())
    }
}

impl Slot {
    /// The queue the socket is written from: the frames themselves, or their TLS records.
    pub(crate) fn wire(&mut self) -> &mut OutQueue {
        match self.tls.as_deref_mut() {
            Some(tls) => &mut tls.wire,
            None => &mut self.out,
        }
    }

    /// Whether anything (frames or records) waits to be written.
    pub(crate) fn unsent(&self) -> bool {
        self.queued() > 0
    }

    /// Bytes queued for this connection, records included.
    pub(crate) fn queued(&self) -> usize {
        self.out.bytes + self.tls.as_ref().map_or(0, |t| t.wire.bytes)
    }

    /// Seals the queued frames into TLS records (nothing to do without TLS). Frames
    /// queued before the handshake finished are dropped when the connection closes;
    /// a closing connection's records end with close_notify.
    pub(crate) fn seal(&mut self) {
        let Some(tls) = self.tls.as_deref_mut() else {
            return;
        };
        let closing = self.state == State::Flushing;
        if !tls.conn.is_handshaking() {
            for frame in self.out.take_frames() {
                // Cannot fail: the buffer limit is off and the handshake is done.
                let _ = std::io::Write::write_all(&mut tls.conn.writer(), &frame);
            }
        } else if closing {
            self.out.clear();
        }
        if closing && !tls.notified {
            tls.notified = true;
            tls.conn.send_close_notify();
        }
        if tls.conn.wants_write() {
            let mut records = Vec::new();
            while tls.conn.wants_write() {
                if tls.conn.write_tls(&mut records).is_err() {
                    break;
                }
            }
            tls.wire.push(Bytes::from(records));
        }
    }
}

/// A `Handler` that puts TLS under another one when a server configuration is given,
/// and passes everything through unchanged otherwise.
pub struct Layer<'h, H> {
    inner: &'h mut H,
    config: Option<Arc<ServerConfig>>,
    /// Decrypted bytes of the current receive, reused across calls.
    plain: Vec<u8>,
}

impl<'h, H: Handler> Layer<'h, H> {
    pub fn new(inner: &'h mut H, config: Option<Arc<ServerConfig>>) -> Layer<'h, H> {
        Layer {
            inner,
            config,
            plain: Vec::new(),
        }
    }
}

impl<H: Handler> Handler for Layer<'_, H> {
    fn on_accept(&mut self, conns: &mut Conns, id: ConnId, now: Instant) {
        if let Some(config) = &self.config {
            match Tls::new(config.clone()) {
                Ok(tls) => {
                    if let Some(slot) = conns.get_mut(id) {
                        slot.tls = Some(Box::new(tls));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a TLS session");
                    conns.close(id, now);
                }
            }
        }
        // The handler's handshake deadline and pending-handshake cap start now, so
        // they cover the TLS handshake too.
        self.inner.on_accept(conns, id, now);
    }

    fn on_data(&mut self, conns: &mut Conns, id: ConnId, data: &mut [u8], now: Instant) {
        let Some(tls) = conns.get_mut(id).and_then(|s| s.tls.as_deref_mut()) else {
            return self.inner.on_data(conns, id, data, now);
        };
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let result = tls.receive(data, &mut plain);
        if tls.conn.wants_write() {
            conns.mark_dirty(id);
        }
        if !plain.is_empty() {
            self.inner.on_data(conns, id, &mut plain, now);
        }
        if plain.capacity() > 64 * 1024 {
            // A large message passed through: keep no more than a usual receive's worth.
            plain = Vec::new();
        }
        self.plain = plain;
        if let Err(e) = result {
            // rustls queued the alert; it goes out before the close.
            tracing::debug!(conn = id.slot, error = %e, "TLS failed; closing");
            conns.mark_dirty(id);
            conns.close(id, now);
        }
    }

    fn on_close(&mut self, conns: &mut Conns, id: ConnId, now: Instant) {
        self.inner.on_close(conns, id, now);
    }

    fn on_wake(&mut self, conns: &mut Conns, now: Instant) {
        self.inner.on_wake(conns, now);
    }

    fn on_tick(&mut self, conns: &mut Conns, now: Instant) {
        self.inner.on_tick(conns, now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.inner.next_deadline()
    }

    fn accepting(&self) -> bool {
        self.inner.accepting()
    }

    fn finished(&self, conns: &Conns) -> bool {
        self.inner.finished(conns)
    }
}
