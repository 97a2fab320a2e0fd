//! One worker: its io loop's handler. Feeds bytes and time to each connection's session,
//! routes the session's outputs through the hub and carries out the hub's actions, runs
//! the timer wheel, counts what happens, and drains on shutdown.

use std::cell::Cell;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_queue::SegQueue;

use crate::auth::{Revocations, Role, Verifier};
use crate::hub::{self, Action, AdminRequest, Failure, Hub, Sink};
use crate::io::{ConnId, Conns, Handler, Notifier};
use crate::metrics::{close_index, Metrics, Refusal, WorkerMetrics, ROLE_PENDING};
use crate::protocol::handshake;
use crate::protocol::session::{Ctx, Limits, Output, Session, CLOSE_AUTH_FAILED};
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

    /// Counts a new connection; `Some` when it must be refused.
    fn admit(&self, now: Instant) -> Option<Refused> {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open > self.max_connections {
            return Some(Refused::retry_in(Refusal::Capacity, 1));
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
            let secs = ((1.0 - b.0) / rate).ceil().max(1.0) as u32;
            Some(Refused::retry_in(Refusal::Rate, secs))
        }
    }

    fn release(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection refused at accept: answered 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refused {
    reason: Refusal,
    retry_after_secs: u32,
}

impl Refused {
    fn retry_in(reason: Refusal, retry_after_secs: u32) -> Refused {
        Refused {
            reason,
            retry_after_secs,
        }
    }
}

/// Process-wide lifecycle flags.
#[derive(Default)]
pub struct Lifecycle {
    /// Set once every worker loop runs: `/readyz` answers 200 from then on.
    pub started: AtomicBool,
    /// Set on SIGTERM/SIGINT: stop accepting, close connections in slices.
    pub draining: AtomicBool,
}

/// What a reload (SIGHUP) may change.
#[derive(Debug)]
pub struct Settings {
    pub limits: Limits,
    pub verifier: Verifier,
    pub command_timeout: Duration,
    pub drain_duration: Duration,
}

/// A message to a worker from another thread.
#[derive(Debug)]
pub enum Msg {
    /// For its hub.
    Hub(hub::Msg),
    /// New settings after a reload.
    Reload(Arc<Settings>),
    /// Close the local connections of subject `sub` with 4001.
    Revoke { sub: Arc<str> },
}

impl From<hub::Msg> for Msg {
    fn from(msg: hub::Msg) -> Msg {
        Msg::Hub(msg)
    }
}

/// Messages one wake-up takes from the inbox at most: the rest wait for the next loop
/// turn, so that other workers' traffic cannot starve this worker's sockets and timers.
pub const WAKE_BATCH: usize = 256;

/// A worker's inbox: a lock-free queue plus its wake-up.
pub struct Inbox {
    queue: SegQueue<Msg>,
    notifier: Arc<Notifier>,
}

impl Inbox {
    /// Hands up to `max` waiting messages to `each`; when more remain, wakes the worker
    /// again so that it comes back for them after a turn of its own sockets and timers.
    fn take(&self, max: usize, mut each: impl FnMut(Msg)) {
        self.notifier.reset();
        for _ in 0..max {
            match self.queue.pop() {
                Some(msg) => each(msg),
                None => return,
            }
        }
        if !self.queue.is_empty() {
            self.notifier.notify();
        }
    }
}

/// Every worker's inbox, by worker index.
pub struct Inboxes(Vec<Inbox>);

impl Inboxes {
    pub fn new(notifiers: Vec<Arc<Notifier>>) -> Inboxes {
        let inbox = |notifier| Inbox {
            queue: SegQueue::new(),
            notifier,
        };
        Inboxes(notifiers.into_iter().map(inbox).collect())
    }

    /// Queues `msg` for worker `worker` and wakes it.
    pub fn post(&self, worker: u16, msg: impl Into<Msg>) {
        let inbox = &self.0[usize::from(worker)];
        inbox.queue.push(msg.into());
        inbox.notifier.notify();
    }

    /// Wakes every worker (to notice the drain).
    pub fn wake_all(&self) {
        for inbox in &self.0 {
            inbox.notifier.notify();
        }
    }

    /// Workers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Messages waiting in each inbox.
    pub fn depths(&self) -> Vec<u64> {
        self.0.iter().map(|i| i.queue.len() as u64).collect()
    }
}

/// What every worker shares. Settings reach the workers through their inboxes; `settings`
/// here is the current copy for the other threads.
pub struct Env {
    pub settings: RwLock<Arc<Settings>>,
    pub admission: Admission,
    pub lifecycle: Lifecycle,
    pub revocations: Arc<Revocations>,
    pub inboxes: Arc<Inboxes>,
    /// Connections of one worker still sending their request head, at most.
    pub max_pending_handshakes: usize,
    /// The listener's certificate when it speaks TLS.
    pub tls: Option<Arc<crate::certs::CertStore>>,
    /// The link to the other nodes, when `nats_url` is set.
    pub bus: Option<Arc<crate::bus::Link>>,
}

impl Env {
    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Wheel key flag of pending commands' timers (connection keys never set the top bit).
const COMMAND_TIMER: u64 = 1 << 63;

/// A close routing asked for, carried out once the current handler call is done.
type CloseRequest = (ConnId, u16, &'static str);

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

/// Drain progress: agents are closed during the first half of the drain duration,
/// everything else during the second half, each group in evenly spread slices.
struct Drain {
    started: Instant,
    agents: Vec<ConnId>,
    others: Vec<ConnId>,
    closed_agents: usize,
    closed_others: usize,
}

impl Drain {
    fn done(&self) -> bool {
        self.closed_agents >= self.agents.len() && self.closed_others >= self.others.len()
    }
}

/// One core's handler.
pub struct Worker {
    env: Arc<Env>,
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    hub: Hub,
    conns: Vec<Option<Conn>>,
    wheel: Wheel,
    fired: Vec<u64>,
    drain: Option<Drain>,
    /// When the current loop turn began (busy time is measured from it).
    turn_start: Cell<Option<Instant>>,
    /// Connections still in the HTTP handshake.
    handshaking: usize,
    /// Closes the hub asked for, carried out by `settle`.
    closes: Vec<CloseRequest>,
}

/// Carries out the hub's actions for a worker: frames go to the connection table, timers
/// into the wheel, messages to other workers' inboxes, and closes wait for `settle`
/// (a close runs the connection's session, which may be the one calling).
struct Out<'a> {
    io: &'a mut Conns,
    m: &'a WorkerMetrics,
    wheel: &'a mut Wheel,
    inboxes: &'a Inboxes,
    bus: Option<&'a crate::bus::Link>,
    closes: &'a mut Vec<CloseRequest>,
}

impl Out<'_> {
    /// Queues and counts a frame; `latest`: in place of an unsent one (see `Output::Pong`).
    fn send(&mut self, id: ConnId, frame: Bytes, latest: bool) {
        let len = frame.len() as u64;
        let queued = match latest {
            true => self.io.send_latest(id, frame),
            false => self.io.send(id, frame),
        };
        if queued {
            self.m.messages_out.add(1);
            self.m.bytes_out.add(len);
        }
    }
}

impl Sink for Out<'_> {
    fn act(&mut self, action: Action<'_>) {
        match action {
            Action::Send { conn, frame } => self.send(conn, frame, false),
            Action::Deliver { to, frame } => {
                let mut queued = 0u64;
                for &id in to {
                    queued += u64::from(self.io.send(id, frame.clone()));
                }
                let m = self.m;
                m.relay_deliveries.add(queued);
                m.messages_out.add(queued);
                m.bytes_out.add(queued * frame.len() as u64);
            }
            Action::Close { conn, code, reason } => self.closes.push((conn, code, reason)),
            Action::ArmTimer { seq, at } => self.wheel.insert(at, COMMAND_TIMER | seq),
            Action::Post { worker, msg } => self.inboxes.post(worker, msg),
            Action::Publish { cluster, frame } => {
                if let Some(bus) = self.bus {
                    bus.publish(cluster, frame.clone());
                }
            }
            Action::Interest { cluster, on } => match (self.bus, on) {
                (Some(bus), true) => bus.subscribe(cluster),
                (Some(bus), false) => bus.unsubscribe(cluster),
                (None, _) => {}
            },
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Agent => 1,
        Role::User => 2,
        Role::Service => 3,
    }
}

impl Worker {
    pub fn new(env: Arc<Env>, hub: Hub) -> Worker {
        let settings = env.settings();
        Worker {
            metrics: hub.shared.metrics.clone(),
            env,
            settings,
            hub,
            conns: Vec::new(),
            wheel: Wheel::new(Instant::now()),
            fired: Vec::new(),
            drain: None,
            turn_start: Cell::new(None),
            handshaking: 0,
            closes: Vec::new(),
        }
    }

    fn m(&self) -> &WorkerMetrics {
        self.metrics.worker(self.hub.index)
    }

    /// The hub, and the sink that carries out its actions on `io`.
    fn hub_and_out<'a>(&'a mut self, io: &'a mut Conns) -> (&'a mut Hub, Out<'a>) {
        let out = Out {
            io,
            m: self.metrics.worker(self.hub.index),
            wheel: &mut self.wheel,
            inboxes: &self.env.inboxes,
            bus: self.env.bus.as_deref(),
            closes: &mut self.closes,
        };
        (&mut self.hub, out)
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
            settings,
            metrics,
            hub,
            conns,
            wheel,
            handshaking,
            closes,
            ..
        } = self;
        let Some(conn) = Self::conn_mut(conns, id) else {
            return;
        };
        let m = metrics.worker(hub.index);
        let ctx = Ctx {
            limits: &settings.limits,
            verifier: &settings.verifier,
            observer: m,
            now,
            unix_ms: ts,
        };
        let mut closed = false;
        let session = &mut conn.session;
        let mut sink = Out {
            io: &mut *io,
            m,
            wheel: &mut *wheel,
            inboxes: &env.inboxes,
            bus: env.bus.as_deref(),
            closes,
        };
        let panicked = {
            let mut out = |o: Output<'_>| match o {
                Output::Send(bytes) => sink.send(id, bytes, false),
                Output::Pong(bytes) => sink.send(id, bytes, true),
                Output::Close => {
                    sink.io.close(id, now);
                    closed = true;
                }
                Output::Online { identity, version } => {
                    let role = role_index(identity.role);
                    m.connections[ROLE_PENDING].sub(1);
                    m.connections[role].add(1);
                    m.authenticated[role].add(1);
                    hub.online(id, identity, version, ts, &mut sink)
                }
                Output::Relay {
                    kind,
                    machine_id,
                    cluster_id,
                    data,
                } => hub.agent_event(id, &kind, machine_id, cluster_id, data, ts, &mut sink),
                Output::CommandResponse { cmd_id, data } => {
                    hub.command_response(id, cmd_id, data, now, ts, &mut sink)
                }
                Output::Command {
                    issuer,
                    req_id,
                    machine_id,
                    data,
                } => hub.command(id, issuer, req_id, machine_id, data, now, ts, &mut sink),
                Output::Notify { cluster_id, data } => hub.notify(cluster_id, data, ts, &mut sink),
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
            self.retire(io, id, now);
        } else if let Some(t) = conn.session.poll_timeout() {
            if conn.timer_at.is_none_or(|cur| t < cur) {
                conn.timer_at = Some(t);
                wheel.insert(t, id.to_u64());
            }
        }
    }

    /// The connection's session is done: forget it, count it and tell the hub.
    fn retire(&mut self, io: &mut Conns, id: ConnId, now: Instant) {
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
        let m = self.metrics.worker(self.hub.index);
        if conn.session.is_upgraded() && !conn.session.is_closed() {
            // The socket ended without a close frame either way.
            m.closes[close_index(1006)].add(1);
        }
        match conn.session.identity() {
            Some(who) => {
                m.connections[role_index(who.role)].sub(1);
                let (hub, mut out) = self.hub_and_out(io);
                hub.offline(id, who, now, unix_ms(), &mut out);
            }
            None => m.connections[ROLE_PENDING].sub(1),
        }
    }

    /// Carries out what waits once the handlers are done: connections whose outbound
    /// queue overflowed are closed with 1013, then the closes routing asked for (replaced
    /// agents). Closing may queue more of either; all are done before the flush.
    fn settle(&mut self, io: &mut Conns, now: Instant) {
        loop {
            if let Some(id) = io.pop_overflowed() {
                self.close_slow_consumer(io, id, now);
            } else if let Some((id, code, reason)) = self.closes.pop() {
                self.close(io, id, code, reason, now);
            } else {
                return;
            }
        }
    }

    /// The one place a slow consumer is closed (1013) and counted: its outbound queue
    /// passed `max_outbound_bytes`. What it has not started to receive is dropped, so
    /// that the close frame goes out next.
    fn close_slow_consumer(&mut self, io: &mut Conns, id: ConnId, now: Instant) {
        // A connection closing already needs no 1013.
        if !io.is_open(id) {
            return;
        }
        self.m().slow_consumers.add(1);
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
                let (hub, mut out) = self.hub_and_out(io);
                hub.command_timed_out(key & !COMMAND_TIMER, now, unix_ms(), &mut out);
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
    }

    /// Starts the drain: admin commands still waiting are answered, and the connections
    /// open now are split into agents (closed first) and the rest.
    fn start_drain(&mut self, io: &mut Conns, now: Instant) {
        let (hub, mut out) = self.hub_and_out(io);
        hub.fail_http_commands(now, unix_ms(), &mut out);
        let (mut agents, mut others) = (Vec::new(), Vec::new());
        for id in io.open_ids() {
            let is_agent = Self::conn_mut(&mut self.conns, id)
                .and_then(|c| c.session.identity())
                .is_some_and(|who| who.role == Role::Agent);
            if is_agent {
                agents.push(id);
            } else {
                others.push(id);
            }
        }
        tracing::debug!(
            worker = self.hub.index,
            agents = agents.len(),
            others = others.len(),
            "drain started"
        );
        self.drain = Some(Drain {
            started: now,
            agents,
            others,
            closed_agents: 0,
            closed_others: 0,
        });
    }

    /// Closes connections with 1012 in slices spread over the drain duration.
    fn drain_step(&mut self, io: &mut Conns, now: Instant) {
        if self.drain.is_none() {
            if !self.env.lifecycle.draining.load(Ordering::Relaxed) {
                return;
            }
            self.start_drain(io, now);
        }
        let d = self.drain.as_ref().expect("set above");
        let total = self.settings.drain_duration.as_secs_f64();
        let share = match total {
            0.0 => 1.0,
            t => (now.saturating_duration_since(d.started).as_secs_f64() / t).min(1.0),
        };
        let slice = |n: usize, part: f64| (n as f64 * part.clamp(0.0, 1.0)).ceil() as usize;
        let agents_to = slice(d.agents.len(), share * 2.0);
        let others_to = match d.closed_agents >= d.agents.len() {
            true => slice(d.others.len(), share * 2.0 - 1.0),
            false => 0,
        };
        let agents: Vec<ConnId> = d.agents[d.closed_agents.min(agents_to)..agents_to].to_vec();
        let others: Vec<ConnId> = d.others[d.closed_others.min(others_to)..others_to].to_vec();
        if let Some(d) = self.drain.as_mut() {
            d.closed_agents = d.closed_agents.max(agents_to);
            d.closed_others = d.closed_others.max(others_to);
        }
        let reason = "the gateway restarts; reconnect with backoff";
        for id in agents {
            self.close(io, id, 1012, reason, now);
        }
        if !others.is_empty() {
            let set: HashSet<ConnId> = others.iter().copied().collect();
            let (hub, mut out) = self.hub_and_out(io);
            hub.fail_commands_of(&set, now, unix_ms(), &mut out);
            for id in others {
                self.close(io, id, 1012, reason, now);
            }
        }
    }

    /// A revocation: every local connection of `sub` whose token is now refused gets
    /// `AUTH_FAILED` and 4001.
    fn revoke(&mut self, io: &mut Conns, sub: &str, now: Instant) {
        let revocations = &self.env.revocations;
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .flatten()
            .filter(|c| {
                c.session
                    .identity()
                    .is_some_and(|who| &*who.sub == sub && revocations.is_revoked(who))
            })
            .map(|c| c.id)
            .collect();
        for id in ids {
            self.close(io, id, CLOSE_AUTH_FAILED, "token revoked", now);
        }
    }

    /// New settings: the sessions read them from the next call on.
    fn reload(&mut self, settings: Arc<Settings>) {
        self.hub.set_command_timeout(settings.command_timeout);
        self.settings = settings;
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
            reject = Some(Refused::retry_in(Refusal::Draining, 1));
        }
        let slot = id.slot as usize;
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        let m = self.m();
        m.accepted.add(1);
        if self.handshaking >= self.env.max_pending_handshakes {
            // Too many heads still arriving: answer at once, without reading this one
            // and without a session, so that slow or silent peers hold no more than the cap.
            m.refused[Refusal::Handshakes as usize].add(1);
            self.conns[slot] = None;
            let msg = "too many connections in the handshake; retry later";
            io.send(id, handshake::service_unavailable(1, msg));
            io.close(id, now);
            return;
        }
        m.connections[ROLE_PENDING].add(1);
        if let Some(r) = reject {
            m.refused[r.reason as usize].add(1);
        }
        self.handshaking += 1;
        let session = Session::new(
            now,
            &self.settings.limits,
            reject.map(|r| r.retry_after_secs),
        );
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
        self.m().bytes_in.add(data.len() as u64);
        self.drive(io, id, now, |s, ctx, out| {
            s.handle_bytes(ctx, data, &mut |o| out(o))
        });
    }

    fn on_close(&mut self, io: &mut Conns, id: ConnId, now: Instant) {
        tracing::debug!(worker = self.hub.index, conn = id.slot, "connection closed");
        self.retire(io, id, now);
        self.env.admission.release();
        // Called after `on_tick` too (a flush or a linger deadline ends a connection).
        self.settle(io, now);
    }

    fn on_wake(&mut self, io: &mut Conns, now: Instant) {
        if crate::fault::panics_on_wake(self.hub.index) {
            panic!(
                "injected fault: worker {} panics in on_wake",
                self.hub.index
            );
        }
        let env = self.env.clone();
        let inbox = &env.inboxes.0[usize::from(self.hub.index)];
        let ts = unix_ms();
        inbox.take(WAKE_BATCH, |msg| match msg {
            Msg::Reload(settings) => self.reload(settings),
            Msg::Revoke { sub } => self.revoke(io, &sub, now),
            Msg::Hub(hub::Msg::Admin(AdminRequest::Command { reply, .. }))
                if self.drain.is_some() =>
            {
                let _ = reply.send(Err(Failure::Draining));
            }
            Msg::Hub(msg) => {
                let (hub, mut out) = self.hub_and_out(io);
                hub.handle(msg, now, ts, &mut out);
            }
        });
    }

    fn on_tick(&mut self, io: &mut Conns, now: Instant) {
        self.turn_start.set(Some(now));
        let m = self.m();
        m.loop_turns.add(1);
        m.last_turn_ms.set(self.metrics.since_epoch_ms(now));
        self.run_timers(io, now);
        self.drain_step(io, now);
        self.settle(io, now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        if let Some(start) = self.turn_start.take() {
            let busy = start.elapsed().as_nanos() as u64;
            self.m().busy_nanos.add(busy);
        }
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
        // Commands still pending belong to issuers that are gone: nobody to tell.
        let done = self.drain.as_ref().is_some_and(Drain::done) && io.is_empty();
        if done {
            self.m().last_turn_ms.set(u64::MAX);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the eventfd has a wake-up pending (read without blocking, which clears it).
    fn woken(n: &Notifier) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        let r = unsafe { libc::read(n.fd(), (&mut v as *mut u64).cast(), 8) };
        r == 8
    }

    #[test]
    fn one_wake_takes_a_bounded_batch_and_wakes_again_for_the_rest() {
        let notifier = Arc::new(Notifier::new().unwrap());
        let inboxes = Inboxes::new(vec![notifier.clone()]);
        let total = WAKE_BATCH * 2 + 10;
        for _ in 0..total {
            inboxes.post(0, Msg::Revoke { sub: "s".into() });
        }
        assert!(woken(&notifier));
        let inbox = &inboxes.0[0];
        let mut taken = Vec::new();
        for _ in 0..3 {
            let mut n = 0;
            inbox.take(WAKE_BATCH, |_| n += 1);
            taken.push((n, woken(&notifier)));
        }
        // Full batches wake the worker again; the last one leaves nothing and no wake-up.
        assert_eq!(taken, [(WAKE_BATCH, true), (WAKE_BATCH, true), (10, false)]);
        assert_eq!(inboxes.depths(), [0]);
    }
}
