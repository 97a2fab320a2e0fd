//! The status page and its JSON document (PROTOCOL.md section 9, v1.1): the figures of a
//! known load over HTTP, and the page itself in a real headless Chromium.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

both_backends!(status_document_counts_a_known_load);

/// Polls `/v1/status` (without a token) until `ready` holds; returns the last document.
async fn status_until(gw: &Gateway, query: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = gw
            .admin_request("GET", &format!("/v1/status{query}"), None, None)
            .await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let doc = resp.json();
        if ready(&doc) || std::time::Instant::now() >= deadline {
            return doc;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status_document_counts_a_known_load(io: &'static str) {
    let gw = Gateway::start(io, &[]).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(gw.agent(&format!("mch_{i}"), "clu_a").await);
    }
    let _users = [
        gw.user("usr_1", &["clu_a"]).await,
        gw.user("usr_2", &["clu_a"]).await,
    ];
    for _ in 0..5 {
        agents[0]
            .send(json!({"event": "heartbeat", "data": {"cpu": 1}}))
            .await;
    }
    // One command answered by its agent.
    let token = service_token("panel");
    let command = gw.admin_request(
        "POST",
        "/v1/machines/mch_1/commands",
        Some(&token),
        Some(r#"{"type":"server:start","serverId":"srv_1"}"#),
    );
    let answer = async {
        let cmd = agents[1].recv_event("command").await;
        let id = cmd["data"]["id"].clone();
        agents[1]
            .send(json!({"event": "command:response", "data": {"id": id, "success": true, "result": {}}}))
            .await;
    };
    let (resp, ()) = tokio::join!(command, answer);
    assert_eq!(resp.status, 200, "{resp:?}");

    // Two readings of the sampler at least, so that the history has points.
    let doc = status_until(&gw, "", |d| {
        d["totals"]["messages_in"].as_u64() >= Some(3 + 2 + 5 + 1)
            && d["history"]["t"].as_array().is_some_and(|t| t.len() >= 2)
    })
    .await;
    let conns = &doc["connections"];
    assert_eq!(
        (&conns["agent"], &conns["user"], &conns["service"]),
        (&json!(3), &json!(2), &json!(0)),
        "{doc}"
    );
    assert_eq!(conns["total"], 5, "{doc}");
    assert_eq!(conns["tcp"], 5, "{doc}");
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    let backend = if io == "uring" { "io_uring" } else { "epoll" };
    assert_eq!(doc["io_backend"], backend, "{doc}");
    assert_eq!(doc["workers"], 2);
    assert_eq!(
        doc["worker_busy"].as_array().map(Vec::len),
        Some(2),
        "{doc}"
    );
    assert!(doc["uptime_s"].as_f64().unwrap() >= 0.0);
    // 3 + 2 auths, 5 heartbeats, 1 command response.
    assert_eq!(doc["totals"]["messages_in"], 11, "{doc}");
    assert_eq!(doc["totals"]["connects"], 5, "{doc}");
    assert_eq!(doc["commands"]["outcomes"]["answered"], 1, "{doc}");
    assert_eq!(doc["commands"]["count"], 1, "{doc}");
    assert!(doc["commands"]["p50_ms"].as_f64().unwrap() > 0.0, "{doc}");
    assert!(doc["commands"]["p99_ms"].as_f64().is_some(), "{doc}");
    assert_eq!(doc["totals"]["slow_consumer_closes"], 0);
    assert_eq!(doc["totals"]["rate_limited"], 0);
    assert_eq!(doc["tls"], json!({"mode": "off", "cert_expiry": null}));
    assert_eq!(doc["bus"], json!({"state": "off"}));
    assert_eq!(doc["nodes"].as_array().map(Vec::len), Some(1), "{doc}");
    assert_eq!(doc["nodes"][0]["id"], doc["node"]["id"]);
    assert_eq!(doc["nodes"][0]["state"], "up");
    let history = &doc["history"];
    let len = history["t"].as_array().unwrap().len();
    for key in [
        "connections",
        "connects",
        "closes",
        "messages_in",
        "messages_out",
        "busy",
    ] {
        assert_eq!(history[key].as_array().map(Vec::len), Some(len), "{key}");
    }

    // A close is counted by its code, and the history can be cut short.
    agents.pop().unwrap().close().await;
    let doc = status_until(&gw, "?history=1", |d| d["totals"]["closes"]["1000"] == 1).await;
    assert_eq!(doc["totals"]["closes"]["1000"], 1, "{doc}");
    assert_eq!(doc["connections"]["agent"], 2, "{doc}");
    assert_eq!(doc["history"]["t"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn status_routes_answer_clearly() {
    let gw = Gateway::start("epoll", &[]).await;
    let page = gw.admin_request("GET", "/status", None, None).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let text = String::from_utf8(page.body).unwrap();
    assert!(
        text.contains("/v1/status") && text.contains("<svg"),
        "{text}"
    );
    let post = gw.admin_request("POST", "/status", None, Some("{}")).await;
    post.assert_error(405, "METHOD_NOT_ALLOWED");
    let post = gw
        .admin_request("POST", "/v1/status", None, Some("{}"))
        .await;
    post.assert_error(405, "METHOD_NOT_ALLOWED");
    let bad = gw
        .admin_request("GET", "/v1/status?history=soon", None, None)
        .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.json()["message"].as_str().unwrap().contains("history"));
    // The rest of /v1 still wants its token.
    let machines = gw.admin_request("GET", "/v1/machines", None, None).await;
    assert_eq!(machines.status, 401);
}

// ---------------------------------------------------------------------------------------------
// The page in a real browser
// ---------------------------------------------------------------------------------------------

/// Debian's `chromium`, or `ARCGATE_CHROMIUM`. Missing: fails under CI, skips loudly elsewhere.
fn chromium() -> Option<PathBuf> {
    let candidate = std::env::var_os("ARCGATE_CHROMIUM").unwrap_or_else(|| "chromium".into());
    let found = std::process::Command::new(&candidate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(candidate.into());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("chromium is not installed (apt-get install chromium); CI must run the status page test");
    }
    eprintln!("SKIPPED: chromium is not installed (apt-get install chromium); the status page was not tested in a browser");
    None
}

/// Runs headless Chromium on `url` with `args` (e.g. --dump-dom); returns its stdout.
async fn run_chromium(browser: &Path, url: &str, args: &[&str]) -> String {
    let profile = std::env::temp_dir().join(format!(
        "arcgate-chromium-{}-{}",
        std::process::id(),
        now_ms()
    ));
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        // Virtual time runs the page's one-second timer without waiting for it in real time;
        // every fetch still reaches the gateway.
        "--virtual-time-budget=3500",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium did not finish within 90 s")
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in a serialized DOM.
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    rest[start..end].trim().to_string()
}

#[tokio::test]
async fn status_page_shows_a_known_load_in_chromium() {
    let Some(browser) = chromium() else { return };
    let gw = Gateway::start("uring", &[]).await;
    let mut agents = Vec::new();
    for i in 0..4 {
        agents.push(gw.agent(&format!("mch_{i}"), "clu_a").await);
    }
    let _users = [
        gw.user("usr_1", &["clu_a"]).await,
        gw.user("usr_2", &["clu_a"]).await,
        gw.user("usr_3", &["clu_a"]).await,
    ];
    let url = format!("http://{}/status", gw.admin);
    // The page's plots draw the gateway's per-second readings: wait for its first two
    // (Chromium's virtual time runs the page's own refreshes faster than real seconds).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = gw.admin_get("/v1/status").await.json();
        let points = status["history"]["t"].as_array().map_or(0, Vec::len);
        if points >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no readings: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let first = run_chromium(&browser, &url, &["--dump-dom"]).await;
    assert_eq!(text_of(&first, "conn-agent"), "4", "{first}");
    assert_eq!(text_of(&first, "conn-user"), "3");
    assert_eq!(text_of(&first, "conn-total"), "7");
    assert_eq!(text_of(&first, "version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(text_of(&first, "io_backend"), "io_uring");
    assert_eq!(text_of(&first, "state"), "live");
    assert_eq!(text_of(&first, "tls"), "off");
    assert!(first.contains("id=\"busy-1\""), "one bar per worker");
    // It refreshed itself more than once within the page's life.
    let refreshes: u32 = text_of(&first, "refreshes").parse().unwrap();
    assert!(refreshes >= 2, "{refreshes} readings");
    assert!(first.contains("<path d=\"M"), "plots are drawn");

    // A later reading shows the change in load and a later uptime.
    agents.pop().unwrap().close().await;
    agents.pop().unwrap().close().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = run_chromium(&browser, &url, &["--dump-dom"]).await;
    assert_eq!(text_of(&second, "conn-agent"), "2", "{second}");
    assert_eq!(text_of(&second, "conn-total"), "5");
    assert!(second.contains(">close 1000<"), "{second}");
    assert_ne!(text_of(&first, "uptime"), text_of(&second, "uptime"));

    // The screenshot is kept for a person to look at.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("status.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        &browser,
        &url,
        &[&format!("--screenshot={}", png.display())],
    )
    .await;
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000);
    eprintln!("screenshot: {}", png.display());
}
