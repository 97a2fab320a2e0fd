//! Properties of the protocol layer over generated input: frames decode to what was
//! encoded, however the bytes are split; envelopes parse to what was serialized; the
//! envelope parser and the data checks never panic on arbitrary bytes.

use arcgate::protocol::codec::{
    self, client_frame, CloseReason, Decoder, Flow, Message, OwnedMessage as Msg, OP_BINARY,
    OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
};
use arcgate::protocol::envelope;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Above 64 KiB, so that payloads with 64-bit lengths are valid.
const MAX: usize = 1 << 17;

fn control_payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=125)
}

fn close_code() -> impl Strategy<Value = u16> {
    prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999]
}

/// Data messages of every size class (7-bit, 16-bit and 64-bit lengths) and control frames.
fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        4 => ".{0,300}".prop_map(Msg::Text),
        1 => proptest::collection::vec(any::<char>(), 5_000..6_000)
            .prop_map(|c| Msg::Text(c.into_iter().collect())),
        3 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::Binary),
        1 => proptest::collection::vec(any::<u8>(), 65_536..67_000).prop_map(Msg::Binary),
        2 => control_payload().prop_map(Msg::Ping),
        2 => control_payload().prop_map(Msg::Pong),
    ]
}

/// A message as client frames: data messages cut into `parts` fragments, with a ping
/// between the first two when `interleave`.
fn encode(m: &Msg, parts: usize, mask: [u8; 4], interleave: bool) -> Vec<u8> {
    let (op, payload): (u8, &[u8]) = match m {
        Msg::Text(t) => (OP_TEXT, t.as_bytes()),
        Msg::Binary(b) => (OP_BINARY, b),
        Msg::Ping(p) => return client_frame(true, OP_PING, p, mask),
        Msg::Pong(p) => return client_frame(true, OP_PONG, p, mask),
        Msg::Close(code, reason) => {
            let mut p = code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
            p.extend_from_slice(reason.as_bytes());
            return client_frame(true, OP_CLOSE, &p, mask);
        }
    };
    let parts = parts.clamp(1, payload.len().max(1));
    let size = payload.len().div_ceil(parts).max(1);
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(size).collect()
    };
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 { op } else { OP_CONTINUATION };
        out.extend(client_frame(i + 1 == chunks.len(), opcode, chunk, mask));
        if interleave && i == 0 && chunks.len() > 1 {
            out.extend(client_frame(true, OP_PING, b"between", mask));
        }
    }
    out
}

/// Decodes `bytes` cut at `cuts`: the messages, and the error if the stream had one.
fn decode(bytes: &[u8], cuts: &[usize], decoder: &mut Decoder) -> (Vec<Msg>, Option<CloseReason>) {
    let mut seen = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|&c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    points.push(bytes.len());
    let mut from = 0;
    for to in points {
        let mut chunk = bytes[from..to].to_vec();
        from = to;
        if let Err(e) = decoder.decode(&mut chunk, |m| {
            seen.push(m.to_owned_message());
            Flow::Continue
        }) {
            return (seen, Some(e));
        }
    }
    (seen, None)
}

/// What a decoder delivers for `msgs`: pings put between fragments come first.
fn expected(msgs: &[Msg], parts: usize, interleave: bool) -> Vec<Msg> {
    let mut out = Vec::new();
    for m in msgs {
        let fragmented = match m {
            Msg::Text(t) => parts.clamp(1, t.len().max(1)) > 1 && !t.is_empty(),
            Msg::Binary(b) => parts.clamp(1, b.len().max(1)) > 1 && !b.is_empty(),
            _ => false,
        };
        if interleave && fragmented {
            out.push(Msg::Ping(b"between".to_vec()));
        }
        out.push(m.clone());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// decode(encode(x)) == x, for client frames in the gateway's role, with fragmented
    /// messages, interleaved control frames and any split of the bytes.
    #[test]
    fn client_frames_round_trip_whatever_the_split(
        msgs in proptest::collection::vec(msg(), 1..8),
        close in proptest::option::of((close_code(), ".{0,20}")),
        parts in 1usize..5,
        interleave in any::<bool>(),
        mask in any::<[u8; 4]>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut msgs = msgs;
        if let Some((code, reason)) = close {
            // A close reason fits in 123 bytes.
            let reason: String = reason.chars().take(30).collect();
            msgs.push(Msg::Close(Some(code), reason));
        }
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| encode(m, parts, mask, interleave)).collect();
        let want = expected(&msgs, parts, interleave);
        let whole = decode(&bytes, &[], &mut Decoder::new(MAX));
        prop_assert_eq!(&whole, &(want, None));
        let split = decode(&bytes, &cuts, &mut Decoder::new(MAX));
        prop_assert_eq!(split, whole);
    }

    /// decode(encode(x)) == x for the frames the gateway sends, read in the client role.
    #[test]
    fn server_frames_round_trip_whatever_the_split(
        msgs in proptest::collection::vec(msg(), 1..8),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            let frame = match m {
                Msg::Text(t) => codec::frame(OP_TEXT, t.as_bytes()),
                Msg::Binary(b) => codec::frame(OP_BINARY, b),
                Msg::Ping(p) => codec::frame(OP_PING, p),
                Msg::Pong(p) => codec::frame(OP_PONG, p),
                Msg::Close(c, r) => codec::close_frame(c.unwrap_or(1000), r),
            };
            bytes.extend_from_slice(&frame);
        }
        let got = decode(&bytes, &cuts, &mut Decoder::new_client(MAX));
        prop_assert_eq!(got, (msgs, None));
    }

    /// Arbitrary bytes give the same messages and the same error however they are split.
    #[test]
    fn decoding_garbage_does_not_depend_on_the_split(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = decode(&bytes, &[], &mut Decoder::new(4096));
        let split = decode(&bytes, &cuts, &mut Decoder::new(4096));
        prop_assert_eq!(split, whole);
    }

    /// Valid frames with a corrupted byte: still split-independent, never a panic.
    #[test]
    fn corrupted_frames_do_not_depend_on_the_split(
        msgs in proptest::collection::vec(msg(), 1..4),
        at in any::<usize>(),
        flip in 1u8..=255,
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut bytes: Vec<u8> = msgs.iter().flat_map(|m| encode(m, 2, [1, 2, 3, 4], true)).collect();
        let i = at % bytes.len();
        bytes[i] ^= flip;
        let whole = decode(&bytes, &[], &mut Decoder::new(MAX));
        let split = decode(&bytes, &cuts, &mut Decoder::new(MAX));
        prop_assert_eq!(split, whole);
    }
}

/// A JSON value of bounded depth.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Eighths print and parse back exactly.
        (-1_000_000i32..1_000_000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// parse(serialize(x)) == x: event, id and the data text as JSON.
    #[test]
    fn envelopes_round_trip(
        event in ".{0,30}",
        id in proptest::option::of(".{0,20}"),
        data in proptest::option::of(json_value()),
        pretty in any::<bool>(),
    ) {
        let mut v = json!({"event": event});
        if let Some(id) = &id {
            v["id"] = json!(id);
        }
        if let Some(data) = &data {
            v["data"] = data.clone();
        }
        let text = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }
            .unwrap();
        let env = envelope::parse(&text).unwrap();
        prop_assert_eq!(&*env.event, event.as_str());
        prop_assert_eq!(env.id.as_deref(), id.as_deref());
        let parsed: Option<Value> = env.data.map(|d| serde_json::from_str(d).unwrap());
        // `"data": null` is the same as no data.
        let data = data.filter(|d| !d.is_null());
        prop_assert_eq!(parsed.filter(|d| !d.is_null()), data);
    }

    /// A relayed event decodes to the agent's data with the authenticated machine and
    /// cluster, whatever `machineId`/`clusterId` the agent put in.
    #[test]
    fn relayed_data_round_trips_with_the_gateway_s_ids(
        fields in proptest::collection::btree_map("[a-zA-Z]{1,10}", json_value(), 0..8),
        forged in any::<bool>(),
    ) {
        let mut data = serde_json::Map::new();
        for (k, v) in &fields {
            data.insert(k.clone(), v.clone());
        }
        if forged {
            data.insert("machineId".into(), json!("mch_forged"));
            data.insert("clusterId".into(), json!("clu_forged"));
        }
        let text = Value::Object(data.clone()).to_string();
        let frame = envelope::relay("server:updated", "mch_1", "clu_a", &text, 1);
        let mut copy = frame.to_vec();
        let mut got = None;
        Decoder::new_client(MAX).decode(&mut copy, |m| {
            if let Message::Text(t) = m {
                got = Some(serde_json::from_str::<Value>(t).unwrap());
            }
            Flow::Continue
        }).unwrap();
        let got = got.unwrap();
        let mut want = data;
        want.insert("machineId".into(), json!("mch_1"));
        want.insert("clusterId".into(), json!("clu_a"));
        prop_assert_eq!(&got["data"], &Value::Object(want));
        prop_assert_eq!(&got["event"], "server:updated");
    }

    /// The envelope parser and the data checks never panic, whatever the bytes.
    #[test]
    fn envelope_parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        check_never_panics(&text);
    }

    /// … nor on text made of JSON's own characters, which reaches deeper.
    #[test]
    fn envelope_parser_never_panics_on_json_like_text(text in r#"[ {}\[\]",:0-9a-zA-Z\\.eE+-]{0,400}"#) {
        check_never_panics(&text);
        let wrapped = format!(r#"{{"event":"metrics","data":{text}}}"#);
        check_never_panics(&wrapped);
    }
}

fn check_never_panics(text: &str) {
    let _ = envelope::salvage_id(text);
    if let Ok(env) = envelope::parse(text) {
        let _ = envelope::auth_data(env.data);
        let _ = envelope::command_data(env.data);
        let _ = envelope::command_response_id(env.data);
        let _ = envelope::notification_cluster(env.data);
        for event in ["heartbeat", "server:status", "player:joined"] {
            if let Some(Ok((kind, obj))) = envelope::relayed_data(event, env.data) {
                let _ = envelope::relay(kind.outbound(), "m", "c", obj, 0);
            }
        }
        if let Ok(_cmd) = envelope::command_data(env.data) {
            let _ = envelope::command_to_agent("cmd_1", env.data.unwrap_or("{}"), 0);
        }
    }
}
