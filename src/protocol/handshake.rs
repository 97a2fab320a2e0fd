//! HTTP/1.1 upgrade requests (httparse) to WebSocket handshake responses or HTTP error answers.

use bytes::Bytes;

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
    let _ = (buf, policy);
    unimplemented!()
}

/// A complete HTTP error response: status line, `Content-Type: application/json`,
/// `Content-Length`, `Connection: close`, the extra headers, and a body
/// `{"error":"<REASON>","message":"<message>"}`.
pub fn error_response(status: u16, message: &str, extra_headers: &[(&str, &str)]) -> Bytes {
    let _ = (status, message, extra_headers);
    unimplemented!()
}

/// `503 Service Unavailable` with `Retry-After: <secs>`.
pub fn service_unavailable(retry_after_secs: u32, message: &str) -> Bytes {
    error_response(
        503,
        message,
        &[("Retry-After", &retry_after_secs.to_string())],
    )
}
