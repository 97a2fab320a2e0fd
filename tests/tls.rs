//! Protocol section 12 against the real binary: wss:// with a test certificate generated
//! at test time, reloads, and what a TLS port does with bytes that are not TLS.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

both_backends!(
    agent_and_user_relay_and_command_over_wss,
    non_tls_bytes_are_closed_and_the_gateway_carries_on,
    a_client_offering_only_h2_fails_the_handshake,
    tls_1_2_clients_are_served,
    reload_serves_the_new_certificate_to_new_handshakes,
    a_bad_new_pair_is_refused_and_the_old_one_stays,
);

/// A fresh certificate and key for localhost in a new directory.
fn pair_in(dir: &Path) -> (PathBuf, PathBuf, String) {
    std::fs::create_dir_all(dir).unwrap();
    let pair = arcgate::certs::selfsigned::generate(&["localhost", "127.0.0.1"], 30).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    (cert, key, pair.cert_pem)
}

/// A fresh directory: unique per call, since both backends' variants of a test run at
/// the same time in this process.
fn temp_dir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("arcgate-tls-{name}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A client trusting only `ca_pem`, offering `alpn`.
fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    client_config_for(ca_pem, alpn, rustls::DEFAULT_VERSIONS)
}

fn client_config_for(
    ca_pem: &str,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A wss:// connection on `path` verified against `ca_pem`.
async fn wss(gw: &Gateway, path: &str, ca_pem: &str, alpn: &[&[u8]]) -> Result<Stream, String> {
    wss_with(gw, path, client_config(ca_pem, alpn)).await
}

async fn wss_with(
    gw: &Gateway,
    path: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Stream, String> {
    let tcp = tcp_connect(gw.addr).await;
    let url = format!("wss://localhost:{}{path}", gw.addr.port());
    let req = url.into_client_request().unwrap();
    let connector = Connector::Rustls(config);
    let connect = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector));
    match tokio::time::timeout(WAIT, connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn send(ws: &mut Stream, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next message with `event` (others skipped), within the usual wait.
async fn recv_event(ws: &mut Stream, event: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next()).await;
        let msg = next
            .unwrap_or_else(|_| panic!("no {event} within {WAIT:?}"))
            .unwrap_or_else(|| panic!("connection ended before {event}"))
            .unwrap_or_else(|e| panic!("connection failed before {event}: {e}"));
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["event"] == event {
                return v;
            }
        }
    }
}

async fn wss_agent(gw: &Gateway, ca: &str, machine: &str, cluster: &str) -> Stream {
    let mut ws = wss(gw, "/ws/agent", ca, &[b"http/1.1"]).await.unwrap();
    send(&mut ws, agent_auth(&agent_token(machine, cluster), machine)).await;
    let m = recv_event(&mut ws, "authenticated").await;
    assert_eq!(m["data"]["machineId"], machine, "{m}");
    ws
}

async fn wss_user(gw: &Gateway, ca: &str, sub: &str, clusters: &[&str]) -> Stream {
    let mut ws = wss(gw, "/ws/client", ca, &[]).await.unwrap();
    send(&mut ws, client_auth(&user_token(sub, clusters, None))).await;
    let m = recv_event(&mut ws, "authenticated").await;
    assert_eq!(m["data"]["userId"], sub, "{m}");
    ws
}

async fn start_tls(io: &'static str, cert: &Path, key: &Path) -> Gateway {
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    Gateway::start(io, &["--tls-cert", cert, "--tls-key", key]).await
}

/// An agent, a user and a relay each way, all over wss://.
async fn relay_and_command(gw: &Gateway, ca: &str, tag: &str) {
    let (machine, cluster) = (format!("mch_{tag}"), format!("clu_{tag}"));
    let mut user = wss_user(gw, ca, &format!("usr_{tag}"), &[&cluster]).await;
    let mut agent = wss_agent(gw, ca, &machine, &cluster).await;
    recv_event(&mut user, "machine:online").await;
    let data = json!({"serverId": "srv_1", "status": "running", "players": 3});
    send(&mut agent, json!({"event": "server:status", "data": data})).await;
    let m = recv_event(&mut user, "server:updated").await;
    assert_eq!(m["data"]["status"], "running", "{m}");
    assert_eq!(m["data"]["machineId"], machine.as_str(), "{m}");

    let cmd = json!({"machineId": machine, "type": "server:start", "serverId": "srv_1"});
    send(
        &mut user,
        json!({"event": "command", "id": "req_1", "data": cmd}),
    )
    .await;
    let c = recv_event(&mut agent, "command").await;
    assert_eq!(c["data"]["type"], "server:start", "{c}");
    let answer = json!({"id": c["data"]["id"], "success": true});
    send(
        &mut agent,
        json!({"event": "command:response", "data": answer}),
    )
    .await;
    let r = recv_event(&mut user, "command:response").await;
    assert_eq!(r["id"], "req_1", "{r}");
}

async fn agent_and_user_relay_and_command_over_wss(io: &'static str) {
    let dir = temp_dir("relay");
    let (cert, key, ca) = pair_in(&dir);
    let gw = start_tls(io, &cert, &key).await;
    assert!(gw.wait_log("tls=\"rustls\"", WAIT).await, "{}", gw.log());
    relay_and_command(&gw, &ca, "a").await;
    // Large messages span many records and receive buffers.
    let mut agent = wss_agent(&gw, &ca, "mch_big", "clu_big").await;
    let mut user = wss_user(&gw, &ca, "usr_big", &["clu_big"]).await;
    let big = "x".repeat(40_000);
    send(
        &mut agent,
        json!({"event": "server:status", "data": {"serverId": "s", "status": big}}),
    )
    .await;
    let m = recv_event(&mut user, "server:updated").await;
    assert_eq!(m["data"]["status"].as_str().unwrap().len(), 40_000);
    let metrics = String::from_utf8(gw.admin_get("/metrics").await.body).unwrap();
    assert_eq!(
        metric(&metrics, "arcgate_tls_info{mode=\"rustls\"}"),
        Some(1.0),
        "{metrics}"
    );
    let expiry = metric(&metrics, "arcgate_tls_cert_expiry_seconds").unwrap();
    let in_30_days = (now_s() + 30 * 86_400) as f64;
    assert!((expiry - in_30_days).abs() <= 86_400.0, "{expiry}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends `bytes` and expects the gateway to close the connection without an upgrade.
async fn closed_after(gw: &Gateway, bytes: &[u8]) {
    let mut s = gw.tcp().await;
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the gateway kept the connection open");
    assert!(
        !String::from_utf8_lossy(&got).contains("101"),
        "answered with an upgrade: {got:?}"
    );
}

async fn non_tls_bytes_are_closed_and_the_gateway_carries_on(io: &'static str) {
    let dir = temp_dir("garbage");
    let (cert, key, ca) = pair_in(&dir);
    // A short handshake timeout so the truncated hello is closed soon.
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let gw = Gateway::start(
        io,
        &["--tls-cert", c, "--tls-key", k, "--handshake-timeout", "1s"],
    )
    .await;
    let plain = upgrade_request("/ws/agent", &[]);
    closed_after(&gw, plain.as_bytes()).await;
    closed_after(&gw, &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5, 6, 7, 8]).await;
    // The first bytes of a ClientHello record header claiming 512 bytes, then nothing.
    closed_after(&gw, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]).await;
    relay_and_command(&gw, &ca, "b").await;
    // Every one of those connections is gone, the wss ones included once dropped.
    let mut open = None;
    for _ in 0..100 {
        let metrics = String::from_utf8(gw.admin_get("/metrics").await.body).unwrap();
        open = metric(&metrics, "arcgate_tcp_connections");
        if open == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open, Some(0.0), "{}", gw.log());
    let _ = std::fs::remove_dir_all(dir);
}

async fn a_client_offering_only_h2_fails_the_handshake(io: &'static str) {
    let dir = temp_dir("alpn");
    let (cert, key, ca) = pair_in(&dir);
    let gw = start_tls(io, &cert, &key).await;
    let err = wss(&gw, "/ws/agent", &ca, &[b"h2"]).await.err();
    assert!(
        err.as_deref()
            .is_some_and(|e| e.to_lowercase().contains("protocol")),
        "{err:?}"
    );
    // Offering http/1.1 among others works.
    assert!(wss(&gw, "/ws/agent", &ca, &[b"h2", b"http/1.1"])
        .await
        .is_ok());
    let _ = std::fs::remove_dir_all(dir);
}

async fn tls_1_2_clients_are_served(io: &'static str) {
    let dir = temp_dir("tls12");
    let (cert, key, ca) = pair_in(&dir);
    let gw = start_tls(io, &cert, &key).await;
    let config = client_config_for(&ca, &[b"http/1.1"], &[&rustls::version::TLS12]);
    let mut ws = wss_with(&gw, "/ws/agent", config).await.unwrap();
    send(
        &mut ws,
        agent_auth(&agent_token("mch_12", "clu_12"), "mch_12"),
    )
    .await;
    let m = recv_event(&mut ws, "authenticated").await;
    assert_eq!(m["data"]["machineId"], "mch_12", "{m}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits until a new handshake verifies against `ca`.
async fn until_served(gw: &Gateway, ca: &str) -> bool {
    for _ in 0..100 {
        if wss(gw, "/ws/client", ca, &[]).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn reload_serves_the_new_certificate_to_new_handshakes(io: &'static str) {
    let dir = temp_dir("reload");
    let (cert, key, old_ca) = pair_in(&dir);
    let gw = start_tls(io, &cert, &key).await;
    let mut agent = wss_agent(&gw, &old_ca, "mch_r", "clu_r").await;
    let mut user = wss_user(&gw, &old_ca, "usr_r", &["clu_r"]).await;

    // Renamed in, as certificate tools do: picked up without a signal.
    let (new_cert, new_key, new_ca) = pair_in(&dir.join("next"));
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    assert!(until_served(&gw, &new_ca).await, "{}", gw.log());
    assert!(wss(&gw, "/ws/client", &old_ca, &[]).await.is_err());

    // SIGHUP reloads too.
    let (third_cert, third_key, third_ca) = pair_in(&dir.join("third"));
    std::fs::copy(&third_cert, &cert).unwrap();
    std::fs::copy(&third_key, &key).unwrap();
    gw.signal(libc::SIGHUP);
    assert!(until_served(&gw, &third_ca).await, "{}", gw.log());

    // The connections made before both reloads still work.
    send(
        &mut agent,
        json!({"event": "server:status", "data": {"serverId": "s", "status": "up"}}),
    )
    .await;
    let m = recv_event(&mut user, "server:updated").await;
    assert_eq!(m["data"]["status"], "up", "{m}");
    let _ = std::fs::remove_dir_all(dir);
}

async fn a_bad_new_pair_is_refused_and_the_old_one_stays(io: &'static str) {
    let dir = temp_dir("bad");
    let (cert, key, ca) = pair_in(&dir);
    let gw = start_tls(io, &cert, &key).await;
    // A key of another certificate.
    let (_, other_key, _) = pair_in(&dir.join("other"));
    std::fs::copy(&other_key, &key).unwrap();
    gw.signal(libc::SIGHUP);
    assert!(
        gw.wait_log("the key does not match the certificate", WAIT)
            .await,
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("TLS certificate reload refused"));
    // New handshakes still get the old certificate.
    relay_and_command(&gw, &ca, "c").await;
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_bad_pair_is_refused_at_start_naming_the_file() {
    let dir = temp_dir("start");
    let (cert, key, _) = pair_in(&dir);
    let (_, other_key, _) = pair_in(&dir.join("other"));
    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let missing = dir.join("missing.pem");
    let cases = [
        (&cert, &other_key, "the key does not match the certificate"),
        (&not_pem, &key, "no certificate in it"),
        (&cert, &not_pem, "no PEM private key"),
        (&missing, &key, "cannot read"),
    ];
    for (c, k, why) in cases {
        let (mut cmd, _, _) = Gateway::command("epoll");
        let out = cmd
            .args(["--jwt-secret", SECRET])
            .args([
                "--tls-cert",
                c.to_str().unwrap(),
                "--tls-key",
                k.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(why), "expected {why:?}: {err}");
        let named = if why == "the key does not match the certificate" || c == &cert {
            k
        } else {
            c
        };
        assert!(err.contains(named.to_str().unwrap()), "{err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cert_command_writes_a_pair_the_gateway_accepts() {
    let dir = temp_dir("cmd");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arcgate"))
        .args(["cert", "--self-signed", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arcgate"))
        .args(["check-config", "--jwt-secret", SECRET])
        .args([
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls_cert = "));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the key is readable by others: {mode:o}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The notAfter `/v1/status` gives, once it is `days` days away (a reload may still be on
/// its way).
async fn status_expiry(gw: &Gateway, days: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let resp = gw.admin_request("GET", "/v1/status", None, None).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        let tls = resp.json()["tls"].clone();
        let due = (now_s() + days * 86_400) as i64;
        let near = tls["cert_expiry"]
            .as_i64()
            .is_some_and(|at| (at - due).abs() <= 86_400);
        if near || std::time::Instant::now() >= deadline {
            return tls;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn status_shows_the_tls_mode_and_the_certificate_expiry() {
    let dir = temp_dir("status");
    let (cert, key, _) = pair_in(&dir);
    let gw = start_tls("epoll", &cert, &key).await;
    let tls = status_expiry(&gw, 30).await;
    assert_eq!(tls["mode"], "rustls", "{tls}");
    let at = tls["cert_expiry"].as_i64().unwrap();
    let in_30_days = (now_s() + 30 * 86_400) as i64;
    assert!((at - in_30_days).abs() <= 86_400, "{tls}");
    // The same notAfter as the metric, to the second (the pair ends at midnight UTC).
    assert_eq!(at % 86_400, 0, "{tls}");
    let metrics = String::from_utf8(gw.admin_get("/metrics").await.body).unwrap();
    let expiry = metric(&metrics, "arcgate_tls_cert_expiry_seconds");
    assert_eq!(expiry, Some(at as f64), "{metrics}");

    // After a reload, the certificate in use.
    let longer = arcgate::certs::selfsigned::generate(&["localhost"], 60).unwrap();
    std::fs::write(&key, &longer.key_pem).unwrap();
    std::fs::write(&cert, &longer.cert_pem).unwrap();
    gw.signal(libc::SIGHUP);
    let tls = status_expiry(&gw, 60).await;
    let in_60_days = (now_s() + 60 * 86_400) as i64;
    let at = tls["cert_expiry"].as_i64().unwrap();
    assert!((at - in_60_days).abs() <= 86_400, "{tls}\n{}", gw.log());
    let _ = std::fs::remove_dir_all(dir);
}
