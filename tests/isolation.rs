//! Isolation under randomized traffic: agents in several clusters, users with various cluster
//! sets and perms, a service; thousands of relayed events and hundreds of commands, with
//! agents that try to speak for other machines and to answer commands sent to others.
//! Asserted on what arrives over the wire:
//! * no user receives an event of a cluster it lacks (and each receives every event of its
//!   clusters, in each agent's order); `heartbeat` reaches services only;
//! * a relayed event names the machine and cluster that sent it, whatever the agent wrote;
//! * no command reaches another machine, or any machine when the issuer lacks the cluster
//!   or the permission;
//! * every command gets exactly one answer: the target's own, `forbidden` (perms), or
//!   `machine not connected` (another cluster's machine, answered like an absent one).
//!
//! The seed is printed; `ISOLATION_SEED=<n>` replays a run.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

both_backends!(randomized_traffic_never_crosses_clusters_or_permissions);

const CLUSTERS: usize = 4;
const AGENTS: usize = 12;
const USERS: usize = 10;
/// Events each agent sends, one every `EVENT_EVERY`.
const EVENTS: u64 = 200;
const EVENT_EVERY: Duration = Duration::from_millis(12);
/// Commands each user and the service send, one every `COMMAND_EVERY`.
const COMMANDS: usize = 100;
const COMMAND_EVERY: Duration = Duration::from_millis(24);
/// Silence after which a connection has received everything.
const QUIET: Duration = Duration::from_millis(1500);
const TYPES: [&str; 3] = ["server:start", "server:stop", "server:restart"];

/// splitmix64: a small, seedable generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn cluster(i: usize) -> String {
    format!("clu_{i}")
}

/// Who may send commands, and which.
#[derive(Debug, Clone)]
struct Issuer {
    sub: String,
    /// `None`: a service (every cluster, every command).
    clusters: Option<BTreeSet<String>>,
    /// `None`: every command type.
    perms: Option<Vec<String>>,
}

impl Issuer {
    fn sees(&self, c: &str) -> bool {
        self.clusters.as_ref().is_none_or(|s| s.contains(c))
    }

    fn may_type(&self, kind: &str) -> bool {
        self.perms
            .as_ref()
            .is_none_or(|p| p.iter().any(|x| x == "*" || x == kind))
    }

    fn may(&self, cluster: &str, kind: &str) -> bool {
        self.sees(cluster) && self.may_type(kind)
    }
}

/// The test's plan, drawn from the seed.
struct World {
    /// Agent index → its cluster.
    agent_cluster: Vec<String>,
    issuers: Vec<Issuer>,
    /// Per issuer: (request id, target machine, command type).
    commands: Vec<Vec<(String, String, &'static str)>>,
}

fn machine(i: usize) -> String {
    format!("mch_{i}")
}

impl World {
    fn draw(rng: &mut Rng) -> World {
        let agent_cluster = (0..AGENTS).map(|_| cluster(rng.below(CLUSTERS))).collect();
        let perm_sets: [Option<&[&str]>; 5] = [
            None,
            Some(&[]),
            Some(&["server:start"]),
            Some(&["server:start", "server:stop"]),
            Some(&["*"]),
        ];
        let mut issuers: Vec<Issuer> = (0..USERS)
            .map(|u| Issuer {
                sub: format!("usr_{u}"),
                clusters: Some(
                    (0..CLUSTERS)
                        .filter(|_| rng.below(2) == 0)
                        .map(cluster)
                        .collect(),
                ),
                perms: perm_sets[rng.below(perm_sets.len())]
                    .map(|p| p.iter().map(|s| s.to_string()).collect()),
            })
            .collect();
        issuers.push(Issuer {
            sub: "svc_panel".into(),
            clusters: None,
            perms: None,
        });
        let commands = issuers
            .iter()
            .map(|who| {
                (0..COMMANDS)
                    .map(|n| {
                        (
                            format!("{}_req_{n}", who.sub),
                            machine(rng.below(AGENTS)),
                            TYPES[rng.below(TYPES.len())],
                        )
                    })
                    .collect()
            })
            .collect();
        World {
            agent_cluster,
            issuers,
            commands,
        }
    }

    fn cluster_of(&self, machine_id: &str) -> &str {
        let i: usize = machine_id.trim_start_matches("mch_").parse().unwrap();
        &self.agent_cluster[i]
    }

    fn token(&self, who: &Issuer) -> String {
        match &who.clusters {
            None => service_token(&who.sub),
            Some(c) => {
                let c: Vec<&str> = c.iter().map(String::as_str).collect();
                let perms: Option<Vec<&str>> = who
                    .perms
                    .as_ref()
                    .map(|p| p.iter().map(String::as_str).collect());
                user_token(&who.sub, &c, perms.as_deref())
            }
        }
    }
}

type Stream = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Reads the next JSON message; `None` after `QUIET` of silence or at the end.
async fn next_json(ws: &mut Stream, quiet: Duration) -> Option<Value> {
    loop {
        match tokio::time::timeout(quiet, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                check_envelope(&v);
                return Some(v);
            }
            Ok(Some(Ok(Message::Close(f)))) => panic!("the gateway closed: {f:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("connection failed: {e}"),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// An agent: sends its events (with forged `machineId`/`clusterId`), answers every command
/// it receives, and also answers, falsely, commands it guesses were sent to others.
/// Returns the commands it received, once the clients are done and all is quiet.
async fn run_agent(
    mut ws: Stream,
    me: String,
    seed: u64,
    clients_done: Arc<AtomicBool>,
) -> Vec<Value> {
    let mut rng = Rng(seed);
    let mut received = Vec::new();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(EVENT_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick(), if sent < EVENTS => {
                let event = ["server:status", "player:joined", "notification", "heartbeat"][rng.below(4)];
                let forged = machine(rng.below(AGENTS));
                let m = json!({"event": event, "data": {
                    "serverId": "srv_1", "seq": sent, "src": me,
                    "machineId": forged, "clusterId": cluster(rng.below(CLUSTERS)),
                    "type": "info", "message": "m",
                }});
                ws.send(Message::text(m.to_string())).await.expect("agent send");
                sent += 1;
            }
            m = next_json(&mut ws, QUIET) => {
                let Some(m) = m else {
                    if sent < EVENTS || !clients_done.load(Ordering::SeqCst) {
                        continue;
                    }
                    return received;
                };
                assert_eq!(m["event"], "command", "{me} got {m}");
                let id = m["data"]["id"].as_str().unwrap().to_string();
                let answer = |id: &str, rogue: bool| json!({"event": "command:response", "data": {
                    "id": id, "success": true,
                    "result": {"answeredBy": me, "type": m["data"]["type"], "rogue": rogue},
                }}).to_string();
                // Guesses at ids of commands in flight elsewhere: neighbours of this one's.
                let (prefix, seq) = id.rsplit_once('_').unwrap();
                let seq: u64 = seq.parse().unwrap();
                let (nonce_worker, _) = prefix.rsplit_once('_').unwrap();
                for guess in [
                    format!("{prefix}_{}", seq + 1),
                    format!("{prefix}_{}", seq.saturating_sub(1)),
                    format!("{nonce_worker}_0_{seq}"),
                    format!("{nonce_worker}_1_{seq}"),
                ] {
                    if guess != id {
                        ws.send(Message::text(answer(&guess, true))).await.expect("agent send");
                    }
                }
                ws.send(Message::text(answer(&id, false))).await.expect("agent send");
                received.push(m);
            }
        }
    }
}

/// A user or the service: sends its commands and reads everything.
async fn run_client(
    mut ws: Stream,
    commands: Vec<(String, String, &'static str)>,
    sub: String,
) -> Vec<Value> {
    let mut seen = Vec::new();
    let mut queue = commands.into_iter();
    let mut tick = tokio::time::interval(COMMAND_EVERY);
    let mut done = false;
    loop {
        tokio::select! {
            _ = tick.tick(), if !done => match queue.next() {
                Some((req, target, kind)) => {
                    let m = json!({"event": "command", "id": req, "data": {
                        "machineId": target, "type": kind, "serverId": "srv_1",
                        "target": target, "issuer": sub,
                    }});
                    ws.send(Message::text(m.to_string())).await.expect("client send");
                }
                None => done = true,
            },
            m = next_json(&mut ws, QUIET) => match m {
                Some(m) => seen.push(m),
                None if done => return seen,
                None => {}
            },
        }
    }
}

async fn randomized_traffic_never_crosses_clusters_or_permissions(io: &'static str) {
    let seed = std::env::var("ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            now_ms() ^ u64::from(std::process::id()) ^ (u64::from(io == "epoll") << 40)
        });
    eprintln!("{io}: ISOLATION_SEED={seed}");
    let mut rng = Rng(seed);
    let world = World::draw(&mut rng);
    let gw = Gateway::start(io, &[]).await;

    let mut clients = Vec::new();
    for who in &world.issuers {
        clients.push(gw.client(&world.token(who)).await);
    }
    let mut agents = Vec::new();
    for (i, c) in world.agent_cluster.iter().enumerate() {
        agents.push(gw.agent(&machine(i), c).await);
    }
    let clients_done = Arc::new(AtomicBool::new(false));
    let agent_tasks: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let done = clients_done.clone();
            tokio::spawn(run_agent(ws.into_inner(), machine(i), rng.next(), done))
        })
        .collect();
    let client_tasks: Vec<_> = clients
        .into_iter()
        .zip(&world.issuers)
        .zip(world.commands.clone())
        .map(|((ws, who), cmds)| tokio::spawn(run_client(ws.into_inner(), cmds, who.sub.clone())))
        .collect();
    // Agents stay until every command was answered, so that none is failed by a close.
    let mut by_client = Vec::new();
    for t in client_tasks {
        by_client.push(t.await.expect("client task"));
    }
    clients_done.store(true, Ordering::SeqCst);
    let mut by_agent = Vec::new();
    for t in agent_tasks {
        by_agent.push(t.await.expect("agent task"));
    }

    // Commands as the agents saw them.
    let issuers: BTreeMap<&str, &Issuer> =
        world.issuers.iter().map(|i| (i.sub.as_str(), i)).collect();
    let mut delivered = 0;
    for (i, got) in by_agent.iter().enumerate() {
        let me = machine(i);
        for m in got {
            let d = &m["data"];
            assert_eq!(
                d["target"],
                me.as_str(),
                "{io}: a command for another machine: {m}"
            );
            assert!(d.get("machineId").is_none(), "{io}: {m}");
            let issuer = issuers[d["issuer"].as_str().unwrap()];
            let kind = d["type"].as_str().unwrap();
            assert!(
                issuer.may(world.cluster_of(&me), kind),
                "{io}: {} may not send {kind} to {me}: {m}",
                issuer.sub
            );
            delivered += 1;
        }
    }

    let mut relayed = 0;
    // Per client, per agent: the seqs of relayed events (heartbeats apart: services only).
    let mut all_seqs: Vec<BTreeMap<String, Vec<u64>>> = Vec::new();
    for ((who, seen), commands) in world.issuers.iter().zip(&by_client).zip(&world.commands) {
        let mut answers: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
        let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut heartbeats: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for m in seen {
            let event = m["event"].as_str().unwrap();
            let d = &m["data"];
            match event {
                "command:response" | "error" => {
                    let id = m["id"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{io}: no id: {m}"));
                    answers.entry(id).or_default().push(m);
                }
                "machine:online" | "machine:offline" => {
                    assert!(
                        who.sees(d["clusterId"].as_str().unwrap()),
                        "{io}: {}: {m}",
                        who.sub
                    );
                }
                "server:updated" | "player:joined" | "notification" | "heartbeat" => {
                    let (mid, cid) = (
                        d["machineId"].as_str().unwrap(),
                        d["clusterId"].as_str().unwrap(),
                    );
                    assert_eq!(
                        mid,
                        d["src"].as_str().unwrap(),
                        "{io}: relayed as another machine: {m}"
                    );
                    assert_eq!(
                        cid,
                        world.cluster_of(mid),
                        "{io}: relayed with another cluster: {m}"
                    );
                    assert!(
                        who.sees(cid),
                        "{io}: {} got an event of {cid}: {m}",
                        who.sub
                    );
                    let seq = d["seq"].as_u64().unwrap();
                    if event == "heartbeat" {
                        assert!(
                            who.clusters.is_none(),
                            "{io}: a heartbeat reached {}",
                            who.sub
                        );
                        heartbeats.entry(mid.to_string()).or_default().push(seq);
                    } else {
                        seqs.entry(mid.to_string()).or_default().push(seq);
                    }
                    relayed += 1;
                }
                _ => panic!("{io}: {} got {m}", who.sub),
            }
        }
        // In each agent's order; the service gets every event of every agent.
        for a in 0..AGENTS {
            let mid = machine(a);
            let mut all: Vec<u64> = seqs.get(&mid).cloned().unwrap_or_default();
            all.extend(heartbeats.get(&mid).cloned().unwrap_or_default());
            if !who.sees(world.cluster_of(&mid)) {
                assert!(all.is_empty(), "{io}: {} got events of {mid}", who.sub);
                continue;
            }
            for list in [seqs.get(&mid), heartbeats.get(&mid)].into_iter().flatten() {
                assert!(
                    list.windows(2).all(|w| w[0] < w[1]),
                    "{io}: {mid} out of order at {}",
                    who.sub
                );
            }
            if who.clusters.is_none() {
                all.sort_unstable();
                assert_eq!(
                    all,
                    (0..EVENTS).collect::<Vec<_>>(),
                    "{io}: the service missed events of {mid}"
                );
            }
        }
        // Exactly one answer per command, the right one.
        assert_eq!(
            answers.len(),
            commands.len(),
            "{io}: {}: answers to unknown ids",
            who.sub
        );
        for (req, target, kind) in commands {
            let got = answers
                .get(req.as_str())
                .unwrap_or_else(|| panic!("{io}: {req} got no answer"));
            assert_eq!(
                got.len(),
                1,
                "{io}: {req} got {} answers: {got:?}",
                got.len()
            );
            let m = got[0];
            if who.may(world.cluster_of(target), kind) {
                assert_eq!(
                    m["event"], "command:response",
                    "{io}: {req} to {target}: {m}"
                );
                assert_eq!(
                    m["data"]["result"]["answeredBy"],
                    target.as_str(),
                    "{io}: {req}: {m}"
                );
                // The target may answer one of its commands with a guess meant for
                // another: then the answer is its own, whatever it says.
                if m["data"]["result"]["rogue"] == false {
                    assert_eq!(m["data"]["result"]["type"], *kind, "{io}: {req}: {m}");
                }
            } else {
                assert_error(m, "COMMAND_FAILED");
                // The perms come first; a permitted type for another cluster's machine
                // is answered like an absent machine.
                let why = match who.may_type(kind) {
                    true => "machine not connected",
                    false => "forbidden",
                };
                assert_eq!(m["data"]["message"], why, "{io}: {req}: {m}");
            }
        }
        all_seqs.push(seqs);
    }
    // Each user got every relayed event of its clusters: the same as the service.
    let service = all_seqs.last().expect("the service");
    for (who, seqs) in world.issuers.iter().zip(&all_seqs) {
        for a in 0..AGENTS {
            let mid = machine(a);
            if who.sees(world.cluster_of(&mid)) {
                assert_eq!(
                    seqs.get(&mid),
                    service.get(&mid),
                    "{io}: {} and events of {mid}",
                    who.sub
                );
            }
        }
    }
    eprintln!(
        "{io}: {} events sent, {relayed} deliveries checked, {} commands, {delivered} delivered to agents",
        AGENTS as u64 * EVENTS,
        world.issuers.len() * COMMANDS
    );
}
