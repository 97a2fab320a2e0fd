//! Routing without sockets: the hub's actions for each input, with time passed in.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use serde_json::Value;

use super::*;
use crate::metrics::CommandOutcome;

const TS: u64 = 1_700_000_000_000;

/// An action, owned, with frames decoded to JSON.
#[derive(Debug)]
enum Did {
    Send(ConnId, Value),
    Deliver(Vec<ConnId>, Value),
    Close(ConnId, u16),
    Timer(u64, Instant),
    Post(u16, Msg),
    Publish(String, Value),
    Interest(String, bool),
}

#[derive(Default)]
struct Rec(Vec<Did>);

impl Sink for Rec {
    fn act(&mut self, action: Action<'_>) {
        self.0.push(match action {
            Action::Send { conn, frame } => Did::Send(conn, json(&frame)),
            Action::Deliver { to, frame } => Did::Deliver(to.copied().collect(), json(frame)),
            Action::Close { conn, code, .. } => Did::Close(conn, code),
            Action::ArmTimer { seq, at } => Did::Timer(seq, at),
            Action::Post { worker, msg } => Did::Post(worker, msg),
            Action::Publish { cluster, frame } => Did::Publish(cluster.into(), json(frame)),
            Action::Interest { cluster, on } => Did::Interest(cluster.into(), on),
        });
    }
}

impl Rec {
    fn take(&mut self) -> Vec<Did> {
        std::mem::take(&mut self.0)
    }
}

/// The JSON text of one unmasked server text frame.
fn json(frame: &[u8]) -> Value {
    let start = match frame[1] & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    serde_json::from_slice(&frame[start..]).expect("a JSON text frame")
}

fn conn(slot: u32) -> ConnId {
    ConnId { slot, gen: 1 }
}

fn identity(role: Role, sub: &str, clusters: &[&str]) -> Identity {
    Identity {
        role,
        sub: sub.into(),
        cluster: (role == Role::Agent).then(|| clusters[0].into()),
        clusters: match role {
            Role::User => clusters.iter().map(|&c| c.into()).collect(),
            _ => Vec::new(),
        },
        perms: None,
        exp: u64::MAX,
        iat: None,
    }
}

fn agent(machine: &str, cluster: &str) -> Identity {
    identity(Role::Agent, machine, &[cluster])
}

fn user(clusters: &[&str]) -> Identity {
    identity(Role::User, "usr_1", clusters)
}

/// `n` hubs sharing one registry, as the workers of one process.
fn hubs(n: usize) -> Vec<Hub> {
    let shared = Arc::new(Shared::new(n));
    (0..n)
        .map(|i| Hub::new(i as u16, shared.clone(), Duration::from_secs(30)))
        .collect()
}

fn event(v: &Value) -> &str {
    v["event"].as_str().unwrap_or_default()
}

fn status(id: &str) -> RelayKind<'_> {
    RelayKind::ServerStatus {
        server_id: id.into(),
    }
}

#[test]
fn a_replaced_agent_gets_4009_and_no_offline_is_announced() {
    let mut h = hubs(1);
    let hub = &mut h[0];
    let (mut out, t0) = (Rec::default(), Instant::now());
    hub.online(conn(9), &user(&["clu_a"]), "", TS, &mut out);
    let who = agent("mch_1", "clu_a");
    hub.online(conn(1), &who, "1.0", TS, &mut out);
    assert!(matches!(&out.take()[..], [Did::Deliver(to, v)]
        if to == &[conn(9)] && event(v) == "machine:online"));

    hub.online(conn(2), &who, "1.1", TS, &mut out);
    let did = out.take();
    assert!(
        matches!(&did[..], [Did::Close(c, 4009), Did::Deliver(_, v)]
        if *c == conn(1) && event(v) == "machine:online" && v["data"]["version"] == "1.1"),
        "{did:?}"
    );

    // The old connection ends: the machine is still online through the new one.
    hub.offline(conn(1), &who, t0, TS, &mut out);
    assert!(out.take().is_empty());
    let loc = hub.shared.machines.get("mch_1").map(|l| l.conn);
    assert_eq!(loc, Some(conn(2)));

    hub.offline(conn(2), &who, t0, TS, &mut out);
    assert!(matches!(&out.take()[..], [Did::Deliver(to, v)]
        if to == &[conn(9)] && event(v) == "machine:offline"));
    assert!(hub.shared.machines.is_empty());
}

#[test]
fn an_agent_replaced_on_another_worker_is_closed_there() {
    let mut h = hubs(2);
    let (mut out, who) = (Rec::default(), agent("mch_1", "clu_a"));
    h[1].online(conn(1), &who, "", TS, &mut out);
    h[0].online(conn(5), &who, "", TS, &mut out);
    let did = out.take();
    let [Did::Post(1, msg)] = &did[..] else {
        panic!("{did:?}")
    };
    assert!(matches!(msg, Msg::Close { conn: c, code: 4009, .. } if *c == conn(1)));
    let Did::Post(_, msg) = did.into_iter().next().unwrap() else {
        unreachable!()
    };
    h[1].handle(msg, Instant::now(), TS, &mut out);
    assert!(matches!(&out.take()[..], [Did::Close(c, 4009)] if *c == conn(1)));
}

/// A user (conn 9) and an agent (conn 1) of clu_a on one worker; returns the command's
/// sequence number and id after the user issued it.
fn issue(hub: &mut Hub, out: &mut Rec, now: Instant) -> (u64, String) {
    hub.online(conn(9), &user(&["clu_a"]), "", TS, out);
    hub.online(conn(1), &agent("mch_1", "clu_a"), "", TS, out);
    out.take();
    let data = r#"{"machineId":"mch_1","type":"restart"}"#;
    hub.command(
        conn(9),
        &user(&["clu_a"]),
        "r1",
        "mch_1",
        data,
        now,
        TS,
        out,
    );
    let did = out.take();
    let [Did::Timer(seq, at), Did::Send(to, v)] = &did[..] else {
        panic!("{did:?}")
    };
    assert_eq!((*to, *at), (conn(1), now + Duration::from_secs(30)));
    assert_eq!(event(v), "command");
    assert_eq!(v["data"]["type"], "restart");
    let id = v["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(id, format!("cmd_{:08x}_0_{seq}", hub.shared.nonce));
    (*seq, id)
}

fn failed(did: &[Did]) -> &str {
    match did {
        [Did::Send(to, v)] if *to == conn(9) && event(v) == "error" => {
            assert_eq!(v["data"]["code"], "COMMAND_FAILED");
            assert_eq!(v["id"], "r1");
            v["data"]["message"].as_str().unwrap()
        }
        _ => panic!("{did:?}"),
    }
}

fn counted(hub: &Hub, outcome: CommandOutcome) -> u64 {
    hub.m().commands[outcome as usize].get()
}

#[test]
fn an_answered_command_reaches_its_issuer_once() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    let (_, id) = issue(hub, &mut out, t0);
    let later = t0 + Duration::from_millis(40);
    hub.command_response(conn(1), &id, r#"{"ok":true}"#, later, TS, &mut out);
    let did = out.take();
    assert!(
        matches!(&did[..], [Did::Send(to, v)]
        if *to == conn(9) && event(v) == "command:response" && v["id"] == "r1"
            && v["data"]["ok"] == true),
        "{did:?}"
    );
    // A second answer, or one from another connection, is ignored.
    hub.command_response(conn(1), &id, "{}", later, TS, &mut out);
    assert!(out.take().is_empty());
    assert_eq!(counted(hub, CommandOutcome::Answered), 1);
    assert_eq!(hub.pending_commands(), 0);
}

#[test]
fn an_answer_from_another_connection_is_ignored() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    let (_, id) = issue(hub, &mut out, t0);
    hub.online(conn(2), &agent("mch_2", "clu_a"), "", TS, &mut out);
    out.take();
    hub.command_response(conn(2), &id, "{}", t0, TS, &mut out);
    assert!(out.take().is_empty());
    assert_eq!(hub.pending_commands(), 1);
}

#[test]
fn a_command_times_out_and_a_late_answer_is_dropped() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    let (seq, id) = issue(hub, &mut out, t0);
    let t1 = t0 + Duration::from_secs(30);
    hub.command_timed_out(seq, t1, TS, &mut out);
    assert_eq!(failed(&out.take()), "command timed out");
    hub.command_response(conn(1), &id, "{}", t1, TS, &mut out);
    assert!(out.take().is_empty());
    // A timer of a finished command does nothing.
    hub.command_timed_out(seq, t1, TS, &mut out);
    assert!(out.take().is_empty());
    assert_eq!(counted(hub, CommandOutcome::Timeout), 1);
}

#[test]
fn a_command_for_a_machine_not_connected_or_not_visible_fails() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    hub.online(conn(1), &agent("mch_1", "clu_b"), "", TS, &mut out);
    out.take();
    let who = user(&["clu_a"]);
    hub.command(conn(9), &who, "r1", "mch_2", "{}", t0, TS, &mut out);
    assert_eq!(failed(&out.take()), "machine not connected");
    hub.command(conn(9), &who, "r1", "mch_1", "{}", t0, TS, &mut out);
    // Another cluster's connected machine is answered like an absent one.
    assert_eq!(failed(&out.take()), "machine not connected");
    assert_eq!(counted(hub, CommandOutcome::NotConnected), 1);
    assert_eq!(counted(hub, CommandOutcome::Forbidden), 1);
    assert_eq!(hub.pending_commands(), 0);
}

#[test]
fn an_agent_leaving_before_answering_fails_the_command() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    issue(hub, &mut out, t0);
    hub.offline(conn(1), &agent("mch_1", "clu_a"), t0, TS, &mut out);
    let did = out.take();
    // The user sees the machine leave, then the command fail.
    let [Did::Deliver(_, v), rest @ ..] = &did[..] else {
        panic!("{did:?}")
    };
    assert_eq!(event(v), "machine:offline");
    assert_eq!(failed(rest), "machine disconnected before answering");
    assert_eq!(counted(hub, CommandOutcome::Disconnected), 1);
}

#[test]
fn a_command_reaching_a_worker_whose_agent_left_fails_as_gone() {
    let mut h = hubs(2);
    let (mut out, t0) = (Rec::default(), Instant::now());
    let who = agent("mch_1", "clu_a");
    h[1].online(conn(1), &who, "", TS, &mut out);
    h[0].online(conn(9), &user(&["clu_a"]), "", TS, &mut out);
    out.take();
    h[0].command(
        conn(9),
        &user(&["clu_a"]),
        "r1",
        "mch_1",
        "{}",
        t0,
        TS,
        &mut out,
    );
    let mut did = out.take();
    assert!(matches!(
        &did[..],
        [Did::Timer(..), Did::Post(1, Msg::ToAgent { .. })]
    ));
    let Some(Did::Post(_, to_agent)) = did.pop() else {
        unreachable!()
    };
    // The agent leaves before the command reaches its worker.
    h[1].offline(conn(1), &who, t0, TS, &mut out);
    out.take();
    h[1].handle(to_agent, t0, TS, &mut out);
    let mut did = out.take();
    assert!(matches!(
        &did[..],
        [Did::Post(
            0,
            Msg::CommandResult {
                result: Err(Failure::Gone),
                ..
            }
        )]
    ));
    let Some(Did::Post(_, result)) = did.pop() else {
        unreachable!()
    };
    h[0].handle(result, t0, TS, &mut out);
    assert_eq!(failed(&out.take()), "machine disconnected");
    assert_eq!(counted(&h[0], CommandOutcome::Disconnected), 1);
}

#[test]
fn a_command_answered_on_another_worker_comes_back_to_its_issuer() {
    let mut h = hubs(2);
    let (mut out, t0) = (Rec::default(), Instant::now());
    h[1].online(conn(1), &agent("mch_1", "clu_a"), "", TS, &mut out);
    h[0].online(conn(9), &user(&["clu_a"]), "", TS, &mut out);
    out.take();
    h[0].command(
        conn(9),
        &user(&["clu_a"]),
        "r1",
        "mch_1",
        "{}",
        t0,
        TS,
        &mut out,
    );
    let Some(Did::Post(1, to_agent)) = out.take().pop() else {
        panic!("no ToAgent")
    };
    h[1].handle(to_agent, t0, TS, &mut out);
    let Some(Did::Send(c, v)) = out.take().pop() else {
        panic!("the agent got nothing")
    };
    assert_eq!(c, conn(1));
    let id = v["data"]["id"].as_str().unwrap().to_string();
    h[1].command_response(conn(1), &id, r#"{"done":1}"#, t0, TS, &mut out);
    let Some(Did::Post(0, result)) = out.take().pop() else {
        panic!("no result posted")
    };
    h[0].handle(result, t0, TS, &mut out);
    let did = out.take();
    assert!(
        matches!(&did[..], [Did::Send(c, v)]
        if *c == conn(9) && v["data"]["done"] == 1),
        "{did:?}"
    );
}

#[test]
fn draining_fails_the_commands_of_closing_clients_and_of_the_admin_api() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    issue(hub, &mut out, t0);
    let (tx, rx) = mpsc::channel();
    let req = AdminRequest::Command {
        machine_id: "mch_1".into(),
        data: "{}".into(),
        reply: tx,
    };
    hub.handle(Msg::Admin(req), t0, TS, &mut out);
    out.take();
    assert_eq!(hub.pending_commands(), 2);

    hub.fail_http_commands(t0, TS, &mut out);
    assert!(out.take().is_empty());
    assert_eq!(rx.try_recv().unwrap(), Err(Failure::Draining));
    let others: HashSet<ConnId> = [conn(9)].into();
    hub.fail_commands_of(&others, t0, TS, &mut out);
    assert_eq!(failed(&out.take()), "the gateway is shutting down");
    assert_eq!(counted(hub, CommandOutcome::Draining), 2);
    assert_eq!(hub.pending_commands(), 0);
}

#[test]
fn nothing_is_encoded_when_nobody_can_receive() {
    let mut h = hubs(2);
    let (mut out, who) = (Rec::default(), agent("mch_1", "clu_a"));
    h[0].online(conn(1), &who, "", TS, &mut out);
    out.take();
    let before = h[0].m().relay_events.get();
    h[0].agent_event(
        conn(1),
        &status("srv_1"),
        "mch_1",
        "clu_a",
        "{}",
        TS,
        &mut out,
    );
    assert!(out.take().is_empty());
    assert_eq!(h[0].m().relay_events.get(), before);
    // A user of another cluster here, and one on the other worker: heartbeats are for
    // services only, so still nobody.
    h[0].online(conn(8), &user(&["clu_b"]), "", TS, &mut out);
    h[1].online(conn(3), &user(&["clu_a"]), "", TS, &mut out);
    out.take();
    let (hb, before) = (RelayKind::Heartbeat, h[0].m().relay_events.get());
    h[0].agent_event(conn(1), &hb, "mch_1", "clu_a", r#"{"cpu":1}"#, TS, &mut out);
    assert!(out.take().is_empty());
    assert_eq!(h[0].m().relay_events.get(), before);
}

#[test]
fn events_are_posted_only_to_workers_with_receivers() {
    let mut h = hubs(3);
    let mut out = Rec::default();
    h[0].online(conn(1), &agent("mch_1", "clu_a"), "", TS, &mut out);
    h[1].online(conn(4), &user(&["clu_a"]), "", TS, &mut out);
    out.take();
    let data = r#"{"serverId":"srv_1","status":"running"}"#;
    h[0].agent_event(
        conn(1),
        &status("srv_1"),
        "mch_1",
        "clu_a",
        data,
        TS,
        &mut out,
    );
    let mut did = out.take();
    assert!(
        matches!(
            &did[..],
            [Did::Post(
                1,
                Msg::Deliver {
                    services_only: false,
                    ..
                }
            )]
        ),
        "{did:?}"
    );
    let Some(Did::Post(_, deliver)) = did.pop() else {
        unreachable!()
    };
    h[1].handle(deliver, Instant::now(), TS, &mut out);
    let did = out.take();
    let [Did::Deliver(to, v)] = &did[..] else {
        panic!("{did:?}")
    };
    assert_eq!(to, &[conn(4)]);
    assert_eq!(event(v), "server:updated");
    assert_eq!(v["data"]["machineId"], "mch_1");
    assert_eq!(v["data"]["status"], "running");

    // A service on worker 2 receives heartbeats; the user on worker 1 does not.
    h[2].online(
        conn(6),
        &identity(Role::Service, "svc", &[]),
        "",
        TS,
        &mut out,
    );
    out.take();
    let hb = RelayKind::Heartbeat;
    h[0].agent_event(conn(1), &hb, "mch_1", "clu_a", "{}", TS, &mut out);
    let did = out.take();
    assert!(
        matches!(
            &did[..],
            [Did::Post(
                2,
                Msg::Deliver {
                    services_only: true,
                    ..
                }
            )]
        ),
        "{did:?}"
    );
    // Once the user leaves, worker 1 gets nothing more.
    h[1].offline(conn(4), &user(&["clu_a"]), Instant::now(), TS, &mut out);
    assert_eq!(h[1].shared.workers[1].clients.load(Ordering::Relaxed), 0);
}

#[test]
fn the_latest_reports_are_kept_per_agent() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    hub.online(conn(1), &agent("mch_1", "clu_a"), "2.0", TS, &mut out);
    let s1 = r#"{"serverId":"srv_1","status":"starting"}"#;
    let s1b = r#"{"serverId":"srv_1","status":"running"}"#;
    let s2 = r#"{"serverId":"srv_2","status":"stopped"}"#;
    for (kind, data) in [
        (status("srv_1"), s1),
        (status("srv_2"), s2),
        (status("srv_1"), s1b),
    ] {
        hub.agent_event(conn(1), &kind, "mch_1", "clu_a", data, TS, &mut out);
    }
    hub.agent_event(
        conn(1),
        &RelayKind::Heartbeat,
        "mch_1",
        "clu_a",
        "{}",
        TS + 5,
        &mut out,
    );
    let (tx, rx) = mpsc::channel();
    let req = AdminRequest::Machine {
        machine_id: "mch_1".into(),
        reply: tx,
    };
    hub.handle(Msg::Admin(req), t0, TS, &mut out);
    let info = rx.try_recv().unwrap().expect("mch_1 is here");
    assert_eq!((&*info.version, info.last_heartbeat), ("2.0", Some(TS + 5)));
    let detail = info.detail.unwrap();
    assert_eq!(detail.servers, vec![s1b.to_string(), s2.to_string()]);
    assert_eq!(detail.heartbeat.as_deref(), Some("{}"));
}

/// The messages of `did`, all posts to worker `w`.
fn posts_to(did: Vec<Did>, w: u16) -> Vec<Msg> {
    did.into_iter()
        .map(|d| match d {
            Did::Post(to, msg) if to == w => msg,
            other => panic!("expected a post to worker {w}: {other:?}"),
        })
        .collect()
}

/// What `hub`'s local subscribers receive of `msgs`, handled in this order at `ts`.
fn received(hub: &mut Hub, msgs: Vec<Msg>, ts: u64) -> Vec<Value> {
    let mut out = Rec::default();
    for msg in msgs {
        hub.handle(msg, Instant::now(), ts, &mut out);
    }
    out.take()
        .into_iter()
        .map(|d| match d {
            Did::Deliver(_, v) => v,
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Worker 2 holds a user of clu_a; machine mch_1 connects on workers 0 and 1.
fn presence_setup() -> (Vec<Hub>, Rec, Identity) {
    let mut h = hubs(3);
    let mut out = Rec::default();
    h[2].online(conn(9), &user(&["clu_a"]), "", TS, &mut out);
    assert!(out.take().is_empty());
    (h, out, agent("mch_1", "clu_a"))
}

#[test]
fn an_older_connections_offline_crossing_the_newer_online_is_dropped() {
    let (mut h, mut out, who) = presence_setup();
    let t0 = Instant::now();
    h[0].online(conn(1), &who, "1.0", TS, &mut out);
    let first_online = posts_to(out.take(), 2);
    // The first connection ends while the registry still names it: offline is announced…
    h[0].offline(conn(1), &who, t0, TS, &mut out);
    let offline = posts_to(out.take(), 2);
    // …and the machine reconnects on worker 1 at once.
    h[1].online(conn(1), &who, "1.1", TS, &mut out);
    let second_online = posts_to(out.take(), 2);
    // Worker 2 reads worker 1's inbox before worker 0's: the announcements cross.
    let mut msgs = first_online;
    msgs.extend(second_online);
    msgs.extend(offline);
    let seen = received(&mut h[2], msgs, TS);
    let events: Vec<(&str, &Value)> = seen
        .iter()
        .map(|v| (event(v), &v["data"]["version"]))
        .collect();
    assert_eq!(
        events,
        [
            ("machine:online", &Value::from("1.0")),
            ("machine:online", &Value::from("1.1"))
        ],
        "the user must not end believing the connected machine is offline"
    );
}

#[test]
fn a_replaced_connections_backlog_is_relayed_until_the_newer_one_reports() {
    let (mut h, mut out, who) = presence_setup();
    let report = |hub: &mut Hub, out: &mut Rec, seq: &str| {
        let data = format!(r#"{{"serverId":"srv_1","state":"{seq}"}}"#);
        let kind = status("srv_1");
        hub.agent_event(conn(1), &kind, "mch_1", "clu_a", &data, TS, out);
        posts_to(out.take(), 2)
    };
    h[0].online(conn(1), &who, "", TS, &mut out);
    let mut msgs = posts_to(out.take(), 2);
    // The newer connection authenticates on worker 1; worker 0 is told to close the older.
    h[1].online(conn(1), &who, "", TS, &mut out);
    let did = out.take();
    let (close, online): (Vec<Did>, Vec<Did>) =
        did.into_iter().partition(|d| matches!(d, Did::Post(0, _)));
    let close = posts_to(close, 0);
    msgs.extend(posts_to(online, 2));
    // The older connection's backlog is still read during its drain, around the newer
    // connection's first report.
    let old_1 = report(&mut h[0], &mut out, "old-1");
    msgs.extend(old_1);
    msgs.extend(report(&mut h[1], &mut out, "new"));
    msgs.extend(report(&mut h[0], &mut out, "old-2"));
    let seen = received(&mut h[2], msgs, TS);
    let events: Vec<String> = seen
        .iter()
        .map(|v| match event(v) {
            "server:updated" => v["data"]["state"].as_str().unwrap().to_string(),
            e => e.to_string(),
        })
        .collect();
    assert_eq!(
        events,
        ["machine:online", "machine:online", "old-1", "new"],
        "a stale status must not win over the newer connection's"
    );
    // The replaced connection takes no more commands: one routed to it before the
    // takeover is answered as for a disconnected agent, and nothing is written to it.
    let t0 = Instant::now();
    for msg in close {
        h[0].handle(msg, t0, TS, &mut out);
    }
    assert!(matches!(&out.take()[..], [Did::Close(c, 4009)] if *c == conn(1)));
    let frame = Bytes::from_static(b"command");
    let deadline = t0 + Duration::from_secs(30);
    let (from, seq) = (2, 7);
    let to_agent = Msg::ToAgent {
        conn: conn(1),
        frame,
        from,
        seq,
        deadline,
    };
    h[0].handle(to_agent, t0, TS, &mut out);
    let did = out.take();
    assert!(
        matches!(
            &did[..],
            [Did::Post(
                2,
                Msg::CommandResult {
                    seq: 7,
                    result: Err(Failure::Gone)
                }
            )]
        ),
        "{did:?}"
    );
    // Once it is gone, nothing about it is kept.
    h[0].offline(conn(1), &who, t0, TS, &mut out);
    assert!(out.take().is_empty());
    assert!(h[0].commands.replaced.is_empty());
}

#[test]
fn delivered_generations_are_forgotten_once_the_machine_is_gone() {
    let (mut h, mut out, who) = presence_setup();
    let t0 = Instant::now();
    h[0].online(conn(1), &who, "", TS, &mut out);
    let mut msgs = posts_to(out.take(), 2);
    h[0].offline(conn(1), &who, t0, TS, &mut out);
    msgs.extend(posts_to(out.take(), 2));
    assert_eq!(received(&mut h[2], msgs, TS).len(), 2);
    assert_eq!(h[2].delivered.len(), 1);
    // A machine still connected with the generation seen is kept past the retention.
    h[1].online(conn(2), &agent("mch_2", "clu_a"), "", TS, &mut out);
    let msgs = posts_to(out.take(), 2);
    assert_eq!(received(&mut h[2], msgs, TS).len(), 1);
    let later = TS + RETENTION_MS + 1;
    h[1].notify("clu_a", "{}", later, &mut out);
    let msgs = posts_to(out.take(), 2);
    assert_eq!(received(&mut h[2], msgs, later).len(), 1);
    assert_eq!(h[2].delivered.len(), 1, "mch_1 forgotten, mch_2 kept");
}

#[test]
fn the_admin_list_shows_a_replaced_machine_once() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    let who = agent("mch_1", "clu_a");
    hub.online(conn(1), &who, "1.0", TS, &mut out);
    hub.online(conn(2), &who, "1.1", TS + 1, &mut out);
    hub.online(conn(3), &agent("mch_2", "clu_b"), "", TS, &mut out);
    let (tx, rx) = mpsc::channel();
    hub.handle(
        Msg::Admin(AdminRequest::Machines { reply: tx }),
        t0,
        TS,
        &mut out,
    );
    let mut list: Vec<(Box<str>, Box<str>)> = rx
        .try_recv()
        .unwrap()
        .into_iter()
        .map(|m| (m.machine_id, m.version))
        .collect();
    list.sort();
    assert_eq!(
        list,
        [("mch_1".into(), "1.1".into()), ("mch_2".into(), "".into())]
    );
}

#[test]
fn a_notification_reaches_the_cluster_s_users_and_every_service() {
    let mut h = hubs(1);
    let (hub, mut out, t0) = (&mut h[0], Rec::default(), Instant::now());
    hub.online(conn(1), &user(&["clu_a"]), "", TS, &mut out);
    hub.online(conn(2), &user(&["clu_b"]), "", TS, &mut out);
    hub.online(
        conn(3),
        &identity(Role::Service, "svc", &[]),
        "",
        TS,
        &mut out,
    );
    let req = AdminRequest::Notify {
        cluster_id: "clu_a".into(),
        data: r#"{"type":"info","message":"hi"}"#.into(),
    };
    hub.handle(Msg::Admin(req), t0, TS, &mut out);
    let did = out.take();
    let to: Vec<ConnId> = did
        .iter()
        .flat_map(|d| match d {
            Did::Deliver(to, v) if event(v) == "notification" => to.clone(),
            _ => panic!("{did:?}"),
        })
        .collect();
    assert_eq!(to, [conn(3), conn(1)]);
}

/// A hub of a node linked to others by a bus.
fn hub_with_bus() -> Hub {
    let mut shared = Shared::new(1);
    shared.bus = true;
    Hub::new(0, Arc::new(shared), Duration::from_secs(30))
}

#[test]
fn with_a_bus_an_event_is_published_once_and_users_bring_interest() {
    let mut hub = hub_with_bus();
    let mut out = Rec::default();
    let t0 = Instant::now();
    // Nobody here: still encoded, for the other nodes, and published once.
    hub.relay(
        &status("srv_1"),
        "mch_1",
        "clu_a",
        r#"{"n":1}"#,
        1,
        TS,
        &mut out,
    );
    let did = out.take();
    assert!(
        matches!(&did[..], [Did::Publish(c, v)] if c == "clu_a" && event(v) == "server:updated"),
        "{did:?}"
    );
    // Heartbeats reach services only, which see only their own node's: not published.
    hub.relay(
        &RelayKind::Heartbeat,
        "mch_1",
        "clu_a",
        "{}",
        1,
        TS,
        &mut out,
    );
    assert!(out.take().is_empty());

    // The first user of a cluster on this worker brings interest; the second does not.
    hub.online(conn(1), &user(&["clu_a", "clu_b"]), "", TS, &mut out);
    let did = out.take();
    assert!(
        matches!(&did[..], [Did::Interest(a, true), Did::Interest(b, true)]
            if a == "clu_a" && b == "clu_b"),
        "{did:?}"
    );
    hub.online(conn(2), &user(&["clu_a"]), "", TS, &mut out);
    assert!(out.take().is_empty());
    hub.offline(conn(1), &user(&["clu_a", "clu_b"]), t0, TS, &mut out);
    assert!(matches!(&out.take()[..], [Did::Interest(b, false)] if b == "clu_b"));
    hub.offline(conn(2), &user(&["clu_a"]), t0, TS, &mut out);
    assert!(matches!(&out.take()[..], [Did::Interest(a, false)] if a == "clu_a"));
}

#[test]
fn another_nodes_event_goes_to_the_clusters_users_not_to_services() {
    let mut hub = hub_with_bus();
    let mut out = Rec::default();
    hub.online(conn(1), &user(&["clu_a"]), "", TS, &mut out);
    hub.online(
        conn(2),
        &identity(Role::Service, "svc", &[]),
        "",
        TS,
        &mut out,
    );
    out.take();
    let frame = crate::protocol::envelope::relay("server:updated", "mch_9", "clu_a", "{}", TS);
    let msg = Msg::Deliver {
        cluster: "clu_a".into(),
        frame,
        services_only: false,
        remote: true,
        stamp: None,
    };
    hub.handle(msg, Instant::now(), TS, &mut out);
    let did = out.take();
    assert!(
        matches!(&did[..], [Did::Deliver(to, v)] if to == &[conn(1)] && event(v) == "server:updated"),
        "{did:?}"
    );
}

#[test]
fn without_a_bus_nothing_is_published_and_no_interest_is_shown() {
    let mut h = hubs(1);
    let mut out = Rec::default();
    h[0].online(conn(1), &user(&["clu_a"]), "", TS, &mut out);
    h[0].relay(&status("srv_1"), "mch_1", "clu_a", "{}", 1, TS, &mut out);
    let did = out.take();
    assert!(matches!(&did[..], [Did::Deliver(..)]), "{did:?}");
}
