//! What one run does: the scenario, the fleet, the rates and the timings, shared by the
//! coordinator and every worker process (sent to workers as JSON).

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Connect,
    Steady,
    Flood,
    Fanout,
    Storm,
    Commands,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Steady => "steady",
            Scenario::Flood => "flood",
            Scenario::Fanout => "fanout",
            Scenario::Storm => "storm",
            Scenario::Commands => "commands",
        }
    }

    /// The latency the scenario is about (the status line's p99 and the report's `latency`).
    pub fn primary(self) -> Hist {
        match self {
            Scenario::Connect => Hist::Connect,
            Scenario::Steady | Scenario::Fanout => Hist::Delivery,
            Scenario::Flood => Hist::Ack,
            Scenario::Storm => Hist::Reconnect,
            Scenario::Commands => Hist::Command,
        }
    }
}

/// The latency histograms a worker keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hist {
    /// Socket opened → `authenticated` received.
    Connect,
    /// Agent send time (`sentAtNs`) → a user or service received the relayed event.
    Delivery,
    /// Command sent by the service → its `command:response` received.
    Command,
    /// Ping sent after a batch of flat-out messages → the gateway's pong (inbound processing).
    Ack,
    /// Connection lost in a storm → authenticated again.
    Reconnect,
}

pub const HISTS: [Hist; 5] = [
    Hist::Connect,
    Hist::Delivery,
    Hist::Command,
    Hist::Ack,
    Hist::Reconnect,
];

impl Hist {
    pub fn name(self) -> &'static str {
        match self {
            Hist::Connect => "connect",
            Hist::Delivery => "delivery",
            Hist::Command => "command",
            Hist::Ack => "ack",
            Hist::Reconnect => "reconnect",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Everything a run needs; `proc_index`/`procs` say which share a worker takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub scenario: Scenario,
    /// The gateways, at least one: connections are spread over them round-robin.
    pub targets: Vec<Target>,
    pub secret: String,
    /// Distinguishes this run's machine ids and clusters from any other run's.
    pub run_id: String,
    pub agents: u32,
    pub users: u32,
    /// One service client per worker process issues the commands (and sees every event).
    pub service: bool,
    pub clusters: u32,
    /// How many clusters each user sees.
    pub user_clusters: u32,
    pub heartbeat_ms: u64,
    pub metrics_ms: u64,
    /// `server:status` changes per second across the fleet.
    pub status_rate: f64,
    /// `player:joined`/`player:left` per second across the fleet.
    pub player_rate: f64,
    /// Commands per second issued by the service clients together.
    pub command_rate: f64,
    /// Agent connections dropped and reopened per second across the fleet (reconnect churn).
    pub churn_rate: f64,
    pub command_latency_ms: u64,
    /// Flat-out sending: which event each agent sends, with `in_flight` unacknowledged at most.
    pub flat_out: Option<FlatOut>,
    pub in_flight: u32,
    /// New connections per second while setting up (0: as fast as `concurrency` allows).
    pub connect_rate: f64,
    /// Connection attempts in progress at most while setting up.
    pub concurrency: u32,
    /// Deadline of one attempt (TCP connect, upgrade and auth).
    pub attempt_timeout_ms: u64,
    pub setup_timeout_ms: u64,
    pub duration_ms: u64,
    /// Longest wait after the window for deliveries and answers still on their way.
    pub drain_ms: u64,
    pub sources: Vec<Ipv4Addr>,
    pub storm: Option<Storm>,
    pub token_ttl_s: u64,
    /// Messages an agent keeps while disconnected (the oldest are dropped beyond it).
    pub queue_limit: u32,
    pub max_message: usize,
    pub proc_index: u32,
    pub procs: u32,
}

/// One gateway URL, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// As given on the command line (the report names it so).
    pub url: String,
    /// The address to connect to and the `Host` header to send.
    pub addr: SocketAddr,
    pub host: String,
    /// The base path before `/ws/agent` and `/ws/client` (usually empty).
    pub base_path: String,
    /// wss://: how the certificate is verified.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlatOut {
    Heartbeat,
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Storm {
    /// When the storm starts, after the window opens.
    pub after_ms: u64,
    /// The workers drop every agent connection themselves (no restart command).
    pub drop: bool,
    /// Reconnect at once instead of after a jittered backoff (the worst case).
    pub herd: bool,
}

impl Plan {
    /// The part `[lo, hi)` of `0..n` that worker `proc_index` of `procs` takes.
    pub fn share(&self, n: u32) -> (u32, u32) {
        share(n, self.proc_index, self.procs)
    }

    /// This worker's part of a fleet-wide rate.
    pub fn rate_share(&self, rate: f64) -> f64 {
        rate / f64::from(self.procs.max(1))
    }

    pub fn machine_id(&self, agent: u32) -> String {
        format!("mch_{}_{agent}", self.run_id)
    }

    pub fn cluster_id(&self, cluster: u32) -> String {
        format!("clu_{}_{cluster}", self.run_id)
    }

    pub fn cluster_of(&self, agent: u32) -> u32 {
        agent % self.clusters.max(1)
    }

    /// The clusters user `user` sees.
    pub fn user_cluster_list(&self, user: u32) -> Vec<u32> {
        let n = self.clusters.max(1);
        let k = self.user_clusters.clamp(1, n);
        (0..k).map(|i| (user + i) % n).collect()
    }

    /// The first URL of the `n`th connection of a role, fleet-wide: round-robin, so every
    /// URL gets its share of agents, users and service clients whatever the worker count.
    pub fn url_of(&self, n: u32) -> u32 {
        n % (self.targets.len().max(1) as u32)
    }

    /// The URL to try after `url` lost its gateway.
    pub fn next_url(&self, url: u32) -> u32 {
        (url + 1) % (self.targets.len().max(1) as u32)
    }

    /// Connections this worker opens.
    pub fn connections_here(&self) -> u32 {
        let (a0, a1) = self.share(self.agents);
        let (u0, u1) = self.share(self.users);
        (a1 - a0) + (u1 - u0) + u32::from(self.service)
    }
}

pub fn share(n: u32, index: u32, parts: u32) -> (u32, u32) {
    let parts = u64::from(parts.max(1));
    let at = |i: u64| (u64::from(n) * i / parts) as u32;
    (at(u64::from(index)), at(u64::from(index) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for n in [0u32, 1, 7, 100, 1001] {
            for parts in 1..6 {
                let mut next = 0;
                for i in 0..parts {
                    let (lo, hi) = share(n, i, parts);
                    assert_eq!(lo, next);
                    assert!(hi >= lo);
                    next = hi;
                }
                assert_eq!(next, n);
            }
        }
    }
}
