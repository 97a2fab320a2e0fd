//! Routing between connections and workers: which worker holds which machine, the
//! per-worker subscription index, cross-worker inboxes, and commands in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::SegQueue;
use dashmap::DashMap;
use indexmap::IndexSet;

use crate::auth::{Identity, Role};
use crate::io::conns::Queued;
use crate::io::{ConnId, Conns, Notifier};
use crate::protocol::envelope::{self, ErrorCode};

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
    CommandResult {
        seq: u64,
        result: Result<Bytes, &'static str>,
    },
    /// Close a local connection on the gateway's initiative.
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
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
    pub version: Box<str>,
}

/// State every worker shares.
pub struct Shared {
    pub inboxes: Vec<Inbox>,
    /// machineId → its live connection.
    pub machines: DashMap<Box<str>, AgentLoc>,
    /// Random per process, part of every command id: an agent resending an answer
    /// to a restarted gateway cannot complete a new command that reuses the number.
    pub nonce: u32,
}

impl Shared {
    pub fn new(notifiers: Vec<Arc<Notifier>>) -> Shared {
        Shared {
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

/// Who is waiting for a command's answer.
struct Pending {
    issuer: ConnId,
    req_id: Box<str>,
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
    command_timeout: Duration,
    /// Connections whose outbound queue overflowed: the worker closes them with 1013.
    pub overflowed: Vec<ConnId>,
    /// Closes requested by routing (replaced agents).
    pub closes: Vec<CloseRequest>,
}

/// Timer key flag for pending commands (connection keys never set the top bit).
pub const COMMAND_TIMER: u64 = 1 << 63;

impl Hub {
    pub fn new(index: u16, shared: Arc<Shared>, command_timeout: Duration) -> Hub {
        Hub {
            index,
            shared,
            users: HashMap::new(),
            services: IndexSet::new(),
            pending: HashMap::new(),
            next_seq: 0,
            outstanding: HashMap::new(),
            command_timeout,
            overflowed: Vec::new(),
            closes: Vec::new(),
        }
    }

    fn send(&mut self, conns: &mut Conns, id: ConnId, frame: Bytes) {
        if conns.send(id, frame) == Queued::Overflow {
            self.overflowed.push(id);
        }
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
                let cluster: Arc<str> = Arc::from(who.cluster.as_deref().unwrap_or_default());
                let loc = AgentLoc {
                    worker: self.index,
                    conn: id,
                    cluster: cluster.clone(),
                    version: version.into(),
                };
                if let Some(old) = self.shared.machines.insert(who.sub.clone(), loc) {
                    let close = Msg::Close {
                        conn: old.conn,
                        code: 4009,
                        reason: "replaced by a newer connection of this machine",
                    };
                    if old.worker == self.index {
                        self.closes.push((
                            old.conn,
                            4009,
                            "replaced by a newer connection of this machine",
                        ));
                    } else {
                        self.shared.post(old.worker, close);
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
                if let Some((_, loc)) = removed {
                    let frame = envelope::machine_presence(
                        "machine:offline",
                        &who.sub,
                        &loc.cluster,
                        &loc.version,
                        ts,
                    );
                    self.fan_out(conns, loc.cluster, frame, false);
                }
                for o in self.outstanding.remove(&id).unwrap_or_default() {
                    self.result(
                        conns,
                        o.from,
                        o.seq,
                        Err("machine disconnected before answering"),
                        ts,
                    );
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
        for &id in &self.services {
            if conns.send(id, frame.clone()) == Queued::Overflow {
                self.overflowed.push(id);
            }
        }
        if services_only {
            return;
        }
        if let Some(set) = self.users.get(cluster) {
            for &id in set {
                if conns.send(id, frame.clone()) == Queued::Overflow {
                    self.overflowed.push(id);
                }
            }
        }
    }

    /// A client's command. Returns the timer to arm (key, deadline) when it was sent.
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
    ) -> Option<(u64, Instant)> {
        let loc = self.shared.machines.get(machine_id).map(|l| l.clone());
        let Some(loc) = loc else {
            let frame = envelope::error(
                ErrorCode::CommandFailed,
                "machine not connected",
                Some(req_id),
                ts,
            );
            self.send(conns, issuer_id, frame);
            return None;
        };
        if !issuer.sees_cluster(&loc.cluster) {
            let frame = envelope::error(ErrorCode::CommandFailed, "forbidden", Some(req_id), ts);
            self.send(conns, issuer_id, frame);
            return None;
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        let cmd_id = format!("cmd_{:08x}_{}_{}", self.shared.nonce, self.index, seq);
        let deadline = now + self.command_timeout;
        self.pending.insert(
            seq,
            Pending {
                issuer: issuer_id,
                req_id: req_id.into(),
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
        if loc.worker == self.index {
            self.handle(conns, msg, now, ts);
        } else {
            self.shared.post(loc.worker, msg);
        }
        Some((COMMAND_TIMER | seq, deadline))
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

    fn result(
        &mut self,
        conns: &mut Conns,
        from: u16,
        seq: u64,
        result: Result<Bytes, &'static str>,
        ts: u64,
    ) {
        if from == self.index {
            self.finish_command(conns, seq, result, ts);
        } else {
            self.shared.post(from, Msg::CommandResult { seq, result });
        }
    }

    fn finish_command(
        &mut self,
        conns: &mut Conns,
        seq: u64,
        result: Result<Bytes, &'static str>,
        ts: u64,
    ) {
        let Some(p) = self.pending.remove(&seq) else {
            return;
        };
        let frame = match result {
            // The agent's data was validated JSON when it arrived.
            Ok(data) => envelope::command_response(
                &p.req_id,
                std::str::from_utf8(&data).unwrap_or("null"),
                ts,
            ),
            Err(why) => envelope::error(ErrorCode::CommandFailed, why, Some(&p.req_id), ts),
        };
        self.send(conns, p.issuer, frame);
    }

    /// A pending command's timer fired.
    pub fn command_timed_out(&mut self, conns: &mut Conns, seq: u64, ts: u64) {
        self.finish_command(conns, seq, Err("command timed out"), ts);
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
                    self.result(conns, from, seq, Err("machine disconnected"), ts);
                }
            }
            Msg::CommandResult { seq, result } => self.finish_command(conns, seq, result, ts),
            Msg::Close { conn, code, reason } => self.closes.push((conn, code, reason)),
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
