//! Per-second readings of the worker counters, kept for the last minutes so that the
//! status page has rates and small plots as soon as it opens.

use std::collections::VecDeque;

use crate::metrics::{Metrics, CLOSE_CODES, OUTCOMES, ROLES, ROUND_TRIP_BUCKETS};

/// Readings kept: five minutes at one a second (plus one to take differences from).
pub const KEEP: usize = 301;
/// How many seconds the command latency percentiles look back.
pub const LATENCY_WINDOW: usize = 60;

/// The counters of every worker summed at one instant (cumulative, except the gauges).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Unix seconds of the reading.
    pub t: f64,
    /// Gauge: live sessions by role (`ROLES`).
    pub connections: [u64; ROLES.len()],
    pub accepted: u64,
    pub closes: [u64; CLOSE_CODES.len()],
    pub messages_in: u64,
    pub messages_out: u64,
    pub relay_deliveries: u64,
    pub rate_limited: u64,
    pub slow_consumers: u64,
    pub commands: [u64; OUTCOMES.len()],
    /// Non-cumulative counts per bucket of `ROUND_TRIP_BUCKETS`, then +Inf.
    pub round_trip: [u64; ROUND_TRIP_BUCKETS.len() + 1],
    /// Per worker, nanoseconds spent working.
    pub busy_nanos: Vec<u64>,
}

impl Totals {
    /// Reads every worker's counters (relaxed loads, no locks).
    pub fn read(m: &Metrics, t: f64) -> Totals {
        Totals {
            t,
            connections: m.totals(|w| &w.connections),
            accepted: m.total(|w| w.accepted.get()),
            closes: m.totals(|w| &w.closes),
            messages_in: m.totals(|w| &w.messages_in).iter().sum(),
            messages_out: m.total(|w| w.messages_out.get()),
            relay_deliveries: m.total(|w| w.relay_deliveries.get()),
            rate_limited: m.total(|w| w.rate_limited.get()),
            slow_consumers: m.total(|w| w.slow_consumers.get()),
            commands: m.totals(|w| &w.commands),
            round_trip: m.totals(|w| w.round_trip.buckets()),
            busy_nanos: m.workers.iter().map(|w| w.busy_nanos.get()).collect(),
        }
    }
}

/// Per-second rates between two readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    /// Unix seconds of the later reading.
    pub t: f64,
    /// Gauge: live sessions by role at the later reading.
    pub connections: [u64; ROLES.len()],
    pub connects: f64,
    pub closes: [f64; CLOSE_CODES.len()],
    pub messages_in: f64,
    pub messages_out: f64,
    pub relay_deliveries: f64,
    pub rate_limited: f64,
    pub slow_consumers: f64,
    pub commands: f64,
    /// Per worker, the share of the interval spent working (0 to 1).
    pub busy: Vec<f64>,
}

impl Rates {
    pub fn between(a: &Totals, b: &Totals) -> Rates {
        let dt = (b.t - a.t).max(1e-3);
        let rate = |x: u64, y: u64| y.wrapping_sub(x) as f64 / dt;
        let mut closes = [0.0; CLOSE_CODES.len()];
        for (i, c) in closes.iter_mut().enumerate() {
            *c = rate(a.closes[i], b.closes[i]);
        }
        Rates {
            t: b.t,
            connections: b.connections,
            connects: rate(a.accepted, b.accepted),
            closes,
            messages_in: rate(a.messages_in, b.messages_in),
            messages_out: rate(a.messages_out, b.messages_out),
            relay_deliveries: rate(a.relay_deliveries, b.relay_deliveries),
            rate_limited: rate(a.rate_limited, b.rate_limited),
            slow_consumers: rate(a.slow_consumers, b.slow_consumers),
            commands: rate(a.commands.iter().sum(), b.commands.iter().sum()),
            busy: a
                .busy_nanos
                .iter()
                .zip(&b.busy_nanos)
                .map(|(&x, &y)| (rate(x, y) / 1e9).clamp(0.0, 1.0))
                .collect(),
        }
    }

    pub fn closes_total(&self) -> f64 {
        self.closes.iter().sum()
    }

    /// The mean busy share over the workers.
    pub fn busy_mean(&self) -> f64 {
        if self.busy.is_empty() {
            0.0
        } else {
            self.busy.iter().sum::<f64>() / self.busy.len() as f64
        }
    }
}

/// The last `KEEP` readings, oldest first.
#[derive(Debug, Default)]
pub struct Samples {
    readings: VecDeque<Totals>,
}

impl Samples {
    pub fn push(&mut self, reading: Totals) {
        if self.readings.len() == KEEP {
            self.readings.pop_front();
        }
        self.readings.push_back(reading);
    }

    pub fn latest(&self) -> Option<&Totals> {
        self.readings.back()
    }

    /// Rates over the last `points` intervals, oldest first.
    pub fn history(&self, points: usize) -> Vec<Rates> {
        let n = self.readings.len();
        let skip = n.saturating_sub(points.saturating_add(1));
        let r: Vec<&Totals> = self.readings.iter().skip(skip).collect();
        r.windows(2).map(|w| Rates::between(w[0], w[1])).collect()
    }

    /// Command round trips in the last `LATENCY_WINDOW` seconds up to `now`: the count
    /// and the p50 and p99 in milliseconds (`None` without commands).
    pub fn latency(&self, now: &Totals) -> (u64, Option<f64>, Option<f64>) {
        let n = self.readings.len();
        // Until the window is full, everything since the start counts.
        let base = n
            .checked_sub(LATENCY_WINDOW)
            .filter(|&i| i > 0)
            .and_then(|i| self.readings.get(i));
        let mut counts = now.round_trip;
        if let Some(base) = base {
            for (c, b) in counts.iter_mut().zip(base.round_trip) {
                *c = c.wrapping_sub(b);
            }
        }
        let count: u64 = counts.iter().sum();
        let q = |q: f64| quantile(&counts, q).map(|s| s * 1e3);
        (count, q(0.5), q(0.99))
    }
}

/// The `q` quantile (seconds) of non-cumulative bucket counts, interpolated linearly within
/// its bucket as Prometheus' `histogram_quantile` does; the +Inf bucket answers its lower
/// bound.
pub fn quantile(counts: &[u64; ROUND_TRIP_BUCKETS.len() + 1], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0.0;
    for (i, &c) in counts.iter().enumerate() {
        let c = c as f64;
        if c > 0.0 && seen + c >= rank {
            let lower = if i == 0 {
                0.0
            } else {
                ROUND_TRIP_BUCKETS[i - 1]
            };
            let Some(&upper) = ROUND_TRIP_BUCKETS.get(i) else {
                return Some(lower);
            };
            return Some(lower + (upper - lower) * ((rank - seen) / c));
        }
        seen += c;
    }
    ROUND_TRIP_BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::close_index;

    fn at(t: f64) -> Totals {
        Totals {
            t,
            busy_nanos: vec![0, 0],
            ..Totals::default()
        }
    }

    #[test]
    fn rates_are_differences_per_second() {
        let a = at(100.0);
        let mut b = at(102.0);
        b.accepted = 10;
        b.closes[close_index(1000)] = 4;
        b.messages_in = 300;
        b.busy_nanos = vec![500_000_000, 3_000_000_000];
        let r = Rates::between(&a, &b);
        assert_eq!(r.connects, 5.0);
        assert_eq!(r.closes[close_index(1000)], 2.0);
        assert_eq!(r.closes_total(), 2.0);
        assert_eq!(r.messages_in, 150.0);
        // Busy shares are clamped to the interval.
        assert_eq!(r.busy, vec![0.25, 1.0]);
        assert_eq!(r.busy_mean(), 0.625);
    }

    #[test]
    fn only_the_last_minutes_are_kept() {
        let mut s = Samples::default();
        for i in 0..(KEEP + 50) {
            let mut t = at(i as f64);
            t.accepted = 2 * i as u64;
            s.push(t);
        }
        let h = s.history(usize::MAX);
        assert_eq!(h.len(), KEEP - 1);
        assert!(h.iter().all(|r| r.connects == 2.0));
        assert_eq!(h.last().unwrap().t, (KEEP + 49) as f64);
        assert_eq!(s.history(3).len(), 3);
        assert_eq!(Samples::default().history(10), vec![]);
    }

    #[test]
    fn latency_percentiles_come_from_the_window() {
        let mut s = Samples::default();
        let mut old = at(0.0);
        // An old slow command falls out of the window.
        old.round_trip[ROUND_TRIP_BUCKETS.len()] = 1;
        s.push(old.clone());
        for i in 1..=LATENCY_WINDOW {
            let mut t = old.clone();
            t.t = i as f64;
            s.push(t);
        }
        let mut now = s.latest().unwrap().clone();
        assert_eq!(s.latency(&now), (0, None, None));
        // With fewer readings than the window, the start counts too.
        let mut young = Samples::default();
        young.push(old.clone());
        young.push(old.clone());
        assert_eq!(young.latency(&old).0, 1);
        // 100 commands: 98 within 5 ms, 2 between 0.5 s and 1 s.
        now.round_trip[0] += 98;
        now.round_trip[7] += 2;
        let (count, p50, p99) = s.latency(&now);
        assert_eq!(count, 100);
        let p50 = p50.unwrap();
        assert!(p50 > 0.0 && p50 <= 5.0, "{p50}");
        let p99 = p99.unwrap();
        assert!((500.0..=1000.0).contains(&p99), "{p99}");
    }

    #[test]
    fn quantile_of_the_overflow_bucket_is_its_lower_bound() {
        let mut c = [0u64; ROUND_TRIP_BUCKETS.len() + 1];
        assert_eq!(quantile(&c, 0.5), None);
        c[ROUND_TRIP_BUCKETS.len()] = 3;
        assert_eq!(quantile(&c, 0.99), Some(60.0));
        c = [0; ROUND_TRIP_BUCKETS.len() + 1];
        c[1] = 2;
        // Half of (0.005, 0.01].
        assert!((quantile(&c, 0.5).unwrap() - 0.0075).abs() < 1e-12);
    }
}
