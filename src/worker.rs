//! One worker: its io loop's handler. Feeds bytes and time to each connection's session,
//! carries out the session's outputs through the hub, and runs the timer wheel.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::auth::Verifier;
use crate::hub::{Hub, COMMAND_TIMER};
use crate::io::{ConnId, Conns, Handler};
use crate::protocol::handshake;
use crate::protocol::session::{Ctx, Limits, Output, Session};
use crate::timer::Wheel;

/// Admission control shared by all workers: the connection cap and the new-connection rate.
pub struct Admission {
    pub open: AtomicUsize,
    pub max_connections: usize,
    /// New connections per second; 0 = off.
    pub rate: u32,
    bucket: Mutex<(f64, Instant)>,
}

impl Admission {
    pub fn new(max_connections: usize, rate: u32) -> Admission {
        Admission {
            open: AtomicUsize::new(0),
            max_connections,
            rate,
            bucket: Mutex::new((f64::from(rate), Instant::now())),
        }
    }

    /// Counts a new connection; `Some(retry_after_secs)` when it must be refused.
    fn admit(&self, now: Instant) -> Option<u32> {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open > self.max_connections {
            return Some(1);
        }
        if self.rate == 0 {
            return None;
        }
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let rate = f64::from(self.rate);
        b.0 = (b.0 + now.saturating_duration_since(b.1).as_secs_f64() * rate).min(rate);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            None
        } else {
            Some(((1.0 - b.0) / rate).ceil().max(1.0) as u32)
        }
    }

    fn release(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Process-wide lifecycle flags.
#[derive(Default)]
pub struct Lifecycle {
    /// Set on SIGTERM/SIGINT: stop accepting, close connections in slices.
    pub draining: AtomicBool,
}

/// What every worker reads and nobody writes on the hot path.
pub struct Env {
    pub limits: Limits,
    pub verifier: Verifier,
    pub admission: Admission,
    pub lifecycle: Lifecycle,
    pub drain_duration: Duration,
    /// Connections of one worker still sending their request head, at most.
    pub max_pending_handshakes: usize,
}

/// Close code and reason for a connection whose outbound queue overflowed.
pub const SLOW_CONSUMER: (u16, &str) = (1013, "outgoing queue full: the client does not keep up");

struct Conn {
    id: ConnId,
    session: Session,
    /// The earliest deadline this connection has in the wheel.
    timer_at: Option<Instant>,
    /// Counted in `Worker::handshaking`.
    handshaking: bool,
}

/// Drain progress: when it began and how many connections there were.
struct Drain {
    started: Instant,
    initial: usize,
    closed: usize,
}

/// One core's handler.
pub struct Worker {
    env: Arc<Env>,
    hub: Hub,
    conns: Vec<Option<Conn>>,
    wheel: Wheel,
    fired: Vec<u64>,
    drain: Option<Drain>,
    /// Connections still in the HTTP handshake.
    handshaking: usize,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Worker {
    pub fn new(env: Arc<Env>, hub: Hub) -> Worker {
        Worker {
            env,
            hub,
            conns: Vec::new(),
            wheel: Wheel::new(Instant::now()),
            fired: Vec::new(),
            drain: None,
            handshaking: 0,
        }
    }

    fn conn_mut(conns: &mut [Option<Conn>], id: ConnId) -> Option<&mut Conn> {
        conns
            .get_mut(id.slot as usize)
            .and_then(Option::as_mut)
            .filter(|c| c.id == id)
    }

    /// Runs one session call with outputs routed through the hub, then retires the
    /// connection if it closed or reschedules its timer.
    fn drive(
        &mut self,
        io: &mut Conns,
        id: ConnId,
        now: Instant,
        call: impl FnOnce(&mut Session, &Ctx, &mut dyn FnMut(Output<'_>)),
    ) {
        let ts = unix_ms();
        let Worker {
            env,
            hub,
            conns,
            wheel,
            handshaking,
            ..
        } = self;
        let Some(conn) = Self::conn_mut(conns, id) else {
            return;
        };
        let ctx = Ctx {
            limits: &env.limits,
            verifier: &env.verifier,
            now,
            unix_ms: ts,
        };
        let mut closed = false;
        let session = &mut conn.session;
        let panicked = {
            let mut out = |o: Output<'_>| match o {
                Output::Send(bytes) => {
                    if io.send(id, bytes) == crate::io::conns::Queued::Overflow {
                        hub.overflowed.push(id);
                    }
                }
                Output::Close => {
                    io.close(id, now);
                    closed = true;
                }
                Output::Online { identity, version } => hub.online(io, id, identity, version, ts),
                Output::Relay {
                    event,
                    machine_id,
                    cluster_id,
                    data,
                    services_only,
                } => hub.relay(io, event, machine_id, cluster_id, data, services_only, ts),
                Output::CommandResponse { cmd_id, data } => {
                    hub.command_response(io, id, cmd_id, data, ts)
                }
                Output::Command {
                    issuer,
                    req_id,
                    machine_id,
                    data,
                } => {
                    if let Some((key, at)) =
                        hub.command(io, id, issuer, req_id, machine_id, data, now, ts)
                    {
                        wheel.insert(at, key);
                    }
                }
                Output::Notify { cluster_id, data } => hub.notify(io, cluster_id, data, ts),
            };
            catch_unwind(AssertUnwindSafe(|| call(session, &ctx, &mut out))).is_err()
        };
        if panicked {
            tracing::error!(
                conn = id.slot,
                "connection handler panicked; closing the connection"
            );
            io.close(id, now);
            closed = true;
        }
        if conn.handshaking && !conn.session.is_handshaking() {
            conn.handshaking = false;
            *handshaking -= 1;
        }
        if closed {
            self.retire(io, id);
        } else if let Some(t) = conn.session.poll_timeout() {
            if conn.timer_at.is_none_or(|cur| t < cur) {
                conn.timer_at = Some(t);
                wheel.insert(t, id.to_u64());
            }
        }
        self.apply_hub_requests(io, now);
    }

    /// The connection's session is done: forget it and tell the hub.
    fn retire(&mut self, io: &mut Conns, id: ConnId) {
        let Some(slot) = self.conns.get_mut(id.slot as usize) else {
            return;
        };
        if slot.as_ref().is_none_or(|c| c.id != id) {
            return;
        }
        let conn = slot.take().expect("checked above");
        if conn.handshaking {
            self.handshaking -= 1;
        }
        if let Some(who) = conn.session.identity() {
            self.hub.offline(io, id, who, unix_ms());
        }
    }

    /// Closes what routing asked to close: replaced agents, slow consumers.
    fn apply_hub_requests(&mut self, io: &mut Conns, now: Instant) {
        while let Some(id) = self.hub.overflowed.pop() {
            self.close_slow_consumer(io, id, now);
        }
        while let Some((id, code, reason)) = self.hub.closes.pop() {
            self.close(io, id, code, reason, now);
        }
    }

    /// The one place a slow consumer is closed (1013): its outbound queue passed
    /// `max_outbound_bytes`. What it has not started to receive is dropped, so that the
    /// close frame goes out next.
    fn close_slow_consumer(&mut self, io: &mut Conns, id: ConnId, now: Instant) {
        // Listed once per frame that found the queue full; closed once.
        if !io.is_open(id) {
            return;
        }
        tracing::debug!(
            worker = self.hub.index,
            conn = id.slot,
            queued = io.queued_bytes(id),
            "slow consumer: closing with 1013"
        );
        io.discard_queued(id);
        let (code, reason) = SLOW_CONSUMER;
        self.close(io, id, code, reason, now);
    }

    fn close(&mut self, io: &mut Conns, id: ConnId, code: u16, reason: &'static str, now: Instant) {
        self.drive(io, id, now, |s, ctx, out| {
            s.close(ctx, code, reason, &mut |o| out(o))
        });
    }

    fn run_timers(&mut self, io: &mut Conns, now: Instant) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expire(now, &mut fired);
        for &key in &fired {
            if key & COMMAND_TIMER != 0 {
                self.hub
                    .command_timed_out(io, key & !COMMAND_TIMER, unix_ms());
                continue;
            }
            let id = ConnId::from_u64(key);
            let Some(conn) = Self::conn_mut(&mut self.conns, id) else {
                continue;
            };
            if conn.timer_at.is_some_and(|t| t <= now) {
                conn.timer_at = None;
                self.drive(io, id, now, |s, ctx, out| {
                    s.handle_timeout(ctx, &mut |o| out(o))
                });
            }
        }
        fired.clear();
        self.fired = fired;
        self.apply_hub_requests(io, now);
    }

    /// Closes connections with 1012 in slices spread over the drain duration.
    fn drain_step(&mut self, io: &mut Conns, now: Instant) {
        if self.drain.is_none() {
            if !self.env.lifecycle.draining.load(Ordering::Relaxed) {
                return;
            }
            self.drain = Some(Drain {
                started: now,
                initial: io.open_ids().len(),
                closed: 0,
            });
        }
        let d = self.drain.as_ref().expect("set above");
        let total = self.env.drain_duration.as_secs_f64().max(0.001);
        let share = (now.saturating_duration_since(d.started).as_secs_f64() / total).min(1.0);
        let target = (d.initial as f64 * share).ceil() as usize;
        if target <= d.closed {
            return;
        }
        let ids = io.open_ids();
        let n = (target - d.closed).min(ids.len());
        for &id in ids.iter().take(n) {
            self.close(
                io,
                id,
                1012,
                "the gateway restarts; reconnect with backoff",
                now,
            );
        }
        if let Some(d) = self.drain.as_mut() {
            d.closed += n;
            if ids.len() == n {
                d.closed = d.initial.max(d.closed);
            }
        }
    }
}

impl Handler for Worker {
    fn on_accept(&mut self, io: &mut Conns, id: ConnId, now: Instant) {
        let mut reject = self.env.admission.admit(now);
        tracing::debug!(
            worker = self.hub.index,
            conn = id.slot,
            refused = reject.is_some(),
            "connection accepted"
        );
        if self.drain.is_some() {
            reject = Some(1);
        }
        let slot = id.slot as usize;
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        if self.handshaking >= self.env.max_pending_handshakes {
            // Too many heads still arriving: answer at once, without reading this one,
            // so that slow or silent peers cannot hold more than the cap.
            self.conns[slot] = None;
            let msg = "too many connections in the handshake; retry later";
            io.send(id, handshake::service_unavailable(1, msg));
            io.close(id, now);
            return;
        }
        self.handshaking += 1;
        let session = Session::new(now, &self.env.limits, reject);
        self.conns[slot] = Some(Conn {
            id,
            session,
            timer_at: None,
            handshaking: true,
        });
        if let Some(conn) = self.conns[slot].as_mut() {
            if let Some(t) = conn.session.poll_timeout() {
                conn.timer_at = Some(t);
                self.wheel.insert(t, id.to_u64());
            }
        }
    }

    fn on_data(&mut self, io: &mut Conns, id: ConnId, data: &mut [u8], now: Instant) {
        self.drive(io, id, now, |s, ctx, out| {
            s.handle_bytes(ctx, data, &mut |o| out(o))
        });
    }

    fn on_close(&mut self, io: &mut Conns, id: ConnId, now: Instant) {
        tracing::debug!(worker = self.hub.index, conn = id.slot, "connection closed");
        self.retire(io, id);
        self.env.admission.release();
        self.apply_hub_requests(io, now);
    }

    fn on_wake(&mut self, io: &mut Conns, now: Instant) {
        let inbox = &self.hub.shared.inboxes[usize::from(self.hub.index)];
        inbox.notifier.reset();
        let shared = self.hub.shared.clone();
        let queue = &shared.inboxes[usize::from(self.hub.index)].queue;
        let ts = unix_ms();
        while let Some(msg) = queue.pop() {
            self.hub.handle(io, msg, now, ts);
        }
        self.apply_hub_requests(io, now);
    }

    fn on_tick(&mut self, io: &mut Conns, now: Instant) {
        self.run_timers(io, now);
        self.drain_step(io, now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let wheel = self.wheel.next_deadline();
        if self.drain.is_some() || self.env.lifecycle.draining.load(Ordering::Relaxed) {
            // Drain slices are taken every few milliseconds.
            let soon = Instant::now() + Duration::from_millis(20);
            return Some(wheel.map_or(soon, |w| w.min(soon)));
        }
        wheel
    }

    fn accepting(&self) -> bool {
        self.drain.is_none()
    }

    fn finished(&self, io: &Conns) -> bool {
        self.drain.as_ref().is_some_and(|d| d.closed >= d.initial) && io.is_empty()
    }
}
