//! Envelope hot paths: parsing inbound messages (arcgate's serde_json parse, against
//! serde_json and sonic-rs alone), validating a message with each JSON crate at hand, and
//! encoding the frames the gateway relays.

use std::borrow::Cow;
use std::hint::black_box;

use arcgate::protocol::envelope;
use criterion::{criterion_group, criterion_main, Criterion};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use sonic_rs::LazyValue;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HEARTBEAT: &str = r#"{"event":"heartbeat","data":{"machineId":"mch_123","timestamp":1700000000,"cpu":12.5,"memory":48.1,"uptime":86400}}"#;

/// The heartbeat `arcgate-load flood` sends.
const FLOOD_HEARTBEAT: &str = r#"{"event":"heartbeat","data":{"hbSeq":123456,"sentAtNs":1732776000123456789,"machineId":"mch_000123","timestamp":1732776000123,"cpu":12.5,"memory":48.1,"uptime":86400}}"#;

const SERVER_STATUS: &str = r#"{"event":"server:status","data":{"serverId":"srv_xyz","status":"running","players":12,"maxPlayers":64,"map":"de_dust2","name":"EU #1 \"Casual\"","uptime":3600,"tickrate":128}}"#;

const HEARTBEAT_DATA_NO_ID: &str =
    r#"{"timestamp":1700000000,"cpu":12.5,"memory":48.1,"uptime":86400}"#;
const HEARTBEAT_DATA: &str =
    r#"{"machineId":"mch_123","timestamp":1700000000,"cpu":12.5,"memory":48.1,"uptime":86400}"#;
const COMMAND_DATA: &str = r#"{"machineId":"mch_123","type":"server:start","serverId":"srv_xyz"}"#;

const TS: u64 = 1_700_000_000_123;

/// The same shape as arcgate's envelope, parsed with serde_json.
#[derive(Deserialize)]
struct JsonEnvelope<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

/// The same shape parsed with sonic-rs (SIMD), the parser arcgate measured against and
/// left: slower on these ~100-byte messages, and without a nesting limit of its own.
#[derive(Deserialize)]
struct SonicEnvelope<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    data: Option<LazyValue<'a>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

fn sonic_parse(text: &str) -> (usize, usize, bool) {
    let e: SonicEnvelope<'_> = sonic_rs::from_str(text).expect("valid envelope");
    let data = e.data.as_ref().map_or(0, |d| d.as_raw_str().len());
    (e.event.len(), data, e.id.is_some())
}

fn serde_json_parse(text: &str) -> (usize, usize, bool) {
    let e: JsonEnvelope<'_> = serde_json::from_str(text).expect("valid envelope");
    (
        e.event.len(),
        e.data.map_or(0, |d| d.get().len()),
        e.id.is_some(),
    )
}

fn arcgate_parse(text: &str) -> (usize, usize, bool) {
    let e = envelope::parse(text).expect("valid envelope");
    (e.event.len(), e.data.map_or(0, str::len), e.id.is_some())
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope parse");
    for (name, text) in [
        ("heartbeat", HEARTBEAT),
        ("server:status", SERVER_STATUS),
        ("flood heartbeat", FLOOD_HEARTBEAT),
    ] {
        // Both parsers must agree on what they found.
        assert_eq!(arcgate_parse(text), serde_json_parse(text));
        assert_eq!(sonic_parse(text), serde_json_parse(text));
        g.bench_function(format!("{name} envelope::parse"), |b| {
            b.iter(|| arcgate_parse(black_box(text)))
        });
        g.bench_function(format!("{name} serde_json"), |b| {
            b.iter(|| serde_json_parse(black_box(text)))
        });
        g.bench_function(format!("{name} sonic_rs::from_str alone"), |b| {
            b.iter(|| sonic_parse(black_box(text)))
        });
    }
    g.finish();
}

/// Validation alone, the floor of any gateway that checks what it relays: serde_json,
/// sonic-rs and jiter skipping one whole message.
fn validate(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate");
    for (name, text) in [
        ("heartbeat", HEARTBEAT),
        ("flood heartbeat", FLOOD_HEARTBEAT),
    ] {
        g.bench_function(format!("{name} serde_json"), |b| {
            b.iter(|| serde_json::from_str::<IgnoredAny>(black_box(text)).is_ok())
        });
        g.bench_function(format!("{name} sonic-rs"), |b| {
            b.iter(|| sonic_rs::from_str::<IgnoredAny>(black_box(text)).is_ok())
        });
        g.bench_function(format!("{name} jiter"), |b| {
            b.iter(|| {
                let mut j = jiter::Jiter::new(black_box(text).as_bytes());
                j.next_skip().is_ok() && j.finish().is_ok()
            })
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope encode");
    g.bench_function("relay heartbeat, no machineId in data", |b| {
        b.iter(|| {
            envelope::relay(
                "heartbeat",
                "mch_123",
                "clu_abc",
                black_box(HEARTBEAT_DATA_NO_ID),
                TS,
            )
        })
    });
    g.bench_function("relay heartbeat, machineId in data", |b| {
        b.iter(|| {
            envelope::relay(
                "heartbeat",
                "mch_123",
                "clu_abc",
                black_box(HEARTBEAT_DATA),
                TS,
            )
        })
    });
    g.bench_function("command_to_agent", |b| {
        b.iter(|| envelope::command_to_agent("cmd_0_42", black_box(COMMAND_DATA), TS))
    });
    g.finish();
}

criterion_group!(benches, parse, validate, encode);
criterion_main!(benches);
