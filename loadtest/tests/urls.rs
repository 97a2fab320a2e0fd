//! Several gateways behind one load generator: connections spread over the URLs evenly, the
//! connections of a gateway killed mid-run come back on the other one, and wss:// and ws://
//! URLs mix.

mod common;

use common::{gateway_bin, load, n, scratch, wait_for, Gateway, SECRET};

#[test]
fn connections_spread_over_urls_and_leave_a_killed_gateway() {
    let mut a = Gateway::start(&[]);
    let b = Gateway::start(&[]);
    let urls = format!("{},{}", a.url(), b.url());
    let run = std::thread::spawn(move || {
        load(
            "urls",
            &urls,
            SECRET,
            &[
                "steady",
                "--agents",
                "20",
                "--clients",
                "4",
                "--status-rate",
                "0",
                "--player-rate",
                "0",
                "--command-rate",
                "1",
                "--duration",
                "8s",
            ],
        )
    });

    // Round-robin: agents, users and the one service client, by their fleet-wide number.
    wait_for(
        "gateway A's share",
        || a.connections(),
        |c| *c == (10, 2, 1),
    );
    wait_for(
        "gateway B's share",
        || b.connections(),
        |c| *c == (10, 2, 0),
    );
    let on_a = a.machines();
    let on_b = b.machines();
    assert_eq!((on_a.len(), on_b.len()), (10, 10));
    assert!(on_a.iter().all(|m| !on_b.contains(m)), "{on_a:?} {on_b:?}");

    a.child.kill().expect("SIGKILL gateway A");
    a.child.wait().expect("gateway A ended");
    wait_for("everything on B", || b.connections(), |c| *c == (20, 4, 1));
    let mut all = b.machines();
    all.sort();
    let mut want: Vec<String> = on_a.iter().chain(&on_b).cloned().collect();
    want.sort();
    assert_eq!(all, want, "A's machines are back, on B");

    let r = run.join().expect("the load run").report;
    let url = |i: usize, p: &str| n(&r["urls"][i], p);
    assert_eq!(r["urls"][0]["url"], a.url());
    assert_eq!(r["urls"][1]["url"], b.url());
    for (p, wanted) in [
        ("/agents/target", [10, 10]),
        ("/users/target", [2, 2]),
        ("/services/target", [1, 0]),
        ("/agents/ready_at_end", [0, 20]),
        ("/users/ready_at_end", [0, 4]),
        ("/services/ready_at_end", [0, 1]),
        ("/reconnected_elsewhere", [10 + 2 + 1, 0]),
    ] {
        assert_eq!([url(0, p), url(1, p)], wanted, "{p} in {:#}", r["urls"]);
    }
    assert_eq!(n(&r, "/connections/agents/ready_at_end"), 20);
    assert_eq!(n(&r, "/connections/agents/stopped"), 0);
    // Each of A's 13 connections was lost once, and nothing else was.
    assert_eq!(n(&r, "/totals/disconnects"), 13, "{:#}", r["errors"]);
}

#[test]
fn wss_and_ws_urls_mix_each_with_its_own_tls() {
    let dir = scratch("urls-wss");
    let out = std::process::Command::new(gateway_bin())
        .args(["cert", "--self-signed", "--out"])
        .arg(&dir)
        .output()
        .expect("arcgate cert");
    assert!(out.status.success(), "{out:?}");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let (a, b, c) = (
        Gateway::start(&tls),
        Gateway::start(&[]),
        Gateway::start(&tls),
    );
    let wss = |gw: &Gateway| format!("wss://localhost:{}", gw.port);
    let urls = format!("{},{},{}", wss(&a), b.url(), wss(&c));
    let accepted = |gw: &Gateway| gw.metric("arcgate_connections_accepted_total");
    let before = [&a, &b, &c].map(accepted);
    let r = load(
        "urls-wss",
        &urls,
        SECRET,
        &[
            "connect",
            "--agents",
            "6",
            "--duration",
            "1s",
            "--ca-file",
            cert.to_str().unwrap(),
        ],
    )
    .report;
    assert_eq!(r["target"], urls.as_str());
    for (i, gw) in [&a, &b, &c].into_iter().enumerate() {
        assert_eq!(
            n(&r["urls"][i], "/agents/ready_at_end"),
            2,
            "{:#}",
            r["urls"]
        );
        assert_eq!(accepted(gw) - before[i], 2.0, "gateway {i}");
        let mode = if i == 1 { "off" } else { "rustls" };
        assert_eq!(
            gw.metric(&format!("arcgate_tls_info{{mode=\"{mode}\"}}")),
            1.0
        );
    }
    assert_eq!(n(&r, "/errors/total"), 0, "{:#}", r["errors"]);
    let _ = std::fs::remove_dir_all(dir);
}
