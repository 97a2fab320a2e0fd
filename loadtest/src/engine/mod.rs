//! One worker process: simulated agents, dashboard users and a service client on a single
//! thread, over non-blocking sockets in one epoll loop (mio), a binary-heap timer queue and
//! the project's own frame decoder in the client role.
//!
//! This file holds the engine's state, its loop and its timers; the rest is split by concern:
//! `conn` (one connection's state), `held` (connections per gateway URL and role),
//! `connect` (opening one), `auth`, `inbound` (what the gateway sends), `write`,
//! `reconnect` (losing one and what comes next, at which URL), `phases` (setup, window,
//! storm, drain), `pace` (fleet-wide rates), `agent`, `commands` (the service), `flat`
//! (flat-out sending) and `control` (the coordinator's pipe and the result).

mod agent;
mod auth;
mod commands;
mod conn;
mod connect;
mod control;
mod flat;
mod held;
mod inbound;
mod pace;
mod phases;
mod reconnect;
mod write;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, Write};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::msg::RelayReader;
use crate::plan::{Plan, HISTS};
use crate::stats::{Counters, Lat, StormSeen, Tally};
use crate::tls::Connector;
use crate::util::{mono_ns, Rng};

use conn::{Conn, Role, State};
use control::set_nonblocking;
use pace::Pace;

const CONTROL: Token = Token(usize::MAX);
const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;
/// After the window: the drain ends this long after the last delivery, answer or ack.
const QUIET_NS: u64 = 300 * MS;
/// The cause recorded when the storm drops a connection on purpose (not an error).
const STORM_DROP: &str = "storm_drop";
/// The cause recorded when churn drops a connection on purpose (not an error).
const CHURN_DROP: &str = "churn_drop";
/// How often the coordinator hears from a worker.
const TICK_NS: u64 = 250 * MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Attempt,
    Reconnect,
    Heartbeat,
    Metrics,
    Reply,
}

type Timer = Reverse<(u64, TimerKind, u32, u32)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    WaitGo,
    Window,
    Drain,
    Done,
}

pub struct Engine {
    plan: Plan,
    poll: Poll,
    /// wss://: the TLS client configuration of each target (`None` for ws://).
    connectors: Vec<Option<Connector>>,
    conns: Vec<Conn>,
    /// Index of the first agent in `conns` (users and the service come first).
    agent_base: usize,
    timers: BinaryHeap<Timer>,
    rng: Rng,
    scratch: Vec<u8>,
    dirty: Vec<u32>,
    fill: Vec<u32>,
    c: Counters,
    hists: Vec<Lat>,
    interval: Lat,
    errors_by_code: Tally,
    close_codes: Tally,
    connect_failures: Tally,
    disconnects: Tally,
    phase: Phase,
    setup_start: u64,
    setup_end: u64,
    setup_complete: bool,
    t0: u64,
    t1: u64,
    storm_t: u64,
    drain_until: u64,
    last_activity: u64,
    opened: usize,
    pace_connect: Pace,
    pace_status: Pace,
    pace_player: Pace,
    pace_command: Pace,
    pace_churn: Pace,
    /// Connections per gateway URL (`plan.targets`), by role.
    held: Vec<held::Held>,
    attempting: u32,
    pending: HashMap<u64, u64>,
    next_req: u64,
    relay: RelayReader,
    sent_by_cluster: Vec<u64>,
    users_by_cluster: Vec<u64>,
    snap_setup: Counters,
    snap_t0: Counters,
    snap_t1: Counters,
    cpu_t0: u64,
    cpu_t1: u64,
    storm: StormSeen,
    storm_started: bool,
    herd_now: bool,
    service: Option<usize>,
    req_key: Vec<u8>,
    flat_unacked: u64,
    next_tick: u64,
    control: Vec<u8>,
    next_source: usize,
}

impl Engine {
    pub fn new(plan: Plan) -> io::Result<Engine> {
        let poll = Poll::new()?;
        let mut conns = Vec::new();
        let (u0, u1) = plan.share(plan.users);
        for u in u0..u1 {
            conns.push(Conn::new(
                Role::User,
                u,
                0,
                plan.url_of(u),
                plan.max_message,
            ));
        }
        if plan.service {
            conns.push(Conn::new(
                Role::Service,
                plan.proc_index,
                0,
                plan.url_of(plan.proc_index),
                plan.max_message,
            ));
        }
        let agent_base = conns.len();
        let (a0, a1) = plan.share(plan.agents);
        for a in a0..a1 {
            let mut conn = Conn::new(
                Role::Agent,
                a,
                plan.cluster_of(a),
                plan.url_of(a),
                plan.max_message,
            );
            conn.machine_id = plan.machine_id(a).into();
            conns.push(conn);
        }
        let clusters = plan.clusters.max(1) as usize;
        let connectors = plan
            .targets
            .iter()
            .map(|t| t.tls.as_ref().map(Connector::new).transpose())
            .collect::<Result<Vec<_>, _>>()
            .map_err(io::Error::other)?;
        Ok(Engine {
            poll,
            connectors,
            conns,
            agent_base,
            timers: BinaryHeap::new(),
            rng: Rng::from_os(),
            scratch: Vec::with_capacity(1024),
            dirty: Vec::new(),
            fill: Vec::new(),
            c: Counters::default(),
            hists: HISTS.iter().map(|_| Lat::default()).collect(),
            interval: Lat::default(),
            errors_by_code: Tally::new(),
            close_codes: Tally::new(),
            connect_failures: Tally::new(),
            disconnects: Tally::new(),
            phase: Phase::Setup,
            setup_start: 0,
            setup_end: 0,
            setup_complete: false,
            t0: 0,
            t1: 0,
            storm_t: 0,
            drain_until: 0,
            last_activity: 0,
            opened: 0,
            pace_connect: Pace::new(plan.rate_share(plan.connect_rate)),
            pace_status: Pace::new(plan.rate_share(plan.status_rate)),
            pace_player: Pace::new(plan.rate_share(plan.player_rate)),
            pace_command: Pace::new(if plan.service {
                plan.rate_share(plan.command_rate)
            } else {
                0.0
            }),
            pace_churn: Pace::new(plan.rate_share(plan.churn_rate)),
            held: vec![held::Held::default(); plan.targets.len().max(1)],
            attempting: 0,
            pending: HashMap::new(),
            next_req: 0,
            relay: RelayReader::new(&plan.run_id),
            sent_by_cluster: vec![0; clusters],
            users_by_cluster: vec![0; clusters],
            snap_setup: Counters::default(),
            snap_t0: Counters::default(),
            snap_t1: Counters::default(),
            cpu_t0: 0,
            cpu_t1: 0,
            storm: StormSeen::default(),
            storm_started: false,
            herd_now: false,
            service: plan.service.then(|| agent_base - 1),
            req_key: format!("\"id\":\"req_{}_", plan.proc_index).into_bytes(),
            flat_unacked: 0,
            next_tick: 0,
            control: Vec::new(),
            next_source: 0,
            plan,
        })
    }

    /// Runs the worker until the run is over; `control` is the coordinator's pipe (stdin),
    /// `out` where ticks and the result go (stdout).
    pub fn run(mut self, control_fd: i32, out: &mut dyn Write) -> anyhow::Result<()> {
        set_nonblocking(control_fd)?;
        self.poll
            .registry()
            .register(&mut SourceFd(&control_fd), CONTROL, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        let mut rbuf = vec![0u8; 64 * 1024];
        let now = mono_ns();
        self.setup_start = now;
        self.pace_connect.start = now;
        self.next_tick = now + TICK_NS;
        while self.phase != Phase::Done {
            let timeout = self.timeout(mono_ns());
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                if ev.token() == CONTROL {
                    self.read_control(control_fd);
                    continue;
                }
                let i = ev.token().0;
                if i < self.conns.len() {
                    self.on_event(i, ev.is_writable(), ev.is_read_closed(), &mut rbuf);
                }
            }
            let now = mono_ns();
            self.run_timers(now);
            self.advance(now, out)?;
            self.run_pacers(now);
            self.run_fill(now);
            self.flush_dirty();
        }
        self.finish(out)
    }

    // ---- scheduling ----

    fn timeout(&self, now: u64) -> Duration {
        if !self.dirty.is_empty() || !self.fill.is_empty() {
            return Duration::ZERO;
        }
        let mut at = self.next_tick;
        if let Some(Reverse((t, ..))) = self.timers.peek() {
            at = at.min(*t);
        }
        for pace in [
            &self.pace_status,
            &self.pace_player,
            &self.pace_command,
            &self.pace_churn,
        ] {
            if let Some(t) = pace.next_at() {
                at = at.min(t);
            }
        }
        if self.phase == Phase::Setup {
            at = at.min(self.setup_start + self.plan.setup_timeout_ms * MS);
        }
        if self.opened < self.conns.len() && self.attempting < self.plan.concurrency.max(1) {
            // Paced opening wakes up for the next slot, unpaced opening goes on at once.
            at = at.min(self.pace_connect.next_at().unwrap_or(now));
        }
        for t in [self.t0, self.t1, self.storm_t, self.drain_until] {
            if t > now {
                at = at.min(t);
            }
        }
        if self.phase == Phase::Drain {
            at = at.min(self.last_activity + QUIET_NS);
        }
        Duration::from_nanos(at.saturating_sub(now))
    }

    fn arm(&mut self, at: u64, kind: TimerKind, i: usize) {
        let gen = self.conns[i].gen;
        self.timers.push(Reverse((at, kind, i as u32, gen)));
    }

    fn run_timers(&mut self, now: u64) {
        while let Some(Reverse((at, kind, i, gen))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let i = i as usize;
            let current = self.conns[i].gen == gen;
            match kind {
                TimerKind::Attempt if current && self.conns[i].in_progress() => {
                    self.drop_conn(i, "timeout", None, now);
                }
                TimerKind::Reconnect if current && self.conns[i].state == State::Waiting => {
                    self.start_attempt(i, now);
                }
                TimerKind::Heartbeat => self.heartbeat(i, now),
                TimerKind::Metrics => self.metrics(i, now),
                TimerKind::Reply => self.replies(i, now),
                _ => {}
            }
        }
    }

    fn agents(&self) -> impl Iterator<Item = &Conn> {
        self.conns[self.agent_base..].iter()
    }
}
