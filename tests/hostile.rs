//! Limits before authentication against the real binary: the per-worker cap on connections
//! still sending their request head, the configurable head size, and a ping flood.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

both_backends!(
    silent_connections_over_the_handshake_cap_get_503_at_once,
    max_header_bytes_is_configurable,
    a_ping_flood_before_auth_holds_no_memory,
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

/// Connections flooding at once, and the empty pings each one sends (6 bytes each).
const FLOODERS: usize = 4;
const PINGS: usize = 400_000;
/// How much the gateway's peak RSS may grow during the flood. Queued pongs at ~64 bytes
/// each (what a 2-byte frame costs in its queue) would take ~100 MiB.
const FLOOD_SLACK_KIB: u64 = 24 * 1024;

async fn a_ping_flood_before_auth_holds_no_memory(io: &'static str) {
    let gw = Gateway::start(io, &["--auth-timeout", "120s"]).await;
    gw.reset_peak_rss();
    let before = gw.rss_kib();
    let flood = (0..FLOODERS).map(|_| async {
        // A small receive window: the pongs back up in the gateway, not in the test's kernel.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(gw.addr).await.unwrap();
        s.write_all(upgrade_request("/ws/agent", &[]).as_bytes())
            .await
            .unwrap();
        let r = read_response(&mut s, WAIT)
            .await
            .expect("an upgrade answer");
        assert_eq!(r.status, 101, "{io}: {r:?}");
        let ping = encode_frame(true, 0, OP_PING, Some([1, 2, 3, 4]), b"");
        let burst = ping.repeat(10_000);
        for _ in 0..PINGS / 10_000 {
            s.write_all(&burst).await.unwrap();
        }
        let last = encode_frame(true, 0, OP_PING, Some([1, 2, 3, 4]), b"last");
        s.write_all(&last).await.unwrap();
        (s, r.rest)
    });
    let conns = join_all(flood).await;
    // Each connection is still open and its answers end with the pong to the latest ping.
    for (mut s, mut buf) in conns {
        let mut chunk = vec![0u8; 1 << 16];
        let last = loop {
            let mut at = 0;
            let mut last = None;
            while let Some((f, used)) = parse_server_frame(&buf[at..]) {
                at += used;
                assert_eq!(f.opcode, OP_PONG, "{io}: {f:?}");
                last = Some(f.payload);
            }
            buf.drain(..at);
            if last.as_deref() == Some(&b"last"[..]) {
                break last;
            }
            let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("{io}: no pong to the last ping"))
                .unwrap();
            assert!(n > 0, "{io}: closed during the flood");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert_eq!(last.as_deref(), Some(&b"last"[..]));
    }
    // Every ping was handled: the high-water mark holds the peak of the whole flood.
    let grown = gw.peak_rss_kib().saturating_sub(before);
    assert!(
        grown < FLOOD_SLACK_KIB,
        "{io}: peak RSS grew by {grown} KiB during a ping flood of {FLOODERS} connections"
    );
}
