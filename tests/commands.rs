//! docs/protocol.md sections 8 and 9 against the real binary: commands from users and services,
//! their failures and permissions, and service notifications.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

both_backends!(
    user_command_round_trip,
    unsuccessful_response_is_relayed,
    service_commands_any_cluster,
    concurrent_commands_are_matched_by_id,
    command_to_absent_machine_fails,
    command_fails_when_agent_disconnects,
    command_times_out,
    other_clusters_machine_is_answered_like_an_absent_one,
    perms_limit_command_types,
    duplicate_and_unknown_responses_are_ignored,
    service_notification_reaches_its_cluster_users,
);

fn command(id: &str, data: Value) -> Value {
    json!({"event": "command", "id": id, "data": data})
}

fn respond(id: &Value, success: bool) -> Value {
    json!({"event": "command:response", "data": {"id": id, "success": success}})
}

/// A user of `clu_c` and the agent `mch_c` of `clu_c` (online notice consumed).
async fn pair(gw: &Gateway) -> (Ws, Ws) {
    let mut user = gw.user("usr_c", &["clu_c"]).await;
    let agent = gw.agent("mch_c", "clu_c").await;
    user.recv_event("machine:online").await;
    (user, agent)
}

/// Expects `COMMAND_FAILED` for request `id` and that the message says `why` (if given).
async fn expect_command_failed(ws: &mut Ws, id: &str, why: Option<&str>) {
    let e = ws.recv_skipping("error", &["machine:offline"]).await;
    assert_error(&e, "COMMAND_FAILED");
    assert_eq!(e["id"], id, "{e}");
    if let Some(why) = why {
        let msg = e["data"]["message"].as_str().unwrap().to_lowercase();
        assert!(msg.contains(why), "expected {why:?} in {e}");
    }
}

async fn user_command_round_trip(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (mut user, mut agent) = pair(&gw).await;
    user.send(command(
        "req_1",
        json!({"machineId": "mch_c", "type": "server:start",
        "serverId": "srv_xyz", "args": {"map": "x", "n": [1, 2]}}),
    ))
    .await;
    let cmd = agent.recv_event("command").await;
    let data = cmd["data"].as_object().unwrap();
    let cmd_id = data["id"].clone();
    assert!(
        cmd_id
            .as_str()
            .is_some_and(|s| !s.is_empty() && s != "req_1"),
        "the agent sees a gateway-generated id: {cmd}"
    );
    assert!(
        cmd.get("id").is_none() || cmd["id"] == cmd_id,
        "the issuer's id leaked: {cmd}"
    );
    assert!(!data.contains_key("machineId"), "{cmd}");
    assert_eq!(data["type"], "server:start", "{cmd}");
    assert_eq!(data["serverId"], "srv_xyz", "{cmd}");
    assert_eq!(data["args"], json!({"map": "x", "n": [1, 2]}), "{cmd}");
    assert_eq!(data.len(), 4, "{cmd}");

    let answer = json!({"id": cmd_id, "success": true, "result": {"pid": 4242, "log": ["ok"]}});
    agent
        .send(json!({"event": "command:response", "data": answer}))
        .await;
    let r = user.recv_event("command:response").await;
    assert_eq!(r["id"], "req_1", "{r}");
    assert_eq!(r["data"], answer, "{r}");

    // A second command gets another id.
    user.send(command(
        "req_2",
        json!({"machineId": "mch_c", "type": "server:stop"}),
    ))
    .await;
    let cmd2 = agent.recv_event("command").await;
    assert_ne!(cmd2["data"]["id"], cmd_id, "{cmd2}");
    assert!(cmd2["data"].get("serverId").is_none(), "{cmd2}");
    agent.send(respond(&cmd2["data"]["id"], true)).await;
    assert_eq!(user.recv_event("command:response").await["id"], "req_2");
}

async fn unsuccessful_response_is_relayed(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (mut user, mut agent) = pair(&gw).await;
    user.send(command(
        "req_f",
        json!({"machineId": "mch_c", "type": "server:restart",
        "serverId": "srv_1"}),
    ))
    .await;
    let cmd = agent.recv_event("command").await;
    let answer = json!({"id": cmd["data"]["id"], "success": false, "error": "server is locked"});
    agent
        .send(json!({"event": "command:response", "data": answer}))
        .await;
    let r = user.recv().await;
    assert_eq!(r["event"], "command:response", "not an error: {r}");
    assert_eq!(r["id"], "req_f", "{r}");
    assert_eq!(r["data"], answer, "{r}");
}

async fn service_commands_any_cluster(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut service = gw.service("svc_c").await;
    let mut a1 = gw.agent("mch_s1", "clu_s1").await;
    let mut a2 = gw.agent("mch_s2", "clu_s2").await;
    service.recv_event("machine:online").await;
    service.recv_event("machine:online").await;
    for (agent, machine, req) in [(&mut a1, "mch_s1", "s-1"), (&mut a2, "mch_s2", "s-2")] {
        service
            .send(command(
                req,
                json!({"machineId": machine, "type": "server:backup"}),
            ))
            .await;
        let cmd = agent.recv_event("command").await;
        assert_eq!(cmd["data"]["type"], "server:backup", "{cmd}");
        agent.send(respond(&cmd["data"]["id"], true)).await;
        let r = service.recv_event("command:response").await;
        assert_eq!(r["id"], req, "{r}");
        assert_eq!(r["data"]["success"], true, "{r}");
    }
}

async fn concurrent_commands_are_matched_by_id(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (mut user, mut agent) = pair(&gw).await;
    let mut other = gw.user("usr_c2", &["clu_c"]).await;
    user.send(command("same", json!({"machineId": "mch_c", "type": "a"})))
        .await;
    other
        .send(command("same", json!({"machineId": "mch_c", "type": "b"})))
        .await;
    user.send(command("u-2", json!({"machineId": "mch_c", "type": "c"})))
        .await;
    let mut cmds = Vec::new();
    for _ in 0..3 {
        cmds.push(agent.recv_event("command").await);
    }
    // Answer in reverse order, each with its type as result.
    for cmd in cmds.iter().rev() {
        agent
            .send(json!({"event": "command:response",
                "data": {"id": cmd["data"]["id"], "success": true, "result": cmd["data"]["type"]}}))
            .await;
    }
    let mut got: Vec<(Value, Value)> = Vec::new();
    for _ in 0..2 {
        let r = user.recv_event("command:response").await;
        got.push((r["id"].clone(), r["data"]["result"].clone()));
    }
    got.sort_by_key(|(id, _)| id.to_string());
    assert_eq!(
        got,
        vec![(json!("same"), json!("a")), (json!("u-2"), json!("c"))]
    );
    let r = other.recv_event("command:response").await;
    assert_eq!(
        (&r["id"], &r["data"]["result"]),
        (&json!("same"), &json!("b")),
        "{r}"
    );
}

async fn command_to_absent_machine_fails(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut user = gw.user("usr_c", &["clu_c"]).await;
    user.send(command(
        "req_n",
        json!({"machineId": "mch_none", "type": "server:start"}),
    ))
    .await;
    expect_command_failed(&mut user, "req_n", None).await;
    user.assert_open().await;
    let mut service = gw.service("svc_n").await;
    service
        .send(command(
            "req_s",
            json!({"machineId": "mch_none", "type": "server:start"}),
        ))
        .await;
    expect_command_failed(&mut service, "req_s", None).await;
}

async fn command_fails_when_agent_disconnects(io: &'static str) {
    let gw = Gateway::start(io, &["--command-timeout", "30s"]).await;
    let (mut user, mut agent) = pair(&gw).await;
    user.send(command(
        "req_d",
        json!({"machineId": "mch_c", "type": "server:start"}),
    ))
    .await;
    agent.recv_event("command").await;
    let start = Instant::now();
    agent.close().await;
    // The failure and the offline notice, in either order.
    let (mut failed, mut offline) = (false, false);
    while !(failed && offline) {
        let m = user.recv().await;
        if m["event"] == "machine:offline" && !offline {
            offline = true;
        } else {
            assert_error(&m, "COMMAND_FAILED");
            assert_eq!(m["id"], "req_d", "{m}");
            assert!(!failed, "failed twice: {m}");
            failed = true;
        }
    }
    assert!(
        start.elapsed() < WAIT,
        "failed only after {:?}",
        start.elapsed()
    );
    user.assert_open().await;
}

async fn command_times_out(io: &'static str) {
    let gw = Gateway::start(io, &["--command-timeout", "1s"]).await;
    let (mut user, mut agent) = pair(&gw).await;
    let start = Instant::now();
    user.send(command(
        "req_t",
        json!({"machineId": "mch_c", "type": "server:start"}),
    ))
    .await;
    let cmd = agent.recv_event("command").await;
    expect_command_failed(&mut user, "req_t", None).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "timed out after {took:?}"
    );
    // The late answer is dropped.
    agent.send(respond(&cmd["data"]["id"], true)).await;
    user.expect_silence(Duration::from_millis(500)).await;
    agent.expect_silence(Duration::from_millis(100)).await;
    agent.assert_open().await;
}

/// PROTOCOL.md v1.1 section 5: a connected machine of another cluster is answered
/// exactly like a machine that is not connected, so its presence cannot be probed.
async fn other_clusters_machine_is_answered_like_an_absent_one(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (_user, mut agent) = pair(&gw).await;
    let mut outsider = gw.user("usr_out", &["clu_other"]).await;
    let mut no_clusters = gw.user("usr_none", &[]).await;
    for ws in [&mut outsider, &mut no_clusters] {
        let mut answers = Vec::new();
        for machine in ["mch_c", "mch_absent"] {
            ws.send(command(
                "req_x",
                json!({"machineId": machine, "type": "server:start"}),
            ))
            .await;
            let mut e = ws.recv_event("error").await;
            assert_error(&e, "COMMAND_FAILED");
            e.as_object_mut().unwrap().remove("timestamp");
            e["data"].as_object_mut().unwrap().remove("timestamp");
            answers.push(e.to_string());
        }
        assert_eq!(answers[0], answers[1], "the two answers differ");
        assert!(
            answers[0].contains("machine not connected"),
            "{}",
            answers[0]
        );
        ws.assert_open().await;
    }
    agent.expect_silence(Duration::from_millis(500)).await;
}

async fn perms_limit_command_types(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (_user, mut agent) = pair(&gw).await;
    let mut limited = gw
        .user_with_perms("usr_l", &["clu_c"], &["server:stop", "server:restart"])
        .await;
    let mut none = gw.user_with_perms("usr_z", &["clu_c"], &[]).await;
    let mut star = gw.user_with_perms("usr_s", &["clu_c"], &["*"]).await;

    limited
        .send(command(
            "p1",
            json!({"machineId": "mch_c", "type": "server:start"}),
        ))
        .await;
    expect_command_failed(&mut limited, "p1", Some("forbidden")).await;
    none.send(command(
        "p2",
        json!({"machineId": "mch_c", "type": "server:stop"}),
    ))
    .await;
    expect_command_failed(&mut none, "p2", Some("forbidden")).await;
    agent.expect_silence(Duration::from_millis(500)).await;

    for (ws, id, kind) in [
        (&mut limited, "p3", "server:restart"),
        (&mut star, "p4", "server:start"),
    ] {
        ws.send(command(id, json!({"machineId": "mch_c", "type": kind})))
            .await;
        let cmd = agent.recv_event("command").await;
        assert_eq!(cmd["data"]["type"], kind, "{cmd}");
        agent.send(respond(&cmd["data"]["id"], true)).await;
        assert_eq!(ws.recv_event("command:response").await["id"], id);
    }
}

async fn duplicate_and_unknown_responses_are_ignored(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let (mut user, mut agent) = pair(&gw).await;
    user.send(command(
        "req_u",
        json!({"machineId": "mch_c", "type": "server:start"}),
    ))
    .await;
    let cmd = agent.recv_event("command").await;
    let id = cmd["data"]["id"].clone();
    agent.send(respond(&id, true)).await;
    agent.send(respond(&id, false)).await;
    agent.send(respond(&json!("cmd_never_issued"), true)).await;
    agent.send(respond(&json!("req_u"), true)).await;
    let r = user.recv_event("command:response").await;
    assert_eq!(r["data"]["success"], true, "{r}");
    user.expect_silence(Duration::from_millis(500)).await;
    agent.expect_silence(Duration::from_millis(100)).await;
    agent.assert_open().await;
}

async fn service_notification_reaches_its_cluster_users(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut service = gw.service("svc_n").await;
    let mut user = gw.user("usr_n", &["clu_n", "clu_z"]).await;
    let mut other = gw.user("usr_m", &["clu_m"]).await;
    let mut agent = gw.agent("mch_n", "clu_n").await;
    service.recv_event("machine:online").await;
    user.recv_event("machine:online").await;
    service
        .send(json!({"event": "notification",
            "data": {"clusterId": "clu_n", "type": "maintenance", "message": "reboot at 3am"}}))
        .await;
    let m = user.recv_event("notification").await;
    assert_eq!(m["data"]["type"], "maintenance", "{m}");
    assert_eq!(m["data"]["message"], "reboot at 3am", "{m}");
    other.expect_silence(Duration::from_millis(500)).await;
    agent.expect_silence(Duration::from_millis(100)).await;
}
