//! docs/protocol.md sections 6 and 7 against the real binary: agent events relayed to the
//! users of the agent's cluster and to services, presence, order and the agent lease.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

both_backends!(
    server_status_becomes_server_updated,
    heartbeat_and_metrics_go_to_services_only,
    player_events_and_notifications_are_relayed,
    messages_of_one_agent_arrive_in_order,
    messages_larger_than_a_receive_buffer_arrive_whole,
    machine_online_and_offline,
    silent_agent_is_closed_4000_after_lease,
    messages_renew_the_agent_lease,
    presence_follows_the_newest_connection_through_racing_takeovers,
);

/// A service, a user of `clu_1` (among others), a user of `clu_2` only, then an agent
/// `mch_1` of `clu_1`; the online notices are consumed.
async fn audience(gw: &Gateway) -> (Ws, Ws, Ws, Ws) {
    let mut service = gw.service("svc_r").await;
    let mut user = gw.user("usr_r", &["clu_0", "clu_1"]).await;
    let other = gw.user("usr_o", &["clu_2"]).await;
    let agent = gw.agent("mch_1", "clu_1").await;
    service.recv_event("machine:online").await;
    user.recv_event("machine:online").await;
    (service, user, other, agent)
}

/// `data` with the authenticated machine and cluster put in.
fn stamped(data: &Value) -> Value {
    let mut d = data.clone();
    d["machineId"] = json!("mch_1");
    d["clusterId"] = json!("clu_1");
    d
}

async fn server_status_becomes_server_updated(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (mut service, mut user, mut other, mut agent) = audience(&gw).await;
    let data = json!({
        "serverId": "srv_9", "status": "running", "players": 3, "maxPlayers": 20,
        "machineId": "mch_spoofed", "clusterId": "clu_2",
        "map": "de_dust2", "extra": {"nested": [1, {"deep": true}], "n": null}
    });
    agent
        .send(json!({"event": "server:status", "data": data}))
        .await;
    for ws in [&mut user, &mut service] {
        let m = ws.recv_event("server:updated").await;
        assert_eq!(m["data"], stamped(&data), "{m}");
        assert!(m.get("id").is_none(), "{m}");
    }
    // Without the two ids in data.
    let data = json!({"serverId": "srv_8", "status": "stopped"});
    agent
        .send(json!({"event": "server:status", "data": data}))
        .await;
    for ws in [&mut user, &mut service] {
        let m = ws.recv_event("server:updated").await;
        assert_eq!(m["data"], stamped(&data), "{m}");
    }
    other.expect_silence(Duration::from_millis(500)).await;
    agent.expect_silence(Duration::from_millis(100)).await;
}

async fn heartbeat_and_metrics_go_to_services_only(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (mut service, mut user, mut other, mut agent) = audience(&gw).await;
    let heartbeat = json!({"machineId": "mch_1", "timestamp": now_s(), "cpu": 12.5,
        "memory": 40.1, "uptime": 3600, "custom": "kept"});
    let metrics = json!({"machineId": "mch_x", "cpu": {"cores": 8, "usage": [1, 2], "average": 1.5},
        "memory": {"total": 16, "used": 8, "free": 8}, "disk": [], "network": {}});
    agent
        .send(json!({"event": "heartbeat", "data": heartbeat}))
        .await;
    agent
        .send(json!({"event": "metrics", "data": metrics}))
        .await;
    let m = service.recv_event("heartbeat").await;
    assert_eq!(m["data"], stamped(&heartbeat), "{m}");
    let m = service.recv_event("metrics").await;
    assert_eq!(m["data"], stamped(&metrics), "{m}");
    user.expect_silence(Duration::from_millis(500)).await;
    other.expect_silence(Duration::from_millis(100)).await;
    agent.expect_silence(Duration::from_millis(100)).await;
}

async fn player_events_and_notifications_are_relayed(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (mut service, mut user, mut other, mut agent) = audience(&gw).await;
    let player = json!({"id": "p1", "username": "alice", "steamId": "7656119"});
    let events = [
        (
            "player:joined",
            json!({"serverId": "srv_1", "player": player}),
        ),
        (
            "player:left",
            json!({"serverId": "srv_1", "player": player, "reason": "quit"}),
        ),
        (
            "notification",
            json!({"type": "warning", "message": "disk almost full"}),
        ),
    ];
    for (event, data) in &events {
        agent.send(json!({"event": event, "data": data})).await;
    }
    for ws in [&mut user, &mut service] {
        for (event, data) in &events {
            let m = ws.recv_event(event).await;
            assert_eq!(m["data"], stamped(data), "{m}");
        }
    }
    other.expect_silence(Duration::from_millis(500)).await;
}

async fn messages_of_one_agent_arrive_in_order(io: &'static str) {
    let gw = Gateway::start(io, &["--rate-limit", "100000", "--rate-burst", "100000"]).await;
    let (mut service, mut user, _other, mut agent) = audience(&gw).await;
    let mut users = [user_ws(&gw).await, user_ws(&gw).await];
    for i in 0..100 {
        let event = if i % 10 == 9 {
            "player:joined"
        } else {
            "server:status"
        };
        agent
            .send(json!({"event": event, "data": {"serverId": "srv_o", "seq": i}}))
            .await;
    }
    for ws in users.iter_mut().chain([&mut user, &mut service]) {
        for i in 0..100 {
            let m = ws.recv().await;
            let event = if i % 10 == 9 {
                "player:joined"
            } else {
                "server:updated"
            };
            assert_eq!(m["event"], event, "message {i}: {m}");
            assert_eq!(m["data"]["seq"], i, "message {i}: {m}");
        }
    }
}

/// Messages sent back to back, most spanning several of the gateway's receive buffers
/// and ending mid-buffer, each relayed byte for byte.
async fn messages_larger_than_a_receive_buffer_arrive_whole(io: &'static str) {
    // 1.2 MB are queued for the user before it reads: more than the default outbound limit.
    let args = ["--rate-limit", "100000", "--rate-burst", "100000"];
    let gw = Gateway::start(
        io,
        &[&args[..], &["--max-outbound-bytes", "4000000"]].concat(),
    )
    .await;
    let (_service, mut user, _other, mut agent) = audience(&gw).await;
    let blob = |i: usize| -> String {
        let len = 1 + i * 3_989 % 40_000;
        (0..len)
            .map(|k| char::from(b'a' + ((i + k) % 26) as u8))
            .collect()
    };
    for i in 0..60 {
        agent
            .send(json!({"event": "server:status", "data": {"serverId": "srv_big", "seq": i, "blob": blob(i)}}))
            .await;
    }
    for i in 0..60 {
        let m = user.recv_event("server:updated").await;
        assert_eq!(m["data"]["seq"], i, "message {i}");
        assert!(m["data"]["blob"] == blob(i), "message {i}: blob differs");
    }
}

/// Another user of `clu_1` (connections land on either worker).
async fn user_ws(gw: &Gateway) -> Ws {
    gw.user("usr_more", &["clu_1"]).await
}

async fn machine_online_and_offline(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut service = gw.service("svc_p").await;
    let mut user = gw.user("usr_p", &["clu_1"]).await;
    let mut other = gw.user("usr_q", &["clu_2"]).await;
    let agent = gw.agent("mch_p", "clu_1").await;
    let presence = json!({"machineId": "mch_p", "clusterId": "clu_1", "version": VERSION});
    for ws in [&mut service, &mut user] {
        let m = ws.recv_event("machine:online").await;
        assert_eq!(m["data"], presence, "{m}");
    }
    agent.close().await;
    for ws in [&mut service, &mut user] {
        let m = ws.recv_event("machine:offline").await;
        assert_eq!(m["data"], presence, "{m}");
    }
    // An agent whose TCP connection just drops goes offline too.
    let agent = gw.agent("mch_p2", "clu_1").await;
    for ws in [&mut service, &mut user] {
        ws.recv_event("machine:online").await;
    }
    agent.abort();
    for ws in [&mut service, &mut user] {
        let m = ws.recv_event("machine:offline").await;
        assert_eq!(m["data"]["machineId"], "mch_p2", "{m}");
        assert_eq!(m["data"]["clusterId"], "clu_1", "{m}");
    }
    other.expect_silence(Duration::from_millis(300)).await;
}

async fn silent_agent_is_closed_4000_after_lease(io: &'static str) {
    // Pings every 300 ms are answered by the client: that alone must not keep the lease.
    let gw = Gateway::start(
        io,
        &[
            "--agent-lease",
            "1500ms",
            "--ping-interval",
            "300ms",
            "--pong-timeout",
            "1s",
        ],
    )
    .await;
    let mut service = gw.service("svc_l").await;
    let start = Instant::now();
    let mut agent = gw.agent("mch_l", "clu_l").await;
    // Both read (and so answer pings) meanwhile.
    let (code, offline) = tokio::join!(
        async {
            let code = agent.expect_close().await;
            (code, start.elapsed())
        },
        async {
            service.recv_event("machine:online").await;
            service.recv_event("machine:offline").await
        }
    );
    let (code, took) = code;
    assert_eq!(code, 4000);
    assert!(took >= Duration::from_millis(1300), "closed after {took:?}");
    assert_eq!(offline["data"]["machineId"], "mch_l", "{offline}");
}

async fn messages_renew_the_agent_lease(io: &'static str) {
    let gw = Gateway::start(io, &["--agent-lease", "1s"]).await;
    let mut agent = gw.agent("mch_h", "clu_h").await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3000) {
        agent
            .send(json!({"event": "heartbeat", "data": {"cpu": 1, "memory": 2, "uptime": 3}}))
            .await;
        agent.expect_silence(Duration::from_millis(300)).await;
    }
    agent.assert_open().await;
}

/// One machine reconnects over and over on a two-worker gateway, each newer connection
/// authenticating while the older one ends (dropped, or replaced with 4009), so that the
/// older connection's `machine:offline` races the newer one's `machine:online` across the
/// workers. Each connection has its own version: no user may get presence of an older
/// connection after the newer one's `machine:online`, and the last presence event is the
/// online of the connection that stays.
async fn presence_follows_the_newest_connection_through_racing_takeovers(io: &'static str) {
    const ROUNDS: usize = 60;
    let gw = Gateway::start(io, &[]).await;
    // Several users, so that both workers hold some.
    let mut users = Vec::new();
    for k in 0..4 {
        users.push(gw.user(&format!("usr_t{k}"), &["clu_t"]).await);
    }
    let token = agent_token("mch_t", "clu_t");
    let auth = |i: usize| {
        json!({"event": "auth", "data": {"token": token, "machineId": "mch_t",
            "version": format!("1.0.{i}")}})
    };
    let mut current = gw.ws("/ws/agent").await;
    current.send(auth(0)).await;
    current.recv_event("authenticated").await;
    for i in 1..=ROUNDS {
        // Upgraded beforehand, so that the auth and the older connection's end are close.
        let mut next = gw.ws("/ws/agent").await;
        let older = current;
        if i % 2 == 1 {
            older.abort();
            next.send(auth(i)).await;
        } else {
            next.send(auth(i)).await;
            drop(older);
        }
        next.recv_event("authenticated").await;
        current = next;
    }
    current
        .send(json!({"event": "server:status", "data": {"serverId": "srv_last"}}))
        .await;
    for (k, user) in users.iter_mut().enumerate() {
        let mut presence: Vec<(String, usize)> = Vec::new();
        let mut sentinel = false;
        loop {
            // After the last connection's report, whatever still comes within a while.
            let within = if sentinel {
                Duration::from_millis(500)
            } else {
                WAIT
            };
            match user.poll(within).await {
                Polled::Message(m) if m["event"] == "server:updated" => sentinel = true,
                Polled::Message(m) => {
                    let version = m["data"]["version"].as_str().unwrap_or_default();
                    let n = version.rsplit('.').next().unwrap().parse().unwrap();
                    presence.push((m["event"].as_str().unwrap().to_string(), n));
                }
                Polled::Nothing if sentinel => break,
                other => panic!("user {k}: {other:?} after {presence:?}"),
            }
        }
        let mut newest = 0;
        for (event, n) in &presence {
            assert!(
                *n >= newest,
                "user {k}: {event} of connection {n} after connection {newest}'s: {presence:?}"
            );
            newest = *n;
        }
        let last = presence.last().cloned();
        assert_eq!(
            last,
            Some(("machine:online".to_string(), ROUNDS)),
            "user {k}: {presence:?}"
        );
    }
    current.assert_open().await;
}
