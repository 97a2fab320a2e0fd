//! The client side of the WebSocket upgrade and of frame writing (masked frames, RFC 6455 §5.3).

use arcgate::protocol::codec::OP_CLOSE;

use crate::util::Rng;

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The upgrade request for `path` (with a fresh random key).
pub fn upgrade_request(host: &str, path: &str, rng: &mut Rng) -> Vec<u8> {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    key[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: arcgate-load\r\n\r\n",
        base64(&key)
    )
    .into_bytes()
}

/// What the gateway answered to the upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// More bytes are needed.
    Partial,
    /// `101`: the WebSocket starts after `head_len` bytes.
    Switched { head_len: usize },
    /// Any other status, with `Retry-After` in seconds when present.
    Refused {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Not an HTTP response.
    Garbage,
}

/// Longest response head accepted.
pub const MAX_HEAD: usize = 8192;

/// Parses the response head in `buf`.
pub fn parse_upgrade(buf: &[u8]) -> Upgrade {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD || (buf.len() >= 5 && !buf.starts_with(b"HTTP/")) {
            Upgrade::Garbage
        } else {
            Upgrade::Partial
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Upgrade::Garbage;
    };
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return Upgrade::Garbage;
    };
    if status == 101 {
        return Upgrade::Switched { head_len: end + 4 };
    }
    let retry_after = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, v)| v.trim().parse::<u64>().ok());
    Upgrade::Refused {
        status,
        retry_after,
    }
}

/// Appends one masked client frame (FIN set) carrying `payload`.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    arcgate::protocol::codec::push_client_frame(out, true, opcode, payload, mask);
}

/// Appends a masked close frame with `code`.
pub fn push_close(out: &mut Vec<u8>, code: u16, mask: [u8; 4]) {
    push_frame(out, OP_CLOSE, &code.to_be_bytes(), mask);
}

#[cfg(test)]
mod tests {
    use super::*;
    use arcgate::protocol::codec::{client_frame, Decoder, Flow, Message, OP_TEXT};

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn frames_match_the_project_encoder_and_decode() {
        for n in [0usize, 125, 126, 65_535, 65_536] {
            let payload = vec![b'a'; n];
            let mut out = Vec::new();
            push_frame(&mut out, OP_TEXT, &payload, [1, 2, 3, 4]);
            assert_eq!(out, client_frame(true, OP_TEXT, &payload, [1, 2, 3, 4]));
            let mut d = Decoder::new(1 << 20);
            let mut got = 0;
            d.decode(&mut out, |m| {
                assert!(matches!(m, Message::Text(t) if t.len() == n));
                got += 1;
                Flow::Continue
            })
            .unwrap();
            assert_eq!(got, 1);
        }
    }

    #[test]
    fn upgrade_answers() {
        assert_eq!(parse_upgrade(b"HTTP/1.1 101 Swi"), Upgrade::Partial);
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00";
        assert_eq!(
            parse_upgrade(ok),
            Upgrade::Switched {
                head_len: ok.len() - 2
            }
        );
        assert_eq!(
            parse_upgrade(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 3\r\n\r\n"),
            Upgrade::Refused {
                status: 503,
                retry_after: Some(3)
            }
        );
        assert_eq!(
            parse_upgrade(b"HTTP/1.1 404 Not Found\r\n\r\n"),
            Upgrade::Refused {
                status: 404,
                retry_after: None
            }
        );
        assert_eq!(parse_upgrade(b"SSH-2.0-x\r\n"), Upgrade::Garbage);
    }

    #[test]
    fn request_names_path_host_and_a_valid_key() {
        let req = String::from_utf8(upgrade_request("h:1", "/ws/agent", &mut Rng::new(3))).unwrap();
        assert!(req.starts_with("GET /ws/agent HTTP/1.1\r\nHost: h:1\r\n"));
        let key = req
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        assert_eq!(key.len(), 24);
        assert!(req.ends_with("\r\n\r\n"));
    }
}
