//! Tokens, auth messages, and what an agent starts once it is authenticated.

use std::time::Duration;

use arcgate::auth::{mint_hs256, TokenSpec};

use crate::msg;
use crate::plan::Hist;
use crate::stats::C;
use crate::util::unix_s;

use super::conn::{Role, State};
use super::reconnect::BACKOFF_MIN_MS;
use super::{Engine, Phase, TimerKind, MS};

impl Engine {
    pub(super) fn token(&self, i: usize) -> String {
        let conn = &self.conns[i];
        let ttl = Duration::from_secs(self.plan.token_ttl_s.max(60));
        let spec = match conn.role {
            Role::Agent => TokenSpec {
                role: "agent".into(),
                sub: self.plan.machine_id(conn.id),
                cluster: Some(self.plan.cluster_id(conn.cluster)),
                ttl,
                ..TokenSpec::default()
            },
            Role::User => TokenSpec {
                role: "user".into(),
                sub: format!("usr_{}_{}", self.plan.run_id, conn.id),
                clusters: Some(
                    self.plan
                        .user_cluster_list(conn.id)
                        .into_iter()
                        .map(|c| self.plan.cluster_id(c))
                        .collect(),
                ),
                ttl,
                ..TokenSpec::default()
            },
            Role::Service => TokenSpec {
                role: "service".into(),
                sub: format!("arcgate-load-{}-{}", self.plan.run_id, conn.id),
                ttl,
                ..TokenSpec::default()
            },
        };
        mint_hs256(&self.plan.secret, &spec, unix_s())
    }

    pub(super) fn send_auth(&mut self, i: usize) {
        let token = self.token(i);
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        match self.conns[i].role {
            Role::Agent => msg::agent_auth(&mut payload, &token, &self.conns[i].machine_id),
            _ => msg::client_auth(&mut payload, &token),
        }
        self.write_text(i, &payload);
        self.scratch = payload;
    }

    pub(super) fn on_authenticated(&mut self, i: usize, now: u64) {
        if self.conns[i].state != State::Authing {
            return;
        }
        self.set_state(i, State::Ready);
        self.c.inc(C::Authenticated);
        let conn = &mut self.conns[i];
        conn.backoff_ms = BACKOFF_MIN_MS;
        if let Some(lost) = conn.left.take().filter(|&u| u != conn.url) {
            self.held[lost as usize].reconnected_elsewhere += 1;
        }
        let started = conn.attempt_ns;
        let storm_drop = conn.storm_drop_ns;
        let recovered = conn.storm_recovered;
        self.record(Hist::Connect, now.saturating_sub(started));
        if storm_drop != 0 && !recovered {
            self.conns[i].storm_recovered = true;
            self.storm.recovered += 1;
            self.storm.last_recovery_ns = now;
            self.record(Hist::Reconnect, now.saturating_sub(storm_drop));
        }
        if self.conns[i].role != Role::Agent {
            return;
        }
        if !self.conns[i].hb_armed {
            self.conns[i].hb_armed = true;
            self.conns[i].up_since_s = unix_s().saturating_sub(self.rng.below(86_400 * 30));
            if self.plan.heartbeat_ms > 0 {
                let at = now + self.rng.below(self.plan.heartbeat_ms * MS);
                self.arm(at, TimerKind::Heartbeat, i);
            }
            if self.plan.metrics_ms > 0 {
                let at = now + self.rng.below(self.plan.metrics_ms * MS);
                self.arm(at, TimerKind::Metrics, i);
            }
        }
        let queued = std::mem::take(&mut self.conns[i].queue);
        self.c.add(C::QueuedResent, queued.len() as u64);
        for q in queued {
            self.write_msg(i, q.kind, &q.payload, q.sent_ns);
        }
        if self.phase == Phase::Window && self.plan.flat_out.is_some() {
            self.fill.push(i as u32);
        }
    }
}
