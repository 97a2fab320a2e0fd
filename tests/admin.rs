//! The admin listener (docs/protocol.md section 15): every endpoint and status code, against the
//! real binary.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

both_backends!(
    machines_are_listed_with_their_latest_reports,
    http_command_waits_for_the_agent,
    http_command_failures,
    notifications_reach_the_cluster,
    revocation_closes_and_refuses,
    metrics_count_what_happens,
);

fn service() -> String {
    service_token("panel")
}

async fn post(gw: &Gateway, path: &str, body: &str) -> HttpResponse {
    gw.admin_request("POST", path, Some(&service()), Some(body))
        .await
}

#[tokio::test]
async fn health_readiness_and_plain_http_errors() {
    let gw = Gateway::start("uring", &[]).await;
    let ok = gw.admin_request("GET", "/healthz", None, None).await;
    assert_eq!((ok.status, ok.body.as_slice()), (200, &b"ok\n"[..]));
    let ready = gw.admin_request("GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 200);
    let head = gw.admin_request("HEAD", "/healthz", None, None).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("3"));
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = gw.admin_request("POST", path, None, Some("{}")).await;
        r.assert_error(405, "METHOD_NOT_ALLOWED");
        assert_eq!(r.header("allow"), Some("GET"));
    }
    gw.admin_request("GET", "/nope", None, None)
        .await
        .assert_error(404, "NOT_FOUND");
    gw.admin_request("GET", "/healthz/", None, None)
        .await
        .assert_error(404, "NOT_FOUND");
    let bad = http(gw.admin, "NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    bad.assert_error(400, "BAD_REQUEST");
    let big = format!(
        "POST /v1/revocations HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        128 * 1024
    );
    http(gw.admin, &big)
        .await
        .unwrap()
        .assert_error(413, "PAYLOAD_TOO_LARGE");
    let long = format!(
        "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    http(gw.admin, &long)
        .await
        .unwrap()
        .assert_error(431, "HEADERS_TOO_LARGE");
    let chunked = "POST /v1/revocations HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    http(gw.admin, chunked)
        .await
        .unwrap()
        .assert_error(411, "LENGTH_REQUIRED");
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let gw = Gateway::start("epoll", &[]).await;
    let mut s = tcp_connect(gw.admin).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let r = read_response(&mut s, WAIT).await.expect("an answer");
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    s.write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, WAIT).await.unwrap();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(closed_within(&mut s, WAIT).await);
}

#[tokio::test]
async fn v1_needs_a_service_token_checked_before_the_route() {
    let gw = Gateway::start("uring", &[]).await;
    let get = |token: Option<String>, path: &'static str| {
        let gw = &gw;
        async move { gw.admin_request("GET", path, token.as_deref(), None).await }
    };
    let none = get(None, "/v1/machines").await;
    none.assert_error(401, "UNAUTHORIZED");
    assert!(none
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Bearer")));
    get(None, "/v1/no-such-route")
        .await
        .assert_error(401, "UNAUTHORIZED");
    let bad_sig = sign_with("another-secret-another-secret-xx", &service_claims("panel"));
    get(Some(bad_sig), "/v1/machines")
        .await
        .assert_error(401, "UNAUTHORIZED");
    let mut expired = service_claims("panel");
    expired["exp"] = json!(now_s() - 3600);
    let r = get(Some(sign(&expired)), "/v1/machines").await;
    r.assert_error(401, "UNAUTHORIZED");
    assert!(
        r.json()["message"].as_str().unwrap().contains("expired"),
        "{:?}",
        r.json()
    );
    let basic = gw.admin_request("GET", "/v1/machines", None, None).await;
    basic.assert_error(401, "UNAUTHORIZED");
    let user = user_token("usr_1", &["clu_a"], None);
    get(Some(user), "/v1/machines")
        .await
        .assert_error(403, "FORBIDDEN");
    let agent = agent_token("mch_1", "clu_a");
    get(Some(agent), "/v1/machines")
        .await
        .assert_error(403, "FORBIDDEN");
    let ok = get(Some(service()), "/v1/machines").await;
    assert_eq!((ok.status, ok.json()), (200, json!([])));
    assert_eq!(ok.header("content-type"), Some("application/json"));
    get(Some(service()), "/v1/no-such-route")
        .await
        .assert_error(404, "NOT_FOUND");
    get(Some(service()), "/v1/machines/mch_x/commands/more")
        .await
        .assert_error(404, "NOT_FOUND");
    // Wrong methods.
    let t = service();
    for (method, path, allow) in [
        ("POST", "/v1/machines", "GET"),
        ("DELETE", "/v1/machines/m", "GET"),
        ("GET", "/v1/machines/m/commands", "POST"),
        ("GET", "/v1/clusters/c/notifications", "POST"),
        ("PUT", "/v1/revocations", "POST"),
    ] {
        let r = gw.admin_request(method, path, Some(&t), Some("{}")).await;
        r.assert_error(405, "METHOD_NOT_ALLOWED");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
}

async fn machines_are_listed_with_their_latest_reports(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut b = gw.agent("mch_b", "clu_2").await;
    let mut a = gw.agent("mch_a", "clu_1").await;
    let before = now_ms();
    a.send(json!({"event": "heartbeat", "data": {"cpu": 12, "uptime": 5}}))
        .await;
    a.send(json!({"event": "metrics", "data": {"cpu": {"cores": 4}, "memory": {"total": 8}}}))
        .await;
    for (srv, status) in [
        ("srv_1", "starting"),
        ("srv_2", "stopped"),
        ("srv_1", "running"),
    ] {
        a.send(json!({"event": "server:status", "data": {"serverId": srv, "status": status, "players": 1}}))
            .await;
    }
    a.assert_open().await;
    b.assert_open().await;
    let list = gw.admin_get("/v1/machines").await;
    assert_eq!(list.status, 200);
    let list = list.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["machineId"], "mch_a");
    assert_eq!(list[0]["clusterId"], "clu_1");
    assert_eq!(list[0]["version"], VERSION);
    let last = list[0]["lastHeartbeat"].as_u64().expect("lastHeartbeat");
    assert!(last >= before && last <= now_ms(), "{last}");
    assert!(list[0]["connectedAt"].as_u64().unwrap() <= last);
    assert_eq!(list[1]["machineId"], "mch_b");
    assert_eq!(list[1]["lastHeartbeat"], Value::Null);
    assert!(
        list[0].get("servers").is_none(),
        "the list carries no details"
    );

    let one = gw.admin_get("/v1/machines/mch_a").await;
    assert_eq!(one.status, 200);
    let m = one.json();
    assert_eq!(m["machineId"], "mch_a");
    assert_eq!(m["heartbeat"], json!({"cpu": 12, "uptime": 5}));
    assert_eq!(
        m["metrics"],
        json!({"cpu": {"cores": 4}, "memory": {"total": 8}})
    );
    assert_eq!(
        m["servers"],
        json!([
            {"serverId": "srv_1", "status": "running", "players": 1},
            {"serverId": "srv_2", "status": "stopped", "players": 1}
        ])
    );
    let fresh = gw.admin_get("/v1/machines/mch_b").await.json();
    assert_eq!(
        (&fresh["heartbeat"], &fresh["metrics"], &fresh["servers"]),
        (&Value::Null, &Value::Null, &json!([]))
    );
    gw.admin_get("/v1/machines/mch_nope")
        .await
        .assert_error(404, "NOT_FOUND");
    // Ids are percent-decoded.
    let mut odd = gw.agent("mch x/1", "clu_1").await;
    odd.assert_open().await;
    assert_eq!(gw.admin_get("/v1/machines/mch%20x%2F1").await.status, 200);

    b.close().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = gw.admin_get("/v1/machines/mch_b").await;
        if r.status == 404 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "mch_b still listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Answers the next command the agent receives with `success` and `result`; returns
/// what the agent received.
async fn answer_next(agent: &mut Ws, result: Value) -> Value {
    let cmd = agent.recv_event("command").await;
    let id = cmd["data"]["id"].as_str().unwrap().to_string();
    agent
        .send(json!({"event": "command:response", "data": {"id": id, "success": true, "result": result}}))
        .await;
    cmd
}

async fn http_command_waits_for_the_agent(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut agent = gw.agent("mch_1", "clu_a").await;
    let body =
        r#"{"type":"server:start","serverId":"srv_9","machineId":"ignored","extra":{"n":1}}"#;
    let (resp, cmd) = tokio::join!(
        post(&gw, "/v1/machines/mch_1/commands", body),
        answer_next(&mut agent, json!({"pid": 42}))
    );
    let data = &cmd["data"];
    assert!(data["id"].as_str().unwrap().starts_with("cmd_"), "{cmd}");
    assert_eq!(data["type"], "server:start");
    assert_eq!(data["serverId"], "srv_9");
    assert_eq!(data["extra"], json!({"n": 1}));
    assert!(data.get("machineId").is_none(), "{cmd}");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(
        resp.json(),
        json!({"id": data["id"], "success": true, "result": {"pid": 42}})
    );
    // success:false is an answer too.
    let (resp, _) = tokio::join!(
        post(
            &gw,
            "/v1/machines/mch_1/commands",
            r#"{"type":"server:stop"}"#
        ),
        async {
            let cmd = agent.recv_event("command").await;
            let id = cmd["data"]["id"].clone();
            agent
                .send(json!({"event": "command:response", "data": {"id": id, "success": false, "error": "busy"}}))
                .await;
        }
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["success"], false);
    assert_eq!(resp.json()["error"], "busy");
    // A command that waits does not hold up health checks or metrics.
    let slow = post(
        &gw,
        "/v1/machines/mch_1/commands",
        r#"{"type":"server:backup"}"#,
    );
    let probe = async {
        agent.recv_event("command").await;
        let t = std::time::Instant::now();
        assert_eq!(
            gw.admin_request("GET", "/healthz", None, None).await.status,
            200
        );
        assert_eq!(
            gw.admin_request("GET", "/metrics", None, None).await.status,
            200
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        agent.close().await;
    };
    let (slow, ()) = tokio::join!(slow, probe);
    // The agent left without answering.
    slow.assert_error(502, "BAD_GATEWAY");
}

async fn http_command_failures(io: &'static str) {
    let gw = Gateway::start(io, &["--command-timeout", "1s"]).await;
    let cmd = r#"{"type":"server:start"}"#;
    post(&gw, "/v1/machines/mch_1/commands", cmd)
        .await
        .assert_error(404, "NOT_FOUND");
    let mut agent = gw.agent("mch_1", "clu_a").await;
    for (body, status, code) in [
        ("not json", 400, "BAD_REQUEST"),
        ("", 400, "BAD_REQUEST"),
        ("[1,2]", 422, "UNPROCESSABLE_ENTITY"),
        (r#"{"serverId":"srv_1"}"#, 422, "UNPROCESSABLE_ENTITY"),
        (r#"{"type":7}"#, 422, "UNPROCESSABLE_ENTITY"),
        (r#"{"type":"x","serverId":3}"#, 422, "UNPROCESSABLE_ENTITY"),
    ] {
        post(&gw, "/v1/machines/mch_1/commands", body)
            .await
            .assert_error(status, code);
    }
    agent.expect_silence(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (timeout, _) = tokio::join!(
        post(&gw, "/v1/machines/mch_1/commands", cmd),
        agent.recv_event("command")
    );
    timeout.assert_error(504, "TIMEOUT");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let outcomes = gw
        .metric_at_least(r#"arcgate_commands_total{outcome="timeout"}"#, 1.0)
        .await;
    assert_eq!(outcomes, 1.0);
}

async fn notifications_reach_the_cluster(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut inside = gw.user("usr_1", &["clu_a"]).await;
    let mut outside = gw.user("usr_2", &["clu_b"]).await;
    let mut svc = gw.service("billing").await;
    let r = post(
        &gw,
        "/v1/clusters/clu_a/notifications",
        r#"{"type":"maintenance","message":"at noon","level":2}"#,
    )
    .await;
    assert_eq!((r.status, r.body.len()), (202, 0), "{r:?}");
    for ws in [&mut inside, &mut svc] {
        let n = ws.recv_event("notification").await;
        check_envelope(&n);
        assert_eq!(
            n["data"],
            json!({"clusterId": "clu_a", "type": "maintenance", "message": "at noon", "level": 2})
        );
    }
    outside.expect_silence(Duration::from_millis(300)).await;
    for (body, status) in [
        ("{", 400),
        (r#""text""#, 422),
        (r#"{"type":"x"}"#, 422),
        (r#"{"message":"x"}"#, 422),
        (r#"{"type":"x","message":5}"#, 422),
    ] {
        let r = post(&gw, "/v1/clusters/clu_a/notifications", body).await;
        assert_eq!(r.status, status, "{body}");
    }
    inside.expect_silence(Duration::from_millis(200)).await;
}

async fn revocation_closes_and_refuses(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let old = user_token("usr_1", &["clu_a"], None);
    let mut victim = gw.client(&old).await;
    let mut bystander = gw.user("usr_2", &["clu_a"]).await;
    let r = post(&gw, "/v1/revocations", r#"{"sub":"usr_1"}"#).await;
    assert_eq!((r.status, r.body.len()), (204, 0), "{r:?}");
    let (code, before) = victim.messages_until_close(WAIT).await;
    assert_eq!(code, 4001);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_error(&before[0], "AUTH_FAILED");
    assert_eq!(before[0]["data"]["message"], "token revoked");
    bystander.assert_open().await;
    // The old token is refused from now on; one issued after the revocation works.
    let mut again = gw.ws("/ws/client").await;
    again.send(client_auth(&old)).await;
    let e = again.expect_error("AUTH_FAILED").await;
    assert_eq!(e["data"]["message"], "token revoked");
    assert_eq!(again.expect_close().await, 4001);
    let mut newer = user_claims("usr_1", &["clu_a"], None);
    newer["iat"] = json!(now_s() + 1);
    gw.client(&sign(&newer)).await.assert_open().await;
    // `before` in the past leaves tokens issued later alone.
    let r = post(&gw, "/v1/revocations", r#"{"sub":"usr_2","before":1000}"#).await;
    assert_eq!(r.status, 204);
    bystander.assert_open().await;
    // A revoked service token no longer opens the API.
    let svc = service_token("ops");
    assert_eq!(
        gw.admin_request("GET", "/v1/machines", Some(&svc), None)
            .await
            .status,
        200
    );
    assert_eq!(
        post(&gw, "/v1/revocations", r#"{"sub":"ops"}"#)
            .await
            .status,
        204
    );
    let refused = gw
        .admin_request("GET", "/v1/machines", Some(&svc), None)
        .await;
    refused.assert_error(401, "UNAUTHORIZED");
    assert_eq!(refused.json()["message"], "token revoked");
    for body in [
        "{}",
        r#"{"sub":""}"#,
        r#"{"sub":5}"#,
        r#"{"sub":"x","before":-1}"#,
        r#"{"sub":"x","before":"soon"}"#,
        "[]",
    ] {
        post(&gw, "/v1/revocations", body)
            .await
            .assert_error(422, "UNPROCESSABLE_ENTITY");
    }
    post(&gw, "/v1/revocations", "{sub}")
        .await
        .assert_error(400, "BAD_REQUEST");
    assert_eq!(gw.metric_at_least("arcgate_revocations", 3.0).await, 3.0);
    let revoked = r#"arcgate_auth_failures_total{reason="revoked"}"#;
    assert!(gw.metric_at_least(revoked, 2.0).await >= 2.0);
}

async fn metrics_count_what_happens(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut user = gw.user("usr_1", &["clu_a"]).await;
    let _svc = gw.service("billing").await;
    let mut agent = gw.agent("mch_1", "clu_a").await;
    agent
        .send(json!({"event": "heartbeat", "data": {"cpu": 1}}))
        .await;
    agent
        .send(json!({"event": "server:status", "data": {"serverId": "s", "status": "up"}}))
        .await;
    agent.send(json!({"event": "made:up", "data": {}})).await;
    user.recv_skipping("server:updated", &["machine:online"])
        .await;
    let mut bad = gw.ws("/ws/client").await;
    bad.send(client_auth("not-a-token")).await;
    bad.expect_error("AUTH_FAILED").await;
    assert_eq!(bad.expect_close().await, 4001);
    let plain = http(gw.addr, "GET /ws/agent HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(plain.unwrap().status, 426);

    let series = [
        (r#"arcgate_connections{role="agent"}"#, 1.0),
        (r#"arcgate_connections{role="user"}"#, 1.0),
        (r#"arcgate_connections{role="service"}"#, 1.0),
        (r#"arcgate_authentications_total{role="agent"}"#, 1.0),
        (r#"arcgate_messages_in_total{event="heartbeat"}"#, 1.0),
        (r#"arcgate_messages_in_total{event="server:status"}"#, 1.0),
        (r#"arcgate_messages_in_total{event="unknown"}"#, 1.0),
        (r#"arcgate_messages_in_total{event="auth"}"#, 4.0),
        (
            r#"arcgate_auth_failures_total{reason="malformed_token"}"#,
            1.0,
        ),
        (r#"arcgate_closes_total{code="4001"}"#, 1.0),
        (r#"arcgate_handshake_rejections_total{status="426"}"#, 1.0),
        ("arcgate_relay_events_total", 3.0),
        ("arcgate_relay_deliveries_total", 3.0),
        ("arcgate_connections_accepted_total", 5.0),
        ("arcgate_received_bytes_total", 100.0),
        ("arcgate_sent_bytes_total", 100.0),
        ("arcgate_messages_out_total", 5.0),
        (r#"arcgate_worker_loop_iterations_total{worker="1"}"#, 1.0),
    ];
    for (name, at_least) in series {
        let v = gw.metric_at_least(name, at_least).await;
        assert!(v >= at_least, "{name} = {v}, expected at least {at_least}");
    }
    let resp = gw.admin_request("GET", "/metrics", None, None).await;
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(resp.body).unwrap();
    assert!(text.contains("# TYPE arcgate_command_round_trip_seconds histogram"));
    let backend = if io == "uring" { "io_uring" } else { "epoll" };
    let info = format!(
        r#"arcgate_build_info{{version="{}",backend="{backend}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric(&text, &info), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, r#"arcgate_connections{role="agent"}"#),
        Some(1.0)
    );
    let mut s = tcp_connect(gw.admin).await;
    s.write_all(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let om = read_response(&mut s, WAIT).await.unwrap();
    assert!(om
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/openmetrics-text")));
    assert!(String::from_utf8(om.body).unwrap().ends_with("# EOF\n"));
    // Closing the agent moves the gauge back.
    agent.close().await;
    let deadline = std::time::Instant::now() + WAIT;
    while gw
        .metric_at_least(r#"arcgate_connections{role="agent"}"#, 0.0)
        .await
        != 0.0
    {
        assert!(std::time::Instant::now() < deadline, "agent gauge stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.metric_at_least(r#"arcgate_closes_total{code="1000"}"#, 1.0)
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn admin_connections_are_bounded() {
    let gw = Gateway::start("epoll", &[]).await;
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tcp_connect(gw.admin).await);
    }
    // The 65th is answered at once with 503.
    let mut extra = tcp_connect(gw.admin).await;
    let r = read_response(&mut extra, WAIT).await.expect("an answer");
    r.assert_error(503, "UNAVAILABLE");
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(idle);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut s = tcp_connect(gw.admin).await;
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await;
        match read_response(&mut s, WAIT).await {
            Some(r) if r.status == 200 => break,
            _ => assert!(std::time::Instant::now() < deadline, "still refused"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_answer() {
    use tokio::io::AsyncReadExt;
    let gw = Gateway::start("epoll", &[]).await;
    let mut s = tcp_connect(gw.admin).await;
    let body = r#"{"sub":"usr_9"}"#;
    let head = format!(
        "POST /v1/revocations HTTP/1.1\r\nAuthorization: Bearer {}\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        service(),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(WAIT, s.read_exact(&mut interim))
        .await
        .expect("100 Continue in time")
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).await.unwrap();
    let r = read_response(&mut s, WAIT).await.unwrap();
    assert_eq!(r.status, 204);
}
