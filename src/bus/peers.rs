//! Peer liveness as a sans-IO table: heartbeats seen (time passed in) and peers unseen for `node_timeout`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A change in what this node knows of another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// First heartbeat, or the first since it was reported dead.
    Up(Box<str>),
    /// No heartbeat for `node_timeout`.
    Dead(Box<str>),
}

/// The peers heard from, with the time of their last heartbeat.
#[derive(Debug)]
pub struct Peers {
    timeout: Duration,
    last_seen: HashMap<Box<str>, Instant>,
}

impl Peers {
    pub fn new(timeout: Duration) -> Peers {
        Peers {
            timeout,
            last_seen: HashMap::new(),
        }
    }

    /// A heartbeat from `node` at `now`.
    pub fn seen(&mut self, node: &str, now: Instant) -> Option<PeerEvent> {
        match self.last_seen.get_mut(node) {
            Some(at) => {
                *at = (*at).max(now);
                None
            }
            None => {
                self.last_seen.insert(node.into(), now);
                Some(PeerEvent::Up(node.into()))
            }
        }
    }

    /// The peers unseen for the timeout at `now`, forgotten (a later heartbeat is `Up` again).
    pub fn expire(&mut self, now: Instant) -> Vec<PeerEvent> {
        let timeout = self.timeout;
        let mut dead = Vec::new();
        self.last_seen.retain(|node, at| {
            let alive = now.saturating_duration_since(*at) < timeout;
            if !alive {
                dead.push(node.clone());
            }
            alive
        });
        dead.sort();
        dead.into_iter().map(PeerEvent::Dead).collect()
    }

    /// Peers alive.
    pub fn len(&self) -> usize {
        self.last_seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_seen.is_empty()
    }

    /// The live peers' names, sorted.
    pub fn names(&self) -> Vec<Box<str>> {
        let mut names: Vec<_> = self.last_seen.keys().cloned().collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_up_once_and_dead_after_the_timeout() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut peers = Peers::new(s(5));
        assert_eq!(peers.seen("b", t0), Some(PeerEvent::Up("b".into())));
        assert_eq!(peers.seen("b", t0 + s(1)), None);
        assert_eq!(peers.seen("c", t0 + s(2)), Some(PeerEvent::Up("c".into())));
        // b was last seen at 1 s: alive until 6 s.
        assert_eq!(peers.expire(t0 + s(5)), vec![]);
        assert_eq!(peers.expire(t0 + s(6)), vec![PeerEvent::Dead("b".into())]);
        assert_eq!(peers.names(), vec!["c".into()]);
        // Reported once; a heartbeat afterwards brings it back.
        assert_eq!(peers.expire(t0 + s(6)), vec![]);
        assert_eq!(peers.seen("b", t0 + s(7)), Some(PeerEvent::Up("b".into())));
        assert_eq!(peers.len(), 2);
    }

    #[test]
    fn a_late_heartbeat_does_not_move_last_seen_back() {
        let t0 = Instant::now();
        let mut peers = Peers::new(Duration::from_secs(5));
        peers.seen("b", t0 + Duration::from_secs(4));
        peers.seen("b", t0);
        assert!(peers.expire(t0 + Duration::from_secs(8)).is_empty());
    }
}
