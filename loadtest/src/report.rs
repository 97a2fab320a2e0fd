//! The merged report: JSON (machine-readable), a summary table for stdout, and a
//! self-contained HTML page with the latency percentile curve and the rates over time.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::gateway::GatewaySeen;
use crate::plan::{Plan, HISTS};
use crate::stats::{
    self, Counters, Lat, LatSummary, RoleCount, Tally, UrlCount, WorkerResult, C, NAMES,
};

const SEC: f64 = 1e9;

/// One second of the run, as the status line showed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since the start.
    pub t: f64,
    pub phase: String,
    pub connections: u64,
    pub target: u64,
    pub out_per_s: f64,
    pub in_per_s: f64,
    pub deliveries_per_s: f64,
    /// Errors in this second (error events, failed attempts, lost connections).
    pub errors: u64,
    /// p99 of the scenario's latency in this second, in ms.
    pub p99: Option<f64>,
    /// The gateway's CPU use in this second, in cores.
    pub gateway_cpu: Option<f64>,
    pub gateway_rss: Option<u64>,
}

/// The storm's restart command and how it ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Restart {
    pub command: String,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Options {
    pub agents: u32,
    pub users: u32,
    pub service_clients: u32,
    pub clusters: u32,
    pub duration_s: f64,
    pub status_rate: f64,
    pub player_rate: f64,
    pub command_rate: f64,
    pub heartbeat_interval_s: f64,
    pub metrics_interval_s: f64,
    pub command_latency_ms: u64,
    pub connect_rate: f64,
    pub concurrency: u32,
    pub in_flight: Option<u32>,
    pub sources: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    pub seconds: f64,
    /// Every connection was authenticated (or given up for good) before the setup timeout.
    pub complete: bool,
    pub authenticated: u64,
    pub target: u64,
    /// Authentications per second during setup.
    pub rate_per_s: f64,
    pub failures: u64,
}

/// One gateway URL's share: connections given it first (`target`), authenticated on it at the
/// window's start and end, and those it lost that were authenticated again on another URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UrlReport {
    pub url: String,
    #[serde(flatten)]
    pub count: UrlCount,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connections {
    pub agents: RoleCount,
    pub users: RoleCount,
    pub services: RoleCount,
}

/// Relayed events (`server:status` → `server:updated`, `player:*`) sent by the agents in
/// the window, and their deliveries to every user of the cluster and every service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deliveries {
    pub events_sent: u64,
    pub expected: u64,
    /// Distinct (agent, seq) received per client, for events sent in the window.
    pub received: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    pub duplicates: u64,
    /// Sequence numbers skipped per (client, agent), over the whole run.
    pub gaps: u64,
    /// Received but not expected (a client joined late, a resend...).
    pub unexpected: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Commands {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub unanswered: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rates {
    pub messages_out_per_s: f64,
    pub messages_in_per_s: f64,
    pub deliveries_per_s: f64,
    pub event_deliveries_per_s: f64,
    pub commands_per_s: f64,
    pub acked_per_s: f64,
    pub connects_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Errors {
    pub total: u64,
    pub by_code: Tally,
    pub by_close_code: Tally,
    pub connect_failures_by_cause: Tally,
    pub disconnects_by_cause: Tally,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub name: String,
    #[serde(flatten)]
    pub summary: LatSummary,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormReport {
    pub mode: String,
    pub herd: bool,
    pub after_s: f64,
    pub dropped: u64,
    pub recovered: u64,
    pub all_recovered: bool,
    /// From the storm's start until the last dropped agent was authenticated again.
    pub recovery_s: Option<f64>,
    pub down_at_end: u64,
    pub restart: Option<Restart>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayReport {
    pub pid: u32,
    pub cpu_seconds: Option<f64>,
    /// Cores used on average during the window.
    pub cpu_utilization: Option<f64>,
    /// The share of that CPU time spent in the kernel (system time), 0–1.
    pub cpu_kernel_share: Option<f64>,
    pub inbound_messages: u64,
    pub deliveries: u64,
    /// All of the gateway's CPU time in the window divided by the messages it received.
    pub cpu_us_per_inbound_message: Option<f64>,
    /// All of the gateway's CPU time in the window divided by the messages it sent.
    pub cpu_us_per_delivery: Option<f64>,
    /// The gateway's CPU time while the fleet connected (before the window).
    pub setup_cpu_seconds: Option<f64>,
    /// That time divided by the connections authenticated meanwhile (accept, upgrade, auth).
    pub cpu_us_per_connection: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub rss_before_bytes: Option<u64>,
    pub rss_peak_bytes: u64,
    pub connections: u64,
    /// (RSS at the end of the window − RSS before the run) / connections.
    pub rss_per_connection_bytes: Option<f64>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolCpu {
    pub seconds: f64,
    pub us_per_message: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub scenario: String,
    pub target: String,
    pub run_id: String,
    pub started_at_ms: u64,
    pub procs: u32,
    pub options: Options,
    /// The measured window, in seconds.
    pub duration_s: f64,
    pub setup: Setup,
    pub connections: Connections,
    /// The connections per gateway URL, in the order given.
    pub urls: Vec<UrlReport>,
    /// Counters over the window.
    pub counts: BTreeMap<String, u64>,
    /// Counters over the whole run (setup, window and drain).
    pub totals: BTreeMap<String, u64>,
    pub deliveries: Deliveries,
    pub lost: u64,
    pub commands: Commands,
    pub rates: Rates,
    pub errors: Errors,
    /// The scenario's own latency.
    pub latency: Latency,
    pub latencies: BTreeMap<String, LatSummary>,
    /// (percentile, ms) points of the scenario's latency curve.
    pub percentile_curve: Vec<[f64; 2]>,
    pub storm: Option<StormReport>,
    pub gateway: Option<GatewayReport>,
    pub tool_cpu: ToolCpu,
    /// What makes these numbers less than they seem (rate limiting, refusals, loss...).
    pub warnings: Vec<String>,
    pub timeline: Vec<Point>,
}

fn named(c: &Counters) -> BTreeMap<String, u64> {
    NAMES
        .iter()
        .zip(&c.0)
        .map(|(n, v)| (n.to_string(), *v))
        .collect()
}

fn per_s(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Merges the workers' results.
pub fn build(
    plan: &Plan,
    results: &[WorkerResult],
    gw: Option<&GatewaySeen>,
    timeline: Vec<Point>,
    restart: Option<Restart>,
    started_at_ms: u64,
) -> Report {
    let mut total = Counters::default();
    let mut setup_c = Counters::default();
    let mut window = Counters::default();
    let (mut agents, mut users, mut services) = (
        RoleCount::default(),
        RoleCount::default(),
        RoleCount::default(),
    );
    let (mut by_code, mut by_close, mut failures, mut disconnects) =
        (Tally::new(), Tally::new(), Tally::new(), Tally::new());
    let clusters = plan.clusters.max(1) as usize;
    let mut sent = vec![0u64; clusters];
    let mut watching = vec![0u64; clusters];
    let mut hists: Vec<Lat> = HISTS.iter().map(|_| Lat::default()).collect();
    let (mut unanswered, mut cpu_ns) = (0, 0);
    let mut storm = stats::StormSeen::default();
    let mut urls = vec![UrlCount::default(); plan.targets.len()];
    for r in results {
        for (a, b) in urls.iter_mut().zip(&r.urls) {
            a.merge(b);
        }
        total.merge(&r.total);
        setup_c.merge(&r.setup);
        window.merge(&r.window);
        agents.merge(&r.agents);
        users.merge(&r.users);
        services.merge(&r.services);
        stats::merge_tally(&mut by_code, &r.errors_by_code);
        stats::merge_tally(&mut by_close, &r.close_codes);
        stats::merge_tally(&mut failures, &r.connect_failures);
        stats::merge_tally(&mut disconnects, &r.disconnects);
        for (a, b) in sent.iter_mut().zip(&r.sent_by_cluster) {
            *a += b;
        }
        for (a, b) in watching.iter_mut().zip(&r.users_by_cluster) {
            *a += b;
        }
        for (h, d) in hists.iter_mut().zip(&r.hists) {
            h.add_data(d);
        }
        unanswered += r.commands_unanswered;
        cpu_ns += r.cpu_ns_window;
        if let Some(s) = r.storm {
            storm.dropped += s.dropped;
            storm.recovered += s.recovered;
            storm.last_recovery_ns = storm.last_recovery_ns.max(s.last_recovery_ns);
            storm.down_at_end += s.down_at_end;
        }
    }
    let t0 = results.iter().map(|r| r.t0).max().unwrap_or(0);
    let t1 = results.iter().map(|r| r.t1).max().unwrap_or(0);
    let secs = t1.saturating_sub(t0) as f64 / SEC;
    let setup_start = results.iter().map(|r| r.setup_start_ns).min().unwrap_or(0);
    let setup_end = results.iter().map(|r| r.setup_end_ns).max().unwrap_or(0);
    let setup_secs = setup_end.saturating_sub(setup_start) as f64 / SEC;

    let events_sent: u64 = sent.iter().sum();
    let expected: u64 = sent
        .iter()
        .zip(&watching)
        .map(|(s, w)| s * (w + services.ready_at_start))
        .sum();
    let received = total.get(C::WindowUnique);
    let lost = expected.saturating_sub(received);

    let primary = plan.scenario.primary();
    let latencies = HISTS
        .iter()
        .zip(&hists)
        .filter(|(_, h)| h.count() > 0)
        .map(|(k, h)| (k.name().to_string(), h.summary()))
        .collect();
    let prim = &hists[primary.index()];

    let storm_report = plan.storm.as_ref().map(|s| {
        let storm_t = t0 + s.after_ms * 1_000_000;
        StormReport {
            mode: if s.drop { "drop" } else { "restart" }.into(),
            herd: s.herd,
            after_s: s.after_ms as f64 / 1000.0,
            dropped: storm.dropped,
            recovered: storm.recovered,
            all_recovered: storm.dropped > 0
                && storm.recovered == storm.dropped
                && storm.down_at_end == 0,
            recovery_s: (storm.last_recovery_ns > storm_t)
                .then(|| (storm.last_recovery_ns - storm_t) as f64 / SEC),
            down_at_end: storm.down_at_end,
            restart,
        }
    });

    let connections_end = agents.ready_at_end + users.ready_at_end + services.ready_at_end;
    let setup_auths = setup_c.get(C::Authenticated);
    let gateway = gw.map(|g| gateway_report(g, &window, secs, connections_end, setup_auths));
    let messages = window.get(C::MsgsOut) + window.get(C::MsgsIn);

    let mut rep = Report {
        tool: concat!("arcgate-load ", env!("CARGO_PKG_VERSION")).into(),
        scenario: plan.scenario.name().into(),
        target: plan
            .targets
            .iter()
            .map(|t| {
                let scheme = if t.tls.is_some() { "wss" } else { "ws" };
                format!("{scheme}://{}{}", t.host, t.base_path)
            })
            .collect::<Vec<_>>()
            .join(","),
        run_id: plan.run_id.clone(),
        started_at_ms,
        procs: plan.procs,
        options: Options {
            agents: plan.agents,
            users: plan.users,
            service_clients: if plan.service { plan.procs } else { 0 },
            clusters: plan.clusters,
            duration_s: plan.duration_ms as f64 / 1000.0,
            status_rate: plan.status_rate,
            player_rate: plan.player_rate,
            command_rate: plan.command_rate,
            heartbeat_interval_s: plan.heartbeat_ms as f64 / 1000.0,
            metrics_interval_s: plan.metrics_ms as f64 / 1000.0,
            command_latency_ms: plan.command_latency_ms,
            connect_rate: plan.connect_rate,
            concurrency: plan.concurrency,
            in_flight: plan.flat_out.map(|_| plan.in_flight),
            sources: plan.sources.len(),
        },
        duration_s: secs,
        setup: Setup {
            seconds: setup_secs,
            complete: results.iter().all(|r| r.setup_complete),
            authenticated: setup_c.get(C::Authenticated),
            target: agents.target + users.target + services.target,
            rate_per_s: per_s(setup_c.get(C::Authenticated), setup_secs),
            failures: setup_c.get(C::ConnectFailures),
        },
        connections: Connections {
            agents,
            users,
            services,
        },
        urls: plan
            .targets
            .iter()
            .zip(urls)
            .map(|(t, count)| UrlReport {
                url: t.url.clone(),
                count,
            })
            .collect(),
        counts: named(&window),
        totals: named(&total),
        deliveries: Deliveries {
            events_sent,
            expected,
            received,
            lost,
            loss_ratio: if expected > 0 {
                lost as f64 / expected as f64
            } else {
                0.0
            },
            duplicates: total.get(C::Duplicates),
            gaps: total.get(C::Gaps),
            unexpected: received.saturating_sub(expected),
        },
        lost,
        commands: Commands {
            sent: total.get(C::CommandsSent),
            ok: total.get(C::CommandsOk),
            failed: total.get(C::CommandsFailed),
            unanswered,
        },
        rates: Rates {
            messages_out_per_s: per_s(window.get(C::MsgsOut), secs),
            messages_in_per_s: per_s(window.get(C::MsgsIn), secs),
            deliveries_per_s: per_s(window.get(C::Deliveries), secs),
            event_deliveries_per_s: per_s(window.get(C::SeqDeliveries), secs),
            commands_per_s: per_s(window.get(C::CommandsOk), secs),
            acked_per_s: per_s(window.get(C::FlatAcked), secs),
            connects_per_s: per_s(setup_c.get(C::Authenticated), setup_secs),
        },
        errors: Errors {
            total: stats::errors(&total),
            by_code,
            by_close_code: by_close,
            connect_failures_by_cause: failures,
            disconnects_by_cause: disconnects,
        },
        latency: Latency {
            name: primary.name().into(),
            summary: prim.summary(),
        },
        latencies,
        percentile_curve: prim.curve().into_iter().map(|(p, v)| [p, v]).collect(),
        storm: storm_report,
        gateway,
        tool_cpu: ToolCpu {
            seconds: cpu_ns as f64 / SEC,
            us_per_message: (messages > 0).then(|| cpu_ns as f64 / 1000.0 / messages as f64),
        },
        warnings: Vec::new(),
        timeline,
    };
    rep.warnings = warnings(&rep, &window);
    rep
}

fn warnings(r: &Report, window: &Counters) -> Vec<String> {
    let mut w = Vec::new();
    if cfg!(debug_assertions) {
        w.push("arcgate-load is a debug build: build it with --release for numbers that mean something".into());
    }
    if !r.setup.complete {
        w.push(format!(
            "only {} of {} connections were authenticated before the setup timeout",
            r.setup.authenticated, r.setup.target
        ));
    }
    if r.errors.by_code.contains_key("RATE_LIMIT") {
        w.push("the gateway's rate limit dropped messages (RATE_LIMIT): for capacity runs start it with --rate-limit 0".into());
    }
    if r.errors.connect_failures_by_cause.contains_key("http_503") {
        w.push(
            "the gateway refused connections with 503 (max_connections or max_connection_rate)"
                .into(),
        );
    }
    if r.lost > 0 {
        w.push(format!(
            "{} of {} expected deliveries did not arrive",
            r.lost, r.deliveries.expected
        ));
        if r.urls.len() > 1 {
            w.push(
                "with several URLs a user sees the events of agents on other gateways only \
                 if the gateways are one cluster: expected deliveries assume they are"
                    .into(),
            );
        }
    }
    if let Some(s) = &r.storm {
        if !s.all_recovered {
            w.push(format!(
                "the fleet did not recover from the storm within the window: {} of {} dropped agents back, {} down at the end",
                s.recovered, s.dropped, s.down_at_end
            ));
        }
    }
    // Per message both ways, so that both sides divide by the same count; a window with
    // few messages (a held fleet) says nothing about the cost of one.
    let messages = window.get(C::MsgsOut) + window.get(C::MsgsIn);
    if let (Some(g), Some(tool)) = (
        r.gateway.as_ref().and_then(|g| g.cpu_seconds),
        r.tool_cpu.us_per_message,
    ) {
        let gw = g * 1e6 / messages.max(1) as f64;
        if tool > gw && messages >= 10_000 {
            w.push(format!(
                "the load generator spent more CPU per message ({tool:.2} µs) than the gateway \
                 ({gw:.2} µs): it may be the limit; add --procs"
            ));
        }
    }
    w
}

fn gateway_report(
    g: &GatewaySeen,
    window: &Counters,
    secs: f64,
    conns: u64,
    setup_auths: u64,
) -> GatewayReport {
    let setup_cpu = match (g.before, g.at_t0) {
        (Some(a), Some(b)) => Some(b.cpu_ns.saturating_sub(a.cpu_ns)),
        _ => None,
    };
    let inbound = window.get(C::MsgsOut);
    let deliveries = window.get(C::MsgsIn);
    let (cpu_ns, system_ns) = match (g.at_t0, g.at_t1) {
        (Some(a), Some(b)) => (
            Some(b.cpu_ns.saturating_sub(a.cpu_ns)),
            Some(b.system_ns.saturating_sub(a.system_ns)),
        ),
        _ => (None, None),
    };
    let per = |n: u64| {
        cpu_ns
            .filter(|_| n > 0)
            .map(|c| c as f64 / 1000.0 / n as f64)
    };
    let rss = g.at_t1.map(|s| s.rss_bytes);
    let before = g.before.map(|s| s.rss_bytes);
    GatewayReport {
        pid: g.pid,
        cpu_seconds: cpu_ns.map(|c| c as f64 / SEC),
        cpu_utilization: cpu_ns.filter(|_| secs > 0.0).map(|c| c as f64 / SEC / secs),
        cpu_kernel_share: cpu_ns
            .zip(system_ns)
            .filter(|&(c, _)| c > 0)
            .map(|(c, s)| s as f64 / c as f64),
        inbound_messages: inbound,
        deliveries,
        cpu_us_per_inbound_message: per(inbound),
        cpu_us_per_delivery: per(deliveries),
        setup_cpu_seconds: setup_cpu.map(|c| c as f64 / SEC),
        cpu_us_per_connection: setup_cpu
            .filter(|_| setup_auths > 0)
            .map(|c| c as f64 / 1000.0 / setup_auths as f64),
        rss_bytes: rss,
        rss_before_bytes: before,
        rss_peak_bytes: g.peak_rss.max(rss.unwrap_or(0)),
        connections: conns,
        rss_per_connection_bytes: match (rss, before) {
            (Some(r), Some(b)) if conns > 0 => Some(r.saturating_sub(b) as f64 / conns as f64),
            _ => None,
        },
        note: cpu_ns
            .is_none()
            .then(|| "the gateway process was not readable at the window's start or end".into()),
    }
}

fn lat_line(name: &str, s: &LatSummary) -> String {
    format!(
        "  {:<18} p50 {:.3} ms  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  ({} samples)\n",
        format!("latency {name}"),
        s.p50,
        s.p90,
        s.p99,
        s.p999,
        s.max,
        s.count
    )
}

fn tally_text(t: &Tally) -> String {
    if t.is_empty() {
        return "-".into();
    }
    t.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The summary table printed on stdout.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let c = |k: &str| r.counts.get(k).copied().unwrap_or(0);
    let _ = writeln!(
        s,
        "arcgate-load {} against {}: {:.2} s window, {} process(es), run {}",
        r.scenario, r.target, r.duration_s, r.procs, r.run_id
    );
    let role = |x: &RoleCount| format!("{}/{}", x.ready_at_end, x.target);
    let _ = writeln!(
        s,
        "  {:<18} agents {}  users {}  services {}  (authenticated at the end / wanted)",
        "connections",
        role(&r.connections.agents),
        role(&r.connections.users),
        role(&r.connections.services)
    );
    if r.urls.len() > 1 {
        for (k, u) in r.urls.iter().enumerate() {
            let c = &u.count;
            let _ = writeln!(
                s,
                "  {:<18} {}: agents {}  users {}  services {}  reconnected elsewhere {}",
                format!("url {}", k + 1),
                u.url,
                role(&c.agents),
                role(&c.users),
                role(&c.services),
                c.reconnected_elsewhere
            );
        }
    }
    let _ = writeln!(
        s,
        "  {:<18} {} authenticated in {:.2} s ({:.0}/s), {} failed attempts{}",
        "setup",
        r.setup.authenticated,
        r.setup.seconds,
        r.setup.rate_per_s,
        r.setup.failures,
        if r.setup.complete { "" } else { ", INCOMPLETE" }
    );
    let _ = writeln!(
        s,
        "  {:<18} out {} ({:.0}/s)  in {} ({:.0}/s)",
        "messages",
        c("messages_out"),
        r.rates.messages_out_per_s,
        c("messages_in"),
        r.rates.messages_in_per_s
    );
    let d = &r.deliveries;
    if d.events_sent > 0 || c("deliveries") > 0 {
        let _ = writeln!(
        s,
        "  {:<18} events sent {}  expected {}  received {}  lost {} ({:.4}%)  duplicates {}  ({:.0} deliveries/s)",
        "deliveries",
        d.events_sent,
        d.expected,
        d.received,
        d.lost,
        d.loss_ratio * 100.0,
        d.duplicates,
        r.rates.deliveries_per_s
    );
    }
    if r.options.in_flight.is_some() {
        let _ = writeln!(
            s,
            "  {:<18} sent {}  acknowledged {} ({:.0}/s)",
            "flat out",
            c("flat_out_sent"),
            c("flat_out_acked"),
            r.rates.acked_per_s
        );
    }
    let m = &r.commands;
    if m.sent > 0 || r.options.command_rate > 0.0 {
        let _ = writeln!(
            s,
            "  {:<18} sent {}  ok {}  failed {}  unanswered {}  ({:.1}/s)",
            "commands", m.sent, m.ok, m.failed, m.unanswered, r.rates.commands_per_s
        );
    }
    let e = &r.errors;
    let _ = writeln!(
        s,
        "  {:<18} {}  codes: {}  close codes: {}",
        "errors",
        e.total,
        tally_text(&e.by_code),
        tally_text(&e.by_close_code)
    );
    if !e.connect_failures_by_cause.is_empty() || !e.disconnects_by_cause.is_empty() {
        let _ = writeln!(
            s,
            "  {:<18} attempts: {}  connections: {}",
            "failures",
            tally_text(&e.connect_failures_by_cause),
            tally_text(&e.disconnects_by_cause)
        );
    }
    s.push_str(&lat_line(&r.latency.name, &r.latency.summary));
    for (name, l) in &r.latencies {
        if *name != r.latency.name {
            s.push_str(&lat_line(name, l));
        }
    }
    if let Some(st) = &r.storm {
        let _ = writeln!(
            s,
            "  {:<18} {} after {:.1} s: dropped {}  recovered {}  in {}  down at the end {}{}",
            "storm",
            st.mode,
            st.after_s,
            st.dropped,
            st.recovered,
            st.recovery_s.map_or("-".into(), |v| format!("{v:.2} s")),
            st.down_at_end,
            if st.all_recovered {
                ""
            } else {
                "  NOT RECOVERED"
            }
        );
    }
    if let Some(g) = &r.gateway {
        let f = |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.2}{unit}"));
        let _ = writeln!(
            s,
            "  {:<18} pid {}: cpu {} ({} cores, {} in the kernel), {} per inbound message, {} per delivery, {} per connection set up, rss {} ({} per connection)",
            "gateway",
            g.pid,
            f(g.cpu_seconds, " s"),
            f(g.cpu_utilization, ""),
            g.cpu_kernel_share
                .map_or("-".into(), |k| format!("{:.0} %", k * 100.0)),
            f(g.cpu_us_per_inbound_message, " µs"),
            f(g.cpu_us_per_delivery, " µs"),
            f(g.cpu_us_per_connection, " µs"),
            g.rss_bytes
                .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            f(g.rss_per_connection_bytes, " B"),
        );
    }
    let _ = writeln!(
        s,
        "  {:<18} {:.2} s, {} per message",
        "load generator cpu",
        r.tool_cpu.seconds,
        r.tool_cpu
            .us_per_message
            .map_or("-".into(), |v| format!("{v:.2} µs"))
    );
    for w in &r.warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

/// A line chart as inline SVG; `xfmt` labels the x ticks.
fn chart(title: &str, y_unit: &str, series: &[Series<'_>], x_ticks: &[(f64, String)]) -> String {
    let (w, h, l, r, t, b) = (760.0, 300.0, 70.0, 20.0, 30.0, 40.0);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    for (x, _) in x_ticks {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
    }
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    y1 *= 1.05;
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let sy = |y: f64| h - b - y / y1 * (h - t - b);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{l}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
        w - l - r,
        h - t - b
    );
    for i in 0..=4 {
        let y = y1 * f64::from(i) / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{} {}</text>"##,
            w - r,
            l - 4.0,
            sy(y) + 4.0,
            short(y),
            esc(y_unit),
            yy = sy(y)
        );
    }
    for (x, label) in x_ticks {
        let _ = write!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{t}" y2="{}" stroke="#eee"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - b,
            h - b + 16.0,
            esc(label),
            xx = sx(*x)
        );
    }
    for (k, se) in series.iter().enumerate() {
        let path: Vec<String> = se
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            se.color,
            path.join(" ")
        );
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            w - r - 150.0,
            t + 8.0 + 16.0 * k as f64,
            se.color,
            w - r - 135.0,
            t + 17.0 + 16.0 * k as f64,
            esc(se.name)
        );
    }
    s.push_str("</svg>");
    s
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// The self-contained HTML page (inline SVG, no script, nothing fetched).
pub fn html(r: &Report) -> String {
    let curve_x = |p: f64| -(1.0 - p / 100.0).max(1e-6).log10();
    let mut curves = Vec::new();
    let primary = Series {
        name: &r.latency.name,
        color: COLORS[0],
        points: r
            .percentile_curve
            .iter()
            .map(|&[p, v]| (curve_x(p), v))
            .collect(),
    };
    curves.push(primary);
    let ticks: Vec<(f64, String)> = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
        .iter()
        .enumerate()
        .map(|(i, l)| (i as f64, l.to_string()))
        .collect();
    let lat_chart = chart(
        &format!("Latency by percentile ({})", r.latency.name),
        "ms",
        &curves,
        &ticks,
    );
    let tl = &r.timeline;
    let pick = |f: &dyn Fn(&Point) -> f64| tl.iter().map(|p| (p.t, f(p))).collect::<Vec<_>>();
    let t_end = tl.last().map_or(1.0, |p| p.t);
    let time_ticks: Vec<(f64, String)> = (0..=5)
        .map(|i| {
            let x = t_end * f64::from(i) / 5.0;
            (x, format!("{x:.0} s"))
        })
        .collect();
    let rates = chart(
        "Messages per second",
        "/s",
        &[
            Series {
                name: "sent",
                color: COLORS[0],
                points: pick(&|p| p.out_per_s),
            },
            Series {
                name: "received",
                color: COLORS[1],
                points: pick(&|p| p.in_per_s),
            },
            Series {
                name: "deliveries",
                color: COLORS[2],
                points: pick(&|p| p.deliveries_per_s),
            },
        ],
        &time_ticks,
    );
    let conns = chart(
        "Connections and errors",
        "",
        &[
            Series {
                name: "authenticated",
                color: COLORS[0],
                points: pick(&|p| p.connections as f64),
            },
            Series {
                name: "errors per second",
                color: COLORS[1],
                points: pick(&|p| p.errors as f64),
            },
        ],
        &time_ticks,
    );
    let p99 = chart(
        &format!("p99 {} latency per second", r.latency.name),
        "ms",
        &[Series {
            name: "p99",
            color: COLORS[3],
            points: tl.iter().filter_map(|p| p.p99.map(|v| (p.t, v))).collect(),
        }],
        &time_ticks,
    );
    let mut gw = String::new();
    if tl.iter().any(|p| p.gateway_cpu.is_some()) {
        gw = chart(
            "Gateway CPU (cores)",
            "",
            &[Series {
                name: "cpu",
                color: COLORS[4],
                points: tl
                    .iter()
                    .filter_map(|p| p.gateway_cpu.map(|v| (p.t, v)))
                    .collect(),
            }],
            &time_ticks,
        );
    }
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>arcgate-load {scenario}</title>\
         <style>body{{font-family:sans-serif;margin:24px;color:#222}}pre{{background:#f6f6f6;padding:12px;overflow:auto}}svg{{display:block;margin:16px 0}}</style>\
         </head><body><h1>arcgate-load: {scenario}</h1><pre>{table}</pre>{lat_chart}{p99}{rates}{conns}{gw}</body></html>\n",
        scenario = esc(&r.scenario),
        table = esc(&table(r)),
    )
}
