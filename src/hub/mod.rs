//! Routing between connections and workers as a sans-IO model: events come in with the
//! time passed in, and what must happen goes out as `Action`s the worker carries out.
//! Which worker holds which machine is shared; subscriptions (`fanout`), commands in
//! flight (`commands`) and the latest reports of local agents (`reports`) are per worker.

mod commands;
mod fanout;
mod generations;
mod reports;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::auth::{Identity, Role};
use crate::conn::ConnId;
use crate::metrics::{Metrics, WorkerMetrics};
use crate::protocol::envelope::{self, RelayKind};
use crate::protocol::session::CLOSE_REPLACED;

pub use commands::{Answer, Failure};
pub use generations::{Stamp, RETENTION_MS};
pub use reports::{MachineDetail, MachineInfo, MAX_SERVERS, MAX_SERVER_BYTES};

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
        reply: Sender<Answer>,
    },
    /// A notification for a cluster; `data` is the relayed JSON object.
    Notify {
        cluster_id: Box<str>,
        data: Box<str>,
    },
}

/// A message from one worker's hub to another's.
#[derive(Debug)]
pub enum Msg {
    /// Deliver an encoded event to this worker's subscribers of `cluster`; `remote`: it
    /// came from another node, for this node's users of the cluster only; `stamp`: the
    /// machine and connection generation it is about, if any (see `generations`).
    Deliver {
        cluster: Arc<str>,
        frame: Bytes,
        services_only: bool,
        remote: bool,
        stamp: Option<Stamp>,
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
    CommandResult { seq: u64, result: Answer },
    /// Close a local connection on the gateway's initiative.
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
    /// A request of the admin API.
    Admin(AdminRequest),
}

/// The local subscribers an event goes to, in subscription order.
pub type Recipients<'a> = indexmap::set::Iter<'a, ConnId>;

/// What the hub asks its worker to do.
#[derive(Debug)]
pub enum Action<'a> {
    /// Queue `frame` on one connection (nothing happens if it is closing or gone).
    Send { conn: ConnId, frame: Bytes },
    /// Queue one relayed event on each of these connections.
    Deliver {
        to: Recipients<'a>,
        frame: &'a Bytes,
    },
    /// Close a local connection through its session.
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
    /// Call `Hub::command_timed_out(seq, ..)` at `at` (a finished command ignores it).
    ArmTimer { seq: u64, at: Instant },
    /// Hand `msg` to the hub of worker `worker`.
    Post { worker: u16, msg: Msg },
    /// Publish an encoded event of `cluster` to the other nodes (once per event, at its
    /// origin worker; only with a bus).
    Publish { cluster: &'a str, frame: &'a Bytes },
    /// This worker gained its first (`on`) or lost its last user of `cluster`: the other
    /// nodes' events of it are wanted, or no longer (only with a bus).
    Interest { cluster: &'a str, on: bool },
}

/// Carries out the hub's actions: the worker's side of every hub call.
pub trait Sink {
    fn act(&mut self, action: Action<'_>);
}

/// Who is connected to one worker, for the others' fan-out: a worker with no one to
/// deliver to gets no `Deliver`.
#[derive(Debug, Default)]
pub struct Presence {
    /// Client connections (users and services).
    pub clients: AtomicUsize,
    /// Services among them.
    pub services: AtomicUsize,
}

impl Presence {
    /// Whether an event of this kind may have a receiver there.
    pub fn receives(&self, services_only: bool) -> bool {
        let count = match services_only {
            true => &self.services,
            false => &self.clients,
        };
        count.load(Ordering::Relaxed) > 0
    }
}

/// Where a connected machine lives.
#[derive(Debug, Clone)]
pub struct AgentLoc {
    pub worker: u16,
    pub conn: ConnId,
    pub cluster: Arc<str>,
    /// This connection's generation of the machine (see `generations`).
    pub gen: u64,
}

/// State every worker's hub shares.
pub struct Shared {
    /// Indexed by worker.
    pub workers: Vec<Presence>,
    /// machineId → its live connection.
    pub machines: DashMap<Box<str>, AgentLoc>,
    /// Random per process, part of every command id: an agent resending an answer
    /// to a restarted gateway cannot complete a new command that reuses the number.
    pub nonce: u32,
    /// Every worker's counters.
    pub metrics: Arc<Metrics>,
    /// Whether a bus links this node to others: users' events are then published too.
    pub bus: bool,
    /// The last generation handed to an authenticating machine.
    generation: AtomicU64,
}

impl Shared {
    pub fn new(workers: usize) -> Shared {
        Shared {
            metrics: Arc::new(Metrics::new(workers)),
            workers: (0..workers).map(|_| Presence::default()).collect(),
            machines: DashMap::new(),
            bus: false,
            generation: AtomicU64::new(0),
            nonce: {
                let mut b = [0u8; 4];
                // Without randomness the ids are still unique within this process.
                let _ = getrandom::fill(&mut b);
                u32::from_ne_bytes(b)
            },
        }
    }
}

/// One worker's routing state.
pub struct Hub {
    pub index: u16,
    pub shared: Arc<Shared>,
    subs: fanout::Subscriptions,
    commands: commands::Commands,
    agents: reports::Agents,
    /// The newest generation of each machine delivered here.
    delivered: generations::Generations,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(index: u16, shared: Arc<Shared>, command_timeout: Duration) -> Hub {
        Hub {
            index,
            metrics: shared.metrics.clone(),
            shared,
            subs: fanout::Subscriptions::default(),
            commands: commands::Commands::new(command_timeout),
            agents: reports::Agents::default(),
            delivered: generations::Generations::default(),
        }
    }

    fn m(&self) -> &WorkerMetrics {
        self.metrics.worker(self.index)
    }

    fn presence(&self) -> &Presence {
        &self.shared.workers[usize::from(self.index)]
    }

    /// A connection authenticated: agents are registered (replacing an older connection
    /// of the same machine) and announced; clients subscribe.
    pub fn online(
        &mut self,
        id: ConnId,
        who: &Identity,
        version: &str,
        ts: u64,
        out: &mut impl Sink,
    ) {
        match who.role {
            Role::Agent => {
                let cluster = self.agents.register(id, who, version, ts);
                let (gen, replaced) = {
                    let shared = &self.shared;
                    let entry = shared.machines.entry(who.sub.clone());
                    // Taken under the entry's lock: generations follow the order of the
                    // registrations.
                    let gen = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    let loc = AgentLoc {
                        worker: self.index,
                        conn: id,
                        cluster: cluster.clone(),
                        gen,
                    };
                    match entry {
                        Entry::Occupied(mut e) => (gen, Some(e.insert(loc))),
                        Entry::Vacant(e) => {
                            e.insert(loc);
                            (gen, None)
                        }
                    }
                };
                self.agents.set_generation(id, gen);
                if let Some(old) = replaced {
                    let (conn, code) = (old.conn, CLOSE_REPLACED);
                    let reason = "replaced by a newer connection of this machine";
                    out.act(match old.worker == self.index {
                        true => {
                            self.replaced(conn);
                            Action::Close { conn, code, reason }
                        }
                        false => Action::Post {
                            worker: old.worker,
                            msg: Msg::Close { conn, code, reason },
                        },
                    });
                }
                let frame =
                    envelope::machine_presence("machine:online", &who.sub, &cluster, version, ts);
                let stamp = Stamp {
                    machine: Arc::from(&*who.sub),
                    gen,
                    presence: true,
                };
                self.fan_out(cluster, frame, false, Some(stamp), ts, out);
            }
            Role::User => {
                let bus = self.shared.bus;
                self.subs.subscribe_user(id, &who.clusters, |cluster| {
                    if bus {
                        out.act(Action::Interest { cluster, on: true });
                    }
                });
                self.presence().clients.fetch_add(1, Ordering::Relaxed);
            }
            Role::Service => {
                self.subs.subscribe_service(id);
                let p = self.presence();
                p.clients.fetch_add(1, Ordering::Relaxed);
                p.services.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// An authenticated connection ended: unsubscribe, or unregister and announce the
    /// machine (unless a newer connection replaced it) and fail its unanswered commands.
    pub fn offline(
        &mut self,
        id: ConnId,
        who: &Identity,
        now: Instant,
        ts: u64,
        out: &mut impl Sink,
    ) {
        match who.role {
            Role::Agent => {
                let index = self.index;
                let live = self
                    .shared
                    .machines
                    .remove_if(&who.sub, |_, loc| loc.worker == index && loc.conn == id);
                if let Some(agent) = self.agents.unregister(id) {
                    if let Some((_, loc)) = live {
                        let frame = envelope::machine_presence(
                            "machine:offline",
                            &who.sub,
                            &loc.cluster,
                            &agent.version,
                            ts,
                        );
                        let stamp = Stamp {
                            machine: Arc::from(&*who.sub),
                            gen: loc.gen,
                            presence: true,
                        };
                        self.fan_out(loc.cluster, frame, false, Some(stamp), ts, out);
                    }
                }
                self.agent_gone(id, now, ts, out);
            }
            Role::User => {
                let bus = self.shared.bus;
                self.subs.unsubscribe_user(id, &who.clusters, |cluster| {
                    if bus {
                        out.act(Action::Interest { cluster, on: false });
                    }
                });
                self.presence().clients.fetch_sub(1, Ordering::Relaxed);
            }
            Role::Service => {
                self.subs.unsubscribe_service(id);
                let p = self.presence();
                p.clients.fetch_sub(1, Ordering::Relaxed);
                p.services.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// An event of local agent `id`: kept for the admin API, then relayed.
    #[allow(clippy::too_many_arguments)]
    pub fn agent_event(
        &mut self,
        id: ConnId,
        kind: &RelayKind<'_>,
        machine_id: &str,
        cluster_id: &str,
        data: &str,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let gen = self.agents.record(id, kind, data, ts);
        self.relay(kind, machine_id, cluster_id, data, gen, ts, out);
    }

    /// A message from another worker (or routed locally).
    pub fn handle(&mut self, msg: Msg, now: Instant, ts: u64, out: &mut impl Sink) {
        match msg {
            Msg::Deliver {
                cluster,
                frame,
                services_only,
                remote,
                stamp,
            } => {
                let reach = fanout::Reach::of(services_only, remote);
                self.deliver(&cluster, &frame, reach, stamp.as_ref(), ts, out)
            }
            Msg::ToAgent {
                conn,
                frame,
                from,
                seq,
                deadline,
            } => self.hand_to_agent(conn, frame, from, seq, deadline, now, ts, out),
            Msg::CommandResult { seq, result } => self.finish_command(seq, result, now, ts, out),
            Msg::Close { conn, code, reason } => {
                if code == CLOSE_REPLACED {
                    self.replaced(conn);
                }
                out.act(Action::Close { conn, code, reason })
            }
            Msg::Admin(req) => self.admin(req, now, ts, out),
        }
    }

    /// Local agent `id` was replaced by a newer connection of its machine: it is not open
    /// for commands any more (a command for it is answered as for a disconnected agent).
    fn replaced(&mut self, id: ConnId) {
        if self.agents.contains(id) {
            self.commands.replaced(id);
        }
    }

    fn admin(&mut self, req: AdminRequest, now: Instant, ts: u64, out: &mut impl Sink) {
        match req {
            AdminRequest::Machines { reply } => {
                let index = self.index;
                let machines = &self.shared.machines;
                let list = self.agents.list(|machine_id, id| {
                    machines
                        .get(machine_id)
                        .is_some_and(|l| l.worker == index && l.conn == id)
                });
                let _ = reply.send(list);
            }
            AdminRequest::Machine { machine_id, reply } => {
                let loc = self.shared.machines.get(&machine_id).map(|l| l.clone());
                let info = loc
                    .filter(|l| l.worker == self.index)
                    .and_then(|l| self.agents.detail(l.conn));
                let _ = reply.send(info);
            }
            AdminRequest::Command {
                machine_id,
                data,
                reply,
            } => self.http_command(&machine_id, &data, reply, now, ts, out),
            AdminRequest::Notify { cluster_id, data } => self.notify(&cluster_id, &data, ts, out),
        }
    }
}

#[cfg(test)]
mod tests;
