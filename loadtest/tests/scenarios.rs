//! Every scenario, briefly, against a real gateway process: the reports must add up.

mod common;

use common::{f, load, n, Gateway, SECRET};
use serde_json::Value;

fn latency_ok(v: &Value, name: &str) {
    let l = &v["latencies"][name];
    let (p50, p90, p99, p999, max) = (
        f(l, "/p50"),
        f(l, "/p90"),
        f(l, "/p99"),
        f(l, "/p999"),
        f(l, "/max"),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max * 1.001,
        "{name}: {l}"
    );
}

#[test]
fn connect_opens_and_holds_the_fleet() {
    let gw = Gateway::start(&[]);
    let r = load(
        "connect",
        &gw.url(),
        SECRET,
        &[
            "connect",
            "--agents",
            "60",
            "--duration",
            "1s",
            "--concurrency",
            "16",
        ],
    )
    .report;
    assert_eq!(r["scenario"], "connect");
    assert_eq!(n(&r, "/setup/authenticated"), 60);
    assert_eq!(r["setup"]["complete"], true);
    assert_eq!(n(&r, "/connections/agents/ready_at_start"), 60);
    assert_eq!(n(&r, "/connections/agents/ready_at_end"), 60);
    assert_eq!(n(&r, "/totals/connect_attempts"), 60);
    assert_eq!(n(&r, "/totals/authenticated"), 60);
    assert_eq!(n(&r, "/errors/total"), 0);
    assert_eq!(n(&r, "/latencies/connect/count"), 60);
    assert!(f(&r, "/setup/rate_per_s") > 0.0);
    latency_ok(&r, "connect");
}

#[test]
fn a_wrong_secret_counts_auth_failures_and_stops() {
    let gw = Gateway::start(&[]);
    let r = load(
        "wrong-secret",
        &gw.url(),
        "not-the-gateway-secret-0123456789",
        &["connect", "--agents", "12", "--duration", "1s"],
    )
    .report;
    assert_eq!(n(&r, "/errors/by_code/AUTH_FAILED"), 12);
    assert_eq!(n(&r, "/errors/by_close_code/4001"), 12);
    assert_eq!(n(&r, "/errors/connect_failures_by_cause/close_4001"), 12);
    assert_eq!(n(&r, "/connections/agents/stopped"), 12);
    assert_eq!(n(&r, "/connections/agents/ready_at_end"), 0);
    // 4001 means: do not reconnect without a new token.
    assert_eq!(n(&r, "/totals/connect_attempts"), 12);
    assert_eq!(n(&r, "/setup/authenticated"), 0);
    assert_eq!(
        n(&r, "/errors/total"),
        24,
        "12 error events and 12 failed attempts"
    );
}

#[test]
fn fanout_at_a_low_rate_loses_nothing() {
    let gw = Gateway::start(&[]);
    let r = load(
        "fanout",
        &gw.url(),
        SECRET,
        &[
            "fanout",
            "--clients",
            "8",
            "--agents",
            "3",
            "--rate",
            "60",
            "--duration",
            "2s",
        ],
    )
    .report;
    let sent = n(&r, "/deliveries/events_sent");
    assert!((100..=130).contains(&sent), "about 120 events: {sent}");
    assert_eq!(n(&r, "/counts/statuses_sent"), sent);
    assert_eq!(n(&r, "/deliveries/expected"), sent * 8);
    assert_eq!(n(&r, "/deliveries/received"), sent * 8);
    assert_eq!(n(&r, "/lost"), 0);
    assert_eq!(n(&r, "/deliveries/duplicates"), 0);
    assert_eq!(n(&r, "/deliveries/gaps"), 0);
    assert_eq!(n(&r, "/latencies/delivery/count"), sent * 8);
    assert_eq!(r["latency"]["name"], "delivery");
    assert_eq!(n(&r, "/errors/total"), 0);
    latency_ok(&r, "delivery");
}

#[test]
fn fanout_flat_out_counts_add_up() {
    let gw = Gateway::start(&["--rate-limit", "0"]);
    let r = load(
        "fanout-flat",
        &gw.url(),
        SECRET,
        &[
            "fanout",
            "--clients",
            "4",
            "--agents",
            "2",
            "--rate",
            "0",
            "--in-flight",
            "8",
            "--duration",
            "1s",
        ],
    )
    .report;
    let acked = n(&r, "/counts/flat_out_acked");
    assert!(acked > 0);
    assert!(n(&r, "/counts/flat_out_sent") >= acked);
    let expected = n(&r, "/deliveries/expected");
    assert_eq!(expected, n(&r, "/deliveries/events_sent") * 4);
    assert_eq!(
        n(&r, "/deliveries/received") + n(&r, "/lost"),
        expected,
        "received and lost make up what was expected"
    );
    assert!(f(&r, "/rates/acked_per_s") > 0.0);
}

#[test]
fn steady_runs_a_realistic_fleet() {
    let gw = Gateway::start(&[]);
    let r = load(
        "steady",
        &gw.url(),
        SECRET,
        &[
            "steady",
            "--agents",
            "20",
            "--clients",
            "4",
            "--clusters",
            "4",
            "--status-rate",
            "20",
            "--player-rate",
            "10",
            "--command-rate",
            "10",
            "--heartbeat-interval",
            "300ms",
            "--metrics-interval",
            "600ms",
            "--duration",
            "2s",
        ],
    )
    .report;
    for k in [
        "heartbeats_sent",
        "metrics_sent",
        "statuses_sent",
        "player_events_sent",
    ] {
        assert!(n(&r, &format!("/counts/{k}")) > 0, "{k}");
    }
    let events = n(&r, "/counts/statuses_sent") + n(&r, "/counts/player_events_sent");
    assert_eq!(n(&r, "/deliveries/events_sent"), events);
    // Each event goes to the one user of its cluster and to the service.
    assert_eq!(n(&r, "/deliveries/expected"), events * 2);
    assert_eq!(n(&r, "/lost"), 0);
    let c = &r["commands"];
    assert!(n(c, "/sent") >= 15);
    assert_eq!(
        n(c, "/ok") + n(c, "/failed") + n(c, "/unanswered"),
        n(c, "/sent")
    );
    assert_eq!(n(c, "/failed"), 0);
    assert_eq!(
        n(&r, "/totals/commands_received"),
        n(&r, "/totals/command_responses_sent")
    );
    // The service also receives heartbeats and metrics.
    assert!(n(&r, "/counts/deliveries") > n(&r, "/counts/event_deliveries"));
    assert_eq!(n(&r, "/errors/total"), 0);
    latency_ok(&r, "delivery");
    latency_ok(&r, "command");
}

#[test]
fn churn_drops_and_reopens_agents_without_errors() {
    let gw = Gateway::start(&[]);
    let r = load(
        "churn",
        &gw.url(),
        SECRET,
        &[
            "steady",
            "--agents",
            "20",
            "--clients",
            "2",
            "--command-rate",
            "0",
            "--status-rate",
            "200",
            "--churn",
            "20",
            "--duration",
            "3s",
        ],
    )
    .report;
    let dropped = n(&r, "/errors/disconnects_by_cause/churn_drop");
    assert!(dropped >= 10, "{}", r["errors"]);
    assert_eq!(n(&r, "/totals/self_drops"), dropped);
    // Every drop is followed by a new connection that authenticates (backoff ≤ 1 s).
    assert!(n(&r, "/totals/authenticated") >= 22 + dropped / 2);
    assert_eq!(n(&r, "/errors/total"), 0);
    assert_eq!(n(&r, "/lost"), 0);
}

#[test]
fn flood_measures_inbound_capacity() {
    let gw = Gateway::start(&["--rate-limit", "0"]);
    let r = load(
        "flood",
        &gw.url(),
        SECRET,
        &[
            "flood",
            "--agents",
            "4",
            "--in-flight",
            "16",
            "--duration",
            "1s",
        ],
    )
    .report;
    let acked = n(&r, "/counts/flat_out_acked");
    assert!(acked > 100, "acked {acked}");
    assert!(n(&r, "/counts/flat_out_sent") >= acked);
    assert!(n(&r, "/counts/heartbeats_sent") >= n(&r, "/counts/flat_out_sent"));
    assert!(f(&r, "/rates/acked_per_s") > 100.0);
    assert_eq!(n(&r, "/errors/total"), 0);
    assert_eq!(r["latency"]["name"], "ack");
    latency_ok(&r, "ack");
}

#[test]
fn flood_against_the_default_rate_limit_reports_it() {
    let gw = Gateway::start(&["--rate-limit", "20", "--rate-burst", "20"]);
    let run = load(
        "flood-limited",
        &gw.url(),
        SECRET,
        &["flood", "--agents", "2", "--duration", "1s"],
    );
    assert!(n(&run.report, "/errors/by_code/RATE_LIMIT") >= 2);
    let warned = run.report["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .any(|w| w.as_str().is_some_and(|w| w.contains("RATE_LIMIT")));
    assert!(warned, "{}", run.stdout);
}

#[test]
fn storm_recovers() {
    let gw = Gateway::start(&[]);
    let r = load(
        "storm",
        &gw.url(),
        SECRET,
        &[
            "storm",
            "--agents",
            "40",
            "--duration",
            "4s",
            "--storm-after",
            "500ms",
            "--heartbeat-interval",
            "200ms",
        ],
    )
    .report;
    let s = &r["storm"];
    assert_eq!(s["mode"], "drop");
    // Heartbeats due while disconnected are sent after the reconnect.
    assert!(n(&r, "/totals/queued_resent") > 0);
    assert_eq!(n(s, "/dropped"), 40);
    assert_eq!(n(s, "/recovered"), 40);
    assert_eq!(s["all_recovered"], true);
    assert_eq!(n(s, "/down_at_end"), 0);
    let rec = f(s, "/recovery_s");
    assert!(
        rec > 0.0 && rec < 3.0,
        "full jitter from a 1 s backoff: {rec}"
    );
    assert_eq!(n(&r, "/connections/agents/ready_at_end"), 40);
    assert_eq!(n(&r, "/latencies/reconnect/count"), 40);
    // Dropping on purpose is not an error.
    assert_eq!(n(&r, "/errors/total"), 0);
    assert_eq!(n(&r, "/errors/disconnects_by_cause/storm_drop"), 40);
}

#[test]
fn storm_with_a_gateway_restart() {
    let gw = Gateway::start(&["--drain-duration", "200ms"]);
    let dir = common::scratch("storm-restart-pid");
    let pid_file = dir.join("new.pid");
    let args: Vec<String> = gw.args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "kill -TERM {old}; \
         while kill -0 {old} 2>/dev/null && ! grep -q ') Z ' /proc/{old}/stat 2>/dev/null; \
         do sleep 0.02; done; \
         '{bin}' {args} >/dev/null 2>&1 & echo $! > '{pid}'",
        old = gw.pid(),
        bin = common::gateway_bin().display(),
        args = args.join(" "),
        pid = pid_file.display(),
    );
    let url = gw.url();
    let run = std::thread::spawn(move || {
        load(
            "storm-restart",
            &url,
            SECRET,
            &[
                "storm",
                "--agents",
                "20",
                "--duration",
                "5s",
                "--storm-after",
                "500ms",
                "--restart-cmd",
                &script,
            ],
        )
    })
    .join();
    let new_pid = std::fs::read_to_string(&pid_file).unwrap_or_default();
    if let Ok(pid) = new_pid.trim().parse::<i32>() {
        // SAFETY: signalling the gateway this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
    let r = run.expect("the run").report;
    let s = &r["storm"];
    assert_eq!(s["mode"], "restart");
    assert_eq!(n(s, "/restart/exit_code"), 0);
    assert_eq!(n(s, "/dropped"), 20, "every agent lost its connection");
    assert!(n(s, "/recovered") > 0, "{s}");
    // The draining gateway closes with 1012.
    assert_eq!(n(&r, "/errors/by_close_code/1012"), 20);
}

#[test]
fn commands_round_trip() {
    let gw = Gateway::start(&[]);
    let r = load(
        "commands",
        &gw.url(),
        SECRET,
        &[
            "commands",
            "--agents",
            "10",
            "--rate",
            "40",
            "--duration",
            "2s",
            "--command-latency",
            "5ms",
        ],
    )
    .report;
    let c = &r["commands"];
    let sent = n(c, "/sent");
    // Paced at 40/s for 2 s: never more than ~80; fewer only when the machine is starved.
    assert!((40..=85).contains(&sent), "about 80 commands: {sent}");
    assert_eq!(n(c, "/ok"), sent);
    assert_eq!(n(c, "/failed") + n(c, "/unanswered"), 0);
    assert_eq!(n(&r, "/totals/commands_received"), sent);
    assert_eq!(n(&r, "/latencies/command/count"), sent);
    assert!(
        f(&r, "/latencies/command/p50") >= 5.0,
        "the agents answer after 5 ms"
    );
    latency_ok(&r, "command");
}

#[test]
fn worker_processes_and_source_addresses_merge_into_one_report() {
    let gw = Gateway::start(&[]);
    let r = load(
        "procs",
        &gw.url(),
        SECRET,
        &[
            "fanout",
            "--clients",
            "6",
            "--agents",
            "4",
            "--rate",
            "40",
            "--duration",
            "2s",
            "--procs",
            "2",
            "--sources",
            "127.0.0.1-127.0.0.3",
        ],
    )
    .report;
    assert_eq!(n(&r, "/procs"), 2);
    assert_eq!(n(&r, "/connections/users/target"), 6);
    assert_eq!(n(&r, "/connections/agents/ready_at_end"), 4);
    let sent = n(&r, "/deliveries/events_sent");
    assert!(sent >= 40, "{sent}");
    // Events from one process's agents reach the other process's users.
    assert_eq!(n(&r, "/deliveries/received"), sent * 6);
    assert_eq!(n(&r, "/lost"), 0);
}

#[test]
fn connect_rate_paces_the_setup() {
    let gw = Gateway::start(&[]);
    let r = load(
        "connect-rate",
        &gw.url(),
        SECRET,
        &[
            "connect",
            "--agents",
            "20",
            "--connect-rate",
            "40",
            "--duration",
            "1s",
        ],
    )
    .report;
    assert_eq!(n(&r, "/setup/authenticated"), 20);
    let secs = f(&r, "/setup/seconds");
    assert!(
        secs >= 0.45,
        "20 connections at 40/s take about 0.5 s: {secs}"
    );
    assert!(f(&r, "/setup/rate_per_s") <= 45.0);
}

#[test]
fn refusals_with_retry_after_are_counted_and_honoured() {
    let gw = Gateway::start(&["--max-connections", "5"]);
    let r = load(
        "refused",
        &gw.url(),
        SECRET,
        &[
            "connect",
            "--agents",
            "8",
            "--duration",
            "500ms",
            "--setup-timeout",
            "1500ms",
        ],
    )
    .report;
    assert_eq!(n(&r, "/connections/agents/ready_at_end"), 5);
    let refused = n(&r, "/errors/connect_failures_by_cause/http_503");
    assert!(refused >= 3, "{refused}");
    // Retry-After (at least a second) keeps the three from hammering the gateway.
    assert!(refused <= 12, "{refused} refusals in about 2 s");
    assert_eq!(r["setup"]["complete"], false);
    let warned = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w.as_str().unwrap_or("").contains("503"));
    assert!(warned, "{}", r["warnings"]);
}

#[test]
fn refusals_sent_before_the_request_are_read_and_retried() {
    // Four pending handshakes (one worker): most of a burst is answered 503 right at accept,
    // often before the client's first event; each must be counted and retried, not lost.
    let gw = Gateway::start(&["--max-pending-handshakes", "4"]);
    let r = load(
        "refused-at-accept",
        &gw.url(),
        SECRET,
        &[
            "connect",
            "--agents",
            "300",
            "--concurrency",
            "300",
            "--duration",
            "500ms",
            "--timeout",
            "3s",
            "--setup-timeout",
            "40s",
        ],
    )
    .report;
    let failures = &r["errors"]["connect_failures_by_cause"];
    assert!(n(failures, "/http_503") >= 1, "{failures}");
    assert!(failures.get("timeout").is_none(), "{failures}");
    assert_eq!(n(&r, "/connections/agents/ready_at_end"), 300);
}

#[test]
fn fanout_over_wss_loses_nothing() {
    let dir = common::scratch("wss-cert");
    let out = std::process::Command::new(common::gateway_bin())
        .args(["cert", "--self-signed", "--out"])
        .arg(&dir)
        .output()
        .expect("arcgate cert");
    assert!(out.status.success(), "{out:?}");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let gw = Gateway::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--rate-limit",
        "0",
    ]);
    let url = format!("wss://localhost:{}", gw.port);
    let ca = cert.to_str().unwrap();
    let args = [
        "fanout",
        "--clients",
        "8",
        "--agents",
        "3",
        "--rate",
        "0",
        "--in-flight",
        "8",
        "--duration",
        "2s",
        "--ca-file",
        ca,
    ];
    let r = load("wss-fanout", &url, SECRET, &args).report;
    assert_eq!(r["target"], url.as_str());
    let sent = n(&r, "/deliveries/events_sent");
    assert!(sent > 0);
    assert_eq!(n(&r, "/deliveries/received"), sent * 8);
    assert_eq!(n(&r, "/lost"), 0);
    assert_eq!(n(&r, "/errors/total"), 0);
    // The same gateway refuses a client that trusts nothing it serves.
    let other = common::scratch("wss-other");
    let out = std::process::Command::new(common::gateway_bin())
        .args(["cert", "--self-signed", "--out"])
        .arg(&other)
        .output()
        .expect("arcgate cert");
    assert!(out.status.success());
    let wrong_ca = other.join("cert.pem");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_arcgate-load"))
        .args([
            "connect",
            "--agents",
            "2",
            "--duration",
            "1s",
            "--timeout",
            "2s",
        ])
        .args(["--setup-timeout", "3s"])
        .args(["--url", &url, "--secret", SECRET, "--quiet", "--ca-file"])
        .arg(&wrong_ca)
        .output()
        .expect("run arcgate-load");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("0/2"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(other);
}
