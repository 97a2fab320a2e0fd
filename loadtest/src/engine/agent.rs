//! What an agent sends on its own: heartbeats, metrics, status and player events,
//! command answers.

use crate::msg;
use crate::util::{unix_ms, unix_s};

use super::conn::{Kind, State};
use super::{Engine, Phase, TimerKind, MS};

impl Engine {
    pub(super) fn figures(&mut self, i: usize) -> msg::Figures {
        msg::Figures {
            seed: self.rng.next_u64(),
            uptime_s: unix_s().saturating_sub(self.conns[i].up_since_s),
        }
    }

    pub(super) fn heartbeat(&mut self, i: usize, now: u64) {
        if self.conns[i].state == State::Stopped || self.phase == Phase::Done {
            return;
        }
        self.arm(now + self.plan.heartbeat_ms * MS, TimerKind::Heartbeat, i);
        let fig = self.figures(i);
        let conn = &mut self.conns[i];
        conn.hb_seq += 1;
        self.scratch.clear();
        msg::heartbeat(
            &mut self.scratch,
            &conn.machine_id,
            conn.hb_seq,
            now,
            unix_ms(),
            &fig,
        );
        self.send_or_queue(i, Kind::Heartbeat, now);
    }

    pub(super) fn metrics(&mut self, i: usize, now: u64) {
        if self.conns[i].state == State::Stopped || self.phase == Phase::Done {
            return;
        }
        self.arm(now + self.plan.metrics_ms * MS, TimerKind::Metrics, i);
        let fig = self.figures(i);
        let conn = &mut self.conns[i];
        conn.hb_seq += 1;
        self.scratch.clear();
        msg::metrics(&mut self.scratch, &conn.machine_id, conn.hb_seq, now, &fig);
        self.send_or_queue(i, Kind::Metrics, now);
    }

    pub(super) fn build_status(&mut self, i: usize, now: u64) {
        let r = self.rng.next_u64();
        let conn = &mut self.conns[i];
        conn.seq += 1;
        self.scratch.clear();
        msg::status(
            &mut self.scratch,
            conn.seq,
            now,
            conn.id,
            r % 4,
            msg::STATUSES[(r >> 8) as usize % msg::STATUSES.len()],
            (r >> 16) % 33,
        );
    }

    pub(super) fn status(&mut self, i: Option<usize>, now: u64) {
        let Some(i) = i else { return };
        self.build_status(i, now);
        self.send_or_queue(i, Kind::Status, now);
    }

    pub(super) fn player(&mut self, i: Option<usize>, now: u64) {
        let Some(i) = i else { return };
        let r = self.rng.next_u64();
        let conn = &mut self.conns[i];
        conn.seq += 1;
        self.scratch.clear();
        msg::player(
            &mut self.scratch,
            r & 1 == 0,
            conn.seq,
            now,
            conn.id,
            (r >> 1) % 4,
            (r >> 8) % 100_000,
        );
        self.send_or_queue(i, Kind::Player, now);
    }

    pub(super) fn replies(&mut self, i: usize, now: u64) {
        while let Some((due, _)) = self.conns[i].replies.front() {
            if *due > now {
                let due = *due;
                self.arm(due, TimerKind::Reply, i);
                return;
            }
            let Some((_, id)) = self.conns[i].replies.pop_front() else {
                return;
            };
            self.scratch.clear();
            msg::command_response(&mut self.scratch, &id);
            self.send_or_queue(i, Kind::Response, now);
        }
    }
}
