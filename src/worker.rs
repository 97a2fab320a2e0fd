//! One worker: its io loop's handler. Feeds bytes and time to each connection's session,
//! carries out the session's outputs through the hub, runs the timer wheel, counts what
//! happens, and drains on shutdown.

use std::cell::Cell;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::auth::{Revocations, Role, Verifier};
use crate::hub::{AdminRequest, Failure, Hub, Msg, COMMAND_TIMER};
use crate::io::{ConnId, Conns, Handler};
use crate::metrics::{close_index, Metrics, WorkerMetrics, REFUSED_HANDSHAKES, ROLE_PENDING};
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

    /// Counts a new connection; `Some((retry_after_secs, reason))` when it must be refused
    /// (reason: the index in `metrics::REFUSALS`).
    fn admit(&self, now: Instant) -> Option<(u32, usize)> {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open > self.max_connections {
            return Some((1, 0));
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
            Some((((1.0 - b.0) / rate).ceil().max(1.0) as u32, 1))
        }
    }

    fn release(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
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

/// What every worker shares. Settings reach the workers through their inboxes; `settings`
/// here is the current copy for the other threads.
pub struct Env {
    pub settings: RwLock<Arc<Settings>>,
    pub admission: Admission,
    pub lifecycle: Lifecycle,
    pub revocations: Arc<Revocations>,
    /// Connections of one worker still sending their request head, at most.
    pub max_pending_handshakes: usize,
    /// The listener's certificate when it speaks TLS.
    pub tls: Option<Arc<crate::certs::CertStore>>,
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
        }
    }

    fn m(&self) -> &WorkerMetrics {
        self.metrics.worker(self.hub.index)
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
            settings,
            metrics,
            hub,
            conns,
            wheel,
            handshaking,
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
        let panicked = {
            let mut out = |o: Output<'_>| match o {
                Output::Send(bytes) => {
                    let len = bytes.len() as u64;
                    match io.send(id, bytes) {
                        crate::io::conns::Queued::Gone => return,
                        crate::io::conns::Queued::Overflow => hub.overflowed.push(id),
                        crate::io::conns::Queued::Ok => {}
                    }
                    m.messages_out.add(1);
                    m.bytes_out.add(len);
                }
                Output::Close => {
                    io.close(id, now);
                    closed = true;
                }
                Output::Online { identity, version } => {
                    let role = role_index(identity.role);
                    m.connections[ROLE_PENDING].sub(1);
                    m.connections[role].add(1);
                    m.authenticated[role].add(1);
                    hub.online(io, id, identity, version, ts)
                }
                Output::Relay {
                    event,
                    machine_id,
                    cluster_id,
                    data,
                    services_only,
                } => {
                    hub.record(id, event, data, ts);
                    hub.relay(io, event, machine_id, cluster_id, data, services_only, ts)
                }
                Output::CommandResponse { cmd_id, data } => {
                    hub.command_response(io, id, cmd_id, data, ts)
                }
                Output::Command {
                    issuer,
                    req_id,
                    machine_id,
                    data,
                } => hub.command(io, id, issuer, req_id, machine_id, data, now, ts),
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

    /// The connection's session is done: forget it, count it and tell the hub.
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
        let m = self.metrics.worker(self.hub.index);
        if conn.session.is_upgraded() && !conn.session.is_closed() {
            // The socket ended without a close frame either way.
            m.closes[close_index(1006)].add(1);
        }
        match conn.session.identity() {
            Some(who) => {
                m.connections[role_index(who.role)].sub(1);
                self.hub.offline(io, id, who, unix_ms());
            }
            None => m.connections[ROLE_PENDING].sub(1),
        }
    }

    /// Carries out what routing asked for: pending-command timers, closes of replaced
    /// agents and slow consumers.
    fn apply_hub_requests(&mut self, io: &mut Conns, now: Instant) {
        for (key, at) in self.hub.timers.drain(..) {
            self.wheel.insert(at, key);
        }
        while let Some(id) = self.hub.overflowed.pop() {
            self.close_slow_consumer(io, id, now);
        }
        while let Some((id, code, reason)) = self.hub.closes.pop() {
            self.close(io, id, code, reason, now);
        }
    }

    /// The one place a slow consumer is closed (1013) and counted: its outbound queue
    /// passed `max_outbound_bytes`. What it has not started to receive is dropped, so
    /// that the close frame goes out next.
    fn close_slow_consumer(&mut self, io: &mut Conns, id: ConnId, now: Instant) {
        // Listed once per frame that found the queue full; closed and counted once.
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

    /// Starts the drain: admin commands still waiting are answered, and the connections
    /// open now are split into agents (closed first) and the rest.
    fn start_drain(&mut self, io: &mut Conns, now: Instant) {
        self.hub.fail_http_commands(io, unix_ms());
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
        self.apply_hub_requests(io, now);
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
            self.hub.fail_commands_of(io, &set, unix_ms());
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
        self.hub.command_timeout = settings.command_timeout;
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
            reject = Some((1, 2));
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
            m.refused[REFUSED_HANDSHAKES].add(1);
            self.conns[slot] = None;
            let msg = "too many connections in the handshake; retry later";
            io.send(id, handshake::service_unavailable(1, msg));
            io.close(id, now);
            return;
        }
        m.connections[ROLE_PENDING].add(1);
        if let Some((_, reason)) = reject {
            m.refused[reason].add(1);
        }
        self.handshaking += 1;
        let session = Session::new(now, &self.settings.limits, reject.map(|(secs, _)| secs));
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
            match msg {
                Msg::Reload(settings) => self.reload(settings),
                Msg::Admin(AdminRequest::Command { reply, .. }) if self.drain.is_some() => {
                    let _ = reply.send(Err(Failure::Draining));
                }
                Msg::Revoke { sub } => self.revoke(io, &sub, now),
                msg => self.hub.handle(io, msg, now, ts),
            }
            self.apply_hub_requests(io, now);
        }
    }

    fn on_tick(&mut self, io: &mut Conns, now: Instant) {
        self.turn_start.set(Some(now));
        let m = self.m();
        m.loop_turns.add(1);
        m.last_turn_ms.set(self.metrics.since_epoch_ms(now));
        self.run_timers(io, now);
        self.drain_step(io, now);
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
