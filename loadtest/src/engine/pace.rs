//! Fleet-wide rates: events due by now at a steady pace, spread over random agents.

use super::conn::State;
use super::{Engine, CHURN_DROP, SEC};

/// A steady rate: how many events are due by now since `start`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    pub(super) per_s: f64,
    pub(super) start: u64,
    pub(super) done: u64,
}

impl Pace {
    pub(super) fn new(per_s: f64) -> Pace {
        Pace {
            per_s,
            start: 0,
            done: 0,
        }
    }

    fn active(&self) -> bool {
        self.per_s > 0.0 && self.start > 0
    }

    pub(super) fn due(&self, now: u64) -> u64 {
        if !self.active() || now < self.start {
            return 0;
        }
        let total = ((now - self.start) as f64 * self.per_s / SEC as f64) as u64;
        total.saturating_sub(self.done)
    }

    pub(super) fn next_at(&self) -> Option<u64> {
        self.active()
            .then(|| self.start + ((self.done + 1) as f64 * SEC as f64 / self.per_s) as u64)
    }
}

impl Engine {
    pub(super) fn run_pacers(&mut self, now: u64) {
        let n = self.pace_status.due(now).min(100_000);
        self.pace_status.done += n;
        for _ in 0..n {
            let i = self.random_agent();
            self.status(i, now);
        }
        let n = self.pace_player.due(now).min(100_000);
        self.pace_player.done += n;
        for _ in 0..n {
            let i = self.random_agent();
            self.player(i, now);
        }
        let n = self.pace_command.due(now).min(100_000);
        self.pace_command.done += n;
        for _ in 0..n {
            self.command(now);
        }
        let n = self.pace_churn.due(now).min(100_000);
        self.pace_churn.done += n;
        for _ in 0..n {
            // Only a connection with nothing left to write: what is still in its buffer
            // was counted as sent, and dropping it would count as lost by the gateway.
            if let Some(i) = self.random_agent() {
                let c = &self.conns[i];
                if c.state == State::Ready && c.wpos >= c.wbuf.len() {
                    self.drop_conn(i, CHURN_DROP, None, now);
                }
            }
        }
    }

    fn random_agent(&mut self) -> Option<usize> {
        let n = (self.conns.len() - self.agent_base) as u64;
        (n > 0).then(|| self.agent_base + self.rng.below(n) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{MS, SEC};

    #[test]
    fn pace_counts_what_is_due() {
        let mut p = Pace::new(100.0);
        assert_eq!(p.due(5 * SEC), 0, "not started");
        p.start = SEC;
        assert_eq!(p.due(SEC + SEC / 2), 50);
        p.done = 50;
        assert_eq!(p.due(SEC + SEC / 2), 0);
        assert_eq!(p.next_at(), Some(SEC + 510 * MS));
        assert_eq!(Pace::new(0.0).next_at(), None);
    }
}
