//! The status page (`GET /status`), its JSON document (`GET /v1/status`), and the thread
//! that reads the counters once a second for both.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::http::Response;
use super::sampler::{Rates, Totals, KEEP, LATENCY_WINDOW};
use super::Admin;
use crate::metrics::{CLOSE_CODES, OUTCOMES, ROLES};

/// The page: inline CSS and JS, no external anything.
const PAGE: &str = include_str!("status.html");
/// Version of the document's layout; fields are only ever added within one version.
const SCHEMA: u32 = 1;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `GET /status`.
pub fn page() -> Response {
    Response::new(200, "text/html; charset=utf-8", PAGE)
        .with_header("Cache-Control", "no-store")
        // Nothing outside this page may load: it has no reason to.
        .with_header(
            "Content-Security-Policy",
            "default-src 'none'; connect-src 'self'; style-src 'unsafe-inline'; \
             script-src 'unsafe-inline'; img-src data:",
        )
}

/// Reads the counters once a second into `admin.samples` until the process exits.
pub fn spawn_sampler(admin: Arc<Admin>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("arcgate-status".into())
        .spawn(move || loop {
            // On the wall clock's whole seconds, so that every interval is one second
            // (a first, shorter one would show a burst that never was).
            std::thread::sleep(Duration::from_secs_f64(1.0 - unix_now().fract()));
            let reading = Totals::read(&admin.shared.metrics, unix_now());
            admin.samples().push(reading);
        })?;
    Ok(())
}

/// The `history=N` query parameter: how many per-second points to send (all by default).
fn history_points(query: &str) -> Result<usize, Response> {
    let Some(value) = query.split('&').find_map(|kv| kv.strip_prefix("history=")) else {
        return Ok(KEEP);
    };
    value
        .parse::<usize>()
        .map_err(|_| Response::error(400, "history must be a whole number of seconds (0 or more)"))
}

/// `GET /v1/status[?history=N]`.
pub fn document(admin: &Admin, query: &str) -> Response {
    let points = match history_points(query) {
        Ok(n) => n,
        Err(refusal) => return refusal,
    };
    let now = unix_now();
    let live = Totals::read(&admin.shared.metrics, now);
    let (history, rates, latency) = {
        let samples = admin.samples();
        let rates = samples
            .latest()
            .map(|last| {
                let mut h = samples.history(1);
                h.pop().unwrap_or_else(|| Rates::between(last, last))
            })
            .unwrap_or_default();
        (samples.history(points), rates, samples.latency(&live))
    };
    let node = node_name();
    let tcp = admin.env.admission.open.load(Ordering::Relaxed) as u64;
    let doc = json!({
        "schema": SCHEMA,
        "time": now,
        "node": {"id": node, "name": node},
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": admin.started,
        "uptime_s": (now - admin.started).max(0.0),
        "io_backend": admin.backend,
        "draining": admin.draining(),
        "workers": live.busy_nanos.len(),
        "connections": connections(&live.connections, tcp),
        "rates": rates_json(&rates),
        "totals": {
            "connects": live.accepted,
            "closes": by_code(live.closes.iter().map(|&n| json!(n))),
            "messages_in": live.messages_in,
            "messages_out": live.messages_out,
            "relay_deliveries": live.relay_deliveries,
            "rate_limited": live.rate_limited,
            "slow_consumer_closes": live.slow_consumers,
        },
        "commands": {
            "window_s": LATENCY_WINDOW,
            "count": latency.0,
            "p50_ms": latency.1,
            "p99_ms": latency.2,
            "outcomes": labelled(&OUTCOMES, live.commands.iter().map(|&n| json!(n))),
        },
        "worker_busy": rates.busy,
        "tls": {"mode": "off", "cert_expiry": null},
        "bus": {"state": "off"},
        "nodes": [{
            "id": node,
            "name": node,
            "version": env!("CARGO_PKG_VERSION"),
            "state": if admin.draining() { "draining" } else { "up" },
            "connections": live.connections.iter().sum::<u64>(),
        }],
        "history": history_json(&history),
    });
    Response::json(200, doc.to_string()).with_header("Cache-Control", "no-store")
}

fn labelled(names: &[&str], values: impl Iterator<Item = Value>) -> Value {
    Value::Object(
        names
            .iter()
            .map(|n| n.to_string())
            .zip(values)
            .collect::<Map<_, _>>(),
    )
}

fn by_code(values: impl Iterator<Item = Value>) -> Value {
    labelled(&CLOSE_CODES, values)
}

fn connections(by_role: &[u64; ROLES.len()], tcp: u64) -> Value {
    let mut m = match labelled(&ROLES, by_role.iter().map(|&n| json!(n))) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    m.insert("total".into(), json!(by_role.iter().sum::<u64>()));
    m.insert("tcp".into(), json!(tcp));
    Value::Object(m)
}

/// Rounded so that the document stays short and readable.
fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn rates_json(r: &Rates) -> Value {
    json!({
        "connects": round(r.connects),
        "closes": by_code(r.closes.iter().map(|&x| json!(round(x)))),
        "closes_total": round(r.closes_total()),
        "messages_in": round(r.messages_in),
        "messages_out": round(r.messages_out),
        "relay_deliveries": round(r.relay_deliveries),
        "rate_limited": round(r.rate_limited),
        "slow_consumer_closes": round(r.slow_consumers),
        "commands": round(r.commands),
    })
}

/// Columns of equal length, one value per second, oldest first.
fn history_json(points: &[Rates]) -> Value {
    let col =
        |f: &dyn Fn(&Rates) -> f64| -> Vec<f64> { points.iter().map(|r| round(f(r))).collect() };
    json!({
        "interval_s": 1,
        "t": col(&|r| r.t.round()),
        "connections": col(&|r| r.connections.iter().sum::<u64>() as f64),
        "connects": col(&|r| r.connects),
        "closes": col(&|r| r.closes_total()),
        "messages_in": col(&|r| r.messages_in),
        "messages_out": col(&|r| r.messages_out),
        "busy": col(&|r| r.busy_mean()),
    })
}

/// This node's name: the host name until nodes get names of their own.
fn node_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // or truncates, and the last byte stays 0 either way.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_parameter_is_checked() {
        assert_eq!(history_points("").ok(), Some(KEEP));
        assert_eq!(history_points("a=1&history=5").ok(), Some(5));
        assert_eq!(history_points("history=0").ok(), Some(0));
        let refusal = history_points("history=-1").unwrap_err();
        assert_eq!(refusal.status, 400);
    }

    #[test]
    fn history_columns_have_equal_length() {
        let p = Rates {
            t: 10.4,
            connections: [1, 2, 3, 4],
            busy: vec![0.5, 0.25],
            ..Rates::default()
        };
        let h = history_json(&[p.clone(), p]);
        for key in ["t", "connections", "connects", "closes", "busy"] {
            assert_eq!(h[key].as_array().unwrap().len(), 2, "{key}");
        }
        assert_eq!(h["connections"][0], 10.0);
        assert_eq!(h["busy"][1], 0.375);
        assert_eq!(h["t"][0], 10.0);
    }

    #[test]
    fn the_page_loads_nothing_from_outside() {
        for needle in ["http://", "https://", "<link", "src=", "@import", "url("] {
            assert!(!PAGE.contains(needle), "the page contains {needle}");
        }
        assert!(PAGE.contains("/v1/status"));
        assert!(!node_name().is_empty());
    }
}
