//! The JSON envelope `{event, data, timestamp?, id?}`: parsing what peers send (sonic-rs)
//! and encoding, as ready frames, everything the gateway emits.

use std::borrow::Cow;

use bytes::Bytes;

/// A parsed inbound message. `data` is the raw, validated JSON text of the `data` field.
#[derive(Debug, PartialEq, Eq)]
pub struct Inbound<'a> {
    pub event: Cow<'a, str>,
    pub data: Option<&'a str>,
    pub id: Option<Cow<'a, str>>,
}

/// Why a text message is not a valid envelope (the text goes into `INVALID_MESSAGE`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message is not valid JSON")]
    NotJson,
    #[error("message must be a JSON object")]
    NotObject,
    #[error("message needs a string \"event\"")]
    NoEvent,
    #[error("\"id\" must be a string")]
    BadId,
}

/// Parses one text message.
pub fn parse(text: &str) -> Result<Inbound<'_>, EnvelopeError> {
    let _ = text;
    unimplemented!()
}

/// Why the `data` of a known event is invalid, e.g. "data.token must be a string".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError(pub String);

/// `auth` data: `{token, machineId?, version?}`.
#[derive(Debug, PartialEq, Eq)]
pub struct AuthData<'a> {
    pub token: Cow<'a, str>,
    pub machine_id: Option<Cow<'a, str>>,
    pub version: Option<Cow<'a, str>>,
}

pub fn auth_data(data: Option<&str>) -> Result<AuthData<'_>, DataError> {
    let _ = data;
    unimplemented!()
}

/// `command` data from a client: an object with string `machineId` and `type`
/// (other fields are forwarded untouched).
#[derive(Debug, PartialEq, Eq)]
pub struct CommandData<'a> {
    pub machine_id: Cow<'a, str>,
    pub kind: Cow<'a, str>,
}

pub fn command_data(data: Option<&str>) -> Result<CommandData<'_>, DataError> {
    let _ = data;
    unimplemented!()
}

/// The string `id` of a `command:response`'s data object.
pub fn command_response_id(data: Option<&str>) -> Result<Cow<'_, str>, DataError> {
    let _ = data;
    unimplemented!()
}

/// The string `clusterId` of a service's `notification` data object.
pub fn notification_cluster(data: Option<&str>) -> Result<Cow<'_, str>, DataError> {
    let _ = data;
    unimplemented!()
}

/// Checks the data of an agent event that is relayed (`heartbeat`, `metrics`,
/// `notification`: an object; `server:status`, `player:joined`, `player:left`: an object
/// with a string `serverId`) and returns the raw object text.
pub fn relayed_data<'a>(event: &str, data: Option<&'a str>) -> Result<&'a str, DataError> {
    let _ = (event, data);
    unimplemented!()
}

/// The error codes of PROTOCOL.md section 7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    AuthFailed,
    AuthTimeout,
    InvalidMessage,
    CommandFailed,
    RateLimit,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::AuthTimeout => "AUTH_TIMEOUT",
            ErrorCode::InvalidMessage => "INVALID_MESSAGE",
            ErrorCode::CommandFailed => "COMMAND_FAILED",
            ErrorCode::RateLimit => "RATE_LIMIT",
        }
    }
}

// Encoders. Each returns one complete text frame; `ts_ms` is the top-level `timestamp`
// (Unix milliseconds). Strings are JSON-escaped; raw `data` texts are spliced unchanged.

/// `{"event":"error","data":{"code","message","timestamp":<secs>},"id"?,"timestamp"}`.
pub fn error(code: ErrorCode, message: &str, id: Option<&str>, ts_ms: u64) -> Bytes {
    let _ = (code, message, id, ts_ms);
    unimplemented!()
}

/// `authenticated` for an agent: `{machineId, clusterId}`.
pub fn authenticated_agent(machine_id: &str, cluster_id: &str, ts_ms: u64) -> Bytes {
    let _ = (machine_id, cluster_id, ts_ms);
    unimplemented!()
}

/// `authenticated` for a user or service: `{userId, role, clusters}` (a service: `["*"]`).
pub fn authenticated_client(user_id: &str, role: &str, clusters: &[Box<str>], ts_ms: u64) -> Bytes {
    let _ = (user_id, role, clusters, ts_ms);
    unimplemented!()
}

/// `token:expiring` `{expiresAt}` (Unix seconds).
pub fn token_expiring(expires_at: u64, ts_ms: u64) -> Bytes {
    let _ = (expires_at, ts_ms);
    unimplemented!()
}

/// `machine:online` / `machine:offline` `{machineId, clusterId, version}`.
pub fn machine_presence(
    event: &str,
    machine_id: &str,
    cluster_id: &str,
    version: &str,
    ts_ms: u64,
) -> Bytes {
    let _ = (event, machine_id, cluster_id, version, ts_ms);
    unimplemented!()
}

/// A relayed agent event: `{"event":<event>,"data":{"machineId","clusterId",<every other
/// field of data, in order, except machineId and clusterId>},"timestamp"}`.
/// `data` is a JSON object text.
pub fn relay(event: &str, machine_id: &str, cluster_id: &str, data: &str, ts_ms: u64) -> Bytes {
    let _ = (event, machine_id, cluster_id, data, ts_ms);
    unimplemented!()
}

/// The command an agent receives: `{"event":"command","data":{"id":<cmd_id>,<every field
/// of data except machineId and id>},"timestamp"}`.
pub fn command_to_agent(cmd_id: &str, data: &str, ts_ms: u64) -> Bytes {
    let _ = (cmd_id, data, ts_ms);
    unimplemented!()
}

/// What the issuer receives: `{"event":"command:response","id":<req_id>,"data":<data>,"timestamp"}`.
pub fn command_response(req_id: &str, data: &str, ts_ms: u64) -> Bytes {
    let _ = (req_id, data, ts_ms);
    unimplemented!()
}

/// A service's notification relayed to a cluster: `{"event":"notification","data":<data>,"timestamp"}`.
pub fn notification(data: &str, ts_ms: u64) -> Bytes {
    let _ = (data, ts_ms);
    unimplemented!()
}
