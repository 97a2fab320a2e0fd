//! The little HTTP/1.1 the admin listener speaks: request heads parsed with httparse,
//! bodies by `Content-Length`, keep-alive, and responses with JSON error bodies.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::protocol::handshake;

/// Largest request head.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Time a request may take to arrive once its first byte did.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// One request, head and body read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// What follows `?` in the target ("" without one).
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response about to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response::new(status, "application/json", body)
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body)
    }

    /// No body (202, 204).
    pub fn empty(status: u16) -> Response {
        Response::new(status, "", Vec::new())
    }

    /// `{"error": CODE, "message": "…"}`.
    pub fn error(status: u16, message: &str) -> Response {
        let body = serde_json::json!({"error": handshake::error_code(status), "message": message});
        Response::json(status, body.to_string())
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire; `head_only` for HEAD requests.
    pub fn to_bytes(&self, keep_alive: bool, head_only: bool) -> Vec<u8> {
        use std::fmt::Write as _;
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            self.status,
            handshake::reason_phrase(self.status)
        );
        if !self.content_type.is_empty() {
            let _ = write!(head, "Content-Type: {}\r\n", self.content_type);
        }
        if self.status != 204 {
            let _ = write!(head, "Content-Length: {}\r\n", self.body.len());
        }
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        head.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        let mut out = head.into_bytes();
        if !head_only && self.status != 204 {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// What reading a request gave.
#[derive(Debug)]
pub enum Incoming {
    Request(Request),
    /// The peer closed (or stayed silent) before a request began.
    Closed,
    /// The request cannot be served: answer this and close.
    Invalid(Response),
}

/// Reads requests from one connection, keeping bytes that arrived after a request.
pub struct Reader {
    buf: Vec<u8>,
    /// `100 Continue` was sent for the request being read.
    continued: bool,
}

impl Default for Reader {
    fn default() -> Self {
        Reader::new()
    }
}

impl Reader {
    pub fn new() -> Reader {
        Reader {
            buf: Vec::with_capacity(1024),
            continued: false,
        }
    }

    /// The next request. `idle` bounds the wait for its first byte; once it began, the
    /// whole request must arrive within 10 s.
    pub fn next(&mut self, stream: &mut TcpStream, idle: Duration) -> io::Result<Incoming> {
        let mut deadline: Option<Instant> = None;
        loop {
            if !self.buf.is_empty() && deadline.is_none() {
                deadline = Some(Instant::now() + REQUEST_DEADLINE);
            }
            match self.parse() {
                Parsed::Done(r) => {
                    self.continued = false;
                    return Ok(r);
                }
                Parsed::NeedMore => {}
                Parsed::NeedBody { expects_continue } => {
                    // A client that sent `Expect: 100-continue` waits for this before the body.
                    if expects_continue && !self.continued {
                        self.continued = true;
                        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
                        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                    }
                }
            }
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => idle,
            };
            if wait.is_zero() {
                return Ok(Incoming::Invalid(Response::error(
                    408,
                    "the request did not arrive in time",
                )));
            }
            stream.set_read_timeout(Some(wait))?;
            let mut chunk = [0u8; 8192];
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if deadline.is_none() {
                        return Ok(Incoming::Closed);
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(Incoming::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn parse(&mut self) -> Parsed {
        if self.buf.is_empty() {
            return Parsed::NeedMore;
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return too_large_head(),
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => return too_large_head(),
            Ok(httparse::Status::Partial) => return Parsed::NeedMore,
            Err(httparse::Error::TooManyHeaders) => {
                return invalid(431, "more than 64 request headers")
            }
            Err(_) => return invalid(400, "malformed HTTP request"),
        };
        let method = req.method.unwrap_or("").to_string();
        let path = req.path.unwrap_or("");
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let (path, query) = (path.to_string(), query.to_string());
        let version = req.version.unwrap_or(1);
        let headers: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).trim().to_string(),
                )
            })
            .collect();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        if find("transfer-encoding").is_some() {
            return invalid(411, "chunked bodies are not supported; send Content-Length");
        }
        let body_len = match find("content-length").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(n)) if n <= MAX_BODY => n,
            Some(Ok(_)) => return invalid(413, "request body larger than 64 KiB"),
            Some(Err(_)) => return invalid(400, "invalid Content-Length"),
        };
        if self.buf.len() < head_len + body_len {
            let expects_continue =
                find("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
            return Parsed::NeedBody { expects_continue };
        }
        let connection = find("connection").map(str::to_ascii_lowercase);
        let keep_alive = match version {
            0 => connection.as_deref() == Some("keep-alive"),
            _ => connection.as_deref() != Some("close"),
        };
        let body = self.buf[head_len..head_len + body_len].to_vec();
        self.buf.drain(..head_len + body_len);
        Parsed::Done(Incoming::Request(Request {
            method,
            path,
            query,
            headers,
            body,
            keep_alive,
        }))
    }
}

enum Parsed {
    Done(Incoming),
    /// The head is not complete.
    NeedMore,
    /// The head is complete, the body is not.
    NeedBody {
        expects_continue: bool,
    },
}

fn invalid(status: u16, message: &str) -> Parsed {
    Parsed::Done(Incoming::Invalid(Response::error(status, message)))
}

fn too_large_head() -> Parsed {
    invalid(431, "request head larger than 16 KiB")
}

/// Writes `response` within a few seconds (a peer that does not read is dropped).
pub fn write(
    stream: &mut TcpStream,
    response: &Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&response.to_bytes(keep_alive, head_only))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_raw(bytes: &[u8]) -> Parsed {
        let mut r = Reader::new();
        r.buf.extend_from_slice(bytes);
        r.parse()
    }

    fn parse(bytes: &[u8]) -> Option<Incoming> {
        match parse_raw(bytes) {
            Parsed::Done(x) => Some(x),
            Parsed::NeedMore | Parsed::NeedBody { .. } => None,
        }
    }

    fn request(bytes: &[u8]) -> Request {
        match parse(bytes) {
            Some(Incoming::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    fn refusal(bytes: &[u8]) -> u16 {
        match parse(bytes) {
            Some(Incoming::Invalid(r)) => r.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_with_and_without_bodies() {
        let r = request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/metrics"));
        assert!(r.keep_alive && r.body.is_empty());
        let r = request(b"POST /v1/x HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
        assert_eq!(r.body, b"{}");
        assert!(!r.keep_alive);
        assert_eq!(r.header("content-length"), Some("2"));
        let r = request(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive);
        assert!(parse(b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}").is_none());
        assert!(parse(b"GET / HTTP/1.1\r\nHost").is_none());
        let waiting =
            parse_raw(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
        assert!(matches!(
            waiting,
            Parsed::NeedBody {
                expects_continue: true
            }
        ));
    }

    #[test]
    fn a_pipelined_request_stays_for_the_next_read() {
        let mut r = Reader::new();
        r.buf
            .extend_from_slice(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        let paths: Vec<String> = (0..2)
            .map(|_| match r.parse() {
                Parsed::Done(Incoming::Request(req)) => req.path,
                _ => panic!("no request"),
            })
            .collect();
        assert_eq!(paths, ["/a", "/b"]);
        assert!(r.buf.is_empty());
    }

    #[test]
    fn refusals() {
        assert_eq!(refusal(b"\x00\x01 nonsense\r\n\r\n"), 400);
        assert_eq!(
            refusal(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            400
        );
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(refusal(big.as_bytes()), 413);
        assert_eq!(
            refusal(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(refusal(long.as_bytes()), 431);
        let many: String = (0..70).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            refusal(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let r = Response::error(404, "no such route").to_bytes(false, false);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "NOT_FOUND", "message": "no such route"})
        );
        let empty = String::from_utf8(Response::empty(204).to_bytes(true, false)).unwrap();
        assert_eq!(
            empty,
            "HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
        );
        let head = Response::text(200, "ok\n").to_bytes(false, true);
        assert!(String::from_utf8(head)
            .unwrap()
            .ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"));
    }
}
