//! docs/protocol.md sections 4 and 10 against the real binary: the envelope,
//! `INVALID_MESSAGE`, ids on errors, timestamps, and unknown events.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

both_backends!(
    invalid_text_is_invalid_message_and_stays_open,
    binary_message_is_invalid_message_and_stays_open,
    known_event_with_invalid_data_is_invalid_message,
    errors_echo_the_request_id,
    envelope_errors_echo_the_request_id,
    emitted_messages_carry_timestamps,
    unknown_events_are_ignored,
);

const INVALID: [&str; 12] = [
    "not json",
    "{",
    "{\"event\":\"x\",}",
    "[1,2]",
    "\"auth\"",
    "42",
    "null",
    "{}",
    "{\"data\":{}}",
    "{\"event\":5,\"data\":{}}",
    "{\"event\":null}",
    "{\"event\":[\"heartbeat\"]}",
];

async fn invalid_text_is_invalid_message_and_stays_open(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut user = gw.user("usr_i", &["clu_i"]).await;
    let mut agent = gw.agent("mch_i", "clu_i").await;
    user.recv_event("machine:online").await;
    for ws in [&mut user, &mut agent] {
        for text in INVALID {
            ws.send_text(text).await;
            let e = ws.recv().await;
            assert_error(&e, "INVALID_MESSAGE");
            assert!(e.get("id").is_none(), "{text}: {e}");
        }
        ws.assert_open().await;
    }
    // Still fully working: a relay goes through.
    agent
        .send(json!({"event": "server:status", "data": {"serverId": "srv_i", "status": "running"}}))
        .await;
    let m = user.recv_event("server:updated").await;
    assert_eq!(m["data"]["serverId"], "srv_i", "{m}");
}

async fn binary_message_is_invalid_message_and_stays_open(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut user = gw.user("usr_b", &["clu_b"]).await;
    let mut agent = gw.agent("mch_b", "clu_b").await;
    user.recv_event("machine:online").await;
    for ws in [&mut user, &mut agent] {
        ws.send_binary(br#"{"event":"heartbeat","data":{}}"#.to_vec())
            .await;
        ws.expect_error("INVALID_MESSAGE").await;
        ws.send_binary(vec![0, 1, 2, 255]).await;
        ws.expect_error("INVALID_MESSAGE").await;
        ws.assert_open().await;
    }
    // The binary heartbeat was not relayed.
    user.expect_silence(Duration::from_millis(300)).await;
}

async fn known_event_with_invalid_data_is_invalid_message(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut user = gw.user("usr_k", &["clu_k"]).await;
    let mut agent = gw.agent("mch_k", "clu_k").await;
    user.recv_event("machine:online").await;
    for data in [json!("running"), json!(7), json!([1])] {
        agent
            .send(json!({"event": "server:status", "data": data}))
            .await;
        agent.expect_error("INVALID_MESSAGE").await;
    }
    agent.assert_open().await;
    user.expect_silence(Duration::from_millis(300)).await;
    for data in [json!("mch_k"), json!(null), json!([])] {
        user.send(json!({"event": "command", "id": "c", "data": data}))
            .await;
        let e = user.expect_error("INVALID_MESSAGE").await;
        assert_eq!(e["id"], "c", "{e}");
    }
    user.assert_open().await;
    agent.expect_silence(Duration::from_millis(300)).await;
}

async fn errors_echo_the_request_id(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut user = gw.user("usr_e", &["clu_e"]).await;
    let mut agent = gw.agent("mch_e", "clu_e").await;
    user.recv_event("machine:online").await;
    // INVALID_MESSAGE for bad data.
    agent
        .send(json!({"event": "server:status", "id": "st-1", "data": {"serverId": 5}}))
        .await;
    let e = agent.expect_error("INVALID_MESSAGE").await;
    assert_eq!(e["id"], "st-1", "{e}");
    // COMMAND_FAILED.
    user.send(json!({"event": "command", "id": "req-77",
        "data": {"machineId": "mch_absent", "type": "server:start"}}))
        .await;
    let e = user.expect_error("COMMAND_FAILED").await;
    assert_eq!(e["id"], "req-77", "{e}");
    // AUTH_FAILED.
    let mut ws = gw.ws("/ws/client").await;
    let mut msg = client_auth("garbage");
    msg["id"] = json!("auth-9");
    ws.send(msg).await;
    let e = ws.expect_error("AUTH_FAILED").await;
    assert_eq!(e["id"], "auth-9", "{e}");
    assert_eq!(ws.expect_close().await, 4001);
}

async fn envelope_errors_echo_the_request_id(io: &'static str) {
    // docs/protocol.md section 4.2: an error to a message that carried an id carries the same id,
    // also when that message is an object without a valid event.
    let gw = Gateway::start(io, &[]).await;
    let mut user = gw.user("usr_v", &["clu_v"]).await;
    user.send_text(r#"{"id":"bad-1","data":{}}"#).await;
    let e = user.expect_error("INVALID_MESSAGE").await;
    assert_eq!(e["id"], "bad-1", "{e}");
    user.send_text(r#"{"event":5,"id":"bad-2"}"#).await;
    let e = user.expect_error("INVALID_MESSAGE").await;
    assert_eq!(e["id"], "bad-2", "{e}");
}

async fn emitted_messages_carry_timestamps(io: &'static str) {
    // `recv` checks every message; here the bounds are tight around the exchange.
    let gw = Gateway::start(io, &[]).await;
    let before_ms = now_ms();
    let before_s = now_s();
    let mut user = gw.user("usr_ts", &["clu_ts"]).await;
    let mut agent = gw.agent("mch_ts", "clu_ts").await;
    let online = user.recv_event("machine:online").await;
    // The agent's own top-level timestamp is not passed on.
    agent
        .send(json!({"event": "server:status", "timestamp": 5, "data": {"serverId": "s", "timestamp": 6}}))
        .await;
    let relayed = user.recv_event("server:updated").await;
    assert_eq!(relayed["data"]["timestamp"], 6, "{relayed}");
    user.send_text("nope").await;
    let err = user.expect_error("INVALID_MESSAGE").await;
    let after_ms = now_ms();
    let after_s = now_s();
    for m in [&online, &relayed, &err] {
        let ts = m["timestamp"].as_u64().unwrap();
        assert!(
            (before_ms - 50..=after_ms + 50).contains(&ts),
            "timestamp {ts} outside [{before_ms}, {after_ms}]: {m}"
        );
    }
    let s = err["data"]["timestamp"].as_u64().unwrap();
    assert!((before_s..=after_s).contains(&s), "{err}");
}

async fn unknown_events_are_ignored(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut service = gw.service("svc_u").await;
    let mut user = gw.user("usr_u", &["clu_u"]).await;
    let mut agent = gw.agent("mch_u", "clu_u").await;
    service.recv_event("machine:online").await;
    user.recv_event("machine:online").await;
    agent
        .send(json!({"event": "agent:future-thing", "data": {"x": 1}}))
        .await;
    agent
        .send(json!({"event": "player:kicked", "id": "q1", "data": {}}))
        .await;
    user.send(json!({"event": "dashboard:hello", "data": {}}))
        .await;
    service
        .send(json!({"event": "service:whatever", "id": "q2", "data": null}))
        .await;
    agent.expect_silence(Duration::from_millis(500)).await;
    user.expect_silence(Duration::from_millis(100)).await;
    service.expect_silence(Duration::from_millis(100)).await;
    // Everyone still works.
    agent
        .send(json!({"event": "server:status", "data": {"serverId": "srv_u"}}))
        .await;
    assert_eq!(
        user.recv_event("server:updated").await["data"]["serverId"],
        "srv_u"
    );
    assert_eq!(
        service.recv_event("server:updated").await["data"]["serverId"],
        "srv_u"
    );
}
