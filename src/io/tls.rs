//! TLS as a byte layer between the socket and the handler (rustls): received records are
//! decrypted before the handler sees them, and a connection's queued frames are sealed
//! into its records when the loop flushes, so a relay frame is still built once.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use rustls::ServerConfig;

use super::conns::{ConnId, Conns, OutQueue, Slot, State};
use super::Handler;

type Writer<'a> = WriteTraffic<'a, ServerConnectionData>;
/// Seals into the records once rustls may send application data.
type Seal<'s> = &'s mut dyn for<'a> FnMut(&mut Writer<'a>, &mut Vec<u8>);

/// One connection's TLS state: rustls's unbuffered connection (it holds no record
/// buffers: input is ours, output goes straight into our records), the tail of a
/// record still arriving, and the records not yet written.
pub(crate) struct Tls {
    conn: UnbufferedServerConnection,
    /// Received bytes of a record not complete yet; empty (no allocation) between records.
    partial: Vec<u8>,
    /// Records (handshake, sealed frames, alerts) waiting for the socket; a send in
    /// flight points into them.
    wire: OutQueue,
    /// The handshake finished: frames may be sealed.
    established: bool,
    /// close_notify was queued (or cannot be any more).
    notified: bool,
}

/// Appends what rustls produces when a buffer of `required_size` is needed first.
impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("partial", &self.partial.len())
            .field("wire", &self.wire)
            .field("established", &self.established)
            .finish_non_exhaustive()
    }
}

/// Appends what `produce` writes, with room for `guess` bytes first; when rustls says it
/// needs more, with exactly that.
fn grow_into(
    out: &mut Vec<u8>,
    guess: usize,
    mut produce: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    out.resize(start + guess, 0);
    let need = match produce(&mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            return Ok(());
        }
        Err(Some(need)) => need,
        Err(None) => {
            out.truncate(start);
            return Err(rustls::Error::General("TLS output failed".into()));
        }
    };
    out.resize(start + need, 0);
    match produce(&mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(_) => {
            out.truncate(start);
            Err(rustls::Error::General("TLS output failed".into()))
        }
    }
}

/// Room for `len` bytes of application data as records: a header, tag and content type
/// per 16 KiB record.
fn sealed_len(len: usize) -> usize {
    len + (len / 16_384 + 1) * 64
}

fn encode(
    e: &mut EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    grow_into(out, 0, |buf| match e.encode(buf) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Err(Some(required_size))
        }
        Err(_) => Err(None),
    })
}

fn size_needed(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

impl Tls {
    fn new(config: Arc<ServerConfig>) -> Result<Tls, rustls::Error> {
        Ok(Tls {
            conn: UnbufferedServerConnection::new(config)?,
            partial: Vec::new(),
            wire: OutQueue::default(),
            established: false,
            notified: false,
        })
    }

    /// Runs rustls over `input` until it needs more bytes or may send application data
    /// (then `write` seals into `records`). Decrypted data goes to `plain`, records
    /// rustls wants sent to `records`. Returns the bytes of `input` consumed.
    fn drive(
        &mut self,
        input: &mut [u8],
        plain: &mut Vec<u8>,
        records: &mut Vec<u8>,
        mut write: Option<Seal<'_>>,
    ) -> (usize, Result<(), rustls::Error>) {
        let mut used = 0;
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut input[used..]);
            used += discard;
            let result = match state {
                Err(e) => Err(e),
                Ok(ConnectionState::ReadTraffic(mut r)) => loop {
                    match r.next_record() {
                        Some(Ok(record)) => plain.extend_from_slice(record.payload),
                        Some(Err(e)) => break Err(e),
                        None => break Ok(()),
                    }
                },
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, records),
                // Sent at this turn's flush, in order with everything after it.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Ok(())
                }
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    self.established = true;
                    if let Some(write) = write.take() {
                        write(&mut w, records);
                    }
                    return (used, Ok(()));
                }
                // The peer's FIN follows; keep going to the state after it.
                Ok(ConnectionState::PeerClosed) => Ok(()),
                // Blocked on the peer, closed, or early data (not enabled).
                Ok(_) => return (used, Ok(())),
            };
            if let Err(e) = result {
                return (used, Err(e));
            }
        }
    }

    /// Feeds received bytes to rustls; appends the application data they carried to
    /// `plain` and the records to send (handshake, alerts) to `records`.
    fn receive(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
        records: &mut Vec<u8>,
    ) -> Result<(), rustls::Error> {
        let result = if self.partial.is_empty() {
            let (used, result) = self.drive(data, plain, records, None);
            if result.is_ok() && used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
            result
        } else {
            let mut input = std::mem::take(&mut self.partial);
            input.extend_from_slice(data);
            let (used, result) = self.drive(&mut input, plain, records, None);
            input.drain(..used);
            if result.is_ok() && !input.is_empty() {
                self.partial = input;
            }
            result
        };
        if result.is_err() {
            // The alert rustls queued for the peer.
            self.partial = Vec::new();
            let _ = self.drive(&mut [], plain, records, None);
        }
        result
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

    /// What the queued frames and records count against `max_outbound_bytes`.
    pub(crate) fn cost(&self) -> usize {
        self.out.cost() + self.tls.as_ref().map_or(0, |t| t.wire.cost())
    }

    /// Seals the queued frames into TLS records (nothing to do without TLS). Frames
    /// queued before the handshake finished are dropped when the connection closes;
    /// a closing connection's records end with close_notify.
    pub(crate) fn seal(&mut self) {
        let Some(tls) = self.tls.as_deref_mut() else {
            return;
        };
        let closing = self.state == State::Flushing;
        if !tls.established {
            if closing {
                self.out.clear();
                tls.notified = true;
            }
            return;
        }
        let notify = closing && !tls.notified;
        if self.out.is_empty() && !notify {
            return;
        }
        tls.notified |= notify;
        let frames = self.out.take_frames();
        // Frames of one turn go into as few records as they fill (one encryption per
        // 16 KiB, not per frame); a lone frame is sealed from where it is.
        let joined: Option<Vec<u8>> = (frames.len() > 1).then(|| {
            let mut all = Vec::with_capacity(frames.iter().map(Bytes::len).sum());
            frames.iter().for_each(|f| all.extend_from_slice(f));
            all
        });
        let plain: Vec<&[u8]> = match &joined {
            Some(all) => vec![all],
            None => frames.iter().map(|f| &f[..]).collect(),
        };
        let mut seal = |w: &mut Writer<'_>, out: &mut Vec<u8>| {
            for data in &plain {
                let guess = sealed_len(data.len());
                let sealed = grow_into(out, guess, |buf| w.encrypt(data, buf).map_err(size_needed));
                if sealed.is_err() {
                    return;
                }
            }
            if notify {
                let _ = grow_into(out, 64, |buf| {
                    w.queue_close_notify(buf).map_err(size_needed)
                });
            }
        };
        let mut records = Vec::new();
        let _ = tls.drive(&mut [], &mut Vec::new(), &mut records, Some(&mut seal));
        if !records.is_empty() {
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
        let mut records = Vec::new();
        let result = tls.receive(data, &mut plain, &mut records);
        if !records.is_empty() {
            tls.wire.push(Bytes::from(records));
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
