//! What the gateway sends: frames and events, counted and timed.

use arcgate::protocol::codec::{Flow, Message, OP_PONG};

use crate::msg::{self, Relay, Relayed};
use crate::plan::Hist;
use crate::stats::{self, C};
use crate::ws;

use super::conn::Role;
use super::{Engine, TimerKind, MS};

impl Engine {
    pub(super) fn on_message(&mut self, i: usize, gen: u32, m: Message<'_>, now: u64) -> Flow {
        if self.conns[i].gen != gen {
            return Flow::Stop;
        }
        match m {
            Message::Text(t) => {
                self.c.inc(C::MsgsIn);
                self.on_text(i, t, now);
            }
            Message::Binary(_) => {
                self.c.inc(C::MsgsIn);
                self.c.inc(C::Other);
            }
            Message::Ping(p) => {
                let mask = self.rng.mask();
                let conn = &mut self.conns[i];
                ws::push_frame(&mut conn.wbuf, OP_PONG, p, mask);
                self.c.inc(C::Pongs);
                self.mark_dirty(i);
            }
            Message::Pong(p) => self.on_pong(i, p, now),
            Message::Close(code, _) => {
                let key = code.map_or("none".to_string(), |c| c.to_string());
                stats::tally(&mut self.close_codes, &key);
                self.send_close(i, code.unwrap_or(1000));
                self.flush(i, now);
                let cause = format!("close_{key}");
                self.drop_conn(i, &cause, code, now);
            }
        }
        if self.conns[i].gen == gen {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }

    fn on_text(&mut self, i: usize, t: &str, now: u64) {
        let Some(event) = msg::event(t) else {
            self.c.inc(C::Other);
            return;
        };
        match event {
            "authenticated" => self.on_authenticated(i, now),
            "server:updated" | "player:joined" | "player:left" => self.on_delivery(i, t, now),
            "heartbeat" | "metrics" | "notification" => {
                self.c.inc(C::Deliveries);
            }
            "machine:online" | "machine:offline" => self.c.inc(C::Presence),
            "command" if self.conns[i].role == Role::Agent => {
                self.c.inc(C::CommandsReceived);
                if let Some(id) = msg::str_after(t, r#""id":""#) {
                    let due = now + self.plan.command_latency_ms * MS;
                    let conn = &mut self.conns[i];
                    let first = conn.replies.is_empty();
                    conn.replies.push_back((due, id.into()));
                    if first {
                        self.arm(due, TimerKind::Reply, i);
                    }
                }
            }
            "command:response" => {
                if let Some(started) = self.request_of(t) {
                    self.c.inc(C::CommandsOk);
                    self.record(Hist::Command, now.saturating_sub(started));
                    self.last_activity = now;
                }
            }
            "error" => {
                self.c.inc(C::ErrorEvents);
                let code = msg::str_after(t, r#""code":""#).unwrap_or("UNKNOWN");
                stats::tally(&mut self.errors_by_code, code);
                if code == "COMMAND_FAILED" && self.request_of(t).is_some() {
                    self.c.inc(C::CommandsFailed);
                    self.last_activity = now;
                }
            }
            "token:expiring" => {
                self.c.inc(C::TokenExpiring);
                // A good client refreshes its token on the live connection.
                self.send_auth(i);
            }
            _ => self.c.inc(C::Other),
        }
    }

    fn on_delivery(&mut self, i: usize, t: &str, now: u64) {
        self.c.inc(C::Deliveries);
        let Relay::Ours(Relayed {
            agent,
            seq,
            sent_ns: sent,
        }) = self.relay.read(t)
        else {
            self.c.inc(C::Foreign);
            return;
        };
        self.c.inc(C::SeqDeliveries);
        let last = self.conns[i].seen.entry(agent).or_insert(0);
        if seq <= *last {
            self.c.inc(C::Duplicates);
            return;
        }
        let gap = seq - *last - 1;
        *last = seq;
        self.c.add(C::Gaps, gap);
        if sent > 0 && sent <= now {
            self.record(Hist::Delivery, now - sent);
        }
        if self.in_window(sent) {
            self.c.inc(C::WindowUnique);
        }
        self.last_activity = now;
    }

    pub(super) fn record(&mut self, h: Hist, ns: u64) {
        self.hists[h.index()].record_ns(ns);
        if h == self.plan.scenario.primary() {
            self.interval.record_ns(ns);
        }
    }
}
