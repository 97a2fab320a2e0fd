//! One `Config` for `serve`, each setting declared once below: defaults < file < `ARCGATE_*` < flags.

#[macro_use]
mod declare;
mod file;
mod kinds;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use crate::auth::{KeySource, Verifier};
use declare::toml_of;
pub use declare::{Extra, Reload, Setting};
pub use file::example_file;
use kinds::{
    Addr, AtLeast, Bytes, Choice, Dur, File, Kind, LogLevel, NatsUrls, Origins, Secret, Subject,
    Text, Unset,
};

/// Which io backend runs the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring, or epoll with a log line when io_uring cannot be set up.
    Auto,
    Uring,
    Epoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The smallest `max_message_size`: a close frame's payload limit, so every control
/// message still fits.
pub const MIN_MESSAGE_SIZE: usize = 125;
/// The largest `max_message_size` (64 MiB).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;
/// The smallest `max_header_bytes`: a browser's upgrade request with cookies needs ~1 KiB.
pub const MIN_HEADER_BYTES: usize = 1024;
/// The largest `max_header_bytes` (64 KiB).
pub const MAX_HEADER_BYTES: usize = 64 << 10;

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// The settings of `serve`: adding one is adding an entry (the grammar is in declare.rs), then
// `cargo run -- example-config > packaging/arcgate.toml`. The order is that of the example
// file, of `check-config` and of the error messages.
settings! {
    #[section = "Listeners"]
    /// WebSocket listener (/ws/agent, /ws/client)
    /// Ignored when systemd passes the socket (arcgate.socket).
    listen: SocketAddr = addr([0, 0, 0, 0], 8080), Addr, reload: No;
    /// Admin HTTP listener: health, metrics, backend API
    /// /healthz, /readyz, /metrics and /v1/*. Health and metrics need no token: keep it on
    /// a private address.
    admin_listen: SocketAddr = addr([127, 0, 0, 1], 9090), Addr, reload: No;
    /// PEM certificate chain for wss:// on the WebSocket listener (with tls_key)
    /// End entity first. Both tls_cert and tls_key, or neither (plain ws://). The files are
    /// re-read on SIGHUP and when they change; other paths take a restart. A relative path
    /// in this file is relative to the file.
    tls_cert: Option<String> = None, Unset(File("PEM_FILE")), reload: No,
        unset: "plain ws://", example: r#""/etc/arcgate/tls/fullchain.pem""#;
    /// PEM private key of tls_cert: PKCS#8, RSA or SEC1
    tls_key: Option<String> = None, Unset(File("PEM_FILE")), reload: No,
        unset: "plain ws://", example: r#""/etc/arcgate/tls/privkey.pem""#;

    #[section = "Tokens"]
    /// HS256 shared secret for tokens
    /// Exactly one of jwt_secret and jwt_public_key is required. At least 32 random bytes:
    /// openssl rand -hex 32.
    jwt_secret: Option<String> = None, Unset(Secret), reload: Yes,
        example: r#""replace-with-64-hex-characters-from-openssl-rand-hex-32-0000000""#;
    /// PEM public key for tokens: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA)
    /// A relative path in this file is relative to the file.
    jwt_public_key: Option<String> = None, Unset(File("PEM_FILE")), reload: Yes,
        example: r#""/etc/arcgate/jwt-public.pem""#;
    /// Clock skew allowed on exp and nbf
    jwt_leeway: Duration = secs(5), Dur { positive: false }, reload: Yes;
    /// Required iss claim
    jwt_issuer: Option<String> = None, Unset(Text("ISS")), reload: Yes,
        unset: "not checked", example: r#""https://panel.example.com""#;
    /// Required aud claim
    jwt_audience: Option<String> = None, Unset(Text("AUD")), reload: Yes,
        unset: "not checked", example: r#""arcgate""#;

    #[section = "Connections"]
    /// Time allowed for the auth message after the upgrade
    /// Then AUTH_TIMEOUT and close 4002.
    auth_timeout: Duration = secs(10), Dur { positive: true }, reload: Yes;
    /// Total time allowed for the HTTP upgrade request
    /// Then 400. Trickling bytes does not extend it.
    handshake_timeout: Duration = secs(5), Dur { positive: true }, reload: Yes;
    /// Interval between the gateway's pings
    ping_interval: Duration = secs(30), Dur { positive: true }, reload: Yes;
    /// Silence after a ping before closing with 4000
    pong_timeout: Duration = secs(30), Dur { positive: true }, reload: Yes;
    /// Silence from an agent before it counts as hung
    /// Then close 4000 and machine:offline.
    agent_lease: Duration = secs(90), Dur { positive: true }, reload: Yes;
    /// Warn this long before a token expires
    /// token:expiring on a live connection.
    token_expiry_warning: Duration = secs(60), Dur { positive: false }, reload: Yes;
    /// Time an agent has to answer a command
    /// Then COMMAND_FAILED, or 504 over HTTP. Applies to new commands.
    command_timeout: Duration = secs(30), Dur { positive: true }, reload: Yes;
    /// Messages per second per connection, 0 = off
    rate_limit: u32 = 100, AtLeast(0), reload: Yes;
    /// Burst of messages above the rate
    rate_burst: u32 = 200, AtLeast(0), reload: Yes;
    /// Consecutive seconds over the limit before closing with 4008
    rate_limit_close_after: u32 = 10, AtLeast(1), reload: Yes;
    /// Largest inbound message, 125 B to 64 MiB
    /// Larger closes with 1009. Applies to new connections.
    max_message_size: usize = 64 << 10,
        Bytes { min: MIN_MESSAGE_SIZE, max: MAX_MESSAGE_SIZE }, reload: Yes;

    #[section = "Capacity"]
    /// Open connections on this node
    /// Over it: 503 with Retry-After. Unset: sized from the open-files limit (LimitNOFILE)
    /// and the io backend.
    max_connections: Option<usize> = None, Unset(AtLeast(1)), reload: No,
        unset: "sized from the open-files limit", example: "1000000";
    /// New connections per second on this node, 0 = off
    /// A reconnect storm above it gets 503.
    max_connection_rate: u32 = 0, AtLeast(0), reload: No;
    /// Queued outgoing bytes per connection before it is closed with 1013
    /// At least max_message_size.
    max_outbound_bytes: usize = 1 << 20, Bytes::ANY, reload: No;
    /// Connections per worker still sending their request head; more get 503
    max_pending_handshakes: usize = 8192, AtLeast(1), reload: No;
    /// Largest HTTP request head, 1 KiB to 64 KiB; larger gets 431
    max_header_bytes: usize = 8 << 10,
        Bytes { min: MIN_HEADER_BYTES, max: MAX_HEADER_BYTES }, reload: Yes;
    /// Browser origins allowed to connect, e.g. https://panel.example.com
    /// Others get 403; agents send no Origin.
    allowed_origins: Option<Vec<String>> = None, Unset(Origins), reload: Yes,
        unset: "any origin", example: r#"["https://panel.example.com"]"#;

    #[section = "Process"]
    /// Worker threads
    /// One per core by default.
    workers: usize = cores(), AtLeast(1), reload: No,
        unset: "number of cores", example: "8";
    /// io backend: auto, uring or epoll
    /// auto is io_uring, else epoll with a log line.
    io: IoMode = IoMode::Auto,
        Choice("MODE", &[("auto", IoMode::Auto), ("uring", IoMode::Uring), ("epoll", IoMode::Epoll)]),
        reload: No;
    /// Time over which connections are closed on shutdown
    /// On SIGTERM, with close 1012.
    drain_duration: Duration = secs(10), Dur { positive: false }, reload: Yes;

    #[section = "Several nodes"]
    /// NATS server(s) joining this node to the others, e.g. nats://10.0.0.5:4222
    /// Several URLs separated by commas. Unset: the node runs alone.
    nats_url: Option<String> = None, Unset(NatsUrls), reload: No,
        unset: "alone, no bus", example: r#""nats://127.0.0.1:4222""#;
    /// Name shared by the nodes that serve as one gateway (a NATS subject token)
    cluster_name: String = "arcgate".to_string(), Subject, reload: No;
    /// This node's name on the bus, in /v1/status and the metrics (a NATS subject token)
    node_name: String = kinds::host_name(), Subject, reload: No,
        unset: "the host name", example: r#""gw-1""#;
    /// Silence after which a peer node counts as dead
    /// Nodes send a heartbeat on the bus every second.
    node_timeout: Duration = secs(5), Dur { positive: true }, reload: No;
    /// NATS credentials file (.creds: JWT and NKey seed)
    nats_creds: Option<String> = None, Unset(File("CREDS_FILE")), reload: No,
        example: r#""/etc/arcgate/nats.creds""#;
    /// PEM CA certificate(s) that sign the NATS servers' TLS certificates
    nats_tls_ca: Option<String> = None, Unset(File("PEM_FILE")), reload: No,
        example: r#""/etc/arcgate/nats-ca.pem""#;

    #[section = "Logs"]
    /// Log lines as text or json
    log_format: LogFormat = LogFormat::Text,
        Choice("FORMAT", &[("text", LogFormat::Text), ("json", LogFormat::Json)]), reload: No;
    /// error, warn, info, debug, trace, or a filter like info,arcgate=debug
    log_level: String = "info".to_string(), LogLevel, reload: Yes;
}

/// The table in text, built once.
static SETTINGS: LazyLock<Vec<Setting>> = LazyLock::new(declared);

/// Every setting of the table, in its order.
pub fn settings() -> &'static [Setting] {
    &SETTINGS
}

/// The setting named `name` (a key of the table).
fn setting(name: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .expect("a key of the settings table")
}

/// Every way the configuration was refused, one message per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    /// Merges defaults, the `--config` file, and `args` (flags, which clap already
    /// layered over `ARCGATE_*`), then validates everything, reporting every problem.
    pub fn load(args: ServeArgs) -> Result<Config, ConfigError> {
        let mut merged = args;
        let mut errors = Vec::new();
        if let Some(path) = merged.config.clone() {
            match file::read(&path) {
                Ok((from_file, file_errors)) => {
                    errors = file_errors;
                    file::overlay(&mut merged, from_file);
                }
                // Without the file the rest would be judged on the wrong values.
                Err(e) => return Err(ConfigError(vec![e])),
            }
        }
        let mut fields = Fields {
            raw: &merged,
            errors,
            failed: Vec::new(),
        };
        let mut config = fields.parse_all();
        config.key = fields.key();
        fields.check(&config);
        fields.check_key(&config);
        fields.check_tls(&config);
        match fields.errors.is_empty() {
            true => Ok(config),
            false => Err(ConfigError(fields.errors)),
        }
    }

    /// Problems worth a log line that do not stop the start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(KeySource::Secret(s)) = &self.key {
            if s.len() < 32 {
                out.push(format!(
                    "jwt_secret is {} bytes long; HS256 wants at least 32 random bytes",
                    s.len()
                ));
            }
        }
        out
    }

    /// The effective configuration as TOML lines, secrets shown as `****`; unset keys
    /// appear as comments, and so does what the public key file holds.
    pub fn render_masked(&self) -> String {
        let mut out = String::new();
        for (key, value) in self.entries() {
            let note = self.key_note(key);
            let _ = match (value, note) {
                (Some(v), None) => writeln!(out, "{key} = {v}"),
                (Some(v), Some(note)) => writeln!(out, "{key} = {v}\n# {key}: {note}"),
                (None, Some(note)) => writeln!(out, "# {key}: {note}"),
                (None, None) => match setting(key).extra.unset {
                    Some(words) => writeln!(out, "# {key}: unset ({words})"),
                    None => writeln!(out, "# {key}: unset"),
                },
            };
        }
        let _ = writeln!(out, "dev = {}", self.dev);
        out
    }

    /// What the rendering says about the key beyond the setting's own value.
    fn key_note(&self, setting: &str) -> Option<&'static str> {
        match (setting, &self.key) {
            ("jwt_public_key", Some(KeySource::PublicKeyPem(pem))) => Some(describe_pem(pem)),
            ("jwt_secret", None) if self.dev => Some("generated at start (dev)"),
            _ => None,
        }
    }
}

/// The message of `serve` and `check-config` when no key was given.
pub const NO_KEY: &str =
    "no key to verify tokens with: pass --jwt-secret SECRET (or ARCGATE_JWT_SECRET) \
for HS256, --jwt-public-key PEM_FILE (or ARCGATE_JWT_PUBLIC_KEY) for RS256/ES256/EdDSA, \
or --dev to try it out with a generated secret";

fn describe_pem(pem: &[u8]) -> &'static str {
    let key = KeySource::PublicKeyPem(pem.to_vec());
    match Verifier::new(&key, None, None, Duration::ZERO).map(|v| v.algorithm()) {
        Ok("RS256") => "an RSA public key (RS256)",
        Ok("ES256") => "an EC P-256 public key (ES256)",
        Ok("EdDSA") => "an Ed25519 public key (EdDSA)",
        _ => "an unusable public key",
    }
}

/// Parses the merged text values, collecting every error.
struct Fields<'a> {
    raw: &'a ServeArgs,
    errors: Vec<String>,
    /// The keys whose value was refused (and left at the default).
    failed: Vec<&'static str>,
}

impl Fields<'_> {
    fn fail(&mut self, key: &str, value: &str, expected: &str) {
        self.errors
            .push(format!("invalid value {value:?} for {key}: {expected}"));
    }

    /// Parses the value of `key` if given; a bad value is reported and `default` kept.
    fn field<T, K: Kind<T>>(&mut self, key: &'static str, kind: &K, default: T) -> T {
        let raw = self.raw;
        let Some(text) = raw.get(key) else {
            return default;
        };
        match kind.parse(text) {
            Ok(v) => v,
            Err(refusals) => {
                let shown = kind.toml(&default).unwrap_or_default();
                let shown = shown.trim_matches('"');
                for r in refusals {
                    let expected = r.expected.replace("{default}", shown);
                    self.fail(key, r.part.as_deref().unwrap_or(text), &expected);
                }
                self.failed.push(key);
                default
            }
        }
    }

    /// The settings that are judged against each other.
    fn check(&mut self, c: &Config) {
        if c.rate_limit > 0 && c.rate_burst < 1 {
            let value = self.shown("rate_burst", c.rate_burst);
            self.fail(
                "rate_burst",
                &value,
                "expected at least 1 when rate_limit is above 0",
            );
        }
        // One message must always fit in the outbound queue.
        let size_ok = !self.failed.contains(&"max_message_size");
        if size_ok && c.max_outbound_bytes < c.max_message_size {
            let value = self.shown("max_outbound_bytes", c.max_outbound_bytes);
            let expected = format!(
                "expected at least max_message_size ({})",
                c.max_message_size
            );
            self.fail("max_outbound_bytes", &value, &expected);
        }
    }

    fn key(&mut self) -> Option<KeySource> {
        let secret = self.raw.get("jwt_secret");
        let pem_path = self.raw.get("jwt_public_key");
        match (secret, pem_path) {
            (Some(_), Some(_)) => {
                self.errors.push(
                    "jwt_secret and jwt_public_key are both set: give only one \
                     (an HS256 secret or a PEM public key)"
                        .to_string(),
                );
                None
            }
            (Some(secret), None) => Some(KeySource::Secret(secret.to_string())),
            (None, Some(path)) => match std::fs::read(path) {
                Ok(pem) => Some(KeySource::PublicKeyPem(pem)),
                Err(e) => {
                    self.errors
                        .push(format!("cannot read jwt_public_key {path:?}: {e}"));
                    None
                }
            },
            (None, None) => None,
        }
    }

    /// Builds the verifier once to report an unusable key now, not at the first token.
    fn check_key(&mut self, c: &Config) {
        let both = self.raw.get("jwt_secret").is_some() && self.raw.get("jwt_public_key").is_some();
        let unreadable = c.key.is_none() && self.raw.get("jwt_public_key").is_some();
        let Some(key) = &c.key else {
            if !both && !unreadable && !c.dev {
                self.errors.push(NO_KEY.to_string());
            }
            return;
        };
        let issuer = c.jwt_issuer.as_deref();
        if let Err(e) = Verifier::new(key, issuer, c.jwt_audience.as_deref(), c.jwt_leeway) {
            match key {
                KeySource::Secret(_) => self.errors.push(format!("invalid jwt_secret: {e}")),
                KeySource::PublicKeyPem(_) => {
                    let path = self.raw.get("jwt_public_key").unwrap_or_default();
                    self.errors
                        .push(format!("invalid jwt_public_key {path:?}: {e}"));
                }
            }
        }
    }

    /// Loads the TLS pair once to refuse a missing, malformed or mismatched one now.
    fn check_tls(&mut self, c: &Config) {
        match (&c.tls_cert, &c.tls_key) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::certs::CertStore::load(cert.into(), key.into()) {
                    self.errors.push(format!("TLS certificate refused: {e}"));
                }
            }
            (None, None) => {}
            _ => self.errors.push(
                "tls_cert and tls_key go together: give both (PEM chain and its key) \
                 or neither (plain ws://)"
                    .to_string(),
            ),
        }
    }

    /// The value as given, or the effective one when it came from the defaults.
    fn shown(&self, key: &str, effective: impl std::fmt::Display) -> String {
        self.raw
            .get(key)
            .map_or_else(|| effective.to_string(), String::from)
    }
}
