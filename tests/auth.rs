//! docs/protocol.md section 5 against the real binary: `auth`, its failures, token expiry on live
//! connections, refresh and replacement of an agent.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

both_backends!(
    agent_authenticates,
    authenticated_echoes_the_auth_id,
    user_and_service_authenticate,
    auth_timeout_closes_4002,
    bad_signature_fails_4001,
    expired_token_fails_4001,
    leeway_admits_a_just_expired_token,
    malformed_tokens_fail_4001,
    agent_token_on_client_path_fails_4001,
    client_tokens_on_agent_path_fail_4001,
    machine_id_other_than_sub_fails_4001,
    non_auth_first_message_fails_4001,
    token_expiring_then_expired_4001,
    token_inside_warning_window_is_warned_at_once,
    refresh_with_fresh_token_keeps_connection,
    refresh_with_other_identity_or_bad_token_closes_4001,
    second_agent_replaces_first_4009,
    what_a_replaced_agent_sent_is_still_relayed,
);

/// Sends `msg` as the first message on a new `path` connection and expects `AUTH_FAILED`
/// then close 4001; returns the error.
async fn refused(gw: &Gateway, path: &str, msg: Value) -> Value {
    let mut ws = gw.ws(path).await;
    ws.send(msg.clone()).await;
    let e = ws.recv().await;
    assert_error(&e, "AUTH_FAILED");
    assert!(
        !e["data"]["message"].as_str().unwrap().is_empty(),
        "AUTH_FAILED should say why: {e}"
    );
    assert_eq!(ws.expect_close().await, 4001, "after {msg}");
    e
}

async fn agent_authenticates(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    gw.agent("mch_a", "clu_a").await.assert_open().await;
    let mut ws = gw.ws("/ws/agent").await;
    ws.send(agent_auth(&agent_token("mch_b", "clu_b"), "mch_b"))
        .await;
    let m = ws.recv_event("authenticated").await;
    assert_eq!(
        m["data"],
        json!({"machineId": "mch_b", "clusterId": "clu_b"}),
        "{m}"
    );
}

async fn authenticated_echoes_the_auth_id(io: &'static str) {
    // docs/protocol.md section 4.2: a reply to a message that carried an id carries the same id.
    let gw = Gateway::start(io, &[]).await;
    let mut agent = gw.ws("/ws/agent").await;
    let mut msg = agent_auth(&agent_token("mch_id", "clu_id"), "mch_id");
    msg["id"] = json!("auth-7");
    agent.send(msg.clone()).await;
    let m = agent.recv_event("authenticated").await;
    assert_eq!(m["id"], "auth-7", "first auth of an agent: {m}");
    msg["id"] = json!("auth-8");
    agent.send(msg).await;
    let m = agent.recv_event("authenticated").await;
    assert_eq!(m["id"], "auth-8", "re-auth of an agent: {m}");
    for (token, id) in [
        (user_token("usr_id", &["clu_id"], None), "u-1"),
        (service_token("svc_id"), "s-1"),
    ] {
        let mut ws = gw.ws("/ws/client").await;
        let mut msg = client_auth(&token);
        msg["id"] = json!(id);
        ws.send(msg).await;
        let m = ws.recv_event("authenticated").await;
        assert_eq!(m["id"], id, "{m}");
    }
}

async fn user_and_service_authenticate(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    // `client` checks userId, role and clusters of the reply.
    gw.user("usr_1", &["clu_a", "clu_b"])
        .await
        .assert_open()
        .await;
    gw.user_with_perms("usr_2", &["clu_a"], &["server:start"])
        .await
        .assert_open()
        .await;
    gw.service("billing").await.assert_open().await;
    let mut ws = gw.ws("/ws/client").await;
    ws.send(client_auth(&service_token("svc_x"))).await;
    let m = ws.recv_event("authenticated").await;
    assert_eq!(
        m["data"],
        json!({"userId": "svc_x", "role": "service", "clusters": ["*"]}),
        "{m}"
    );
}

async fn auth_timeout_closes_4002(io: &'static str) {
    let gw = Gateway::start(io, &["--auth-timeout", "1s"]).await;
    let start = Instant::now();
    let mut agent = gw.ws("/ws/agent").await;
    let mut client = gw.ws("/ws/client").await;
    for ws in [&mut agent, &mut client] {
        ws.expect_error("AUTH_TIMEOUT").await;
        assert_eq!(ws.expect_close().await, 4002);
    }
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "timed out after {:?}",
        start.elapsed()
    );
}

async fn bad_signature_fails_4001(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let forged = sign_with("not-the-secret", &agent_claims("mch_f", "clu_f"));
    refused(&gw, "/ws/agent", agent_auth(&forged, "mch_f")).await;
    let forged = sign_with("not-the-secret", &user_claims("usr_f", &["clu_f"], None));
    refused(&gw, "/ws/client", client_auth(&forged)).await;
    // A valid token whose signature was altered.
    let mut t = user_token("usr_f", &["clu_f"], None);
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    refused(&gw, "/ws/client", client_auth(&t)).await;
}

async fn expired_token_fails_4001(io: &'static str) {
    let gw = Gateway::start(io, &["--jwt-leeway", "0s"]).await;
    let now = now_s();
    let mut claims = agent_claims("mch_e", "clu_e");
    claims["exp"] = json!(now - 60);
    claims["iat"] = json!(now - 3600);
    let e = refused(&gw, "/ws/agent", agent_auth(&sign(&claims), "mch_e")).await;
    let msg = e["data"]["message"].as_str().unwrap().to_lowercase();
    assert!(msg.contains("expired"), "{e}");
    let mut claims = user_claims("usr_e", &["clu_e"], None);
    claims["exp"] = json!(now - 2);
    refused(&gw, "/ws/client", client_auth(&sign(&claims))).await;
}

async fn leeway_admits_a_just_expired_token(io: &'static str) {
    // Default leeway 5 s: expired 2 s ago still verifies, and is at once inside the warning
    // window.
    let gw = Gateway::start(io, &[]).await;
    let mut claims = user_claims("usr_l", &["clu_l"], None);
    let exp = now_s() - 2;
    claims["exp"] = json!(exp);
    let mut ws = gw.ws("/ws/client").await;
    ws.send(client_auth(&sign(&claims))).await;
    ws.recv_event("authenticated").await;
    let m = ws.recv_event("token:expiring").await;
    assert_eq!(m["data"]["expiresAt"], exp, "{m}");
}

async fn malformed_tokens_fail_4001(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let now = now_s();
    let without = |claims: Value, key: &str| {
        let mut c = claims;
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let agent = agent_claims("mch_m", "clu_m");
    let user = user_claims("usr_m", &["clu_m"], None);
    let mut nbf = user.clone();
    nbf["nbf"] = json!(now + 600);
    let mut admin = user.clone();
    admin["role"] = json!("admin");
    let agent_cases: Vec<(&str, String)> = vec![
        ("alg none", unsigned(&agent)),
        ("missing sub", sign(&without(agent.clone(), "sub"))),
        ("missing exp", sign(&without(agent.clone(), "exp"))),
        ("missing role", sign(&without(agent.clone(), "role"))),
        (
            "agent without cluster",
            sign(&without(agent.clone(), "cluster")),
        ),
    ];
    for (what, token) in agent_cases {
        let mut ws = gw.ws("/ws/agent").await;
        ws.send(agent_auth(&token, "mch_m")).await;
        let e = ws.recv().await;
        assert!(
            e["event"] == "error" && e["data"]["code"] == "AUTH_FAILED",
            "{what}: {e}"
        );
        assert_eq!(ws.expect_close().await, 4001, "{what}");
    }
    let client_cases: Vec<(&str, String)> = vec![
        ("garbage", "not-a-jwt".into()),
        ("empty", String::new()),
        ("alg none", unsigned(&user)),
        ("missing sub", sign(&without(user.clone(), "sub"))),
        ("missing exp", sign(&without(user.clone(), "exp"))),
        ("nbf in the future", sign(&nbf)),
        ("unknown role", sign(&admin)),
    ];
    for (what, token) in client_cases {
        let mut ws = gw.ws("/ws/client").await;
        ws.send(client_auth(&token)).await;
        let e = ws.recv().await;
        assert!(
            e["event"] == "error" && e["data"]["code"] == "AUTH_FAILED",
            "{what}: {e}"
        );
        assert_eq!(ws.expect_close().await, 4001, "{what}");
    }
}

async fn agent_token_on_client_path_fails_4001(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    refused(
        &gw,
        "/ws/client",
        client_auth(&agent_token("mch_c", "clu_c")),
    )
    .await;
    refused(
        &gw,
        "/ws/client",
        agent_auth(&agent_token("mch_c", "clu_c"), "mch_c"),
    )
    .await;
}

async fn client_tokens_on_agent_path_fail_4001(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let user = user_token("usr_x", &["clu_x"], None);
    refused(&gw, "/ws/agent", agent_auth(&user, "usr_x")).await;
    refused(&gw, "/ws/agent", client_auth(&user)).await;
    refused(
        &gw,
        "/ws/agent",
        agent_auth(&service_token("svc_x"), "svc_x"),
    )
    .await;
}

async fn machine_id_other_than_sub_fails_4001(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    refused(
        &gw,
        "/ws/agent",
        agent_auth(&agent_token("mch_real", "clu_r"), "mch_other"),
    )
    .await;
}

async fn non_auth_first_message_fails_4001(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let heartbeat = json!({"event": "heartbeat", "data": {"machineId": "mch_n", "cpu": 1}});
    refused(&gw, "/ws/agent", heartbeat).await;
    let status = json!({"event": "server:status", "data": {"serverId": "srv_1"}});
    refused(&gw, "/ws/agent", status).await;
    let command = json!({"event": "command", "id": "c1",
        "data": {"machineId": "mch_n", "type": "server:start"}});
    refused(&gw, "/ws/client", command).await;
    refused(
        &gw,
        "/ws/client",
        json!({"event": "some:unknown", "data": {}}),
    )
    .await;
}

async fn token_expiring_then_expired_4001(io: &'static str) {
    let gw = Gateway::start(io, &["--token-expiry-warning", "2s", "--jwt-leeway", "0s"]).await;
    let exp = now_s() + 3;
    let mut user = user_claims("usr_t", &["clu_t"], None);
    user["exp"] = json!(exp);
    // Another cluster than the user's: no presence notice in between.
    let mut agent_c = agent_claims("mch_t", "clu_t2");
    agent_c["exp"] = json!(exp);
    let mut u = gw.ws("/ws/client").await;
    u.send(client_auth(&sign(&user))).await;
    u.recv_event("authenticated").await;
    let mut a = gw.ws("/ws/agent").await;
    a.send(agent_auth(&sign(&agent_c), "mch_t")).await;
    a.recv_event("authenticated").await;

    let warn = u.recv_event("token:expiring").await;
    assert_eq!(warn["data"]["expiresAt"], exp, "{warn}");
    assert!(
        now_ms() < exp * 1000,
        "token:expiring came after the expiry"
    );
    let (code, seen) = u.messages_until_close(Duration::from_secs(6)).await;
    assert!(
        now_ms() + 300 >= exp * 1000,
        "closed before the token expired"
    );
    assert_eq!(seen.len(), 1, "expected only AUTH_FAILED: {seen:?}");
    assert_error(&seen[0], "AUTH_FAILED");
    let msg = seen[0]["data"]["message"].as_str().unwrap().to_lowercase();
    assert!(msg.contains("expired"), "{}", seen[0]);
    assert_eq!(code, 4001);

    let (code, seen) = a.messages_until_close(Duration::from_secs(5)).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0]["event"], "token:expiring", "{seen:?}");
    assert_eq!(seen[0]["data"]["expiresAt"], exp, "{seen:?}");
    assert_error(&seen[1], "AUTH_FAILED");
    assert_eq!(code, 4001);
}

async fn token_inside_warning_window_is_warned_at_once(io: &'static str) {
    let gw = Gateway::start(io, &["--token-expiry-warning", "10s", "--jwt-leeway", "0s"]).await;
    let exp = now_s() + 3;
    let mut claims = user_claims("usr_w", &["clu_w"], None);
    claims["exp"] = json!(exp);
    let mut ws = gw.ws("/ws/client").await;
    ws.send(client_auth(&sign(&claims))).await;
    ws.recv_event("authenticated").await;
    let warn = ws.recv_within(Duration::from_millis(1500)).await;
    assert_eq!(warn["event"], "token:expiring", "{warn}");
    assert_eq!(warn["data"]["expiresAt"], exp, "{warn}");
    // Once per token: the next thing is the expiry.
    let (code, seen) = ws.messages_until_close(Duration::from_secs(6)).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_error(&seen[0], "AUTH_FAILED");
    assert_eq!(code, 4001);
}

async fn refresh_with_fresh_token_keeps_connection(io: &'static str) {
    let gw = Gateway::start(io, &["--token-expiry-warning", "2s", "--jwt-leeway", "0s"]).await;
    let exp = now_s() + 4;
    let mut user = user_claims("usr_r", &["clu_r"], None);
    user["exp"] = json!(exp);
    let mut agent_c = agent_claims("mch_r", "clu_r2");
    agent_c["exp"] = json!(exp);
    let mut u = gw.ws("/ws/client").await;
    u.send(client_auth(&sign(&user))).await;
    u.recv_event("authenticated").await;
    let mut a = gw.ws("/ws/agent").await;
    a.send(agent_auth(&sign(&agent_c), "mch_r")).await;
    a.recv_event("authenticated").await;

    u.send(client_auth(&user_token("usr_r", &["clu_r"], None)))
        .await;
    a.send(agent_auth(&agent_token("mch_r", "clu_r2"), "mch_r"))
        .await;
    // A warning for the old token may already be on its way on a slow machine.
    let m = u.recv_skipping("authenticated", &["token:expiring"]).await;
    assert_eq!(m["data"]["userId"], "usr_r", "{m}");
    let m = a.recv_skipping("authenticated", &["token:expiring"]).await;
    assert_eq!(m["data"]["machineId"], "mch_r", "{m}");
    assert_eq!(m["data"]["clusterId"], "clu_r2", "{m}");

    // Past the old expiry: still open, nothing said.
    let wait = Duration::from_millis((exp * 1000 + 1500).saturating_sub(now_ms()));
    tokio::join!(u.expect_silence(wait), async {
        // The agent keeps its lease with heartbeats.
        let until = Instant::now() + wait;
        while Instant::now() < until {
            a.send(json!({"event": "heartbeat", "data": {"cpu": 1}}))
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    u.assert_open().await;
    a.expect_silence(Duration::from_millis(100)).await;
    a.assert_open().await;
}

async fn refresh_with_other_identity_or_bad_token_closes_4001(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let second_auths = [
        (
            "another user",
            client_auth(&user_token("usr_b", &["clu_o"], None)),
        ),
        ("a service", client_auth(&service_token("svc_o"))),
        (
            "a forged token",
            client_auth(&sign_with("wrong", &user_claims("usr_a", &["clu_o"], None))),
        ),
    ];
    for (what, msg) in second_auths {
        let mut ws = gw.user("usr_a", &["clu_o"]).await;
        ws.send(msg).await;
        let (code, seen) = ws.messages_until_close(WAIT).await;
        assert_eq!(code, 4001, "{what}");
        for m in &seen {
            assert_error(m, "AUTH_FAILED");
        }
    }
    let mut a = gw.agent("mch_o1", "clu_o").await;
    a.send(agent_auth(&agent_token("mch_o2", "clu_o"), "mch_o2"))
        .await;
    let (code, seen) = a.messages_until_close(WAIT).await;
    assert_eq!(code, 4001, "agent re-auth as another machine");
    for m in &seen {
        assert_error(m, "AUTH_FAILED");
    }
}

async fn second_agent_replaces_first_4009(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut first = gw.agent("mch_dup", "clu_d").await;
    let mut second = gw.agent("mch_dup", "clu_d").await;
    assert_eq!(first.expect_close().await, 4009);
    second.assert_open().await;
    // Commands go to the newer connection.
    let mut user = gw.user("usr_d", &["clu_d"]).await;
    user.send(json!({"event": "command", "id": "req_r",
        "data": {"machineId": "mch_dup", "type": "server:start", "serverId": "srv_1"}}))
        .await;
    let cmd = second.recv_event("command").await;
    assert_eq!(cmd["data"]["type"], "server:start", "{cmd}");
    let id = cmd["data"]["id"].clone();
    second
        .send(json!({"event": "command:response", "data": {"id": id, "success": true}}))
        .await;
    let r = user.recv_event("command:response").await;
    assert_eq!(r["id"], "req_r", "{r}");
    assert_eq!(r["data"]["success"], true, "{r}");
}

/// An agent sends a backlog, disconnects and reconnects at once: the newer connection may
/// authenticate before the gateway has read the older one's backlog, which is relayed all
/// the same, in order.
async fn what_a_replaced_agent_sent_is_still_relayed(io: &'static str) {
    let gw = Gateway::start(
        io,
        &["--rate-limit", "0", "--max-outbound-bytes", "100000000"],
    )
    .await;
    let mut user = gw.user("usr_b", &["clu_b"]).await;
    let mut first = gw.agent("mch_b", "clu_b").await;
    user.recv_event("machine:online").await;
    let n = 20_000;
    for i in 0..n {
        first
            .send(json!({"event": "server:status", "data": {"serverId": "srv_b", "seq": i}}))
            .await;
    }
    drop(first);
    let _second = gw.agent("mch_b", "clu_b").await;
    for i in 0..n {
        // The newer connection's `machine:online` comes somewhere in between.
        let m = user
            .recv_skipping("server:updated", &["machine:online"])
            .await;
        assert_eq!(m["data"]["seq"], i, "{m}");
    }
}
