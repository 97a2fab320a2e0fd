//! Fan-out: who on this worker receives which cluster's events, and relaying an event
//! once encoded to the local subscribers and to every other worker with receivers.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexSet;

use super::{Action, Hub, Msg, Sink, Stamp};
use crate::conn::ConnId;
use crate::protocol::envelope::{self, RelayKind};

/// This worker's subscribers: users by cluster, and services (who see every cluster).
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    users: HashMap<Box<str>, IndexSet<ConnId>>,
    services: IndexSet<ConnId>,
}

impl Subscriptions {
    /// `first` is called with each cluster this worker had no user of.
    pub fn subscribe_user(
        &mut self,
        id: ConnId,
        clusters: &[Box<str>],
        mut first: impl FnMut(&str),
    ) {
        for c in clusters {
            let set = self.users.entry(c.clone()).or_default();
            if set.is_empty() {
                first(c);
            }
            set.insert(id);
        }
    }

    /// `last` is called with each cluster this worker has no user of any more.
    pub fn unsubscribe_user(
        &mut self,
        id: ConnId,
        clusters: &[Box<str>],
        mut last: impl FnMut(&str),
    ) {
        for c in clusters {
            if let Some(set) = self.users.get_mut(c) {
                set.swap_remove(&id);
                if set.is_empty() {
                    self.users.remove(c);
                    last(c);
                }
            }
        }
    }

    pub fn subscribe_service(&mut self, id: ConnId) {
        self.services.insert(id);
    }

    pub fn unsubscribe_service(&mut self, id: ConnId) {
        self.services.swap_remove(&id);
    }

    /// Whether a local connection receives an event of `cluster`.
    fn any(&self, cluster: &str, services_only: bool) -> bool {
        !self.services.is_empty() || (!services_only && self.users.contains_key(cluster))
    }
}

impl Hub {
    /// An event of connection generation `gen` of an agent: encoded once, delivered here
    /// and to every other worker with receivers; not encoded at all when nobody would
    /// receive it.
    #[allow(clippy::too_many_arguments)]
    pub fn relay(
        &mut self,
        kind: &RelayKind<'_>,
        machine_id: &str,
        cluster_id: &str,
        data: &str,
        gen: u64,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let services_only = kind.services_only();
        // Users on other nodes may receive it (services see only their own node's).
        let remote = self.shared.bus && !services_only;
        if !remote && !self.has_receivers(cluster_id, services_only) {
            return;
        }
        let frame = envelope::relay(kind.outbound(), machine_id, cluster_id, data, ts);
        let stamp = Stamp {
            machine: Arc::from(machine_id),
            gen,
            presence: false,
        };
        let cluster = Arc::from(cluster_id);
        self.fan_out(cluster, frame, services_only, Some(stamp), ts, out);
    }

    /// A service's notification for a cluster.
    pub fn notify(&mut self, cluster_id: &str, data: &str, ts: u64, out: &mut impl Sink) {
        let frame = envelope::notification(data, ts);
        self.fan_out(Arc::from(cluster_id), frame, false, None, ts, out);
    }

    /// Whether anyone, here or on another worker, would receive an event of `cluster`.
    fn has_receivers(&self, cluster: &str, services_only: bool) -> bool {
        self.subs.any(cluster, services_only)
            || self
                .shared
                .workers
                .iter()
                .enumerate()
                .any(|(w, p)| w != usize::from(self.index) && p.receives(services_only))
    }

    pub(super) fn fan_out(
        &mut self,
        cluster: Arc<str>,
        frame: Bytes,
        services_only: bool,
        stamp: Option<Stamp>,
        ts: u64,
        out: &mut impl Sink,
    ) {
        self.m().relay_events.add(1);
        if self.shared.bus && !services_only {
            out.act(Action::Publish {
                cluster: &cluster,
                frame: &frame,
            });
        }
        for (w, p) in self.shared.workers.iter().enumerate() {
            if w != usize::from(self.index) && p.receives(services_only) {
                let msg = Msg::Deliver {
                    cluster: cluster.clone(),
                    frame: frame.clone(),
                    services_only,
                    remote: false,
                    stamp: stamp.clone(),
                };
                out.act(Action::Post {
                    worker: w as u16,
                    msg,
                });
            }
        }
        let reach = Reach::of(services_only, false);
        self.deliver(&cluster, &frame, reach, stamp.as_ref(), ts, out);
    }

    /// Hands an encoded event to this worker's subscribers of `cluster`, unless it is
    /// about an older connection of its machine than one delivered here (`generations`).
    pub(super) fn deliver(
        &mut self,
        cluster: &str,
        frame: &Bytes,
        reach: Reach,
        stamp: Option<&Stamp>,
        ts: u64,
        out: &mut impl Sink,
    ) {
        let machines = &self.shared.machines;
        self.delivered
            .sweep(ts, |m| machines.get(m).map(|loc| loc.gen));
        if stamp.is_some_and(|s| !self.delivered.admit(s, ts)) {
            return;
        }
        let subs = &self.subs;
        if !subs.services.is_empty() && reach != Reach::Users {
            let to = subs.services.iter();
            out.act(Action::Deliver { to, frame });
        }
        if reach == Reach::Services {
            return;
        }
        if let Some(set) = subs.users.get(cluster) {
            out.act(Action::Deliver {
                to: set.iter(),
                frame,
            });
        }
    }
}

/// Whom on this worker an event reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// Services and the cluster's users.
    All,
    /// Services only (heartbeats, metrics).
    Services,
    /// The cluster's users only: an event from another node (services see their own
    /// node's events).
    Users,
}

impl Reach {
    pub(super) fn of(services_only: bool, remote: bool) -> Reach {
        match (services_only, remote) {
            (true, _) => Reach::Services,
            (false, true) => Reach::Users,
            (false, false) => Reach::All,
        }
    }
}
