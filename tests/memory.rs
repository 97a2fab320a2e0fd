//! Memory comes back: 10,000 connections that upgrade and never authenticate are all closed
//! at the auth timeout (error AUTH_TIMEOUT, close 4002), and the gateway's resident memory
//! returns near where it was before they came.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections opened by the test (the test process may hold 20,000 descriptors).
const CONNECTIONS: usize = 10_000;
/// Upgrades in flight at once.
const CONCURRENCY: usize = 200;
/// How far above its baseline the gateway's RSS may stay once they are gone.
const SLACK_KIB: u64 = 20 * 1024;
/// How much more a second round may leave behind: 10,000 connections leaking 400 bytes
/// each would pass it.
const REUSE_SLACK_KIB: u64 = 4 * 1024;
/// The gateway's `--auth-timeout`.
const AUTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Upgrades a connection on `/ws/agent` and reads the 101; the stream and any bytes
/// that came after the head.
async fn upgraded(gw: &Gateway) -> (TcpStream, Vec<u8>) {
    let mut s = gw.tcp().await;
    s.write_all(upgrade_request("/ws/agent", &[]).as_bytes())
        .await
        .expect("write the upgrade");
    let r = read_response(&mut s, Duration::from_secs(20))
        .await
        .expect("an upgrade answer");
    assert_eq!(r.status, 101, "{r:?}");
    (s, r.rest)
}

/// Reads to the end of the stream; the close code of the last frame, if it was a close
/// frame, and whether an `AUTH_TIMEOUT` error came before it.
async fn until_end(mut s: TcpStream, mut buf: Vec<u8>, within: Duration) -> (Option<u16>, bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("connection still open {within:?} after the auth timeout"),
        }
    }
    let (mut code, mut auth_timeout) = (None, false);
    let mut at = 0;
    while let Some((frame, used)) = parse_server_frame(&buf[at..]) {
        at += used;
        match frame.opcode {
            OP_TEXT => {
                let v: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
                auth_timeout |= v["data"]["code"] == "AUTH_TIMEOUT";
            }
            OP_CLOSE => code = frame.close_code(),
            _ => {}
        }
    }
    (code, auth_timeout)
}

/// A short round of work: 100 connections upgrade, authenticate and go away.
async fn churn(gw: &Gateway) {
    let users: Vec<Ws> = stream::iter(0..100)
        .map(|i| async move { gw.user(&format!("usr_{i}"), &["clu_m"]).await })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    drop(users);
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Opens `CONNECTIONS` connections that never authenticate and waits until the gateway
/// closed every one; the RSS with all of them open.
async fn unauthenticated_round(gw: &Gateway, io: &str, round: u32) -> u64 {
    let start = Instant::now();
    let conns: Vec<(TcpStream, Vec<u8>)> = stream::iter(0..CONNECTIONS)
        .map(|_| upgraded(gw))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let opened = start.elapsed();
    let peak = gw.rss_kib();
    if opened >= AUTH_TIMEOUT {
        // Still correct, but the first ones were closed before the last ones opened.
        eprintln!("{io}: the upgrades took {opened:?}, longer than the auth timeout");
    }
    let ends: Vec<(Option<u16>, bool)> = stream::iter(conns)
        .map(|(s, rest)| until_end(s, rest, AUTH_TIMEOUT + Duration::from_secs(5)))
        .buffer_unordered(CONNECTIONS)
        .collect()
        .await;
    let closed_at = start.elapsed();
    let not_4002 = ends.iter().filter(|(c, _)| *c != Some(4002)).count();
    let no_error = ends.iter().filter(|(_, e)| !e).count();
    assert_eq!(not_4002, 0, "{io}: connections without a 4002 close frame");
    assert_eq!(no_error, 0, "{io}: connections without AUTH_TIMEOUT first");
    eprintln!(
        "{io} round {round}: {CONNECTIONS} upgrades in {opened:?}, all closed after \
         {closed_at:?}, RSS with all open {peak} KiB"
    );
    peak
}

/// The RSS once the gateway settled after a round: it frees each connection once the
/// peer's side is closed too, and its allocator hands pages back as the workers go on.
async fn settled_rss(gw: &Gateway, limit: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        churn(gw).await;
        let rss = gw.rss_kib();
        if rss <= limit || Instant::now() > deadline {
            return rss;
        }
    }
}

async fn unauthenticated_connections_are_closed_and_memory_returns(io: &'static str) {
    let timeout = format!("{}ms", AUTH_TIMEOUT.as_millis());
    let gw = Gateway::start(io, &["--auth-timeout", &timeout]).await;
    // A few connections first, so that the baseline includes what any connection warms up.
    churn(&gw).await;
    let baseline = gw.rss_kib();
    unauthenticated_round(&gw, io, 1).await;
    let first = settled_rss(&gw, baseline + SLACK_KIB).await;
    eprintln!("{io}: RSS baseline {baseline} KiB, after the first round {first} KiB");
    assert!(
        first <= baseline + SLACK_KIB,
        "{io}: RSS {first} KiB stayed above the baseline {baseline} KiB + {SLACK_KIB} KiB"
    );
    // What stays is reused, not lost: a second round ends where the first did.
    unauthenticated_round(&gw, io, 2).await;
    let second = settled_rss(&gw, first + REUSE_SLACK_KIB).await;
    eprintln!("{io}: RSS after the second round {second} KiB");
    assert!(
        second <= first + REUSE_SLACK_KIB,
        "{io}: RSS grew from {first} KiB to {second} KiB over a second round of \
         {CONNECTIONS} connections: memory is not reused"
    );
    let series = r#"arcgate_closes_total{code="4002"}"#;
    let want = 2.0 * CONNECTIONS as f64;
    assert_eq!(
        gw.metric_at_least(series, want).await,
        want,
        "{io}: {series}"
    );
    // And the gateway still serves.
    gw.user("usr_after", &["clu_m"]).await;
}

/// Both backends, one after the other: together they would pass the test process's
/// open-files limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_closed_and_memory_returns_on_both_backends() {
    for io in ["uring", "epoll"] {
        unauthenticated_connections_are_closed_and_memory_returns(io).await;
    }
}
