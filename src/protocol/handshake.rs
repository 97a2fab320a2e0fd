//! HTTP/1.1 upgrade requests (httparse) to WebSocket handshake responses or HTTP error answers.

use bytes::Bytes;

/// Most request headers accepted; more get 431.
pub const MAX_HEADERS: usize = 64;

/// What the gateway accepts.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Request paths that may be upgraded (the query string is ignored); the index of the
    /// matching one is returned as `route`.
    pub paths: Vec<String>,
    /// If set, an upgrade whose `Origin` header is present and not one of these
    /// (`scheme://host[:port]`, compared case-insensitively) gets 403.
    pub allowed_origins: Option<Vec<String>>,
    /// Largest request head accepted; a larger one gets 431.
    pub max_header_bytes: usize,
}

/// The result of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request head is not complete yet.
    Partial,
    /// A valid upgrade for `policy.paths[route]`: queue `response` (101 Switching Protocols),
    /// then speak WebSocket. The first `consumed` bytes of the input were the request;
    /// anything after them already belongs to the WebSocket stream.
    Upgrade {
        route: usize,
        response: Bytes,
        consumed: usize,
    },
    /// Answer `response` (a complete HTTP response with `Connection: close`) and close.
    /// 400 malformed, 403 origin, 404 unknown path, 405 not GET, 426 not an upgrade or
    /// wrong `Sec-WebSocket-Version`, 431 head too large.
    Reject { status: u16, response: Bytes },
}

/// Parses the request head in `buf` (everything received so far).
pub fn parse(buf: &[u8], policy: &Policy) -> Outcome {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > policy.max_header_bytes => {
            reject(431, &too_large(policy), &[])
        }
        Ok(httparse::Status::Complete(len)) => match check(&req, policy) {
            Ok(route) => upgrade(&req, route, len),
            Err(outcome) => outcome,
        },
        Ok(httparse::Status::Partial) if buf.len() > policy.max_header_bytes => {
            reject(431, &too_large(policy), &[])
        }
        Ok(httparse::Status::Partial) => Outcome::Partial,
        Err(httparse::Error::TooManyHeaders) => reject(
            431,
            &format!("more than {MAX_HEADERS} request headers; send fewer headers"),
            &[],
        ),
        Err(e) => reject(
            400,
            &format!("malformed HTTP request ({e}); {}", usage(policy)),
            &[],
        ),
    }
}

/// The headers of an upgrade request that matter, gathered in one pass.
#[derive(Default)]
struct UpgradeHeaders<'a> {
    upgrade_websocket: bool,
    connection_upgrade: bool,
    version_seen: bool,
    version_13: bool,
    keys: usize,
    key: &'a [u8],
    origin_denied: bool,
}

impl<'a> UpgradeHeaders<'a> {
    fn gather(headers: &[httparse::Header<'a>], allowed_origins: Option<&[String]>) -> Self {
        let mut up = UpgradeHeaders {
            version_13: true,
            ..UpgradeHeaders::default()
        };
        for h in headers {
            let value = h.value.trim_ascii();
            if h.name.eq_ignore_ascii_case("upgrade") {
                up.upgrade_websocket |= has_token(value, b"websocket");
            } else if h.name.eq_ignore_ascii_case("connection") {
                up.connection_upgrade |= has_token(value, b"upgrade");
            } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
                up.version_seen = true;
                up.version_13 &= value == b"13";
            } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
                up.keys += 1;
                up.key = value;
            } else if h.name.eq_ignore_ascii_case("origin") {
                if let Some(allowed) = allowed_origins {
                    up.origin_denied |= !allowed
                        .iter()
                        .any(|o| value.eq_ignore_ascii_case(o.as_bytes()));
                }
            }
        }
        up
    }
}

/// Checks a complete request head; returns the route or the rejection.
fn check(req: &httparse::Request<'_, '_>, policy: &Policy) -> Result<usize, Outcome> {
    let target = req.path.unwrap_or_default();
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let Some(route) = policy.paths.iter().position(|p| p == path) else {
        return Err(reject(
            404,
            &format!("unknown path; {}", usage(policy)),
            &[],
        ));
    };
    if req.method != Some("GET") {
        let message = format!("method not allowed; {}", usage(policy));
        return Err(reject(405, &message, &[("Allow", "GET")]));
    }
    if req.version != Some(1) {
        let message = format!("a WebSocket upgrade needs HTTP/1.1; {}", usage(policy));
        return Err(reject(400, &message, &[]));
    }
    let up = UpgradeHeaders::gather(req.headers, policy.allowed_origins.as_deref());
    if !up.upgrade_websocket || !up.connection_upgrade {
        let message = format!(
            "this endpoint speaks WebSocket only: send `Upgrade: websocket` and \
             `Connection: Upgrade` headers; {}",
            usage(policy)
        );
        return Err(reject(426, &message, &[("Upgrade", "websocket")]));
    }
    if !up.version_seen || !up.version_13 {
        return Err(reject(
            426,
            "unsupported WebSocket version: send `Sec-WebSocket-Version: 13` (RFC 6455)",
            &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
        ));
    }
    if up.keys != 1 || !is_valid_key(up.key) {
        let message = "missing or invalid Sec-WebSocket-Key: send one header with the base64 \
                       of 16 random bytes (RFC 6455)";
        return Err(reject(400, message, &[]));
    }
    if up.origin_denied {
        let message = "origin not allowed: connect from one of the gateway's allowed_origins";
        return Err(reject(403, message, &[]));
    }
    Ok(route)
}

/// The 101 answer to a checked request.
fn upgrade(req: &httparse::Request<'_, '_>, route: usize, consumed: usize) -> Outcome {
    let key = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        .map_or(&[][..], |h| h.value.trim_ascii());
    let accept = tungstenite::handshake::derive_accept_key(key);
    // Extensions and subprotocols are declined by leaving them out.
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    Outcome::Upgrade {
        route,
        response: Bytes::from(response),
        consumed,
    }
}

fn reject(status: u16, message: &str, extra_headers: &[(&str, &str)]) -> Outcome {
    Outcome::Reject {
        status,
        response: error_response(status, message, extra_headers),
    }
}

fn too_large(policy: &Policy) -> String {
    format!(
        "request head larger than {} bytes; send fewer or shorter headers",
        policy.max_header_bytes
    )
}

/// How to reach the gateway, e.g. "use GET /ws/agent or GET /ws/client with a WebSocket upgrade".
fn usage(policy: &Policy) -> String {
    let gets: Vec<String> = policy.paths.iter().map(|p| format!("GET {p}")).collect();
    let list = match gets.split_last() {
        None => return "no WebSocket path is configured".to_owned(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    };
    format!("use {list} with a WebSocket upgrade")
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether `key` is the canonical base64 of exactly 16 bytes: 22 characters and `==`,
/// the last character carrying no stray bits.
pub fn is_valid_key(key: &[u8]) -> bool {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextet = |c: u8| ALPHABET.iter().position(|&a| a == c);
    match key {
        [body @ .., last, b'=', b'='] if body.len() == 21 => {
            body.iter().all(|&c| sextet(c).is_some())
                && sextet(*last).is_some_and(|v| v & 0x0F == 0)
        }
        _ => false,
    }
}

/// The standard reason phrase of an HTTP status.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// The upper-snake code of an error status, for the `error` field of JSON error bodies.
pub fn error_code(status: u16) -> &'static str {
    match status {
        400 => "BAD_REQUEST",
        401 => "UNAUTHORIZED",
        403 => "FORBIDDEN",
        404 => "NOT_FOUND",
        405 => "METHOD_NOT_ALLOWED",
        408 => "REQUEST_TIMEOUT",
        411 => "LENGTH_REQUIRED",
        413 => "PAYLOAD_TOO_LARGE",
        422 => "UNPROCESSABLE_ENTITY",
        426 => "UPGRADE_REQUIRED",
        429 => "TOO_MANY_REQUESTS",
        431 => "HEADERS_TOO_LARGE",
        500 => "INTERNAL_ERROR",
        502 => "BAD_GATEWAY",
        503 => "UNAVAILABLE",
        504 => "TIMEOUT",
        _ => "ERROR",
    }
}

/// A complete HTTP error response: status line, `Content-Type: application/json`,
/// `Content-Length`, `Connection: close`, the extra headers, and a body
/// `{"error":"<REASON>","message":"<message>"}`.
pub fn error_response(status: u16, message: &str, extra_headers: &[(&str, &str)]) -> Bytes {
    use std::fmt::Write;
    let message = serde_json::Value::String(message.to_owned());
    let body = format!(
        r#"{{"error":"{}","message":{message}}}"#,
        error_code(status)
    );
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        reason_phrase(status),
        body.len()
    );
    for (name, value) in extra_headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Bytes::from(out)
}

/// `503 Service Unavailable` with `Retry-After: <secs>`.
pub fn service_unavailable(retry_after_secs: u32, message: &str) -> Bytes {
    error_response(
        503,
        message,
        &[("Retry-After", &retry_after_secs.to_string())],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    // RFC 6455 §1.3 (independently: base64(sha1(key + GUID))).
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn policy() -> Policy {
        Policy {
            paths: vec!["/ws/agent".to_owned(), "/ws/client".to_owned()],
            allowed_origins: None,
            max_header_bytes: 8192,
        }
    }

    fn with_origins(origins: &[&str]) -> Policy {
        Policy {
            allowed_origins: Some(origins.iter().map(|o| o.to_string()).collect()),
            ..policy()
        }
    }

    /// A minimal valid upgrade request with `extra` header lines (each ending in CRLF).
    fn request(path: &str, extra: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: gw.example.com\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
             {extra}\r\n"
        )
    }

    /// A request built from explicit lines (request line and headers).
    fn raw(lines: &[&str]) -> String {
        let mut s = lines.join("\r\n");
        s.push_str("\r\n\r\n");
        s
    }

    fn status(outcome: &Outcome) -> u16 {
        match outcome {
            Outcome::Partial => 0,
            Outcome::Upgrade { .. } => 101,
            Outcome::Reject { status, .. } => *status,
        }
    }

    fn response_text(outcome: &Outcome) -> String {
        match outcome {
            Outcome::Upgrade { response, .. } | Outcome::Reject { response, .. } => {
                String::from_utf8(response.to_vec()).unwrap()
            }
            Outcome::Partial => String::new(),
        }
    }

    fn body(response: &str) -> serde_json::Value {
        let (_, body) = response.split_once("\r\n\r\n").unwrap();
        serde_json::from_str(body).unwrap()
    }

    fn expected_101() -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
        )
    }

    #[test]
    fn rfc_accept_key() {
        let req = request("/ws/agent", "");
        let outcome = parse(req.as_bytes(), &policy());
        assert_eq!(
            outcome,
            Outcome::Upgrade {
                route: 0,
                response: Bytes::from(expected_101()),
                consumed: req.len()
            }
        );
    }

    #[test]
    fn routes_by_path_ignoring_the_query() {
        let req = request("/ws/client?token=abc&x=1", "");
        match parse(req.as_bytes(), &policy()) {
            Outcome::Upgrade {
                route, consumed, ..
            } => assert_eq!((route, consumed), (1, req.len())),
            other => panic!("expected an upgrade, got {other:?}"),
        }
    }

    #[test]
    fn unknown_paths_are_404() {
        for path in [
            "/",
            "/ws",
            "/ws/agent/",
            "/ws/agentx",
            "/WS/AGENT",
            "/ws/client/../agent",
        ] {
            let outcome = parse(request(path, "").as_bytes(), &policy());
            assert_eq!(status(&outcome), 404, "{path}");
            let text = response_text(&outcome);
            assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
            let body = body(&text);
            assert_eq!(body["error"], "NOT_FOUND");
            assert_eq!(
                body["message"],
                "unknown path; use GET /ws/agent or GET /ws/client with a WebSocket upgrade"
            );
        }
        // An unknown path is 404 whatever the method.
        let post = raw(&["POST /elsewhere HTTP/1.1", "Host: x", "Content-Length: 0"]);
        assert_eq!(status(&parse(post.as_bytes(), &policy())), 404);
    }

    #[test]
    fn other_methods_are_405() {
        for method in ["POST", "PUT", "HEAD", "DELETE", "OPTIONS"] {
            let req = request("/ws/agent", "").replacen("GET", method, 1);
            let outcome = parse(req.as_bytes(), &policy());
            assert_eq!(status(&outcome), 405, "{method}");
            let text = response_text(&outcome);
            assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
            assert!(text.contains("\r\nAllow: GET\r\n"));
            assert_eq!(body(&text)["error"], "METHOD_NOT_ALLOWED");
        }
    }

    #[test]
    fn plain_requests_to_known_paths_are_426() {
        let cases = [
            raw(&["GET /ws/agent HTTP/1.1", "Host: x"]),
            raw(&[
                "GET /ws/agent HTTP/1.1",
                "Host: x",
                "Connection: Upgrade",
                "Sec-WebSocket-Version: 13",
            ]),
            raw(&[
                "GET /ws/agent HTTP/1.1",
                "Host: x",
                "Upgrade: websocket",
                "Connection: keep-alive",
            ]),
            raw(&[
                "GET /ws/agent HTTP/1.1",
                "Host: x",
                "Upgrade: h2c",
                "Connection: Upgrade",
            ]),
            raw(&[
                "GET /ws/client HTTP/1.1",
                "Host: x",
                "Upgrade: websockets",
                "Connection: upgraded",
            ]),
        ];
        for req in cases {
            let outcome = parse(req.as_bytes(), &policy());
            assert_eq!(status(&outcome), 426, "{req}");
            let text = response_text(&outcome);
            assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
            assert!(text.contains("\r\nUpgrade: websocket\r\n"));
            assert_eq!(body(&text)["error"], "UPGRADE_REQUIRED");
        }
    }

    #[test]
    fn upgrade_tokens_are_matched_case_insensitively_in_lists() {
        let req = raw(&[
            "GET /ws/agent HTTP/1.1",
            "Host: x",
            "Upgrade: WebSocket",
            "Connection: keep-alive, Upgrade",
            &format!("Sec-WebSocket-Key: {KEY}"),
            "Sec-WebSocket-Version: 13",
        ]);
        assert_eq!(status(&parse(req.as_bytes(), &policy())), 101);
        let req = request("/ws/agent", "")
            .replace("Connection: Upgrade", "connection: keep-alive,UPGRADE");
        assert_eq!(status(&parse(req.as_bytes(), &policy())), 101);
    }

    #[test]
    fn wrong_websocket_version_is_426() {
        for version in ["8", "12", "14", "13, 8", ""] {
            let req = request("/ws/agent", "").replace(
                "Sec-WebSocket-Version: 13\r\n",
                &format!("Sec-WebSocket-Version: {version}\r\n"),
            );
            let outcome = parse(req.as_bytes(), &policy());
            assert_eq!(status(&outcome), 426, "{version:?}");
            assert!(response_text(&outcome).contains("\r\nSec-WebSocket-Version: 13\r\n"));
        }
        let missing = request("/ws/agent", "").replace("Sec-WebSocket-Version: 13\r\n", "");
        assert_eq!(status(&parse(missing.as_bytes(), &policy())), 426);
    }

    #[test]
    fn missing_or_bad_key_is_400() {
        let missing =
            request("/ws/agent", "").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), "");
        let outcome = parse(missing.as_bytes(), &policy());
        assert_eq!(status(&outcome), 400);
        assert_eq!(body(&response_text(&outcome))["error"], "BAD_REQUEST");
        for key in [
            "",
            "dGhlIHNhbXBsZSBub25jZQ",       // padding missing
            "dGhlIHNhbXBsZSBub25jZQ==AAAA", // too long
            "dGhlIHNhbXBsZSBub25jZQ!!",     // not base64
            "dGhlIHNhbXBsZSBub25j*Q==",     // not base64
            "AAAAAAAAAAAAAAAAAAAAAAAA",     // 18 bytes
            "dGhlIHNhbXBsZSBub25jZR==",     // stray bits in the last character
            "dGhlIHNhbXBsZSBub25jZQ=",      // 17 characters of padding short
        ] {
            let req = request("/ws/agent", "").replace(KEY, key);
            assert_eq!(status(&parse(req.as_bytes(), &policy())), 400, "{key:?}");
        }
        let twice = request("/ws/agent", &format!("Sec-WebSocket-Key: {KEY}\r\n"));
        assert_eq!(status(&parse(twice.as_bytes(), &policy())), 400);
    }

    #[test]
    fn key_validation() {
        assert!(is_valid_key(KEY.as_bytes()));
        assert!(is_valid_key(b"AAAAAAAAAAAAAAAAAAAAAA=="));
        assert!(is_valid_key(b"+/+/+/+/+/+/+/+/+/+/+w=="));
        assert!(!is_valid_key(b"+/+/+/+/+/+/+/+/+/+/+x=="));
    }

    #[test]
    fn http_1_0_is_400() {
        let req = request("/ws/agent", "").replacen("HTTP/1.1", "HTTP/1.0", 1);
        let outcome = parse(req.as_bytes(), &policy());
        assert_eq!(status(&outcome), 400);
        assert!(body(&response_text(&outcome))["message"]
            .as_str()
            .unwrap()
            .contains("HTTP/1.1"));
    }

    #[test]
    fn malformed_requests_are_400() {
        for bad in [
            &b"\x00\x01\x02 garbage\r\n\r\n"[..],
            b"GET /ws/agent HTTP/2.0\r\n\r\n",
            b"GET /ws/agent HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"GET /ws/agent HTTP/1.1\r\nHost: a\x01b\r\n\r\n",
        ] {
            let outcome = parse(bad, &policy());
            assert_eq!(status(&outcome), 400, "{bad:?}");
            let text = response_text(&outcome);
            assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
            assert!(text.contains("\r\nConnection: close\r\n"));
        }
        // Garbage is rejected as soon as it is seen, not only at the end of a head.
        assert_eq!(status(&parse(b"\x16\x03\x01\x02\x00", &policy())), 400);
    }

    #[test]
    fn origin_rules() {
        let allowed = with_origins(&["https://panel.example.com", "http://localhost:3000"]);
        let with = |origin: &str| request("/ws/client", &format!("Origin: {origin}\r\n"));
        // Exact, case-insensitive match.
        for ok in [
            "https://panel.example.com",
            "HTTPS://Panel.Example.COM",
            "http://localhost:3000",
        ] {
            assert_eq!(status(&parse(with(ok).as_bytes(), &allowed)), 101, "{ok}");
        }
        for denied in [
            "https://evil.example.com",
            "https://panel.example.com.evil.com",
            "https://panel.example.com:443",
            "http://panel.example.com",
            "http://localhost:3001",
            "null",
            "",
        ] {
            let outcome = parse(with(denied).as_bytes(), &allowed);
            assert_eq!(status(&outcome), 403, "{denied:?}");
            assert_eq!(body(&response_text(&outcome))["error"], "FORBIDDEN");
        }
        // Agents send no Origin: unaffected.
        assert_eq!(
            status(&parse(request("/ws/agent", "").as_bytes(), &allowed)),
            101
        );
        // Without a configured list, any origin is accepted.
        let evil = with("https://evil.example.com");
        assert_eq!(status(&parse(evil.as_bytes(), &policy())), 101);
        // Every Origin header must be allowed.
        let two = request(
            "/ws/client",
            "Origin: https://panel.example.com\r\nOrigin: https://evil.example.com\r\n",
        );
        assert_eq!(status(&parse(two.as_bytes(), &allowed)), 403);
    }

    #[test]
    fn head_split_at_every_offset_is_partial_until_complete() {
        let req = request("/ws/agent", "User-Agent: agent/0.4.18\r\n");
        for end in 0..req.len() {
            assert_eq!(
                parse(&req.as_bytes()[..end], &policy()),
                Outcome::Partial,
                "prefix {end}"
            );
        }
        assert_eq!(status(&parse(req.as_bytes(), &policy())), 101);
    }

    #[test]
    fn pipelined_bytes_after_the_head_are_left_for_the_websocket_stream() {
        let req = request("/ws/agent", "");
        let frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut bytes = req.clone().into_bytes();
        bytes.extend_from_slice(&frame);
        match parse(&bytes, &policy()) {
            Outcome::Upgrade {
                consumed, response, ..
            } => {
                assert_eq!(consumed, req.len());
                assert_eq!(&bytes[consumed..], &frame);
                assert_eq!(response, Bytes::from(expected_101()));
            }
            other => panic!("expected an upgrade, got {other:?}"),
        }
    }

    #[test]
    fn browser_request_with_extension_and_subprotocol_offers() {
        let req = raw(&[
            "GET /ws/client?v=1 HTTP/1.1",
            "Host: gw.example.com",
            "Connection: Upgrade",
            "Pragma: no-cache",
            "Cache-Control: no-cache",
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
            "Upgrade: websocket",
            "Origin: https://panel.example.com",
            "Sec-WebSocket-Version: 13",
            "Accept-Encoding: gzip, deflate, br, zstd",
            "Accept-Language: en-US,en;q=0.9",
            "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
            "Sec-WebSocket-Protocol: chat, superchat",
        ]);
        let outcome = parse(
            req.as_bytes(),
            &with_origins(&["https://panel.example.com"]),
        );
        let text = response_text(&outcome);
        assert_eq!(status(&outcome), 101);
        assert_eq!(
            text,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: HSmrc0sMlYUkAGmm5OPpG2HaGWk=\r\n\r\n"
        );
        assert!(!text.to_ascii_lowercase().contains("extensions"));
        assert!(!text.to_ascii_lowercase().contains("protocol:"));
    }

    #[test]
    fn too_many_headers_is_431() {
        let base = [
            "GET /ws/agent HTTP/1.1",
            "Host: x",
            "Upgrade: websocket",
            "Connection: Upgrade",
        ];
        let key = format!("Sec-WebSocket-Key: {KEY}");
        let mut lines: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        lines.push(key);
        lines.push("Sec-WebSocket-Version: 13".to_owned());
        // 5 headers so far: fill up to exactly the limit, then one more.
        for i in 0..(MAX_HEADERS - 5) {
            lines.push(format!("X-Filler-{i}: {i}"));
        }
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert_eq!(status(&parse(raw(&refs).as_bytes(), &policy())), 101);
        lines.push("X-One-Too-Many: 1".to_owned());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let outcome = parse(raw(&refs).as_bytes(), &policy());
        assert_eq!(status(&outcome), 431);
        let text = response_text(&outcome);
        assert!(text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert_eq!(body(&text)["error"], "HEADERS_TOO_LARGE");
    }

    #[test]
    fn oversized_heads_are_431() {
        let small = Policy {
            max_header_bytes: 200,
            ..policy()
        };
        let req = request("/ws/agent", &format!("X-Big: {}\r\n", "a".repeat(150)));
        assert!(req.len() > 200);
        // Complete but too large.
        assert_eq!(status(&parse(req.as_bytes(), &small)), 431);
        // Incomplete and already too large.
        assert_eq!(status(&parse(&req.as_bytes()[..201], &small)), 431);
        // Incomplete and within the limit: wait for more.
        assert_eq!(parse(&req.as_bytes()[..200], &small), Outcome::Partial);
        // A head within the limit followed by pipelined bytes beyond it is fine.
        let exact = Policy {
            max_header_bytes: request("/ws/agent", "").len(),
            ..policy()
        };
        let mut bytes = request("/ws/agent", "").into_bytes();
        bytes.extend_from_slice(&[0x81; 64]);
        assert_eq!(status(&parse(&bytes, &exact)), 101);
    }

    #[test]
    fn error_response_format() {
        let out = error_response(403, "say \"hi\"\n\\", &[("X-A", "1"), ("X-B", "two")]);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let body = r#"{"error":"FORBIDDEN","message":"say \"hi\"\n\\"}"#;
        assert_eq!(
            text,
            format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\nX-A: 1\r\nX-B: two\r\n\r\n{body}",
                body.len()
            )
        );
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(parsed["message"], "say \"hi\"\n\\");
    }

    #[test]
    fn error_codes_and_phrases() {
        for (status, phrase, code) in [
            (400, "Bad Request", "BAD_REQUEST"),
            (403, "Forbidden", "FORBIDDEN"),
            (404, "Not Found", "NOT_FOUND"),
            (405, "Method Not Allowed", "METHOD_NOT_ALLOWED"),
            (411, "Length Required", "LENGTH_REQUIRED"),
            (426, "Upgrade Required", "UPGRADE_REQUIRED"),
            (431, "Request Header Fields Too Large", "HEADERS_TOO_LARGE"),
            (502, "Bad Gateway", "BAD_GATEWAY"),
            (503, "Service Unavailable", "UNAVAILABLE"),
        ] {
            assert_eq!((reason_phrase(status), error_code(status)), (phrase, code));
            let text = String::from_utf8(error_response(status, "m", &[]).to_vec()).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} {phrase}\r\n")));
            assert_eq!(body(&text)["error"], code);
        }
    }

    #[test]
    fn service_unavailable_has_retry_after() {
        let text = String::from_utf8(service_unavailable(7, "over capacity").to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("\r\nRetry-After: 7\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert_eq!(body(&text)["error"], "UNAVAILABLE");
        assert_eq!(body(&text)["message"], "over capacity");
    }

    #[test]
    fn content_length_matches_the_body() {
        let out = error_response(404, "caf\u{e9} \u{263a}", &[]);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let declared = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse::<usize>()
            .unwrap();
        assert_eq!(declared, body.len());
    }
}
