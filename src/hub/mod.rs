//! Routing between connections and workers: which worker holds which machine, the
//! per-worker subscription index, cross-worker inboxes, commands in flight (from
//! connections and from the admin API), and the latest state each local agent reported.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::SegQueue;
use dashmap::DashMap;
use indexmap::{IndexMap, IndexSet};

use crate::auth::{Identity, Role};
use crate::conn::ConnMap;
use crate::io::conns::Queued;
use crate::io::{ConnId, Conns, Notifier};
use crate::metrics::{Metrics, WorkerMetrics};
use crate::protocol::envelope::{self, ErrorCode};
use crate::protocol::session::CLOSE_REPLACED;
use crate::worker::Settings;

/// Servers whose latest `server:status` is kept per machine; further server ids are not
/// recorded (they are still relayed).
pub const MAX_SERVERS: usize = 1024;
/// Bytes of `server:status` data kept per machine.
pub const MAX_SERVER_BYTES: usize = 1 << 20;

/// Why a command got no answer from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    NotConnected,
    Forbidden,
    /// The agent's connection was gone when the command reached its worker.
    Gone,
    /// The agent's connection ended before it answered.
    Disconnected,
    TimedOut,
    /// The gateway is shutting down.
    Draining,
}

impl Failure {
    /// The `COMMAND_FAILED` message.
    pub fn message(self) -> &'static str {
        match self {
            Failure::NotConnected => "machine not connected",
            Failure::Forbidden => "forbidden",
            Failure::Gone => "machine disconnected",
            Failure::Disconnected => "machine disconnected before answering",
            Failure::TimedOut => "command timed out",
            Failure::Draining => "the gateway is shutting down",
        }
    }

    /// The index of its `outcome` label (metrics::OUTCOMES).
    fn outcome(self) -> usize {
        match self {
            Failure::TimedOut => 1,
            Failure::Gone | Failure::Disconnected => 2,
            Failure::NotConnected => 3,
            Failure::Forbidden => 4,
            Failure::Draining => 5,
        }
    }
}

/// What an admin API command gets back: the agent's `data`, or why not.
pub type CommandOutcome = Result<Bytes, Failure>;

/// One connected machine as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineInfo {
    pub machine_id: Box<str>,
    pub cluster_id: Arc<str>,
    pub version: Box<str>,
    /// Unix milliseconds.
    pub connected_at: u64,
    /// Unix milliseconds of the last `heartbeat`.
    pub last_heartbeat: Option<u64>,
    /// Only for a single machine: the latest reports, as JSON object texts.
    pub detail: Option<MachineDetail>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDetail {
    pub heartbeat: Option<String>,
    pub metrics: Option<String>,
    /// The latest `server:status` data of each server, in the order they first appeared.
    pub servers: Vec<String>,
}

/// A request of the admin API to a worker; answers go back over the channel.
#[derive(Debug)]
pub enum AdminRequest {
    /// The machines connected to this worker.
    Machines { reply: Sender<Vec<MachineInfo>> },
    /// One machine of this worker with its latest reports; `None` if it is not here.
    Machine {
        machine_id: Box<str>,
        reply: Sender<Option<MachineInfo>>,
    },
    /// A command for a machine (the worker holding it, ideally); `data` is a JSON object.
    Command {
        machine_id: Box<str>,
        data: Box<str>,
        reply: Sender<CommandOutcome>,
    },
    /// A notification for a cluster; `data` is the relayed JSON object.
    Notify {
        cluster_id: Box<str>,
        data: Box<str>,
    },
}

/// A message from one worker to another.
#[derive(Debug)]
pub enum Msg {
    /// Deliver an encoded event to this worker's subscribers of `cluster`.
    Deliver {
        cluster: Arc<str>,
        frame: Bytes,
        services_only: bool,
    },
    /// Queue a command frame on a local agent; `from`/`seq` name the pending command.
    ToAgent {
        conn: ConnId,
        frame: Bytes,
        from: u16,
        seq: u64,
        deadline: Instant,
    },
    /// The outcome of this worker's pending command `seq`: the agent's data, or why not.
    CommandResult { seq: u64, result: CommandOutcome },
    /// Close a local connection on the gateway's initiative.
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
    /// A request of the admin API.
    Admin(AdminRequest),
    /// New settings after a reload (handled by the worker).
    Reload(Arc<Settings>),
    /// Close the local connections of subject `sub` with 4001 (handled by the worker).
    Revoke { sub: Arc<str> },
}

/// A worker's inbox: a lock-free queue plus its wake-up.
pub struct Inbox {
    pub queue: SegQueue<Msg>,
    pub notifier: Arc<Notifier>,
    /// Client connections (users and services) on that worker, and services among them:
    /// fan-out skips workers with no one to deliver to.
    pub clients: AtomicUsize,
    pub services: AtomicUsize,
}

/// Where a connected machine lives.
#[derive(Debug, Clone)]
pub struct AgentLoc {
    pub worker: u16,
    pub conn: ConnId,
    pub cluster: Arc<str>,
}

/// State every worker shares.
pub struct Shared {
    pub inboxes: Vec<Inbox>,
    /// machineId → its live connection.
    pub machines: DashMap<Box<str>, AgentLoc>,
    /// Random per process, part of every command id: an agent resending an answer
    /// to a restarted gateway cannot complete a new command that reuses the number.
    pub nonce: u32,
    /// Every worker's counters.
    pub metrics: Arc<Metrics>,
}

impl Shared {
    pub fn new(notifiers: Vec<Arc<Notifier>>) -> Shared {
        let workers = notifiers.len();
        Shared {
            metrics: Arc::new(Metrics::new(workers)),
            inboxes: notifiers
                .into_iter()
                .map(|notifier| Inbox {
                    queue: SegQueue::new(),
                    notifier,
                    clients: AtomicUsize::new(0),
                    services: AtomicUsize::new(0),
                })
                .collect(),
            machines: DashMap::new(),
            nonce: {
                let mut b = [0u8; 4];
                // Without randomness the ids are still unique within this process.
                let _ = getrandom::fill(&mut b);
                u32::from_ne_bytes(b)
            },
        }
    }

    pub fn post(&self, worker: u16, msg: Msg) {
        let inbox = &self.inboxes[usize::from(worker)];
        inbox.queue.push(msg);
        inbox.notifier.notify();
    }
}

/// Who waits for a command's answer.
#[derive(Debug)]
enum Issuer {
    /// A client connection, with the id of its request.
    Conn { id: ConnId, req_id: Box<str> },
    /// An admin API request.
    Http(Sender<CommandOutcome>),
}

struct Pending {
    issuer: Issuer,
    issued: Instant,
}

/// What a local agent reported last (PROTOCOL.md section 4), for the admin API.
#[derive(Debug)]
struct AgentState {
    machine_id: Box<str>,
    cluster: Arc<str>,
    version: Box<str>,
    connected_at: u64,
    /// Allocated at the first report: an agent that has sent none holds no buffers.
    reports: Option<Box<Reports>>,
}

/// The latest reports of one agent.
#[derive(Debug, Default)]
struct Reports {
    last_heartbeat: Option<u64>,
    /// JSON object texts; empty until reported. Buffers are reused between reports.
    heartbeat: Vec<u8>,
    metrics: Vec<u8>,
    servers: IndexMap<Box<str>, Vec<u8>>,
    server_bytes: usize,
}

impl AgentState {
    fn info(&self, detail: bool) -> MachineInfo {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let opt = |b: &[u8]| (!b.is_empty()).then(|| text(b));
        let none = Reports::default();
        let r = self.reports.as_deref().unwrap_or(&none);
        MachineInfo {
            machine_id: self.machine_id.clone(),
            cluster_id: self.cluster.clone(),
            version: self.version.clone(),
            connected_at: self.connected_at,
            last_heartbeat: r.last_heartbeat,
            detail: detail.then(|| MachineDetail {
                heartbeat: opt(&r.heartbeat),
                metrics: opt(&r.metrics),
                servers: r.servers.values().map(|v| text(v)).collect(),
            }),
        }
    }
}

impl Reports {
    /// Keeps the latest `server:status` of `server_id` within the per-machine bounds.
    fn record_server(&mut self, server_id: &str, data: &str) {
        let old = self.servers.get(server_id).map_or(0, Vec::len);
        let fits = self.server_bytes - old + data.len() <= MAX_SERVER_BYTES;
        if !fits || (old == 0 && self.servers.len() >= MAX_SERVERS) {
            return;
        }
        self.server_bytes = self.server_bytes - old + data.len();
        match self.servers.get_mut(server_id) {
            Some(buf) => replace(buf, data),
            None => {
                self.servers
                    .insert(server_id.into(), data.as_bytes().to_vec());
            }
        }
    }
}

fn replace(buf: &mut Vec<u8>, data: &str) {
    buf.clear();
    buf.extend_from_slice(data.as_bytes());
}

#[derive(serde::Deserialize)]
struct ServerIdOnly<'a> {
    #[serde(borrow, rename = "serverId")]
    server_id: Cow<'a, str>,
}

/// A command an agent on this worker received and has not answered yet.
struct Outstanding {
    from: u16,
    seq: u64,
    deadline: Instant,
}

/// A close the worker must carry out through the connection's session.
pub type CloseRequest = (ConnId, u16, &'static str);

/// One worker's routing state.
pub struct Hub {
    pub index: u16,
    pub shared: Arc<Shared>,
    users: HashMap<Box<str>, IndexSet<ConnId>>,
    services: IndexSet<ConnId>,
    pending: HashMap<u64, Pending>,
    next_seq: u64,
    outstanding: HashMap<ConnId, Vec<Outstanding>>,
    agents: ConnMap<AgentState>,
    /// The clusters of this worker's agents, one shared copy each, with how many agents
    /// hold it (forgotten with the last one).
    clusters: HashMap<Arc<str>, usize>,
    pub command_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Connections whose outbound queue overflowed: the worker closes them with 1013.
    pub overflowed: Vec<ConnId>,
    /// Closes requested by routing (replaced agents).
    pub closes: Vec<CloseRequest>,
    /// Timers of pending commands the worker must arm: (key, deadline).
    pub timers: Vec<(u64, Instant)>,
}

/// Timer key flag for pending commands (connection keys never set the top bit).
pub const COMMAND_TIMER: u64 = 1 << 63;

impl Hub {
    pub fn new(index: u16, shared: Arc<Shared>, command_timeout: Duration) -> Hub {
        Hub {
            index,
            metrics: shared.metrics.clone(),
            shared,
            users: HashMap::new(),
            services: IndexSet::new(),
            pending: HashMap::new(),
            next_seq: 0,
            outstanding: HashMap::new(),
            agents: ConnMap::default(),
            clusters: HashMap::new(),
            command_timeout,
            overflowed: Vec::new(),
            closes: Vec::new(),
            timers: Vec::new(),
        }
    }

    fn m(&self) -> &WorkerMetrics {
        self.metrics.worker(self.index)
    }

    fn send(&mut self, conns: &mut Conns, id: ConnId, frame: Bytes) {
        let len = frame.len() as u64;
        match conns.send(id, frame) {
            Queued::Gone => return,
            Queued::Overflow => self.overflowed.push(id),
            Queued::Ok => {}
        }
        let m = self.m();
        m.messages_out.add(1);
        m.bytes_out.add(len);
    }

    /// A connection authenticated: agents are registered (replacing an older connection
    /// of the same machine) and announced; clients subscribe.
    pub fn online(
        &mut self,
        conns: &mut Conns,
        id: ConnId,
        who: &Identity,
        version: &str,
        ts: u64,
    ) {
        match who.role {
            Role::Agent => {
                let cluster = self.intern_cluster(who.cluster.as_deref().unwrap_or_default());
                let loc = AgentLoc {
                    worker: self.index,
                    conn: id,
                    cluster: cluster.clone(),
                };
                self.agents.insert(
                    id,
                    AgentState {
                        machine_id: who.sub.clone(),
                        cluster: cluster.clone(),
                        version: version.into(),
                        connected_at: ts,
                        reports: None,
                    },
                );
                if let Some(old) = self.shared.machines.insert(who.sub.clone(), loc) {
                    let (conn, code) = (old.conn, CLOSE_REPLACED);
                    let reason = "replaced by a newer connection of this machine";
                    if old.worker == self.index {
                        self.closes.push((conn, code, reason));
                    } else {
                        self.shared
                            .post(old.worker, Msg::Close { conn, code, reason });
                    }
                }
                let frame =
                    envelope::machine_presence("machine:online", &who.sub, &cluster, version, ts);
                self.fan_out(conns, cluster, frame, false);
            }
            Role::User => {
                for c in &who.clusters {
                    self.users.entry(c.clone()).or_default().insert(id);
                }
                self.shared.inboxes[usize::from(self.index)]
                    .clients
                    .fetch_add(1, Ordering::Relaxed);
            }
            Role::Service => {
                self.services.insert(id);
                let inbox = &self.shared.inboxes[usize::from(self.index)];
                inbox.clients.fetch_add(1, Ordering::Relaxed);
                inbox.services.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// An authenticated connection ended: unsubscribe, or unregister and announce the
    /// machine (unless a newer connection replaced it) and fail its unanswered commands.
    pub fn offline(&mut self, conns: &mut Conns, id: ConnId, who: &Identity, ts: u64) {
        match who.role {
            Role::Agent => {
                let index = self.index;
                let removed = self
                    .shared
                    .machines
                    .remove_if(&who.sub, |_, loc| loc.worker == index && loc.conn == id);
                let agent = self.agents.remove(id);
                if let (Some((_, loc)), Some(agent)) = (removed, &agent) {
                    let frame = envelope::machine_presence(
                        "machine:offline",
                        &who.sub,
                        &loc.cluster,
                        &agent.version,
                        ts,
                    );
                    self.fan_out(conns, loc.cluster, frame, false);
                }
                if let Some(agent) = agent {
                    self.release_cluster(agent.cluster);
                }
                for o in self.outstanding.remove(&id).unwrap_or_default() {
                    self.result(conns, o.from, o.seq, Err(Failure::Disconnected), ts);
                }
            }
            Role::User => {
                for c in &who.clusters {
                    if let Some(set) = self.users.get_mut(c) {
                        set.swap_remove(&id);
                        if set.is_empty() {
                            self.users.remove(c);
                        }
                    }
                }
                self.shared.inboxes[usize::from(self.index)]
                    .clients
                    .fetch_sub(1, Ordering::Relaxed);
            }
            Role::Service => {
                self.services.swap_remove(&id);
                let inbox = &self.shared.inboxes[usize::from(self.index)];
                inbox.clients.fetch_sub(1, Ordering::Relaxed);
                inbox.services.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// An agent event: encoded once, delivered here and to every other worker with clients.
    #[allow(clippy::too_many_arguments)]
    pub fn relay(
        &mut self,
        conns: &mut Conns,
        event: &str,
        machine_id: &str,
        cluster_id: &str,
        data: &str,
        services_only: bool,
        ts: u64,
    ) {
        if !self.has_receivers(cluster_id, services_only) {
            return;
        }
        let frame = envelope::relay(event, machine_id, cluster_id, data, ts);
        self.fan_out(conns, Arc::from(cluster_id), frame, services_only);
    }

    /// Keeps what a local agent reported: its heartbeat, metrics snapshot and each
    /// server's status (`event` is the relayed name).
    pub fn record(&mut self, id: ConnId, event: &str, data: &str, ts: u64) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        let agent = agent.reports.get_or_insert_with(Box::default);
        match event {
            "heartbeat" => {
                agent.last_heartbeat = Some(ts);
                replace(&mut agent.heartbeat, data);
            }
            "metrics" => replace(&mut agent.metrics, data),
            "server:updated" => {
                // The session checked that serverId is a string.
                if let Ok(s) = serde_json::from_str::<ServerIdOnly<'_>>(data) {
                    agent.record_server(&s.server_id, data);
                }
            }
            _ => {}
        }
    }

    /// The shared copy of a cluster id, for one more agent.
    fn intern_cluster(&mut self, cluster: &str) -> Arc<str> {
        let c = match self.clusters.get_key_value(cluster) {
            Some((c, _)) => c.clone(),
            None => Arc::from(cluster),
        };
        *self.clusters.entry(c.clone()).or_insert(0) += 1;
        c
    }

    /// One agent fewer holds `cluster`.
    fn release_cluster(&mut self, cluster: Arc<str>) {
        if let Some(agents) = self.clusters.get_mut(&cluster) {
            *agents -= 1;
            if *agents == 0 {
                self.clusters.remove(&cluster);
            }
        }
    }

    /// Whether anyone, here or on another worker, would receive an event of `cluster`:
    /// an event nobody receives is not encoded at all.
    fn has_receivers(&self, cluster: &str, services_only: bool) -> bool {
        let local =
            !self.services.is_empty() || (!services_only && self.users.contains_key(cluster));
        local
            || self.shared.inboxes.iter().enumerate().any(|(w, inbox)| {
                let count = if services_only {
                    &inbox.services
                } else {
                    &inbox.clients
                };
                w != usize::from(self.index) && count.load(Ordering::Relaxed) > 0
            })
    }

    /// A service's notification for a cluster.
    pub fn notify(&mut self, conns: &mut Conns, cluster_id: &str, data: &str, ts: u64) {
        let frame = envelope::notification(data, ts);
        self.fan_out(conns, Arc::from(cluster_id), frame, false);
    }

    fn fan_out(&mut self, conns: &mut Conns, cluster: Arc<str>, frame: Bytes, services_only: bool) {
        self.m().relay_events.add(1);
        for (w, inbox) in self.shared.inboxes.iter().enumerate() {
            let count = if services_only {
                &inbox.services
            } else {
                &inbox.clients
            };
            if w != usize::from(self.index) && count.load(Ordering::Relaxed) > 0 {
                self.shared.post(
                    w as u16,
                    Msg::Deliver {
                        cluster: cluster.clone(),
                        frame: frame.clone(),
                        services_only,
                    },
                );
            }
        }
        self.deliver(conns, &cluster, frame, services_only);
    }

    fn deliver(&mut self, conns: &mut Conns, cluster: &str, frame: Bytes, services_only: bool) {
        let mut queued = 0u64;
        let mut queue =
            |id: ConnId, overflowed: &mut Vec<ConnId>| match conns.send(id, frame.clone()) {
                Queued::Ok => queued += 1,
                Queued::Overflow => {
                    queued += 1;
                    overflowed.push(id);
                }
                Queued::Gone => {}
            };
        for &id in &self.services {
            queue(id, &mut self.overflowed);
        }
        if !services_only {
            if let Some(set) = self.users.get(cluster) {
                for &id in set {
                    queue(id, &mut self.overflowed);
                }
            }
        }
        let m = self.metrics.worker(self.index);
        m.relay_deliveries.add(queued);
        m.messages_out.add(queued);
        m.bytes_out.add(queued * frame.len() as u64);
    }

    /// A client's command: checked against the machine's cluster and sent to the agent;
    /// the issuer gets `COMMAND_FAILED` when it cannot be.
    #[allow(clippy::too_many_arguments)]
    pub fn command(
        &mut self,
        conns: &mut Conns,
        issuer_id: ConnId,
        issuer: &Identity,
        req_id: &str,
        machine_id: &str,
        data: &str,
        now: Instant,
        ts: u64,
    ) {
        let from = Issuer::Conn {
            id: issuer_id,
            req_id: req_id.into(),
        };
        let loc = self.shared.machines.get(machine_id).map(|l| l.clone());
        match loc {
            None => self.reply(conns, from, now, Err(Failure::NotConnected), ts),
            Some(loc) if !issuer.sees_cluster(&loc.cluster) => {
                self.reply(conns, from, now, Err(Failure::Forbidden), ts)
            }
            Some(loc) => self.dispatch(conns, from, loc, data, now, ts),
        }
    }

    /// An admin API command (a service sees every cluster).
    fn http_command(
        &mut self,
        conns: &mut Conns,
        machine_id: &str,
        data: &str,
        reply: Sender<CommandOutcome>,
        now: Instant,
        ts: u64,
    ) {
        let loc = self.shared.machines.get(machine_id).map(|l| l.clone());
        match loc {
            None => self.reply(
                conns,
                Issuer::Http(reply),
                now,
                Err(Failure::NotConnected),
                ts,
            ),
            Some(loc) => self.dispatch(conns, Issuer::Http(reply), loc, data, now, ts),
        }
    }

    /// Records the pending command, arms its timer and sends it to the agent's worker.
    fn dispatch(
        &mut self,
        conns: &mut Conns,
        issuer: Issuer,
        loc: AgentLoc,
        data: &str,
        now: Instant,
        ts: u64,
    ) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let cmd_id = format!("cmd_{:08x}_{}_{}", self.shared.nonce, self.index, seq);
        let deadline = now + self.command_timeout;
        self.pending.insert(
            seq,
            Pending {
                issuer,
                issued: now,
            },
        );
        let frame = envelope::command_to_agent(&cmd_id, data, ts);
        let msg = Msg::ToAgent {
            conn: loc.conn,
            frame,
            from: self.index,
            seq,
            deadline,
        };
        self.timers.push((COMMAND_TIMER | seq, deadline));
        if loc.worker == self.index {
            self.handle(conns, msg, now, ts);
        } else {
            self.shared.post(loc.worker, msg);
        }
    }

    /// Tells the issuer how its command ended, and counts the outcome.
    fn reply(
        &mut self,
        conns: &mut Conns,
        issuer: Issuer,
        issued: Instant,
        outcome: CommandOutcome,
        ts: u64,
    ) {
        let m = self.metrics.worker(self.index);
        match &outcome {
            Ok(_) => {
                m.commands[0].add(1);
                m.round_trip.observe(issued.elapsed());
            }
            Err(f) => m.commands[f.outcome()].add(1),
        }
        match issuer {
            Issuer::Http(tx) => {
                // The admin request may have given up waiting: nothing to do then.
                let _ = tx.send(outcome);
            }
            Issuer::Conn { id, req_id } => {
                let frame = match outcome {
                    // The agent's data was validated JSON when it arrived.
                    Ok(data) => envelope::command_response(
                        &req_id,
                        std::str::from_utf8(&data).unwrap_or("null"),
                        ts,
                    ),
                    Err(f) => {
                        envelope::error(ErrorCode::CommandFailed, f.message(), Some(&req_id), ts)
                    }
                };
                self.send(conns, id, frame);
            }
        }
    }

    /// An agent's `command:response`: only for a command this agent was sent and has
    /// not answered; anything else is ignored.
    pub fn command_response(
        &mut self,
        conns: &mut Conns,
        agent: ConnId,
        cmd_id: &str,
        data: &str,
        ts: u64,
    ) {
        let Some((from, seq)) = parse_command_id(cmd_id, self.shared.nonce) else {
            return;
        };
        let Some(list) = self.outstanding.get_mut(&agent) else {
            return;
        };
        let Some(pos) = list.iter().position(|o| o.from == from && o.seq == seq) else {
            return;
        };
        list.swap_remove(pos);
        if list.is_empty() {
            self.outstanding.remove(&agent);
        }
        self.result(
            conns,
            from,
            seq,
            Ok(Bytes::copy_from_slice(data.as_bytes())),
            ts,
        );
    }

    fn result(&mut self, conns: &mut Conns, from: u16, seq: u64, result: CommandOutcome, ts: u64) {
        if from == self.index {
            self.finish_command(conns, seq, result, ts);
        } else {
            self.shared.post(from, Msg::CommandResult { seq, result });
        }
    }

    fn finish_command(&mut self, conns: &mut Conns, seq: u64, result: CommandOutcome, ts: u64) {
        let Some(p) = self.pending.remove(&seq) else {
            return;
        };
        self.reply(conns, p.issuer, p.issued, result, ts);
    }

    /// A pending command's timer fired.
    pub fn command_timed_out(&mut self, conns: &mut Conns, seq: u64, ts: u64) {
        self.finish_command(conns, seq, Err(Failure::TimedOut), ts);
    }

    /// The drain began: admin API commands still waiting are answered at once.
    pub fn fail_http_commands(&mut self, conns: &mut Conns, ts: u64) {
        let seqs: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.issuer, Issuer::Http(_)))
            .map(|(&seq, _)| seq)
            .collect();
        for seq in seqs {
            self.finish_command(conns, seq, Err(Failure::Draining), ts);
        }
    }

    /// These client connections are about to be closed by the drain: their commands still
    /// waiting fail now, so that every issuer hears about each of its commands.
    pub fn fail_commands_of(&mut self, conns: &mut Conns, ids: &HashSet<ConnId>, ts: u64) {
        if self.pending.is_empty() || ids.is_empty() {
            return;
        }
        let seqs: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(&p.issuer, Issuer::Conn { id, .. } if ids.contains(id)))
            .map(|(&seq, _)| seq)
            .collect();
        for seq in seqs {
            self.finish_command(conns, seq, Err(Failure::Draining), ts);
        }
    }

    /// Commands waiting for an answer on this worker.
    pub fn pending_commands(&self) -> usize {
        self.pending.len()
    }

    fn admin(&mut self, conns: &mut Conns, req: AdminRequest, now: Instant, ts: u64) {
        match req {
            AdminRequest::Machines { reply } => {
                let index = self.index;
                let live = |a: &AgentState, id: ConnId| {
                    self.shared
                        .machines
                        .get(&a.machine_id)
                        .is_some_and(|l| l.worker == index && l.conn == id)
                };
                let list = self
                    .agents
                    .iter()
                    .filter(|&(id, a)| live(a, id))
                    .map(|(_, a)| a.info(false))
                    .collect();
                let _ = reply.send(list);
            }
            AdminRequest::Machine { machine_id, reply } => {
                let loc = self.shared.machines.get(&machine_id).map(|l| l.clone());
                let info = loc
                    .filter(|l| l.worker == self.index)
                    .and_then(|l| self.agents.get(l.conn))
                    .map(|a| a.info(true));
                let _ = reply.send(info);
            }
            AdminRequest::Command {
                machine_id,
                data,
                reply,
            } => self.http_command(conns, &machine_id, &data, reply, now, ts),
            AdminRequest::Notify { cluster_id, data } => self.notify(conns, &cluster_id, &data, ts),
        }
    }

    /// A message from another worker (or routed locally).
    pub fn handle(&mut self, conns: &mut Conns, msg: Msg, now: Instant, ts: u64) {
        match msg {
            Msg::Deliver {
                cluster,
                frame,
                services_only,
            } => self.deliver(conns, &cluster, frame, services_only),
            Msg::ToAgent {
                conn,
                frame,
                from,
                seq,
                deadline,
            } => {
                if conns.is_open(conn) {
                    self.send(conns, conn, frame);
                    let list = self.outstanding.entry(conn).or_default();
                    list.retain(|o| o.deadline > now);
                    list.push(Outstanding {
                        from,
                        seq,
                        deadline,
                    });
                } else {
                    self.result(conns, from, seq, Err(Failure::Gone), ts);
                }
            }
            Msg::CommandResult { seq, result } => self.finish_command(conns, seq, result, ts),
            Msg::Close { conn, code, reason } => self.closes.push((conn, code, reason)),
            Msg::Admin(req) => self.admin(conns, req, now, ts),
            // The worker handles these before they reach the hub.
            Msg::Reload(_) | Msg::Revoke { .. } => {}
        }
    }
}

/// `cmd_<nonce>_<worker>_<seq>` of this process → (worker, seq).
fn parse_command_id(id: &str, nonce: u32) -> Option<(u16, u64)> {
    let rest = id.strip_prefix("cmd_")?;
    let (n, rest) = rest.split_once('_')?;
    if u32::from_str_radix(n, 16).ok()? != nonce {
        return None;
    }
    let (w, s) = rest.split_once('_')?;
    Some((w.parse().ok()?, s.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_round_trip_and_reject_garbage() {
        assert_eq!(parse_command_id("cmd_0000beef_1_42", 0xbeef), Some((1, 42)));
        assert_eq!(parse_command_id("cmd_0000beee_1_42", 0xbeef), None);
        assert_eq!(parse_command_id("cmd_0000beef_x_42", 0xbeef), None);
        assert_eq!(parse_command_id("req_0000beef_1_42", 0xbeef), None);
        assert_eq!(parse_command_id("cmd_0000beef_1", 0xbeef), None);
    }
}
