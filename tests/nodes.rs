//! Gateway processes with and without a bus (`nats_url`) against a real nats-server: no bus
//! when unset, peers seen and a killed one reported dead, local service through a broker
//! outage, an agent's events reaching users on another node.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A gateway joined to `nats` as node `name`, with a 2 s node timeout.
async fn node(nats: &Nats, name: &str) -> Gateway {
    let url = nats.url();
    Gateway::start(
        "epoll",
        &[
            "--nats-url",
            &url,
            "--node-name",
            name,
            "--node-timeout",
            "2s",
        ],
    )
    .await
}

async fn metrics(gw: &Gateway) -> String {
    let resp = gw.admin_request("GET", "/metrics", None, None).await;
    String::from_utf8(resp.body).unwrap()
}

/// Polls `/metrics` until `series` equals `value`; returns whether it did within `within`.
async fn metric_becomes(gw: &Gateway, series: &str, value: f64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if metric(&metrics(gw).await, series) == Some(value) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const UP: &str = r#"arcgate_bus_state{state="up"}"#;
const DOWN: &str = r#"arcgate_bus_state{state="down"}"#;

#[tokio::test]
async fn a_gateway_without_nats_url_starts_no_bus() {
    let gw = Gateway::start("epoll", &[]).await;
    let text = metrics(&gw).await;
    assert!(metric(&text, "arcgate_connections_accepted_total").is_some());
    assert!(!text.contains("arcgate_bus"), "{text}");
    assert!(!gw.log().contains("bus started"));
}

#[tokio::test]
async fn nodes_see_each_other_and_a_killed_one_is_reported_dead() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let a = node(&nats, "node-a").await;
    let mut b = node(&nats, "node-b").await;
    assert!(a.wait_log("bus started", WAIT).await);
    assert!(
        metric_becomes(&a, UP, 1.0, WAIT).await,
        "{}",
        metrics(&a).await
    );
    let info = r#"arcgate_bus_info{cluster="arcgate",node="node-a"}"#;
    assert_eq!(metric(&metrics(&a).await, info), Some(1.0));
    assert!(metric_becomes(&a, "arcgate_bus_peers", 1.0, WAIT).await);
    assert!(metric_becomes(&b, "arcgate_bus_peers", 1.0, WAIT).await);
    assert!(a.wait_log("peer node up", WAIT).await);

    b.signal(libc::SIGKILL);
    b.wait_exit(WAIT).await.expect("node-b ends on SIGKILL");
    assert!(
        metric_becomes(&a, "arcgate_bus_peers", 0.0, WAIT * 2).await,
        "{}",
        metrics(&a).await
    );
    assert!(a.wait_log("peer node dead", WAIT).await, "{}", a.log());
    assert!(a.log().contains("node-b"));
}

#[tokio::test]
async fn a_node_serves_its_own_connections_while_the_broker_is_down() {
    let Some(mut nats) = Nats::start().await else {
        return;
    };
    let gw = node(&nats, "node-a").await;
    assert!(metric_becomes(&gw, UP, 1.0, WAIT).await);

    nats.kill();
    assert!(
        metric_becomes(&gw, DOWN, 1.0, WAIT * 2).await,
        "{}",
        metrics(&gw).await
    );
    // /readyz stays 200 and local relays go on.
    let ready = gw.admin_request("GET", "/readyz", None, None).await;
    assert_eq!(ready.status, 200);
    let mut user = gw.user("usr_1", &["clu_1"]).await;
    let mut agent = gw.agent("mch_1", "clu_1").await;
    user.recv_event("machine:online").await;
    agent
        .send(json!({"event": "server:status", "data": {"serverId": "srv_1", "status": "running"}}))
        .await;
    let m = user.recv_event("server:updated").await;
    assert_eq!(m["data"]["serverId"], "srv_1", "{m}");
    // That event could not cross: counted, not kept.
    let dropped = r#"arcgate_bus_dropped_total{reason="down"}"#;
    assert!(
        gw.metric_at_least(dropped, 2.0).await >= 2.0,
        "{}",
        metrics(&gw).await
    );

    nats.restart().await;
    assert!(
        metric_becomes(&gw, UP, 1.0, WAIT * 3).await,
        "{}",
        metrics(&gw).await
    );
    assert!(gw.metric_at_least("arcgate_bus_connects_total", 2.0).await >= 2.0);
    assert!(gw.log().contains("bus down"));
}

#[tokio::test]
async fn a_gateway_starts_while_the_broker_is_unreachable() {
    // Nothing listens on port 1: the node comes up alone and keeps trying.
    let gw = Gateway::start("epoll", &["--nats-url", "nats://127.0.0.1:1"]).await;
    let text = metrics(&gw).await;
    assert_eq!(metric(&text, UP), Some(0.0), "{text}");
}

#[tokio::test]
async fn a_bad_nats_setting_stops_the_start_with_its_name() {
    let (mut cmd, _, _) = Gateway::command("epoll");
    let out = cmd
        .args([
            "--jwt-secret",
            SECRET,
            "--nats-url",
            "nats://127.0.0.1:4222",
        ])
        .args(["--nats-creds", "/nonexistent/arcgate.creds"])
        .output()
        .expect("run arcgate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nats_creds /nonexistent/arcgate.creds"),
        "{err}"
    );
    let (mut cmd, _, _) = Gateway::command("epoll");
    let out = cmd
        .args([
            "--jwt-secret",
            SECRET,
            "--nats-url",
            "http://x",
            "--node-name",
            "a.b",
        ])
        .output()
        .expect("run arcgate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nats_url") && err.contains("node_name"),
        "{err}"
    );
}

#[tokio::test]
async fn an_agents_events_on_one_node_reach_users_on_another_in_order() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let a = node(&nats, "node-a").await;
    let b = node(&nats, "node-b").await;
    assert!(metric_becomes(&a, UP, 1.0, WAIT).await);
    assert!(metric_becomes(&b, UP, 1.0, WAIT).await);
    let mut user = b.user("usr_1", &["clu_1"]).await;
    let mut other = b.user("usr_2", &["clu_2"]).await;
    let mut agent = a.agent("mch_1", "clu_1").await;
    let status = |n: u64| {
        json!({"event": "server:status",
               "data": {"serverId": "srv_1", "status": "running", "players": n}})
    };
    // The user's interest takes a moment to reach the broker: probe until one crosses.
    let deadline = Instant::now() + WAIT * 2;
    loop {
        agent.send(status(0)).await;
        match user.poll(Duration::from_millis(200)).await {
            Polled::Message(m) if m["event"] == "server:updated" => break,
            // machine:online crosses too, when the interest was in place in time.
            Polled::Message(m) => assert_eq!(m["event"], "machine:online", "{m}"),
            Polled::Nothing => assert!(Instant::now() < deadline, "no event crossed"),
            other => panic!("user connection ended: {other:?}"),
        }
    }
    for n in 1..=200 {
        agent.send(status(n)).await;
    }
    let mut next = 1;
    while next <= 200 {
        let m = user
            .recv_skipping("server:updated", &["machine:online"])
            .await;
        let n = m["data"]["players"].as_u64().unwrap();
        if n == 0 {
            continue; // a late probe
        }
        assert_eq!(n, next, "out of order: {m}");
        assert_eq!(m["data"]["machineId"], "mch_1", "{m}");
        next += 1;
    }
    other.expect_silence(Duration::from_millis(300)).await;
    // One publish per event at the origin, whatever the number of receivers.
    assert!(
        a.metric_at_least("arcgate_bus_published_total", 201.0)
            .await
            >= 201.0
    );
    assert!(b.metric_at_least("arcgate_bus_received_total", 201.0).await >= 201.0);
}
