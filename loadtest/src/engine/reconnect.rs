//! Losing a connection and what comes next: section 8 of the protocol's reconnect rules.

use arcgate::protocol::codec::Decoder;

use crate::stats::{self, C};

use super::conn::{Role, State};
use super::{Engine, Phase, TimerKind, CHURN_DROP, MS, STORM_DROP};

pub(super) const BACKOFF_MIN_MS: u64 = 1_000;
const BACKOFF_MAX_MS: u64 = 30_000;

impl Engine {
    /// Ends the current connection of `i` and decides what comes next (section 8 of the
    /// protocol): stop for 4001 and 4009, at least 30 s for 4008, `Retry-After` for a 503,
    /// otherwise a full-jitter exponential backoff from 1 s to 30 s. A connection whose
    /// gateway is gone tries the next URL when there are several.
    pub(super) fn drop_conn(&mut self, i: usize, cause: &str, close_code: Option<u16>, now: u64) {
        let was = self.conns[i].state;
        if let Some(mut sock) = self.conns[i].sock.take() {
            let _ = self.poll.registry().deregister(&mut sock);
        }
        let max = self.plan.max_message;
        let conn = &mut self.conns[i];
        conn.gen = conn.gen.wrapping_add(1);
        conn.head = Vec::new();
        conn.dec = Decoder::new_client(max);
        conn.wbuf = Vec::new();
        conn.wpos = 0;
        self.flat_unacked += conn.flat_sent - conn.flat_acked.min(conn.flat_sent);
        conn.flat_sent = 0;
        conn.flat_acked = 0;
        conn.flat_pinged = 0;
        conn.pings.clear();
        if was == State::Ready {
            self.c.inc(C::Disconnects);
            if cause == STORM_DROP || cause == CHURN_DROP {
                self.c.inc(C::SelfDrops);
            }
            stats::tally(&mut self.disconnects, cause);
            // By the clock, not the flag: a restart's first closes may be read in the same
            // loop turn that reaches the storm's start.
            let storm = self.storm_t != 0 && now >= self.storm_t && self.plan.storm.is_some();
            if conn.role == Role::Agent && storm && conn.storm_drop_ns == 0 {
                conn.storm_drop_ns = now;
                self.storm.dropped += 1;
            }
        } else {
            self.c.inc(C::ConnectFailures);
            stats::tally(&mut self.connect_failures, cause);
        }
        let conn = &mut self.conns[i];
        let jitter = self.rng.below(conn.backoff_ms + 1);
        let next = next_step(close_code, conn.retry_after_ms, jitter, self.herd_now);
        conn.backoff_ms = grow_backoff(conn.backoff_ms);
        match next {
            Next::Retry { after_ms } if self.phase != Phase::Done => {
                // Waiting first: the URL it was counted at changes only once it left Ready.
                self.set_state(i, State::Waiting);
                if gateway_gone(cause, close_code) {
                    let conn = &mut self.conns[i];
                    if was == State::Ready && conn.left.is_none() {
                        conn.left = Some(conn.url);
                    }
                    conn.url = self.plan.next_url(conn.url);
                }
                self.arm(now + after_ms * MS, TimerKind::Reconnect, i);
            }
            _ => self.set_state(i, State::Stopped),
        }
    }
}

/// What a client does after losing its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Stop,
    Retry { after_ms: u64 },
}

/// Section 8 of the protocol: 4001 (auth failed; a new token is needed) and 4009 (replaced
/// by a newer connection) stop; 4008 (rate limit) waits at least 30 s; a 503's
/// `Retry-After` is honoured; everything else (1001, 1006, 1011, 1012, 1013, 4000, 4002, a
/// failed attempt...) waits `jitter`, a uniform draw from 0 to the current backoff (full
/// jitter), or nothing when the storm reconnects the whole herd at once.
fn next_step(close_code: Option<u16>, retry_after_ms: u64, jitter: u64, herd: bool) -> Next {
    let after_ms = match close_code {
        Some(4001) | Some(4009) => return Next::Stop,
        Some(4008) => 30_000 + jitter,
        _ if retry_after_ms > 0 => retry_after_ms.max(jitter),
        _ if herd => 0,
        _ => jitter,
    };
    Next::Retry { after_ms }
}

/// Whether a lost connection says its gateway is gone (killed, unreachable, hung or shutting
/// down), so that the next attempt is better made at the next URL: refused, reset, closed
/// without a close frame, no answer in time, or a close saying it goes away (1001) or
/// restarts (1012). Any other close code, an HTTP refusal or a protocol error is the gateway
/// speaking, and a drop of our own says nothing about it: the same URL is tried again.
fn gateway_gone(cause: &str, close_code: Option<u16>) -> bool {
    match close_code {
        Some(code) => matches!(code, 1001 | 1012),
        None => matches!(
            cause,
            "refused" | "reset" | "aborted" | "broken_pipe" | "eof" | "timeout" | "unreachable"
        ),
    }
}

/// The next backoff ceiling: doubled, at most 30 s.
fn grow_backoff(ms: u64) -> u64 {
    (ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_decide_what_comes_next() {
        assert_eq!(next_step(Some(4001), 0, 500, false), Next::Stop);
        assert_eq!(next_step(Some(4009), 0, 500, true), Next::Stop);
        assert_eq!(
            next_step(Some(4008), 0, 500, false),
            Next::Retry { after_ms: 30_500 }
        );
        for code in [
            None,
            Some(1000),
            Some(1001),
            Some(1012),
            Some(1013),
            Some(4000),
            Some(4002),
        ] {
            assert_eq!(
                next_step(code, 0, 700, false),
                Next::Retry { after_ms: 700 }
            );
            assert_eq!(next_step(code, 0, 700, true), Next::Retry { after_ms: 0 });
        }
        assert_eq!(
            next_step(None, 3_000, 700, false),
            Next::Retry { after_ms: 3_000 }
        );
        assert_eq!(
            next_step(None, 3_000, 7_000, true),
            Next::Retry { after_ms: 7_000 }
        );
    }

    #[test]
    fn only_a_gone_gateway_moves_the_connection_elsewhere() {
        for cause in ["refused", "reset", "eof", "timeout", "broken_pipe"] {
            assert!(gateway_gone(cause, None), "{cause}");
        }
        assert!(gateway_gone("close_1001", Some(1001)));
        assert!(gateway_gone("close_1012", Some(1012)));
        for (cause, code) in [
            ("close_1000", Some(1000)),
            ("close_4008", Some(4008)),
            ("close_1011", Some(1011)),
            ("http_503", None),
            ("protocol_error_1002", None),
            (STORM_DROP, None),
            (CHURN_DROP, None),
            ("write_backlog", None),
        ] {
            assert!(!gateway_gone(cause, code), "{cause}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let mut b = BACKOFF_MIN_MS;
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(b);
            b = grow_backoff(b);
        }
        assert_eq!(
            seen,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
    }
}
