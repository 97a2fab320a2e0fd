//! The connection table both io backends share: slots with generations, bounded outbound
//! queues of shared frames, and the list of connections with bytes to flush this turn.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

/// A connection's handle: slot index and generation, so a stale handle to a reused slot
/// is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub slot: u32,
    pub gen: u32,
}

impl ConnId {
    pub fn to_u64(self) -> u64 {
        (u64::from(self.gen) << 32) | u64::from(self.slot)
    }

    pub fn from_u64(v: u64) -> ConnId {
        ConnId {
            slot: v as u32,
            gen: (v >> 32) as u32,
        }
    }
}

/// Values kept per connection, indexed by slot: no hashing, and no table slack since
/// slots are reused densely. Each value is boxed so that slots of other connections
/// (clients of a table of agents) cost two words.
#[derive(Debug)]
pub struct ConnMap<T> {
    slots: Vec<Option<(u32, Box<T>)>>,
}

impl<T> Default for ConnMap<T> {
    fn default() -> Self {
        ConnMap { slots: Vec::new() }
    }
}

impl<T> ConnMap<T> {
    pub fn insert(&mut self, id: ConnId, value: T) {
        let slot = id.slot as usize;
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        self.slots[slot] = Some((id.gen, Box::new(value)));
    }

    pub fn remove(&mut self, id: ConnId) -> Option<T> {
        let entry = self.slots.get_mut(id.slot as usize)?;
        match entry {
            Some((gen, _)) if *gen == id.gen => entry.take().map(|(_, v)| *v),
            _ => None,
        }
    }

    pub fn get(&self, id: ConnId) -> Option<&T> {
        match self.slots.get(id.slot as usize)? {
            Some((gen, v)) if *gen == id.gen => Some(v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        match self.slots.get_mut(id.slot as usize)? {
            Some((gen, v)) if *gen == id.gen => Some(v),
            _ => None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (ConnId, &T)> {
        self.slots.iter().enumerate().filter_map(|(slot, e)| {
            e.as_ref().map(|(gen, v)| {
                (
                    ConnId {
                        slot: slot as u32,
                        gen: *gen,
                    },
                    &**v,
                )
            })
        })
    }
}

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

/// The outcome of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Ok,
    /// Queued, but the connection's outbound bytes now exceed the cap: close it (1013).
    Overflow,
    /// The connection is closing or gone; nothing was queued.
    Gone,
}

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
}

impl OutQueue {
    pub(crate) fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
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
            lingering: VecDeque::new(),
            max_outbound,
            live: 0,
        }
    }

    /// Queues a frame; it is written at the end of this loop turn together with the
    /// connection's other queued frames.
    pub fn send(&mut self, id: ConnId, frame: Bytes) -> Queued {
        let max = self.max_outbound;
        let Some(slot) = self.open_slot(id) else {
            return Queued::Gone;
        };
        slot.out.push(frame);
        let over = slot.queued() > max;
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(id.slot);
        }
        if over {
            Queued::Overflow
        } else {
            Queued::Ok
        }
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
    fn conn_map_answers_only_for_the_same_generation() {
        let mut m = ConnMap::default();
        let a = ConnId { slot: 3, gen: 1 };
        let reused = ConnId { slot: 3, gen: 2 };
        m.insert(a, "a");
        assert_eq!(m.get(a), Some(&"a"));
        assert_eq!(m.get(reused), None);
        assert_eq!(m.get(ConnId { slot: 9, gen: 1 }), None);
        assert_eq!(m.remove(reused), None);
        *m.get_mut(a).unwrap() = "b";
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(a, &"b")]);
        assert_eq!(m.remove(a), Some("b"));
        assert_eq!(m.get(a), None);
        m.insert(reused, "c");
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(reused, &"c")]);
    }

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
        let mut c = Conns::new(10);
        let a = c.insert(7);
        c.remove(a);
        let b = c.insert(8);
        assert_eq!(a.slot, b.slot);
        assert_eq!(c.send(a, Bytes::from_static(b"x")), Queued::Gone);
        assert_eq!(c.send(b, Bytes::from_static(b"x")), Queued::Ok);
        assert_eq!(c.send(b, Bytes::from_static(&[0; 10])), Queued::Overflow);
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
