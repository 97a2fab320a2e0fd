//! One simulated client's connection: its role, state, buffers and what it keeps
//! across reconnects.

use std::collections::VecDeque;

use crate::msg::IdMap;
use crate::tls::Stream;
use arcgate::protocol::codec::Decoder;

use super::reconnect::BACKOFF_MIN_MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Agent,
    User,
    Service,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Not opened yet.
    Idle,
    Connecting,
    Upgrading,
    Authing,
    Ready,
    /// Waiting out a backoff before the next attempt.
    Waiting,
    /// Gave up for good (4001, 4009, or the run is over).
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Heartbeat,
    Metrics,
    Status,
    Player,
    Response,
    Command,
}

/// A message generated while disconnected, sent after the next `authenticated`.
pub(super) struct Queued {
    pub(super) payload: Vec<u8>,
    pub(super) sent_ns: u64,
    pub(super) kind: Kind,
}

pub(super) struct Conn {
    pub(super) role: Role,
    /// Index within the role, fleet-wide (agent number, user number, worker number).
    pub(super) id: u32,
    pub(super) cluster: u32,
    pub(super) state: State,
    /// The gateway URL (index into `plan.targets`) it connects to now.
    pub(super) url: u32,
    /// The URL it was authenticated at before its gateway went, until it is authenticated
    /// again (the report counts it as reconnected elsewhere if that is another URL).
    pub(super) left: Option<u32>,
    /// Bumped whenever the socket goes: stale timers carry an older value.
    pub(super) gen: u32,
    pub(super) sock: Option<Stream>,
    pub(super) head: Vec<u8>,
    pub(super) dec: Decoder,
    pub(super) wbuf: Vec<u8>,
    pub(super) wpos: usize,
    pub(super) dirty: bool,
    pub(super) backoff_ms: u64,
    pub(super) retry_after_ms: u64,
    pub(super) attempt_ns: u64,
    /// Agents: per-agent sequence of relayed events (`seq`) and of heartbeats/metrics.
    pub(super) seq: u64,
    pub(super) hb_seq: u64,
    pub(super) queue: VecDeque<Queued>,
    /// Commands to answer: (due, command id).
    pub(super) replies: VecDeque<(u64, Box<str>)>,
    pub(super) hb_armed: bool,
    pub(super) up_since_s: u64,
    pub(super) flat_sent: u64,
    pub(super) flat_acked: u64,
    pub(super) flat_pinged: u64,
    pub(super) pings: VecDeque<(u64, u64)>,
    pub(super) storm_drop_ns: u64,
    pub(super) storm_recovered: bool,
    /// Users and services: the last `seq` seen per agent (duplicates and gaps).
    pub(super) seen: IdMap<u64>,
    /// Agents: the machine id (written into every heartbeat).
    pub(super) machine_id: Box<str>,
}

impl Conn {
    pub(super) fn new(role: Role, id: u32, cluster: u32, url: u32, max_message: usize) -> Conn {
        Conn {
            role,
            id,
            cluster,
            state: State::Idle,
            url,
            left: None,
            gen: 0,
            sock: None,
            head: Vec::new(),
            dec: Decoder::new_client(max_message),
            wbuf: Vec::new(),
            wpos: 0,
            dirty: false,
            backoff_ms: BACKOFF_MIN_MS,
            retry_after_ms: 0,
            attempt_ns: 0,
            seq: 0,
            hb_seq: 0,
            queue: VecDeque::new(),
            replies: VecDeque::new(),
            hb_armed: false,
            up_since_s: 0,
            flat_sent: 0,
            flat_acked: 0,
            flat_pinged: 0,
            pings: VecDeque::new(),
            storm_drop_ns: 0,
            storm_recovered: false,
            seen: IdMap::default(),
            machine_id: Box::from(""),
        }
    }

    pub(super) fn in_progress(&self) -> bool {
        matches!(
            self.state,
            State::Connecting | State::Upgrading | State::Authing
        )
    }
}

pub(super) fn role_index(role: Role) -> usize {
    match role {
        Role::Agent => 0,
        Role::User => 1,
        Role::Service => 2,
    }
}
