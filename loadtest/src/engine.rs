//! One worker process: simulated agents, dashboard users and a service client on a single
//! thread, over non-blocking sockets in one epoll loop (mio), a binary-heap timer queue and
//! the project's own frame decoder in the client role.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::time::Duration;

use arcgate::auth::{mint_hs256, TokenSpec};
use arcgate::protocol::codec::{Decoder, Flow, Message, OP_PING, OP_PONG, OP_TEXT};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::msg::{self, IdMap, Relay, RelayReader, Relayed};
use crate::net;
use crate::plan::{FlatOut, Hist, Plan, HISTS};
use crate::stats::{self, Counters, Lat, RoleCount, StormSeen, Tally, Tick, WorkerResult, C};
use crate::tls::{Connector, Stream};
use crate::util::{mono_ns, unix_ms, unix_s, Rng};
use crate::ws::{self, Upgrade};

const CONTROL: Token = Token(usize::MAX);
const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;
const BACKOFF_MIN_MS: u64 = 1_000;
const BACKOFF_MAX_MS: u64 = 30_000;
/// After the window: the drain ends this long after the last delivery, answer or ack.
const QUIET_NS: u64 = 300 * MS;
/// The cause recorded when the storm drops a connection on purpose (not an error).
const STORM_DROP: &str = "storm_drop";
/// The cause recorded when churn drops a connection on purpose (not an error).
const CHURN_DROP: &str = "churn_drop";
/// Unsent bytes one connection may hold before it is given up.
const MAX_BACKLOG: usize = 8 << 20;
/// How often the coordinator hears from a worker.
const TICK_NS: u64 = 250 * MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Agent,
    User,
    Service,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not opened yet.
    Idle,
    Connecting,
    Upgrading,
    Authing,
    Ready,
    /// Waiting out a backoff before the next attempt.
    Waiting,
    /// Gave up for good (4001, 4009, or the run is over).
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Heartbeat,
    Metrics,
    Status,
    Player,
    Response,
    Command,
}

/// A message generated while disconnected, sent after the next `authenticated`.
struct Queued {
    payload: Vec<u8>,
    sent_ns: u64,
    kind: Kind,
}

struct Conn {
    role: Role,
    /// Index within the role, fleet-wide (agent number, user number, worker number).
    id: u32,
    cluster: u32,
    state: State,
    /// Bumped whenever the socket goes: stale timers carry an older value.
    gen: u32,
    sock: Option<Stream>,
    head: Vec<u8>,
    dec: Decoder,
    wbuf: Vec<u8>,
    wpos: usize,
    dirty: bool,
    backoff_ms: u64,
    retry_after_ms: u64,
    attempt_ns: u64,
    /// Agents: per-agent sequence of relayed events (`seq`) and of heartbeats/metrics.
    seq: u64,
    hb_seq: u64,
    queue: VecDeque<Queued>,
    /// Commands to answer: (due, command id).
    replies: VecDeque<(u64, Box<str>)>,
    hb_armed: bool,
    up_since_s: u64,
    flat_sent: u64,
    flat_acked: u64,
    flat_pinged: u64,
    pings: VecDeque<(u64, u64)>,
    storm_drop_ns: u64,
    storm_recovered: bool,
    /// Users and services: the last `seq` seen per agent (duplicates and gaps).
    seen: IdMap<u64>,
    /// Agents: the machine id (written into every heartbeat).
    machine_id: Box<str>,
}

impl Conn {
    fn new(role: Role, id: u32, cluster: u32, max_message: usize) -> Conn {
        Conn {
            role,
            id,
            cluster,
            state: State::Idle,
            gen: 0,
            sock: None,
            head: Vec::new(),
            dec: Decoder::new_client(max_message),
            wbuf: Vec::new(),
            wpos: 0,
            dirty: false,
            backoff_ms: BACKOFF_MIN_MS,
            retry_after_ms: 0,
            attempt_ns: 0,
            seq: 0,
            hb_seq: 0,
            queue: VecDeque::new(),
            replies: VecDeque::new(),
            hb_armed: false,
            up_since_s: 0,
            flat_sent: 0,
            flat_acked: 0,
            flat_pinged: 0,
            pings: VecDeque::new(),
            storm_drop_ns: 0,
            storm_recovered: false,
            seen: IdMap::default(),
            machine_id: Box::from(""),
        }
    }

    fn in_progress(&self) -> bool {
        matches!(
            self.state,
            State::Connecting | State::Upgrading | State::Authing
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Attempt,
    Reconnect,
    Heartbeat,
    Metrics,
    Reply,
}

type Timer = Reverse<(u64, TimerKind, u32, u32)>;

/// A steady rate: how many events are due by now since `start`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    per_s: f64,
    start: u64,
    done: u64,
}

impl Pace {
    fn new(per_s: f64) -> Pace {
        Pace {
            per_s,
            start: 0,
            done: 0,
        }
    }

    fn active(&self) -> bool {
        self.per_s > 0.0 && self.start > 0
    }

    fn due(&self, now: u64) -> u64 {
        if !self.active() || now < self.start {
            return 0;
        }
        let total = ((now - self.start) as f64 * self.per_s / SEC as f64) as u64;
        total.saturating_sub(self.done)
    }

    fn next_at(&self) -> Option<u64> {
        self.active()
            .then(|| self.start + ((self.done + 1) as f64 * SEC as f64 / self.per_s) as u64)
    }
}

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
    /// wss://: the TLS client configuration.
    connector: Option<Connector>,
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
    ready: [u64; 3],
    stopped: [u64; 3],
    attempting: u32,
    pending: HashMap<u64, u64>,
    next_req: u64,
    relay: RelayReader,
    sent_by_cluster: Vec<u64>,
    users_by_cluster: Vec<u64>,
    snap_setup: Counters,
    snap_t0: Counters,
    snap_t1: Counters,
    ready_t0: [u64; 3],
    ready_t1: [u64; 3],
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

fn role_index(role: Role) -> usize {
    match role {
        Role::Agent => 0,
        Role::User => 1,
        Role::Service => 2,
    }
}

impl Engine {
    pub fn new(plan: Plan) -> io::Result<Engine> {
        let poll = Poll::new()?;
        let mut conns = Vec::new();
        let (u0, u1) = plan.share(plan.users);
        for u in u0..u1 {
            conns.push(Conn::new(Role::User, u, 0, plan.max_message));
        }
        if plan.service {
            conns.push(Conn::new(
                Role::Service,
                plan.proc_index,
                0,
                plan.max_message,
            ));
        }
        let agent_base = conns.len();
        let (a0, a1) = plan.share(plan.agents);
        for a in a0..a1 {
            let mut conn = Conn::new(Role::Agent, a, plan.cluster_of(a), plan.max_message);
            conn.machine_id = plan.machine_id(a).into();
            conns.push(conn);
        }
        let clusters = plan.clusters.max(1) as usize;
        let connector = match &plan.tls {
            Some(tls) => Some(Connector::new(tls).map_err(io::Error::other)?),
            None => None,
        };
        Ok(Engine {
            poll,
            connector,
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
            ready: [0; 3],
            stopped: [0; 3],
            attempting: 0,
            pending: HashMap::new(),
            next_req: 0,
            relay: RelayReader::new(&plan.run_id),
            sent_by_cluster: vec![0; clusters],
            users_by_cluster: vec![0; clusters],
            snap_setup: Counters::default(),
            snap_t0: Counters::default(),
            snap_t1: Counters::default(),
            ready_t0: [0; 3],
            ready_t1: [0; 3],
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

    /// Phase changes: setup done, window start and end, storm, drain end, ticks.
    fn advance(&mut self, now: u64, out: &mut dyn Write) -> anyhow::Result<()> {
        if matches!(self.phase, Phase::Setup | Phase::WaitGo | Phase::Window) {
            self.open_more(now);
        }
        if self.phase == Phase::Setup {
            let settled = self.ready.iter().sum::<u64>() + self.stopped.iter().sum::<u64>();
            let all = self.opened == self.conns.len() && settled == self.conns.len() as u64;
            let late = now >= self.setup_start + self.plan.setup_timeout_ms * MS;
            if all || late {
                self.setup_complete = all;
                self.setup_end = now;
                self.snap_setup = self.c.clone();
                self.phase = Phase::WaitGo;
                writeln!(out, "ready")?;
                out.flush()?;
            }
        }
        if self.phase == Phase::WaitGo && self.t0 != 0 && now >= self.t0 {
            self.start_window();
        }
        if self.phase == Phase::Window {
            if self.storm_t != 0 && now >= self.storm_t && !self.storm_started {
                self.start_storm(now);
            }
            if now >= self.t1 {
                self.end_window(now);
            }
        }
        if self.phase == Phase::Drain {
            let settled = self.pending.is_empty()
                && self
                    .agents()
                    .all(|c| c.flat_sent == c.flat_acked || c.state != State::Ready);
            if now >= self.drain_until || (settled && now >= self.last_activity + QUIET_NS) {
                self.phase = Phase::Done;
            }
        }
        if now >= self.next_tick {
            self.next_tick = now + TICK_NS;
            self.tick(now, out)?;
        }
        Ok(())
    }

    fn agents(&self) -> impl Iterator<Item = &Conn> {
        self.conns[self.agent_base..].iter()
    }

    fn open_more(&mut self, now: u64) {
        let limit = self.plan.concurrency.max(1);
        while self.opened < self.conns.len() && self.attempting < limit {
            if self.pace_connect.per_s > 0.0 && self.pace_connect.due(now) == 0 {
                break;
            }
            self.pace_connect.done += 1;
            let i = self.opened;
            self.opened += 1;
            self.start_attempt(i, now);
        }
    }

    fn start_window(&mut self) {
        self.phase = Phase::Window;
        self.snap_t0 = self.c.clone();
        self.ready_t0 = self.ready;
        self.cpu_t0 = stats::self_cpu_ns();
        for conn in &self.conns {
            if conn.role == Role::User && conn.state == State::Ready {
                for c in self.plan.user_cluster_list(conn.id) {
                    self.users_by_cluster[c as usize] += 1;
                }
            }
        }
        for pace in [
            &mut self.pace_status,
            &mut self.pace_player,
            &mut self.pace_command,
            &mut self.pace_churn,
        ] {
            pace.start = self.t0.max(1);
        }
        if self.plan.flat_out.is_some() {
            for i in self.agent_base..self.conns.len() {
                if self.conns[i].state == State::Ready {
                    self.fill.push(i as u32);
                }
            }
        }
    }

    fn end_window(&mut self, now: u64) {
        self.phase = Phase::Drain;
        self.snap_t1 = self.c.clone();
        self.ready_t1 = self.ready;
        self.cpu_t1 = stats::self_cpu_ns();
        self.storm.down_at_end = self.agents().filter(|c| c.state != State::Ready).count() as u64;
        for pace in [
            &mut self.pace_status,
            &mut self.pace_player,
            &mut self.pace_command,
            &mut self.pace_churn,
        ] {
            pace.per_s = 0.0;
        }
        self.drain_until = now + self.plan.drain_ms * MS;
        self.last_activity = self.last_activity.max(now);
    }

    fn start_storm(&mut self, now: u64) {
        let drop = self.plan.storm.as_ref().is_some_and(|s| s.drop);
        // Every agent connection lost from now on counts as lost to the storm.
        self.storm_started = true;
        if !drop {
            return;
        }
        self.herd_now = self.plan.storm.as_ref().is_some_and(|s| s.herd);
        for i in self.agent_base..self.conns.len() {
            if self.conns[i].state == State::Ready {
                self.drop_conn(i, STORM_DROP, None, now);
            }
        }
        self.herd_now = false;
    }

    fn in_window(&self, ns: u64) -> bool {
        self.t0 != 0 && ns >= self.t0 && ns < self.t1
    }

    fn run_pacers(&mut self, now: u64) {
        let n = self.pace_status.due(now).min(100_000);
        self.pace_status.done += n;
        for _ in 0..n {
            let i = self.random_agent();
            self.status(i, now);
        }
        let n = self.pace_player.due(now).min(100_000);
        self.pace_player.done += n;
        for _ in 0..n {
            let i = self.random_agent();
            self.player(i, now);
        }
        let n = self.pace_command.due(now).min(100_000);
        self.pace_command.done += n;
        for _ in 0..n {
            self.command(now);
        }
        let n = self.pace_churn.due(now).min(100_000);
        self.pace_churn.done += n;
        for _ in 0..n {
            // Only a connection with nothing left to write: what is still in its buffer
            // was counted as sent, and dropping it would count as lost by the gateway.
            if let Some(i) = self.random_agent() {
                let c = &self.conns[i];
                if c.state == State::Ready && c.wpos >= c.wbuf.len() {
                    self.drop_conn(i, CHURN_DROP, None, now);
                }
            }
        }
    }

    fn random_agent(&mut self) -> Option<usize> {
        let n = (self.conns.len() - self.agent_base) as u64;
        (n > 0).then(|| self.agent_base + self.rng.below(n) as usize)
    }

    // ---- connections ----

    fn set_state(&mut self, i: usize, state: State) {
        let conn = &mut self.conns[i];
        let was = conn.state;
        if was == state {
            return;
        }
        let r = role_index(conn.role);
        if conn.in_progress() {
            self.attempting -= 1;
        }
        if was == State::Ready {
            self.ready[r] -= 1;
        }
        conn.state = state;
        if conn.in_progress() {
            self.attempting += 1;
        }
        match state {
            State::Ready => self.ready[r] += 1,
            State::Stopped => self.stopped[r] += 1,
            _ => {}
        }
    }

    fn next_src(&mut self) -> Option<std::net::Ipv4Addr> {
        if self.plan.sources.is_empty() {
            return None;
        }
        let s = self.plan.sources[self.next_source % self.plan.sources.len()];
        self.next_source += 1;
        Some(s)
    }

    fn start_attempt(&mut self, i: usize, now: u64) {
        self.c.inc(C::Attempts);
        let src = self.next_src();
        let connected = net::connect(src, self.plan.addr);
        let mut sock = match connected.and_then(|s| Stream::new(s, self.connector.as_ref())) {
            Ok(s) => s,
            Err(e) => {
                let cause = net::cause(&e);
                self.set_state(i, State::Connecting);
                self.drop_conn(i, &cause, None, now);
                return;
            }
        };
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            let cause = net::cause(&e);
            self.set_state(i, State::Connecting);
            self.drop_conn(i, &cause, None, now);
            return;
        }
        let conn = &mut self.conns[i];
        conn.sock = Some(sock);
        conn.attempt_ns = now;
        conn.retry_after_ms = 0;
        self.set_state(i, State::Connecting);
        self.arm(
            now + self.plan.attempt_timeout_ms * MS,
            TimerKind::Attempt,
            i,
        );
    }

    fn on_event(&mut self, i: usize, writable: bool, read_closed: bool, rbuf: &mut [u8]) {
        let now = mono_ns();
        match self.conns[i].state {
            State::Connecting => {
                self.on_connecting(i, now);
                // A gateway that refuses at once (503) may have answered and closed
                // before this first event: its edge is gone, so read now.
                if self.conns[i].state == State::Upgrading {
                    self.read_all(i, rbuf, read_closed);
                }
            }
            State::Upgrading | State::Authing | State::Ready => {
                if writable {
                    self.flush(i, now);
                }
                self.read_all(i, rbuf, read_closed);
            }
            _ => {}
        }
    }

    fn on_connecting(&mut self, i: usize, now: u64) {
        let Some(sock) = self.conns[i].sock.as_ref() else {
            return;
        };
        match sock.take_error() {
            Ok(Some(e)) | Err(e) => {
                let cause = net::cause(&e);
                return self.drop_conn(i, &cause, None, now);
            }
            Ok(None) => {}
        }
        match sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => {
                let cause = net::cause(&e);
                return self.drop_conn(i, &cause, None, now);
            }
        }
        let path = match self.conns[i].role {
            Role::Agent => format!("{}/ws/agent", self.plan.base_path),
            _ => format!("{}/ws/client", self.plan.base_path),
        };
        let req = ws::upgrade_request(&self.plan.host, &path, &mut self.rng);
        self.conns[i].wbuf.extend_from_slice(&req);
        self.set_state(i, State::Upgrading);
        self.flush(i, now);
    }

    /// Reads until the socket is empty. After a short read the socket is known to be empty
    /// and data arriving later raises a new edge, so the read that would only say EAGAIN is
    /// saved, unless the peer's FIN already came with this event (no edge would follow).
    fn read_all(&mut self, i: usize, rbuf: &mut [u8], read_closed: bool) {
        loop {
            let gen = self.conns[i].gen;
            let Some(sock) = self.conns[i].sock.as_mut() else {
                return;
            };
            let result = sock.read(rbuf);
            // Taken after the read: everything in the buffer was sent before it.
            let now = mono_ns();
            match result {
                Ok(0) => return self.drop_conn(i, "eof", None, now),
                Ok(n) => {
                    self.c.add(C::BytesIn, n as u64);
                    self.on_bytes(i, &mut rbuf[..n], now);
                    if self.conns[i].gen != gen || (n < rbuf.len() && !read_closed) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let cause = net::cause(&e);
                    return self.drop_conn(i, &cause, None, now);
                }
            }
        }
    }

    fn on_bytes(&mut self, i: usize, buf: &mut [u8], now: u64) {
        if self.conns[i].state == State::Upgrading {
            let conn = &mut self.conns[i];
            conn.head.extend_from_slice(buf);
            match ws::parse_upgrade(&conn.head) {
                Upgrade::Partial => {}
                Upgrade::Garbage => self.drop_conn(i, "bad_upgrade_response", None, now),
                Upgrade::Refused {
                    status,
                    retry_after,
                } => {
                    conn.retry_after_ms = retry_after.unwrap_or(0) * 1000;
                    self.drop_conn(i, &format!("http_{status}"), None, now);
                }
                Upgrade::Switched { head_len } => {
                    let mut rest = conn.head.split_off(head_len);
                    conn.head = Vec::new();
                    self.set_state(i, State::Authing);
                    self.send_auth(i);
                    if !rest.is_empty() {
                        self.decode(i, &mut rest, now);
                    }
                }
            }
            return;
        }
        self.decode(i, buf, now);
    }

    fn decode(&mut self, i: usize, buf: &mut [u8], now: u64) {
        let gen = self.conns[i].gen;
        let mut dec = std::mem::replace(&mut self.conns[i].dec, Decoder::new_client(0));
        let result = dec.decode(buf, |m| self.on_message(i, gen, m, now));
        if self.conns[i].gen != gen {
            return;
        }
        self.conns[i].dec = dec;
        if let Err(reason) = result {
            let code = reason.code();
            self.send_close(i, code);
            self.flush(i, now);
            self.drop_conn(i, &format!("protocol_error_{code}"), None, now);
        }
    }

    fn on_message(&mut self, i: usize, gen: u32, m: Message<'_>, now: u64) -> Flow {
        if self.conns[i].gen != gen {
            return Flow::Stop;
        }
        match m {
            Message::Text(t) => {
                self.c.inc(C::MsgsIn);
                self.on_text(i, t, now);
            }
            Message::Binary(_) => {
                self.c.inc(C::MsgsIn);
                self.c.inc(C::Other);
            }
            Message::Ping(p) => {
                let mask = self.rng.mask();
                let conn = &mut self.conns[i];
                ws::push_frame(&mut conn.wbuf, OP_PONG, p, mask);
                self.c.inc(C::Pongs);
                self.mark_dirty(i);
            }
            Message::Pong(p) => self.on_pong(i, p, now),
            Message::Close(code, _) => {
                let key = code.map_or("none".to_string(), |c| c.to_string());
                stats::tally(&mut self.close_codes, &key);
                self.send_close(i, code.unwrap_or(1000));
                self.flush(i, now);
                let cause = format!("close_{key}");
                self.drop_conn(i, &cause, code, now);
            }
        }
        if self.conns[i].gen == gen {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }

    fn on_text(&mut self, i: usize, t: &str, now: u64) {
        let Some(event) = msg::event(t) else {
            self.c.inc(C::Other);
            return;
        };
        match event {
            "authenticated" => self.on_authenticated(i, now),
            "server:updated" | "player:joined" | "player:left" => self.on_delivery(i, t, now),
            "heartbeat" | "metrics" | "notification" => {
                self.c.inc(C::Deliveries);
            }
            "machine:online" | "machine:offline" => self.c.inc(C::Presence),
            "command" if self.conns[i].role == Role::Agent => {
                self.c.inc(C::CommandsReceived);
                if let Some(id) = msg::str_after(t, r#""id":""#) {
                    let due = now + self.plan.command_latency_ms * MS;
                    let conn = &mut self.conns[i];
                    let first = conn.replies.is_empty();
                    conn.replies.push_back((due, id.into()));
                    if first {
                        self.arm(due, TimerKind::Reply, i);
                    }
                }
            }
            "command:response" => {
                if let Some(started) = self.request_of(t) {
                    self.c.inc(C::CommandsOk);
                    self.record(Hist::Command, now.saturating_sub(started));
                    self.last_activity = now;
                }
            }
            "error" => {
                self.c.inc(C::ErrorEvents);
                let code = msg::str_after(t, r#""code":""#).unwrap_or("UNKNOWN");
                stats::tally(&mut self.errors_by_code, code);
                if code == "COMMAND_FAILED" && self.request_of(t).is_some() {
                    self.c.inc(C::CommandsFailed);
                    self.last_activity = now;
                }
            }
            "token:expiring" => {
                self.c.inc(C::TokenExpiring);
                // A good client refreshes its token on the live connection.
                self.send_auth(i);
            }
            _ => self.c.inc(C::Other),
        }
    }

    /// The send time of the request this answer names (removing it), if it is ours.
    fn request_of(&mut self, t: &str) -> Option<u64> {
        let n = msg::num_after(t.as_bytes(), &self.req_key)?;
        self.pending.remove(&n)
    }

    fn on_delivery(&mut self, i: usize, t: &str, now: u64) {
        self.c.inc(C::Deliveries);
        let Relay::Ours(Relayed {
            agent,
            seq,
            sent_ns: sent,
        }) = self.relay.read(t)
        else {
            self.c.inc(C::Foreign);
            return;
        };
        self.c.inc(C::SeqDeliveries);
        let last = self.conns[i].seen.entry(agent).or_insert(0);
        if seq <= *last {
            self.c.inc(C::Duplicates);
            return;
        }
        let gap = seq - *last - 1;
        *last = seq;
        self.c.add(C::Gaps, gap);
        if sent > 0 && sent <= now {
            self.record(Hist::Delivery, now - sent);
        }
        if self.in_window(sent) {
            self.c.inc(C::WindowUnique);
        }
        self.last_activity = now;
    }

    fn record(&mut self, h: Hist, ns: u64) {
        self.hists[h.index()].record_ns(ns);
        if h == self.plan.scenario.primary() {
            self.interval.record_ns(ns);
        }
    }

    fn token(&self, i: usize) -> String {
        let conn = &self.conns[i];
        let ttl = Duration::from_secs(self.plan.token_ttl_s.max(60));
        let spec = match conn.role {
            Role::Agent => TokenSpec {
                role: "agent".into(),
                sub: self.plan.machine_id(conn.id),
                cluster: Some(self.plan.cluster_id(conn.cluster)),
                ttl,
                ..TokenSpec::default()
            },
            Role::User => TokenSpec {
                role: "user".into(),
                sub: format!("usr_{}_{}", self.plan.run_id, conn.id),
                clusters: Some(
                    self.plan
                        .user_cluster_list(conn.id)
                        .into_iter()
                        .map(|c| self.plan.cluster_id(c))
                        .collect(),
                ),
                ttl,
                ..TokenSpec::default()
            },
            Role::Service => TokenSpec {
                role: "service".into(),
                sub: format!("arcgate-load-{}-{}", self.plan.run_id, conn.id),
                ttl,
                ..TokenSpec::default()
            },
        };
        mint_hs256(&self.plan.secret, &spec, unix_s())
    }

    fn send_auth(&mut self, i: usize) {
        let token = self.token(i);
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        match self.conns[i].role {
            Role::Agent => msg::agent_auth(&mut payload, &token, &self.conns[i].machine_id),
            _ => msg::client_auth(&mut payload, &token),
        }
        self.write_text(i, &payload);
        self.scratch = payload;
    }

    fn on_authenticated(&mut self, i: usize, now: u64) {
        if self.conns[i].state != State::Authing {
            return;
        }
        self.set_state(i, State::Ready);
        self.c.inc(C::Authenticated);
        let conn = &mut self.conns[i];
        conn.backoff_ms = BACKOFF_MIN_MS;
        let started = conn.attempt_ns;
        let storm_drop = conn.storm_drop_ns;
        let recovered = conn.storm_recovered;
        self.record(Hist::Connect, now.saturating_sub(started));
        if storm_drop != 0 && !recovered {
            self.conns[i].storm_recovered = true;
            self.storm.recovered += 1;
            self.storm.last_recovery_ns = now;
            self.record(Hist::Reconnect, now.saturating_sub(storm_drop));
        }
        if self.conns[i].role != Role::Agent {
            return;
        }
        if !self.conns[i].hb_armed {
            self.conns[i].hb_armed = true;
            self.conns[i].up_since_s = unix_s().saturating_sub(self.rng.below(86_400 * 30));
            if self.plan.heartbeat_ms > 0 {
                let at = now + self.rng.below(self.plan.heartbeat_ms * MS);
                self.arm(at, TimerKind::Heartbeat, i);
            }
            if self.plan.metrics_ms > 0 {
                let at = now + self.rng.below(self.plan.metrics_ms * MS);
                self.arm(at, TimerKind::Metrics, i);
            }
        }
        let queued = std::mem::take(&mut self.conns[i].queue);
        self.c.add(C::QueuedResent, queued.len() as u64);
        for q in queued {
            self.write_msg(i, q.kind, &q.payload, q.sent_ns);
        }
        if self.phase == Phase::Window && self.plan.flat_out.is_some() {
            self.fill.push(i as u32);
        }
    }

    /// Ends the current connection of `i` and decides what comes next (section 8 of the
    /// protocol): stop for 4001 and 4009, at least 30 s for 4008, `Retry-After` for a 503,
    /// otherwise a full-jitter exponential backoff from 1 s to 30 s.
    fn drop_conn(&mut self, i: usize, cause: &str, close_code: Option<u16>, now: u64) {
        let was = self.conns[i].state;
        if let Some(mut sock) = self.conns[i].sock.take() {
            let _ = self.poll.registry().deregister(&mut sock);
        }
        let max = self.plan.max_message;
        let conn = &mut self.conns[i];
        conn.gen = conn.gen.wrapping_add(1);
        conn.head = Vec::new();
        conn.dec = Decoder::new_client(max);
        conn.wbuf = Vec::new();
        conn.wpos = 0;
        self.flat_unacked += conn.flat_sent - conn.flat_acked.min(conn.flat_sent);
        conn.flat_sent = 0;
        conn.flat_acked = 0;
        conn.flat_pinged = 0;
        conn.pings.clear();
        if was == State::Ready {
            self.c.inc(C::Disconnects);
            if cause == STORM_DROP || cause == CHURN_DROP {
                self.c.inc(C::SelfDrops);
            }
            stats::tally(&mut self.disconnects, cause);
            // By the clock, not the flag: a restart's first closes may be read in the same
            // loop turn that reaches the storm's start.
            let storm = self.storm_t != 0 && now >= self.storm_t && self.plan.storm.is_some();
            if conn.role == Role::Agent && storm && conn.storm_drop_ns == 0 {
                conn.storm_drop_ns = now;
                self.storm.dropped += 1;
            }
        } else {
            self.c.inc(C::ConnectFailures);
            stats::tally(&mut self.connect_failures, cause);
        }
        let conn = &mut self.conns[i];
        let jitter = self.rng.below(conn.backoff_ms + 1);
        let next = next_step(close_code, conn.retry_after_ms, jitter, self.herd_now);
        conn.backoff_ms = grow_backoff(conn.backoff_ms);
        match next {
            Next::Retry { after_ms } if self.phase != Phase::Done => {
                self.set_state(i, State::Waiting);
                self.arm(now + after_ms * MS, TimerKind::Reconnect, i);
            }
            _ => self.set_state(i, State::Stopped),
        }
    }

    // ---- writing ----

    fn mark_dirty(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(i as u32);
        }
    }

    fn write_text(&mut self, i: usize, payload: &[u8]) {
        let mask = self.rng.mask();
        ws::push_frame(&mut self.conns[i].wbuf, OP_TEXT, payload, mask);
        self.c.inc(C::MsgsOut);
        self.c.add(C::BytesOut, payload.len() as u64);
        self.mark_dirty(i);
    }

    fn send_close(&mut self, i: usize, code: u16) {
        let mask = self.rng.mask();
        ws::push_close(&mut self.conns[i].wbuf, code, mask);
        self.mark_dirty(i);
    }

    /// Writes an agent's message on its live connection, counting it by kind.
    fn write_msg(&mut self, i: usize, kind: Kind, payload: &[u8], sent_ns: u64) {
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
    fn send_or_queue(&mut self, i: usize, kind: Kind, sent_ns: u64) {
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

    fn flush(&mut self, i: usize, now: u64) {
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

    fn flush_dirty(&mut self) {
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

    // ---- agent behaviour ----

    fn figures(&mut self, i: usize) -> msg::Figures {
        msg::Figures {
            seed: self.rng.next_u64(),
            uptime_s: unix_s().saturating_sub(self.conns[i].up_since_s),
        }
    }

    fn heartbeat(&mut self, i: usize, now: u64) {
        if self.conns[i].state == State::Stopped || self.phase == Phase::Done {
            return;
        }
        self.arm(now + self.plan.heartbeat_ms * MS, TimerKind::Heartbeat, i);
        let fig = self.figures(i);
        let conn = &mut self.conns[i];
        conn.hb_seq += 1;
        self.scratch.clear();
        msg::heartbeat(
            &mut self.scratch,
            &conn.machine_id,
            conn.hb_seq,
            now,
            unix_ms(),
            &fig,
        );
        self.send_or_queue(i, Kind::Heartbeat, now);
    }

    fn metrics(&mut self, i: usize, now: u64) {
        if self.conns[i].state == State::Stopped || self.phase == Phase::Done {
            return;
        }
        self.arm(now + self.plan.metrics_ms * MS, TimerKind::Metrics, i);
        let fig = self.figures(i);
        let conn = &mut self.conns[i];
        conn.hb_seq += 1;
        self.scratch.clear();
        msg::metrics(&mut self.scratch, &conn.machine_id, conn.hb_seq, now, &fig);
        self.send_or_queue(i, Kind::Metrics, now);
    }

    fn build_status(&mut self, i: usize, now: u64) {
        let r = self.rng.next_u64();
        let conn = &mut self.conns[i];
        conn.seq += 1;
        self.scratch.clear();
        msg::status(
            &mut self.scratch,
            conn.seq,
            now,
            conn.id,
            r % 4,
            msg::STATUSES[(r >> 8) as usize % msg::STATUSES.len()],
            (r >> 16) % 33,
        );
    }

    fn status(&mut self, i: Option<usize>, now: u64) {
        let Some(i) = i else { return };
        self.build_status(i, now);
        self.send_or_queue(i, Kind::Status, now);
    }

    fn player(&mut self, i: Option<usize>, now: u64) {
        let Some(i) = i else { return };
        let r = self.rng.next_u64();
        let conn = &mut self.conns[i];
        conn.seq += 1;
        self.scratch.clear();
        msg::player(
            &mut self.scratch,
            r & 1 == 0,
            conn.seq,
            now,
            conn.id,
            (r >> 1) % 4,
            (r >> 8) % 100_000,
        );
        self.send_or_queue(i, Kind::Player, now);
    }

    fn replies(&mut self, i: usize, now: u64) {
        while let Some((due, _)) = self.conns[i].replies.front() {
            if *due > now {
                let due = *due;
                self.arm(due, TimerKind::Reply, i);
                return;
            }
            let Some((_, id)) = self.conns[i].replies.pop_front() else {
                return;
            };
            self.scratch.clear();
            msg::command_response(&mut self.scratch, &id);
            self.send_or_queue(i, Kind::Response, now);
        }
    }

    /// The service issues one command to a random agent of the whole fleet.
    fn command(&mut self, now: u64) {
        let Some(i) = self.service else {
            return;
        };
        if self.conns[i].state != State::Ready || self.plan.agents == 0 {
            return;
        }
        let agent = self.rng.below(u64::from(self.plan.agents)) as u32;
        let kind = msg::COMMANDS[self.rng.below(msg::COMMANDS.len() as u64) as usize];
        let req = self.next_req;
        self.next_req += 1;
        let id = self.plan.machine_id(agent);
        self.scratch.clear();
        msg::command(
            &mut self.scratch,
            self.plan.proc_index,
            req,
            &id,
            kind,
            agent,
        );
        self.pending.insert(req, now);
        let payload = std::mem::take(&mut self.scratch);
        self.write_msg(i, Kind::Command, &payload, now);
        self.scratch = payload;
    }

    // ---- flat out ----

    fn run_fill(&mut self, now: u64) {
        if self.fill.is_empty() {
            return;
        }
        let fill = std::mem::take(&mut self.fill);
        if self.phase == Phase::Window && now < self.t1 {
            for &i in &fill {
                self.fill_one(i as usize, now);
            }
        }
    }

    fn fill_one(&mut self, i: usize, now: u64) {
        let Some(what) = self.plan.flat_out else {
            return;
        };
        let limit = u64::from(self.plan.in_flight.max(1));
        let batch = (limit / 2).max(1);
        while self.conns[i].state == State::Ready
            && self.conns[i].flat_sent - self.conns[i].flat_acked < limit
        {
            match what {
                FlatOut::Heartbeat => {
                    let fig = self.figures(i);
                    let conn = &mut self.conns[i];
                    conn.hb_seq += 1;
                    self.scratch.clear();
                    msg::heartbeat(
                        &mut self.scratch,
                        &conn.machine_id,
                        conn.hb_seq,
                        now,
                        unix_ms(),
                        &fig,
                    );
                    self.send_or_queue(i, Kind::Heartbeat, now);
                }
                FlatOut::Status => {
                    self.build_status(i, now);
                    self.send_or_queue(i, Kind::Status, now);
                }
            }
            self.c.inc(C::FlatSent);
            let conn = &mut self.conns[i];
            conn.flat_sent += 1;
            if conn.flat_sent - conn.flat_pinged >= batch {
                self.ping(i, now);
            }
        }
        if self.conns[i].flat_sent > self.conns[i].flat_pinged {
            self.ping(i, now);
        }
    }

    fn ping(&mut self, i: usize, now: u64) {
        let mask = self.rng.mask();
        let conn = &mut self.conns[i];
        conn.flat_pinged = conn.flat_sent;
        conn.pings.push_back((conn.flat_sent, now));
        ws::push_frame(&mut conn.wbuf, OP_PING, &conn.flat_sent.to_be_bytes(), mask);
        self.mark_dirty(i);
    }

    fn on_pong(&mut self, i: usize, p: &[u8], now: u64) {
        let Ok(bytes) = <[u8; 8]>::try_from(p) else {
            return;
        };
        let n = u64::from_be_bytes(bytes);
        let mut acked_any = false;
        while let Some(&(count, sent)) = self.conns[i].pings.front() {
            if count > n {
                break;
            }
            self.conns[i].pings.pop_front();
            self.record(Hist::Ack, now.saturating_sub(sent));
            acked_any = true;
        }
        let conn = &mut self.conns[i];
        if acked_any && n > conn.flat_acked && n <= conn.flat_sent {
            self.c.add(C::FlatAcked, n - conn.flat_acked);
            conn.flat_acked = n;
            self.last_activity = now;
            self.fill.push(i as u32);
        }
    }

    // ---- coordinator ----

    fn read_control(&mut self, fd: i32) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a stack buffer we own from our stdin descriptor.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                // The coordinator is gone: stop.
                self.phase = Phase::Done;
                return;
            }
            if n < 0 {
                return;
            }
            self.control.extend_from_slice(&buf[..n as usize]);
            while let Some(nl) = memchr::memchr(b'\n', &self.control) {
                let line: Vec<u8> = self.control.drain(..=nl).collect();
                self.on_control(String::from_utf8_lossy(&line).trim());
            }
        }
    }

    fn on_control(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("go") => {
                let mut n = || {
                    words
                        .next()
                        .and_then(|w| w.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                self.t0 = n().max(1);
                self.t1 = n().max(self.t0);
                let storm = n();
                self.storm_t = if storm == 0 { 0 } else { storm };
            }
            Some("stop") => self.phase = Phase::Done,
            _ => {}
        }
    }

    fn tick(&mut self, now: u64, out: &mut dyn Write) -> anyhow::Result<()> {
        let tick = Tick {
            at_ns: now,
            ready: self.ready.iter().sum(),
            target: self.conns.len() as u64,
            counters: self.c.clone(),
            errors: stats::errors(&self.c),
            interval: self.interval.to_data(),
        };
        self.interval.0.reset();
        writeln!(out, "tick {}", serde_json::to_string(&tick)?)?;
        out.flush()?;
        Ok(())
    }

    fn role_count(&self, role: Role) -> RoleCount {
        let r = role_index(role);
        RoleCount {
            target: self.conns.iter().filter(|c| c.role == role).count() as u64,
            ready_at_start: self.ready_t0[r],
            ready_at_end: self.ready_t1[r],
            stopped: self.stopped[r],
        }
    }

    fn finish(mut self, out: &mut dyn Write) -> anyhow::Result<()> {
        let now = mono_ns();
        if self.t1 == 0 {
            // Stopped before the window: report what was seen so far.
            self.snap_t0 = self.c.clone();
            self.snap_t1 = self.c.clone();
        }
        for i in 0..self.conns.len() {
            if self.conns[i].state == State::Ready {
                self.send_close(i, 1000);
                self.flush(i, now);
            }
        }
        let result = WorkerResult {
            proc_index: self.plan.proc_index,
            setup_start_ns: self.setup_start,
            setup_end_ns: self.setup_end,
            setup_complete: self.setup_complete,
            t0: self.t0,
            t1: self.t1,
            end_ns: now,
            total: self.c.clone(),
            setup: self.snap_setup.clone(),
            window: self.snap_t1.since(&self.snap_t0),
            agents: self.role_count(Role::Agent),
            users: self.role_count(Role::User),
            services: self.role_count(Role::Service),
            errors_by_code: std::mem::take(&mut self.errors_by_code),
            close_codes: std::mem::take(&mut self.close_codes),
            connect_failures: std::mem::take(&mut self.connect_failures),
            disconnects: std::mem::take(&mut self.disconnects),
            sent_by_cluster: std::mem::take(&mut self.sent_by_cluster),
            users_by_cluster: std::mem::take(&mut self.users_by_cluster),
            hists: self.hists.iter().map(Lat::to_data).collect(),
            storm: self.plan.storm.as_ref().map(|_| self.storm),
            commands_unanswered: self.pending.len() as u64,
            flat_unacked: self.flat_unacked
                + self
                    .agents()
                    .map(|c| c.flat_sent - c.flat_acked.min(c.flat_sent))
                    .sum::<u64>(),
            cpu_ns_window: self.cpu_t1.saturating_sub(self.cpu_t0),
        };
        writeln!(out, "result {}", serde_json::to_string(&result)?)?;
        out.flush()?;
        Ok(())
    }
}

/// What a client does after losing its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Stop,
    Retry { after_ms: u64 },
}

/// Section 8 of the protocol: 4001 (auth failed; a new token is needed) and 4009 (replaced
/// by a newer connection) stop; 4008 (rate limit) waits at least 30 s; a 503's
/// `Retry-After` is honoured; everything else (1001, 1006, 1011, 1012, 1013, 4000, 4002, a
/// failed attempt...) waits `jitter`, a uniform draw from 0 to the current backoff (full
/// jitter), or nothing when the storm reconnects the whole herd at once.
fn next_step(close_code: Option<u16>, retry_after_ms: u64, jitter: u64, herd: bool) -> Next {
    let after_ms = match close_code {
        Some(4001) | Some(4009) => return Next::Stop,
        Some(4008) => 30_000 + jitter,
        _ if retry_after_ms > 0 => retry_after_ms.max(jitter),
        _ if herd => 0,
        _ => jitter,
    };
    Next::Retry { after_ms }
}

/// The next backoff ceiling: doubled, at most 30 s.
fn grow_backoff(ms: u64) -> u64 {
    (ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS)
}

fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_decide_what_comes_next() {
        assert_eq!(next_step(Some(4001), 0, 500, false), Next::Stop);
        assert_eq!(next_step(Some(4009), 0, 500, true), Next::Stop);
        assert_eq!(
            next_step(Some(4008), 0, 500, false),
            Next::Retry { after_ms: 30_500 }
        );
        for code in [
            None,
            Some(1000),
            Some(1001),
            Some(1012),
            Some(1013),
            Some(4000),
            Some(4002),
        ] {
            assert_eq!(
                next_step(code, 0, 700, false),
                Next::Retry { after_ms: 700 }
            );
            assert_eq!(next_step(code, 0, 700, true), Next::Retry { after_ms: 0 });
        }
        assert_eq!(
            next_step(None, 3_000, 700, false),
            Next::Retry { after_ms: 3_000 }
        );
        assert_eq!(
            next_step(None, 3_000, 7_000, true),
            Next::Retry { after_ms: 7_000 }
        );
    }

    #[test]
    fn pace_counts_what_is_due() {
        let mut p = Pace::new(100.0);
        assert_eq!(p.due(5 * SEC), 0, "not started");
        p.start = SEC;
        assert_eq!(p.due(SEC + SEC / 2), 50);
        p.done = 50;
        assert_eq!(p.due(SEC + SEC / 2), 0);
        assert_eq!(p.next_at(), Some(SEC + 510 * MS));
        assert_eq!(Pace::new(0.0).next_at(), None);
    }

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let mut b = BACKOFF_MIN_MS;
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(b);
            b = grow_backoff(b);
        }
        assert_eq!(
            seen,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
    }
}
