//! The JSON envelope `{event, data, timestamp?, id?}`: parsing what peers send
//! (serde_json, borrowing from the message) and encoding, as ready frames, everything
//! the gateway emits.

use std::borrow::Cow;
use std::fmt;
use std::sync::LazyLock;

use bytes::Bytes;
use memchr::memmem::Finder;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::codec::{FrameBuf, OP_TEXT};

/// Deepest nesting of arrays and objects accepted in a message (the envelope object counts
/// as one). serde_json skips nested values without recursing, so depth cannot exhaust the
/// gateway's stack; the limit keeps absurd nesting from reaching dashboards.
pub const MAX_DEPTH: usize = 32;

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
    /// A top-level field given twice: refused, since peers disagree on which one counts.
    #[error("\"{0}\" must appear only once")]
    DuplicateField(&'static str),
}

/// A string that borrows from the input unless it holds escapes (a bare `Option<Cow>`
/// field would always allocate).
#[derive(Deserialize)]
#[serde(transparent)]
struct Str<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<Str<'a>>,
}

/// Parses one text message.
pub fn parse(text: &str) -> Result<Inbound<'_>, EnvelopeError> {
    // Checked first: a derived struct would also accept an array, field by position.
    if first_byte(text) != Some(b'{') {
        return Err(classify(text));
    }
    if !nesting_ok(text) {
        return Err(EnvelopeError::NotJson);
    }
    let envelope: Envelope<'_> = serde_json::from_str(text).map_err(|_| classify(text))?;
    Ok(Inbound {
        event: envelope.event,
        // `"data": null` counts as absent, like a missing field.
        data: envelope.data.map(RawValue::get).filter(|d| *d != "null"),
        id: envelope.id.map(|id| id.0),
    })
}

/// Whether `text` nests arrays and objects at most `MAX_DEPTH` deep: one vectorisable
/// counting pass, and an exact, string-aware scan only for texts with many brackets.
fn nesting_ok(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() <= MAX_DEPTH {
        return true;
    }
    // `[` is `{` with bit 5 clear; counting per 255-byte chunk keeps the counter a u8.
    let opening: usize = bytes
        .chunks(255)
        .map(|c| c.iter().fold(0u8, |n, &b| n + u8::from(b | 0x20 == b'{')) as usize)
        .sum();
    opening <= MAX_DEPTH || exact_depth_ok(bytes)
}

fn exact_depth_ok(bytes: &[u8]) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => match string_end(bytes, i + 1) {
                Some(end) => i = end,
                // Unterminated: the parser stops there, no deeper than this.
                None => return true,
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    true
}

/// The index of the quote closing the string whose content starts at `from`.
fn string_end(bytes: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', bytes.get(from..)?)?;
        if bytes[at] == b'"' {
            return Some(at);
        }
        from = at + 2;
    }
}

/// The members of a JSON object in order, duplicates included, values as raw text.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) = map.next_entry::<Str<'de>, &'de RawValue>()? {
                    members.push((k.0, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// The members of the object text `text`, or `None` if it is not a valid object.
fn members(text: &str) -> Option<Members<'_>> {
    serde_json::from_str(text).ok()
}

fn is_str(v: &RawValue) -> bool {
    v.get().starts_with('"')
}

fn is_null(v: &RawValue) -> bool {
    v.get() == "null"
}

/// Finds out why `text` is not an envelope (the typed parse only says that it is not).
fn classify(text: &str) -> EnvelopeError {
    if serde_json::from_str::<IgnoredAny>(text).is_err() {
        return EnvelopeError::NotJson;
    }
    if first_byte(text) != Some(b'{') {
        return EnvelopeError::NotObject;
    }
    let Some(Members(members)) = members(text) else {
        return EnvelopeError::NotJson;
    };
    let (mut events, mut ids, mut datas) = (0u32, 0u32, 0u32);
    let (mut event_is_str, mut id_is_str) = (true, true);
    for (key, value) in &members {
        match &**key {
            "event" => {
                events += 1;
                event_is_str &= is_str(value);
            }
            "id" => {
                ids += 1;
                id_is_str &= is_str(value) || is_null(value);
            }
            "data" => datas += 1,
            _ => {}
        }
    }
    if events == 0 || !event_is_str {
        EnvelopeError::NoEvent
    } else if !id_is_str {
        EnvelopeError::BadId
    } else if events > 1 {
        EnvelopeError::DuplicateField("event")
    } else if ids > 1 {
        EnvelopeError::DuplicateField("id")
    } else if datas > 1 {
        EnvelopeError::DuplicateField("data")
    } else {
        EnvelopeError::NotJson
    }
}

fn is_json_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

fn first_byte(text: &str) -> Option<u8> {
    text.trim_start_matches(is_json_ws).bytes().next()
}

/// The string `id` of a message that is not a valid envelope (for instance one without
/// `event`), so that the error answering it can still carry the request id.
pub fn salvage_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    if first_byte(text) != Some(b'{') {
        return None;
    }
    serde_json::from_str::<IdOnly>(text).ok()?.id
}

/// Why the `data` of a known event is invalid, e.g. "data.token must be a string".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError(pub String);

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// `auth` data: `{token, machineId?, version?}`.
#[derive(Debug, PartialEq, Eq)]
pub struct AuthData<'a> {
    pub token: Cow<'a, str>,
    pub machine_id: Option<Cow<'a, str>>,
    pub version: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct AuthWire<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
    #[serde(borrow, rename = "machineId")]
    machine_id: Option<Str<'a>>,
    #[serde(borrow)]
    version: Option<Str<'a>>,
}

/// A string field of a data object and whether it is required (an optional one may be
/// absent or `null`).
type FieldSpec = (&'static str, bool);

pub fn auth_data(data: Option<&str>) -> Result<AuthData<'_>, DataError> {
    const FIELDS: &[FieldSpec] = &[("token", true), ("machineId", false), ("version", false)];
    let wire: AuthWire<'_> = typed(data, FIELDS)?;
    Ok(AuthData {
        token: wire.token,
        machine_id: wire.machine_id.map(|s| s.0),
        version: wire.version.map(|s| s.0),
    })
}

/// `command` data from a client: an object with string `machineId` and `type`
/// (other fields are forwarded untouched).
#[derive(Debug, PartialEq, Eq)]
pub struct CommandData<'a> {
    pub machine_id: Cow<'a, str>,
    pub kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct CommandWire<'a> {
    #[serde(borrow, rename = "machineId")]
    machine_id: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
}

pub fn command_data(data: Option<&str>) -> Result<CommandData<'_>, DataError> {
    const FIELDS: &[FieldSpec] = &[("machineId", true), ("type", true)];
    let wire: CommandWire<'_> = typed(data, FIELDS)?;
    Ok(CommandData {
        machine_id: wire.machine_id,
        kind: wire.kind,
    })
}

#[derive(Deserialize)]
struct IdWire<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
}

/// The string `id` of a `command:response`'s data object.
pub fn command_response_id(data: Option<&str>) -> Result<Cow<'_, str>, DataError> {
    let wire: IdWire<'_> = typed(data, &[("id", true)])?;
    Ok(wire.id)
}

#[derive(Deserialize)]
struct ClusterWire<'a> {
    #[serde(borrow, rename = "clusterId")]
    cluster_id: Cow<'a, str>,
}

/// The string `clusterId` of a service's `notification` data object.
pub fn notification_cluster(data: Option<&str>) -> Result<Cow<'_, str>, DataError> {
    let wire: ClusterWire<'_> = typed(data, &[("clusterId", true)])?;
    Ok(wire.cluster_id)
}

#[derive(Deserialize)]
struct ServerWire<'a> {
    #[serde(borrow, rename = "serverId")]
    server_id: Cow<'a, str>,
}

/// An agent event the gateway relays, with what routing needs from its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayKind<'a> {
    Heartbeat,
    Metrics,
    /// `server:status`, whose latest data per server is kept for the admin API.
    ServerStatus {
        server_id: Cow<'a, str>,
    },
    PlayerJoined,
    PlayerLeft,
    Notification,
}

impl RelayKind<'_> {
    /// The event name clients receive (`server:status` is relayed as `server:updated`).
    pub fn outbound(&self) -> &'static str {
        match self {
            RelayKind::Heartbeat => "heartbeat",
            RelayKind::Metrics => "metrics",
            RelayKind::ServerStatus { .. } => "server:updated",
            RelayKind::PlayerJoined => "player:joined",
            RelayKind::PlayerLeft => "player:left",
            RelayKind::Notification => "notification",
        }
    }

    /// Whether only services receive it (agent telemetry).
    pub fn services_only(&self) -> bool {
        matches!(self, RelayKind::Heartbeat | RelayKind::Metrics)
    }
}

/// Checks the data of an agent event that is relayed (`heartbeat`, `metrics`,
/// `notification`: an object; `server:status`, `player:joined`, `player:left`: an object
/// with a string `serverId`) and returns its kind and the raw object text; `None` for an
/// event that is not relayed.
pub fn relayed_data<'a>(
    event: &str,
    data: Option<&'a str>,
) -> Option<Result<(RelayKind<'a>, &'a str), DataError>> {
    let server = || typed::<ServerWire<'_>>(data, &[("serverId", true)]);
    let kind = match event {
        "heartbeat" => object(data).map(|_| RelayKind::Heartbeat),
        "metrics" => object(data).map(|_| RelayKind::Metrics),
        "notification" => object(data).map(|_| RelayKind::Notification),
        "server:status" => server().map(|s| RelayKind::ServerStatus {
            server_id: s.server_id,
        }),
        "player:joined" => server().map(|_| RelayKind::PlayerJoined),
        "player:left" => server().map(|_| RelayKind::PlayerLeft),
        _ => return None,
    };
    Some(kind.map(|k| (k, data.unwrap_or_default())))
}

fn not_object() -> DataError {
    DataError("data must be an object".into())
}

/// `data` if it is an object text.
fn object(data: Option<&str>) -> Result<&str, DataError> {
    match data {
        Some(text) if first_byte(text) == Some(b'{') => Ok(text),
        _ => Err(not_object()),
    }
}

/// Deserializes the data object into `T`, explaining a failure in terms of `fields`.
fn typed<'a, T: Deserialize<'a>>(
    data: Option<&'a str>,
    fields: &[FieldSpec],
) -> Result<T, DataError> {
    // Checked first: a derived struct would also accept an array, field by position.
    let text = object(data)?;
    if !nesting_ok(text) {
        return Err(DataError("data is not valid JSON".into()));
    }
    serde_json::from_str(text).map_err(|_| explain(text, fields))
}

/// The first problem with `fields` in the object `text`.
fn explain(text: &str, fields: &[FieldSpec]) -> DataError {
    // Per field: how often it appears and whether every occurrence had the right type.
    let mut seen = [(0u32, true); 4];
    let Some(Members(members)) = members(text) else {
        return DataError("data is not valid JSON".into());
    };
    for (key, value) in &members {
        if let Some(i) = fields.iter().position(|(name, _)| *name == key) {
            let Some(slot) = seen.get_mut(i) else {
                continue;
            };
            slot.0 += 1;
            slot.1 &= is_str(value) || (!fields[i].1 && is_null(value));
        }
    }
    for (&(name, required), &(count, type_ok)) in fields.iter().zip(&seen) {
        if !type_ok || (required && count == 0) {
            return DataError(format!("data.{name} must be a string"));
        }
    }
    for (&(name, _), &(count, _)) in fields.iter().zip(&seen) {
        if count > 1 {
            return DataError(format!("data.{name} must appear only once"));
        }
    }
    DataError("data is invalid".into())
}

/// The error codes of docs/protocol.md section 10.
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

/// Room for the fixed JSON punctuation and keys of any encoded message, and a timestamp.
const OVERHEAD: usize = 96;

/// A text frame's JSON payload being written.
struct Out(FrameBuf);

impl Out {
    fn new(payload_hint: usize) -> Self {
        Out(FrameBuf::with_capacity(payload_hint))
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.0.payload().extend_from_slice(bytes);
    }

    /// A JSON string. Strings that need no escape are copied as they are: the general
    /// escaper reserves six bytes per input byte, which would grow the frame's buffer.
    fn str(&mut self, s: &str) {
        let buf = self.0.payload();
        if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            buf.reserve(s.len() + 2);
            buf.push(b'"');
            buf.extend_from_slice(s.as_bytes());
            buf.push(b'"');
        } else {
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(buf, s);
        }
    }

    fn num(&mut self, n: u64) {
        self.0
            .payload()
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    /// Closes the envelope with its `timestamp`.
    /// A top-level `"id"` member, when there is one.
    fn id(&mut self, id: Option<&str>) {
        if let Some(id) = id {
            self.raw(b",\"id\":");
            self.str(id);
        }
    }

    fn finish(mut self, ts_ms: u64) -> Bytes {
        self.raw(b",\"timestamp\":");
        self.num(ts_ms);
        self.raw(b"}");
        self.0.finish(OP_TEXT)
    }
}

/// `{"event":"error","data":{"code","message","timestamp":<secs>},"id"?,"timestamp"}`.
pub fn error(code: ErrorCode, message: &str, id: Option<&str>, ts_ms: u64) -> Bytes {
    let id_len = id.map_or(0, str::len);
    let mut out = Out::new(OVERHEAD + message.len() + id_len);
    out.raw(b"{\"event\":\"error\",\"data\":{\"code\":");
    out.str(code.as_str());
    out.raw(b",\"message\":");
    out.str(message);
    out.raw(b",\"timestamp\":");
    out.num(ts_ms / 1000);
    out.raw(b"}");
    out.id(id);
    out.finish(ts_ms)
}

/// `authenticated` for an agent: `{machineId, clusterId}`, with the `auth`'s `id` if any.
pub fn authenticated_agent(
    machine_id: &str,
    cluster_id: &str,
    id: Option<&str>,
    ts_ms: u64,
) -> Bytes {
    let mut out = Out::new(OVERHEAD + machine_id.len() + cluster_id.len() + id.map_or(0, str::len));
    out.raw(b"{\"event\":\"authenticated\",\"data\":{\"machineId\":");
    out.str(machine_id);
    out.raw(b",\"clusterId\":");
    out.str(cluster_id);
    out.raw(b"}");
    out.id(id);
    out.finish(ts_ms)
}

/// `authenticated` for a user or service: `{userId, role, clusters}` (a service: `["*"]`).
pub fn authenticated_client(
    user_id: &str,
    role: &str,
    clusters: &[Box<str>],
    id: Option<&str>,
    ts_ms: u64,
) -> Bytes {
    let clusters_len: usize = clusters.iter().map(|c| c.len() + 3).sum();
    let mut out = Out::new(OVERHEAD + user_id.len() + role.len() + clusters_len);
    out.raw(b"{\"event\":\"authenticated\",\"data\":{\"userId\":");
    out.str(user_id);
    out.raw(b",\"role\":");
    out.str(role);
    out.raw(b",\"clusters\":[");
    for (i, cluster) in clusters.iter().enumerate() {
        if i > 0 {
            out.raw(b",");
        }
        out.str(cluster);
    }
    out.raw(b"]}");
    out.id(id);
    out.finish(ts_ms)
}

/// `token:expiring` `{expiresAt}` (Unix seconds).
pub fn token_expiring(expires_at: u64, ts_ms: u64) -> Bytes {
    let mut out = Out::new(OVERHEAD);
    out.raw(b"{\"event\":\"token:expiring\",\"data\":{\"expiresAt\":");
    out.num(expires_at);
    out.raw(b"}");
    out.finish(ts_ms)
}

/// `machine:online` / `machine:offline` `{machineId, clusterId, version}`.
pub fn machine_presence(
    event: &str,
    machine_id: &str,
    cluster_id: &str,
    version: &str,
    ts_ms: u64,
) -> Bytes {
    let mut out =
        Out::new(OVERHEAD + event.len() + machine_id.len() + cluster_id.len() + version.len());
    out.raw(b"{\"event\":");
    out.str(event);
    out.raw(b",\"data\":{\"machineId\":");
    out.str(machine_id);
    out.raw(b",\"clusterId\":");
    out.str(cluster_id);
    out.raw(b",\"version\":");
    out.str(version);
    out.raw(b"}");
    out.finish(ts_ms)
}

/// The keys a splice leaves out of a data object.
struct Dropped {
    names: [&'static str; 2],
    /// The names with their quotes: a key written without escapes contains one of these.
    quoted: [Finder<'static>; 2],
}

static RELAY_DROPPED: LazyLock<Dropped> = LazyLock::new(|| Dropped {
    names: ["machineId", "clusterId"],
    quoted: [Finder::new(b"\"machineId\""), Finder::new(b"\"clusterId\"")],
});

static COMMAND_DROPPED: LazyLock<Dropped> = LazyLock::new(|| Dropped {
    names: ["machineId", "id"],
    quoted: [Finder::new(b"\"machineId\""), Finder::new(b"\"id\"")],
});

/// The dropped names are all letters, so a key spelling one of them with escapes has a `\u`.
static UNICODE_ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));

/// Appends `,"key":<raw value>` for each field of the object `data`, in order, except the
/// `dropped` keys (compared unescaped). Values are copied byte for byte.
fn splice_fields(out: &mut Out, data: &str, dropped: &Dropped) {
    let Some(inner) = object_inner(data) else {
        return;
    };
    // Agents usually put `"machineId":"…"` first: strip leading dropped members written
    // plainly, then copy the rest as it is if no dropped key (or escape) is left in it.
    let rest = strip_leading_dropped(inner, dropped);
    if rest.is_empty() {
        return;
    }
    let bytes = rest.as_bytes();
    let clean = dropped.quoted.iter().all(|f| f.find(bytes).is_none())
        && UNICODE_ESCAPE.find(bytes).is_none();
    if clean {
        out.raw(b",");
        out.raw(bytes);
        return;
    }
    // `data` was validated when it was parsed; should it not be an object after all, no
    // field is added and the output stays valid JSON.
    let Some(Members(members)) = members(data) else {
        return;
    };
    for (key, value) in members {
        if dropped.names.contains(&&*key) {
            continue;
        }
        out.raw(b",");
        out.str(&key);
        out.raw(b":");
        out.raw(value.get().as_bytes());
    }
}

/// `inner` (an object's text between its braces) without its leading members whose key is
/// a dropped name and whose value is a string without escapes, e.g. `"machineId":"m1",`.
fn strip_leading_dropped<'a>(mut inner: &'a str, dropped: &Dropped) -> &'a str {
    'members: loop {
        for name in dropped.names {
            let Some(after_key) = inner
                .strip_prefix('"')
                .and_then(|r| r.strip_prefix(name))
                .and_then(|r| r.strip_prefix('"'))
            else {
                continue;
            };
            let Some(value) = after_key.trim_start_matches(is_json_ws).strip_prefix(':') else {
                return inner;
            };
            let Some(string) = value.trim_start_matches(is_json_ws).strip_prefix('"') else {
                return inner;
            };
            let Some(end) = string.find(['"', '\\']) else {
                return inner;
            };
            if string.as_bytes()[end] != b'"' {
                return inner;
            }
            let after = string[end + 1..].trim_start_matches(is_json_ws);
            inner = match after.strip_prefix(',') {
                Some(next) => next.trim_start_matches(is_json_ws),
                None if after.is_empty() => after,
                None => return inner,
            };
            continue 'members;
        }
        return inner;
    }
}

/// The text between the braces of an object text, without surrounding whitespace.
fn object_inner(data: &str) -> Option<&str> {
    let inner = data
        .trim_matches(is_json_ws)
        .strip_prefix('{')?
        .strip_suffix('}')?;
    Some(inner.trim_matches(is_json_ws))
}

/// A relayed agent event: `{"event":<event>,"data":{"machineId","clusterId",<every other
/// field of data, in order, except machineId and clusterId>},"timestamp"}`.
/// `data` is a JSON object text.
pub fn relay(event: &str, machine_id: &str, cluster_id: &str, data: &str, ts_ms: u64) -> Bytes {
    let mut out =
        Out::new(OVERHEAD + event.len() + machine_id.len() + cluster_id.len() + data.len());
    out.raw(b"{\"event\":");
    out.str(event);
    out.raw(b",\"data\":{\"machineId\":");
    out.str(machine_id);
    out.raw(b",\"clusterId\":");
    out.str(cluster_id);
    splice_fields(&mut out, data, &RELAY_DROPPED);
    out.raw(b"}");
    out.finish(ts_ms)
}

/// The command an agent receives: `{"event":"command","data":{"id":<cmd_id>,<every field
/// of data except machineId and id>},"timestamp"}`.
pub fn command_to_agent(cmd_id: &str, data: &str, ts_ms: u64) -> Bytes {
    let mut out = Out::new(OVERHEAD + cmd_id.len() + data.len());
    out.raw(b"{\"event\":\"command\",\"data\":{\"id\":");
    out.str(cmd_id);
    splice_fields(&mut out, data, &COMMAND_DROPPED);
    out.raw(b"}");
    out.finish(ts_ms)
}

/// What the issuer receives: `{"event":"command:response","id":<req_id>,"data":<data>,"timestamp"}`.
pub fn command_response(req_id: &str, data: &str, ts_ms: u64) -> Bytes {
    let mut out = Out::new(OVERHEAD + req_id.len() + data.len());
    out.raw(b"{\"event\":\"command:response\",\"id\":");
    out.str(req_id);
    out.raw(b",\"data\":");
    out.raw(data.as_bytes());
    out.finish(ts_ms)
}

/// A service's notification relayed to a cluster: `{"event":"notification","data":<data>,"timestamp"}`.
pub fn notification(data: &str, ts_ms: u64) -> Bytes {
    let mut out = Out::new(OVERHEAD + data.len());
    out.raw(b"{\"event\":\"notification\",\"data\":");
    out.raw(data.as_bytes());
    out.finish(ts_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The JSON payload of one unmasked, final text frame.
    fn payload_text(frame: &Bytes) -> &str {
        assert_eq!(frame[0], 0x81, "FIN + text opcode");
        let (len, start) = match frame[1] {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert_eq!(frame.len(), start + len, "declared length");
        std::str::from_utf8(&frame[start..]).unwrap()
    }

    fn payload(frame: &Bytes) -> Value {
        serde_json::from_str(payload_text(frame)).unwrap()
    }

    const TRICKY: &[&str] = &[
        "",
        "plain",
        "quote \" inside",
        "back\\slash",
        "\\u0041 looks escaped",
        "line\nbreak\ttab\rcr",
        "\u{0}\u{1}\u{1f}\u{7f}",
        "\u{8}\u{c}",
        "héllo ünïcode ✓ 😀",
        "\u{2028}\u{2029}",
        "</script>",
        "a long string that goes past one SIMD lane of thirty-two bytes \" and \\ and \n at the end",
    ];

    // parse

    #[test]
    fn parses_heartbeat_and_borrows_everything() {
        let text = r#"{"event":"heartbeat","data":{"machineId":"m1","cpu":12.5,"memory":{"used":1}},"id":"r1"}"#;
        let msg = parse(text).unwrap();
        assert_eq!(msg.event, "heartbeat");
        assert!(matches!(msg.event, Cow::Borrowed(_)));
        assert_eq!(
            msg.data,
            Some(r#"{"machineId":"m1","cpu":12.5,"memory":{"used":1}}"#)
        );
        assert_eq!(msg.id.as_deref(), Some("r1"));
        assert!(matches!(msg.id, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn escaped_strings_are_unescaped_into_owned() {
        let msg = parse(r#"{"event":"server\u003astatus","id":"r\"1"}"#).unwrap();
        assert_eq!(msg.event, "server:status");
        assert!(matches!(msg.event, Cow::Owned(_)));
        assert_eq!(msg.id.as_deref(), Some("r\"1"));
        assert!(matches!(msg.id, Some(Cow::Owned(_))));
    }

    #[test]
    fn data_raw_text_is_exact_whatever_its_type() {
        let cases = [
            (
                r#"{"event":"e","data": { "a" : [1, 2,{"b":null}] } }"#,
                r#"{ "a" : [1, 2,{"b":null}] }"#,
            ),
            (r#"{"event":"e","data":"te\"xt"}"#, r#""te\"xt""#),
            (r#"{"event":"e","data":"plain"}"#, r#""plain""#),
            (
                r#"{"x":"\u0041","data" : "\u00e9\n" ,"event":"e"}"#,
                r#""\u00e9\n""#,
            ),
            (r#"{"event":"e","data":[1,"x"]}"#, r#"[1,"x"]"#),
            (r#"{"event":"e","data":-1.5e3}"#, "-1.5e3"),
            (r#"{"event":"e","data":false}"#, "false"),
        ];
        for (text, raw) in cases {
            assert_eq!(parse(text).unwrap().data, Some(raw), "{text}");
        }
    }

    #[test]
    fn null_or_missing_data_and_id_are_absent() {
        for text in [
            r#"{"event":"e"}"#,
            r#"{"event":"e","data":null,"id":null}"#,
            r#"  {"id":null, "event":"e" }  "#,
        ] {
            let msg = parse(text).unwrap();
            assert_eq!(
                msg,
                Inbound {
                    event: Cow::Borrowed("e"),
                    data: None,
                    id: None
                },
                "{text}"
            );
        }
    }

    #[test]
    fn unknown_top_level_fields_are_ignored() {
        let msg = parse(r#"{"x":{"y":[1,{}]},"event":"e","timestamp":123,"z":"w"}"#).unwrap();
        assert_eq!(msg.event, "e");
        assert_eq!(msg.data, None);
    }

    #[test]
    fn escaped_top_level_keys_are_recognised() {
        let msg = parse(r#"{"ev\u0065nt":"e","\u0069d":"r"}"#).unwrap();
        assert_eq!(msg.event, "e");
        assert_eq!(msg.id.as_deref(), Some("r"));
    }

    #[test]
    fn not_json() {
        for text in [
            "",
            "   ",
            "{",
            "{\"event\":\"e\"",
            "{\"event\":\"e\"} trailing",
            "{\"event\":\"e\"}{}",
            "{'event':'e'}",
            "{\"event\":\"e\",}",
            "{\"event\":\"e\",\"data\":{\"a\":1,}}",
            "{\"event\":\"e\",\"data\":[1 2]}",
            "{\"event\":\"e\",\"other\":[1,]}",
            "{\"event\":\"e\",\"other\":tru}",
            "{\"event\":\"e\",\"data\":\"\\x\"}",
            "{\"event\":\"e\",\"data\":01}",
            "{\"event\":\"e\",\"data\":NaN}",
        ] {
            assert_eq!(parse(text), Err(EnvelopeError::NotJson), "{text:?}");
        }
    }

    /// Valid JSON grammar (RFC 8259, and JavaScript's `JSON.parse` takes them) that
    /// serde_json refuses: a lone surrogate escape, a number beyond f64.
    const GRAMMAR_ONLY: &[&str] = &[r#""\ud800""#, r#""\udc00x""#, "1e400"];

    #[test]
    fn accepts_exactly_what_serde_json_accepts() {
        let values = [
            "\"a\nb\"",
            "\"a\u{0}b\"",
            "\"tab\there\"",
            "\"\u{1f}\"",
            "\"\u{7f}\"",
            "\"é😀\"",
            r#""\ud83d\ude00""#,
            r#""\ud800""#,
            r#""\udc00x""#,
            r#""\u12""#,
            r#""\uZZZZ""#,
            r#""\u00e""#,
            r#""\u""#,
            r#""\u","a":""#,
            r#""\\u""#,
            r#""\\\u0041""#,
            r#""\\\uD83D\uDE00""#,
            r#""\a""#,
            r#""\/""#,
            "0",
            "-0",
            "01",
            "-",
            "1.",
            ".5",
            "+1",
            "1e",
            "1e+",
            "1E-7",
            "-1.5e300",
            "1e400",
            "123456789012345678901234567890",
            "true",
            "True",
            "nul",
            "[]",
            "[,]",
            "[1,]",
            "{}",
            r#"{"a"}"#,
            r#"{"a":}"#,
            "{1:2}",
            r#"{"a":1 "b":2}"#,
            "[1]]",
            "\u{c}1",
            "1\u{c}",
            "/*c*/1",
            "\u{feff}1",
        ];
        for v in values {
            for text in [
                format!(r#"{{"event":"e","data":{v}}}"#),
                format!(r#"{{"event":"e","x":{v}}}"#),
                format!(r#"{{"event":"e","data":[{{"k":{v}}}]}}"#),
            ] {
                let valid =
                    serde_json::from_str::<Value>(&text).is_ok() || GRAMMAR_ONLY.contains(&v);
                assert_eq!(parse(&text).is_ok(), valid, "{text:?}");
            }
        }
    }

    #[test]
    fn unicode_escapes_need_four_hex_digits_everywhere() {
        // Wherever they are: a relayed or forwarded object never carries one unchecked.
        let bad = r#"{"a":"\uZZZZ"}"#;
        assert_eq!(
            command_data(Some(bad)),
            Err(DataError("data is not valid JSON".into()))
        );
        assert_eq!(
            payload(&relay("e", "m", "c", r#"{"\u0061":"\uZZZZ"}"#, 1)),
            json!({"event":"e","data":{"machineId":"m","clusterId":"c"},"timestamp":1})
        );
    }

    #[test]
    fn not_object() {
        for text in [
            "[]",
            "[{\"event\":\"e\"}]",
            "[\"e\"]",
            "[\"e\",{},\"id\"]",
            "\"event\"",
            "42",
            "null",
            " true ",
        ] {
            assert_eq!(parse(text), Err(EnvelopeError::NotObject), "{text:?}");
        }
    }

    #[test]
    fn no_event() {
        for text in [
            "{}",
            r#"{"data":{}}"#,
            r#"{"event":null}"#,
            r#"{"event":1}"#,
            r#"{"event":["e"]}"#,
            r#"{"event":{"name":"e"}}"#,
            r#"{"Event":"e"}"#,
            r#"{"event":1,"id":2}"#,
        ] {
            assert_eq!(parse(text), Err(EnvelopeError::NoEvent), "{text:?}");
        }
    }

    #[test]
    fn bad_id() {
        for text in [
            r#"{"event":"e","id":1}"#,
            r#"{"event":"e","id":true}"#,
            r#"{"event":"e","id":["r"]}"#,
            r#"{"id":{},"event":"e"}"#,
        ] {
            assert_eq!(parse(text), Err(EnvelopeError::BadId), "{text:?}");
        }
    }

    #[test]
    fn duplicate_fields_are_refused() {
        let cases = [
            (r#"{"event":"a","event":"b"}"#, "event"),
            (r#"{"event":"a","ev\u0065nt":"b"}"#, "event"),
            (r#"{"event":"a","id":"1","id":"2"}"#, "id"),
            (r#"{"event":"a","id":null,"id":"2"}"#, "id"),
            (r#"{"event":"a","data":{},"data":[]}"#, "data"),
        ];
        for (text, field) in cases {
            assert_eq!(
                parse(text),
                Err(EnvelopeError::DuplicateField(field)),
                "{text}"
            );
        }
    }

    #[test]
    fn error_texts() {
        assert_eq!(
            EnvelopeError::NoEvent.to_string(),
            "message needs a string \"event\""
        );
        assert_eq!(
            EnvelopeError::DuplicateField("id").to_string(),
            "\"id\" must appear only once"
        );
    }

    fn nested(depth: usize) -> String {
        format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// Runs `f` on a thread with `stack` bytes of stack.
    fn with_stack<T: Send + 'static>(stack: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(stack)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        // The envelope is one level. A debug build needs ~50 KiB of stack per level.
        let data = nested(MAX_DEPTH - 1);
        let text = format!(r#"{{"event":"e","data":{data}}}"#);
        let parsed = with_stack(8 << 20, move || {
            parse(&text).map(|m| m.data.map(str::to_owned))
        });
        assert_eq!(parsed, Ok(Some(data)));
        let too_deep = format!(r#"{{"event":"e","data":{}}}"#, nested(MAX_DEPTH));
        assert_eq!(parse(&too_deep), Err(EnvelopeError::NotJson));
    }

    #[test]
    fn many_shallow_containers_are_accepted() {
        let disks = vec![r#"{"name":"sda","used":[1,2]}"#; 200].join(",");
        let text = format!(r#"{{"event":"metrics","data":{{"disk":[{disks}]}}}}"#);
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = format!(
            r#"{{"event":"e","data":"{}\"{{\\","x":["]"]}}"#,
            "[".repeat(1000)
        );
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        // A small stack: the refusal must not depend on the parser's recursion.
        let results = with_stack(256 * 1024, || {
            let in_data = format!(r#"{{"event":"e","data":{}}}"#, nested(100_000));
            let ignored = format!(r#"{{"x":{},"event":"e"}}"#, nested(100_000));
            let objects = format!(r#"{{"event":"e","data":{}}}"#, "{\"a\":".repeat(100_000));
            [in_data, ignored, objects].map(|t| parse(&t).map(|_| ()))
        });
        assert_eq!(results, [const { Err(EnvelopeError::NotJson) }; 3]);
        let deep_data = format!(r#"{{"token":"t","x":{}}}"#, nested(1000));
        let results = with_stack(256 * 1024, move || {
            let d = Some(deep_data.as_str());
            (
                auth_data(d).map(|_| ()),
                payload_text(&relay(
                    "e",
                    "m",
                    "c",
                    &format!(r#"{{"\u0061":{}}}"#, nested(1000)),
                    1,
                ))
                .to_owned(),
            )
        });
        assert_eq!(results.0, Err(DataError("data is not valid JSON".into())));
        // Relays take data that was validated on arrival; unvalidated deep data is spliced
        // without recursing either.
        assert!(results
            .1
            .starts_with(r#"{"event":"e","data":{"machineId":"m","clusterId":"c","a":[["#));
    }

    #[test]
    fn invalid_utf8_escape_sequences_are_refused() {
        // A lone surrogate escape is not a valid string.
        assert!(parse(r#"{"event":"\ud800"}"#).is_err());
    }

    // typed data

    #[test]
    fn auth_data_fields() {
        let d = auth_data(Some(
            r#"{"token":"t.k.n","machineId":"m1","version":"0.4.18","x":1}"#,
        ))
        .unwrap();
        assert_eq!(
            d,
            AuthData {
                token: Cow::Borrowed("t.k.n"),
                machine_id: Some(Cow::Borrowed("m1")),
                version: Some(Cow::Borrowed("0.4.18")),
            }
        );
        assert!(matches!(d.machine_id, Some(Cow::Borrowed(_))));
        let d = auth_data(Some(r#"{"token":"t","machineId":null}"#)).unwrap();
        assert_eq!(
            (d.token.as_ref(), d.machine_id, d.version),
            ("t", None, None)
        );
    }

    fn data_err(text: &str) -> String {
        text.to_string()
    }

    #[test]
    fn auth_data_errors() {
        let cases: &[(Option<&str>, &str)] = &[
            (None, "data must be an object"),
            (Some("\"t\""), "data must be an object"),
            (Some(r#"["t"]"#), "data must be an object"),
            (Some("{}"), "data.token must be a string"),
            (Some(r#"{"token":1}"#), "data.token must be a string"),
            (Some(r#"{"token":null}"#), "data.token must be a string"),
            (
                Some(r#"{"token":"t","machineId":7}"#),
                "data.machineId must be a string",
            ),
            (
                Some(r#"{"token":"t","version":{}}"#),
                "data.version must be a string",
            ),
            (
                Some(r#"{"token":"t","token":"u"}"#),
                "data.token must appear only once",
            ),
        ];
        for &(data, message) in cases {
            assert_eq!(
                auth_data(data),
                Err(DataError(data_err(message))),
                "{data:?}"
            );
        }
    }

    #[test]
    fn command_data_fields_and_errors() {
        let d = command_data(Some(
            r#"{"machineId":"m1","type":"server:start","serverId":"s"}"#,
        ))
        .unwrap();
        assert_eq!(
            (d.machine_id.as_ref(), d.kind.as_ref()),
            ("m1", "server:start")
        );
        let cases: &[(Option<&str>, &str)] = &[
            (None, "data must be an object"),
            (Some("[]"), "data must be an object"),
            (Some(r#"{"type":"x"}"#), "data.machineId must be a string"),
            (
                Some(r#"{"machineId":1,"type":"x"}"#),
                "data.machineId must be a string",
            ),
            (Some(r#"{"machineId":"m"}"#), "data.type must be a string"),
            (
                Some(r#"{"machineId":"m","type":null}"#),
                "data.type must be a string",
            ),
            (
                Some(r#"{"machineId":"m","type":"x","machine\u0049d":"n"}"#),
                "data.machineId must appear only once",
            ),
        ];
        for &(data, message) in cases {
            assert_eq!(
                command_data(data),
                Err(DataError(data_err(message))),
                "{data:?}"
            );
        }
    }

    #[test]
    fn command_response_id_and_notification_cluster() {
        assert_eq!(
            command_response_id(Some(r#"{"id":"cmd_1","success":true}"#)).unwrap(),
            "cmd_1"
        );
        assert_eq!(
            command_response_id(Some(r#"{"success":true}"#)),
            Err(DataError("data.id must be a string".into()))
        );
        assert_eq!(
            command_response_id(None),
            Err(DataError("data must be an object".into()))
        );
        assert_eq!(
            notification_cluster(Some(r#"{"clusterId":"c\n1"}"#)).unwrap(),
            "c\n1"
        );
        assert_eq!(
            notification_cluster(Some(r#"{"clusterId":5}"#)),
            Err(DataError("data.clusterId must be a string".into()))
        );
    }

    #[test]
    fn relayed_data_checks() {
        let text = |event, data| relayed_data(event, data).expect(event).map(|(_, t)| t);
        let obj = r#"{"cpu":1}"#;
        for event in ["heartbeat", "metrics", "notification"] {
            assert_eq!(text(event, Some(obj)), Ok(obj));
            assert_eq!(
                text(event, Some("[]")),
                Err(DataError("data must be an object".into()))
            );
            assert_eq!(
                text(event, None),
                Err(DataError("data must be an object".into()))
            );
        }
        let status = r#"{"serverId":"s1","status":"running"}"#;
        for event in ["server:status", "player:joined", "player:left"] {
            assert_eq!(text(event, Some(status)), Ok(status));
            assert_eq!(
                text(event, Some(obj)),
                Err(DataError("data.serverId must be a string".into()))
            );
            assert_eq!(
                text(event, Some(r#"{"serverId":3}"#)),
                Err(DataError("data.serverId must be a string".into()))
            );
            assert_eq!(
                text(event, Some("1")),
                Err(DataError("data must be an object".into()))
            );
        }
        assert_eq!(relayed_data("command:response", Some(obj)), None);
        assert_eq!(relayed_data("server:updated", Some(status)), None);
    }

    #[test]
    fn relay_kinds_carry_the_server_id_and_the_outbound_name() {
        let kind = |event, data| relayed_data(event, Some(data)).unwrap().unwrap().0;
        let escaped = kind("server:status", r#"{"serverId":"s\u0031"}"#);
        assert_eq!(
            escaped,
            RelayKind::ServerStatus {
                server_id: "s1".into()
            }
        );
        assert_eq!(escaped.outbound(), "server:updated");
        let names = [
            "heartbeat",
            "metrics",
            "notification",
            "player:joined",
            "player:left",
        ];
        for event in names {
            let k = kind(event, r#"{"serverId":"s"}"#);
            assert_eq!(k.outbound(), event);
            assert_eq!(k.services_only(), matches!(event, "heartbeat" | "metrics"));
        }
        assert!(!escaped.services_only());
    }

    #[test]
    fn data_helpers_work_on_parsed_data() {
        let msg = parse(r#"{"event":"auth","data":{"token":"abc"}}"#).unwrap();
        assert_eq!(auth_data(msg.data).unwrap().token, "abc");
    }

    // encoders

    #[test]
    fn error_frame() {
        let f = error(
            ErrorCode::InvalidMessage,
            "bad \"thing\"",
            Some("r\\1"),
            1_641_823_200_123,
        );
        assert_eq!(
            payload(&f),
            json!({"event":"error","data":{"code":"INVALID_MESSAGE","message":"bad \"thing\"","timestamp":1_641_823_200u64},"id":"r\\1","timestamp":1_641_823_200_123u64})
        );
        let f = error(ErrorCode::AuthTimeout, "x", None, 999);
        assert_eq!(
            payload(&f),
            json!({"event":"error","data":{"code":"AUTH_TIMEOUT","message":"x","timestamp":0},"timestamp":999})
        );
    }

    #[test]
    fn error_codes_on_the_wire() {
        let codes = [
            (ErrorCode::AuthFailed, "AUTH_FAILED"),
            (ErrorCode::AuthTimeout, "AUTH_TIMEOUT"),
            (ErrorCode::InvalidMessage, "INVALID_MESSAGE"),
            (ErrorCode::CommandFailed, "COMMAND_FAILED"),
            (ErrorCode::RateLimit, "RATE_LIMIT"),
        ];
        for (code, text) in codes {
            assert_eq!(payload(&error(code, "m", None, 0))["data"]["code"], text);
        }
    }

    #[test]
    fn authenticated_frames() {
        assert_eq!(
            payload(&authenticated_agent("mch_123", "clu_abc", Some("req_7"), 5)),
            json!({"event":"authenticated","data":{"machineId":"mch_123","clusterId":"clu_abc"},"id":"req_7","timestamp":5})
        );
        let clusters: Vec<Box<str>> = vec!["clu_a".into(), "clu \"b\"".into()];
        assert_eq!(
            payload(&authenticated_client("usr_1", "user", &clusters, None, 6)),
            json!({"event":"authenticated","data":{"userId":"usr_1","role":"user","clusters":["clu_a","clu \"b\""]},"timestamp":6})
        );
        assert_eq!(
            payload(&authenticated_client(
                "svc",
                "service",
                &["*".into()],
                None,
                7
            )),
            json!({"event":"authenticated","data":{"userId":"svc","role":"service","clusters":["*"]},"timestamp":7})
        );
        assert_eq!(
            payload(&authenticated_client("u", "user", &[], None, 8))["data"]["clusters"],
            json!([])
        );
    }

    #[test]
    fn token_expiring_and_presence_frames() {
        assert_eq!(
            payload(&token_expiring(1_700_000_000, u64::MAX)),
            json!({"event":"token:expiring","data":{"expiresAt":1_700_000_000u64},"timestamp":u64::MAX})
        );
        for event in ["machine:online", "machine:offline"] {
            assert_eq!(
                payload(&machine_presence(event, "m", "c", "0.4.18", 1)),
                json!({"event":event,"data":{"machineId":"m","clusterId":"c","version":"0.4.18"},"timestamp":1})
            );
        }
    }

    #[test]
    fn every_string_is_escaped() {
        for &s in TRICKY {
            let f = machine_presence(s, s, s, s, 1);
            assert_eq!(
                payload(&f),
                json!({"event":s,"data":{"machineId":s,"clusterId":s,"version":s},"timestamp":1}),
                "{s:?}"
            );
            let f = error(ErrorCode::CommandFailed, s, Some(s), 0);
            assert_eq!(payload(&f)["data"]["message"], s);
            assert_eq!(payload(&f)["id"], s);
            // The same bytes as serde_json writes.
            let expected = serde_json::to_string(s).unwrap();
            assert!(
                payload_text(&f).contains(&format!("\"message\":{expected}")),
                "{s:?}"
            );
        }
    }

    #[test]
    fn relay_without_dropped_keys_keeps_the_object_byte_for_byte() {
        let data = r#"{"serverId":"s1","status":"running","players":[{"id":1,"n":"a"}],"nested":{"x":{"y":[]}},"n":1.50}"#;
        let f = relay("server:updated", "mch_1", "clu_1", data, 42);
        assert_eq!(
            payload_text(&f),
            r#"{"event":"server:updated","data":{"machineId":"mch_1","clusterId":"clu_1","serverId":"s1","status":"running","players":[{"id":1,"n":"a"}],"nested":{"x":{"y":[]}},"n":1.50},"timestamp":42}"#
        );
    }

    #[test]
    fn relay_replaces_dropped_keys_and_keeps_order() {
        let data =
            r#"{"a":1,"machineId":"fake","b":{"machineId":"inner"},"clusterId":"fake","c":[true]}"#;
        let f = relay("heartbeat", "m", "c", data, 1);
        assert_eq!(
            payload_text(&f),
            r#"{"event":"heartbeat","data":{"machineId":"m","clusterId":"c","a":1,"b":{"machineId":"inner"},"c":[true]},"timestamp":1}"#
        );
    }

    #[test]
    fn relay_compares_keys_unescaped() {
        let data =
            r#"{"machine\u0049d":"fake","cluster\u0049\u0064":"fake","k\u00e9y":"v","\u0061":2}"#;
        let f = relay("metrics", "m", "c", data, 1);
        assert_eq!(
            payload(&f),
            json!({"event":"metrics","data":{"machineId":"m","clusterId":"c","kéy":"v","a":2},"timestamp":1})
        );
        assert_eq!(
            payload_text(&f),
            r#"{"event":"metrics","data":{"machineId":"m","clusterId":"c","kéy":"v","a":2},"timestamp":1}"#
        );
    }

    #[test]
    fn relay_slow_path_keeps_values_byte_for_byte() {
        // A "\u" in a value forces the field-by-field path.
        let data = "{ \"machineId\" : \"x\" ,\n \"v\" : { \"s\" : \"\\u00e9\\\"\" , \"a\" : [ 1 , 2 ] } , \"w\":-0.0e+1 }";
        let f = relay("metrics", "m", "c", data, 1);
        assert_eq!(
            payload_text(&f),
            "{\"event\":\"metrics\",\"data\":{\"machineId\":\"m\",\"clusterId\":\"c\",\"v\":{ \"s\" : \"\\u00e9\\\"\" , \"a\" : [ 1 , 2 ] },\"w\":-0.0e+1},\"timestamp\":1}"
        );
    }

    #[test]
    fn relay_of_empty_and_spaced_objects() {
        for data in ["{}", " { } ", "{\n}"] {
            assert_eq!(
                payload_text(&relay("heartbeat", "m", "c", data, 1)),
                r#"{"event":"heartbeat","data":{"machineId":"m","clusterId":"c"},"timestamp":1}"#,
                "{data:?}"
            );
        }
        assert_eq!(
            payload_text(&relay("heartbeat", "m", "c", "{ \n\"a\" : 1 \t}", 1)),
            r#"{"event":"heartbeat","data":{"machineId":"m","clusterId":"c","a" : 1},"timestamp":1}"#
        );
        // Only dropped keys: nothing is left.
        assert_eq!(
            payload(&relay(
                "heartbeat",
                "m",
                "c",
                r#"{"machineId":"x","clusterId":"y"}"#,
                1
            )),
            json!({"event":"heartbeat","data":{"machineId":"m","clusterId":"c"},"timestamp":1})
        );
    }

    #[test]
    fn relay_with_unicode_and_escaped_strings() {
        let data =
            r#"{"player":{"username":"Jörg 😀 \"the\" \\ best","steamId":"7656"},"serverId":"s"}"#;
        let f = relay("player:joined", "m\"1", "c", data, 1);
        assert_eq!(
            payload(&f),
            json!({"event":"player:joined","data":{"machineId":"m\"1","clusterId":"c","player":{"username":"Jörg 😀 \"the\" \\ best","steamId":"7656"},"serverId":"s"},"timestamp":1})
        );
        assert!(payload_text(&f)
            .contains(r#""player":{"username":"Jörg 😀 \"the\" \\ best","steamId":"7656"}"#));
    }

    #[test]
    fn relay_of_a_non_object_adds_no_fields() {
        for data in ["[1,2]", "\"x\"", "", "{\"a\":"] {
            assert_eq!(
                payload(&relay("heartbeat", "m", "c", data, 1)),
                json!({"event":"heartbeat","data":{"machineId":"m","clusterId":"c"},"timestamp":1}),
                "{data:?}"
            );
        }
    }

    #[test]
    fn relay_of_a_large_object_uses_extended_lengths() {
        for n in [200, 70_000] {
            let data = format!(r#"{{"blob":"{}"}}"#, "x".repeat(n));
            let f = relay("metrics", "m", "c", &data, 1);
            assert_eq!(payload(&f)["data"]["blob"].as_str().unwrap().len(), n);
        }
    }

    #[test]
    fn command_to_agent_puts_the_gateway_id_first() {
        let data = r#"{"machineId":"mch_123","type":"server:start","id":"spoof","serverId":"srv_xyz","opts":{"id":1}}"#;
        let f = command_to_agent("cmd_7", data, 3);
        assert_eq!(
            payload_text(&f),
            r#"{"event":"command","data":{"id":"cmd_7","type":"server:start","serverId":"srv_xyz","opts":{"id":1}},"timestamp":3}"#
        );
        let f = command_to_agent(
            "cmd_8",
            r#"{"type":"x","\u0069d":"spoof","machine\u0049d":"m"}"#,
            3,
        );
        assert_eq!(
            payload(&f),
            json!({"event":"command","data":{"id":"cmd_8","type":"x"},"timestamp":3})
        );
        // The fast path: nothing to drop.
        let f = command_to_agent("c", r#"{"type":"x","serverId":"s"}"#, 3);
        assert_eq!(
            payload_text(&f),
            r#"{"event":"command","data":{"id":"c","type":"x","serverId":"s"},"timestamp":3}"#
        );
    }

    #[test]
    fn command_response_and_notification_splice_data_unchanged() {
        let data =
            r#"{"id":"cmd_1","success":false,"error":"disk \"full\"","result":{ "a" : [1] }}"#;
        assert_eq!(
            payload_text(&command_response("req_\"1", data, 9)),
            format!(r#"{{"event":"command:response","id":"req_\"1","data":{data},"timestamp":9}}"#)
        );
        let data = r#"{"clusterId":"c","type":"maintenance","message":"ünïcode"}"#;
        assert_eq!(
            payload_text(&notification(data, 10)),
            format!(r#"{{"event":"notification","data":{data},"timestamp":10}}"#)
        );
    }

    #[test]
    fn frames_carry_no_spare_escape_reservation() {
        // Plain strings must not trigger the escaper's six-bytes-per-byte reservation.
        let id = "x".repeat(1000);
        let f = authenticated_agent(&id, &id, None, 1);
        assert_eq!(
            payload(&f)["data"]["machineId"].as_str().unwrap().len(),
            1000
        );
    }

    #[test]
    fn salvage_id_finds_the_id_of_invalid_envelopes() {
        assert_eq!(
            salvage_id(r#"{"id":"bad-1","data":{}}"#).as_deref(),
            Some("bad-1")
        );
        assert_eq!(
            salvage_id(r#"{"event":5,"id":"bad-2"}"#).as_deref(),
            Some("bad-2")
        );
        assert_eq!(salvage_id(r#"{"event":5,"id":7}"#), None);
        assert_eq!(salvage_id("not json"), None);
        assert_eq!(salvage_id(r#"["id"]"#), None);
    }

    #[test]
    fn relay_strips_leading_plain_dropped_members_without_iterating() {
        let cases = [
            (
                r#"{"machineId":"mch_1","timestamp":1,"cpu":2.5}"#,
                r#","timestamp":1,"cpu":2.5"#,
            ),
            (r#"{ "machineId" : "x" , "clusterId":"y" }"#, ""),
            (
                r#"{"clusterId":"y","machineId":"x","a":[1]}"#,
                r#","a":[1]"#,
            ),
            // An escaped value, a non-string value, a nested key: the general path.
            (r#"{"machineId":"a\"b","x":1}"#, r#","x":1"#),
            (
                r#"{"machineId":1,"x":{"machineId":2}}"#,
                r#","x":{"machineId":2}"#,
            ),
            (r#"{"a":1,"machineId":"m"}"#, r#","a":1"#),
        ];
        for (data, fields) in cases {
            let expected = format!(
                r#"{{"event":"e","data":{{"machineId":"m","clusterId":"c"{fields}}},"timestamp":1}}"#
            );
            assert_eq!(
                payload_text(&relay("e", "m", "c", data, 1)),
                expected,
                "{data}"
            );
        }
    }
}
