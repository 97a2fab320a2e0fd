//! Per-machine generations at delivery, so that an older connection of a machine cannot win over a newer one.
//!
//! Every authentication of a machine takes a new generation (a counter in `Shared`, read
//! under the registry entry's lock, so generations follow the order of registrations).
//! Presence and relayed events carry it through the hub; each delivering worker keeps, per
//! machine, the newest generation it delivered. Presence of an older generation is dropped
//! (a replaced connection's `machine:offline` crossing the newer `machine:online`); an
//! older connection's relayed events are delivered until the newer one has delivered an
//! event of its own (a replaced connection's backlog is still relayed, but cannot win
//! over what the newer connection reports).

use std::collections::HashMap;
use std::sync::Arc;

/// How long a machine no longer connected with the generation seen here is remembered:
/// longer than a replaced connection's drain (30 s at most).
pub const RETENTION_MS: u64 = 60_000;
/// How often the forgotten machines are swept.
const SWEEP_EVERY_MS: u64 = 10_000;

/// What a frame about one machine carries through the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub machine: Arc<str>,
    pub gen: u64,
    /// `machine:online`/`machine:offline` rather than a relayed event.
    pub presence: bool,
}

/// The newest generations delivered for one machine.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Of anything about the machine.
    any: u64,
    /// Of its relayed events.
    events: u64,
    /// Unix ms of the last delivery.
    at: u64,
}

/// One worker's newest generation per machine.
#[derive(Debug, Default)]
pub(super) struct Generations {
    newest: HashMap<Arc<str>, Seen>,
    next_sweep: u64,
}

impl Generations {
    /// Whether a frame stamped `stamp` is delivered at `ts` (Unix ms); remembers it if so.
    pub fn admit(&mut self, stamp: &Stamp, ts: u64) -> bool {
        let floor = |s: &Seen| match stamp.presence {
            true => s.any,
            false => s.events,
        };
        match self.newest.get_mut(&stamp.machine) {
            Some(s) if stamp.gen < floor(s) => false,
            Some(s) => {
                s.any = s.any.max(stamp.gen);
                if !stamp.presence {
                    s.events = stamp.gen;
                }
                s.at = ts;
                true
            }
            None => {
                let events = if stamp.presence { 0 } else { stamp.gen };
                let seen = Seen {
                    any: stamp.gen,
                    events,
                    at: ts,
                };
                self.newest.insert(stamp.machine.clone(), seen);
                true
            }
        }
    }

    /// At most every few seconds: forgets the machines not delivered for `RETENTION_MS`
    /// whose live generation (`live`, from the registry) is not the one seen here.
    pub fn sweep(&mut self, ts: u64, live: impl Fn(&str) -> Option<u64>) {
        if ts < self.next_sweep {
            return;
        }
        self.next_sweep = ts + SWEEP_EVERY_MS;
        self.newest.retain(|machine, s| {
            ts.saturating_sub(s.at) < RETENTION_MS || live(machine) == Some(s.any)
        });
    }

    /// Machines remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.newest.len()
    }
}
