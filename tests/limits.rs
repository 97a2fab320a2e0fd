//! Limits of docs/protocol.md sections 2.2, 3, 12 and 14 against the real binary:
//! connection count and rate, message size, the per-connection message rate, and slow
//! consumers.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

both_backends!(
    over_max_connections_is_503,
    over_max_connection_rate_is_503,
    message_over_max_size_closes_1009,
    rate_limit_drops_and_warns_once_per_second,
    sustained_flood_closes_4008,
    slow_consumer_is_closed,
);

/// Asserts a `503` with a `Retry-After` of whole seconds.
fn assert_503(r: &HttpResponse) {
    assert_eq!(r.status, 503, "{r:?}");
    let after = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("503 without Retry-After: {r:?}"));
    let secs: u64 = after
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not seconds: {after:?}"));
    assert!(secs >= 1, "Retry-After {secs}");
}

async fn over_max_connections_is_503(io: &'static str) {
    let gw = Gateway::start(io, &["--max-connections", "2"]).await;
    let first = RawWs::connect(gw.addr, "/ws/agent", &[]).await;
    let mut second = gw.ws("/ws/client").await;
    second
        .send(client_auth(&user_token("usr_m", &["clu_m"], None)))
        .await;
    second.recv_event("authenticated").await;
    for path in ["/ws/agent", "/ws/client"] {
        let r = http(gw.addr, &upgrade_request(path, &[]))
            .await
            .unwrap_or_else(|| panic!("{path}: no answer over max connections"));
        assert_503(&r);
    }
    // Both live connections are unaffected.
    second.assert_open().await;
    // A slot freed is a slot to take.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http(gw.addr, &upgrade_request("/ws/agent", &[]))
            .await
            .expect("an answer");
        if r.status == 101 {
            break;
        }
        assert_503(&r);
        assert!(Instant::now() < deadline, "slot not freed after close");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn over_max_connection_rate_is_503(io: &'static str) {
    let gw = Gateway::start(io, &["--max-connection-rate", "3"]).await;
    // 30 at once: a rate of 3/s lets all of them in only if they spread over 9 s, which
    // no load on the machine makes them do.
    let attempts: Vec<_> = (0..30)
        .map(|_| {
            let addr = gw.addr;
            tokio::spawn(async move {
                let mut s = tcp_connect(addr).await;
                use tokio::io::AsyncWriteExt;
                let _ = s
                    .write_all(upgrade_request("/ws/agent", &[]).as_bytes())
                    .await;
                (read_response(&mut s, WAIT).await, s)
            })
        })
        .collect();
    let mut upgraded = 0;
    let mut refused = 0;
    let mut keep = Vec::new();
    for a in attempts {
        let (r, s) = a.await.unwrap();
        let r = r.expect("no answer");
        match r.status {
            101 => upgraded += 1,
            _ => {
                assert_503(&r);
                refused += 1;
            }
        }
        keep.push(s);
    }
    assert!(
        upgraded >= 3,
        "the burst is the rate: {upgraded} of 30 upgraded"
    );
    assert!(refused >= 1, "all 30 upgraded at a rate of 3/s");
    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    RawWs::connect(gw.addr, "/ws/client", &[]).await;
}

async fn message_over_max_size_closes_1009(io: &'static str) {
    let gw = Gateway::start(io, &["--max-message-size", "1024"]).await;
    let pad = |n: usize| json!({"event": "x:pad", "data": {"pad": "a".repeat(n)}}).to_string();
    // Under the limit: fine (an unknown event, ignored).
    let mut ws = gw.user("usr_s", &["clu_s"]).await;
    ws.send_text(pad(900)).await;
    ws.expect_silence(Duration::from_millis(200)).await;
    ws.assert_open().await;
    // Over it, in one frame, authenticated or not, on both paths.
    ws.send_text(pad(2000)).await;
    assert_eq!(ws.expect_close().await, 1009, "authenticated client");
    let mut agent = gw.agent("mch_s", "clu_s").await;
    agent.send_text(pad(2000)).await;
    assert_eq!(agent.expect_close().await, 1009, "authenticated agent");
    for path in ["/ws/agent", "/ws/client"] {
        let mut raw = RawWs::connect(gw.addr, path, &[]).await;
        raw.send_frame(true, OP_TEXT, pad(2000).as_bytes()).await;
        assert_eq!(
            raw.expect_close(WAIT).await,
            1009,
            "unauthenticated on {path}"
        );
    }
    // Over it across fragments that are each under it.
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    let big = pad(2000);
    for (i, part) in big.as_bytes().chunks(600).enumerate() {
        let last = (i + 1) * 600 >= big.len();
        let op = if i == 0 { OP_TEXT } else { OP_CONT };
        raw.send_frame(last, op, part).await;
    }
    assert_eq!(raw.expect_close(WAIT).await, 1009, "fragmented");
    // Binary too.
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    raw.send_frame(true, OP_BINARY, &[7u8; 2000]).await;
    assert_eq!(raw.expect_close(WAIT).await, 1009, "binary");
    // A header announcing a huge payload is refused without waiting for it.
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    let mut head = vec![0x81, 0x80 | 127];
    head.extend_from_slice(&(1u64 << 40).to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_raw(&head).await;
    assert_eq!(raw.expect_close(WAIT).await, 1009, "huge announced length");
}

async fn rate_limit_drops_and_warns_once_per_second(io: &'static str) {
    let gw = Gateway::start(
        io,
        &[
            "--rate-limit",
            "5",
            "--rate-burst",
            "5",
            "--rate-limit-close-after",
            "10",
        ],
    )
    .await;
    let mut user = gw.user("usr_rl", &["clu_rl"]).await;
    let mut agent = gw.agent("mch_rl", "clu_rl").await;
    user.recv_event("machine:online").await;
    // Let the agent's bucket fill up after its auth.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..20 {
        agent
            .send(json!({"event": "server:status", "data": {"serverId": "s", "seq": i}}))
            .await;
    }
    let e = agent.expect_error("RATE_LIMIT").await;
    let first_error = Instant::now();
    let _ = e;
    // At most one error in that second.
    let left = Duration::from_millis(900).saturating_sub(first_error.elapsed());
    agent.expect_silence(left).await;
    // The dropped messages never reach anyone: only about the burst got through, in order.
    let mut seqs = Vec::new();
    loop {
        match user.poll(Duration::from_millis(500)).await {
            Polled::Message(m) => {
                assert_eq!(m["event"], "server:updated", "{m}");
                seqs.push(m["data"]["seq"].as_u64().unwrap());
            }
            Polled::Nothing => break,
            other => panic!("user: {other:?}"),
        }
    }
    assert!(
        (4..=8).contains(&seqs.len()),
        "{} of 20 messages passed a burst of 5: {seqs:?}",
        seqs.len()
    );
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(seqs[0], 0, "{seqs:?}");
    // Under the limit again: relayed, connection open.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    agent
        .send(json!({"event": "server:status", "data": {"serverId": "s", "seq": 100}}))
        .await;
    let m = user.recv_event("server:updated").await;
    assert_eq!(m["data"]["seq"], 100, "{m}");
    agent.expect_silence(Duration::from_millis(200)).await;
    agent.assert_open().await;
}

async fn sustained_flood_closes_4008(io: &'static str) {
    let gw = Gateway::start(
        io,
        &[
            "--rate-limit",
            "5",
            "--rate-burst",
            "5",
            "--rate-limit-close-after",
            "3",
        ],
    )
    .await;
    let mut ws = gw.user("usr_fl", &["clu_fl"]).await;
    let start = Instant::now();
    let mut errors = 0u64;
    let code = loop {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "no 4008 after 8 s of flooding"
        );
        ws.try_send(json!({"event": "x:flood", "data": {}})).await;
        match ws.poll(Duration::from_millis(40)).await {
            Polled::Message(m) => {
                assert_error(&m, "RATE_LIMIT");
                errors += 1;
            }
            Polled::Nothing => {}
            Polled::Closed(c) => break c,
            Polled::Ended(e) => panic!("ended without a close frame: {e}"),
        }
    };
    let took = start.elapsed();
    assert_eq!(code, Some(4008));
    // Three seconds of drops counted from the first drop, which came after `start`.
    assert!(took >= Duration::from_secs(3), "closed after {took:?}");
    assert!(errors >= 1, "closed without a RATE_LIMIT error");
    assert!(
        errors <= took.as_secs() + 1,
        "{errors} RATE_LIMIT errors in {took:?}"
    );
}

async fn slow_consumer_is_closed(io: &'static str) {
    let gw = Gateway::start(
        io,
        &[
            "--max-outbound-bytes",
            "65536",
            "--rate-limit",
            "100000",
            "--rate-burst",
            "100000",
        ],
    )
    .await;
    let stream = tcp_small_rcvbuf(gw.addr).await;
    let mut slow = ws_over(stream, gw.addr, "/ws/client", &[]).await.unwrap();
    slow.send(client_auth(&user_token("usr_slow", &["clu_sl"], None)))
        .await;
    slow.recv_event("authenticated").await;
    let mut agent = gw.agent("mch_sl", "clu_sl").await;
    // 400 × 30 KB; the slow client reads nothing meanwhile.
    let blob = "b".repeat(30_000);
    for i in 0..400 {
        agent
            .send(json!({"event": "server:status", "data": {"serverId": "s", "seq": i, "blob": blob}}))
            .await;
    }
    agent.assert_open().await;
    let (read, code) = slow.messages_until_end(Duration::from_secs(15)).await;
    assert!(
        read < 400,
        "all {read} messages were queued for a client that read nothing"
    );
    assert_eq!(code, Some(1013), "after {read} messages");
    // The agent, and a normal client, are unaffected.
    let mut user = gw.user("usr_fast", &["clu_sl"]).await;
    agent
        .send(json!({"event": "server:status", "data": {"serverId": "s", "seq": "last"}}))
        .await;
    assert_eq!(
        user.recv_event("server:updated").await["data"]["seq"],
        "last"
    );
}
