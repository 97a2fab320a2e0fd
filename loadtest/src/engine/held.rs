//! Connections held per gateway URL and role: authenticated now, given up, at the window's
//! edges, and lost here but authenticated again elsewhere.

/// Counts by role, indexed by `conn::role_index`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Held {
    pub(super) ready: [u64; 3],
    pub(super) stopped: [u64; 3],
    pub(super) ready_t0: [u64; 3],
    pub(super) ready_t1: [u64; 3],
    pub(super) reconnected_elsewhere: u64,
}

impl Held {
    /// Connections authenticated or given up for good: nothing more to wait for in setup.
    pub(super) fn settled(&self) -> u64 {
        self.ready.iter().sum::<u64>() + self.stopped.iter().sum::<u64>()
    }

    pub(super) fn ready(&self) -> u64 {
        self.ready.iter().sum()
    }
}

/// The sum over URLs, for the fleet-wide figures.
pub(super) fn total(held: &[Held]) -> Held {
    let mut t = Held::default();
    for h in held {
        for r in 0..3 {
            t.ready[r] += h.ready[r];
            t.stopped[r] += h.stopped[r];
            t.ready_t0[r] += h.ready_t0[r];
            t.ready_t1[r] += h.ready_t1[r];
        }
        t.reconnected_elsewhere += h.reconnected_elsewhere;
    }
    t
}
