//! A real gateway process for the scenario tests, and a way to run arcgate-load against it.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arcgate::auth::{mint_hs256, TokenSpec};
use serde_json::Value;

pub const SECRET: &str = "load-test-secret-0123456789abcdef";

/// The `arcgate` binary next to `arcgate-load` (same target directory and profile),
/// brought up to date with cargo once per test process.
pub fn gateway_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let load = PathBuf::from(env!("CARGO_BIN_EXE_arcgate-load"));
        let dir = load.parent().expect("the binary's directory").to_path_buf();
        let bin = dir.join("arcgate");
        let target = dir.parent().expect("the target directory");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "arcgate", "--bin", "arcgate"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .env("CARGO_TARGET_DIR", target);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let built = cmd.status().map(|s| s.success()).unwrap_or(false);
        assert!(
            built || bin.exists(),
            "cannot build the gateway binary at {}",
            bin.display()
        );
        bin
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A gateway process, killed on drop.
pub struct Gateway {
    pub child: Child,
    pub port: u16,
    pub admin: u16,
    pub args: Vec<String>,
}

impl Gateway {
    /// Starts `arcgate serve` with the test secret, one worker and `extra` flags.
    pub fn start(extra: &[&str]) -> Gateway {
        let port = free_port();
        let admin = free_port();
        let mut args: Vec<String> = [
            "serve",
            "--jwt-secret",
            SECRET,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--workers",
            "1",
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = spawn_gateway(&args);
        wait_listening(port);
        Gateway {
            child,
            port,
            admin,
            args,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET path` on the admin listener with a service token: the status and the body.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock")
            .as_secs();
        let spec = TokenSpec {
            role: "service".into(),
            sub: "load-tests".into(),
            ttl: Duration::from_secs(600),
            ..TokenSpec::default()
        };
        let token = mint_hs256(SECRET, &spec, now);
        let mut s = TcpStream::connect(("127.0.0.1", self.admin)).expect("the admin listener");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: arcgate\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text)
            .expect("an answer from the admin listener");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, body.to_string())
    }

    /// A value of the gateway's `/metrics`, e.g. `arcgate_connections{role="agent"}`.
    pub fn metric(&self, series: &str) -> f64 {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Authenticated connections per role: (agents, users, services).
    pub fn connections(&self) -> (u64, u64, u64) {
        let role = |r: &str| self.metric(&format!("arcgate_connections{{role=\"{r}\"}}")) as u64;
        (role("agent"), role("user"), role("service"))
    }

    /// The machine ids `GET /v1/machines` lists.
    pub fn machines(&self) -> Vec<String> {
        let (status, body) = self.admin_get("/v1/machines");
        assert_eq!(status, 200, "/v1/machines: {body}");
        let list: Vec<Value> = serde_json::from_str(&body).expect("a JSON list of machines");
        list.iter()
            .map(|m| m["machineId"].as_str().expect("a machineId").to_string())
            .collect()
    }
}

/// Polls `probe` until `done` holds for what it returns; panics after 30 s with the last value.
pub fn wait_for<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = probe();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: still {v:?} after 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_gateway(args: &[String]) -> Child {
    Command::new(gateway_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway")
}

pub fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the gateway never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory for one test's files.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arcgate-load-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The outcome of one arcgate-load run.
pub struct Run {
    pub report: Value,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `arcgate-load <args> --url <url> --json <file> --quiet` and parses the report.
pub fn load(name: &str, url: &str, secret: &str, args: &[&str]) -> Run {
    let json = scratch(name).join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_arcgate-load"))
        .args(args)
        .args(["--url", url, "--secret", secret, "--quiet", "--json"])
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .expect("run arcgate-load");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "arcgate-load {args:?} failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report");
    let report = serde_json::from_str(&text).expect("the JSON report parses");
    if let Some(dir) = json.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    Run {
        report,
        stdout,
        stderr,
    }
}

/// A number at a JSON pointer, as u64 (panics with the pointer if absent).
pub fn n(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} is not an unsigned number in {v:#}"))
}

pub fn f(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} is not a number in {v:#}"))
}
