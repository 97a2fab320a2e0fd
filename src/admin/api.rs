//! The routes of the admin listener: health, readiness, metrics, status (no token) and the
//! backend API under `/v1` (a service token, checked before the route).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::http::{Request, Response};
use super::{status, Admin};
use crate::auth::Role;
use crate::hub::{AdminRequest, Answer, Failure, MachineInfo, Msg};
use crate::metrics::{self, Format, ProcessFacts};
use crate::worker;

/// How long a query may wait for the workers' answers.
const QUERY_WAIT: Duration = Duration::from_secs(2);
/// Extra wait for a command beyond `command_timeout` (its timer answers first).
const COMMAND_SLACK: Duration = Duration::from_secs(2);

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Routes one request to its answer.
pub fn route(admin: &Admin, req: &Request) -> Response {
    let method = match req.method.as_str() {
        // HEAD is answered like GET, without the body.
        "HEAD" => "GET",
        m => m,
    };
    let path = req.path.as_str();
    // The status document is public like /metrics (PROTOCOL.md section 9).
    match (method, path) {
        ("GET", "/v1/status") => return status::document(admin, &req.query),
        (_, "/v1/status") => return not_allowed("GET"),
        _ => {}
    }
    if path == "/v1" || path.starts_with("/v1/") {
        if let Err(refusal) = check_token(admin, req) {
            return refusal;
        }
        return v1(admin, method, path, &req.body);
    }
    match (method, path) {
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        ("GET", "/readyz") if admin.draining() => {
            Response::error(503, "draining: the gateway is shutting down")
        }
        ("GET", "/readyz") if !admin.started() => {
            Response::error(503, "starting: the workers are not running yet")
        }
        ("GET", "/readyz") => Response::text(200, "ready\n"),
        ("GET", "/metrics") => scrape(admin, req.header("accept")),
        ("GET", "/status") => status::page(),
        (_, "/healthz" | "/readyz" | "/metrics" | "/status") => not_allowed("GET"),
        _ => Response::error(404, "no such route"),
    }
}

fn not_allowed(allow: &'static str) -> Response {
    Response::error(405, &format!("method not allowed; use {allow}")).with_header("Allow", allow)
}

/// `Authorization: Bearer <service token>`: 401 without or with a bad or revoked token,
/// 403 for a token of another role.
fn check_token(admin: &Admin, req: &Request) -> Result<(), Response> {
    let unauthorized = |message: &str| {
        Response::error(401, message).with_header("WWW-Authenticate", "Bearer realm=\"arcgate\"")
    };
    let Some(value) = req.header("authorization") else {
        return Err(unauthorized(
            "missing Authorization: Bearer <service token>",
        ));
    };
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(unauthorized(
                "expected Authorization: Bearer <service token>",
            ))
        }
    };
    let settings = admin.env.settings();
    match settings.verifier.verify(token, unix_secs()) {
        Ok(who) if who.role == Role::Service => Ok(()),
        Ok(who) => Err(Response::error(
            403,
            &format!(
                "a {} token may not use the backend API; use a service token",
                who.role.as_str()
            ),
        )),
        Err(e) => Err(unauthorized(&e.message)),
    }
}

fn v1(admin: &Admin, method: &str, path: &str, body: &[u8]) -> Response {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let id = |s: &str| percent_decode(s).filter(|id| !id.is_empty());
    match segments.as_slice() {
        ["v1", "machines"] => match method {
            "GET" => machines(admin),
            _ => not_allowed("GET"),
        },
        ["v1", "machines", raw] => match (method, id(raw)) {
            (_, None) => Response::error(404, "no such route"),
            ("GET", Some(id)) => machine(admin, &id),
            _ => not_allowed("GET"),
        },
        ["v1", "machines", raw, "commands"] => match (method, id(raw)) {
            (_, None) => Response::error(404, "no such route"),
            ("POST", Some(id)) => command(admin, &id, body),
            _ => not_allowed("POST"),
        },
        ["v1", "clusters", raw, "notifications"] => match (method, id(raw)) {
            (_, None) => Response::error(404, "no such route"),
            ("POST", Some(id)) => notification(admin, &id, body),
            _ => not_allowed("POST"),
        },
        ["v1", "revocations"] => match method {
            "POST" => revocation(admin, body),
            _ => not_allowed("POST"),
        },
        _ => Response::error(404, "no such route"),
    }
}

/// `%XX` escapes of a path segment (or a bus subject token); `None` when one is malformed
/// or they do not decode to UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn scrape(admin: &Admin, accept: Option<&str>) -> Response {
    let shared = &admin.shared;
    let facts = ProcessFacts {
        version: env!("CARGO_PKG_VERSION"),
        backend: admin.backend,
        start_time_unix: admin.started,
        draining: admin.draining(),
        tcp_connections: admin
            .env
            .admission
            .open
            .load(std::sync::atomic::Ordering::Relaxed) as u64,
        inbox_depth: admin.env.inboxes.depths(),
        revocations: admin.env.revocations.len() as u64,
        admin_connections: admin.connections() as u64,
        tls: crate::certs::status(admin.env.tls.as_deref()),
        bus: admin.env.bus.as_ref().map(|link| link.snapshot()),
    };
    let format = Format::from_accept(accept);
    let text = metrics::render(&shared.metrics, facts, format);
    Response::new(200, format.content_type(), text)
}

/// The body as a JSON object: 400 if it is not JSON, 422 if it is not an object.
fn object(body: &[u8]) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Response::error(422, "the body must be a JSON object")),
        Err(e) => Err(Response::error(
            400,
            &format!("the body is not valid JSON: {e}"),
        )),
    }
}

fn string_field<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<Option<&'a str>, Response> {
    match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        None if !required => Ok(None),
        _ => Err(Response::error(
            422,
            &format!("{key} must be a non-empty string"),
        )),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MachineJson<'a> {
    machine_id: &'a str,
    cluster_id: &'a str,
    version: &'a str,
    connected_at: u64,
    last_heartbeat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat: Option<Option<Box<RawValue>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Option<Box<RawValue>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    servers: Option<Vec<Box<RawValue>>>,
}

fn raw(text: &str) -> Option<Box<RawValue>> {
    RawValue::from_string(text.to_string()).ok()
}

fn machine_json(m: &MachineInfo) -> MachineJson<'_> {
    let detail = m.detail.as_ref();
    MachineJson {
        machine_id: &m.machine_id,
        cluster_id: &m.cluster_id,
        version: &m.version,
        connected_at: m.connected_at,
        last_heartbeat: m.last_heartbeat,
        heartbeat: detail.map(|d| d.heartbeat.as_deref().and_then(raw)),
        metrics: detail.map(|d| d.metrics.as_deref().and_then(raw)),
        servers: detail.map(|d| d.servers.iter().filter_map(|s| raw(s)).collect()),
    }
}

fn to_json(value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response::json(200, body),
        Err(e) => Response::error(500, &format!("cannot encode the answer: {e}")),
    }
}

fn unavailable() -> Response {
    Response::error(
        503,
        "a worker did not answer (the gateway may be shutting down)",
    )
}

/// `GET /v1/machines`: every worker lists its machines.
fn machines(admin: &Admin) -> Response {
    let (tx, rx) = mpsc::channel();
    let workers = admin.env.inboxes.len();
    for w in 0..workers {
        let reply = tx.clone();
        admin
            .env
            .inboxes
            .post(w as u16, Msg::Admin(AdminRequest::Machines { reply }));
    }
    drop(tx);
    let deadline = Instant::now() + QUERY_WAIT;
    let mut all = Vec::new();
    for _ in 0..workers {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(list) => all.extend(list),
            Err(_) => return unavailable(),
        }
    }
    all.sort_by(|a: &MachineInfo, b| a.machine_id.cmp(&b.machine_id));
    let list: Vec<MachineJson<'_>> = all.iter().map(machine_json).collect();
    to_json(&list)
}

fn not_connected() -> Response {
    Response::error(404, "machine not connected")
}

/// `GET /v1/machines/{id}`: asked of the worker that holds the machine.
fn machine(admin: &Admin, id: &str) -> Response {
    let Some(worker) = admin.shared.machines.get(id).map(|l| l.worker) else {
        return not_connected();
    };
    let (reply, rx) = mpsc::channel();
    let req = AdminRequest::Machine {
        machine_id: id.into(),
        reply,
    };
    admin.env.inboxes.post(worker, Msg::Admin(req));
    match rx.recv_timeout(QUERY_WAIT) {
        Ok(Some(info)) => to_json(&machine_json(&info)),
        Ok(None) => not_connected(),
        Err(_) => unavailable(),
    }
}

/// `POST /v1/machines/{id}/commands`: waits for the agent's answer.
fn command(admin: &Admin, id: &str, body: &[u8]) -> Response {
    let map = match object(body) {
        Ok(map) => map,
        Err(refusal) => return refusal,
    };
    if let Err(refusal) = string_field(&map, "type", true) {
        return refusal;
    }
    if map.get("serverId").is_some_and(|v| !v.is_string()) {
        return Response::error(422, "serverId must be a string");
    }
    if admin.draining() {
        return Response::error(503, "the gateway is shutting down; retry on another node");
    }
    let Some(worker) = admin.shared.machines.get(id).map(|l| l.worker) else {
        return not_connected();
    };
    let data = String::from_utf8_lossy(body).trim().to_string();
    let (reply, rx) = mpsc::channel::<Answer>();
    let req = AdminRequest::Command {
        machine_id: id.into(),
        data: data.into(),
        reply,
    };
    admin.env.inboxes.post(worker, Msg::Admin(req));
    let wait = admin.env.settings().command_timeout + COMMAND_SLACK;
    match rx.recv_timeout(wait) {
        Ok(Ok(answer)) => Response::json(200, answer.to_vec()),
        Ok(Err(failure)) => command_failure(failure),
        Err(RecvTimeoutError::Timeout) => Response::error(504, Failure::TimedOut.message()),
        // The worker dropped the request: it has finished draining.
        Err(RecvTimeoutError::Disconnected) => Response::error(503, Failure::Draining.message()),
    }
}

fn command_failure(failure: Failure) -> Response {
    let status = match failure {
        Failure::NotConnected => 404,
        Failure::Forbidden => 403,
        Failure::Gone | Failure::Disconnected => 502,
        Failure::TimedOut => 504,
        Failure::Draining => 503,
    };
    Response::error(status, failure.message())
}

/// `POST /v1/clusters/{id}/notifications`: relayed as `notification` with `clusterId`.
fn notification(admin: &Admin, cluster: &str, body: &[u8]) -> Response {
    let mut map = match object(body) {
        Ok(map) => map,
        Err(refusal) => return refusal,
    };
    for key in ["type", "message"] {
        if let Err(refusal) = string_field(&map, key, true) {
            return refusal;
        }
    }
    map.insert("clusterId".into(), Value::String(cluster.to_string()));
    let data = Value::Object(map).to_string();
    let req = AdminRequest::Notify {
        cluster_id: cluster.into(),
        data: data.into(),
    };
    admin.env.inboxes.post(0, Msg::Admin(req));
    Response::empty(202)
}

/// `POST /v1/revocations` `{sub, before?}`: refuses the subject's tokens issued before
/// `before` (default: up to and including the current second) and closes its live
/// connections holding such a token.
fn revocation(admin: &Admin, body: &[u8]) -> Response {
    let map = match object(body) {
        Ok(map) => map,
        Err(refusal) => return refusal,
    };
    let sub = match string_field(&map, "sub", true) {
        Ok(Some(sub)) => sub,
        Ok(None) => return Response::error(422, "sub must be a non-empty string"),
        Err(refusal) => return refusal,
    };
    let before = match map.get("before") {
        None | Some(Value::Null) => unix_secs() + 1,
        Some(v) => match v.as_u64() {
            Some(t) => t,
            None => {
                return Response::error(
                    422,
                    "before must be a whole number of Unix seconds, 0 or more",
                )
            }
        },
    };
    if let Err(e) = admin.env.revocations.revoke(sub, before) {
        return Response::error(503, &e.to_string());
    }
    tracing::info!(sub, before, "revoked");
    for w in 0..admin.env.inboxes.len() {
        admin
            .env
            .inboxes
            .post(w as u16, worker::Msg::Revoke { sub: sub.into() });
    }
    Response::empty(204)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(percent_decode("mch_1").as_deref(), Some("mch_1"));
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn body_shapes() {
        assert_eq!(object(b"{\"a\":1}").unwrap().len(), 1);
        assert_eq!(object(b"[1]").unwrap_err().status, 422);
        assert_eq!(object(b"{").unwrap_err().status, 400);
        assert_eq!(object(b"").unwrap_err().status, 400);
        let map = object(br#"{"type":"x","n":1,"e":""}"#).unwrap();
        assert_eq!(string_field(&map, "type", true).unwrap(), Some("x"));
        assert_eq!(string_field(&map, "absent", false).unwrap(), None);
        assert_eq!(string_field(&map, "absent", true).unwrap_err().status, 422);
        assert_eq!(string_field(&map, "n", false).unwrap_err().status, 422);
        assert_eq!(string_field(&map, "e", true).unwrap_err().status, 422);
    }
}
