//! The HTTP upgrade parser on arbitrary request heads: it never panics, answers a complete
//! head with a well-formed response, and never holds more than the head limit as partial.
#![no_main]

use arcgate::protocol::handshake::{parse, Outcome, Policy};
use libfuzzer_sys::fuzz_target;

const MAX_HEAD: usize = 2048;

fn policy(origins: bool) -> Policy {
    Policy {
        paths: vec!["/ws/agent".into(), "/ws/client".into()],
        allowed_origins: origins.then(|| vec!["https://panel.example.com".into()]),
        max_header_bytes: MAX_HEAD,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let policy = policy(flags & 1 == 1);
    match parse(head, &policy) {
        Outcome::Partial => assert!(head.len() <= MAX_HEAD, "partial past the limit"),
        Outcome::Upgrade {
            route,
            response,
            consumed,
        } => {
            assert!(route < policy.paths.len());
            assert!(consumed <= head.len() && consumed <= MAX_HEAD);
            assert!(response.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
            assert!(response.ends_with(b"\r\n\r\n"));
            // Bytes after the head are the WebSocket stream's; parsing the head alone agrees.
            assert!(matches!(
                parse(&head[..consumed], &policy),
                Outcome::Upgrade { consumed: c, .. } if c == consumed
            ));
        }
        Outcome::Reject { status, response } => {
            assert!(
                matches!(status, 400 | 403 | 404 | 405 | 426 | 431),
                "{status}"
            );
            let text = std::str::from_utf8(&response).expect("responses are UTF-8");
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")));
            let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
            assert!(head.contains("Connection: close"));
            let len = format!("Content-Length: {}", body.len());
            assert!(head.contains(&len), "{head}");
            let v: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
            assert!(v["error"].is_string() && v["message"].is_string());
        }
    }
});
