//! A hashed timer wheel, one per worker: keys with deadlines, 10 ms resolution, no
//! allocation per timer once the buckets have grown.

use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(10);
const BUCKETS: usize = 4096;

/// Deadlines of connections and pending commands, by key.
pub struct Wheel {
    start: Instant,
    /// The last tick whose bucket was processed.
    current: u64,
    buckets: Vec<Vec<(u64, u64)>>,
    len: usize,
}

impl Wheel {
    pub fn new(start: Instant) -> Wheel {
        Wheel {
            start,
            current: 0,
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }

    fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.start);
        (d.as_nanos() / TICK.as_nanos()) as u64
    }

    /// Schedules `key` to fire at or just after `at` (entries are never removed: a fired
    /// key whose owner no longer cares is simply ignored by it).
    pub fn insert(&mut self, at: Instant, key: u64) {
        // Round up so a key never fires before its deadline.
        let due = (self.tick_of(at) + 1).max(self.current + 1);
        self.buckets[due as usize % BUCKETS].push((due, key));
        self.len += 1;
    }

    /// Moves every key due by `now` into `out`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<u64>) {
        let now_tick = self.tick_of(now);
        if now_tick <= self.current {
            return;
        }
        let first = if now_tick - self.current > BUCKETS as u64 {
            now_tick - BUCKETS as u64 + 1
        } else {
            self.current + 1
        };
        for t in first..=now_tick {
            let bucket = &mut self.buckets[t as usize % BUCKETS];
            if bucket.is_empty() {
                continue;
            }
            let before = bucket.len();
            bucket.retain(|&(due, key)| {
                if due <= now_tick {
                    out.push(key);
                    false
                } else {
                    true
                }
            });
            self.len -= before - bucket.len();
        }
        self.current = now_tick;
    }

    /// When the next non-empty bucket comes up (an entry there may belong to a later
    /// round; waking for it costs one scan).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        (1..=BUCKETS as u64)
            .map(|d| self.current + d)
            .find(|t| !self.buckets[*t as usize % BUCKETS].is_empty())
            .map(|t| self.start + Self::offset(t))
    }

    /// How far tick `t` lies from the start; in u64 nanoseconds, as `TICK * t as u32`
    /// wrapped after ~497 days and then named a past deadline forever (a spinning loop).
    fn offset(t: u64) -> Duration {
        Duration::from_nanos(t.saturating_mul(TICK.as_nanos() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fire_in_time_and_not_before() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        w.insert(t0 + Duration::from_millis(25), 1);
        w.insert(t0 + Duration::from_secs(100), 2);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(20), &mut out);
        assert!(out.is_empty());
        assert!(w.next_deadline().unwrap() <= t0 + Duration::from_millis(40));
        w.expire(t0 + Duration::from_millis(40), &mut out);
        assert_eq!(out, vec![1]);
        out.clear();
        w.expire(t0 + Duration::from_secs(99), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_secs(101), &mut out);
        assert_eq!(out, vec![2]);
        assert!(w.next_deadline().is_none());
    }

    #[test]
    fn deadlines_stay_in_the_future_after_years_of_uptime() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        // 600 days: past the 2^32 ticks (~497 days) a u32 multiplier wraps at.
        let now = t0 + Duration::from_secs(600 * 86_400);
        let mut out = Vec::new();
        w.expire(now, &mut out);
        w.insert(now + Duration::from_secs(5), 7);
        let next = w.next_deadline().unwrap();
        assert!(next > now, "deadline {:?} before now", next - t0);
        assert!(next <= now + Duration::from_secs(6));
        w.expire(now + Duration::from_secs(4), &mut out);
        assert!(out.is_empty());
        w.expire(next, &mut out);
        assert_eq!(out, vec![7]);
    }
}
