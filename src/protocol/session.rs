//! One connection's state machine: HTTP upgrade → awaiting `auth` → agent | client → closed.
//! Takes bytes and time, emits `Output`s; never touches sockets or clocks.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::{Identity, Verifier};
use crate::protocol::handshake::Policy;

/// Request paths, in the order of `Limits::policy.paths`.
pub const AGENT_PATH: &str = "/ws/agent";
pub const CLIENT_PATH: &str = "/ws/client";

/// Everything a session needs to know about the gateway's configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Paths must be `[AGENT_PATH, CLIENT_PATH]`.
    pub policy: Policy,
    pub handshake_timeout: Duration,
    pub auth_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub agent_lease: Duration,
    pub token_expiry_warning: Duration,
    pub jwt_leeway: Duration,
    /// Messages per second; 0 = off.
    pub rate_limit: u32,
    pub rate_burst: u32,
    pub rate_limit_close_after: u32,
    pub max_message_size: usize,
}

/// The world as the session sees it during one call.
pub struct Ctx<'a> {
    pub limits: &'a Limits,
    pub verifier: &'a Verifier,
    /// Monotonic time of this loop turn.
    pub now: Instant,
    /// Wall-clock Unix milliseconds of this loop turn (timestamps, token expiry).
    pub unix_ms: u64,
}

/// What the session asks its owner to do, in order.
#[derive(Debug)]
pub enum Output<'a> {
    /// Queue these bytes (an HTTP response or a WebSocket frame) on this connection.
    Send(Bytes),
    /// Flush what is queued, then close the connection. Nothing follows.
    Close,
    /// The connection authenticated for the first time: register and announce it.
    /// `version` is the agent's `data.version` ("" when absent or not an agent).
    Online {
        identity: &'a Identity,
        version: &'a str,
    },
    /// An agent event to relay to clients under the name `event`
    /// (`server:status` becomes `server:updated`); `data` is the agent's JSON object.
    Relay {
        event: &'a str,
        machine_id: &'a str,
        cluster_id: &'a str,
        data: &'a str,
        services_only: bool,
    },
    /// An agent answered command `cmd_id` with `data` (its whole data object).
    CommandResponse { cmd_id: &'a str, data: &'a str },
    /// A client asks for a command; its `perms` were already checked, the machine's
    /// cluster is checked by the router. `data` is the client's whole data object.
    Command {
        issuer: &'a Identity,
        req_id: &'a str,
        machine_id: &'a str,
        data: &'a str,
    },
    /// A service asks to relay `notification` (`data` as sent) to `cluster_id`.
    Notify { cluster_id: &'a str, data: &'a str },
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {}

impl Session {
    /// A freshly accepted connection. `reject`: answer `503` with this `Retry-After`
    /// (seconds) once the request head has arrived, instead of upgrading.
    pub fn new(now: Instant, limits: &Limits, reject: Option<u32>) -> Session {
        let _ = (now, limits, reject);
        unimplemented!()
    }

    /// Bytes received from the peer (may be modified: frames are unmasked in place).
    pub fn handle_bytes(&mut self, ctx: &Ctx, buf: &mut [u8], out: &mut impl FnMut(Output<'_>)) {
        let _ = (ctx, buf, out);
        unimplemented!()
    }

    /// Called at or after `poll_timeout()`: handshake/auth timeouts, pings, pong timeout,
    /// agent lease, token expiry warning and expiry.
    pub fn handle_timeout(&mut self, ctx: &Ctx, out: &mut impl FnMut(Output<'_>)) {
        let _ = (ctx, out);
        unimplemented!()
    }

    /// The next instant `handle_timeout` must be called at; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        unimplemented!()
    }

    /// Closes the connection on the gateway's initiative (replaced 4009, revoked 4001,
    /// slow consumer 1013, drain 1012 …): for 4001 an `error` `AUTH_FAILED` with `reason`
    /// first, then a close frame with `code`, then `Output::Close`. No-op once closed.
    pub fn close(&mut self, ctx: &Ctx, code: u16, reason: &str, out: &mut impl FnMut(Output<'_>)) {
        let _ = (ctx, code, reason, out);
        unimplemented!()
    }

    /// The verified identity once authenticated.
    pub fn identity(&self) -> Option<&Identity> {
        unimplemented!()
    }
}
