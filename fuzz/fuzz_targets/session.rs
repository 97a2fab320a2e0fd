//! One connection's state machine driven by arbitrary operations: bytes in arbitrary
//! chunks, valid and invalid frames, real tokens, time passing and closes from outside.
//! It never panics, nothing follows `Close`, every frame it sends is one well-formed
//! server frame, and what it routes is in the name of the identity it authenticated.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arcgate::auth::{mint_hs256, KeySource, TokenSpec, Verifier};
use arcgate::protocol::codec::{client_frame, Decoder, Message, OP_TEXT};
use arcgate::protocol::handshake::Policy;
use arcgate::protocol::session::{Ctx, Limits, Output, Session, AGENT_PATH, CLIENT_PATH};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";
/// Wall-clock time at the session's start (Unix ms).
const UNIX0: u64 = 1_700_000_000_000;

struct Fixture {
    limits: Limits,
    verifier: Verifier,
    /// Agent, user (two clusters, some perms), service tokens, and one about to expire.
    tokens: [String; 4],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let spec = |role: &str, sub: &str, ttl: u64| TokenSpec {
            role: role.into(),
            sub: sub.into(),
            ttl: Duration::from_secs(ttl),
            ..TokenSpec::default()
        };
        let now = UNIX0 / 1000;
        let agent = TokenSpec {
            cluster: Some("clu_a".into()),
            ..spec("agent", "mch_1", 3600)
        };
        let user = TokenSpec {
            clusters: Some(vec!["clu_a".into(), "clu_b".into()]),
            perms: Some(vec!["server:start".into()]),
            ..spec("user", "usr_1", 3600)
        };
        let short = TokenSpec {
            cluster: Some("clu_a".into()),
            ..spec("agent", "mch_1", 70)
        };
        Fixture {
            limits: Limits {
                policy: Policy {
                    paths: vec![AGENT_PATH.into(), CLIENT_PATH.into()],
                    allowed_origins: None,
                    max_header_bytes: 2048,
                },
                handshake_timeout: Duration::from_secs(5),
                auth_timeout: Duration::from_secs(10),
                ping_interval: Duration::from_secs(30),
                pong_timeout: Duration::from_secs(30),
                agent_lease: Duration::from_secs(90),
                token_expiry_warning: Duration::from_secs(60),
                jwt_leeway: Duration::from_secs(5),
                rate_limit: 20,
                rate_burst: 40,
                rate_limit_close_after: 3,
                max_message_size: 4096,
            },
            verifier: Verifier::new(
                &KeySource::Secret(SECRET.into()),
                None,
                None,
                Duration::from_secs(5),
            )
            .expect("a secret"),
            tokens: [
                mint_hs256(SECRET, &agent, now),
                mint_hs256(SECRET, &user, now),
                mint_hs256(SECRET, &spec("service", "svc_1", 3600), now),
                mint_hs256(SECRET, &short, now),
            ],
        }
    })
}

fn request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// What the session has shown so far.
#[derive(Default)]
struct Seen {
    closed: bool,
    upgraded: bool,
    online: Option<String>,
}

fn check(seen: &mut Seen, o: Output<'_>) {
    assert!(!seen.closed, "output after Close: {o:?}");
    match o {
        Output::Close => seen.closed = true,
        Output::Send(bytes) if !seen.upgraded => {
            assert!(bytes.starts_with(b"HTTP/1.1 "), "{bytes:?}");
            seen.upgraded = bytes.starts_with(b"HTTP/1.1 101 ");
        }
        Output::Send(bytes) | Output::Pong(bytes) => {
            // Exactly one complete, valid server frame; text is a JSON object with an event.
            let mut d = Decoder::new_client(usize::MAX >> 1);
            let mut copy = bytes.to_vec();
            let mut n = 0;
            d.decode(&mut copy, |m| {
                n += 1;
                if let Message::Text(t) = m {
                    let v: serde_json::Value = serde_json::from_str(t).expect("JSON text");
                    assert!(v["event"].is_string(), "{t}");
                    assert!(v["timestamp"].is_u64(), "{t}");
                }
                arcgate::protocol::codec::Flow::Continue
            })
            .expect("a valid server frame");
            assert_eq!((n, d.buffered()), (1, 0), "one whole frame per Send");
        }
        Output::Online { identity, .. } => {
            assert!(seen.online.is_none(), "online twice");
            seen.online = Some(identity.sub.to_string());
        }
        Output::Relay { machine_id, .. } => {
            assert_eq!(Some(machine_id), seen.online.as_deref(), "relay as another");
        }
        Output::CommandResponse { .. } => {
            assert_eq!(
                seen.online.as_deref(),
                Some("mch_1"),
                "only an agent answers"
            );
        }
        Output::Command { issuer, .. } => {
            assert_eq!(Some(&*issuer.sub), seen.online.as_deref());
            assert_ne!(issuer.sub.as_ref(), "mch_1", "agents issue no commands");
        }
        Output::Notify { .. } => {
            assert_eq!(
                seen.online.as_deref(),
                Some("svc_1"),
                "only services notify"
            );
        }
    }
}

/// A masked text frame with `json`.
fn text(u: &mut Unstructured<'_>, json: &str) -> Result<Vec<u8>> {
    Ok(client_frame(true, OP_TEXT, json.as_bytes(), u.arbitrary()?))
}

fn step(u: &mut Unstructured<'_>, f: &Fixture, path: &str) -> Result<Vec<u8>> {
    let bytes = match u.int_in_range(0..=9u8)? {
        0 => {
            let n = u.int_in_range(0..=300usize)?;
            u.bytes(n.min(u.len()))?.to_vec()
        }
        1 => {
            let kind: u8 = u.arbitrary()?;
            let n = u.int_in_range(0..=200usize)?;
            let payload = u.bytes(n.min(u.len()))?;
            client_frame(kind & 0x80 != 0, kind & 0x0F, payload, u.arbitrary()?)
        }
        2 => request(path),
        3 | 4 => {
            let token = &f.tokens[u.choose_index(f.tokens.len())?];
            let machine = *u.choose(&["mch_1", "mch_2"])?;
            let json = format!(
                r#"{{"event":"auth","id":"a1","data":{{"token":"{token}","machineId":"{machine}","version":"1"}}}}"#
            );
            text(u, &json)?
        }
        5 => {
            let event = *u.choose(&[
                "heartbeat",
                "server:status",
                "player:joined",
                "notification",
                "command:response",
                "command",
                "x:unknown",
            ])?;
            let extra: String = u.arbitrary()?;
            let json = serde_json::json!({
                "event": event,
                "id": "r1",
                "data": {
                    "serverId": "srv_1", "machineId": "mch_2", "clusterId": "clu_z",
                    "type": "server:start", "id": "cmd_00000000_0_1", "x": extra,
                },
            });
            text(u, &json.to_string())?
        }
        6 => {
            let s: String = u.arbitrary()?;
            text(u, &s)?
        }
        _ => Vec::new(),
    };
    Ok(bytes)
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let f = fixture();
    let t0 = Instant::now();
    let mut now = t0;
    let path = if u.arbitrary()? {
        AGENT_PATH
    } else {
        CLIENT_PATH
    };
    let mut session = Session::new(now, &f.limits, None);
    let mut seen = Seen::default();
    let mut steps = 0;
    while !u.is_empty() && steps < 64 {
        steps += 1;
        let ctx = |now: Instant| Ctx {
            limits: &f.limits,
            verifier: &f.verifier,
            observer: &(),
            now,
            unix_ms: UNIX0 + now.duration_since(t0).as_millis() as u64,
        };
        match u.int_in_range(0..=9u8)? {
            0..=6 => {
                let mut bytes = step(u, f, path)?;
                // Delivered in up to three reads.
                let a = u.int_in_range(0..=bytes.len())?;
                let b = u.int_in_range(a..=bytes.len())?;
                for range in [0..a, a..b, b..bytes.len()] {
                    let c = ctx(now);
                    session.handle_bytes(&c, &mut bytes[range], &mut |o| check(&mut seen, o));
                }
            }
            7 | 8 => {
                let ms = u64::from(u.arbitrary::<u16>()?) * 8;
                now += Duration::from_millis(ms);
                if session.poll_timeout().is_some_and(|t| t <= now) {
                    session.handle_timeout(&ctx(now), &mut |o| check(&mut seen, o));
                }
            }
            _ => {
                let code = *u.choose(&[1012u16, 1013, 4001, 4009])?;
                session.close(&ctx(now), code, "closing", &mut |o| check(&mut seen, o));
            }
        }
        assert_eq!(session.is_closed(), seen.closed);
        if seen.closed {
            assert!(session.poll_timeout().is_none());
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
