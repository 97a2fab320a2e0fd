//! The bus (src/bus/) against a real nats-server: two nodes in one process, events across
//! and in order, the broker killed and restarted, peer liveness, refused configurations.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arcgate::bus::{Bus, BusConfig, BusState, Deliver, Inbound, PeerEvent};
use bytes::Bytes;
use common::{Nats, WAIT};

/// What a node's bus handed over, in order.
#[derive(Default)]
struct Collected(Mutex<Vec<Inbound>>);

impl Deliver for Collected {
    fn deliver(&self, msg: Inbound) {
        self.0.lock().unwrap().push(msg);
    }
}

impl Collected {
    /// The payloads of cluster `cluster`'s events so far, as text.
    fn events(&self, cluster: &str) -> Vec<String> {
        let got = self.0.lock().unwrap();
        got.iter()
            .filter_map(|m| match m {
                Inbound::Event { cluster: c, bytes } if &**c == cluster => {
                    Some(String::from_utf8_lossy(bytes).into_owned())
                }
                _ => None,
            })
            .collect()
    }

    fn peers(&self) -> Vec<PeerEvent> {
        let got = self.0.lock().unwrap();
        got.iter()
            .filter_map(|m| match m {
                Inbound::Peer(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }
}

fn config(nats: &Nats, node: &str, node_timeout: Duration) -> BusConfig {
    BusConfig {
        urls: nats.url(),
        cluster_name: "test".into(),
        node_name: node.into(),
        node_timeout,
        creds: None,
        tls_ca: None,
    }
}

fn node(nats: &Nats, name: &str) -> (Bus, Arc<Collected>) {
    node_with_timeout(nats, name, Duration::from_secs(5))
}

fn node_with_timeout(nats: &Nats, name: &str, timeout: Duration) -> (Bus, Arc<Collected>) {
    let got = Arc::new(Collected::default());
    let bus = Bus::start(config(nats, name, timeout), got.clone()).expect("bus starts");
    (bus, got)
}

/// Polls `cond` until it holds or `within` passes; returns whether it held.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Publishes `probe` on `cluster` from `from` until `to` has received one: from then on the
/// subscription is in place at the broker.
async fn until_subscribed(from: &Bus, to: &Collected, cluster: &str) {
    let deadline = Instant::now() + WAIT * 2;
    while !to.events(cluster).iter().any(|e| e == "probe") {
        assert!(
            Instant::now() < deadline,
            "the subscription to {cluster} never took effect"
        );
        from.link().publish(cluster, Bytes::from_static(b"probe"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn events_cross_between_two_nodes_in_order() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let (a, _) = node(&nats, "a");
    let (b, got_b) = node(&nats, "b");
    assert!(
        eventually(WAIT, || a.state() == BusState::Up
            && b.state() == BusState::Up)
        .await
    );
    // A cluster id that is not a plain subject token crosses too.
    let cluster = "clu.1 *";
    b.link().subscribe(cluster);
    until_subscribed(&a, &got_b, cluster).await;

    for i in 0..2000 {
        a.link().publish(cluster, Bytes::from(format!("e{i}")));
        // An event of a cluster nobody on b listens to.
        a.link().publish("clu_other", Bytes::from(format!("x{i}")));
    }
    let expected: Vec<String> = (0..2000).map(|i| format!("e{i}")).collect();
    let real = |got: &Collected| -> Vec<String> {
        got.events(cluster)
            .into_iter()
            .filter(|e| e != "probe")
            .collect()
    };
    assert!(
        eventually(WAIT * 2, || real(&got_b).len() >= expected.len()).await,
        "{} of {} events arrived",
        real(&got_b).len(),
        expected.len()
    );
    assert_eq!(real(&got_b), expected, "events out of order or altered");
    assert!(got_b.events("clu_other").is_empty());

    let (sa, sb) = (a.link().snapshot(), b.link().snapshot());
    assert!(sa.published >= 4000, "{sa:?}");
    assert!(sb.received >= 2000, "{sb:?}");
    assert_eq!((sa.dropped_down, sa.dropped_full), (0, 0), "{sa:?}");
    assert_eq!(
        (sa.node_name.as_str(), sa.cluster_name.as_str()),
        ("a", "test")
    );

    // The last receiver leaves: nothing more arrives.
    b.link().unsubscribe(cluster);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = got_b.events(cluster).len();
    for _ in 0..10 {
        a.link().publish(cluster, Bytes::from_static(b"late"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(got_b.events(cluster).len(), before);
    a.stop();
    b.stop();
}

#[tokio::test]
async fn two_receivers_of_a_cluster_on_one_node_keep_it_subscribed_until_both_leave() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let (a, _) = node(&nats, "a");
    let (b, got_b) = node(&nats, "b");
    b.link().subscribe("clu_1");
    b.link().subscribe("clu_1");
    until_subscribed(&a, &got_b, "clu_1").await;
    b.link().unsubscribe("clu_1");
    // One receiver left: still delivered, once per event.
    let marker = |n: &str| format!("after-{n}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.link().publish("clu_1", Bytes::from(marker("one")));
    assert!(eventually(WAIT, || got_b.events("clu_1").contains(&marker("one"))).await);
    let count = got_b
        .events("clu_1")
        .iter()
        .filter(|e| **e == marker("one"))
        .count();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn the_broker_restarting_takes_the_bus_down_and_up_by_itself() {
    let Some(mut nats) = Nats::start().await else {
        return;
    };
    let (a, _) = node(&nats, "a");
    let (b, got_b) = node(&nats, "b");
    b.link().subscribe("clu_1");
    until_subscribed(&a, &got_b, "clu_1").await;
    assert_eq!(a.link().snapshot().connects, 1);
    // Probes sent before the first connection count as dropped too.
    let dropped_before = a.link().snapshot().dropped_down;

    nats.kill();
    assert!(
        eventually(WAIT * 2, || a.state() == BusState::Down).await,
        "state after the broker died: {:?}",
        a.state()
    );
    // While down a publish returns at once; the event is counted, not kept.
    for i in 0..100 {
        a.link().publish("clu_1", Bytes::from(format!("lost{i}")));
    }
    let s = a.link().snapshot();
    assert_eq!(s.dropped_down - dropped_before, 100, "{s:?}");
    assert_eq!(s.state, BusState::Down);

    nats.restart().await;
    assert!(
        eventually(WAIT * 3, || a.state() == BusState::Up
            && b.state() == BusState::Up)
        .await,
        "states after the broker returned: {:?} {:?}",
        a.state(),
        b.state()
    );
    assert!(a.link().snapshot().connects >= 2);
    // b subscribed again by itself: events flow, and the lost ones never arrive.
    let deadline = Instant::now() + WAIT * 2;
    loop {
        a.link().publish("clu_1", Bytes::from_static(b"after"));
        if got_b.events("clu_1").iter().any(|e| e == "after") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no event crossed after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!got_b.events("clu_1").iter().any(|e| e.starts_with("lost")));
}

#[tokio::test]
async fn a_peer_that_stops_is_reported_dead_after_node_timeout() {
    let Some(nats) = Nats::start().await else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let (a, got_a) = node_with_timeout(&nats, "a", timeout);
    let (b, got_b) = node_with_timeout(&nats, "b", timeout);
    let up = |got: &Collected, peer: &str| got.peers().contains(&PeerEvent::Up(peer.into()));
    assert!(eventually(WAIT, || up(&got_a, "b") && up(&got_b, "a")).await);
    assert!(eventually(WAIT, || a.link().snapshot().peers == 1).await);
    // A node never reports itself.
    assert!(!up(&got_a, "a"));

    let stopped = Instant::now();
    b.stop();
    let dead = |got: &Collected| got.peers().contains(&PeerEvent::Dead("b".into()));
    assert!(
        eventually(timeout + WAIT, || dead(&got_a)).await,
        "{:?}",
        got_a.peers()
    );
    // Its last heartbeat was at most one interval before it stopped.
    assert!(stopped.elapsed() >= timeout - arcgate::bus::HEARTBEAT);
    assert_eq!(a.link().snapshot().peers, 0);
    assert_eq!(got_a.peers().iter().filter(|p| dead_of(p, "b")).count(), 1);
}

fn dead_of(p: &PeerEvent, node: &str) -> bool {
    matches!(p, PeerEvent::Dead(n) if &**n == node)
}

#[tokio::test]
async fn a_configuration_that_cannot_work_is_refused_at_start() {
    let got: Arc<Collected> = Arc::default();
    let base = BusConfig {
        urls: "nats://127.0.0.1:1".into(),
        cluster_name: "test".into(),
        node_name: "a".into(),
        node_timeout: Duration::from_secs(5),
        creds: None,
        tls_ca: None,
    };
    let missing = BusConfig {
        creds: Some("/nonexistent/arcgate.creds".into()),
        ..base.clone()
    };
    let err = format!(
        "{:#}",
        Bus::start(missing, got.clone()).err().expect("refused")
    );
    assert!(
        err.contains("nats_creds /nonexistent/arcgate.creds"),
        "{err}"
    );
    let no_ca = BusConfig {
        tls_ca: Some("/nonexistent/ca.pem".into()),
        ..base.clone()
    };
    let err = format!(
        "{:#}",
        Bus::start(no_ca, got.clone()).err().expect("refused")
    );
    assert!(err.contains("nats_tls_ca /nonexistent/ca.pem"), "{err}");
    // No broker there: the bus starts anyway, connecting in the background.
    let bus = Bus::start(base, got).expect("starts without a broker");
    assert_eq!(bus.state(), BusState::Connecting);
    bus.link().publish("clu_1", Bytes::from_static(b"x"));
    assert_eq!(bus.link().snapshot().dropped_down, 1);
    bus.stop();
}
