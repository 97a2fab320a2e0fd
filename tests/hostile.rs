//! Limits of the handshake phase against the real binary: the per-worker cap on connections
//! still sending their request head, and the configurable head size.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use tokio::io::AsyncWriteExt;

both_backends!(
    silent_connections_over_the_handshake_cap_get_503_at_once,
    max_header_bytes_is_configurable,
);

/// What a connection that sent nothing receives within `within` (`None`: it stays silent).
async fn unprompted_answer(
    mut s: tokio::net::TcpStream,
    within: Duration,
) -> (tokio::net::TcpStream, Option<HttpResponse>) {
    let r = read_response(&mut s, within).await;
    (s, r)
}

async fn silent_connections_over_the_handshake_cap_get_503_at_once(io: &'static str) {
    // Two workers: at most 2 × 4 connections may wait in the handshake.
    let gw = Gateway::start(
        io,
        &["--max-pending-handshakes", "4", "--handshake-timeout", "3s"],
    )
    .await;
    let start = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(gw.tcp().await);
    }
    let waits = silent
        .into_iter()
        .map(|s| unprompted_answer(s, Duration::from_millis(500)));
    let (mut held, mut refused) = (Vec::new(), 0);
    for (s, answer) in join_all(waits).await {
        match answer {
            None => held.push(s),
            Some(r) => {
                assert_eq!(r.status, 503, "{io}: {r:?}");
                let after = r.header("retry-after").expect("Retry-After");
                assert!(after.parse::<u32>().unwrap() >= 1, "{io}: {r:?}");
                refused += 1;
            }
        }
    }
    assert!(
        held.len() <= 8,
        "{io}: {} connections waited in the handshake",
        held.len()
    );
    assert!(refused >= 32, "{io}: only {refused} of 40 refused");
    let series = r#"arcgate_connections_refused_total{reason="handshakes"}"#;
    let counted = gw.metric_at_least(series, refused as f64).await;
    assert_eq!(counted, refused as f64, "{io}: {series}");
    // A well-formed upgrade meets a full handshake queue on either worker.
    let r = http(gw.addr, &upgrade_request("/ws/agent", &[]))
        .await
        .expect("an answer");
    assert_eq!(r.status, 503, "{io}: {r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{io}: too slow to tell"
    );
    // The held ones end at the handshake timeout, and their places are free again.
    for mut s in held {
        let r = read_response(&mut s, Duration::from_secs(5))
            .await
            .expect("an answer at the handshake timeout");
        assert_eq!(r.status, 400, "{io}: {r:?}");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http(gw.addr, &upgrade_request("/ws/client", &[]))
            .await
            .expect("an answer");
        if r.status == 101 {
            break;
        }
        assert_eq!(r.status, 503, "{io}: {r:?}");
        assert!(
            Instant::now() < deadline,
            "{io}: no handshake slot came free"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn max_header_bytes_is_configurable(io: &'static str) {
    let gw = Gateway::start(io, &["--max-header-bytes", "1024"]).await;
    let pad = "x".repeat(700);
    let r = http(gw.addr, &upgrade_request("/ws/agent", &[("X-Pad", &pad)]))
        .await
        .expect("an answer");
    assert_eq!(r.status, 101, "{io}: a head under 1 KiB: {r:?}");
    let pad = "x".repeat(1100);
    let r = http(gw.addr, &upgrade_request("/ws/agent", &[("X-Pad", &pad)]))
        .await
        .expect("an answer");
    assert_eq!(r.status, 431, "{io}: {r:?}");
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("1024 bytes"), "{io}: {body}");
    // A head that never ends is cut at the limit, long before the timeout.
    let mut s = gw.tcp().await;
    let start = Instant::now();
    s.write_all(b"GET /ws/agent HTTP/1.1\r\nX-Long: ")
        .await
        .unwrap();
    let _ = s.write_all("y".repeat(2000).as_bytes()).await;
    let r = read_response(&mut s, WAIT).await.expect("an answer");
    assert_eq!(r.status, 431, "{io}: {r:?}");
    assert!(start.elapsed() < Duration::from_secs(2), "{io}");
}
