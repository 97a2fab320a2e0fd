//! Flat-out sending: a bounded number of messages in flight, acknowledged by pings.

use arcgate::protocol::codec::OP_PING;

use crate::plan::{FlatOut, Hist};
use crate::stats::C;
use crate::util::unix_ms;
use crate::{msg, ws};

use super::conn::{Kind, State};
use super::{Engine, Phase};

impl Engine {
    pub(super) fn run_fill(&mut self, now: u64) {
        if self.fill.is_empty() {
            return;
        }
        let fill = std::mem::take(&mut self.fill);
        if self.phase == Phase::Window && now < self.t1 {
            for &i in &fill {
                self.fill_one(i as usize, now);
            }
        }
    }

    fn fill_one(&mut self, i: usize, now: u64) {
        let Some(what) = self.plan.flat_out else {
            return;
        };
        let limit = u64::from(self.plan.in_flight.max(1));
        let batch = (limit / 2).max(1);
        while self.conns[i].state == State::Ready
            && self.conns[i].flat_sent - self.conns[i].flat_acked < limit
        {
            match what {
                FlatOut::Heartbeat => {
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
                FlatOut::Status => {
                    self.build_status(i, now);
                    self.send_or_queue(i, Kind::Status, now);
                }
            }
            self.c.inc(C::FlatSent);
            let conn = &mut self.conns[i];
            conn.flat_sent += 1;
            if conn.flat_sent - conn.flat_pinged >= batch {
                self.ping(i, now);
            }
        }
        if self.conns[i].flat_sent > self.conns[i].flat_pinged {
            self.ping(i, now);
        }
    }

    fn ping(&mut self, i: usize, now: u64) {
        let mask = self.rng.mask();
        let conn = &mut self.conns[i];
        conn.flat_pinged = conn.flat_sent;
        conn.pings.push_back((conn.flat_sent, now));
        ws::push_frame(&mut conn.wbuf, OP_PING, &conn.flat_sent.to_be_bytes(), mask);
        self.mark_dirty(i);
    }

    pub(super) fn on_pong(&mut self, i: usize, p: &[u8], now: u64) {
        let Ok(bytes) = <[u8; 8]>::try_from(p) else {
            return;
        };
        let n = u64::from_be_bytes(bytes);
        let mut acked_any = false;
        while let Some(&(count, sent)) = self.conns[i].pings.front() {
            if count > n {
                break;
            }
            self.conns[i].pings.pop_front();
            self.record(Hist::Ack, now.saturating_sub(sent));
            acked_any = true;
        }
        let conn = &mut self.conns[i];
        if acked_any && n > conn.flat_acked && n <= conn.flat_sent {
            self.c.add(C::FlatAcked, n - conn.flat_acked);
            conn.flat_acked = n;
            self.last_activity = now;
            self.fill.push(i as u32);
        }
    }
}
