//! Counters per worker, written only by their worker, summed and rendered in the
//! Prometheus text format (prometheus-client) when `/metrics` is scraped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::auth::AuthFailure;
use crate::bus::{BusSnapshot, BusState};
use crate::protocol::session::Observer;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// A number one thread writes and any thread reads. The owner adds with a plain load and
/// store (no read-modify-write, so no bus lock on the hot path).
#[derive(Debug, Default)]
pub struct Cell(AtomicU64);

impl Cell {
    /// Only the owning worker may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    /// Only the owning worker may call this (gauges).
    #[inline]
    pub fn sub(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_sub(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Connection roles of the `arcgate_connections` gauge; `pending` is not authenticated yet.
pub const ROLES: [&str; 4] = ["pending", "agent", "user", "service"];
pub const ROLE_PENDING: usize = 0;

/// Inbound message events (label `event`); the last two catch everything else.
pub const EVENTS: [&str; 12] = [
    "auth",
    "heartbeat",
    "metrics",
    "server:status",
    "player:joined",
    "player:left",
    "notification",
    "command",
    "command:response",
    "ping",
    "unknown",
    "invalid",
];
const EVENT_UNKNOWN: usize = 10;
const EVENT_INVALID: usize = 11;
/// Index of the `ping` label (WebSocket pings from the peer).
const EVENT_PING: usize = 9;

/// The label index of an inbound event name ("" for a message that is not a valid envelope).
#[inline]
pub fn event_index(event: &str) -> usize {
    match event {
        "" => EVENT_INVALID,
        "auth" => 0,
        "heartbeat" => 1,
        "metrics" => 2,
        "server:status" => 3,
        "player:joined" => 4,
        "player:left" => 5,
        "notification" => 6,
        "command" => 7,
        "command:response" => 8,
        _ => EVENT_UNKNOWN,
    }
}

/// Close codes of the `arcgate_closes_total` counter; 1006 counts connections that ended
/// without a close frame, `other` any code a peer sent that is not listed.
pub const CLOSE_CODES: [&str; 17] = [
    "1000", "1001", "1002", "1003", "1006", "1007", "1008", "1009", "1011", "1012", "1013", "4000",
    "4001", "4002", "4008", "4009", "other",
];

pub fn close_index(code: u16) -> usize {
    CLOSE_CODES
        .iter()
        .position(|c| c.parse::<u16>() == Ok(code))
        .unwrap_or(CLOSE_CODES.len() - 1)
}

/// HTTP statuses of refused upgrades (`arcgate_handshake_rejections_total`).
pub const REJECT_STATUSES: [&str; 8] = ["400", "403", "404", "405", "426", "431", "503", "other"];

pub fn reject_index(status: u16) -> usize {
    REJECT_STATUSES
        .iter()
        .position(|c| c.parse::<u16>() == Ok(status))
        .unwrap_or(REJECT_STATUSES.len() - 1)
}

/// Labels of `arcgate_refused_total`, in `Refusal` order.
pub const REFUSALS: [&str; 4] = ["capacity", "rate", "draining", "handshakes"];

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` reached.
    Capacity,
    /// `max_connection_rate` exceeded.
    Rate,
    /// The gateway is shutting down.
    Draining,
    /// The worker's connections in the handshake reached `max_pending_handshakes`.
    Handshakes,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        REFUSALS[self as usize]
    }
}

/// Reasons of `arcgate_auth_failures_total`, in `AuthFailure` order.
pub const AUTH_REASONS: [&str; 15] = AuthFailure::LABELS;

/// Labels of `arcgate_commands_total`, in `CommandOutcome` order.
pub const OUTCOMES: [&str; 6] = [
    "answered",
    "timeout",
    "disconnected",
    "not_connected",
    "forbidden",
    "draining",
];

/// How a command ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandOutcome {
    Answered,
    Timeout,
    /// The agent went away before answering.
    Disconnected,
    NotConnected,
    Forbidden,
    Draining,
}

impl CommandOutcome {
    pub fn label(self) -> &'static str {
        OUTCOMES[self as usize]
    }
}

/// Upper bounds (seconds) of the command round-trip histogram.
pub const ROUND_TRIP_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram with fixed buckets, written by one worker.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative: observations in (previous bound, bound]; the last one is +Inf.
    buckets: [Cell; ROUND_TRIP_BUCKETS.len() + 1],
    sum_micros: Cell,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = ROUND_TRIP_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(ROUND_TRIP_BUCKETS.len());
        self.buckets[i].add(1);
        self.sum_micros.add(d.as_micros() as u64);
    }
}

/// One worker's counters. Aligned so that two workers never share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerMetrics {
    /// Gauges: live sessions by role (`ROLES`).
    pub connections: [Cell; ROLES.len()],
    pub accepted: Cell,
    pub refused: [Cell; REFUSALS.len()],
    pub handshake_rejections: [Cell; REJECT_STATUSES.len()],
    pub authenticated: [Cell; ROLES.len()],
    pub auth_failures: [Cell; AUTH_REASONS.len()],
    pub closes: [Cell; CLOSE_CODES.len()],
    pub messages_in: [Cell; EVENTS.len()],
    pub messages_out: Cell,
    pub bytes_in: Cell,
    pub bytes_out: Cell,
    pub relay_events: Cell,
    pub relay_deliveries: Cell,
    pub rate_limited: Cell,
    pub slow_consumers: Cell,
    pub commands: [Cell; OUTCOMES.len()],
    pub round_trip: Histogram,
    pub loop_turns: Cell,
    pub busy_nanos: Cell,
    /// Milliseconds since the process epoch at this worker's last loop turn;
    /// `u64::MAX` once the worker has finished (the watchdog skips it).
    pub last_turn_ms: Cell,
}

/// Counters of every worker.
#[derive(Debug)]
pub struct Metrics {
    pub workers: Box<[WorkerMetrics]>,
    /// The origin of `last_turn_ms`.
    epoch: Instant,
}

impl Metrics {
    pub fn new(workers: usize) -> Metrics {
        Metrics {
            workers: (0..workers).map(|_| WorkerMetrics::default()).collect(),
            epoch: Instant::now(),
        }
    }

    /// Milliseconds from the epoch to `t` (at least 1, so 0 means "never").
    pub fn since_epoch_ms(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.epoch).as_millis() as u64).max(1)
    }

    /// Whether every worker that has not finished took a loop turn within `within` of
    /// `now`; workers that never turned yet count as stale.
    pub fn workers_alive(&self, now: Instant, within: Duration) -> bool {
        let now_ms = self.since_epoch_ms(now);
        let limit = within.as_millis() as u64;
        self.workers.iter().all(|w| match w.last_turn_ms.get() {
            u64::MAX => true,
            0 => false,
            t => now_ms.saturating_sub(t) <= limit,
        })
    }

    /// Whether every worker has taken at least one loop turn.
    pub fn all_started(&self) -> bool {
        self.workers.iter().all(|w| w.last_turn_ms.get() != 0)
    }

    pub fn worker(&self, index: u16) -> &WorkerMetrics {
        &self.workers[usize::from(index)]
    }

    fn sum(&self, f: impl Fn(&WorkerMetrics) -> u64) -> u64 {
        self.workers
            .iter()
            .map(f)
            .fold(0u64, |a, b| a.wrapping_add(b))
    }

    fn sums<const N: usize>(&self, f: impl Fn(&WorkerMetrics) -> &[Cell; N]) -> [u64; N] {
        let mut out = [0u64; N];
        for w in self.workers.iter() {
            for (o, c) in out.iter_mut().zip(f(w)) {
                *o = o.wrapping_add(c.get());
            }
        }
        out
    }
}

/// What the process knows besides the worker counters, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct ProcessFacts {
    pub version: &'static str,
    pub backend: &'static str,
    pub start_time_unix: f64,
    pub draining: bool,
    /// Open TCP connections of the WebSocket listener (admission count).
    pub tcp_connections: u64,
    /// Messages waiting in each worker's inbox.
    pub inbox_depth: Vec<u64>,
    pub revocations: u64,
    /// Admin HTTP connections open.
    pub admin_connections: u64,
    pub tls: crate::certs::TlsStatus,
    /// The bus, when `nats_url` is set.
    pub bus: Option<BusSnapshot>,
}

/// The numbers of one scrape, summed over workers; encodes itself as metric families.
#[derive(Debug)]
struct Snapshot {
    facts: ProcessFacts,
    connections: [u64; ROLES.len()],
    accepted: u64,
    refused: [u64; REFUSALS.len()],
    rejections: [u64; REJECT_STATUSES.len()],
    authenticated: [u64; ROLES.len()],
    auth_failures: [u64; AUTH_REASONS.len()],
    closes: [u64; CLOSE_CODES.len()],
    messages_in: [u64; EVENTS.len()],
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    relay_events: u64,
    relay_deliveries: u64,
    rate_limited: u64,
    slow_consumers: u64,
    commands: [u64; OUTCOMES.len()],
    round_trip: [u64; ROUND_TRIP_BUCKETS.len() + 1],
    round_trip_sum_micros: u64,
    turns: Vec<u64>,
    busy_nanos: Vec<u64>,
}

impl Snapshot {
    fn take(m: &Metrics, facts: ProcessFacts) -> Snapshot {
        Snapshot {
            facts,
            connections: m.sums(|w| &w.connections),
            accepted: m.sum(|w| w.accepted.get()),
            refused: m.sums(|w| &w.refused),
            rejections: m.sums(|w| &w.handshake_rejections),
            authenticated: m.sums(|w| &w.authenticated),
            auth_failures: m.sums(|w| &w.auth_failures),
            closes: m.sums(|w| &w.closes),
            messages_in: m.sums(|w| &w.messages_in),
            messages_out: m.sum(|w| w.messages_out.get()),
            bytes_in: m.sum(|w| w.bytes_in.get()),
            bytes_out: m.sum(|w| w.bytes_out.get()),
            relay_events: m.sum(|w| w.relay_events.get()),
            relay_deliveries: m.sum(|w| w.relay_deliveries.get()),
            rate_limited: m.sum(|w| w.rate_limited.get()),
            slow_consumers: m.sum(|w| w.slow_consumers.get()),
            commands: m.sums(|w| &w.commands),
            round_trip: m.sums(|w| &w.round_trip.buckets),
            round_trip_sum_micros: m.sum(|w| w.round_trip.sum_micros.get()),
            turns: m.workers.iter().map(|w| w.loop_turns.get()).collect(),
            busy_nanos: m.workers.iter().map(|w| w.busy_nanos.get()).collect(),
        }
    }
}

type Fmt = Result<(), std::fmt::Error>;

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<Unit>, v: u64) -> Fmt {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, unit.as_ref(), c.metric_type())?)
}

fn gauge<T>(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<Unit>, v: T) -> Fmt
where
    ConstGauge<T>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)
}

/// One family with a sample per label value (every label value always present, so a
/// series never appears out of nowhere); `one` encodes a sample.
fn family<L: AsRef<str>, V>(
    e: &mut DescriptorEncoder,
    kind: MetricType,
    (name, help, unit): (&str, &str, Option<Unit>),
    label: &str,
    values: impl IntoIterator<Item = (L, V)>,
    one: impl Fn(V, MetricEncoder<'_>) -> Fmt,
) -> Fmt {
    let mut m = e.encode_descriptor(name, help, unit.as_ref(), kind)?;
    for (value, v) in values {
        let labels = [(label, value.as_ref())];
        one(v, m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters<L: AsRef<str>, V: EncodeCounterValue>(
    e: &mut DescriptorEncoder,
    desc: (&str, &str, Option<Unit>),
    label: &str,
    values: impl IntoIterator<Item = (L, V)>,
) -> Fmt {
    family(e, MetricType::Counter, desc, label, values, |v, m| {
        ConstCounter::new(v).encode(m)
    })
}

fn gauges<L: AsRef<str>, V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    desc: (&str, &str, Option<Unit>),
    label: &str,
    values: impl IntoIterator<Item = (L, V)>,
) -> Fmt {
    family(e, MetricType::Gauge, desc, label, values, |v, m| {
        ConstGauge::new(v).encode(m)
    })
}

fn labelled<'a, const N: usize>(
    labels: &'a [&'a str; N],
    values: &'a [u64; N],
) -> impl Iterator<Item = (&'a str, u64)> + 'a {
    labels.iter().copied().zip(values.iter().copied())
}

fn per_worker<T: Copy>(values: &[T]) -> impl Iterator<Item = (String, T)> + '_ {
    values.iter().enumerate().map(|(i, &v)| (i.to_string(), v))
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Fmt {
        let f = &self.facts;
        let info = [("version", f.version), ("backend", f.backend)];
        let mut m = e.encode_descriptor(
            "build_info",
            "Version and io backend of this process (always 1)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(m.encode_family(&info)?)?;
        gauge(
            &mut e,
            "start_time",
            "Unix time the process started",
            Some(Unit::Seconds),
            f.start_time_unix,
        )?;
        gauge(
            &mut e,
            "draining",
            "1 while draining after SIGTERM",
            None,
            i64::from(f.draining),
        )?;
        self.encode_tls(&mut e)?;
        self.encode_connections(&mut e)?;
        self.encode_traffic(&mut e)?;
        self.encode_commands(&mut e)?;
        if let Some(bus) = &self.facts.bus {
            encode_bus(&mut e, bus)?;
        }
        self.encode_workers(&mut e)
    }
}

/// `arcgate_bus_*`: only on a node with a bus, so that their absence says "alone".
fn encode_bus(e: &mut DescriptorEncoder, bus: &BusSnapshot) -> Fmt {
    let info = [
        ("cluster", bus.cluster_name.as_str()),
        ("node", bus.node_name.as_str()),
    ];
    let mut m = e.encode_descriptor(
        "bus_info",
        "This node's cluster_name and node_name on the bus (always 1)",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(1i64).encode(m.encode_family(&info)?)?;
    gauges(
        e,
        (
            "bus_state",
            "1 for the state of the connection to NATS: connecting, up or down",
            None,
        ),
        "state",
        BusState::ALL
            .iter()
            .map(|s| (s.as_str(), i64::from(*s == bus.state))),
    )?;
    counter(
        e,
        "bus_published",
        "Events published to the other nodes",
        None,
        bus.published,
    )?;
    counter(
        e,
        "bus_received",
        "Events received from the other nodes",
        None,
        bus.received,
    )?;
    counters(
        e,
        (
            "bus_dropped",
            "Events that could not cross the bus (counted, not retried), by reason",
            None,
        ),
        "reason",
        [("down", bus.dropped_down), ("queue_full", bus.dropped_full)],
    )?;
    counter(
        e,
        "bus_connects",
        "Connections made to NATS, the first and each reconnect",
        None,
        bus.connects,
    )?;
    gauge(
        e,
        "bus_peers",
        "Other nodes alive (a heartbeat within node_timeout)",
        None,
        bus.peers,
    )?;
    gauge(
        e,
        "bus_queue_depth",
        "Messages waiting for the bus thread",
        None,
        bus.queued,
    )
}

impl Snapshot {
    fn encode_tls(&self, e: &mut DescriptorEncoder) -> Fmt {
        let tls = &self.facts.tls;
        let mut m = e.encode_descriptor(
            "tls_info",
            "TLS mode of the WebSocket listener: off or rustls (always 1)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(m.encode_family(&[("mode", tls.mode)])?)?;
        match tls.cert_expiry_unix {
            Some(at) => gauge(
                e,
                "tls_cert_expiry",
                "Unix time the certificate in use expires (notAfter)",
                Some(Unit::Seconds),
                at,
            ),
            None => Ok(()),
        }
    }

    fn encode_connections(&self, e: &mut DescriptorEncoder) -> Fmt {
        let f = &self.facts;
        let conns = self.connections.map(|v| v as i64);
        gauges(
            e,
            (
                "connections",
                "WebSocket sessions by role (pending: not authenticated yet)",
                None,
            ),
            "role",
            ROLES.iter().copied().zip(conns),
        )?;
        gauge(
            e,
            "tcp_connections",
            "Open TCP connections of the WebSocket listener, closing ones included",
            None,
            f.tcp_connections,
        )?;
        counter(
            e,
            "connections_accepted",
            "TCP connections accepted",
            None,
            self.accepted,
        )?;
        counters(
            e,
            (
                "connections_refused",
                "Connections answered 503 at accept, by reason",
                None,
            ),
            "reason",
            labelled(&REFUSALS, &self.refused),
        )?;
        counters(
            e,
            (
                "handshake_rejections",
                "Upgrade requests refused, by HTTP status",
                None,
            ),
            "status",
            labelled(&REJECT_STATUSES, &self.rejections),
        )?;
        counters(
            e,
            (
                "authentications",
                "Successful first authentications, by role",
                None,
            ),
            "role",
            labelled(&ROLES, &self.authenticated).skip(1),
        )?;
        counters(
            e,
            (
                "auth_failures",
                "AUTH_FAILED and AUTH_TIMEOUT, by reason",
                None,
            ),
            "reason",
            labelled(&AUTH_REASONS, &self.auth_failures),
        )?;
        counters(
            e,
            (
                "closes",
                "WebSocket closes by code (1006: ended without a close frame)",
                None,
            ),
            "code",
            labelled(&CLOSE_CODES, &self.closes),
        )?;
        counter(
            e,
            "slow_consumer_closes",
            "Connections closed with 1013 because their outgoing queue overflowed",
            None,
            self.slow_consumers,
        )?;
        gauge(
            e,
            "revocations",
            "Subjects on the revocation list",
            None,
            f.revocations,
        )
    }

    fn encode_traffic(&self, e: &mut DescriptorEncoder) -> Fmt {
        counters(
            e,
            ("messages_in", "Inbound WebSocket messages by event", None),
            "event",
            labelled(&EVENTS, &self.messages_in),
        )?;
        counter(
            e,
            "messages_out",
            "Outbound frames queued",
            None,
            self.messages_out,
        )?;
        counter(
            e,
            "received",
            "Bytes received on WebSocket connections",
            Some(Unit::Bytes),
            self.bytes_in,
        )?;
        counter(
            e,
            "sent",
            "Bytes queued for sending on WebSocket connections",
            Some(Unit::Bytes),
            self.bytes_out,
        )?;
        counter(
            e,
            "relay_events",
            "Agent events and notifications fanned out",
            None,
            self.relay_events,
        )?;
        counter(
            e,
            "relay_deliveries",
            "Relayed frames queued to subscribers",
            None,
            self.relay_deliveries,
        )?;
        counter(
            e,
            "rate_limited_messages",
            "Messages dropped by the per-connection rate limit",
            None,
            self.rate_limited,
        )
    }

    fn encode_commands(&self, e: &mut DescriptorEncoder) -> Fmt {
        counters(
            e,
            ("commands", "Commands by outcome", None),
            "outcome",
            labelled(&OUTCOMES, &self.commands),
        )?;
        // Per-bucket counts: the encoder makes them cumulative.
        let buckets: Vec<(f64, u64)> = ROUND_TRIP_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.round_trip)
            .collect();
        let count = self.round_trip.iter().sum();
        let mut m = e.encode_descriptor(
            "command_round_trip",
            "Time from a command's issue to the agent's answer",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.round_trip_sum_micros as f64 / 1e6,
            count,
            &buckets,
            None,
        )
    }

    fn encode_workers(&self, e: &mut DescriptorEncoder) -> Fmt {
        counters(
            e,
            (
                "worker_loop_iterations",
                "Event loop turns per worker",
                None,
            ),
            "worker",
            per_worker(&self.turns),
        )?;
        counters(
            e,
            (
                "worker_busy",
                "Time each worker spent working rather than waiting",
                Some(Unit::Seconds),
            ),
            "worker",
            self.busy_nanos
                .iter()
                .map(|&n| n as f64 / 1e9)
                .enumerate()
                .map(|(i, v)| (i.to_string(), v)),
        )?;
        gauges(
            e,
            (
                "worker_inbox_depth",
                "Messages waiting in each worker's inbox",
                None,
            ),
            "worker",
            per_worker(&self.facts.inbox_depth),
        )?;
        gauge(
            e,
            "admin_connections",
            "Admin HTTP connections open",
            None,
            self.facts.admin_connections,
        )
    }
}

/// The text format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the scraper's `Accept` asks for it.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Sums every worker's counters and renders them with the process facts.
pub fn render(metrics: &Metrics, facts: ProcessFacts, format: Format) -> String {
    let mut registry = Registry::with_prefix("arcgate");
    registry.register_collector(Box::new(Snapshot::take(metrics, facts)));
    let mut out = String::with_capacity(16 * 1024);
    let result = match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    // Writing into a String cannot fail; a half-written scrape is still better than none.
    let _ = result;
    out
}

/// Sums for readers outside this module (the status sampler of the admin listener).
impl Metrics {
    /// One counter summed over every worker.
    pub fn total(&self, f: impl Fn(&WorkerMetrics) -> u64) -> u64 {
        self.sum(f)
    }

    /// One labelled counter family summed over every worker.
    pub fn totals<const N: usize>(&self, f: impl Fn(&WorkerMetrics) -> &[Cell; N]) -> [u64; N] {
        self.sums(f)
    }
}

impl Histogram {
    /// Non-cumulative counts per bucket of `ROUND_TRIP_BUCKETS`, then +Inf.
    pub fn buckets(&self) -> &[Cell; ROUND_TRIP_BUCKETS.len() + 1] {
        &self.buckets
    }
}

impl Observer for WorkerMetrics {
    #[inline]
    fn message(&self, event: &str) {
        let i = event_index(event);
        self.messages_in[i].add(1);
        if i == EVENT_UNKNOWN {
            let shown: String = event.chars().take(64).collect();
            tracing::debug!(event = %shown, "unknown event ignored");
        }
    }

    fn ping(&self) {
        self.messages_in[EVENT_PING].add(1);
    }

    fn rate_limited(&self) {
        self.rate_limited.add(1);
    }

    fn auth_failed(&self, reason: AuthFailure, message: &str) {
        self.auth_failures[reason as usize].add(1);
        tracing::debug!(reason = message, "AUTH_FAILED");
    }

    fn auth_timeout(&self) {
        self.auth_failures[AuthFailure::Timeout as usize].add(1);
        tracing::debug!("AUTH_TIMEOUT");
    }

    fn closed(&self, code: u16) {
        self.closes[close_index(code)].add(1);
        tracing::debug!(code, "websocket closing");
    }

    fn rejected(&self, status: u16) {
        self.handshake_rejections[reject_index(status)].add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Parses the Prometheus text format strictly enough to catch malformed output:
    /// every sample belongs to a family declared by `# TYPE` before it.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "{line}"
                );
                continue;
            }
            if line.starts_with("# HELP ") || line.starts_with("# UNIT ") || line == "# EOF" {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            let family = types
                .keys()
                .filter(|t| name.starts_with(t.as_str()))
                .max_by_key(|t| t.len());
            assert!(family.is_some(), "sample before its TYPE: {line}");
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                    for pair in labels[1..labels.len() - 1].split(',') {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        assert!(
                            !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                            "{line}"
                        );
                    }
                }
            }
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            assert!(
                samples.insert(series.to_string(), v).is_none(),
                "duplicate {line}"
            );
        }
        samples
    }

    fn facts() -> ProcessFacts {
        ProcessFacts {
            version: "1.2.3",
            backend: "epoll",
            start_time_unix: 1700000000.5,
            draining: true,
            tcp_connections: 7,
            inbox_depth: vec![3, 0],
            revocations: 2,
            admin_connections: 1,
            tls: crate::certs::TlsStatus {
                mode: "rustls",
                cert_file: None,
                cert_expiry_unix: Some(1_800_000_000),
            },
            bus: None,
        }
    }

    #[test]
    fn bus_series_appear_only_with_a_bus() {
        let alone = parse(&render(&Metrics::new(1), facts(), Format::Prometheus));
        assert!(
            !alone.keys().any(|k| k.starts_with("arcgate_bus")),
            "{alone:?}"
        );
        let bus = BusSnapshot {
            state: BusState::Down,
            cluster_name: "prod".into(),
            node_name: "gw-1".into(),
            published: 5,
            received: 6,
            dropped_down: 7,
            dropped_full: 8,
            connects: 2,
            peers: 1,
            queued: 3,
        };
        let facts = ProcessFacts {
            bus: Some(bus),
            ..facts()
        };
        let got = parse(&render(&Metrics::new(1), facts, Format::Prometheus));
        let get = |k: &str| *got.get(k).unwrap_or_else(|| panic!("{k} missing: {got:?}"));
        assert_eq!(get(r#"arcgate_bus_info{cluster="prod",node="gw-1"}"#), 1.0);
        assert_eq!(get(r#"arcgate_bus_state{state="down"}"#), 1.0);
        assert_eq!(get(r#"arcgate_bus_state{state="up"}"#), 0.0);
        assert_eq!(get("arcgate_bus_published_total"), 5.0);
        assert_eq!(get("arcgate_bus_received_total"), 6.0);
        assert_eq!(get(r#"arcgate_bus_dropped_total{reason="down"}"#), 7.0);
        assert_eq!(
            get(r#"arcgate_bus_dropped_total{reason="queue_full"}"#),
            8.0
        );
        assert_eq!(get("arcgate_bus_connects_total"), 2.0);
        assert_eq!(get("arcgate_bus_peers"), 1.0);
        assert_eq!(get("arcgate_bus_queue_depth"), 3.0);
    }

    #[test]
    fn worker_counters_are_summed_at_scrape() {
        let m = Metrics::new(2);
        let (w0, w1) = (m.worker(0), m.worker(1));
        w0.message("heartbeat");
        w1.message("heartbeat");
        w1.message("no-such-event");
        w1.message("");
        w0.ping();
        w0.closed(1012);
        w1.closed(4321);
        w0.auth_failed(AuthFailure::BadSignature, "bad signature");
        w1.auth_timeout();
        w0.rejected(426);
        w0.rate_limited();
        w0.connections[1].add(2);
        w1.connections[1].add(1);
        w1.connections[1].sub(1);
        w0.bytes_in.add(100);
        w1.bytes_in.add(23);
        w0.commands[CommandOutcome::Answered as usize].add(1);
        w0.round_trip.observe(Duration::from_millis(3));
        w1.round_trip.observe(Duration::from_millis(700));
        w1.round_trip.observe(Duration::from_secs(100));
        w1.busy_nanos.add(1_500_000_000);
        let s = parse(&render(&m, facts(), Format::Prometheus));
        let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("no {k} in {s:?}"));
        assert_eq!(get(r#"arcgate_messages_in_total{event="heartbeat"}"#), 2.0);
        assert_eq!(get(r#"arcgate_messages_in_total{event="unknown"}"#), 1.0);
        assert_eq!(get(r#"arcgate_messages_in_total{event="invalid"}"#), 1.0);
        assert_eq!(get(r#"arcgate_messages_in_total{event="ping"}"#), 1.0);
        assert_eq!(get(r#"arcgate_closes_total{code="1012"}"#), 1.0);
        assert_eq!(get(r#"arcgate_closes_total{code="other"}"#), 1.0);
        assert_eq!(
            get(r#"arcgate_auth_failures_total{reason="bad_signature"}"#),
            1.0
        );
        assert_eq!(get(r#"arcgate_auth_failures_total{reason="timeout"}"#), 1.0);
        assert_eq!(
            get(r#"arcgate_handshake_rejections_total{status="426"}"#),
            1.0
        );
        assert_eq!(get("arcgate_rate_limited_messages_total"), 1.0);
        assert_eq!(get(r#"arcgate_connections{role="agent"}"#), 2.0);
        assert_eq!(get("arcgate_received_bytes_total"), 123.0);
        assert_eq!(get(r#"arcgate_commands_total{outcome="answered"}"#), 1.0);
        assert_eq!(
            get(r#"arcgate_command_round_trip_seconds_bucket{le="0.005"}"#),
            1.0
        );
        assert_eq!(
            get(r#"arcgate_command_round_trip_seconds_bucket{le="1"}"#),
            2.0
        );
        assert_eq!(
            get(r#"arcgate_command_round_trip_seconds_bucket{le="+Inf"}"#),
            3.0
        );
        assert_eq!(get("arcgate_command_round_trip_seconds_count"), 3.0);
        assert!((get("arcgate_command_round_trip_seconds_sum") - 100.703).abs() < 1e-6);
        assert_eq!(get(r#"arcgate_worker_busy_seconds_total{worker="1"}"#), 1.5);
        assert_eq!(get(r#"arcgate_worker_inbox_depth{worker="0"}"#), 3.0);
        assert_eq!(
            get(r#"arcgate_build_info{version="1.2.3",backend="epoll"}"#),
            1.0
        );
        assert_eq!(get("arcgate_draining"), 1.0);
        assert_eq!(get("arcgate_tcp_connections"), 7.0);
        assert_eq!(get("arcgate_revocations"), 2.0);
        assert_eq!(get(r#"arcgate_tls_info{mode="rustls"}"#), 1.0);
        assert_eq!(get("arcgate_tls_cert_expiry_seconds"), 1_800_000_000.0);
    }

    #[test]
    fn openmetrics_ends_with_eof() {
        let text = render(&Metrics::new(1), facts(), Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"), "{text}");
        parse(&text);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }

    #[test]
    fn labels_stay_within_their_sets() {
        assert_eq!(event_index("command:response"), 8);
        assert_eq!(EVENTS[event_index("x".repeat(100).as_str())], "unknown");
        assert_eq!(CLOSE_CODES[close_index(1006)], "1006");
        assert_eq!(CLOSE_CODES[close_index(3000)], "other");
        assert_eq!(REJECT_STATUSES[reject_index(599)], "other");
        assert_eq!(Refusal::Capacity.label(), "capacity");
        assert_eq!(Refusal::Handshakes.label(), "handshakes");
        assert_eq!(CommandOutcome::Answered.label(), "answered");
        assert_eq!(CommandOutcome::Draining.label(), "draining");
        assert_eq!(AUTH_REASONS[AuthFailure::Expired as usize], "expired");
        assert_eq!(AuthFailure::IdentityChanged.label(), "identity_changed");
        assert_eq!(AUTH_REASONS[AuthFailure::Other as usize], "other");
    }

    #[test]
    fn liveness_follows_the_last_turn() {
        let m = Metrics::new(2);
        let t0 = Instant::now();
        assert!(!m.all_started());
        assert!(!m.workers_alive(t0, Duration::from_secs(1)));
        m.worker(0).last_turn_ms.set(m.since_epoch_ms(t0));
        m.worker(1).last_turn_ms.set(u64::MAX);
        assert!(m.all_started());
        assert!(m.workers_alive(t0, Duration::from_secs(1)));
        assert!(!m.workers_alive(t0 + Duration::from_secs(3), Duration::from_secs(1)));
    }
}
