//! Slow consumers under steady fan-out: one of 100 dashboards stops reading. It is closed
//! with 1013 once its queue passes `--max-outbound-bytes`, after an unbroken prefix of the
//! events; the other 99 receive every event in order, and the gateway's memory stays
//! bounded meanwhile.
//!
//! The kernel takes up to `tcp_wmem`'s maximum (4 MiB by default) for a socket whose peer
//! does not read before the gateway's own queue grows, so the slow dashboard also sees a
//! second cluster whose agent sends large events: far more than the kernel holds, and far
//! more than the memory bound, go to that dashboard alone.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use serde_json::json;

const DASHBOARDS: usize = 100;
/// Events of the cluster every dashboard sees, 250 per second (25,000 deliveries per
/// second: what the test's own clients parse on a shared core).
const EVENTS: u64 = 500;
const BATCH: u64 = 5;
const BATCH_MS: u64 = 20;
/// Large events of the cluster only the slow dashboard sees: 540 × 60 KB, about 32 MB,
/// over the same two seconds.
const HEAVY_EVENTS: u64 = 540;
const HEAVY_PAD: usize = 60_000;
/// How far the gateway's RSS may rise during the fan-out: half of what the slow
/// dashboard is sent, so that queueing it would fail.
const RSS_SLACK_KIB: u64 = 16 * 1024;
/// What the gateway logs when it closes a slow consumer.
const SLOW_LOG: &str = "slow consumer: closing with 1013";

/// Reads events until `EVENTS` arrived; each must be the next `seq` of the agent.
async fn read_all(mut ws: Ws, who: usize) {
    let mut next = 0;
    while next < EVENTS {
        let m = ws.recv_within(Duration::from_secs(20)).await;
        assert_eq!(m["event"], "server:updated", "dashboard {who}: {m}");
        assert_eq!(
            m["data"]["seq"], next,
            "dashboard {who}: out of order or lost"
        );
        next += 1;
    }
}

/// Waits until the gateway logged `line`.
async fn wait_for_log(gw: &Gateway, line: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !gw.log().contains(line) {
        assert!(Instant::now() < deadline, "no {line:?} in the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status(server: &str, seq: u64, pad: &str) -> serde_json::Value {
    json!({"event": "server:status", "data": {"serverId": server, "seq": seq, "pad": pad}})
}

async fn one_slow_dashboard_among_100(io: &'static str) {
    // The default limits: 64 KiB messages, 1 MiB of outbound queue.
    let gw = Gateway::start(io, &[]).await;
    // The slow one has a small receive buffer, so that little is in flight to it.
    let stream = tcp_small_rcvbuf(gw.addr).await;
    let mut slow = ws_over(stream, gw.addr, "/ws/client", &[]).await.unwrap();
    let token = user_token("usr_slow", &["clu_f", "clu_heavy"], None);
    slow.send(client_auth(&token)).await;
    slow.recv_event("authenticated").await;
    let mut fast = Vec::new();
    for i in 1..DASHBOARDS {
        fast.push(gw.user(&format!("usr_{i}"), &["clu_f"]).await);
    }
    let mut agent = gw.agent("mch_f", "clu_f").await;
    let mut heavy = gw.agent("mch_heavy", "clu_heavy").await;
    slow.recv_event("machine:online").await;
    slow.recv_event("machine:online").await;
    for ws in &mut fast {
        ws.recv_event("machine:online").await;
    }
    let readers: Vec<_> = fast
        .into_iter()
        .enumerate()
        .map(|(i, ws)| tokio::spawn(read_all(ws, i + 1)))
        .collect();

    gw.reset_peak_rss();
    let baseline = gw.rss_kib();
    let (pad, heavy_pad) = ("p".repeat(400), "h".repeat(HEAVY_PAD));
    let fan_out = async {
        let start = Instant::now();
        let mut heavy_seq = 0;
        for seq in 0..EVENTS {
            agent.send(status("srv", seq, &pad)).await;
            while heavy_seq < HEAVY_EVENTS && heavy_seq * EVENTS <= seq * HEAVY_EVENTS {
                heavy.send(status("big", heavy_seq, &heavy_pad)).await;
                heavy_seq += 1;
            }
            if seq % BATCH == BATCH - 1 {
                let due = start + Duration::from_millis(BATCH_MS * (seq + 1) / BATCH);
                tokio::time::sleep_until(due.into()).await;
            }
        }
        start.elapsed()
    };
    // The slow dashboard reads again as soon as the gateway gave up on it (it waits 2 s
    // for the peer to read its close frame): an unbroken prefix, then 1013.
    let slow_reads = async {
        wait_for_log(&gw, SLOW_LOG, Duration::from_secs(10)).await;
        slow.messages_until_close(Duration::from_secs(10)).await
    };
    let (sent_in, (code, seen)) = tokio::join!(fan_out, slow_reads);
    for (i, r) in join_all(readers).await.into_iter().enumerate() {
        if let Err(e) = r {
            panic!("{io}: dashboard {} failed: {e}", i + 1);
        }
    }
    // The high-water mark since the baseline: the true peak, not samples of it.
    let peak = gw.peak_rss_kib();

    assert_eq!(code, 1013, "{io}");
    // Per agent, an unbroken prefix.
    let mut next = [0u64; 2];
    for m in &seen {
        let i = usize::from(m["data"]["machineId"] == "mch_heavy");
        assert_eq!(
            m["data"]["seq"], next[i],
            "{io}: the slow dashboard's prefix: {m}"
        );
        next[i] += 1;
    }
    assert!(
        next[1] < HEAVY_EVENTS,
        "{io}: the slow dashboard got all {HEAVY_EVENTS} large events"
    );
    assert_eq!(
        gw.log().matches(SLOW_LOG).count(),
        1,
        "{io}: one slow consumer"
    );
    let counted = gw
        .metric_at_least("arcgate_slow_consumer_closes_total", 1.0)
        .await;
    assert_eq!(counted, 1.0, "{io}: slow consumers in /metrics");
    eprintln!(
        "{io}: {EVENTS} events in {sent_in:?} to {DASHBOARDS} dashboards; the slow one got \
         {} + {} large before 1013; RSS {baseline} KiB before, peak {peak} KiB",
        next[0], next[1]
    );
    assert!(
        peak <= baseline + RSS_SLACK_KIB,
        "{io}: RSS rose from {baseline} KiB to {peak} KiB"
    );
    agent.assert_open().await;
    heavy.assert_open().await;
}

/// Both backends, one after the other, so that the fast dashboards keep up on two cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_dashboard_among_100_on_both_backends() {
    for io in ["uring", "epoll"] {
        one_slow_dashboard_among_100(io).await;
    }
}
