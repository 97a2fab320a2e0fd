//! The connection table both io backends share: slots with generations, bounded outbound
//! queues of shared frames, and the list of connections with bytes to flush this turn.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

pub use crate::conn::ConnId;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Free,
    /// Reading and writing.
    Open,
    /// Closing: flush the queue, then shut down writing.
    Flushing,
    /// Writing shut down; reading (and discarding) until the peer's FIN or the deadline.
    Lingering,
    /// The socket is being closed; the slot is freed once that completes.
    Teardown,
}

/// What a queued frame costs beyond its bytes (its `Bytes` handle, the queue slot and
/// the allocation behind it), counted against `max_outbound_bytes` so that a flood of
/// tiny frames cannot hold many times the bound.
pub const FRAME_OVERHEAD: usize = 64;

/// Frames waiting to be written to one connection. Holds no heap memory while empty.
#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    frames: VecDeque<Bytes>,
    /// Bytes of the first frame already written.
    offset: usize,
    /// Bytes not yet written.
    pub bytes: usize,
    /// Frames covered by the last `iovecs` call: a send in flight points into them.
    pinned: usize,
    /// Frames popped from the front so far, so that `latest` can name a frame by position.
    popped: u64,
    /// The replaceable frame still unsent (`send_latest`), by its number since the start.
    latest: Option<u64>,
}

impl OutQueue {
    pub(crate) fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Pushes `frame` in place of the previous replaceable frame if that one has not
    /// started to go out (`sending`: a send in flight points into the pinned frames).
    fn push_latest(&mut self, frame: Bytes, sending: bool) {
        let untouched = if sending {
            self.pinned
        } else {
            usize::from(self.offset > 0)
        };
        let at = self.latest.map(|n| n.wrapping_sub(self.popped) as usize);
        if let Some(old) = at.filter(|&i| i >= untouched && i < self.frames.len()) {
            self.bytes = self.bytes - self.frames[old].len() + frame.len();
            self.frames[old] = frame;
            return;
        }
        self.latest = Some(self.popped + self.frames.len() as u64);
        self.push(frame);
    }

    /// Bytes counted against the outbound bound: the unwritten bytes plus each frame's
    /// overhead.
    pub(crate) fn cost(&self) -> usize {
        self.bytes + self.frames.len() * FRAME_OVERHEAD
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Up to `max` iovecs covering the unwritten bytes, in order.
    pub fn iovecs(&mut self, out: &mut Vec<libc::iovec>, max: usize) {
        self.pinned = self.frames.len().min(max);
        for (i, f) in self.frames.iter().take(max).enumerate() {
            let skip = if i == 0 { self.offset } else { 0 };
            out.push(libc::iovec {
                iov_base: f[skip..].as_ptr() as *mut libc::c_void,
                iov_len: f.len() - skip,
            });
        }
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let first = self.frames[0].len() - self.offset;
            if n < first {
                self.offset += n;
                return;
            }
            n -= first;
            self.offset = 0;
            self.frames.pop_front();
            self.popped += 1;
        }
        if self.frames.is_empty() {
            // Give the memory back: an idle connection holds no queue.
            self.frames = VecDeque::new();
        }
    }

    pub fn clear(&mut self) {
        *self = OutQueue::default();
    }

    /// Empties the queue, handing over its frames (none of them started).
    pub(crate) fn take_frames(&mut self) -> VecDeque<Bytes> {
        std::mem::take(self).frames
    }

    /// Drops every frame not started yet. Kept whole: the frames a send in flight points
    /// into (`sending`), and a frame already partly written, since cutting it would
    /// leave the peer a stream it cannot parse.
    pub fn discard_unsent(&mut self, sending: bool) {
        let keep = if sending {
            self.pinned
        } else {
            usize::from(self.offset > 0)
        };
        let keep = keep.min(self.frames.len());
        let dropped: usize = self.frames.drain(keep..).map(|f| f.len()).sum();
        self.bytes -= dropped;
        self.latest = self
            .latest
            .filter(|n| n.wrapping_sub(self.popped) < keep as u64);
        if self.frames.is_empty() {
            self.clear();
        }
    }
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub gen: u32,
    pub state: State,
    /// The socket: a direct descriptor index (io_uring) or a file descriptor (epoll).
    pub fd: i32,
    pub out: OutQueue,
    pub dirty: bool,
    /// Listed in `Conns::overflowed`: its queue passed the cap.
    pub overflowed: bool,
    /// A send is in flight (io_uring): its iovecs point into `out`.
    pub sending: bool,
    /// io_uring: a multishot receive is armed / a shutdown is in flight / the close was
    /// submitted. A direct descriptor is closed only once nothing else refers to it, since
    /// the kernel may resolve an operation's descriptor index late and the index is
    /// reused by the next accept.
    pub recv_armed: bool,
    pub shutting: bool,
    pub close_sent: bool,
    /// TLS on this connection: `out` then holds the frames until they are sealed.
    pub(crate) tls: Option<Box<super::tls::Tls>>,
}

/// All connections of one worker.
#[derive(Debug)]
pub struct Conns {
    slots: Vec<Slot>,
    free: Vec<u32>,
    dirty: Vec<u32>,
    /// Connections whose queue passed `max_outbound` since the owner last looked; each
    /// listed once.
    overflowed: Vec<ConnId>,
    /// Connections waiting to be forced shut, in deadline order.
    lingering: VecDeque<(Instant, ConnId)>,
    max_outbound: usize,
    live: usize,
}

impl Conns {
    pub fn new(max_outbound: usize) -> Conns {
        Conns {
            slots: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            overflowed: Vec::new(),
            lingering: VecDeque::new(),
            max_outbound,
            live: 0,
        }
    }

    /// Queues a frame; it is written at the end of this loop turn together with the
    /// connection's other queued frames. `false`: the connection is closing or gone, or
    /// its queue already passed the cap, and nothing was queued. A queue that passes the
    /// cap puts the connection on the overflow list (`pop_overflowed`); until its owner
    /// discards what is queued, nothing more is taken, so that a burst handled in one loop
    /// turn (a backlog of other workers' deliveries) cannot pile up on a connection that
    /// will be closed anyway.
    pub fn send(&mut self, id: ConnId, frame: Bytes) -> bool {
        self.queue(id, frame, false)
    }

    /// Queues a frame that supersedes the previous one queued this way, if that one is
    /// still unsent (a pong answering the latest of many pings).
    pub fn send_latest(&mut self, id: ConnId, frame: Bytes) -> bool {
        self.queue(id, frame, true)
    }

    fn queue(&mut self, id: ConnId, frame: Bytes, latest: bool) -> bool {
        let max = self.max_outbound;
        let Some(slot) = self.open_slot(id) else {
            return false;
        };
        if slot.overflowed {
            return false;
        }
        if latest {
            // With TLS no send points into the frames (they are sealed into records).
            slot.out
                .push_latest(frame, slot.sending && slot.tls.is_none());
        } else {
            slot.out.push(frame);
        }
        let over = slot.cost() > max && !slot.overflowed;
        if over {
            slot.overflowed = true;
        }
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(id.slot);
        }
        if over {
            self.overflowed.push(id);
        }
        true
    }

    /// A connection whose outbound queue passed the cap: the owner closes it (1013).
    pub fn pop_overflowed(&mut self) -> Option<ConnId> {
        self.overflowed.pop()
    }

    /// Closes gracefully: what is queued is written, then writing is shut down and the
    /// socket closed once the peer closes too (or after `LINGER`).
    pub fn close(&mut self, id: ConnId, now: Instant) {
        let Some(slot) = self.open_slot(id) else {
            return;
        };
        slot.state = State::Flushing;
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(id.slot);
        }
        self.lingering.push_back((now + super::LINGER, id));
    }

    /// Drops what is queued and not started (a consumer too slow to take it) so that
    /// what is queued next, such as a close frame, follows right after.
    pub fn discard_queued(&mut self, id: ConnId) {
        if let Some(slot) = self.open_slot(id) {
            // With TLS no send points into the frames (they are sealed into records).
            slot.out.discard_unsent(slot.sending && slot.tls.is_none());
            slot.overflowed = false;
        }
    }

    /// Whether `id` is open for reading and writing.
    pub fn is_open(&self, id: ConnId) -> bool {
        matches!(self.slots.get(id.slot as usize), Some(s) if s.gen == id.gen && s.state == State::Open)
    }

    /// Connections in the table, closing ones included.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bytes queued and not yet written to `id`.
    pub fn queued_bytes(&self, id: ConnId) -> usize {
        self.get(id).map_or(0, Slot::queued)
    }

    fn open_slot(&mut self, id: ConnId) -> Option<&mut Slot> {
        self.get_mut(id).filter(|s| s.state == State::Open)
    }

    // Backend side.

    pub(crate) fn insert(&mut self, fd: i32) -> ConnId {
        self.live += 1;
        let fresh = |gen| Slot {
            gen,
            state: State::Open,
            fd,
            out: OutQueue::default(),
            dirty: false,
            overflowed: false,
            sending: false,
            recv_armed: false,
            shutting: false,
            close_sent: false,
            tls: None,
        };
        if let Some(i) = self.free.pop() {
            let slot = &mut self.slots[i as usize];
            *slot = fresh(slot.gen.wrapping_add(1));
            return ConnId {
                slot: i,
                gen: slot.gen,
            };
        }
        self.slots.push(fresh(0));
        ConnId {
            slot: self.slots.len() as u32 - 1,
            gen: 0,
        }
    }

    pub(crate) fn get(&self, id: ConnId) -> Option<&Slot> {
        self.slots
            .get(id.slot as usize)
            .filter(|s| s.gen == id.gen && s.state != State::Free)
    }

    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut Slot> {
        self.slots
            .get_mut(id.slot as usize)
            .filter(|s| s.gen == id.gen && s.state != State::Free)
    }

    /// The live connection in `slot` whose generation's low 24 bits are `gen24`
    /// (io_uring tags carry only those).
    pub(crate) fn find_tagged(&self, slot: u32, gen24: u32) -> Option<ConnId> {
        let s = self.slots.get(slot as usize)?;
        (s.state != State::Free && s.gen & 0x00ff_ffff == gen24)
            .then_some(ConnId { slot, gen: s.gen })
    }

    pub(crate) fn mark_dirty(&mut self, id: ConnId) {
        if let Some(slot) = self.get_mut(id) {
            if !slot.dirty {
                slot.dirty = true;
                self.dirty.push(id.slot);
            }
        }
    }

    pub(crate) fn id_of(&self, slot: u32) -> ConnId {
        ConnId {
            slot,
            gen: self.slots[slot as usize].gen,
        }
    }

    /// Frees the slot (after `on_close`).
    pub(crate) fn remove(&mut self, id: ConnId) {
        if let Some(slot) = self.get_mut(id) {
            slot.state = State::Free;
            slot.out.clear();
            slot.tls = None;
            slot.fd = -1;
            self.live -= 1;
            self.free.push(id.slot);
        }
    }

    /// The slots marked dirty since the last call (the caller hands the Vec back).
    pub(crate) fn take_dirty(&mut self, into: &mut Vec<u32>) {
        std::mem::swap(&mut self.dirty, into);
        for &s in into.iter() {
            self.slots[s as usize].dirty = false;
        }
    }

    /// Connections whose linger deadline passed.
    pub(crate) fn pop_expired_linger(&mut self, now: Instant) -> Option<ConnId> {
        while let Some(&(deadline, id)) = self.lingering.front() {
            if deadline > now {
                return None;
            }
            self.lingering.pop_front();
            if matches!(self.get(id), Some(s) if matches!(s.state, State::Flushing | State::Lingering))
            {
                return Some(id);
            }
        }
        None
    }

    /// Registers an open connection with no socket behind it (fd -1), so benchmarks can
    /// drive the queueing path without a backend.
    #[doc(hidden)]
    pub fn insert_for_bench(&mut self) -> ConnId {
        self.insert(-1)
    }

    /// Drains every dirty connection's queue as a backend flush does when the socket
    /// takes every byte (gather up to `max_iovecs` iovecs, then advance), minus the
    /// syscall. Returns the bytes drained. For benchmarks.
    #[doc(hidden)]
    pub fn drain_for_bench(
        &mut self,
        dirty: &mut Vec<u32>,
        iov: &mut Vec<libc::iovec>,
        max_iovecs: usize,
    ) -> usize {
        self.take_dirty(dirty);
        let mut drained = 0;
        for &slot in dirty.iter() {
            let out = &mut self.slots[slot as usize].out;
            while !out.is_empty() {
                iov.clear();
                out.iovecs(iov, max_iovecs.max(1));
                let n: usize = iov.iter().map(|v| v.iov_len).sum();
                out.advance(n);
                drained += n;
            }
        }
        dirty.clear();
        drained
    }

    /// Every connection currently open (for draining and shutdown).
    pub fn open_ids(&self) -> Vec<ConnId> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == State::Open)
            .map(|(i, s)| ConnId {
                slot: i as u32,
                gen: s.gen,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_advances_across_frames_and_frees_memory() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"defg"));
        let mut v = Vec::new();
        q.iovecs(&mut v, 8);
        assert_eq!(v.len(), 2);
        q.advance(4);
        assert_eq!(q.bytes, 3);
        v.clear();
        q.iovecs(&mut v, 8);
        assert_eq!(v[0].iov_len, 3);
        q.advance(3);
        assert!(q.is_empty());
        assert_eq!(q.frames.capacity(), 0);
    }

    #[test]
    fn discarding_keeps_a_partly_written_frame_whole() {
        let mut q = OutQueue::default();
        for f in [&b"first"[..], b"second", b"third"] {
            q.push(Bytes::from_static(f));
        }
        q.advance(2);
        q.discard_unsent(false);
        q.push(Bytes::from_static(b"close"));
        let mut v = Vec::new();
        q.iovecs(&mut v, 8);
        let sent: Vec<u8> = v
            .iter()
            // SAFETY: the iovecs point into frames `q` holds.
            .flat_map(|io| unsafe {
                std::slice::from_raw_parts(io.iov_base as *const u8, io.iov_len)
            })
            .copied()
            .collect();
        assert_eq!(sent, b"rstclose");
        assert_eq!(q.bytes, 8);
    }

    #[test]
    fn discarding_keeps_the_frames_of_a_send_in_flight() {
        let mut q = OutQueue::default();
        for f in [&b"aa"[..], b"bb", b"cc", b"dd"] {
            q.push(Bytes::from_static(f));
        }
        let mut v = Vec::new();
        q.iovecs(&mut v, 2);
        q.discard_unsent(true);
        assert_eq!((q.frames.len(), q.bytes), (2, 4));
        // Nothing started and nothing in flight: everything goes.
        q.advance(4);
        q.push(Bytes::from_static(b"ee"));
        q.discard_unsent(false);
        assert!(q.is_empty());
        assert_eq!(q.frames.capacity(), 0);
    }

    #[test]
    fn stale_ids_are_rejected_after_reuse() {
        let mut c = Conns::new(100);
        let a = c.insert(7);
        c.remove(a);
        let b = c.insert(8);
        assert_eq!(a.slot, b.slot);
        assert!(!c.send(a, Bytes::from_static(b"x")));
        assert!(c.send(b, Bytes::from_static(b"x")));
        assert_eq!(c.pop_overflowed(), None);
        // 2 bytes, but two frames: over 100 with their overhead.
        assert!(c.send(b, Bytes::from_static(b"y")));
        assert_eq!(c.pop_overflowed(), Some(b));
    }

    #[test]
    fn an_overflowed_queue_takes_nothing_more_until_discarded() {
        let mut c = Conns::new(1000);
        let a = c.insert(7);
        let frame = Bytes::from(vec![0u8; 600]);
        assert!(c.send(a, frame.clone()));
        assert!(c.send(a, frame.clone()));
        // A burst of a thousand more frames in the same turn holds no more memory.
        for _ in 0..1000 {
            assert!(!c.send(a, frame.clone()));
        }
        assert_eq!(c.queued_bytes(a), 1200);
        assert_eq!(c.pop_overflowed(), Some(a));
        // The owner discards the backlog; the close frame then goes out.
        c.discard_queued(a);
        assert!(c.send(a, Bytes::from_static(b"close")));
        assert_eq!(c.queued_bytes(a), 5);
    }

    #[test]
    fn a_connection_passing_the_cap_is_listed_once() {
        let mut c = Conns::new(200);
        let (a, b) = (c.insert(7), c.insert(8));
        assert!(c.send(a, Bytes::from_static(&[0; 100])));
        assert_eq!(c.pop_overflowed(), None);
        // The frame that passes the cap is queued; nothing more until the owner acts.
        assert!(c.send(a, Bytes::from_static(b"x")));
        for _ in 0..2 {
            assert!(!c.send(a, Bytes::from_static(b"x")));
        }
        assert!(c.send(b, Bytes::from_static(&[0; 137])));
        assert_eq!(c.pop_overflowed(), Some(b));
        assert_eq!(c.pop_overflowed(), Some(a));
        assert_eq!(c.pop_overflowed(), None);
        // The slot's next connection starts with a clean record.
        c.remove(a);
        let a2 = c.insert(9);
        assert!(c.send(a2, Bytes::from_static(&[0; 137])));
        assert_eq!(c.pop_overflowed(), Some(a2));
    }

    #[test]
    fn one_unsent_pong_at_most() {
        let mut c = Conns::new(1 << 20);
        let a = c.insert(7);
        c.send(a, Bytes::from_static(b"event"));
        for _ in 0..10_000 {
            assert!(c.send_latest(a, Bytes::from_static(b"pong1")));
        }
        c.send(a, Bytes::from_static(b"event"));
        assert!(c.send_latest(a, Bytes::from_static(b"pong2")));
        let q = &c.get(a).unwrap().out;
        // The newest payload took the place of the older pong.
        assert_eq!(q.frames, [&b"event"[..], b"pong2", b"event"]);
        assert_eq!(q.bytes, 15);
    }

    #[test]
    fn a_pong_that_started_to_go_out_is_not_replaced() {
        let mut q = OutQueue::default();
        q.push_latest(Bytes::from_static(b"p1"), false);
        let mut v = Vec::new();
        q.iovecs(&mut v, 8);
        // In flight: a new pong queues behind it.
        q.push_latest(Bytes::from_static(b"p2"), true);
        q.push_latest(Bytes::from_static(b"p3"), true);
        assert_eq!(q.frames, [&b"p1"[..], b"p3"]);
        // Partly written: the same.
        q.advance(1);
        q.push_latest(Bytes::from_static(b"p4"), false);
        assert_eq!(q.frames, [&b"p1"[..], b"p4"]);
        // Written: the next pong is queued anew, and replaces only itself.
        q.advance(3);
        q.push_latest(Bytes::from_static(b"p5"), false);
        q.push_latest(Bytes::from_static(b"p6"), false);
        assert_eq!(q.frames, [&b"p6"[..]]);
        q.discard_unsent(false);
        q.push_latest(Bytes::from_static(b"p7"), false);
        assert_eq!((q.frames.len(), q.bytes), (1, 2));
    }

    #[test]
    fn a_reused_slot_starts_clean() {
        let mut c = Conns::new(10);
        let a = c.insert(7);
        let s = c.get_mut(a).unwrap();
        (s.sending, s.recv_armed, s.shutting, s.close_sent) = (true, true, true, true);
        c.remove(a);
        let b = c.insert(8);
        let s = c.get(b).unwrap();
        assert!(!s.sending && !s.recv_armed && !s.shutting && !s.close_sent);
        assert_eq!((s.fd, s.state), (8, State::Open));
    }

    #[test]
    fn bench_drain_empties_every_dirty_queue() {
        let mut c = Conns::new(1 << 20);
        let ids: Vec<ConnId> = (0..3).map(|_| c.insert_for_bench()).collect();
        for _ in 0..5 {
            for &id in &ids {
                c.send(id, Bytes::from_static(b"frame"));
            }
        }
        let (mut dirty, mut iov) = (Vec::new(), Vec::new());
        assert_eq!(c.drain_for_bench(&mut dirty, &mut iov, 2), 3 * 5 * 5);
        assert!(ids.iter().all(|&id| c.queued_bytes(id) == 0));
        assert_eq!(c.drain_for_bench(&mut dirty, &mut iov, 2), 0);
    }
}
