//! The report store behind the admin API: each local agent's identity and the latest
//! heartbeat, metrics snapshot and per-server status it reported (docs/protocol.md
//! sections 6 and 15.5).

use std::collections::HashMap;
use std::sync::Arc;

use indexmap::IndexMap;

use crate::auth::Identity;
use crate::conn::{ConnId, ConnMap};
use crate::protocol::envelope::RelayKind;

/// Servers whose latest `server:status` is kept per machine; further server ids are not
/// recorded (they are still relayed).
pub const MAX_SERVERS: usize = 1024;
/// Bytes of `server:status` data kept per machine.
pub const MAX_SERVER_BYTES: usize = 1 << 20;

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

/// One local agent.
#[derive(Debug)]
pub(super) struct AgentState {
    machine_id: Box<str>,
    cluster: Arc<str>,
    pub version: Box<str>,
    /// This connection's generation of the machine (see `generations`).
    pub gen: u64,
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

/// This worker's agents, by connection.
#[derive(Debug, Default)]
pub(super) struct Agents {
    by_conn: ConnMap<AgentState>,
    /// The clusters of these agents, one shared copy each, with how many agents hold it
    /// (forgotten with the last one).
    clusters: HashMap<Arc<str>, usize>,
}

impl Agents {
    /// Registers an authenticated agent; returns the shared copy of its cluster id.
    pub fn register(&mut self, id: ConnId, who: &Identity, version: &str, ts: u64) -> Arc<str> {
        let cluster = who.cluster.as_deref().unwrap_or_default();
        let cluster = match self.clusters.get_key_value(cluster) {
            Some((c, _)) => c.clone(),
            None => Arc::from(cluster),
        };
        *self.clusters.entry(cluster.clone()).or_insert(0) += 1;
        let state = AgentState {
            machine_id: who.sub.clone(),
            cluster: cluster.clone(),
            version: version.into(),
            gen: 0,
            connected_at: ts,
            reports: None,
        };
        self.by_conn.insert(id, state);
        cluster
    }

    /// Forgets an agent that went offline.
    pub fn unregister(&mut self, id: ConnId) -> Option<AgentState> {
        let agent = self.by_conn.remove(id)?;
        if let Some(count) = self.clusters.get_mut(&agent.cluster) {
            *count -= 1;
            if *count == 0 {
                self.clusters.remove(&agent.cluster);
            }
        }
        Some(agent)
    }

    /// Whether `id` is a registered agent of this worker.
    pub fn contains(&self, id: ConnId) -> bool {
        self.by_conn.get(id).is_some()
    }

    /// Sets the generation agent `id` took when it registered in the machine registry.
    pub fn set_generation(&mut self, id: ConnId, gen: u64) {
        if let Some(agent) = self.by_conn.get_mut(id) {
            agent.gen = gen;
        }
    }

    /// Keeps a report of agent `id`: its heartbeat, metrics snapshot or a server's status;
    /// returns the agent's generation (0 if it is not registered).
    pub fn record(&mut self, id: ConnId, kind: &RelayKind<'_>, data: &str, ts: u64) -> u64 {
        let Some(agent) = self.by_conn.get_mut(id) else {
            return 0;
        };
        let r = agent.reports.get_or_insert_with(Box::default);
        match kind {
            RelayKind::Heartbeat => {
                r.last_heartbeat = Some(ts);
                replace(&mut r.heartbeat, data);
            }
            RelayKind::Metrics => replace(&mut r.metrics, data),
            RelayKind::ServerStatus { server_id } => r.record_server(server_id, data),
            RelayKind::PlayerJoined | RelayKind::PlayerLeft | RelayKind::Notification => {}
        }
        agent.gen
    }

    /// The agents `live` accepts (machine id, connection), without their reports.
    pub fn list(&self, mut live: impl FnMut(&str, ConnId) -> bool) -> Vec<MachineInfo> {
        self.by_conn
            .iter()
            .filter(|&(id, a)| live(&a.machine_id, id))
            .map(|(_, a)| a.info(false))
            .collect()
    }

    /// Agent `id` with its latest reports.
    pub fn detail(&self, id: ConnId) -> Option<MachineInfo> {
        self.by_conn.get(id).map(|a| a.info(true))
    }
}
