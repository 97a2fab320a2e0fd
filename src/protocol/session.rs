//! One connection's state machine: HTTP upgrade → awaiting `auth` → agent | client → closed.
//! Takes bytes and time, emits `Output`s; never touches sockets or clocks.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::{AuthError, AuthFailure, Identity, Role, Verifier};
use crate::protocol::codec::{self, CloseReason, Decoder, Flow, Message};
use crate::protocol::envelope::{self, ErrorCode, Inbound, RelayKind};
use crate::protocol::handshake::{self, Outcome, Policy};

/// Request paths, in the order of `Limits::policy.paths`.
pub const AGENT_PATH: &str = "/ws/agent";
pub const CLIENT_PATH: &str = "/ws/client";

/// Close codes the session itself sends (docs/protocol.md section 11).
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_PING_TIMEOUT: u16 = 4000;
pub const CLOSE_AUTH_FAILED: u16 = 4001;
pub const CLOSE_AUTH_TIMEOUT: u16 = 4002;
pub const CLOSE_RATE_LIMIT: u16 = 4008;
pub const CLOSE_REPLACED: u16 = 4009;

/// How long a replaced agent connection may go without data before its drain ends: it
/// keeps relaying what it had already sent, waiting for its close, so that events sent
/// before a reconnection are not lost to the takeover. An idle bound rather than a total
/// one, so that a gateway slow to read a long backlog (a busy host) still reads it all.
pub const REPLACED_DRAIN: Duration = Duration::from_secs(2);
/// The drain ends this long after the takeover at the latest, however the peer sends.
pub const REPLACED_DRAIN_MAX: Duration = Duration::from_secs(30);

/// Everything a session needs to know about the gateway's configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Paths must be `[AGENT_PATH, CLIENT_PATH]`.
    pub policy: Policy,
    pub handshake_timeout: Duration,
    pub auth_timeout: Duration,
    /// Zero: no pings.
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// Zero: no lease.
    pub agent_lease: Duration,
    pub token_expiry_warning: Duration,
    pub jwt_leeway: Duration,
    /// Messages per second; 0 = off.
    pub rate_limit: u32,
    pub rate_burst: u32,
    /// Consecutive seconds with dropped messages before closing with 4008; 0 = never.
    pub rate_limit_close_after: u32,
    pub max_message_size: usize,
}

/// Facts a session reports as they happen, for metrics. Every method does nothing by
/// default; `()` observes nothing.
pub trait Observer {
    /// A data message got past the rate limit: its event name, or `""` when it is not a
    /// valid envelope.
    fn message(&self, _event: &str) {}
    /// A ping frame arrived.
    fn ping(&self) {}
    /// A message was dropped by the rate limit.
    fn rate_limited(&self) {}
    /// `AUTH_FAILED` was sent for this reason, with this message.
    fn auth_failed(&self, _reason: AuthFailure, _message: &str) {}
    /// `AUTH_TIMEOUT` was sent.
    fn auth_timeout(&self) {}
    /// The session sent (or echoed) a close frame with this code.
    fn closed(&self, _code: u16) {}
    /// The upgrade was refused with this HTTP status.
    fn rejected(&self, _status: u16) {}
}

impl Observer for () {}

/// The world as the session sees it during one call.
pub struct Ctx<'a> {
    pub limits: &'a Limits,
    pub verifier: &'a Verifier,
    pub observer: &'a dyn Observer,
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
    /// Queue this pong frame in place of a pong still unsent: RFC 6455 5.5.3 lets a
    /// flood of pings be answered by the latest one only, so they cannot grow the queue.
    Pong(Bytes),
    /// Flush what is queued, then close the connection. Nothing follows.
    Close,
    /// The connection authenticated for the first time: register and announce it.
    /// `version` is the agent's `data.version` ("" when absent or not an agent).
    Online {
        identity: &'a Identity,
        version: &'a str,
    },
    /// An agent event to relay to clients (and keep, for the admin API); `data` is the
    /// agent's JSON object.
    Relay {
        kind: RelayKind<'a>,
        machine_id: &'a str,
        cluster_id: &'a str,
        data: &'a str,
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

/// A deadline that is not armed. Deadlines are milliseconds since the session's epoch.
const NEVER: u64 = u64::MAX;

/// The largest message (fragments included) before authentication: an `auth` message
/// with its token fits many times over, and an unauthenticated peer holds no more.
pub const PRE_AUTH_MAX_MESSAGE: usize = 16 << 10;

/// Which endpoint the connection was upgraded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Agent,
    Client,
}

/// Where the connection is in its life.
#[derive(Debug)]
enum Phase {
    /// Waiting for the request head; `buf` holds a head split across reads.
    Handshake {
        buf: Vec<u8>,
        reject: Option<u32>,
    },
    AwaitAuth,
    Open(Identity),
    /// Closed; the identity stays readable for the owner's bookkeeping.
    Closed(Option<Identity>),
}

/// The inbound token bucket and the bookkeeping of `RATE_LIMIT`.
#[derive(Debug)]
struct Bucket {
    /// Tokens × 1000, so that integer refills are exact at millisecond steps.
    milli_tokens: u64,
    refilled_ms: u64,
    /// When the last `RATE_LIMIT` error went out (`NEVER`: not yet).
    error_ms: u64,
    /// When the current run of drops began (`NEVER`: no run). Its seconds are counted
    /// from here, not from accept, so a close never comes early (PROTOCOL.md section 7).
    run_start_ms: u64,
    /// The last second of the run (0-based, from `run_start_ms`) that dropped a message.
    run_second: u64,
}

impl Bucket {
    /// Counts a dropped message into the run; returns how long the run has lasted (ms).
    fn record_drop(&mut self, now: u64) -> u64 {
        let second = now.saturating_sub(self.run_start_ms) / 1000;
        // A whole second of the run without a drop ends it; this drop starts a new one.
        if self.run_start_ms == NEVER || now < self.run_start_ms || second > self.run_second + 1 {
            self.run_start_ms = now;
            self.run_second = 0;
        } else {
            self.run_second = second;
        }
        now - self.run_start_ms
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    decoder: Decoder,
    core: Core,
}

/// Everything but the decoder, so that the decoder's callback may borrow it mutably.
#[derive(Debug)]
struct Core {
    epoch: Instant,
    phase: Phase,
    route: Route,
    /// Handshake deadline, then auth deadline.
    phase_deadline: u64,
    next_ping: u64,
    pong_deadline: u64,
    lease: u64,
    warn_at: u64,
    expire_at: u64,
    bucket: Bucket,
    /// Set once the upgrade succeeded (stays set after the close).
    upgraded_once: bool,
    /// A newer connection of this machine took over: `4009` was sent, and what the agent
    /// had sent before it is still relayed until its close (or `REPLACED_DRAIN`).
    replaced: bool,
    /// When a replaced connection's drain ends at the latest (`REPLACED_DRAIN_MAX`).
    drain_end: u64,
}

impl Session {
    /// A freshly accepted connection. `reject`: answer `503` with this `Retry-After`
    /// (seconds) once the request head has arrived, instead of upgrading.
    pub fn new(now: Instant, limits: &Limits, reject: Option<u32>) -> Session {
        let mut core = Core {
            epoch: now,
            phase: Phase::Handshake {
                buf: Vec::new(),
                reject,
            },
            route: Route::Agent,
            phase_deadline: NEVER,
            next_ping: NEVER,
            pong_deadline: NEVER,
            lease: NEVER,
            warn_at: NEVER,
            expire_at: NEVER,
            upgraded_once: false,
            replaced: false,
            drain_end: NEVER,
            bucket: Bucket {
                milli_tokens: u64::from(limits.rate_burst) * 1000,
                refilled_ms: 0,
                error_ms: NEVER,
                run_start_ms: NEVER,
                run_second: 0,
            },
        };
        core.phase_deadline = core.deadline(now, limits.handshake_timeout);
        Session {
            decoder: Decoder::new(limits.max_message_size.min(PRE_AUTH_MAX_MESSAGE)),
            core,
        }
    }

    /// Bytes received from the peer (may be modified: frames are unmasked in place).
    /// Deadlines that passed before the bytes are acted on first, so that a late timer
    /// never lets in an `auth` after `auth_timeout` or a message after the token expired.
    pub fn handle_bytes(&mut self, ctx: &Ctx, buf: &mut [u8], out: &mut impl FnMut(Output<'_>)) {
        if self.core.next_deadline() <= self.core.now_ms(ctx.now) {
            self.core.on_timeout(ctx, out);
        }
        match self.core.phase {
            Phase::Closed(_) => {}
            Phase::Handshake { .. } => self.handshake(ctx, buf, out),
            Phase::AwaitAuth | Phase::Open(_) => self.websocket(ctx, buf, out),
        }
    }

    /// Called at or after `poll_timeout()`: handshake/auth timeouts, pings, pong timeout,
    /// agent lease, token expiry warning and expiry.
    pub fn handle_timeout(&mut self, ctx: &Ctx, out: &mut impl FnMut(Output<'_>)) {
        self.core.on_timeout(ctx, out);
    }

    /// The next instant `handle_timeout` must be called at; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = &self.core;
        match c.next_deadline() {
            _ if c.is_closed() => None,
            NEVER => None,
            next => c.epoch.checked_add(Duration::from_millis(next)),
        }
    }

    /// Closes the connection on the gateway's initiative (replaced 4009, revoked 4001,
    /// slow consumer 1013, drain 1012 …): for 4001 an `error` `AUTH_FAILED` with `reason`
    /// first, then a close frame with `code`, then `Output::Close`. No-op once closed.
    /// Before the upgrade there is no WebSocket yet: the peer gets `503` instead.
    /// A replaced agent (`4009`) drains first: see `REPLACED_DRAIN`.
    pub fn close(&mut self, ctx: &Ctx, code: u16, reason: &str, out: &mut impl FnMut(Output<'_>)) {
        let c = &mut self.core;
        if c.replaced {
            // Its close frame went out already.
            if !c.is_closed() {
                c.shut(out);
            }
            return;
        }
        match c.phase {
            Phase::Closed(_) => {}
            Phase::Open(_) if code == CLOSE_REPLACED => {
                ctx.observer.closed(code);
                out(Output::Send(codec::close_frame(code, reason)));
                c.replaced = true;
                [
                    c.next_ping,
                    c.pong_deadline,
                    c.lease,
                    c.warn_at,
                    c.expire_at,
                ] = [NEVER; 5];
                c.drain_end = c.deadline(ctx.now, REPLACED_DRAIN_MAX);
                c.phase_deadline = c.deadline(ctx.now, REPLACED_DRAIN);
            }
            Phase::Handshake { .. } => {
                ctx.observer.rejected(503);
                out(Output::Send(handshake::error_response(503, reason, &[])));
                c.shut(out);
            }
            Phase::AwaitAuth | Phase::Open(_) => {
                if code == CLOSE_AUTH_FAILED {
                    // The gateway closes a live session with 4001 only on revocation.
                    ctx.observer.auth_failed(AuthFailure::Revoked, reason);
                    send_error(ctx, ErrorCode::AuthFailed, reason, None, out);
                }
                ctx.observer.closed(code);
                out(Output::Send(codec::close_frame(code, reason)));
                c.shut(out);
            }
        }
    }

    /// The verified identity once authenticated (still there after the close).
    pub fn identity(&self) -> Option<&Identity> {
        match &self.core.phase {
            Phase::Open(identity) | Phase::Closed(Some(identity)) => Some(identity),
            _ => None,
        }
    }

    /// Whether the session has asked for its connection to be closed.
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }

    /// Whether the connection is still sending its HTTP request head.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.core.phase, Phase::Handshake { .. })
    }

    /// Whether the connection was upgraded to a WebSocket.
    pub fn is_upgraded(&self) -> bool {
        self.core.upgraded_once
    }

    fn handshake(&mut self, ctx: &Ctx, input: &mut [u8], out: &mut impl FnMut(Output<'_>)) {
        let Phase::Handshake { buf, reject } = &mut self.core.phase else {
            return;
        };
        let reject = *reject;
        let policy = &ctx.limits.policy;
        if buf.is_empty() {
            // The usual case: the whole head in one read, parsed without a copy.
            match handshake::parse(input, policy) {
                Outcome::Partial => {
                    buf.extend_from_slice(input);
                    let held = buf.len();
                    self.check_head_size(held, ctx, out);
                }
                outcome => self.finish_handshake(ctx, outcome, reject, input, out),
            }
            return;
        }
        buf.extend_from_slice(input);
        // A head can only end at a line feed, and what came before was parsed already:
        // without one, parsing again would cost a whole head per byte of a trickling peer.
        let outcome = match memchr::memchr(b'\n', input) {
            Some(_) => handshake::parse(buf, policy),
            None => Outcome::Partial,
        };
        match outcome {
            Outcome::Partial => {
                let held = buf.len();
                self.check_head_size(held, ctx, out);
            }
            outcome => {
                let mut head = std::mem::take(buf);
                self.finish_handshake(ctx, outcome, reject, &mut head, out);
            }
        }
    }

    /// Bounds the handshake buffer whatever the parser does with an endless head.
    fn check_head_size(&mut self, held: usize, ctx: &Ctx, out: &mut impl FnMut(Output<'_>)) {
        if held > ctx.limits.policy.max_header_bytes {
            ctx.observer.rejected(431);
            let response = handshake::error_response(431, "request head too large", &[]);
            out(Output::Send(response));
            self.core.shut(out);
        }
    }

    /// Acts on a complete request head; `bytes[consumed..]` already belongs to the WebSocket.
    fn finish_handshake(
        &mut self,
        ctx: &Ctx,
        outcome: Outcome,
        reject: Option<u32>,
        bytes: &mut [u8],
        out: &mut impl FnMut(Output<'_>),
    ) {
        let (route, response, consumed) = match outcome {
            Outcome::Partial => return,
            Outcome::Reject { response, status } => {
                ctx.observer.rejected(status);
                out(Output::Send(response));
                return self.core.shut(out);
            }
            Outcome::Upgrade {
                route,
                response,
                consumed,
            } => (route, response, consumed),
        };
        if let Some(secs) = reject {
            ctx.observer.rejected(503);
            let msg = "the gateway is at capacity; retry later";
            out(Output::Send(handshake::service_unavailable(secs, msg)));
            return self.core.shut(out);
        }
        let route = match route {
            0 => Route::Agent,
            1 => Route::Client,
            _ => {
                ctx.observer.rejected(404);
                out(Output::Send(handshake::error_response(
                    404,
                    "unknown path",
                    &[],
                )));
                return self.core.shut(out);
            }
        };
        out(Output::Send(response));
        self.core.upgraded(ctx, route);
        if let Some(rest) = bytes.get_mut(consumed..) {
            self.websocket(ctx, rest, out);
        }
    }

    fn websocket(&mut self, ctx: &Ctx, buf: &mut [u8], out: &mut impl FnMut(Output<'_>)) {
        if buf.is_empty() {
            return;
        }
        // Any byte from the peer answers our ping, even the middle of a long frame.
        self.core.pong_deadline = NEVER;
        if self.core.replaced {
            // Data still comes: the drain goes on (see `REPLACED_DRAIN`).
            let c = &mut self.core;
            c.phase_deadline = c.deadline(ctx.now, REPLACED_DRAIN).min(c.drain_end);
        }
        let core = &mut self.core;
        let result = self
            .decoder
            .decode(buf, |msg| core.on_message(ctx, msg, out));
        if let Err(reason) = result {
            if !core.is_closed() {
                core.close_with(ctx, reason.code(), close_text(reason), out);
            }
        }
        if matches!(core.phase, Phase::Open(_)) {
            self.decoder
                .set_max_message_size(ctx.limits.max_message_size);
        }
    }
}

impl Core {
    fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed(_))
    }

    /// The earliest armed deadline (`NEVER` if none).
    fn next_deadline(&self) -> u64 {
        let deadlines = [
            self.phase_deadline,
            self.next_ping,
            self.pong_deadline,
            self.lease,
            self.warn_at,
            self.expire_at,
        ];
        deadlines.into_iter().min().unwrap_or(NEVER)
    }

    /// Milliseconds since the epoch, rounded down (for "is it due").
    fn now_ms(&self, now: Instant) -> u64 {
        to_ms(now.saturating_duration_since(self.epoch), false)
    }

    /// The deadline `after` from `now`, rounded up so that it never fires early.
    fn deadline(&self, now: Instant, after: Duration) -> u64 {
        to_ms(
            now.saturating_duration_since(self.epoch)
                .saturating_add(after),
            true,
        )
    }

    /// Like `deadline`, but a zero duration switches the timer off.
    fn optional_deadline(&self, now: Instant, after: Duration) -> u64 {
        if after.is_zero() {
            NEVER
        } else {
            self.deadline(now, after)
        }
    }

    /// Enters the end state: nothing is due and nothing is emitted any more.
    fn shut(&mut self, out: &mut impl FnMut(Output<'_>)) {
        let identity = match std::mem::replace(&mut self.phase, Phase::Closed(None)) {
            Phase::Open(identity) => Some(identity),
            Phase::Closed(identity) => identity,
            _ => None,
        };
        self.phase = Phase::Closed(identity);
        out(Output::Close);
    }

    /// Sends a close frame and ends the session.
    fn close_with(&mut self, ctx: &Ctx, code: u16, reason: &str, out: &mut impl FnMut(Output<'_>)) {
        // A replaced session sent (and counted) its close frame already.
        if !self.replaced {
            ctx.observer.closed(code);
            out(Output::Send(codec::close_frame(code, reason)));
        }
        self.shut(out);
    }

    /// Sends `error` `code`, a close frame and ends the session.
    fn fail(
        &mut self,
        ctx: &Ctx,
        code: ErrorCode,
        message: &str,
        id: Option<&str>,
        close_code: u16,
        out: &mut impl FnMut(Output<'_>),
    ) {
        send_error(ctx, code, message, id, out);
        self.close_with(ctx, close_code, message, out);
    }

    fn auth_failed(
        &mut self,
        ctx: &Ctx,
        e: &AuthError,
        id: Option<&str>,
        out: &mut impl FnMut(Output<'_>),
    ) {
        ctx.observer.auth_failed(e.reason, &e.message);
        self.fail(
            ctx,
            ErrorCode::AuthFailed,
            &e.message,
            id,
            CLOSE_AUTH_FAILED,
            out,
        );
    }

    fn upgraded(&mut self, ctx: &Ctx, route: Route) {
        self.phase = Phase::AwaitAuth;
        self.upgraded_once = true;
        self.route = route;
        self.phase_deadline = self.deadline(ctx.now, ctx.limits.auth_timeout);
        self.next_ping = self.optional_deadline(ctx.now, ctx.limits.ping_interval);
    }

    fn on_timeout(&mut self, ctx: &Ctx, out: &mut impl FnMut(Output<'_>)) {
        if self.is_closed() {
            return;
        }
        let limits = ctx.limits;
        let now = self.now_ms(ctx.now);
        if self.replaced {
            if self.phase_deadline <= now {
                self.shut(out);
            }
            return;
        }
        if self.phase_deadline <= now {
            return self.phase_timeout(ctx, out);
        }
        if self.expire_at <= now {
            let e = AuthError::new(AuthFailure::Expired, "token expired");
            return self.auth_failed(ctx, &e, None, out);
        }
        if self.pong_deadline <= now {
            return self.close_with(ctx, CLOSE_PING_TIMEOUT, "ping timeout", out);
        }
        if self.lease <= now {
            return self.close_with(ctx, CLOSE_PING_TIMEOUT, "lease expired", out);
        }
        if self.warn_at <= now {
            self.warn_at = NEVER;
            if let Phase::Open(identity) = &self.phase {
                out(Output::Send(envelope::token_expiring(
                    identity.exp,
                    ctx.unix_ms,
                )));
            }
        }
        if self.next_ping <= now {
            out(Output::Send(codec::frame(codec::OP_PING, b"")));
            if self.pong_deadline == NEVER {
                self.pong_deadline = self.deadline(ctx.now, limits.pong_timeout);
            }
            // Keep the cadence, but never catch up with a burst after a late call.
            let next = self
                .next_ping
                .saturating_add(to_ms(limits.ping_interval, true));
            self.next_ping = if next <= now {
                self.deadline(ctx.now, limits.ping_interval)
            } else {
                next
            };
        }
    }

    fn phase_timeout(&mut self, ctx: &Ctx, out: &mut impl FnMut(Output<'_>)) {
        let limits = ctx.limits;
        match self.phase {
            Phase::Handshake { .. } => {
                let within = humantime::format_duration(limits.handshake_timeout);
                let msg = format!("request head not complete within {within}");
                ctx.observer.rejected(400);
                out(Output::Send(handshake::error_response(400, &msg, &[])));
                self.shut(out);
            }
            Phase::AwaitAuth => {
                let within = humantime::format_duration(limits.auth_timeout);
                let msg = format!("no auth message within {within}");
                ctx.observer.auth_timeout();
                send_error(ctx, ErrorCode::AuthTimeout, &msg, None, out);
                self.close_with(ctx, CLOSE_AUTH_TIMEOUT, "auth timeout", out);
            }
            // Authentication disarms the phase deadline; nothing to do otherwise.
            Phase::Open(_) | Phase::Closed(_) => self.phase_deadline = NEVER,
        }
    }

    fn on_message(
        &mut self,
        ctx: &Ctx,
        msg: Message<'_>,
        out: &mut impl FnMut(Output<'_>),
    ) -> Flow {
        match msg {
            _ if self.replaced => self.on_replaced_message(ctx, msg, out),
            Message::Ping(payload) => {
                ctx.observer.ping();
                out(Output::Pong(codec::frame(codec::OP_PONG, payload)))
            }
            Message::Pong(_) => {}
            Message::Close(code, _) => self.close_with(ctx, code.unwrap_or(CLOSE_NORMAL), "", out),
            Message::Binary(_) => self.on_data(ctx, None, out),
            Message::Text(text) => self.on_data(ctx, Some(text), out),
        }
        if self.is_closed() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// After `4009` nothing goes to the peer any more; its events are relayed, within the
    /// rate limit as before, and its close ends the session.
    fn on_replaced_message(
        &mut self,
        ctx: &Ctx,
        msg: Message<'_>,
        out: &mut impl FnMut(Output<'_>),
    ) {
        match msg {
            Message::Text(text) => {
                let mut unsent = |o: Output<'_>| {
                    if !matches!(o, Output::Send(_)) {
                        out(o);
                    }
                };
                if !self.admit(ctx, &mut unsent) {
                    return;
                }
                let Ok(env) = envelope::parse(text) else {
                    return;
                };
                ctx.observer.message(&env.event);
                self.agent_event(ctx, &env, &mut unsent);
            }
            Message::Close(..) => self.shut(out),
            _ => {}
        }
    }

    /// A data message: `None` for binary.
    fn on_data(&mut self, ctx: &Ctx, text: Option<&str>, out: &mut impl FnMut(Output<'_>)) {
        let authed = matches!(self.phase, Phase::Open(_));
        if authed && self.route == Route::Agent {
            // Even a message that gets dropped shows that the agent is alive.
            self.lease = self.optional_deadline(ctx.now, ctx.limits.agent_lease);
        }
        if !self.admit(ctx, out) {
            return;
        }
        let Some(text) = text else {
            ctx.observer.message("");
            if authed {
                let msg = "binary messages are not supported; send JSON text";
                send_error(ctx, ErrorCode::InvalidMessage, msg, None, out);
            } else {
                self.auth_failed(ctx, &not_auth(String::new()), None, out);
            }
            return;
        };
        let env = match envelope::parse(text) {
            Ok(env) => env,
            Err(err) if authed => {
                ctx.observer.message("");
                let id = envelope::salvage_id(text);
                return send_error(
                    ctx,
                    ErrorCode::InvalidMessage,
                    &err.to_string(),
                    id.as_deref(),
                    out,
                );
            }
            Err(err) => {
                ctx.observer.message("");
                let e = not_auth(format!(": {err}"));
                return self.auth_failed(ctx, &e, envelope::salvage_id(text).as_deref(), out);
            }
        };
        ctx.observer.message(&env.event);
        match (authed, env.event.as_ref()) {
            (false, "auth") => self.first_auth(ctx, &env, out),
            (false, _) => self.auth_failed(ctx, &not_auth(String::new()), env.id.as_deref(), out),
            (true, "auth") => self.reauth(ctx, &env, out),
            (true, _) => match self.route {
                Route::Agent => self.agent_event(ctx, &env, out),
                Route::Client => self.client_event(ctx, &env, out),
            },
        }
    }

    /// The token bucket; `false`: the message is dropped (and maybe the connection closed).
    fn admit(&mut self, ctx: &Ctx, out: &mut impl FnMut(Output<'_>)) -> bool {
        let limits = ctx.limits;
        if limits.rate_limit == 0 {
            return true;
        }
        let now = self.now_ms(ctx.now);
        let b = &mut self.bucket;
        let refill = now
            .saturating_sub(b.refilled_ms)
            .saturating_mul(u64::from(limits.rate_limit));
        let cap = u64::from(limits.rate_burst) * 1000;
        b.milli_tokens = b.milli_tokens.saturating_add(refill).min(cap);
        b.refilled_ms = b.refilled_ms.max(now);
        if b.milli_tokens >= 1000 {
            b.milli_tokens -= 1000;
            return true;
        }
        let run_lasted = b.record_drop(now);
        ctx.observer.rate_limited();
        if b.error_ms == NEVER || now >= b.error_ms.saturating_add(1000) {
            b.error_ms = now;
            let msg = format!(
                "too many messages: at most {} per second",
                limits.rate_limit
            );
            send_error(ctx, ErrorCode::RateLimit, &msg, None, out);
        }
        let close_after = limits.rate_limit_close_after;
        if close_after > 0 && run_lasted >= u64::from(close_after) * 1000 {
            self.close_with(ctx, CLOSE_RATE_LIMIT, "rate limit exceeded", out);
        }
        false
    }

    /// Verifies `auth` data for this endpoint: the identity and the agent's version.
    fn verify<'t>(
        &self,
        ctx: &Ctx,
        data: Option<&'t str>,
    ) -> Result<(Identity, Cow<'t, str>), AuthError> {
        let auth =
            envelope::auth_data(data).map_err(|e| AuthError::new(AuthFailure::Other, e.0))?;
        let identity = ctx.verifier.verify(&auth.token, ctx.unix_ms / 1000)?;
        let role_fits = match self.route {
            Route::Agent => identity.role == Role::Agent,
            Route::Client => identity.role != Role::Agent,
        };
        if !role_fits {
            let msg = "wrong role for this endpoint";
            return Err(AuthError::new(AuthFailure::WrongRole, msg));
        }
        if self.route == Route::Client {
            return Ok((identity, Cow::Borrowed("")));
        }
        let machine_id = |msg| Err(AuthError::new(AuthFailure::MachineId, msg));
        match auth.machine_id.as_deref() {
            None => machine_id("data.machineId is required"),
            Some(id) if id != &*identity.sub => machine_id("machineId does not match the token"),
            Some(_) => Ok((identity, auth.version.unwrap_or(Cow::Borrowed("")))),
        }
    }

    fn first_auth(&mut self, ctx: &Ctx, env: &Inbound<'_>, out: &mut impl FnMut(Output<'_>)) {
        let (identity, version) = match self.verify(ctx, env.data) {
            Ok(found) => found,
            Err(e) => return self.auth_failed(ctx, &e, env.id.as_deref(), out),
        };
        self.phase_deadline = NEVER;
        if self.route == Route::Agent {
            self.lease = self.optional_deadline(ctx.now, ctx.limits.agent_lease);
        }
        let warn_now = self.arm_expiry(ctx, identity.exp);
        out(Output::Send(authenticated(
            &identity,
            env.id.as_deref(),
            ctx.unix_ms,
        )));
        self.phase = Phase::Open(identity);
        if let Phase::Open(identity) = &self.phase {
            out(Output::Online {
                identity,
                version: &version,
            });
            if warn_now {
                out(Output::Send(envelope::token_expiring(
                    identity.exp,
                    ctx.unix_ms,
                )));
            }
        }
    }

    /// A second `auth`: the same identity with a fresh token, or the end.
    fn reauth(&mut self, ctx: &Ctx, env: &Inbound<'_>, out: &mut impl FnMut(Output<'_>)) {
        let id = env.id.as_deref();
        let identity = match self.verify(ctx, env.data) {
            Ok((identity, _)) => identity,
            Err(e) => return self.auth_failed(ctx, &e, id, out),
        };
        let Phase::Open(current) = &mut self.phase else {
            return;
        };
        if !current.same_identity(&identity) {
            let msg = "the token is for another identity";
            let e = AuthError::new(AuthFailure::IdentityChanged, msg);
            return self.auth_failed(ctx, &e, id, out);
        }
        *current = identity;
        let exp = current.exp;
        out(Output::Send(authenticated(
            current,
            env.id.as_deref(),
            ctx.unix_ms,
        )));
        if self.arm_expiry(ctx, exp) {
            out(Output::Send(envelope::token_expiring(exp, ctx.unix_ms)));
        }
    }

    /// Arms the expiry timers for `exp` (Unix seconds); `true`: warn at once.
    fn arm_expiry(&mut self, ctx: &Ctx, exp: u64) -> bool {
        let limits = ctx.limits;
        let now = i128::from(self.deadline(ctx.now, Duration::ZERO));
        let exp_ms = now + i128::from(exp) * 1000 - i128::from(ctx.unix_ms);
        self.expire_at = clamp_ms(exp_ms + limits.jwt_leeway.as_millis() as i128);
        let warn_at = clamp_ms(exp_ms - limits.token_expiry_warning.as_millis() as i128);
        if warn_at <= self.now_ms(ctx.now) {
            self.warn_at = NEVER;
            true
        } else {
            self.warn_at = warn_at;
            false
        }
    }

    fn agent_event(&mut self, ctx: &Ctx, env: &Inbound<'_>, out: &mut impl FnMut(Output<'_>)) {
        let Phase::Open(identity) = &self.phase else {
            return;
        };
        let id = env.id.as_deref();
        let event = env.event.as_ref();
        if let Some(relayed) = envelope::relayed_data(event, env.data) {
            return match relayed {
                Ok((kind, data)) => out(Output::Relay {
                    kind,
                    machine_id: &identity.sub,
                    cluster_id: identity.cluster.as_deref().unwrap_or(""),
                    data,
                }),
                Err(err) => send_error(ctx, ErrorCode::InvalidMessage, &err.0, id, out),
            };
        }
        // Unknown events, and client events sent by an agent, are ignored.
        if event != "command:response" {
            return;
        }
        match envelope::command_response_id(env.data) {
            Ok(cmd_id) => out(Output::CommandResponse {
                cmd_id: &cmd_id,
                data: env.data.unwrap_or("null"),
            }),
            Err(err) => send_error(ctx, ErrorCode::InvalidMessage, &err.0, id, out),
        }
    }

    fn client_event(&mut self, ctx: &Ctx, env: &Inbound<'_>, out: &mut impl FnMut(Output<'_>)) {
        let Phase::Open(identity) = &self.phase else {
            return;
        };
        let id = env.id.as_deref();
        match env.event.as_ref() {
            "command" => {
                let Some(req_id) = id else {
                    let msg = "command needs a top-level string id";
                    return send_error(ctx, ErrorCode::InvalidMessage, msg, None, out);
                };
                let cmd = match envelope::command_data(env.data) {
                    Ok(cmd) => cmd,
                    Err(err) => return send_error(ctx, ErrorCode::InvalidMessage, &err.0, id, out),
                };
                if !identity.may_command(&cmd.kind) {
                    return send_error(ctx, ErrorCode::CommandFailed, "forbidden", id, out);
                }
                out(Output::Command {
                    issuer: identity,
                    req_id,
                    machine_id: &cmd.machine_id,
                    data: env.data.unwrap_or("{}"),
                });
            }
            "notification" if identity.role != Role::Service => {
                let msg = "forbidden: only services may send notifications";
                send_error(ctx, ErrorCode::CommandFailed, msg, id, out);
            }
            "notification" => match envelope::notification_cluster(env.data) {
                Ok(cluster_id) => out(Output::Notify {
                    cluster_id: &cluster_id,
                    data: env.data.unwrap_or("{}"),
                }),
                Err(err) => send_error(ctx, ErrorCode::InvalidMessage, &err.0, id, out),
            },
            // Unknown events, and agent events sent by a client, are ignored.
            _ => {}
        }
    }
}

/// `authenticated` for `identity`.
fn authenticated(identity: &Identity, id: Option<&str>, ts_ms: u64) -> Bytes {
    match identity.role {
        Role::Agent => {
            let cluster = identity.cluster.as_deref().unwrap_or("");
            envelope::authenticated_agent(&identity.sub, cluster, id, ts_ms)
        }
        Role::User => {
            envelope::authenticated_client(&identity.sub, "user", &identity.clusters, id, ts_ms)
        }
        Role::Service => {
            let all: [Box<str>; 1] = [Box::from("*")];
            envelope::authenticated_client(&identity.sub, "service", &all, id, ts_ms)
        }
    }
}

/// `AUTH_FAILED` for a first message that is not `auth`; `detail` follows the text.
fn not_auth(detail: String) -> AuthError {
    let msg = format!("expected auth as the first message{detail}");
    AuthError::new(AuthFailure::NotAuth, msg)
}

fn send_error(
    ctx: &Ctx,
    code: ErrorCode,
    message: &str,
    id: Option<&str>,
    out: &mut impl FnMut(Output<'_>),
) {
    out(Output::Send(envelope::error(
        code,
        message,
        id,
        ctx.unix_ms,
    )));
}

/// The reason text of the close frame for a decoder error.
fn close_text(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::Protocol(why) => why,
        CloseReason::InvalidUtf8 => "invalid UTF-8 in a text message",
        CloseReason::TooBig => "message too big",
    }
}

/// Whole milliseconds of `d` (rounded up or down), kept below `NEVER`.
fn to_ms(d: Duration, round_up: bool) -> u64 {
    let mut ms = d.as_millis();
    if round_up && d.subsec_nanos() % 1_000_000 != 0 {
        ms += 1;
    }
    ms.min(u128::from(NEVER - 1)) as u64
}

fn clamp_ms(ms: i128) -> u64 {
    ms.clamp(0, i128::from(NEVER - 1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{mint_hs256, KeySource, TokenSpec};
    use serde_json::{json, Value};

    const SECRET: &str = "session-test-secret";
    /// Wall-clock time at the session's epoch (Unix ms).
    const UNIX0: u64 = 1_700_000_000_000;
    const UNIX0_SECS: u64 = UNIX0 / 1000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    fn limits() -> Limits {
        Limits {
            policy: Policy {
                paths: vec![AGENT_PATH.to_string(), CLIENT_PATH.to_string()],
                allowed_origins: None,
                max_header_bytes: 8192,
            },
            handshake_timeout: secs(5),
            auth_timeout: secs(10),
            ping_interval: secs(30),
            pong_timeout: secs(30),
            agent_lease: secs(90),
            token_expiry_warning: secs(60),
            jwt_leeway: secs(5),
            rate_limit: 0,
            rate_burst: 0,
            rate_limit_close_after: 10,
            max_message_size: 64 * 1024,
        }
    }

    /// What the session emitted, owned, with frames decoded for assertions.
    #[derive(Debug, Clone, PartialEq)]
    enum Ev {
        /// An HTTP response: status and the whole text.
        Http(u16, String),
        Json(Value),
        CloseFrame(u16, String),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close,
        Online(String, String),
        Relay {
            event: String,
            machine_id: String,
            cluster_id: String,
            data: String,
            services_only: bool,
        },
        CommandResponse(String, String),
        Command {
            issuer: String,
            req_id: String,
            machine_id: String,
            data: String,
        },
        Notify(String, String),
    }

    /// Decodes one unmasked server frame (the session sends one frame per `Send`).
    fn server_frame(bytes: &[u8]) -> Ev {
        assert_eq!(bytes[0] & 0x80, 0x80, "FIN must be set");
        assert_eq!(bytes[1] & 0x80, 0, "server frames are not masked");
        let (len, start) = match bytes[1] & 0x7F {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let payload = &bytes[start..];
        assert_eq!(payload.len(), len, "one whole frame per Send");
        match bytes[0] & 0x0F {
            codec::OP_TEXT => Ev::Json(serde_json::from_slice(payload).expect("JSON text")),
            codec::OP_CLOSE => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                Ev::CloseFrame(code, String::from_utf8(payload[2..].to_vec()).unwrap())
            }
            codec::OP_PING => Ev::Ping(payload.to_vec()),
            codec::OP_PONG => Ev::Pong(payload.to_vec()),
            op => panic!("unexpected opcode {op}"),
        }
    }

    fn owned(output: Output<'_>) -> Ev {
        match output {
            Output::Send(bytes) if bytes.starts_with(b"HTTP/1.1 ") => {
                let text = String::from_utf8(bytes.to_vec()).unwrap();
                let status = text[9..12].parse().unwrap();
                Ev::Http(status, text)
            }
            Output::Send(bytes) | Output::Pong(bytes) => server_frame(&bytes),
            Output::Close => Ev::Close,
            Output::Online { identity, version } => {
                Ev::Online(identity.sub.to_string(), version.to_string())
            }
            Output::Relay {
                kind,
                machine_id,
                cluster_id,
                data,
            } => Ev::Relay {
                event: kind.outbound().into(),
                services_only: kind.services_only(),
                machine_id: machine_id.into(),
                cluster_id: cluster_id.into(),
                data: data.into(),
            },
            Output::CommandResponse { cmd_id, data } => {
                Ev::CommandResponse(cmd_id.into(), data.into())
            }
            Output::Command {
                issuer,
                req_id,
                machine_id,
                data,
            } => Ev::Command {
                issuer: issuer.sub.to_string(),
                req_id: req_id.into(),
                machine_id: machine_id.into(),
                data: data.into(),
            },
            Output::Notify { cluster_id, data } => Ev::Notify(cluster_id.into(), data.into()),
        }
    }

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    fn text(value: &Value) -> Vec<u8> {
        client_frame(true, codec::OP_TEXT, value.to_string().as_bytes())
    }

    fn request(path: &str) -> Vec<u8> {
        format!(
            "GET {path} HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes()
    }

    fn spec(role: &str, sub: &str, ttl: u64) -> TokenSpec {
        TokenSpec {
            role: role.into(),
            sub: sub.into(),
            ttl: secs(ttl),
            ..TokenSpec::default()
        }
    }

    fn agent_spec(sub: &str, cluster: &str) -> TokenSpec {
        TokenSpec {
            cluster: Some(cluster.into()),
            ..spec("agent", sub, 3600)
        }
    }

    fn user_spec(sub: &str, clusters: &[&str]) -> TokenSpec {
        TokenSpec {
            clusters: Some(clusters.iter().map(|c| c.to_string()).collect()),
            ..spec("user", sub, 3600)
        }
    }

    /// A token minted at the session's epoch (or `at` later).
    fn token(spec: &TokenSpec) -> String {
        mint_hs256(SECRET, spec, UNIX0_SECS)
    }

    fn token_at(spec: &TokenSpec, at: Duration) -> String {
        mint_hs256(SECRET, spec, UNIX0_SECS + at.as_secs())
    }

    fn agent_auth(token: &str, machine_id: &str) -> Value {
        json!({"event": "auth", "data": {"token": token, "machineId": machine_id, "version": "0.4.18"}})
    }

    fn client_auth(token: &str) -> Value {
        json!({"event": "auth", "data": {"token": token}})
    }

    /// The world a test session lives in.
    struct Env {
        limits: Limits,
        verifier: Verifier,
        t0: Instant,
    }

    impl Env {
        /// The context `at` after the session's creation.
        fn ctx(&self, at: Duration) -> Ctx<'_> {
            Ctx {
                limits: &self.limits,
                verifier: &self.verifier,
                observer: &(),
                now: self.t0 + at,
                unix_ms: UNIX0 + at.as_millis() as u64,
            }
        }
    }

    struct Harness {
        env: Env,
        session: Session,
    }

    impl Harness {
        fn with(limits: Limits, reject: Option<u32>) -> Harness {
            let key = KeySource::Secret(SECRET.into());
            let verifier = Verifier::new(&key, None, None, limits.jwt_leeway).unwrap();
            let t0 = Instant::now();
            let session = Session::new(t0, &limits, reject);
            Harness {
                env: Env {
                    limits,
                    verifier,
                    t0,
                },
                session,
            }
        }

        fn new() -> Harness {
            Harness::with(limits(), None)
        }

        /// Upgraded on `path` at t0.
        fn upgraded(limits: Limits, path: &str) -> Harness {
            let mut h = Harness::with(limits, None);
            let evs = h.feed(Duration::ZERO, &request(path));
            assert!(matches!(evs.as_slice(), [Ev::Http(101, _)]), "{evs:?}");
            h
        }

        /// An authenticated agent `mch_1` of `clu_a`, at t0.
        fn agent(limits: Limits) -> Harness {
            let mut h = Harness::upgraded(limits, AGENT_PATH);
            let evs = h.feed(
                Duration::ZERO,
                &text(&agent_auth(&token(&agent_spec("mch_1", "clu_a")), "mch_1")),
            );
            assert!(
                matches!(evs.as_slice(), [Ev::Json(_), Ev::Online(..)]),
                "{evs:?}"
            );
            h
        }

        /// An authenticated client with the token of `spec`, at t0.
        fn client(limits: Limits, spec: &TokenSpec) -> Harness {
            let mut h = Harness::upgraded(limits, CLIENT_PATH);
            let evs = h.feed(Duration::ZERO, &text(&client_auth(&token(spec))));
            assert!(
                matches!(evs.as_slice(), [Ev::Json(_), Ev::Online(..)]),
                "{evs:?}"
            );
            h
        }

        fn feed(&mut self, at: Duration, bytes: &[u8]) -> Vec<Ev> {
            let mut buf = bytes.to_vec();
            let mut evs = Vec::new();
            self.session
                .handle_bytes(&self.env.ctx(at), &mut buf, &mut |o| evs.push(owned(o)));
            evs
        }

        fn send(&mut self, at: Duration, value: &Value) -> Vec<Ev> {
            self.feed(at, &text(value))
        }

        fn tick(&mut self, at: Duration) -> Vec<Ev> {
            let mut evs = Vec::new();
            self.session
                .handle_timeout(&self.env.ctx(at), &mut |o| evs.push(owned(o)));
            evs
        }

        fn close(&mut self, at: Duration, code: u16, reason: &str) -> Vec<Ev> {
            let mut evs = Vec::new();
            self.session
                .close(&self.env.ctx(at), code, reason, &mut |o| evs.push(owned(o)));
            evs
        }

        fn next_timeout(&self) -> Option<Duration> {
            self.session.poll_timeout().map(|t| t - self.env.t0)
        }
    }

    /// The `(code, message, id)` of an `error` event.
    fn error_of(ev: &Ev) -> (String, String, Option<String>) {
        let Ev::Json(v) = ev else {
            panic!("not a JSON frame: {ev:?}")
        };
        assert_eq!(v["event"], "error", "{v}");
        let id = v.get("id").and_then(Value::as_str).map(String::from);
        (
            v["data"]["code"].as_str().unwrap().to_string(),
            v["data"]["message"].as_str().unwrap().to_string(),
            id,
        )
    }

    /// Asserts `[error code, close frame close_code, Close]` and returns the error message.
    fn assert_fatal(evs: &[Ev], code: &str, close_code: u16, id: Option<&str>) -> String {
        assert_eq!(evs.len(), 3, "{evs:?}");
        let (c, message, got_id) = error_of(&evs[0]);
        assert_eq!(c, code, "{evs:?}");
        assert_eq!(got_id.as_deref(), id);
        assert!(
            matches!(&evs[1], Ev::CloseFrame(c, _) if *c == close_code),
            "{evs:?}"
        );
        assert_eq!(evs[2], Ev::Close);
        message
    }

    fn assert_auth_failed(evs: &[Ev], id: Option<&str>) -> String {
        assert_fatal(evs, "AUTH_FAILED", 4001, id)
    }

    /// Asserts one non-fatal error and returns its message.
    fn assert_error(evs: &[Ev], code: &str, id: Option<&str>) -> String {
        assert_eq!(evs.len(), 1, "{evs:?}");
        let (c, message, got_id) = error_of(&evs[0]);
        assert_eq!(c, code);
        assert_eq!(got_id.as_deref(), id);
        message
    }

    fn assert_closed(h: &mut Harness, at: Duration) {
        assert_eq!(h.session.poll_timeout(), None);
        assert!(h.session.is_closed());
        assert!(h
            .feed(at, &text(&json!({"event": "heartbeat", "data": {}})))
            .is_empty());
        assert!(h
            .feed(at, &client_frame(true, codec::OP_PING, b"x"))
            .is_empty());
        assert!(h.tick(at + secs(3600)).is_empty());
        assert!(h.close(at, 1000, "bye").is_empty());
    }

    fn heartbeat() -> Value {
        json!({"event": "heartbeat", "data": {"machineId": "mch_1", "cpu": 3}})
    }

    // ---- size ----

    #[test]
    fn session_stays_small() {
        let size = std::mem::size_of::<Session>();
        println!("size_of::<Session>() = {size} bytes");
        assert!(size <= 320, "Session grew to {size} bytes");
    }

    // ---- handshake ----

    #[test]
    fn upgrade_in_one_read_then_waits_for_auth() {
        let mut h = Harness::new();
        assert_eq!(h.next_timeout(), Some(secs(5)));
        let evs = h.feed(ms(10), &request(AGENT_PATH));
        assert!(matches!(&evs[..], [Ev::Http(101, _)]), "{evs:?}");
        assert!(matches!(h.session.core.phase, Phase::AwaitAuth));
        assert_eq!(h.next_timeout(), Some(ms(10_010)));
        assert!(h.session.identity().is_none());
    }

    #[test]
    fn upgrade_split_at_every_byte() {
        let req = request(CLIENT_PATH);
        let mut h = Harness::new();
        for (i, b) in req.iter().enumerate() {
            let evs = h.feed(ms(i as u64), &[*b]);
            if i + 1 < req.len() {
                assert!(evs.is_empty(), "at byte {i}: {evs:?}");
            } else {
                assert!(matches!(&evs[..], [Ev::Http(101, _)]), "{evs:?}");
            }
        }
        // The head buffer is gone after the upgrade.
        assert!(matches!(h.session.core.phase, Phase::AwaitAuth));
        assert_eq!(h.session.decoder.buffered(), 0);
    }

    #[test]
    fn a_trickled_head_is_parsed_at_line_ends_only() {
        // Garbage after the first read shows up at the next line feed, not before.
        let mut h = Harness::new();
        assert!(h
            .feed(ms(0), b"GET /ws/agent HTTP/1.1\r\nHost: x\r\n")
            .is_empty());
        assert!(h.feed(ms(1), b"Bad Header").is_empty());
        assert!(h.feed(ms(2), b": v").is_empty());
        let evs = h.feed(ms(3), b"\r\n");
        assert!(matches!(&evs[..], [Ev::Http(400, _), Ev::Close]), "{evs:?}");
    }

    #[test]
    fn bytes_after_the_head_reach_the_websocket() {
        let mut h = Harness::new();
        let mut bytes = request(AGENT_PATH);
        bytes.extend(text(&agent_auth(
            &token(&agent_spec("mch_1", "clu_a")),
            "mch_1",
        )));
        bytes.extend(client_frame(true, codec::OP_PING, b"hi"));
        let evs = h.feed(ms(1), &bytes);
        assert!(matches!(&evs[0], Ev::Http(101, _)), "{evs:?}");
        let Ev::Json(auth) = &evs[1] else {
            panic!("{evs:?}")
        };
        assert_eq!(auth["event"], "authenticated");
        assert_eq!(evs[2], Ev::Online("mch_1".into(), "0.4.18".into()));
        assert_eq!(evs[3], Ev::Pong(b"hi".to_vec()));
        assert_eq!(evs.len(), 4);
    }

    #[test]
    fn bytes_after_a_split_head_reach_the_websocket() {
        let mut h = Harness::new();
        let req = request(AGENT_PATH);
        assert!(h.feed(ms(1), &req[..20]).is_empty());
        let mut rest = req[20..].to_vec();
        rest.extend(client_frame(true, codec::OP_PING, b"x"));
        let evs = h.feed(ms(2), &rest);
        assert!(
            matches!(&evs[..], [Ev::Http(101, _), Ev::Pong(p)] if p == b"x"),
            "{evs:?}"
        );
    }

    #[test]
    fn bad_request_is_answered_and_closed() {
        let mut h = Harness::new();
        let evs = h.feed(ms(1), b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        assert!(matches!(&evs[..], [Ev::Http(404, _), Ev::Close]), "{evs:?}");
        assert_closed(&mut h, ms(2));

        let mut h = Harness::new();
        let evs = h.feed(ms(1), b"GET /ws/agent HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(matches!(&evs[..], [Ev::Http(426, _), Ev::Close]), "{evs:?}");
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut lim = limits();
        lim.policy.max_header_bytes = 256;
        let mut h = Harness::with(lim, None);
        let mut evs = h.feed(ms(1), b"GET /ws/agent HTTP/1.1\r\n");
        let filler = format!("X-Filler: {}\r\n", "a".repeat(60));
        for i in 0..10 {
            if evs.is_empty() {
                evs = h.feed(ms(2 + i), filler.as_bytes());
            }
        }
        assert!(matches!(&evs[..], [Ev::Http(431, _), Ev::Close]), "{evs:?}");
        assert_closed(&mut h, ms(100));
    }

    #[test]
    fn rejected_session_answers_503_after_the_head() {
        let mut h = Harness::with(limits(), Some(7));
        let req = request(AGENT_PATH);
        assert!(h.feed(ms(1), &req[..10]).is_empty());
        let evs = h.feed(ms(2), &req[10..]);
        let [Ev::Http(503, response), Ev::Close] = &evs[..] else {
            panic!("{evs:?}")
        };
        assert!(
            response.to_ascii_lowercase().contains("retry-after: 7\r\n"),
            "{response}"
        );
        assert_closed(&mut h, ms(3));
    }

    #[test]
    fn handshake_deadline_is_total() {
        let mut h = Harness::new();
        let req = request(AGENT_PATH);
        // Trickling bytes does not extend the deadline.
        for i in 0..10 {
            assert!(h
                .feed(ms(400 * i), &req[i as usize..i as usize + 1])
                .is_empty());
        }
        assert!(h.tick(ms(4_999)).is_empty());
        let evs = h.tick(secs(5));
        let [Ev::Http(400, body), Ev::Close] = &evs[..] else {
            panic!("{evs:?}")
        };
        assert!(
            body.contains("request head not complete within 5s"),
            "{body}"
        );
        assert_closed(&mut h, secs(6));
    }

    // ---- authentication ----

    #[test]
    fn agent_authenticates() {
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let tok = token(&agent_spec("mch_1", "clu_a"));
        let evs = h.send(secs(1), &agent_auth(&tok, "mch_1"));
        let Ev::Json(v) = &evs[0] else {
            panic!("{evs:?}")
        };
        assert_eq!(v["event"], "authenticated");
        assert_eq!(
            v["data"],
            json!({"machineId": "mch_1", "clusterId": "clu_a"})
        );
        assert_eq!(v["timestamp"], json!(UNIX0 + 1000));
        assert_eq!(evs[1], Ev::Online("mch_1".into(), "0.4.18".into()));
        assert_eq!(evs.len(), 2);
        let id = h.session.identity().unwrap();
        assert_eq!(
            (id.role, &*id.sub, id.cluster.as_deref()),
            (Role::Agent, "mch_1", Some("clu_a"))
        );
    }

    #[test]
    fn agent_without_version_reports_empty_version() {
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let tok = token(&agent_spec("mch_1", "clu_a"));
        let evs = h.send(
            secs(1),
            &json!({"event": "auth", "data": {"token": tok, "machineId": "mch_1"}}),
        );
        assert_eq!(evs[1], Ev::Online("mch_1".into(), String::new()));
    }

    #[test]
    fn user_authenticates() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let evs = h.send(
            secs(1),
            &client_auth(&token(&user_spec("usr_1", &["clu_a", "clu_b"]))),
        );
        let Ev::Json(v) = &evs[0] else {
            panic!("{evs:?}")
        };
        assert_eq!(v["event"], "authenticated");
        assert_eq!(
            v["data"],
            json!({"userId": "usr_1", "role": "user", "clusters": ["clu_a", "clu_b"]})
        );
        assert_eq!(evs[1], Ev::Online("usr_1".into(), String::new()));
        assert_eq!(evs.len(), 2);
    }

    #[test]
    fn service_authenticates() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let evs = h.send(
            secs(1),
            &client_auth(&token(&spec("service", "billing", 3600))),
        );
        let Ev::Json(v) = &evs[0] else {
            panic!("{evs:?}")
        };
        assert_eq!(
            v["data"],
            json!({"userId": "billing", "role": "service", "clusters": ["*"]})
        );
        assert_eq!(evs[1], Ev::Online("billing".into(), String::new()));
    }

    #[test]
    fn first_message_must_be_auth() {
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let evs = h.send(
            secs(1),
            &json!({"event": "heartbeat", "id": "r1", "data": {}}),
        );
        let msg = assert_auth_failed(&evs, Some("r1"));
        assert_eq!(msg, "expected auth as the first message");
        assert_closed(&mut h, secs(2));
    }

    #[test]
    fn invalid_json_before_auth_fails_auth() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let evs = h.feed(secs(1), &client_frame(true, codec::OP_TEXT, b"{not json"));
        let msg = assert_auth_failed(&evs, None);
        assert!(
            msg.starts_with("expected auth as the first message"),
            "{msg}"
        );
    }

    #[test]
    fn binary_before_auth_fails_auth() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let evs = h.feed(secs(1), &client_frame(true, codec::OP_BINARY, b"\x01\x02"));
        assert_auth_failed(&evs, None);
    }

    #[test]
    fn invalid_auth_data_fails_auth() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let evs = h.send(
            secs(1),
            &json!({"event": "auth", "id": "a1", "data": {"token": 5}}),
        );
        assert_auth_failed(&evs, Some("a1"));
    }

    #[test]
    fn bad_token_fails_auth() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let forged = mint_hs256(
            "another-secret",
            &user_spec("usr_1", &["clu_a"]),
            UNIX0_SECS,
        );
        let evs = h.send(
            secs(1),
            &json!({"event": "auth", "id": "a1", "data": {"token": forged}}),
        );
        let msg = assert_auth_failed(&evs, Some("a1"));
        assert!(!msg.is_empty());
        assert!(h.session.identity().is_none());
    }

    #[test]
    fn expired_token_fails_auth() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        // Expired 10 s before the session's clock, beyond the 5 s leeway.
        let old = mint_hs256(SECRET, &user_spec("usr_1", &["clu_a"]), UNIX0_SECS - 3610);
        let evs = h.send(secs(1), &client_auth(&old));
        assert_auth_failed(&evs, None);
    }

    #[test]
    fn agent_token_on_client_path_fails() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let tok = token(&agent_spec("mch_1", "clu_a"));
        let evs = h.send(secs(1), &agent_auth(&tok, "mch_1"));
        assert_eq!(
            assert_auth_failed(&evs, None),
            "wrong role for this endpoint"
        );
    }

    #[test]
    fn user_token_on_agent_path_fails() {
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let tok = token(&user_spec("usr_1", &["clu_a"]));
        let evs = h.send(secs(1), &agent_auth(&tok, "usr_1"));
        assert_eq!(
            assert_auth_failed(&evs, None),
            "wrong role for this endpoint"
        );
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let tok = token(&spec("service", "billing", 3600));
        let evs = h.send(secs(1), &agent_auth(&tok, "billing"));
        assert_eq!(
            assert_auth_failed(&evs, None),
            "wrong role for this endpoint"
        );
    }

    #[test]
    fn agent_machine_id_must_match_the_token() {
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let tok = token(&agent_spec("mch_1", "clu_a"));
        let evs = h.send(secs(1), &agent_auth(&tok, "mch_2"));
        assert_eq!(
            assert_auth_failed(&evs, None),
            "machineId does not match the token"
        );

        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let evs = h.send(
            secs(1),
            &json!({"event": "auth", "id": "x", "data": {"token": tok}}),
        );
        assert_auth_failed(&evs, Some("x"));
        assert!(h.session.identity().is_none());
    }

    #[test]
    fn auth_timeout_closes_4002() {
        let mut h = Harness::new();
        h.feed(secs(1), &request(AGENT_PATH));
        assert_eq!(h.next_timeout(), Some(secs(11)));
        assert!(h.tick(ms(10_999)).is_empty());
        let evs = h.tick(secs(11));
        assert_fatal(&evs, "AUTH_TIMEOUT", 4002, None);
        assert_closed(&mut h, secs(12));
    }

    #[test]
    fn auth_after_the_deadline_is_too_late_even_if_the_timer_is_late() {
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let tok = token(&agent_spec("mch_1", "clu_a"));
        let evs = h.send(secs(10), &agent_auth(&tok, "mch_1"));
        assert_fatal(&evs, "AUTH_TIMEOUT", 4002, None);
        assert!(h.session.identity().is_none());
    }

    #[test]
    fn auth_split_across_reads() {
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let frame = text(&agent_auth(&token(&agent_spec("mch_1", "clu_a")), "mch_1"));
        let (a, b) = frame.split_at(frame.len() / 2);
        assert!(h.feed(ms(1), a).is_empty());
        let evs = h.feed(ms(2), b);
        assert!(matches!(&evs[..], [Ev::Json(_), Ev::Online(..)]), "{evs:?}");
    }

    // ---- frames ----

    #[test]
    fn decoder_errors_close_with_their_code() {
        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let mut unmasked = vec![0x81, 2];
        unmasked.extend_from_slice(b"{}");
        let evs = h.feed(ms(1), &unmasked);
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(1002, _), Ev::Close]),
            "{evs:?}"
        );
        assert_closed(&mut h, ms(2));

        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let evs = h.feed(ms(1), &client_frame(true, codec::OP_TEXT, b"\xff\xfe"));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(1007, _), Ev::Close]),
            "{evs:?}"
        );

        let mut lim = limits();
        lim.max_message_size = 64;
        let mut h = Harness::upgraded(lim, CLIENT_PATH);
        let evs = h.feed(ms(1), &client_frame(true, codec::OP_TEXT, &[b' '; 65]));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(1009, _), Ev::Close]),
            "{evs:?}"
        );
    }

    #[test]
    fn ping_gets_pong_and_pong_is_silent() {
        let mut h = Harness::agent(limits());
        assert_eq!(
            h.feed(secs(1), &client_frame(true, codec::OP_PING, b"abc")),
            vec![Ev::Pong(b"abc".to_vec())]
        );
        assert!(h
            .feed(secs(1), &client_frame(true, codec::OP_PONG, b""))
            .is_empty());
    }

    #[test]
    fn before_auth_a_message_is_capped_fragments_included() {
        let half = vec![b'x'; PRE_AUTH_MAX_MESSAGE / 2 + 1];
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        assert!(h
            .feed(ms(1), &client_frame(false, codec::OP_TEXT, &half))
            .is_empty());
        let evs = h.feed(ms(2), &client_frame(true, codec::OP_CONTINUATION, &half));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(1009, _), Ev::Close]),
            "{evs:?}"
        );
        // Authenticated, the connection gets the whole max_message_size.
        let mut h = Harness::agent(limits());
        let big = json!({"event": "heartbeat", "data": {"pad": "x".repeat(PRE_AUTH_MAX_MESSAGE)}});
        assert!(matches!(&h.send(ms(3), &big)[..], [Ev::Relay { .. }]));
    }

    #[test]
    fn peer_close_is_echoed() {
        let mut h = Harness::agent(limits());
        let mut payload = 1001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"going");
        let evs = h.feed(secs(1), &client_frame(true, codec::OP_CLOSE, &payload));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(1001, _), Ev::Close]),
            "{evs:?}"
        );
        assert_closed(&mut h, secs(2));
        // The identity stays readable for the owner's cleanup.
        assert_eq!(&*h.session.identity().unwrap().sub, "mch_1");

        let mut h = Harness::upgraded(limits(), CLIENT_PATH);
        let evs = h.feed(secs(1), &client_frame(true, codec::OP_CLOSE, b""));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(1000, _), Ev::Close]),
            "{evs:?}"
        );
    }

    #[test]
    fn nothing_after_a_close_in_the_same_read() {
        let mut h = Harness::agent(limits());
        let mut bytes = client_frame(true, codec::OP_CLOSE, &1000u16.to_be_bytes());
        bytes.extend(text(&heartbeat()));
        let evs = h.feed(secs(1), &bytes);
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(1000, _), Ev::Close]),
            "{evs:?}"
        );
    }

    #[test]
    fn binary_after_auth_is_invalid_but_harmless() {
        let mut h = Harness::agent(limits());
        let evs = h.feed(secs(1), &client_frame(true, codec::OP_BINARY, b"\x00"));
        let msg = assert_error(&evs, "INVALID_MESSAGE", None);
        assert_eq!(msg, "binary messages are not supported; send JSON text");
        assert!(!h.session.is_closed());
    }

    #[test]
    fn invalid_envelopes_after_auth_keep_the_connection() {
        let mut h = Harness::client(limits(), &user_spec("usr_1", &["clu_a"]));
        for bad in [
            &b"nope"[..],
            b"[1,2]",
            b"{\"data\":{}}",
            b"{\"event\":\"x\",\"id\":5}",
        ] {
            let evs = h.feed(secs(1), &client_frame(true, codec::OP_TEXT, bad));
            assert_error(&evs, "INVALID_MESSAGE", None);
        }
        assert!(!h.session.is_closed());
    }

    #[test]
    fn fragmented_text_is_one_message() {
        let mut h = Harness::agent(limits());
        let body = heartbeat().to_string();
        let (a, b) = body.as_bytes().split_at(10);
        let mut bytes = client_frame(false, codec::OP_TEXT, a);
        bytes.extend(client_frame(true, codec::OP_CONTINUATION, b));
        let evs = h.feed(secs(1), &bytes);
        assert!(
            matches!(&evs[..], [Ev::Relay { event, .. }] if event == "heartbeat"),
            "{evs:?}"
        );
    }

    // ---- agent events ----

    #[test]
    fn agent_events_are_relayed() {
        let mut h = Harness::agent(limits());
        let cases = [
            (
                "heartbeat",
                json!({"machineId": "spoof", "cpu": 1}),
                "heartbeat",
                true,
            ),
            ("metrics", json!({"cpu": {"cores": 4}}), "metrics", true),
            (
                "server:status",
                json!({"serverId": "srv_1", "status": "running"}),
                "server:updated",
                false,
            ),
            (
                "player:joined",
                json!({"serverId": "srv_1", "player": {"id": "p"}}),
                "player:joined",
                false,
            ),
            (
                "player:left",
                json!({"serverId": "srv_1", "player": {"id": "p"}}),
                "player:left",
                false,
            ),
            (
                "notification",
                json!({"type": "info", "message": "hi"}),
                "notification",
                false,
            ),
        ];
        for (event, data, relayed, services_only) in cases {
            let evs = h.send(secs(1), &json!({"event": event, "data": data}));
            let [Ev::Relay {
                event: e,
                machine_id,
                cluster_id,
                data: d,
                services_only: so,
            }] = &evs[..]
            else {
                panic!("{event}: {evs:?}")
            };
            assert_eq!(
                (e.as_str(), machine_id.as_str(), cluster_id.as_str()),
                (relayed, "mch_1", "clu_a")
            );
            assert_eq!(serde_json::from_str::<Value>(d).unwrap(), data);
            assert_eq!(*so, services_only, "{event}");
        }
    }

    #[test]
    fn invalid_relayed_data_is_an_error_with_the_id() {
        let mut h = Harness::agent(limits());
        let evs = h.send(
            secs(1),
            &json!({"event": "server:status", "id": "s1", "data": {"status": "up"}}),
        );
        assert_error(&evs, "INVALID_MESSAGE", Some("s1"));
        let evs = h.send(secs(1), &json!({"event": "heartbeat", "data": 5}));
        assert_error(&evs, "INVALID_MESSAGE", None);
        assert!(!h.session.is_closed());
    }

    #[test]
    fn command_response_completes_a_command() {
        let mut h = Harness::agent(limits());
        let data = json!({"id": "cmd_0_1", "success": true, "result": {"ok": 1}});
        let evs = h.send(secs(1), &json!({"event": "command:response", "data": data}));
        let [Ev::CommandResponse(cmd_id, d)] = &evs[..] else {
            panic!("{evs:?}")
        };
        assert_eq!(cmd_id, "cmd_0_1");
        assert_eq!(serde_json::from_str::<Value>(d).unwrap(), data);

        let evs = h.send(
            secs(1),
            &json!({"event": "command:response", "id": "q", "data": {"success": true}}),
        );
        assert_error(&evs, "INVALID_MESSAGE", Some("q"));
    }

    #[test]
    fn unknown_and_client_events_from_an_agent_are_ignored() {
        let mut h = Harness::agent(limits());
        assert!(h
            .send(secs(1), &json!({"event": "whatever", "data": {}}))
            .is_empty());
        let cmd = json!({"event": "command", "id": "r", "data": {"machineId": "mch_1", "type": "server:start"}});
        assert!(h.send(secs(1), &cmd).is_empty());
        assert!(!h.session.is_closed());
    }

    // ---- client events ----

    #[test]
    fn user_command_is_forwarded() {
        let mut h = Harness::client(limits(), &user_spec("usr_1", &["clu_a"]));
        let data = json!({"machineId": "mch_1", "type": "server:start", "serverId": "srv_1"});
        let evs = h.send(
            secs(1),
            &json!({"event": "command", "id": "req_1", "data": data}),
        );
        let [Ev::Command {
            issuer,
            req_id,
            machine_id,
            data: d,
        }] = &evs[..]
        else {
            panic!("{evs:?}")
        };
        assert_eq!(
            (issuer.as_str(), req_id.as_str(), machine_id.as_str()),
            ("usr_1", "req_1", "mch_1")
        );
        assert_eq!(serde_json::from_str::<Value>(d).unwrap(), data);
    }

    #[test]
    fn command_needs_an_id_and_valid_data() {
        let mut h = Harness::client(limits(), &spec("service", "billing", 3600));
        let evs = h.send(
            secs(1),
            &json!({"event": "command", "data": {"machineId": "m", "type": "t"}}),
        );
        assert_eq!(
            assert_error(&evs, "INVALID_MESSAGE", None),
            "command needs a top-level string id"
        );
        let evs = h.send(
            secs(1),
            &json!({"event": "command", "id": "r2", "data": {"type": "t"}}),
        );
        assert_error(&evs, "INVALID_MESSAGE", Some("r2"));
        let evs = h.send(
            secs(1),
            &json!({"event": "command", "id": "r3", "data": {"machineId": "m", "type": "t"}}),
        );
        assert!(
            matches!(&evs[..], [Ev::Command { issuer, .. }] if issuer == "billing"),
            "{evs:?}"
        );
    }

    #[test]
    fn command_outside_perms_is_forbidden() {
        let perms = TokenSpec {
            perms: Some(vec!["server:restart".into()]),
            ..user_spec("usr_1", &["clu_a"])
        };
        let mut h = Harness::client(limits(), &perms);
        let data = json!({"machineId": "mch_1", "type": "server:start"});
        let evs = h.send(
            secs(1),
            &json!({"event": "command", "id": "r1", "data": data}),
        );
        assert_eq!(
            assert_error(&evs, "COMMAND_FAILED", Some("r1")),
            "forbidden"
        );
        let data = json!({"machineId": "mch_1", "type": "server:restart"});
        let evs = h.send(
            secs(1),
            &json!({"event": "command", "id": "r2", "data": data}),
        );
        assert!(matches!(&evs[..], [Ev::Command { .. }]), "{evs:?}");
    }

    #[test]
    fn service_notification_is_forwarded() {
        let mut h = Harness::client(limits(), &spec("service", "billing", 3600));
        let data = json!({"clusterId": "clu_a", "type": "info", "message": "maintenance"});
        let evs = h.send(secs(1), &json!({"event": "notification", "data": data}));
        let [Ev::Notify(cluster, d)] = &evs[..] else {
            panic!("{evs:?}")
        };
        assert_eq!(cluster, "clu_a");
        assert_eq!(serde_json::from_str::<Value>(d).unwrap(), data);
        let evs = h.send(
            secs(1),
            &json!({"event": "notification", "id": "n", "data": {"type": "info"}}),
        );
        assert_error(&evs, "INVALID_MESSAGE", Some("n"));
    }

    #[test]
    fn user_notification_is_forbidden() {
        let mut h = Harness::client(limits(), &user_spec("usr_1", &["clu_a"]));
        let data = json!({"clusterId": "clu_a", "type": "info", "message": "x"});
        let evs = h.send(
            secs(1),
            &json!({"event": "notification", "id": "n1", "data": data}),
        );
        let msg = assert_error(&evs, "COMMAND_FAILED", Some("n1"));
        assert!(msg.starts_with("forbidden"), "{msg}");
    }

    #[test]
    fn agent_and_unknown_events_from_a_client_are_ignored() {
        let mut h = Harness::client(limits(), &user_spec("usr_1", &["clu_a"]));
        assert!(h.send(secs(1), &heartbeat()).is_empty());
        let resp = json!({"event": "command:response", "data": {"id": "cmd_1", "success": true}});
        assert!(h.send(secs(1), &resp).is_empty());
        assert!(h
            .send(secs(1), &json!({"event": "nope", "data": null}))
            .is_empty());
    }

    // ---- re-authentication ----

    #[test]
    fn reauth_with_the_same_identity_refreshes_expiry() {
        let mut lim = limits();
        lim.ping_interval = Duration::ZERO;
        let mut h = Harness::upgraded(lim, CLIENT_PATH);
        let short = TokenSpec {
            ttl: secs(120),
            ..user_spec("usr_1", &["clu_a"])
        };
        let evs = h.send(Duration::ZERO, &client_auth(&token(&short)));
        assert_eq!(evs.len(), 2, "{evs:?}");
        // Warning at exp - 60 s.
        assert_eq!(h.next_timeout(), Some(secs(60)));
        let fresh = TokenSpec {
            ttl: secs(3600),
            perms: Some(vec![]),
            ..short.clone()
        };
        let evs = h.send(secs(30), &client_auth(&token_at(&fresh, secs(30))));
        let [Ev::Json(v)] = &evs[..] else {
            panic!("{evs:?}")
        };
        assert_eq!(v["event"], "authenticated");
        assert_eq!(h.next_timeout(), Some(secs(30 + 3600 - 60)));
        assert!(h.tick(secs(126)).is_empty());
        // The new perms apply.
        let data = json!({"machineId": "mch_1", "type": "server:start"});
        let evs = h.send(
            secs(130),
            &json!({"event": "command", "id": "r", "data": data}),
        );
        assert_error(&evs, "COMMAND_FAILED", Some("r"));
    }

    #[test]
    fn reauth_of_an_agent_keeps_it_online_once() {
        let mut h = Harness::agent(limits());
        let tok = token_at(&agent_spec("mch_1", "clu_a"), secs(10));
        let evs = h.send(secs(10), &agent_auth(&tok, "mch_1"));
        assert!(
            matches!(&evs[..], [Ev::Json(v)] if v["event"] == "authenticated"),
            "{evs:?}"
        );
    }

    #[test]
    fn reauth_with_another_identity_closes() {
        let mut h = Harness::client(limits(), &user_spec("usr_1", &["clu_a"]));
        let other = token(&user_spec("usr_2", &["clu_a"]));
        let evs = h.send(
            secs(1),
            &json!({"event": "auth", "id": "a2", "data": {"token": other}}),
        );
        assert_auth_failed(&evs, Some("a2"));
        assert_closed(&mut h, secs(2));
    }

    #[test]
    fn reauth_with_a_bad_token_closes() {
        let mut h = Harness::agent(limits());
        let evs = h.send(secs(1), &agent_auth("not.a.jwt", "mch_1"));
        assert_auth_failed(&evs, None);
    }

    // ---- rate limit ----

    fn rate_limits(rate: u32, burst: u32, close_after: u32) -> Limits {
        let mut lim = limits();
        lim.rate_limit = rate;
        lim.rate_burst = burst;
        lim.rate_limit_close_after = close_after;
        lim.ping_interval = Duration::ZERO;
        lim.agent_lease = Duration::ZERO;
        lim
    }

    #[test]
    fn rate_limit_drops_and_reports_once_per_second() {
        // The auth message takes one token of the burst.
        let mut h = Harness::agent(rate_limits(2, 3, 0));
        assert_eq!(h.send(ms(100), &heartbeat()).len(), 1);
        assert_eq!(h.send(ms(200), &heartbeat()).len(), 1);
        let evs = h.send(ms(300), &heartbeat());
        assert_error(&evs, "RATE_LIMIT", None);
        // Dropped silently within the same second.
        assert!(h.send(ms(400), &heartbeat()).is_empty());
        // 2 per second: one token back 500 ms after the last refill.
        assert!(matches!(
            &h.send(ms(800), &heartbeat())[..],
            [Ev::Relay { .. }]
        ));
        assert!(h.send(ms(850), &heartbeat()).is_empty());
        assert!(matches!(
            &h.send(ms(1400), &heartbeat())[..],
            [Ev::Relay { .. }]
        ));
        let evs = h.send(ms(1410), &heartbeat());
        assert_error(&evs, "RATE_LIMIT", None);
        assert!(!h.session.is_closed());
    }

    #[test]
    fn rate_limit_applies_before_auth() {
        let mut h = Harness::upgraded(rate_limits(1, 1, 0), AGENT_PATH);
        assert!(
            h.feed(ms(1), &client_frame(true, codec::OP_PING, b""))
                .len()
                == 1
        );
        let tok = token(&agent_spec("mch_1", "clu_a"));
        let evs = h.send(ms(2), &agent_auth(&tok, "mch_1"));
        assert_eq!(evs.len(), 2);
        assert_error(&h.send(ms(3), &heartbeat()), "RATE_LIMIT", None);
    }

    /// Sends heartbeats at `at` until one is dropped; what that drop answered.
    fn drop_at(h: &mut Harness, at: Duration) -> Vec<Ev> {
        loop {
            let evs = h.send(at, &heartbeat());
            if !matches!(&evs[..], [Ev::Relay { .. }]) {
                return evs;
            }
        }
    }

    #[test]
    fn rate_limit_closes_after_consecutive_seconds() {
        let mut h = Harness::agent(rate_limits(1, 1, 3));
        // The run starts at the first drop (500 ms) and drops in each of its seconds.
        assert_error(&drop_at(&mut h, ms(500)), "RATE_LIMIT", None);
        assert_error(&drop_at(&mut h, ms(1_600)), "RATE_LIMIT", None);
        assert_error(&drop_at(&mut h, ms(2_700)), "RATE_LIMIT", None);
        assert!(drop_at(&mut h, ms(3_499)).is_empty());
        assert!(!h.session.is_closed());
        // Three seconds of run: the next drop closes, after the (due) error.
        let evs = drop_at(&mut h, ms(3_800));
        assert_fatal(&evs, "RATE_LIMIT", 4008, None);
        assert_closed(&mut h, secs(4));
    }

    #[test]
    fn a_first_drop_late_in_a_second_does_not_shorten_the_run() {
        // Seconds counted from accept would close at 2 100 ms, barely 1.2 s into the run.
        let mut h = Harness::agent(rate_limits(1, 1, 3));
        assert_error(&drop_at(&mut h, ms(900)), "RATE_LIMIT", None);
        for t in [1_050, 1_800, 2_100, 2_700, 3_600, 3_899] {
            drop_at(&mut h, ms(t));
            assert!(!h.session.is_closed(), "closed at {t} ms");
        }
        let evs = drop_at(&mut h, ms(3_900));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(4008, _), Ev::Close]),
            "{evs:?}"
        );
    }

    #[test]
    fn rate_limit_close_without_a_due_error() {
        let mut h = Harness::agent(rate_limits(1, 1, 2));
        // Errors at 900 and 2 000 ms; the close at 2 900 ms comes within a second of the
        // last error: only the close frame.
        assert_error(&drop_at(&mut h, ms(900)), "RATE_LIMIT", None);
        assert!(drop_at(&mut h, ms(1_500)).is_empty());
        assert_error(&drop_at(&mut h, ms(2_000)), "RATE_LIMIT", None);
        let evs = drop_at(&mut h, ms(2_900));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(4008, _), Ev::Close]),
            "{evs:?}"
        );
    }

    #[test]
    fn a_second_without_drops_ends_the_run() {
        let mut h = Harness::agent(rate_limits(1, 1, 2));
        assert_error(&drop_at(&mut h, ms(500)), "RATE_LIMIT", None);
        // Run second 1 (1 500..2 500 ms) drops nothing: the drop at 2 600 ms starts a new run.
        assert!(matches!(
            &h.send(ms(1_500), &heartbeat())[..],
            [Ev::Relay { .. }]
        ));
        assert_error(&drop_at(&mut h, ms(2_600)), "RATE_LIMIT", None);
        assert_error(&drop_at(&mut h, ms(3_700)), "RATE_LIMIT", None);
        assert!(!h.session.is_closed());
        // Two seconds into the new run → close, after the (due) error.
        let evs = drop_at(&mut h, ms(4_700));
        assert_fatal(&evs, "RATE_LIMIT", 4008, None);
    }

    #[test]
    fn rate_limit_zero_is_off() {
        let mut h = Harness::agent(rate_limits(0, 0, 1));
        for i in 0..100 {
            assert_eq!(h.send(ms(i), &heartbeat()).len(), 1);
        }
    }

    // ---- liveness ----

    #[test]
    fn pings_and_pong_timeout() {
        let mut lim = limits();
        lim.agent_lease = Duration::ZERO;
        let mut h = Harness::client(lim, &spec("service", "billing", 100_000));
        assert_eq!(h.next_timeout(), Some(secs(30)));
        assert!(h.tick(ms(29_999)).is_empty());
        assert_eq!(h.tick(secs(30)), vec![Ev::Ping(vec![])]);
        // Idempotent when nothing is due.
        assert!(h.tick(secs(30)).is_empty());
        assert_eq!(h.next_timeout(), Some(secs(60)));
        // A pong clears the deadline; the next ping comes on schedule.
        assert!(h
            .feed(secs(31), &client_frame(true, codec::OP_PONG, b""))
            .is_empty());
        assert_eq!(h.tick(secs(60)), vec![Ev::Ping(vec![])]);
        assert_eq!(h.next_timeout(), Some(secs(90)));
        // Silence for pong_timeout after the ping at 60 s.
        assert!(h.tick(ms(89_999)).is_empty());
        let evs = h.tick(secs(90));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(4000, r), Ev::Close] if r == "ping timeout"),
            "{evs:?}"
        );
        assert_closed(&mut h, secs(91));
    }

    #[test]
    fn pong_deadline_counts_from_the_first_unanswered_ping() {
        let mut lim = limits();
        lim.ping_interval = secs(10);
        lim.pong_timeout = secs(25);
        lim.agent_lease = Duration::ZERO;
        let mut h = Harness::client(lim, &spec("service", "billing", 100_000));
        assert_eq!(h.tick(secs(10)), vec![Ev::Ping(vec![])]);
        assert_eq!(h.tick(secs(20)), vec![Ev::Ping(vec![])]);
        assert_eq!(h.tick(secs(30)), vec![Ev::Ping(vec![])]);
        assert_eq!(h.next_timeout(), Some(secs(35)));
        let evs = h.tick(secs(35));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(4000, _), Ev::Close]),
            "{evs:?}"
        );
    }

    #[test]
    fn any_frame_answers_a_ping() {
        let mut lim = limits();
        lim.pong_timeout = secs(10);
        let mut h = Harness::client(lim, &spec("service", "billing", 100_000));
        assert_eq!(h.tick(secs(30)), vec![Ev::Ping(vec![])]);
        assert_eq!(h.next_timeout(), Some(secs(40)));
        assert_eq!(h.send(secs(35), &json!({"event": "x", "data": {}})), vec![]);
        assert_eq!(h.next_timeout(), Some(secs(60)));
        assert!(h.tick(secs(40)).is_empty());
        assert!(!h.session.is_closed());
    }

    #[test]
    fn late_timer_calls_do_not_burst_pings() {
        let mut lim = limits();
        lim.pong_timeout = secs(1000);
        let mut h = Harness::client(lim, &spec("service", "billing", 100_000));
        assert_eq!(h.tick(secs(100)), vec![Ev::Ping(vec![])]);
        assert_eq!(h.next_timeout(), Some(secs(130)));
    }

    #[test]
    fn agent_lease_expires_without_data() {
        let mut h = Harness::agent(limits());
        // A heartbeat at 80 s moves the lease from 90 s to 170 s; pongs do not count.
        for at in [30, 60] {
            assert_eq!(h.tick(secs(at)), vec![Ev::Ping(vec![])]);
            assert!(h
                .feed(secs(at + 1), &client_frame(true, codec::OP_PONG, b""))
                .is_empty());
        }
        assert_eq!(h.send(secs(80), &heartbeat()).len(), 1);
        for at in [90, 120, 150] {
            assert_eq!(h.tick(secs(at)), vec![Ev::Ping(vec![])]);
            assert!(h
                .feed(secs(at + 1), &client_frame(true, codec::OP_PONG, b""))
                .is_empty());
        }
        assert_eq!(h.next_timeout(), Some(secs(170)));
        assert!(h.tick(ms(169_999)).is_empty());
        let evs = h.tick(secs(170));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(4000, r), Ev::Close] if r == "lease expired"),
            "{evs:?}"
        );
    }

    #[test]
    fn agent_lease_counts_from_auth() {
        let mut lim = limits();
        lim.ping_interval = Duration::ZERO;
        let mut h = Harness::agent(lim);
        assert!(
            h.feed(secs(60), &client_frame(true, codec::OP_PING, b""))
                .len()
                == 1
        );
        assert_eq!(h.next_timeout(), Some(secs(90)));
        let evs = h.tick(secs(90));
        assert!(
            matches!(&evs[..], [Ev::CloseFrame(4000, r), Ev::Close] if r == "lease expired"),
            "{evs:?}"
        );
    }

    #[test]
    fn clients_have_no_lease() {
        let mut lim = limits();
        lim.ping_interval = Duration::ZERO;
        let h = Harness::client(lim, &user_spec("usr_1", &["clu_a"]));
        // Only the token warning is armed (exp 3600 s - 60 s).
        assert_eq!(h.next_timeout(), Some(secs(3540)));
    }

    // ---- token expiry ----

    #[test]
    fn token_expiry_warns_then_closes() {
        let mut lim = limits();
        lim.ping_interval = Duration::ZERO;
        lim.agent_lease = Duration::ZERO;
        let mut h = Harness::upgraded(lim, CLIENT_PATH);
        let spec = TokenSpec {
            ttl: secs(120),
            ..user_spec("usr_1", &["clu_a"])
        };
        h.send(Duration::ZERO, &client_auth(&token(&spec)));
        assert_eq!(h.next_timeout(), Some(secs(60)));
        assert!(h.tick(ms(59_999)).is_empty());
        let evs = h.tick(secs(60));
        let [Ev::Json(v)] = &evs[..] else {
            panic!("{evs:?}")
        };
        assert_eq!(v["data"]["expiresAt"], json!(UNIX0_SECS + 120));
        assert!(h.tick(secs(61)).is_empty());
        assert_eq!(h.next_timeout(), Some(secs(125)));
        assert!(h.tick(ms(124_999)).is_empty());
        let msg = assert_auth_failed(&h.tick(secs(125)), None);
        assert_eq!(msg, "token expired");
        assert_closed(&mut h, secs(126));
    }

    #[test]
    fn no_message_passes_after_expiry_even_if_the_timer_is_late() {
        let mut lim = limits();
        lim.ping_interval = Duration::ZERO;
        let mut h = Harness::upgraded(lim, AGENT_PATH);
        let spec = TokenSpec {
            ttl: secs(100),
            ..agent_spec("mch_1", "clu_a")
        };
        h.send(Duration::ZERO, &agent_auth(&token(&spec), "mch_1"));
        let evs = h.send(secs(80), &heartbeat());
        // The overdue warning goes out before the message is relayed.
        assert!(
            matches!(&evs[..], [Ev::Json(v), Ev::Relay { .. }] if v["event"] == "token:expiring"),
            "{evs:?}"
        );
        let evs = h.send(secs(105), &heartbeat());
        assert_eq!(assert_auth_failed(&evs, None), "token expired");
    }

    #[test]
    fn token_inside_the_warning_window_warns_at_auth() {
        let mut h = Harness::upgraded(limits(), AGENT_PATH);
        let spec = TokenSpec {
            ttl: secs(30),
            ..agent_spec("mch_1", "clu_a")
        };
        let evs = h.send(secs(1), &agent_auth(&token(&spec), "mch_1"));
        assert_eq!(evs.len(), 3, "{evs:?}");
        assert!(matches!(&evs[1], Ev::Online(..)));
        let Ev::Json(v) = &evs[2] else {
            panic!("{evs:?}")
        };
        assert_eq!(v["data"]["expiresAt"], json!(UNIX0_SECS + 30));
        // Expiry at exp + leeway, and no second warning.
        assert_eq!(h.next_timeout(), Some(secs(30)));
        assert_eq!(h.tick(secs(30)), vec![Ev::Ping(vec![])]);
        assert_auth_failed(&h.tick(secs(35)), None);
    }

    // ---- external close, timers ----

    #[test]
    fn external_close_4001_sends_auth_failed_first() {
        let mut h = Harness::agent(limits());
        let evs = h.close(secs(1), 4001, "revoked");
        assert_eq!(assert_auth_failed(&evs, None), "revoked");
        assert_closed(&mut h, secs(2));
    }

    #[test]
    fn a_replaced_agent_relays_what_it_sent_until_its_close() {
        let mut h = Harness::agent(limits());
        let evs = h.close(secs(1), CLOSE_REPLACED, "replaced");
        assert_eq!(evs, vec![Ev::CloseFrame(4009, "replaced".into())]);
        assert_eq!(h.next_timeout(), Some(secs(1) + REPLACED_DRAIN));
        // Events still count; nothing goes back to the peer: no pong, no error.
        let evs = h.send(secs(1), &heartbeat());
        assert!(
            matches!(&evs[..], [Ev::Relay { event, .. }] if event == "heartbeat"),
            "{evs:?}"
        );
        assert!(h
            .feed(secs(1), &client_frame(true, codec::OP_PING, b"p"))
            .is_empty());
        assert!(h
            .send(secs(1), &json!({"event": "server:status", "data": 1}))
            .is_empty());
        assert!(h
            .feed(secs(1), &client_frame(true, codec::OP_TEXT, b"not json"))
            .is_empty());
        // The peer's close ends it without a second close frame.
        let evs = h.feed(
            secs(2),
            &client_frame(true, codec::OP_CLOSE, &1000u16.to_be_bytes()),
        );
        assert_eq!(evs, vec![Ev::Close]);
        assert_closed(&mut h, secs(2));
    }

    #[test]
    fn a_replaced_agent_stays_within_the_rate_limit() {
        // The auth message took one token of the burst of 3.
        let mut h = Harness::agent(rate_limits(1, 3, 2));
        h.close(ms(100), CLOSE_REPLACED, "replaced");
        for at in [200, 300] {
            let evs = h.send(ms(at), &heartbeat());
            assert!(matches!(&evs[..], [Ev::Relay { .. }]), "{evs:?}");
        }
        // Over the limit: dropped, and no error goes to the peer.
        assert!(h.send(ms(400), &heartbeat()).is_empty());
        // Dropping on for two seconds (in each second of the run) ends it, without a
        // second close frame.
        assert!(drop_at(&mut h, ms(1_300)).is_empty());
        assert!(drop_at(&mut h, ms(1_500)).is_empty());
        assert!(!h.session.is_closed());
        assert_eq!(drop_at(&mut h, ms(2_400)), vec![Ev::Close]);
        assert_closed(&mut h, secs(3));
    }

    #[test]
    fn a_replaced_agent_is_closed_after_the_drain() {
        let mut h = Harness::agent(limits());
        h.close(secs(1), CLOSE_REPLACED, "replaced");
        assert!(h.tick(secs(1) + REPLACED_DRAIN - ms(1)).is_empty());
        assert_eq!(h.tick(secs(1) + REPLACED_DRAIN), vec![Ev::Close]);
        assert_closed(&mut h, secs(4));

        // Another close meanwhile (shutdown, revocation) ends it at once.
        let mut h = Harness::agent(limits());
        h.close(secs(1), CLOSE_REPLACED, "replaced");
        assert_eq!(h.close(secs(1), 1012, "restarting"), vec![Ev::Close]);
        assert_closed(&mut h, secs(2));
    }

    #[test]
    fn a_replaced_agent_drains_while_its_data_keeps_coming() {
        let mut h = Harness::agent(limits());
        h.close(secs(1), CLOSE_REPLACED, "replaced");
        // A backlog read slowly: each read pushes the end of the drain.
        for at in [2_500, 4_000, 5_500] {
            let evs = h.send(ms(at), &heartbeat());
            assert!(matches!(&evs[..], [Ev::Relay { .. }]), "{at}: {evs:?}");
        }
        assert_eq!(h.next_timeout(), Some(ms(5_500) + REPLACED_DRAIN));
        assert!(h.tick(ms(7_499)).is_empty());
        assert_eq!(h.tick(ms(7_500)), vec![Ev::Close]);

        // A peer that never stops is cut off REPLACED_DRAIN_MAX after the takeover.
        let mut h = Harness::agent(limits());
        h.close(secs(1), CLOSE_REPLACED, "replaced");
        let end = secs(1) + REPLACED_DRAIN_MAX;
        let mut at = secs(2);
        while at < end {
            assert!(matches!(&h.send(at, &heartbeat())[..], [Ev::Relay { .. }]));
            at += secs(1);
        }
        assert_eq!(h.next_timeout(), Some(end));
        assert_eq!(h.tick(end), vec![Ev::Close]);
    }

    #[test]
    fn external_close_other_codes() {
        let mut h = Harness::agent(limits());
        let evs = h.close(secs(1), 1012, "restarting");
        assert_eq!(
            evs,
            vec![Ev::CloseFrame(1012, "restarting".into()), Ev::Close]
        );
        assert_closed(&mut h, secs(2));

        let mut h = Harness::new();
        let evs = h.close(secs(1), 1012, "restarting");
        assert!(matches!(&evs[..], [Ev::Http(503, _), Ev::Close]), "{evs:?}");
    }

    #[test]
    fn poll_timeout_is_the_earliest_deadline() {
        let mut lim = limits();
        lim.ping_interval = secs(50);
        lim.agent_lease = secs(20);
        let mut h = Harness::agent(lim);
        assert_eq!(h.next_timeout(), Some(secs(20)));
        h.send(secs(15), &heartbeat());
        assert_eq!(h.next_timeout(), Some(secs(35)));
        h.send(secs(34), &heartbeat());
        assert_eq!(h.next_timeout(), Some(secs(50)));
        assert_eq!(h.tick(secs(50)), vec![Ev::Ping(vec![])]);
        assert_eq!(h.next_timeout(), Some(secs(54)));
    }

    #[test]
    fn timeouts_before_they_are_due_do_nothing() {
        let mut h = Harness::agent(limits());
        let before = h.session.poll_timeout();
        for at in [0, 1, 500, 29_999] {
            assert!(h.tick(ms(at)).is_empty());
            assert_eq!(h.session.poll_timeout(), before);
        }
    }

    /// Records what the session reports to its observer.
    #[derive(Default)]
    struct Recorder(std::cell::RefCell<Vec<String>>);

    impl Observer for Recorder {
        fn message(&self, event: &str) {
            self.0.borrow_mut().push(format!("message {event}"));
        }
        fn ping(&self) {
            self.0.borrow_mut().push("ping".into());
        }
        fn rate_limited(&self) {
            self.0.borrow_mut().push("rate_limited".into());
        }
        fn auth_failed(&self, reason: AuthFailure, message: &str) {
            let label = reason.label();
            self.0
                .borrow_mut()
                .push(format!("auth_failed {label} {message}"));
        }
        fn auth_timeout(&self) {
            self.0.borrow_mut().push("auth_timeout".into());
        }
        fn closed(&self, code: u16) {
            self.0.borrow_mut().push(format!("closed {code}"));
        }
        fn rejected(&self, status: u16) {
            self.0.borrow_mut().push(format!("rejected {status}"));
        }
    }

    /// Feeds `steps` (bytes at an offset, or a timeout check when empty) to a fresh
    /// session and returns what it reported.
    fn observed(limits: Limits, steps: &[(Duration, Vec<u8>)]) -> Vec<String> {
        let h = Harness::with(limits, None);
        let mut session = h.session;
        let rec = Recorder::default();
        for (at, bytes) in steps {
            let ctx = Ctx {
                limits: &h.env.limits,
                verifier: &h.env.verifier,
                observer: &rec,
                now: h.env.t0 + *at,
                unix_ms: UNIX0 + at.as_millis() as u64,
            };
            let mut buf = bytes.clone();
            if buf.is_empty() {
                session.handle_timeout(&ctx, &mut |_| {});
            } else {
                session.handle_bytes(&ctx, &mut buf, &mut |_| {});
            }
        }
        rec.0.into_inner()
    }

    #[test]
    fn the_observer_hears_messages_failures_and_closes() {
        let zero = Duration::ZERO;
        let hb = json!({"event": "heartbeat", "data": {}});
        let seen = observed(limits(), &[(zero, request(AGENT_PATH)), (zero, text(&hb))]);
        assert_eq!(
            seen,
            [
                "message heartbeat",
                "auth_failed not_auth expected auth as the first message",
                "closed 4001"
            ]
        );
        let seen = observed(limits(), &[(zero, request("/nope"))]);
        assert_eq!(seen, ["rejected 404"]);
        let wrong = agent_auth(&token(&agent_spec("mch_1", "clu_a")), "mch_2");
        for (path, failed) in [
            (
                AGENT_PATH,
                "auth_failed machine_id machineId does not match the token",
            ),
            (
                CLIENT_PATH,
                "auth_failed wrong_role wrong role for this endpoint",
            ),
        ] {
            let seen = observed(limits(), &[(zero, request(path)), (zero, text(&wrong))]);
            assert_eq!(seen, ["message auth", failed, "closed 4001"]);
        }
        let seen = observed(limits(), &[(zero, request(AGENT_PATH)), (secs(11), vec![])]);
        assert_eq!(seen, ["auth_timeout", "closed 4002"]);
        let auth = agent_auth(&token(&agent_spec("mch_1", "clu_a")), "mch_1");
        let ping = client_frame(true, codec::OP_PING, b"x");
        let close = client_frame(true, codec::OP_CLOSE, &1000u16.to_be_bytes());
        let seen = observed(
            limits(),
            &[
                (zero, request(AGENT_PATH)),
                (zero, text(&auth)),
                (zero, text(&json!({"event": "made:up"}))),
                (zero, client_frame(true, codec::OP_BINARY, b"b")),
                (zero, ping),
                (zero, close),
            ],
        );
        assert_eq!(
            seen,
            [
                "message auth",
                "message made:up",
                "message ",
                "ping",
                "closed 1000"
            ]
        );
        let limited = Limits {
            rate_limit: 1,
            rate_burst: 1,
            ..limits()
        };
        let seen = observed(
            limited,
            &[
                (zero, request(AGENT_PATH)),
                (zero, text(&auth)),
                (zero, text(&hb)),
            ],
        );
        assert_eq!(seen, ["message auth", "rate_limited"]);
    }
}
