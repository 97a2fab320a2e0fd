//! The messages a simulated agent, user or service writes (a small writer, no serde per
//! message) and the few fields it reads from what the gateway sends.

use memchr::memmem;

use crate::util::push_u64;

/// A JSON text under construction.
pub struct W<'a>(pub &'a mut Vec<u8>);

impl W<'_> {
    pub fn raw(&mut self, s: &str) -> &mut Self {
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    pub fn num(&mut self, n: u64) -> &mut Self {
        push_u64(self.0, n);
        self
    }

    /// A number with one decimal from tenths (`235` → `23.5`).
    pub fn tenths(&mut self, t: u64) -> &mut Self {
        push_u64(self.0, t / 10);
        self.0.push(b'.');
        push_u64(self.0, t % 10);
        self
    }
}

pub fn agent_auth(out: &mut Vec<u8>, token: &str, machine_id: &str) {
    W(out)
        .raw(r#"{"event":"auth","data":{"token":""#)
        .raw(token)
        .raw(r#"","machineId":""#)
        .raw(machine_id)
        .raw(concat!(
            r#"","version":"arcgate-load/"#,
            env!("CARGO_PKG_VERSION"),
            r#""}}"#
        ));
}

pub fn client_auth(out: &mut Vec<u8>, token: &str) {
    W(out)
        .raw(r#"{"event":"auth","data":{"token":""#)
        .raw(token)
        .raw(r#""}}"#);
}

/// Figures that make heartbeats and metrics look like a real machine's (derived from a seed).
pub struct Figures {
    pub seed: u64,
    pub uptime_s: u64,
}

pub fn heartbeat(
    out: &mut Vec<u8>,
    machine_id: &str,
    hb_seq: u64,
    sent_ns: u64,
    unix_ms: u64,
    f: &Figures,
) {
    W(out)
        .raw(r#"{"event":"heartbeat","data":{"hbSeq":"#)
        .num(hb_seq)
        .raw(r#","sentAtNs":"#)
        .num(sent_ns)
        .raw(r#","machineId":""#)
        .raw(machine_id)
        .raw(r#"","timestamp":"#)
        .num(unix_ms)
        .raw(r#","cpu":"#)
        .tenths(f.seed % 1000)
        .raw(r#","memory":"#)
        .tenths((f.seed >> 10) % 1000)
        .raw(r#","uptime":"#)
        .num(f.uptime_s)
        .raw("}}");
}

pub fn metrics(out: &mut Vec<u8>, machine_id: &str, hb_seq: u64, sent_ns: u64, f: &Figures) {
    let mut w = W(out);
    w.raw(r#"{"event":"metrics","data":{"hbSeq":"#)
        .num(hb_seq)
        .raw(r#","sentAtNs":"#)
        .num(sent_ns)
        .raw(r#","machineId":""#)
        .raw(machine_id)
        .raw(r#"","cpu":{"cores":8,"usage":["#);
    let mut sum = 0;
    for core in 0..8u64 {
        let u = (f.seed >> (core * 7)) % 1000;
        sum += u;
        if core > 0 {
            w.raw(",");
        }
        w.tenths(u);
    }
    w.raw(r#"],"average":"#)
        .tenths(sum / 8)
        .raw(r#"},"memory":{"total":34359738368,"used":"#)
        .num(8_000_000_000 + (f.seed % 16_000_000_000))
        .raw(r#","free":"#)
        .num(10_000_000_000 - (f.seed % 8_000_000_000))
        .raw(r#"},"disk":[{"mount":"/","total":512110190592,"used":"#)
        .num(100_000_000_000 + (f.seed % 300_000_000_000))
        .raw(r#"}],"network":{"rxBytes":"#)
        .num(f.uptime_s * 1_250_000)
        .raw(r#","txBytes":"#)
        .num(f.uptime_s * 2_500_000)
        .raw("}}}");
}

pub const STATUSES: [&str; 4] = ["running", "starting", "stopping", "stopped"];

pub fn status(
    out: &mut Vec<u8>,
    seq: u64,
    sent_ns: u64,
    agent: u32,
    server: u64,
    state: &str,
    players: u64,
) {
    W(out)
        .raw(r#"{"event":"server:status","data":{"seq":"#)
        .num(seq)
        .raw(r#","sentAtNs":"#)
        .num(sent_ns)
        .raw(r#","serverId":"srv_"#)
        .num(u64::from(agent))
        .raw("_")
        .num(server)
        .raw(r#"","status":""#)
        .raw(state)
        .raw(r#"","players":"#)
        .num(players)
        .raw(r#","maxPlayers":32}}"#);
}

pub fn player(
    out: &mut Vec<u8>,
    joined: bool,
    seq: u64,
    sent_ns: u64,
    agent: u32,
    server: u64,
    player: u64,
) {
    W(out)
        .raw(if joined {
            r#"{"event":"player:joined","data":{"seq":"#
        } else {
            r#"{"event":"player:left","data":{"seq":"#
        })
        .num(seq)
        .raw(r#","sentAtNs":"#)
        .num(sent_ns)
        .raw(r#","serverId":"srv_"#)
        .num(u64::from(agent))
        .raw("_")
        .num(server)
        .raw(r#"","player":{"id":"ply_"#)
        .num(player)
        .raw(r#"","username":"player"#)
        .num(player)
        .raw(r#"","steamId":""#)
        .num(76_561_198_000_000_000 + player)
        .raw(r#""}}}"#);
}

pub fn command_response(out: &mut Vec<u8>, cmd_id: &str) {
    W(out)
        .raw(r#"{"event":"command:response","data":{"id":""#)
        .raw(cmd_id)
        .raw(r#"","success":true,"result":{"ok":true}}}"#);
}

pub const COMMANDS: [&str; 3] = ["server:start", "server:stop", "server:restart"];

pub fn command(
    out: &mut Vec<u8>,
    proc_index: u32,
    req: u64,
    machine_id: &str,
    kind: &str,
    agent: u32,
) {
    W(out)
        .raw(r#"{"event":"command","id":"req_"#)
        .num(u64::from(proc_index))
        .raw("_")
        .num(req)
        .raw(r#"","data":{"machineId":""#)
        .raw(machine_id)
        .raw(r#"","type":""#)
        .raw(kind)
        .raw(r#"","serverId":"srv_"#)
        .num(u64::from(agent))
        .raw(r#"_0"}}"#);
}

/// The `event` of a gateway message (which always puts it first), or anywhere as a fallback.
pub fn event(text: &str) -> Option<&str> {
    const KEY: &str = r#""event":""#;
    let start = match text.strip_prefix(r#"{"event":""#) {
        Some(_) => KEY.len() + 1,
        None => memmem::find(text.as_bytes(), KEY.as_bytes())? + KEY.len(),
    };
    let rest = text.get(start..)?;
    let end = memchr::memchr(b'"', rest.as_bytes())?;
    rest.get(..end)
}

/// The number after the first occurrence of `key` (which includes quotes and colon).
pub fn num_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = memmem::find(text, key)? + key.len();
    crate::util::leading_u64(&text[at..])
}

/// The string after the first occurrence of `key` (which includes the opening quote).
pub fn str_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = memmem::find(text.as_bytes(), key.as_bytes())? + key.len();
    let rest = text.get(at..)?;
    let end = memchr::memchr(b'"', rest.as_bytes())?;
    rest.get(..end)
}

/// What a relayed agent event says about itself: which agent (of this run), its `seq`,
/// and when it was sent (`sentAtNs`, 0 if absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub agent: u32,
    pub seq: u64,
    pub sent_ns: u64,
}

/// Reads relayed events with searchers built once (building one per message costs more
/// than the search).
pub struct RelayReader {
    machine: memmem::Finder<'static>,
    seq: memmem::Finder<'static>,
    sent: memmem::Finder<'static>,
}

/// Whether a relayed event is one of this run's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    Ours(Relayed),
    /// From another run's agents, or without a `seq`.
    Foreign,
}

impl RelayReader {
    pub fn new(run_id: &str) -> RelayReader {
        let prefix = format!("\"machineId\":\"mch_{run_id}_");
        RelayReader {
            machine: memmem::Finder::new(prefix.as_bytes()).into_owned(),
            seq: memmem::Finder::new(br#""seq":"#).into_owned(),
            sent: memmem::Finder::new(br#""sentAtNs":"#).into_owned(),
        }
    }

    pub fn read(&self, text: &str) -> Relay {
        let bytes = text.as_bytes();
        let Some(at) = self.machine.find(bytes) else {
            return Relay::Foreign;
        };
        let rest = &bytes[at + self.machine.needle().len()..];
        let number = |f: &memmem::Finder<'_>| {
            let at = f.find(rest)? + f.needle().len();
            crate::util::leading_u64(&rest[at..])
        };
        let (Some(agent), Some(seq)) = (crate::util::leading_u64(rest), number(&self.seq)) else {
            return Relay::Foreign;
        };
        let Ok(agent) = u32::try_from(agent) else {
            return Relay::Foreign;
        };
        Relay::Ours(Relayed {
            agent,
            seq,
            sent_ns: number(&self.sent).unwrap_or(0),
        })
    }
}

/// A hasher for small integer keys (agent numbers): one multiply instead of SipHash.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub type IdMap<V> = std::collections::HashMap<u32, V, std::hash::BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use arcgate::protocol::envelope;

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).unwrap()
    }

    /// Every message is valid JSON the gateway's own parser accepts, with the right data.
    #[test]
    fn messages_are_valid_envelopes() {
        let fig = Figures {
            seed: 0x1234_5678_9abc_def0,
            uptime_s: 3600,
        };
        let all = [
            text(|v| agent_auth(v, "a.b.c", "mch_x_1")),
            text(|v| client_auth(v, "a.b.c")),
            text(|v| heartbeat(v, "mch_x_1", 3, 99, 1_700_000_000_000, &fig)),
            text(|v| metrics(v, "mch_x_1", 4, 99, &fig)),
            text(|v| status(v, 5, 99, 1, 2, "running", 7)),
            text(|v| player(v, true, 6, 99, 1, 2, 42)),
            text(|v| player(v, false, 7, 99, 1, 2, 42)),
            text(|v| command_response(v, "cmd_0_1")),
            text(|v| command(v, 0, 9, "mch_x_1", "server:start", 1)),
        ];
        for t in &all {
            let parsed: serde_json::Value =
                serde_json::from_str(t).unwrap_or_else(|e| panic!("{t}: {e}"));
            let inbound = envelope::parse(t).unwrap();
            assert_eq!(Some(inbound.event.as_ref()), parsed["event"].as_str());
        }
        let hb: serde_json::Value = serde_json::from_str(&all[2]).unwrap();
        assert_eq!(
            hb["data"]["cpu"].as_f64(),
            Some((fig.seed % 1000) as f64 / 10.0)
        );
        let st: serde_json::Value = serde_json::from_str(&all[4]).unwrap();
        assert_eq!(st["data"]["serverId"], "srv_1_2");
        let data = st["data"].to_string();
        assert!(matches!(
            envelope::relayed_data("server:status", Some(&data)),
            Some(Ok(_))
        ));
        let cmd: serde_json::Value = serde_json::from_str(&all[8]).unwrap();
        assert_eq!(cmd["id"], "req_0_9");
        assert_eq!(cmd["data"]["machineId"], "mch_x_1");
    }

    #[test]
    fn reads_fields_of_gateway_messages() {
        let relay = r#"{"event":"server:updated","data":{"machineId":"mch_r_12","clusterId":"c","seq":77,"sentAtNs":123456},"timestamp":1}"#;
        assert_eq!(event(relay), Some("server:updated"));
        assert_eq!(num_after(relay.as_bytes(), br#""seq":"#), Some(77));
        assert_eq!(num_after(relay.as_bytes(), br#""sentAtNs":"#), Some(123456));
        assert_eq!(
            num_after(relay.as_bytes(), br#""machineId":"mch_r_"#),
            Some(12)
        );
        let err = r#"{"event":"error","data":{"code":"COMMAND_FAILED","message":"m","timestamp":1},"id":"req_0_4","timestamp":2}"#;
        assert_eq!(event(err), Some("error"));
        assert_eq!(str_after(err, r#""code":""#), Some("COMMAND_FAILED"));
        assert_eq!(str_after(err, r#""id":"req_"#), Some("0_4"));
        assert_eq!(event(r#"{"data":1,"event":"x"}"#), Some("x"));
        assert_eq!(event("{}"), None);
        assert_eq!(num_after(b"\"seq\":x", br#""seq":"#), None);
    }

    #[test]
    fn relayed_events_name_agent_seq_and_send_time() {
        let r = RelayReader::new("ab12");
        let ours = r#"{"event":"server:updated","data":{"machineId":"mch_ab12_31","clusterId":"c","seq":9,"sentAtNs":5000,"serverId":"s"},"timestamp":1}"#;
        assert_eq!(
            r.read(ours),
            Relay::Ours(Relayed {
                agent: 31,
                seq: 9,
                sent_ns: 5000
            })
        );
        let other_run = ours.replace("mch_ab12_", "mch_zz99_");
        assert_eq!(r.read(&other_run), Relay::Foreign);
        let no_seq = ours.replace(r#""seq":9,"#, "");
        assert_eq!(r.read(&no_seq), Relay::Foreign);
        let no_time = ours.replace(r#""sentAtNs":5000,"#, "");
        assert!(matches!(
            r.read(&no_time),
            Relay::Ours(Relayed { sent_ns: 0, .. })
        ));
    }

    #[test]
    fn id_map_keeps_distinct_keys() {
        let mut m: IdMap<u32> = IdMap::default();
        for k in 0..10_000u32 {
            m.insert(k, k * 2);
        }
        assert_eq!(m.len(), 10_000);
        assert!((0..10_000u32).all(|k| m[&k] == k * 2));
    }
}
