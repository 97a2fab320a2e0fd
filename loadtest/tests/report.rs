//! The JSON report has every field, the HTML page is written and self-contained, and the
//! summary table is printed.

mod common;

use std::process::{Command, Stdio};

use common::{f, n, scratch, Gateway, SECRET};
use serde_json::Value;

#[test]
fn json_and_html_reports_are_complete() {
    let gw = Gateway::start(&[]);
    let dir = scratch("report");
    let (json, html) = (dir.join("r.json"), dir.join("r.html"));
    let pid = gw.pid().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_arcgate-load"))
        .args([
            "steady",
            "--url",
            &gw.url(),
            "--secret",
            SECRET,
            "--agents",
            "12",
            "--clients",
            "3",
            "--clusters",
            "3",
            "--status-rate",
            "200",
            "--command-rate",
            "5",
            "--heartbeat-interval",
            "100ms",
            "--duration",
            "2s",
            "--gateway-pid",
            &pid,
        ])
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .stdin(Stdio::null())
        .output()
        .expect("run arcgate-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // The summary table on stdout, the live status line on stderr.
    for row in [
        "connections",
        "deliveries",
        "latency delivery",
        "gateway",
        "errors",
    ] {
        assert!(stdout.contains(row), "no {row:?} row in:\n{stdout}");
    }
    assert!(
        stderr.contains("conns ") && stderr.contains("p99"),
        "{stderr}"
    );

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "tool",
        "scenario",
        "procs",
        "options",
        "duration_s",
        "setup",
        "connections",
        "urls",
        "counts",
        "totals",
        "deliveries",
        "lost",
        "commands",
        "rates",
        "errors",
        "latency",
        "latencies",
        "percentile_curve",
        "gateway",
        "tool_cpu",
        "warnings",
        "timeline",
    ] {
        assert!(r.get(key).is_some(), "no {key} in the report");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(f(&r["latency"], &format!("/{key}")) > 0.0, "latency.{key}");
        assert!(f(&r["latencies"]["command"], &format!("/{key}")) > 0.0);
    }
    for key in ["by_code", "by_close_code", "connect_failures_by_cause"] {
        assert!(r["errors"][key].is_object(), "errors.{key}");
    }
    for key in [
        "messages_out_per_s",
        "messages_in_per_s",
        "deliveries_per_s",
        "commands_per_s",
    ] {
        assert!(f(&r["rates"], &format!("/{key}")) > 0.0, "rates.{key}");
    }
    let g = &r["gateway"];
    assert_eq!(n(g, "/pid"), u64::from(gw.pid()));
    assert!(f(g, "/cpu_us_per_inbound_message") > 0.0, "{g}");
    assert!(f(g, "/cpu_us_per_delivery") > 0.0, "{g}");
    let kernel = f(g, "/cpu_kernel_share");
    assert!(kernel > 0.0 && kernel < 1.0, "{g}");
    assert!(n(g, "/rss_bytes") > 0);
    assert!(g["rss_per_connection_bytes"].is_number(), "{g}");
    assert_eq!(n(g, "/connections"), 12 + 3 + 1);
    assert!(n(g, "/inbound_messages") > 0 && n(g, "/deliveries") > 0);
    let timeline = r["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 2, "{timeline:?}");
    assert!(timeline.iter().any(|p| p["gateway_cpu"].is_number()));
    assert!(r["percentile_curve"].as_array().unwrap().len() > 10);
    assert_eq!(n(&r, "/lost"), 0);
    let urls = r["urls"].as_array().unwrap();
    assert_eq!(urls.len(), 1, "one --url: {urls:?}");
    assert_eq!(urls[0]["url"], gw.url());
    assert_eq!(n(&urls[0], "/agents/ready_at_end"), 12);
    assert_eq!(n(&urls[0], "/users/target"), 3);
    assert_eq!(n(&urls[0], "/reconnected_elsewhere"), 0);

    let page = std::fs::read_to_string(&html).expect("the HTML page");
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(
        page.matches("<svg").count() >= 4,
        "latency, p99, rates, connections"
    );
    assert!(page.contains("Latency by percentile"));
    assert!(page.contains("<polyline"));
    for fetch in ["<script", "src=", "href=", "@import", "url("] {
        assert!(
            !page.contains(fetch),
            "the page must fetch nothing: {fetch}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unreachable_gateway_is_reported_not_hung() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = scratch("unreachable");
    let json = dir.join("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_arcgate-load"))
        .args([
            "connect",
            "--url",
            &format!("ws://127.0.0.1:{port}"),
            "--secret",
            SECRET,
            "--agents",
            "3",
            "--duration",
            "1s",
            "--setup-timeout",
            "1500ms",
            "--quiet",
        ])
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .output()
        .expect("run arcgate-load");
    assert!(out.status.success());
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["setup"]["complete"], false);
    assert!(n(&r, "/errors/connect_failures_by_cause/refused") >= 3);
    assert_eq!(n(&r, "/setup/authenticated"), 0);
    let warned = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap_or("").contains("setup timeout"));
    assert!(warned, "{}", r["warnings"]);
    let _ = std::fs::remove_dir_all(dir);
}
