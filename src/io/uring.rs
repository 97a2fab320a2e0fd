//! The io_uring loop: multishot accept into direct descriptors, multishot bundle recv
//! from a provided-buffer ring, one corked `sendmsg` per dirty connection per turn.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Instant;

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

use super::conns::{ConnId, Conns, State};
use super::{sleep_for, Handler, Notifier};

// Operation kinds, in the top byte of user_data; the rest is the connection's id.
const OP_ACCEPT: u8 = 1;
const OP_RECV: u8 = 2;
const OP_SEND: u8 = 3;
const OP_SHUTDOWN: u8 = 4;
const OP_CLOSE: u8 = 5;
const OP_CANCEL: u8 = 6;
const OP_WAKE: u8 = 7;

const BUF_GROUP: u16 = 0;
const BUF_COUNT: u16 = 1024;
const BUF_SIZE: usize = 2048;
/// Buffers put in circulation at first and each time the ring runs dry: memory is
/// touched (and counts in RSS) only up to the largest burst seen, not all of BUF_COUNT.
const BUF_STEP: u16 = 64;
const MAX_IOVECS: usize = 64;
/// Idle send descriptors kept for reuse; a burst needing more allocates and frees them.
const SEND_POOL: usize = 256;

fn tag(op: u8, id: ConnId) -> u64 {
    (u64::from(op) << 56) | (u64::from(id.gen & 0x00ff_ffff) << 32) | u64::from(id.slot)
}

fn untag(data: u64) -> (u8, u32, u32) {
    (
        (data >> 56) as u8,
        ((data >> 32) & 0x00ff_ffff) as u32,
        data as u32,
    )
}

/// The most entries one registered file table may have (the kernel's
/// `IORING_MAX_FIXED_FILES`); a larger request fails with EINVAL.
const MAX_FILE_TABLE: usize = 1 << 20;
const RING_ENTRIES: u32 = 4096;

/// The direct-descriptor table for `want` connections: at most what one table may hold
/// and what the open-files limit allows (the kernel refuses more with EMFILE).
pub fn file_table_size(want: usize, nofile: usize) -> u32 {
    want.min(MAX_FILE_TABLE).min(nofile).max(1) as u32
}

/// Names a failed setup step, its errno and what to do, for the operator's log.
fn step_failed<'a>(what: &'a str, needs: &'a str) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| {
        let why = match e.raw_os_error() {
            Some(libc::EINVAL) => "EINVAL".to_string(),
            Some(libc::ENOSYS) => "ENOSYS: no io_uring in this kernel, or a seccomp filter".into(),
            Some(libc::EPERM) => "EPERM: kernel.io_uring_disabled, or a seccomp filter".into(),
            Some(libc::EMFILE) => "EMFILE: over the open-files limit".into(),
            _ => e.to_string(),
        };
        let msg = format!(
            "io_uring setup failed: {what} {needs} ({why}); run with --io epoll or upgrade the kernel"
        );
        io::Error::new(e.kind(), msg)
    }
}

/// Builds the ring exactly as the loop uses it: its flags, a sparse direct-descriptor
/// table of `table` entries and the provided-buffer ring.
fn setup(table: u32) -> io::Result<(IoUring, BufRing)> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_cqsize(16384)
        .build(RING_ENTRIES)
        .map_err(step_failed(
            "ring flags SINGLE_ISSUER|COOP_TASKRUN",
            "need Linux 6.0+",
        ))?;
    ring.submitter()
        .register_files_sparse(table)
        .map_err(step_failed(
            &format!("a sparse file table of {table} entries"),
            "needs Linux 5.19+",
        ))?;
    let bufs = BufRing::new(&ring)
        .map_err(step_failed("the provided-buffer ring", "needs Linux 5.19+"))?;
    Ok((ring, bufs))
}

/// Whether this loop can run here: builds (and tears down) the very ring `UringLoop::new`
/// builds, so that `--io auto` falls back before anything listens instead of failing in
/// the workers. The ring's flags need 6.0, which has multishot accept (5.19) and
/// multishot recv (6.0); the opcodes are checked too, for kernels that disable some.
pub fn probe(table: u32) -> io::Result<()> {
    let (ring, _bufs) = setup(table)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(step_failed("the opcode probe", "needs Linux 5.6+"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::PollAdd::CODE, "poll_add"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring setup failed: the kernel does not offer the {name} opcode; run with --io epoll"),
            ));
        }
    }
    Ok(())
}

/// The provided buffers multishot receives draw from.
struct BufRing {
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    mem: Vec<u8>,
    /// The buffer id pushed at each ring position, and each buffer's position: a bundle
    /// receive names only its first buffer and fills the ring entries that follow it.
    order: Box<[u16]>,
    pos: Box<[u16]>,
    tail: u16,
    /// Buffers in circulation (ids `0..provided`).
    provided: u16,
    /// A receive found no buffer since the last `publish`.
    starved: bool,
}

impl BufRing {
    fn new(uring: &IoUring) -> io::Result<BufRing> {
        let ring_layout = Layout::from_size_align(
            usize::from(BUF_COUNT) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .expect("valid layout");
        // SAFETY: non-zero size layout.
        let ring = unsafe { alloc_zeroed(ring_layout) } as *mut BufRingEntry;
        if ring.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut br = BufRing {
            ring,
            ring_layout,
            mem: vec![0; usize::from(BUF_COUNT) * BUF_SIZE],
            order: vec![0; usize::from(BUF_COUNT)].into(),
            pos: vec![0; usize::from(BUF_COUNT)].into(),
            tail: 0,
            provided: 0,
            starved: false,
        };
        // SAFETY: the ring memory lives as long as `br`, which outlives the registration
        // (the uring is dropped first, see UringLoop's field order).
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, BUF_COUNT, BUF_GROUP, 0)?;
        }
        br.grow();
        br.publish();
        Ok(br)
    }

    /// Puts `BUF_STEP` more buffers in circulation (published with the next `publish`).
    fn grow(&mut self) {
        let more = BUF_STEP.min(BUF_COUNT - self.provided);
        for bid in self.provided..self.provided + more {
            self.push(bid);
        }
        self.provided += more;
    }

    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (BUF_COUNT - 1));
        self.order[idx] = bid;
        self.pos[usize::from(bid)] = idx as u16;
        // SAFETY: idx < BUF_COUNT entries of the ring allocation.
        let entry = unsafe { &mut *self.ring.add(idx) };
        entry.set_addr(self.mem[usize::from(bid) * BUF_SIZE..].as_ptr() as u64);
        entry.set_len(BUF_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Hands the returned buffers back to the kernel, with one more step of them if a
    /// receive went without since the last time.
    fn publish(&mut self) {
        if std::mem::take(&mut self.starved) {
            self.grow();
        }
        // SAFETY: the tail field lives in the first entry, which the kernel reads atomically.
        let tail = unsafe { &*(BufRingEntry::tail(self.ring) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The buffers a receive of `len` bytes starting in buffer `first` filled, in order,
    /// with the bytes in each (every one full but the last).
    fn filled(&self, first: u16, len: usize, into: &mut Vec<(u16, usize)>) {
        let at = self.pos[usize::from(first)];
        into.extend((0..len.div_ceil(BUF_SIZE)).map(|k| {
            let idx = at.wrapping_add(k as u16) & (BUF_COUNT - 1);
            (
                self.order[usize::from(idx)],
                BUF_SIZE.min(len - k * BUF_SIZE),
            )
        }));
    }

    fn buf(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = usize::from(bid) * BUF_SIZE;
        &mut self.mem[start..start + len]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ring.cast(), self.ring_layout) };
    }
}

/// One in-flight sendmsg: its header and iovecs must stay put until it completes.
struct SendOp {
    hdr: libc::msghdr,
    iov: Vec<libc::iovec>,
}

/// One worker's io_uring loop.
pub struct UringLoop {
    ring: IoUring,
    bufs: BufRing,
    /// Dropped when the handler stops accepting, so that the port's other listeners (a
    /// newer process with `SO_REUSEPORT`) get the new connections.
    listener: Option<TcpListener>,
    notifier: std::sync::Arc<Notifier>,
    sends: Vec<Option<Box<SendOp>>>,
    // Boxed: a send's header must not move while the kernel reads it.
    #[allow(clippy::vec_box)]
    send_pool: Vec<Box<SendOp>>,
    accept_armed: bool,
    accept_cancelled: bool,
    completions: Vec<(u64, i32, u32)>,
    /// The buffers of the receive completion being handled.
    pieces: Vec<(u16, usize)>,
    /// Receives take as many buffers as the socket has data for (kernel 6.10+).
    bundle: bool,
    dirty: Vec<u32>,
}

impl UringLoop {
    /// A ring for `listener` whose direct-descriptor table holds `table` sockets
    /// (see `file_table_size`).
    pub fn new(
        listener: TcpListener,
        notifier: std::sync::Arc<Notifier>,
        table: u32,
    ) -> io::Result<UringLoop> {
        let (ring, bufs) = setup(table)?;
        let bundle = ring.params().is_feature_recvsend_bundle();
        Ok(UringLoop {
            ring,
            bufs,
            listener: Some(listener),
            notifier,
            sends: Vec::new(),
            send_pool: Vec::new(),
            accept_armed: false,
            accept_cancelled: false,
            completions: Vec::with_capacity(1024),
            pieces: Vec::new(),
            bundle,
            dirty: Vec::new(),
        })
    }

    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every buffer an entry points to (buffer ring, send ops, wake buffer)
            // outlives its operation.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed");
            }
        }
    }

    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let sqe = opcode::AcceptMulti::new(Fd(listener.as_raw_fd()))
            .allocate_file_index(true)
            .build()
            .user_data(tag(OP_ACCEPT, ConnId { slot: 0, gen: 0 }));
        self.push(sqe);
        self.accept_armed = true;
    }

    fn arm_recv(&mut self, conns: &mut Conns, id: ConnId, fd: i32) {
        if let Some(s) = conns.get_mut(id) {
            s.recv_armed = true;
        }
        let sqe = if self.bundle {
            opcode::RecvMultiBundle::new(Fixed(fd as u32), BUF_GROUP).build()
        } else {
            opcode::RecvMulti::new(Fixed(fd as u32), BUF_GROUP).build()
        };
        let sqe = sqe.user_data(tag(OP_RECV, id));
        self.push(sqe);
    }

    /// A multishot poll on the notifier's eventfd (non-blocking, so a read op would
    /// just fail with EAGAIN).
    fn arm_wake(&mut self) {
        let sqe = opcode::PollAdd::new(Fd(self.notifier.fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(tag(OP_WAKE, ConnId { slot: 0, gen: 0 }));
        self.push(sqe);
    }

    /// Runs until the handler says it is finished.
    pub fn run<H: Handler>(&mut self, conns: &mut Conns, handler: &mut H) -> io::Result<()> {
        self.arm_accept();
        self.arm_wake();
        while !handler.finished(conns) {
            let now = Instant::now();
            let wait = sleep_for(now, handler.next_deadline());
            let ts = Timespec::from(wait);
            let args = SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            self.completions.clear();
            self.completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let mut completions = std::mem::take(&mut self.completions);
            for &(data, res, flags) in &completions {
                self.complete(conns, handler, data, res, flags, now);
            }
            completions.clear();
            self.completions = completions;
            self.bufs.publish();

            handler.on_tick(conns, now);
            if !handler.accepting() && self.accept_armed && !self.accept_cancelled {
                self.accept_cancelled = true;
                let sqe = opcode::AsyncCancel::new(tag(OP_ACCEPT, ConnId { slot: 0, gen: 0 }))
                    .build()
                    .user_data(tag(OP_CANCEL, ConnId { slot: 0, gen: 0 }));
                self.push(sqe);
            }
            if !handler.accepting() {
                // The pending accept keeps its own reference until it completes.
                self.listener = None;
            }
            while let Some(id) = conns.pop_expired_linger(now) {
                self.teardown(conns, id);
            }
            self.flush(conns);
        }
        Ok(())
    }

    fn complete<H: Handler>(
        &mut self,
        conns: &mut Conns,
        handler: &mut H,
        data: u64,
        res: i32,
        flags: u32,
        now: Instant,
    ) {
        let (op, gen24, slot) = untag(data);
        let find = |conns: &Conns| conns.find_tagged(slot, gen24);
        match op {
            OP_ACCEPT => {
                if !cqueue::more(flags) {
                    self.accept_armed = false;
                }
                if res >= 0 {
                    let id = conns.insert(res);
                    self.arm_recv(conns, id, res);
                    handler.on_accept(conns, id, now);
                } else if res != -libc::ECANCELED {
                    tracing::debug!(error = %io::Error::from_raw_os_error(-res), "accept failed");
                }
                if !self.accept_armed && handler.accepting() {
                    self.arm_accept();
                }
            }
            OP_RECV => {
                let mut pieces = std::mem::take(&mut self.pieces);
                if let Some(bid) = cqueue::buffer_select(flags) {
                    // At least the first buffer goes back, whatever `res` says.
                    self.bufs.filled(bid, res.max(1) as usize, &mut pieces);
                }
                if let Some(id) = find(conns) {
                    self.received(conns, handler, id, res, flags, &pieces, now);
                }
                for &(bid, _) in &pieces {
                    self.bufs.push(bid);
                }
                pieces.clear();
                self.pieces = pieces;
            }
            OP_SEND => {
                let Some(id) = find(conns) else { return };
                if let Some(op) = self.sends.get_mut(slot as usize).and_then(Option::take) {
                    if self.send_pool.len() < SEND_POOL {
                        self.send_pool.push(op);
                    }
                }
                let s = conns.get_mut(id).expect("found above");
                s.sending = false;
                match s.state {
                    State::Teardown => self.close_when_idle(conns, id),
                    _ if res < 0 => self.teardown(conns, id),
                    _ => {
                        s.wire().advance(res as usize);
                        if s.unsent() || s.state == State::Flushing {
                            conns.mark_dirty(id);
                        }
                    }
                }
            }
            OP_SHUTDOWN => {
                let Some(id) = find(conns) else { return };
                let s = conns.get_mut(id).expect("found above");
                s.shutting = false;
                if s.state == State::Teardown {
                    self.close_when_idle(conns, id);
                }
            }
            OP_CLOSE => {
                if let Some(id) = find(conns) {
                    self.finish(conns, handler, id, now);
                }
            }
            OP_WAKE => {
                if !cqueue::more(flags) {
                    self.arm_wake();
                }
                self.notifier.drain();
                handler.on_wake(conns, now);
            }
            _ => {}
        }
    }

    /// A receive completion for `id`: data for the session, the end of the stream, or
    /// the end of the multishot (re-armed while the connection lives).
    #[allow(clippy::too_many_arguments)]
    fn received<H: Handler>(
        &mut self,
        conns: &mut Conns,
        handler: &mut H,
        id: ConnId,
        res: i32,
        flags: u32,
        pieces: &[(u16, usize)],
        now: Instant,
    ) {
        let more = cqueue::more(flags);
        if !more {
            if let Some(s) = conns.get_mut(id) {
                s.recv_armed = false;
            }
        }
        let state = conns.get(id).map_or(State::Free, |s| s.state);
        if state == State::Teardown {
            self.close_when_idle(conns, id);
            return;
        }
        if res > 0 {
            for &(bid, len) in pieces {
                // Handling one piece may have closed the connection.
                if conns.get(id).is_none_or(|s| s.state != State::Open) {
                    break;
                }
                handler.on_data(conns, id, self.bufs.buf(bid, len), now);
            }
        } else if res == -libc::ENOBUFS {
            self.bufs.starved = true;
        } else {
            // End of stream, a socket error, or a cancellation.
            self.teardown(conns, id);
            return;
        }
        if !more && conns.get(id).is_some_and(|s| s.state != State::Teardown) {
            let fd = conns.get(id).map_or(-1, |s| s.fd);
            self.arm_recv(conns, id, fd);
        }
    }

    /// Stops the connection: cancels everything in flight on its descriptor; the
    /// descriptor is closed once those operations have completed.
    fn teardown(&mut self, conns: &mut Conns, id: ConnId) {
        let Some(s) = conns.get_mut(id) else { return };
        if s.state == State::Teardown {
            return;
        }
        s.state = State::Teardown;
        let fd = s.fd as u32;
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::fd(Fixed(fd)).all())
            .build()
            .user_data(tag(OP_CANCEL, id));
        self.push(cancel);
        self.close_when_idle(conns, id);
    }

    /// Submits the close of a torn-down connection's descriptor once no operation
    /// refers to it any more.
    fn close_when_idle(&mut self, conns: &mut Conns, id: ConnId) {
        let Some(s) = conns.get_mut(id) else { return };
        if s.sending || s.shutting || s.recv_armed || s.close_sent {
            return;
        }
        s.close_sent = true;
        let close = opcode::Close::new(Fixed(s.fd as u32))
            .build()
            .user_data(tag(OP_CLOSE, id));
        self.push(close);
    }

    fn finish<H: Handler>(&mut self, conns: &mut Conns, handler: &mut H, id: ConnId, now: Instant) {
        handler.on_close(conns, id, now);
        conns.remove(id);
    }

    /// Writes every dirty connection's queue with one sendmsg each.
    fn flush(&mut self, conns: &mut Conns) {
        let mut dirty = std::mem::take(&mut self.dirty);
        conns.take_dirty(&mut dirty);
        for &slot in &dirty {
            let id = conns.id_of(slot);
            let Some(s) = conns.get_mut(id) else { continue };
            if s.sending || !matches!(s.state, State::Open | State::Flushing) {
                continue;
            }
            s.seal();
            if s.wire().is_empty() {
                if s.state == State::Flushing {
                    s.state = State::Lingering;
                    s.shutting = true;
                    let fd = s.fd as u32;
                    let sqe = opcode::Shutdown::new(Fixed(fd), libc::SHUT_WR)
                        .build()
                        .user_data(tag(OP_SHUTDOWN, id));
                    self.push(sqe);
                }
                continue;
            }
            let mut op = self.send_pool.pop().unwrap_or_else(|| {
                Box::new(SendOp {
                    // SAFETY: an all-zero msghdr is valid.
                    hdr: unsafe { std::mem::zeroed() },
                    // Grows to what the connection's queue needs (usually one frame).
                    iov: Vec::new(),
                })
            });
            op.iov.clear();
            s.wire().iovecs(&mut op.iov, MAX_IOVECS);
            op.hdr.msg_iov = op.iov.as_mut_ptr();
            op.hdr.msg_iovlen = op.iov.len();
            s.sending = true;
            let sqe = opcode::SendMsg::new(Fixed(s.fd as u32), &op.hdr)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
                .user_data(tag(OP_SEND, id));
            if self.sends.len() <= slot as usize {
                self.sends.resize_with(slot as usize + 1, || None);
            }
            self.sends[slot as usize] = Some(op);
            self.push(sqe);
        }
        dirty.clear();
        self.dirty = dirty;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_table_fits_the_kernel_and_the_open_files_limit() {
        // LimitNOFILE=infinity: far more than one table may hold.
        assert_eq!(file_table_size(usize::MAX - 128, usize::MAX), 1 << 20);
        assert_eq!(file_table_size(5_000, 1_000), 1_000);
        assert_eq!(file_table_size(900, 1_024), 900);
        assert_eq!(file_table_size(0, 1_024), 1);
    }
}
