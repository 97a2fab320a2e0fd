//! The envelope parser and the data checks on arbitrary text: they never panic, whatever
//! they accept is JSON, and a relayed or forwarded object can never carry a `machineId` or
//! `clusterId` other than the gateway's.
#![no_main]

use arcgate::protocol::envelope::{
    auth_data, command_data, command_response_id, command_to_agent, notification_cluster, parse,
    relay, relayed_data, salvage_id,
};
use libfuzzer_sys::fuzz_target;

const EVENTS: [&str; 6] = [
    "heartbeat",
    "metrics",
    "server:status",
    "player:joined",
    "player:left",
    "notification",
];

/// The JSON payload of one unmasked text frame the gateway built.
fn payload(frame: &[u8]) -> &str {
    let (len, start) = match frame[1] {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => (
            u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
            10,
        ),
        n => (usize::from(n), 2),
    };
    assert_eq!(frame[0], 0x81);
    assert_eq!(frame.len(), start + len);
    std::str::from_utf8(&frame[start..]).expect("frames carry UTF-8")
}

/// Every value of the top-level key `name` of the object `data` of `json`, unescaped.
fn data_values(json: &str, name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in sonic_rs::to_object_iter(json) {
        let (key, value) = entry.expect("the gateway emits valid JSON");
        if key != "data" {
            continue;
        }
        for inner in sonic_rs::to_object_iter(value.as_raw_str()) {
            let (k, v) = inner.expect("data is a valid object");
            if k == name {
                found.push(v.as_raw_str().to_owned());
            }
        }
    }
    found
}

fuzz_target!(|bytes: &[u8]| {
    let text = String::from_utf8_lossy(bytes);
    let _ = salvage_id(&text);
    let Ok(env) = parse(&text) else {
        return;
    };
    // Accepted text is JSON by any other parser's standard too (serde_json refuses lone
    // surrogates and huge numbers, which the gateway relays as written).
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        assert!(v.is_object(), "{text}");
        assert_eq!(v["event"].as_str(), Some(&*env.event), "{text}");
    }
    let data = env.data;
    let _ = auth_data(data);
    let _ = command_response_id(data);
    let _ = notification_cluster(data);
    if let Ok(cmd) = command_data(data) {
        let frame = command_to_agent("cmd_1", data.unwrap_or("{}"), 0);
        let out = payload(&frame);
        assert_eq!(
            data_values(out, "id"),
            vec!["\"cmd_1\"".to_owned()],
            "{out}"
        );
        assert!(data_values(out, "machineId").is_empty(), "{out}");
        let _ = cmd;
    }
    for event in EVENTS {
        if let Ok(obj) = relayed_data(event, data) {
            let frame = relay(event, "mch_\"real\"", "clu_real", obj, 0);
            let out = payload(&frame);
            assert_eq!(
                data_values(out, "machineId"),
                vec!["\"mch_\\\"real\\\"\"".to_owned()],
                "{out}"
            );
            assert_eq!(
                data_values(out, "clusterId"),
                vec!["\"clu_real\"".to_owned()],
                "{out}"
            );
        }
    }
});
