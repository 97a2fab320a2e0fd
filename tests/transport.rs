//! docs/protocol.md sections 2 and 3 against the real binary: HTTP answers before the
//! upgrade, origins, extensions, frame rules and pings.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;

both_backends!(
    unknown_path_is_404,
    plain_get_on_ws_paths_is_426,
    garbage_request_is_400_and_closed,
    malformed_upgrade_is_400,
    handshake_timeout_is_400,
    handshake_deadline_is_total_not_idle,
    bad_origin_is_403_on_both_paths,
    allowed_origin_and_no_origin_are_accepted,
    any_origin_without_allowed_origins,
    permessage_deflate_is_declined,
    fragmented_message_is_reassembled,
    invalid_utf8_closes_1007,
    protocol_violations_close_1002,
    close_frames_survive_connection_churn,
    ping_is_answered_with_pong,
    gateway_pings_and_closes_4000_without_pong,
    answered_pings_keep_the_connection,
    any_frame_counts_as_liveness,
);

async fn unknown_path_is_404(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    for path in [
        "/",
        "/ws",
        "/ws/",
        "/ws/agents",
        "/ws/clientx",
        "/other/ws/agent",
    ] {
        let r = http(gw.addr, &upgrade_request(path, &[]))
            .await
            .unwrap_or_else(|| panic!("{path}: no answer"));
        assert_eq!(r.status, 404, "upgrade to {path}: {r:?}");
    }
    let r = http(gw.addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("an answer");
    assert_eq!(r.status, 404, "{r:?}");
}

async fn plain_get_on_ws_paths_is_426(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    for path in ["/ws/agent", "/ws/client"] {
        let r = http(
            gw.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await
        .unwrap_or_else(|| panic!("{path}: no answer"));
        assert_eq!(r.status, 426, "plain GET {path}: {r:?}");
    }
}

async fn garbage_request_is_400_and_closed(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let garbage: [&[u8]; 3] = [
        b"HELLO THERE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /ws/agent HTTP/1.1\r\nHost x no colon\r\n\r\n",
    ];
    for g in garbage {
        let mut s = gw.tcp().await;
        s.write_all(g).await.unwrap();
        let r = read_response(&mut s, WAIT)
            .await
            .unwrap_or_else(|| panic!("{g:?}: closed without an answer"));
        assert_eq!(r.status, 400, "{g:?}: {r:?}");
        assert!(
            closed_within(&mut s, WAIT).await,
            "{g:?}: left open after 400"
        );
    }
}

async fn malformed_upgrade_is_400(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    // An upgrade without Sec-WebSocket-Key cannot be answered with an accept key.
    let req = "GET /ws/agent HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Version: 13\r\n\r\n";
    let r = http(gw.addr, req).await.expect("an answer");
    assert_eq!(r.status, 400, "{r:?}");
}

async fn handshake_timeout_is_400(io: &'static str) {
    let gw = Gateway::start(io, &["--handshake-timeout", "1s"]).await;
    let mut s = gw.tcp().await;
    let start = Instant::now();
    s.write_all(b"GET /ws/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
        .await
        .unwrap();
    let r = read_response(&mut s, WAIT)
        .await
        .expect("no 400 within 5 s of a half request head");
    let took = start.elapsed();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        took >= Duration::from_millis(800),
        "answered after {took:?}"
    );
    assert!(closed_within(&mut s, WAIT).await, "left open after 400");
}

async fn handshake_deadline_is_total_not_idle(io: &'static str) {
    let gw = Gateway::start(io, &["--handshake-timeout", "1s"]).await;
    let s = gw.tcp().await;
    let (mut rd, mut wr) = s.into_split();
    let start = Instant::now();
    // One byte every 100 ms: never idle, never complete.
    let writer = tokio::spawn(async move {
        let head = b"GET /ws/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
        if wr.write_all(head).await.is_err() {
            return;
        }
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let ended = tokio::time::timeout(WAIT, async {
        use tokio::io::AsyncReadExt;
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let took = start.elapsed();
    writer.abort();
    assert!(
        ended.is_ok(),
        "a trickling request head was kept open for 5 s"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "answer: {text:?}");
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
}

const ORIGINS: &str = "https://panel.example.com,http://localhost:3000";

async fn bad_origin_is_403_on_both_paths(io: &'static str) {
    let gw = Gateway::start(io, &["--allowed-origins", ORIGINS]).await;
    let bad = [
        "https://evil.example.com",
        "http://panel.example.com",
        "https://panel.example.com:8443",
        "https://panel.example.com.evil.com",
        "http://localhost:3001",
        "null",
    ];
    for path in ["/ws/agent", "/ws/client"] {
        for origin in bad {
            let r = http(gw.addr, &upgrade_request(path, &[("Origin", origin)]))
                .await
                .unwrap_or_else(|| panic!("{path} {origin}: no answer"));
            assert_eq!(r.status, 403, "{path} Origin {origin}: {r:?}");
        }
    }
}

async fn allowed_origin_and_no_origin_are_accepted(io: &'static str) {
    let gw = Gateway::start(io, &["--allowed-origins", ORIGINS]).await;
    for path in ["/ws/agent", "/ws/client"] {
        for origin in [
            "https://panel.example.com",
            "HTTPS://Panel.Example.COM",
            "http://localhost:3000",
        ] {
            RawWs::connect(gw.addr, path, &[("Origin", origin)]).await;
        }
        RawWs::connect(gw.addr, path, &[]).await;
    }
    // An accepted browser client works end to end.
    let mut ws = gw
        .ws_with("/ws/client", &[("Origin", "https://panel.example.com")])
        .await
        .expect("upgrade with an allowed origin");
    ws.send(client_auth(&user_token("usr_o", &["clu_o"], None)))
        .await;
    ws.recv_event("authenticated").await;
}

async fn any_origin_without_allowed_origins(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    for path in ["/ws/agent", "/ws/client"] {
        RawWs::connect(gw.addr, path, &[("Origin", "https://anything.example")]).await;
    }
}

async fn permessage_deflate_is_declined(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let offer = "permessage-deflate; client_max_window_bits";
    let mut raw = RawWs::connect(
        gw.addr,
        "/ws/client",
        &[("Sec-WebSocket-Extensions", offer)],
    )
    .await;
    assert_eq!(
        raw.response.header("sec-websocket-extensions"),
        None,
        "{:?}",
        raw.response
    );
    assert_eq!(raw.response.header("sec-websocket-protocol"), None);
    // Plain (uncompressed) frames work on it.
    raw.send_json(&client_auth(&user_token("usr_d", &["clu_d"], None)))
        .await;
    let m = raw.recv_json().await;
    assert_eq!(m["event"], "authenticated", "{m}");
}

async fn fragmented_message_is_reassembled(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut raw = RawWs::connect(gw.addr, "/ws/agent", &[]).await;
    let auth = json!({"event": "auth", "data": {
        "token": agent_token("mch_frag", "clu_f"), "machineId": "mch_frag", "version": "1.0.0-é"}})
    .to_string();
    let bytes = auth.as_bytes();
    // Split inside the two-byte "é", with a ping between the fragments.
    let cut = auth.find('é').unwrap() + 1;
    let mid = cut / 2;
    raw.send_frame(false, OP_TEXT, &bytes[..mid]).await;
    raw.send_frame(false, OP_CONT, &bytes[mid..cut]).await;
    raw.send_frame(true, OP_PING, b"between").await;
    raw.send_frame(true, OP_CONT, &bytes[cut..]).await;
    let pong = raw.read_frame(WAIT).await.expect("a pong");
    assert_eq!(pong.opcode, OP_PONG, "{pong:?}");
    assert_eq!(pong.payload, b"between");
    let m = raw.recv_json().await;
    assert_eq!(m["event"], "authenticated", "{m}");
    assert_eq!(m["data"]["machineId"], "mch_frag", "{m}");
}

async fn invalid_utf8_closes_1007(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    // In one frame, before auth.
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    raw.send_frame(true, OP_TEXT, b"{\"event\":\"\xff\xfe\"}")
        .await;
    assert_eq!(raw.expect_close(WAIT).await, 1007);
    // Across fragments, after auth.
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    raw.send_json(&client_auth(&user_token("usr_u", &["clu_u"], None)))
        .await;
    assert_eq!(raw.recv_json().await["event"], "authenticated");
    raw.send_frame(false, OP_TEXT, b"{\"event\":\"x\xc3").await;
    raw.send_frame(true, OP_CONT, b"(\"}").await;
    assert_eq!(raw.expect_close(WAIT).await, 1007);
}

async fn protocol_violations_close_1002(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let text = br#"{"event":"nothing","data":{}}"#;
    let mask = Some([1, 2, 3, 4]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unmasked text frame",
            encode_frame(true, 0, OP_TEXT, None, text),
        ),
        ("RSV1 set", encode_frame(true, 4, OP_TEXT, mask, text)),
        ("RSV2 set", encode_frame(true, 2, OP_TEXT, mask, text)),
        ("RSV3 set", encode_frame(true, 1, OP_TEXT, mask, text)),
        ("opcode 3", encode_frame(true, 0, 0x3, mask, text)),
        ("opcode 0xB", encode_frame(true, 0, 0xB, mask, b"")),
        (
            "fragmented ping",
            encode_frame(false, 0, OP_PING, mask, b"p"),
        ),
        (
            "continuation without start",
            encode_frame(true, 0, OP_CONT, mask, text),
        ),
        (
            "ping over 125 bytes",
            encode_frame(true, 0, OP_PING, mask, &[b'p'; 126]),
        ),
        (
            "text inside a fragmented text",
            [
                encode_frame(false, 0, OP_TEXT, mask, b"{\"ev"),
                encode_frame(true, 0, OP_TEXT, mask, text),
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in cases {
        for path in ["/ws/agent", "/ws/client"] {
            let mut raw = RawWs::connect(gw.addr, path, &[]).await;
            raw.send_raw(&bytes).await;
            let code = raw.close_code(WAIT).await;
            assert_eq!(code, Ok(1002), "{what} on {path}");
        }
    }
    // Also on an authenticated connection.
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    raw.send_json(&client_auth(&user_token("usr_p", &["clu_p"], None)))
        .await;
    assert_eq!(raw.recv_json().await["event"], "authenticated");
    raw.send_raw(&encode_frame(true, 0, OP_TEXT, None, text))
        .await;
    assert_eq!(raw.expect_close(WAIT).await, 1002);
}

async fn close_frames_survive_connection_churn(io: &'static str) {
    // Clients that hang up as soon as they have the close frame, five at a time: every new
    // connection still gets its 101 and, for its bad frame, its own close frame.
    let gw = Gateway::start(io, &[]).await;
    let bad = encode_frame(true, 4, OP_TEXT, Some([9, 8, 7, 6]), b"{}");
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (addr, bad) = (gw.addr, bad.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for _ in 0..100 {
                    let mut s = tcp_connect(addr).await;
                    let _ = s
                        .write_all(upgrade_request("/ws/client", &[]).as_bytes())
                        .await;
                    match read_response(&mut s, WAIT).await {
                        Some(r) if r.status == 101 => {}
                        other => {
                            failures.push(format!("upgrade: {other:?}"));
                            continue;
                        }
                    }
                    let mut raw = RawWs::from_upgraded(s);
                    raw.send_raw(&bad).await;
                    if let Err(e) = raw.close_code(WAIT).await {
                        failures.push(format!("no close frame: {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of 500 connections failed: {failures:?}",
        failures.len()
    );
}

async fn ping_is_answered_with_pong(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut raw = RawWs::connect(gw.addr, "/ws/agent", &[]).await;
    raw.send_frame(true, OP_PING, b"hello-42").await;
    let f = raw.read_frame(WAIT).await.expect("a pong");
    assert_eq!(f.opcode, OP_PONG, "{f:?}");
    assert!(f.fin && !f.masked, "{f:?}");
    assert_eq!(f.payload, b"hello-42");
    // Empty ping, on an authenticated client.
    let mut ws = gw.user("usr_ping", &["clu_ping"]).await;
    ws.assert_open().await;
}

async fn gateway_pings_and_closes_4000_without_pong(io: &'static str) {
    let gw = Gateway::start(io, &["--ping-interval", "500ms", "--pong-timeout", "500ms"]).await;
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    raw.send_json(&client_auth(&user_token("usr_np", &["clu_np"], None)))
        .await;
    assert_eq!(raw.recv_json().await["event"], "authenticated");
    let f = raw.read_frame(WAIT).await.expect("a ping");
    assert_eq!(f.opcode, OP_PING, "{f:?}");
    let pinged = Instant::now();
    let code = raw.expect_close(WAIT).await;
    assert_eq!(code, 4000);
    let after = pinged.elapsed();
    assert!(
        after >= Duration::from_millis(400),
        "closed {after:?} after the ping"
    );
}

async fn answered_pings_keep_the_connection(io: &'static str) {
    let gw = Gateway::start(io, &["--ping-interval", "300ms", "--pong-timeout", "300ms"]).await;
    let mut ws = gw.user("usr_alive", &["clu_a"]).await;
    // Reading answers every ping; several ping rounds pass.
    ws.expect_silence(Duration::from_millis(2500)).await;
    ws.assert_open().await;
    // The raw way: answer each ping by hand.
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    raw.send_json(&client_auth(&user_token("usr_alive2", &["clu_a"], None)))
        .await;
    assert_eq!(raw.recv_json().await["event"], "authenticated");
    let until = Instant::now() + Duration::from_millis(2000);
    let mut pings = 0;
    while Instant::now() < until {
        let f = raw.read_frame(WAIT).await.expect("connection ended");
        assert_eq!(f.opcode, OP_PING, "{f:?}");
        pings += 1;
        raw.send_frame(true, OP_PONG, &f.payload).await;
    }
    assert!(pings >= 3, "{pings} pings in 2 s at a 300 ms interval");
}

async fn any_frame_counts_as_liveness(io: &'static str) {
    let gw = Gateway::start(io, &["--ping-interval", "300ms", "--pong-timeout", "500ms"]).await;
    let mut raw = RawWs::connect(gw.addr, "/ws/client", &[]).await;
    raw.send_json(&client_auth(&user_token("usr_busy", &["clu_b"], None)))
        .await;
    assert_eq!(raw.recv_json().await["event"], "authenticated");
    // Never answer a ping, but keep sending messages (unknown events: no reply).
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        raw.send_json(&json!({"event": "client:noop", "data": {}}))
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    raw.send_frame(true, OP_PING, b"end").await;
    loop {
        let f = raw.read_frame(WAIT).await.expect("closed while busy");
        assert_ne!(
            f.opcode,
            OP_CLOSE,
            "closed while busy: {:?}",
            f.close_code()
        );
        if f.opcode == OP_PONG && f.payload == b"end" {
            break;
        }
    }
}
