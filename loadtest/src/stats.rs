//! Counters, latency histograms and the results a worker process hands to the coordinator.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($name:ident => $text:literal,)*) => {
        /// What a worker counts; `NAMES` are the report's keys.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum C { $($name,)* }
        pub const NAMES: &[&str] = &[$($text,)*];
    };
}

counters! {
    Attempts => "connect_attempts",
    Authenticated => "authenticated",
    ConnectFailures => "connect_failures",
    Disconnects => "disconnects",
    MsgsOut => "messages_out",
    MsgsIn => "messages_in",
    BytesOut => "bytes_out",
    BytesIn => "bytes_in",
    Heartbeats => "heartbeats_sent",
    Metrics => "metrics_sent",
    Statuses => "statuses_sent",
    Players => "player_events_sent",
    CommandsReceived => "commands_received",
    ResponsesSent => "command_responses_sent",
    CommandsSent => "commands_sent",
    CommandsOk => "commands_ok",
    CommandsFailed => "commands_failed",
    Deliveries => "deliveries",
    SeqDeliveries => "event_deliveries",
    Duplicates => "duplicates",
    Gaps => "gaps",
    WindowUnique => "window_unique_deliveries",
    Presence => "presence_events",
    ErrorEvents => "error_events",
    FlatSent => "flat_out_sent",
    FlatAcked => "flat_out_acked",
    QueuedResent => "queued_resent",
    QueueDropped => "queue_dropped",
    Pongs => "pongs_sent",
    Foreign => "foreign_events",
    TokenExpiring => "token_expiring",
    Other => "other_events",
    SelfDrops => "self_drops",
}

pub const N: usize = NAMES.len();

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters(pub Vec<u64>);

impl Default for Counters {
    fn default() -> Self {
        Counters(vec![0; N])
    }
}

impl Counters {
    #[inline]
    pub fn add(&mut self, c: C, n: u64) {
        self.0[c as usize] += n;
    }

    #[inline]
    pub fn inc(&mut self, c: C) {
        self.0[c as usize] += 1;
    }

    pub fn get(&self, c: C) -> u64 {
        self.0.get(c as usize).copied().unwrap_or(0)
    }

    /// `self - earlier`, counter by counter.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .zip(earlier.0.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        )
    }

    pub fn merge(&mut self, other: &Counters) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }
}

/// Errors as the status line and the report count them: error events, failed attempts
/// and lost connections, except those a storm or churn dropped on purpose.
pub fn errors(c: &Counters) -> u64 {
    (c.get(C::ErrorEvents) + c.get(C::ConnectFailures) + c.get(C::Disconnects))
        .saturating_sub(c.get(C::SelfDrops))
}

/// A latency histogram in microseconds (1 µs to 1 hour, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Lat(pub Histogram<u64>);

impl Default for Lat {
    fn default() -> Self {
        Lat(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Lat {
    #[inline]
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    #[inline]
    pub fn record_ns(&mut self, ns: u64) {
        self.record_us(ns / 1000);
    }

    /// The non-empty buckets as `[value, count]` pairs (what crosses process boundaries).
    pub fn to_data(&self) -> HistData {
        HistData(
            self.0
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect(),
        )
    }

    pub fn add_data(&mut self, data: &HistData) {
        for &[value, count] in &data.0 {
            let _ = self.0.record_n(value.clamp(1, 3_600_000_000), count);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Milliseconds at percentile `p` (0–100).
    pub fn ms_at(&self, p: f64) -> f64 {
        self.0.value_at_percentile(p) as f64 / 1000.0
    }

    pub fn summary(&self) -> LatSummary {
        let empty = self.0.is_empty();
        let at = |p: f64| if empty { 0.0 } else { self.ms_at(p) };
        LatSummary {
            count: self.count(),
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            p999: at(99.9),
            max: if empty {
                0.0
            } else {
                self.0.max() as f64 / 1000.0
            },
            mean: if empty { 0.0 } else { self.0.mean() / 1000.0 },
        }
    }

    /// Points of the percentile curve: (percentile, ms), log-spaced towards 100.
    pub fn curve(&self) -> Vec<(f64, f64)> {
        if self.0.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut p = 0.0f64;
        // 1/(1-p) from 1 to 10^6 in steps of 10^0.1.
        for step in 0..=60 {
            let x = 10f64.powf(f64::from(step) / 10.0);
            p = 100.0 * (1.0 - 1.0 / x);
            out.push((p, self.ms_at(p)));
        }
        if p < 100.0 {
            out.push((100.0, self.0.max() as f64 / 1000.0));
        }
        out
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistData(pub Vec<[u64; 2]>);

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatSummary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// A map from a cause or code to how often it happened.
pub type Tally = BTreeMap<String, u64>;

pub fn tally(map: &mut Tally, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n += 1;
    } else {
        map.insert(key.to_string(), 1);
    }
}

pub fn merge_tally(into: &mut Tally, from: &Tally) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Connections of one role: how many should exist, and how many were authenticated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleCount {
    pub target: u64,
    pub ready_at_start: u64,
    pub ready_at_end: u64,
    /// Given up for good (4001, 4009).
    pub stopped: u64,
}

impl RoleCount {
    pub fn merge(&mut self, o: &RoleCount) {
        self.target += o.target;
        self.ready_at_start += o.ready_at_start;
        self.ready_at_end += o.ready_at_end;
        self.stopped += o.stopped;
    }
}

/// One gateway URL's connections: by role, those given it first (`target`) and those
/// authenticated on it; and how many it lost that were authenticated again on another URL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlCount {
    pub agents: RoleCount,
    pub users: RoleCount,
    pub services: RoleCount,
    pub reconnected_elsewhere: u64,
}

impl UrlCount {
    pub fn merge(&mut self, o: &UrlCount) {
        self.agents.merge(&o.agents);
        self.users.merge(&o.users);
        self.services.merge(&o.services);
        self.reconnected_elsewhere += o.reconnected_elsewhere;
    }
}

/// The storm as one worker saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StormSeen {
    /// Agents whose connection was lost after the storm started.
    pub dropped: u64,
    /// Of those, authenticated again.
    pub recovered: u64,
    /// When the last of them was authenticated again (monotonic ns; 0: none).
    pub last_recovery_ns: u64,
    /// Agents not authenticated at the end of the window.
    pub down_at_end: u64,
}

/// A worker's periodic report (cumulative counters; latency of the last interval).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick {
    pub at_ns: u64,
    pub ready: u64,
    pub target: u64,
    pub counters: Counters,
    pub errors: u64,
    pub interval: HistData,
}

/// Everything a worker measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub proc_index: u32,
    pub setup_start_ns: u64,
    /// When every connection was authenticated or given up (or the setup timed out).
    pub setup_end_ns: u64,
    pub setup_complete: bool,
    pub t0: u64,
    pub t1: u64,
    pub end_ns: u64,
    /// Counters over the whole run, during setup, and during the window.
    pub total: Counters,
    pub setup: Counters,
    pub window: Counters,
    pub agents: RoleCount,
    pub users: RoleCount,
    pub services: RoleCount,
    /// The same per gateway URL, in the order of `Plan::targets`.
    pub urls: Vec<UrlCount>,
    pub errors_by_code: Tally,
    pub close_codes: Tally,
    pub connect_failures: Tally,
    pub disconnects: Tally,
    /// Relayed events (status and player) sent in the window, per cluster.
    pub sent_by_cluster: Vec<u64>,
    /// Users authenticated at the start of the window, per cluster they see.
    pub users_by_cluster: Vec<u64>,
    pub hists: Vec<HistData>,
    pub storm: Option<StormSeen>,
    pub commands_unanswered: u64,
    pub flat_unacked: u64,
    /// The worker's own CPU time during the window (user + system).
    pub cpu_ns_window: u64,
}

/// The CPU time this process used so far, in nanoseconds.
pub fn self_cpu_ns() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_the_round_trip_and_merge() {
        let mut a = Lat::default();
        let mut b = Lat::default();
        for us in 1..=1000 {
            a.record_us(us);
            b.record_us(us * 1000);
        }
        let mut m = Lat::default();
        m.add_data(&a.to_data());
        m.add_data(&b.to_data());
        assert_eq!(m.count(), 2000);
        assert_eq!(m.0.max(), b.0.max());
        let s = m.summary();
        assert!((s.p50 - 1.0).abs() < 0.01, "{s:?}");
        assert!(s.p99 > 900.0 && s.max <= 1001.0, "{s:?}");
        let curve = m.curve();
        assert!(curve
            .windows(2)
            .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0));
        assert_eq!(Lat::default().summary(), LatSummary::default());
    }

    #[test]
    fn counters_subtract_and_merge() {
        let mut a = Counters::default();
        a.add(C::MsgsOut, 5);
        let mut b = a.clone();
        b.add(C::MsgsOut, 3);
        b.inc(C::Gaps);
        let d = b.since(&a);
        assert_eq!(d.get(C::MsgsOut), 3);
        assert_eq!(d.get(C::Gaps), 1);
        let mut m = d.clone();
        m.merge(&d);
        assert_eq!(m.get(C::MsgsOut), 6);
        assert_eq!(NAMES.len(), N);
    }
}
