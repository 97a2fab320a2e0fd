//! The run's phases: setup, the measured window, the storm and the drain.

use std::io::Write;

use crate::stats;

use super::conn::{Role, State};
use super::held::Held;
use super::{Engine, Phase, MS, QUIET_NS, STORM_DROP, TICK_NS};

impl Engine {
    /// Phase changes: setup done, window start and end, storm, drain end, ticks.
    pub(super) fn advance(&mut self, now: u64, out: &mut dyn Write) -> anyhow::Result<()> {
        if matches!(self.phase, Phase::Setup | Phase::WaitGo | Phase::Window) {
            self.open_more(now);
        }
        if self.phase == Phase::Setup {
            let settled: u64 = self.held.iter().map(Held::settled).sum();
            let all = self.opened == self.conns.len() && settled == self.conns.len() as u64;
            let late = now >= self.setup_start + self.plan.setup_timeout_ms * MS;
            if all || late {
                self.setup_complete = all;
                self.setup_end = now;
                self.snap_setup = self.c.clone();
                self.phase = Phase::WaitGo;
                writeln!(out, "ready")?;
                out.flush()?;
            }
        }
        if self.phase == Phase::WaitGo && self.t0 != 0 && now >= self.t0 {
            self.start_window();
        }
        if self.phase == Phase::Window {
            if self.storm_t != 0 && now >= self.storm_t && !self.storm_started {
                self.start_storm(now);
            }
            if now >= self.t1 {
                self.end_window(now);
            }
        }
        if self.phase == Phase::Drain {
            let settled = self.pending.is_empty()
                && self
                    .agents()
                    .all(|c| c.flat_sent == c.flat_acked || c.state != State::Ready);
            if now >= self.drain_until || (settled && now >= self.last_activity + QUIET_NS) {
                self.phase = Phase::Done;
            }
        }
        if now >= self.next_tick {
            self.next_tick = now + TICK_NS;
            self.tick(now, out)?;
        }
        Ok(())
    }

    fn open_more(&mut self, now: u64) {
        let limit = self.plan.concurrency.max(1);
        while self.opened < self.conns.len() && self.attempting < limit {
            if self.pace_connect.per_s > 0.0 && self.pace_connect.due(now) == 0 {
                break;
            }
            self.pace_connect.done += 1;
            let i = self.opened;
            self.opened += 1;
            self.start_attempt(i, now);
        }
    }

    fn start_window(&mut self) {
        self.phase = Phase::Window;
        self.snap_t0 = self.c.clone();
        for h in &mut self.held {
            h.ready_t0 = h.ready;
        }
        self.cpu_t0 = stats::self_cpu_ns();
        for conn in &self.conns {
            if conn.role == Role::User && conn.state == State::Ready {
                for c in self.plan.user_cluster_list(conn.id) {
                    self.users_by_cluster[c as usize] += 1;
                }
            }
        }
        for pace in [
            &mut self.pace_status,
            &mut self.pace_player,
            &mut self.pace_command,
            &mut self.pace_churn,
        ] {
            pace.start = self.t0.max(1);
        }
        if self.plan.flat_out.is_some() {
            for i in self.agent_base..self.conns.len() {
                if self.conns[i].state == State::Ready {
                    self.fill.push(i as u32);
                }
            }
        }
    }

    fn end_window(&mut self, now: u64) {
        self.phase = Phase::Drain;
        self.snap_t1 = self.c.clone();
        for h in &mut self.held {
            h.ready_t1 = h.ready;
        }
        self.cpu_t1 = stats::self_cpu_ns();
        self.storm.down_at_end = self.agents().filter(|c| c.state != State::Ready).count() as u64;
        for pace in [
            &mut self.pace_status,
            &mut self.pace_player,
            &mut self.pace_command,
            &mut self.pace_churn,
        ] {
            pace.per_s = 0.0;
        }
        self.drain_until = now + self.plan.drain_ms * MS;
        self.last_activity = self.last_activity.max(now);
    }

    fn start_storm(&mut self, now: u64) {
        let drop = self.plan.storm.as_ref().is_some_and(|s| s.drop);
        // Every agent connection lost from now on counts as lost to the storm.
        self.storm_started = true;
        if !drop {
            return;
        }
        self.herd_now = self.plan.storm.as_ref().is_some_and(|s| s.herd);
        for i in self.agent_base..self.conns.len() {
            if self.conns[i].state == State::Ready {
                self.drop_conn(i, STORM_DROP, None, now);
            }
        }
        self.herd_now = false;
    }

    pub(super) fn in_window(&self, ns: u64) -> bool {
        self.t0 != 0 && ns >= self.t0 && ns < self.t1
    }
}
