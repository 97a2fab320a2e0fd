//! One `Config` for `serve`: defaults < TOML file < `ARCGATE_*` environment < flags, validated once.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::{KeySource, Verifier};

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

/// The effective configuration of `arcgate serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `None` only before `--dev` filled it in; `serve` refuses to start without one.
    pub key: Option<KeySource>,
    pub jwt_leeway: Duration,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub auth_timeout: Duration,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub agent_lease: Duration,
    pub token_expiry_warning: Duration,
    pub command_timeout: Duration,
    /// Messages per second per connection; 0 = off.
    pub rate_limit: u32,
    pub rate_burst: u32,
    /// At least 1.
    pub rate_limit_close_after: u32,
    pub max_message_size: usize,
    /// `None`: sized from the open-files limit and the io backend at start.
    pub max_connections: Option<usize>,
    /// New connections per second on this node; 0 = off.
    pub max_connection_rate: u32,
    /// At least `max_message_size`.
    pub max_outbound_bytes: usize,
    /// Connections of one worker still sending their request head; more get `503` at once.
    pub max_pending_handshakes: usize,
    /// Largest request head, `MIN_HEADER_BYTES` to `MAX_HEADER_BYTES`.
    pub max_header_bytes: usize,
    /// Lowercase `scheme://host[:port]` entries.
    pub allowed_origins: Option<Vec<String>>,
    /// TLS on the WebSocket listener: PEM chain and key, both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub workers: usize,
    pub io: IoMode,
    pub drain_duration: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub dev: bool,
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

impl Default for Config {
    /// The documented defaults, with no key.
    fn default() -> Config {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            key: None,
            jwt_leeway: Duration::from_secs(5),
            jwt_issuer: None,
            jwt_audience: None,
            auth_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(30),
            agent_lease: Duration::from_secs(90),
            token_expiry_warning: Duration::from_secs(60),
            command_timeout: Duration::from_secs(30),
            rate_limit: 100,
            rate_burst: 200,
            rate_limit_close_after: 10,
            max_message_size: 64 << 10,
            max_connections: None,
            max_connection_rate: 0,
            max_outbound_bytes: 1 << 20,
            max_pending_handshakes: 8192,
            max_header_bytes: 8 << 10,
            allowed_origins: None,
            tls_cert: None,
            tls_key: None,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            io: IoMode::Auto,
            drain_duration: Duration::from_secs(10),
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
            dev: false,
        }
    }
}

/// Every way the configuration was refused, one message per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

/// The flags of `serve` and `check-config`. Values stay text here so that a bad value is
/// reported the same way whether it came from a flag, the environment or the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// WebSocket listener [default: 0.0.0.0:8080]
    #[arg(long, env = "ARCGATE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin HTTP listener: health, metrics, backend API [default: 127.0.0.1:9090]
    #[arg(long, env = "ARCGATE_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// HS256 shared secret for tokens
    #[arg(
        long,
        env = "ARCGATE_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// PEM public key for tokens: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA)
    #[arg(long, env = "ARCGATE_JWT_PUBLIC_KEY", value_name = "PEM_FILE")]
    pub jwt_public_key: Option<String>,
    /// Clock skew allowed on exp and nbf [default: 5s]
    #[arg(long, env = "ARCGATE_JWT_LEEWAY", value_name = "DUR")]
    pub jwt_leeway: Option<String>,
    /// Required iss claim [default: not checked]
    #[arg(long, env = "ARCGATE_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,
    /// Required aud claim [default: not checked]
    #[arg(long, env = "ARCGATE_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,
    /// Time allowed for the auth message after the upgrade [default: 10s]
    #[arg(long, env = "ARCGATE_AUTH_TIMEOUT", value_name = "DUR")]
    pub auth_timeout: Option<String>,
    /// Total time allowed for the HTTP upgrade request [default: 5s]
    #[arg(long, env = "ARCGATE_HANDSHAKE_TIMEOUT", value_name = "DUR")]
    pub handshake_timeout: Option<String>,
    /// Interval between the gateway's pings [default: 30s]
    #[arg(long, env = "ARCGATE_PING_INTERVAL", value_name = "DUR")]
    pub ping_interval: Option<String>,
    /// Silence after a ping before closing with 4000 [default: 30s]
    #[arg(long, env = "ARCGATE_PONG_TIMEOUT", value_name = "DUR")]
    pub pong_timeout: Option<String>,
    /// Silence from an agent before it counts as hung [default: 90s]
    #[arg(long, env = "ARCGATE_AGENT_LEASE", value_name = "DUR")]
    pub agent_lease: Option<String>,
    /// Warn this long before a token expires [default: 60s]
    #[arg(long, env = "ARCGATE_TOKEN_EXPIRY_WARNING", value_name = "DUR")]
    pub token_expiry_warning: Option<String>,
    /// Time an agent has to answer a command [default: 30s]
    #[arg(long, env = "ARCGATE_COMMAND_TIMEOUT", value_name = "DUR")]
    pub command_timeout: Option<String>,
    /// Messages per second per connection, 0 = off [default: 100]
    #[arg(long, env = "ARCGATE_RATE_LIMIT", value_name = "N")]
    pub rate_limit: Option<String>,
    /// Burst of messages above the rate [default: 200]
    #[arg(long, env = "ARCGATE_RATE_BURST", value_name = "N")]
    pub rate_burst: Option<String>,
    /// Consecutive seconds over the limit before closing with 4008 [default: 10]
    #[arg(long, env = "ARCGATE_RATE_LIMIT_CLOSE_AFTER", value_name = "N")]
    pub rate_limit_close_after: Option<String>,
    /// Largest inbound message, 125 B to 64 MiB [default: 65536]
    #[arg(long, env = "ARCGATE_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<String>,
    /// Open connections on this node [default: sized from the open-files limit]
    #[arg(long, env = "ARCGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<String>,
    /// New connections per second on this node, 0 = off [default: 0]
    #[arg(long, env = "ARCGATE_MAX_CONNECTION_RATE", value_name = "N")]
    pub max_connection_rate: Option<String>,
    /// Queued outgoing bytes per connection before it is closed with 1013 [default: 1048576]
    #[arg(long, env = "ARCGATE_MAX_OUTBOUND_BYTES", value_name = "BYTES")]
    pub max_outbound_bytes: Option<String>,
    /// Connections per worker still sending their request head; more get 503 [default: 1024]
    #[arg(long, env = "ARCGATE_MAX_PENDING_HANDSHAKES", value_name = "N")]
    pub max_pending_handshakes: Option<String>,
    /// Largest HTTP request head, 1 KiB to 64 KiB; larger gets 431 [default: 8192]
    #[arg(long, env = "ARCGATE_MAX_HEADER_BYTES", value_name = "BYTES")]
    pub max_header_bytes: Option<String>,
    /// Browser origins allowed to connect, e.g. https://panel.example.com [default: any]
    #[arg(long, env = "ARCGATE_ALLOWED_ORIGINS", value_name = "A,B")]
    pub allowed_origins: Option<String>,
    /// PEM certificate chain for wss:// (with --tls-key) [default: plain ws://]
    #[arg(long, env = "ARCGATE_TLS_CERT", value_name = "PEM_FILE")]
    pub tls_cert: Option<String>,
    /// PEM private key (PKCS#8, RSA or SEC1) of --tls-cert
    #[arg(long, env = "ARCGATE_TLS_KEY", value_name = "PEM_FILE")]
    pub tls_key: Option<String>,
    /// Worker threads [default: number of cores]
    #[arg(long, env = "ARCGATE_WORKERS", value_name = "N")]
    pub workers: Option<String>,
    /// io backend: auto, uring or epoll [default: auto]
    #[arg(long, env = "ARCGATE_IO", value_name = "MODE")]
    pub io: Option<String>,
    /// Time over which connections are closed on shutdown [default: 10s]
    #[arg(long, env = "ARCGATE_DRAIN_DURATION", value_name = "DUR")]
    pub drain_duration: Option<String>,
    /// Log lines as text or json [default: text]
    #[arg(long, env = "ARCGATE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// error, warn, info, debug, trace, or a filter like info,arcgate=debug [default: info]
    #[arg(long, env = "ARCGATE_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Try it out: without a key, generate a secret and print ready tokens
    #[arg(
        long,
        env = "ARCGATE_DEV",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub dev: Option<bool>,
    /// TOML file with the same keys in snake_case (listen = "0.0.0.0:8080", …)
    #[arg(long, env = "ARCGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Lists the text-valued keys once: the file's key names, and field access by name.
macro_rules! text_keys {
    ($($name:ident),* $(,)?) => {
        /// The keys of the configuration file (and, in kebab-case, the flags), except `dev`.
        pub const TEXT_KEYS: &[&str] = &[$(stringify!($name)),*];

        impl ServeArgs {
            fn get(&self, key: &str) -> Option<&str> {
                match key {
                    $(stringify!($name) => self.$name.as_deref(),)*
                    _ => None,
                }
            }

            fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
                match key {
                    $(stringify!($name) => Some(&mut self.$name),)*
                    _ => None,
                }
            }
        }
    };
}

text_keys!(
    listen,
    admin_listen,
    jwt_secret,
    jwt_public_key,
    jwt_leeway,
    jwt_issuer,
    jwt_audience,
    auth_timeout,
    handshake_timeout,
    ping_interval,
    pong_timeout,
    agent_lease,
    token_expiry_warning,
    command_timeout,
    rate_limit,
    rate_burst,
    rate_limit_close_after,
    max_message_size,
    max_connections,
    max_connection_rate,
    max_outbound_bytes,
    max_pending_handshakes,
    max_header_bytes,
    allowed_origins,
    tls_cert,
    tls_key,
    workers,
    io,
    drain_duration,
    log_format,
    log_level,
);

impl Config {
    /// Merges defaults, the `--config` file, and `args` (flags, which clap already
    /// layered over `ARCGATE_*`), then validates everything, reporting every problem.
    pub fn load(args: ServeArgs) -> Result<Config, ConfigError> {
        let mut merged = args;
        let mut errors = Vec::new();
        if let Some(path) = merged.config.clone() {
            match read_file(&path) {
                Ok((file, file_errors)) => {
                    errors = file_errors;
                    overlay(&mut merged, file);
                }
                // Without the file the rest would be judged on the wrong values.
                Err(e) => return Err(ConfigError(vec![e])),
            }
        }
        let mut fields = Fields {
            raw: &merged,
            errors,
        };
        let config = fields.config();
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

    /// The effective configuration as TOML lines, secrets shown as `****`; unset keys and
    /// the public key (read from a file) appear as comments.
    pub fn render_masked(&self) -> String {
        let q = |s: &str| Some(format!("{s:?}"));
        let dur = |d: Duration| q(&humantime::format_duration(d).to_string());
        let num = |n: &dyn std::fmt::Display| Some(n.to_string());
        let key_line = match &self.key {
            Some(KeySource::Secret(_)) => ("jwt_secret", q("****"), ""),
            Some(KeySource::PublicKeyPem(pem)) => ("jwt_public_key", None, describe_pem(pem)),
            None => ("jwt_secret", None, "generated at start (dev)"),
        };
        let origins = self.allowed_origins.as_ref().map(|o| format!("{o:?}"));
        let path = |p: &Option<PathBuf>| p.as_ref().and_then(|p| q(&p.to_string_lossy()));
        let lines: [(&str, Option<String>, &str); 31] = [
            ("listen", q(&self.listen.to_string()), ""),
            ("admin_listen", q(&self.admin_listen.to_string()), ""),
            key_line,
            ("jwt_leeway", dur(self.jwt_leeway), ""),
            (
                "jwt_issuer",
                self.jwt_issuer.as_deref().and_then(q),
                "unset (not checked)",
            ),
            (
                "jwt_audience",
                self.jwt_audience.as_deref().and_then(q),
                "unset (not checked)",
            ),
            ("auth_timeout", dur(self.auth_timeout), ""),
            ("handshake_timeout", dur(self.handshake_timeout), ""),
            ("ping_interval", dur(self.ping_interval), ""),
            ("pong_timeout", dur(self.pong_timeout), ""),
            ("agent_lease", dur(self.agent_lease), ""),
            ("token_expiry_warning", dur(self.token_expiry_warning), ""),
            ("command_timeout", dur(self.command_timeout), ""),
            ("rate_limit", num(&self.rate_limit), ""),
            ("rate_burst", num(&self.rate_burst), ""),
            (
                "rate_limit_close_after",
                num(&self.rate_limit_close_after),
                "",
            ),
            ("max_message_size", num(&self.max_message_size), ""),
            (
                "max_connections",
                self.max_connections.map(|n| n.to_string()),
                "sized at start",
            ),
            ("max_connection_rate", num(&self.max_connection_rate), ""),
            ("max_outbound_bytes", num(&self.max_outbound_bytes), ""),
            (
                "max_pending_handshakes",
                num(&self.max_pending_handshakes),
                "",
            ),
            ("max_header_bytes", num(&self.max_header_bytes), ""),
            ("allowed_origins", origins, "unset (any origin)"),
            ("tls_cert", path(&self.tls_cert), "unset (plain ws://)"),
            ("tls_key", path(&self.tls_key), "unset (plain ws://)"),
            ("workers", num(&self.workers), ""),
            ("io", q(io_name(self.io)), ""),
            ("drain_duration", dur(self.drain_duration), ""),
            ("log_format", q(log_format_name(self.log_format)), ""),
            ("log_level", q(&self.log_level), ""),
            ("dev", num(&self.dev), ""),
        ];
        let mut out = String::new();
        for (key, value, note) in lines {
            let _ = match value {
                Some(v) => writeln!(out, "{key} = {v}"),
                None => writeln!(out, "# {key}: {note}"),
            };
        }
        out
    }
}

/// The message of `serve` and `check-config` when no key was given.
pub const NO_KEY: &str =
    "no key to verify tokens with: pass --jwt-secret SECRET (or ARCGATE_JWT_SECRET) \
for HS256, --jwt-public-key PEM_FILE (or ARCGATE_JWT_PUBLIC_KEY) for RS256/ES256/EdDSA, \
or --dev to try it out with a generated secret";

const DURATION: &str = "expected a duration like 500ms, 10s or 2m";
const WHOLE: &str = "expected a whole number";
const ORIGINS: &str = "expected origins like https://panel.example.com or http://localhost:3000, \
separated by commas";

fn io_name(io: IoMode) -> &'static str {
    match io {
        IoMode::Auto => "auto",
        IoMode::Uring => "uring",
        IoMode::Epoll => "epoll",
    }
}

fn log_format_name(f: LogFormat) -> &'static str {
    match f {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    }
}

fn describe_pem(pem: &[u8]) -> &'static str {
    let key = KeySource::PublicKeyPem(pem.to_vec());
    match Verifier::new(&key, None, None, Duration::ZERO).map(|v| v.algorithm()) {
        Ok("RS256") => "an RSA public key (RS256)",
        Ok("ES256") => "an EC P-256 public key (ES256)",
        Ok("EdDSA") => "an Ed25519 public key (EdDSA)",
        _ => "an unusable public key",
    }
}

/// Fills every key not given as flag or environment from the file.
fn overlay(args: &mut ServeArgs, file: ServeArgs) {
    let mut file = file;
    for key in TEXT_KEYS {
        if let (Some(slot), Some(from_file)) = (args.slot(key), file.slot(key)) {
            if slot.is_none() {
                *slot = from_file.take();
            }
        }
    }
    if args.dev.is_none() {
        args.dev = file.dev;
    }
}

/// Reads the TOML file into the same shape as the flags, with the problems of its
/// entries (unknown keys, values of the wrong type); an unreadable file is an error.
fn read_file(path: &Path) -> Result<(ServeArgs, Vec<String>), String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {shown}: {e}"))?;
    let table = toml::from_str::<toml::Table>(&text)
        .map_err(|e| format!("config file {shown}: {}", one_line(&e.to_string())))?;
    let mut out = ServeArgs::default();
    let mut errors = Vec::new();
    for (key, value) in table {
        if let Err(e) = file_entry(&mut out, path, &key, &value) {
            errors.push(e);
        }
    }
    Ok((out, errors))
}

fn file_entry(
    out: &mut ServeArgs,
    path: &Path,
    key: &str,
    value: &toml::Value,
) -> Result<(), String> {
    let shown = path.display();
    let bad = |expected: &str| {
        format!("invalid value {value} for {key} in config file {shown}: {expected}")
    };
    if key == "dev" {
        out.dev = Some(
            value
                .as_bool()
                .ok_or_else(|| bad("expected true or false"))?,
        );
        return Ok(());
    }
    let text = file_value_text(key, value).map_err(|expected| bad(&expected))?;
    let text = match key {
        "jwt_public_key" | "tls_cert" | "tls_key" => relative_to(path, &text),
        _ => text,
    };
    let slot = out
        .slot(key)
        .ok_or_else(|| format!("config file {shown}: unknown key \"{key}\""))?;
    *slot = Some(text);
    Ok(())
}

/// A file value as the text a flag would carry (arrays only for `allowed_origins`).
fn file_value_text(key: &str, value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Array(items) if key == "allowed_origins" => {
            let texts: Option<Vec<&str>> = items.iter().map(toml::Value::as_str).collect();
            texts
                .map(|t| t.join(","))
                .ok_or_else(|| "expected an array of strings".to_string())
        }
        _ => Err("expected a single value".to_string()),
    }
}

/// A relative key path in the file is relative to the file, not to the working directory.
fn relative_to(config_file: &Path, path: &str) -> String {
    let p = Path::new(path);
    match config_file.parent() {
        Some(dir) if p.is_relative() && !dir.as_os_str().is_empty() => {
            dir.join(p).to_string_lossy().into_owned()
        }
        _ => path.to_string(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses the merged text values, collecting every error.
struct Fields<'a> {
    raw: &'a ServeArgs,
    errors: Vec<String>,
}

impl Fields<'_> {
    fn config(&mut self) -> Config {
        let d = Config::default();
        let c = Config {
            listen: self.addr("listen", d.listen),
            admin_listen: self.addr("admin_listen", d.admin_listen),
            key: self.key(),
            jwt_leeway: self.duration("jwt_leeway", d.jwt_leeway),
            jwt_issuer: self.text("jwt_issuer"),
            jwt_audience: self.text("jwt_audience"),
            auth_timeout: self.positive_duration("auth_timeout", d.auth_timeout),
            handshake_timeout: self.positive_duration("handshake_timeout", d.handshake_timeout),
            ping_interval: self.positive_duration("ping_interval", d.ping_interval),
            pong_timeout: self.positive_duration("pong_timeout", d.pong_timeout),
            agent_lease: self.positive_duration("agent_lease", d.agent_lease),
            token_expiry_warning: self.duration("token_expiry_warning", d.token_expiry_warning),
            command_timeout: self.positive_duration("command_timeout", d.command_timeout),
            rate_limit: self.number("rate_limit", d.rate_limit),
            rate_burst: self.number("rate_burst", d.rate_burst),
            rate_limit_close_after: self.at_least(
                "rate_limit_close_after",
                d.rate_limit_close_after,
                1,
            ),
            max_message_size: self.bytes("max_message_size", d.max_message_size),
            max_connections: self
                .raw
                .get("max_connections")
                .map(|_| self.at_least("max_connections", 1, 1)),
            max_connection_rate: self.number("max_connection_rate", d.max_connection_rate),
            max_outbound_bytes: self.bytes("max_outbound_bytes", d.max_outbound_bytes),
            max_pending_handshakes: self.at_least(
                "max_pending_handshakes",
                d.max_pending_handshakes,
                1,
            ),
            max_header_bytes: self.bytes("max_header_bytes", d.max_header_bytes),
            allowed_origins: self.origins(),
            tls_cert: self.raw.get("tls_cert").map(PathBuf::from),
            tls_key: self.raw.get("tls_key").map(PathBuf::from),
            workers: self.at_least("workers", d.workers, 1),
            io: self.choice(
                "io",
                d.io,
                &[
                    ("auto", IoMode::Auto),
                    ("uring", IoMode::Uring),
                    ("epoll", IoMode::Epoll),
                ],
            ),
            drain_duration: self.duration("drain_duration", d.drain_duration),
            log_format: self.choice(
                "log_format",
                d.log_format,
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            ),
            log_level: self.log_level(d.log_level),
            dev: self.raw.dev.unwrap_or(false),
        };
        self.check_ranges(&c);
        self.check_key(&c);
        self.check_tls(&c);
        c
    }

    /// Loads the TLS pair once to refuse a missing, malformed or mismatched one now.
    fn check_tls(&mut self, c: &Config) {
        match (&c.tls_cert, &c.tls_key) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::certs::CertStore::load(cert.clone(), key.clone()) {
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

    fn fail(&mut self, key: &str, value: &str, expected: &str) {
        self.errors
            .push(format!("invalid value {value:?} for {key}: {expected}"));
    }

    /// Parses the value of `key` if given; on a bad value records `expected` and keeps `default`.
    fn parsed<T>(
        &mut self,
        key: &str,
        default: T,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> T {
        let Some(value) = self.raw.get(key) else {
            return default;
        };
        match parse(value.trim()) {
            Some(v) => v,
            None => {
                self.fail(key, value, expected);
                default
            }
        }
    }

    fn addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        let expected = format!("expected an address like {default}");
        self.parsed(key, default, &expected, parse_addr)
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        self.parsed(key, default, DURATION, |s| {
            humantime::parse_duration(s).ok()
        })
    }

    fn positive_duration(&mut self, key: &str, default: Duration) -> Duration {
        let d = self.duration(key, default);
        if d.is_zero() {
            let value = self.shown(key, humantime::format_duration(d));
            self.fail(
                key,
                &value,
                "expected a duration above 0, like 500ms, 10s or 2m",
            );
            return default;
        }
        d
    }

    fn number<T: std::str::FromStr>(&mut self, key: &str, default: T) -> T {
        self.parsed(key, default, WHOLE, |s| s.parse().ok())
    }

    fn at_least<T: std::str::FromStr + PartialOrd + Copy + std::fmt::Display>(
        &mut self,
        key: &str,
        default: T,
        min: T,
    ) -> T {
        let n = self.number(key, default);
        if n < min {
            let value = self.shown(key, n);
            self.fail(key, &value, &format!("expected at least {min}"));
            return default;
        }
        n
    }

    fn bytes(&mut self, key: &str, default: usize) -> usize {
        let expected = "expected a size in bytes, like 65536, 64KiB or 1MiB";
        self.parsed(key, default, expected, parse_bytes)
    }

    fn choice<T: Copy>(&mut self, key: &str, default: T, options: &[(&str, T)]) -> T {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let expected = format!("expected one of {}", names.join(", "));
        self.parsed(key, default, &expected, |s| {
            options
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(s))
                .map(|(_, v)| *v)
        })
    }

    /// A free-text value; empty counts as a mistake, not as unset.
    fn text(&mut self, key: &str) -> Option<String> {
        let value = self.raw.get(key)?;
        if value.trim().is_empty() {
            self.fail(
                key,
                value,
                "expected a non-empty value (leave it out to not check it)",
            );
            return None;
        }
        Some(value.to_string())
    }

    fn log_level(&mut self, default: String) -> String {
        let expected =
            "expected error, warn, info, debug, trace, off, or a filter like info,arcgate=debug";
        self.parsed("log_level", default, expected, parse_log_level)
    }

    fn origins(&mut self) -> Option<Vec<String>> {
        let value = self.raw.get("allowed_origins")?;
        let items: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            self.fail("allowed_origins", value, ORIGINS);
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match parse_origin(item) {
                Some(origin) => out.push(origin),
                None => self.fail("allowed_origins", item, ORIGINS),
            }
        }
        Some(out)
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

    fn check_ranges(&mut self, c: &Config) {
        let size_ok = (MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&c.max_message_size);
        if !size_ok {
            let value = self.shown("max_message_size", c.max_message_size);
            let expected =
                format!("expected between {MIN_MESSAGE_SIZE} and {MAX_MESSAGE_SIZE} (64 MiB)");
            self.fail("max_message_size", &value, &expected);
        }
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&c.max_header_bytes) {
            let value = self.shown("max_header_bytes", c.max_header_bytes);
            let expected =
                format!("expected between {MIN_HEADER_BYTES} and {MAX_HEADER_BYTES} (64 KiB)");
            self.fail("max_header_bytes", &value, &expected);
        }
        if c.rate_limit > 0 && c.rate_burst < 1 {
            let value = self.shown("rate_burst", c.rate_burst);
            self.fail(
                "rate_burst",
                &value,
                "expected at least 1 when rate_limit is above 0",
            );
        }
        // One message must always fit in the outbound queue.
        if size_ok && c.max_outbound_bytes < c.max_message_size {
            let value = self.shown("max_outbound_bytes", c.max_outbound_bytes);
            let expected = format!(
                "expected at least max_message_size ({})",
                c.max_message_size
            );
            self.fail("max_outbound_bytes", &value, &expected);
        }
    }

    /// The value as given, or the effective one when it came from the defaults.
    fn shown(&self, key: &str, effective: impl std::fmt::Display) -> String {
        self.raw
            .get(key)
            .map_or_else(|| effective.to_string(), String::from)
    }
}

fn parse_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(addr) = s.parse() {
        return Some(addr);
    }
    // The one name worth accepting without a resolver.
    let port = s.strip_prefix("localhost:")?.parse().ok()?;
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A byte count, optionally with a binary suffix (KiB, MiB, GiB).
fn parse_bytes(s: &str) -> Option<usize> {
    let units = [("KiB", 1usize << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)];
    for (suffix, factor) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.trim().parse::<usize>().ok()?.checked_mul(factor);
        }
    }
    s.parse().ok()
}

fn parse_log_level(s: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let lower = s.to_ascii_lowercase();
    if LEVELS.contains(&lower.as_str()) {
        return Some(lower);
    }
    // A bare word would pass as a target name: only accept real filter syntax.
    if s.contains('=') || s.contains(',') {
        return tracing_subscriber::EnvFilter::try_new(s)
            .ok()
            .map(|_| s.to_string());
    }
    None
}

/// `scheme://host[:port]`, lowercased (origins compare case-insensitively).
fn parse_origin(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok || rest.is_empty() {
        return None;
    }
    let (host, port) = split_host_port(rest)?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c));
    if !host_ok || port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return None;
    }
    Some(s.to_ascii_lowercase())
}

fn split_host_port(rest: &str) -> Option<(&str, Option<&str>)> {
    if rest.starts_with('[') {
        let end = rest.find(']')?;
        let (host, after) = rest.split_at(end + 1);
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    match rest.split_once(':') {
        Some((host, port)) => Some((host, Some(port))),
        None => Some((rest, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn with_secret() -> ServeArgs {
        ServeArgs {
            jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
            ..ServeArgs::default()
        }
    }

    fn errors(args: ServeArgs) -> Vec<String> {
        Config::load(args).unwrap_err().0
    }

    fn one_error(args: ServeArgs) -> String {
        let errs = errors(args);
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.into_iter().next().unwrap()
    }

    /// A file under the temp dir, unique per test.
    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("arcgate-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("arcgate.toml");
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let c = Config::load(with_secret()).unwrap();
        let d = Config::default();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.jwt_leeway, Duration::from_secs(5));
        assert_eq!((c.jwt_issuer, c.jwt_audience), (None, None));
        assert_eq!(c.auth_timeout, Duration::from_secs(10));
        assert_eq!(c.handshake_timeout, Duration::from_secs(5));
        assert_eq!(
            (c.ping_interval, c.pong_timeout),
            (Duration::from_secs(30), Duration::from_secs(30))
        );
        assert_eq!(c.agent_lease, Duration::from_secs(90));
        assert_eq!(c.token_expiry_warning, Duration::from_secs(60));
        assert_eq!(c.command_timeout, Duration::from_secs(30));
        assert_eq!(
            (c.rate_limit, c.rate_burst, c.rate_limit_close_after),
            (100, 200, 10)
        );
        assert_eq!(c.max_message_size, 65536);
        assert_eq!((c.max_connections, c.max_connection_rate), (None, 0));
        assert_eq!(c.max_outbound_bytes, 1048576);
        assert_eq!(c.allowed_origins, None);
        assert_eq!(c.workers, d.workers);
        assert!(c.workers >= 1);
        assert_eq!(c.io, IoMode::Auto);
        assert_eq!(c.drain_duration, Duration::from_secs(10));
        assert_eq!(
            (c.log_format, c.log_level.as_str()),
            (LogFormat::Text, "info")
        );
        assert!(!c.dev);
        assert_eq!(
            c.key,
            Some(KeySource::Secret("0123456789abcdef0123456789abcdef".into()))
        );
    }

    #[test]
    fn file_beats_defaults_and_flags_beat_the_file() {
        let path = temp_file(
            "layers",
            r#"
            listen = "127.0.0.1:7000"
            admin_listen = "127.0.0.1:7001"
            jwt_secret = "from-file-secret-from-file-secret"
            workers = 3
            rate_limit = 7
            allowed_origins = ["https://a.example", "HTTP://B.example:8080"]
            dev = true
            "#,
        );
        let path = path.to_str().unwrap();
        let cmd = Cmd::try_parse_from([
            "x",
            "--config",
            path,
            "--listen",
            "127.0.0.1:9000",
            "--workers",
            "5",
        ])
        .unwrap();
        let c = Config::load(cmd.serve).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:7001");
        assert_eq!(c.workers, 5);
        assert_eq!(c.rate_limit, 7);
        assert_eq!(c.rate_burst, 200);
        assert!(c.dev);
        assert_eq!(
            c.key,
            Some(KeySource::Secret(
                "from-file-secret-from-file-secret".into()
            ))
        );
        let origins = c.allowed_origins.unwrap();
        assert_eq!(
            origins,
            vec![
                "https://a.example".to_string(),
                "http://b.example:8080".to_string()
            ]
        );
    }

    /// The only test that touches the process environment; the keys it sets are read by
    /// no other test.
    #[test]
    fn environment_beats_the_file_and_flags_beat_the_environment() {
        let path = temp_file(
            "env",
            "agent_lease = \"1s\"\ncommand_timeout = \"2s\"\njwt_secret = \"s\"\n",
        );
        std::env::set_var("ARCGATE_AGENT_LEASE", "7s");
        std::env::set_var("ARCGATE_COMMAND_TIMEOUT", "8s");
        let parsed = Cmd::try_parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--command-timeout",
            "9s",
        ]);
        std::env::remove_var("ARCGATE_AGENT_LEASE");
        std::env::remove_var("ARCGATE_COMMAND_TIMEOUT");
        let c = Config::load(parsed.unwrap().serve).unwrap();
        assert_eq!(c.agent_lease, Duration::from_secs(7));
        assert_eq!(c.command_timeout, Duration::from_secs(9));
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let path = temp_file("unknown", "lisen = \"0.0.0.0:1\"\n");
        let args = ServeArgs {
            config: Some(path.clone()),
            ..with_secret()
        };
        let err = one_error(args);
        assert_eq!(
            err,
            format!("config file {}: unknown key \"lisen\"", path.display())
        );
        let two = temp_file("unknown2", "lisen = 1\nworkers = \"0\"\ntimeout = \"5s\"\n");
        let errs = errors(ServeArgs {
            config: Some(two),
            ..with_secret()
        });
        // Every unknown key, and the bad values of the known ones, in one pass.
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].ends_with("unknown key \"lisen\""), "{errs:?}");
        assert!(errs[1].ends_with("unknown key \"timeout\""), "{errs:?}");
        assert_eq!(
            errs[2],
            "invalid value \"0\" for workers: expected at least 1"
        );
    }

    #[test]
    fn bad_files_are_reported() {
        let missing = ServeArgs {
            config: Some("/nonexistent/arcgate.toml".into()),
            ..with_secret()
        };
        assert!(
            one_error(missing).starts_with("cannot read config file /nonexistent/arcgate.toml: ")
        );
        let syntax = temp_file("syntax", "listen = \n");
        let err = one_error(ServeArgs {
            config: Some(syntax.clone()),
            ..with_secret()
        });
        assert!(
            err.starts_with(&format!("config file {}: ", syntax.display())),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let dev = temp_file("dev", "dev = \"yes\"\n");
        let err = one_error(ServeArgs {
            config: Some(dev),
            ..with_secret()
        });
        assert!(
            err.starts_with("invalid value \"yes\" for dev in config file"),
            "{err}"
        );
        let table = temp_file("table", "[listen]\nport = 1\n");
        let err = one_error(ServeArgs {
            config: Some(table),
            ..with_secret()
        });
        assert!(
            err.contains("for listen in config file") && err.ends_with("expected a single value"),
            "{err}"
        );
    }

    #[test]
    fn file_values_are_validated_like_flags() {
        let path = temp_file("values", "workers = 0\njwt_leeway = 5\n");
        let errs = errors(ServeArgs {
            config: Some(path),
            ..with_secret()
        });
        assert_eq!(
            errs,
            vec![
                "invalid value \"5\" for jwt_leeway: expected a duration like 500ms, 10s or 2m"
                    .to_string(),
                "invalid value \"0\" for workers: expected at least 1".to_string(),
            ]
        );
    }

    #[test]
    fn public_key_in_the_file_is_relative_to_the_file() {
        let path = temp_file("pem", "jwt_public_key = \"ec.pem\"\n");
        let pem = include_bytes!("../tests/keys/ec_p256_public.pem");
        std::fs::write(path.parent().unwrap().join("ec.pem"), pem).unwrap();
        let c = Config::load(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(c.key, Some(KeySource::PublicKeyPem(pem.to_vec())));
        assert!(c
            .render_masked()
            .contains("# jwt_public_key: an EC P-256 public key (ES256)\n"));
    }

    #[test]
    fn key_problems_are_explained() {
        assert_eq!(one_error(ServeArgs::default()), NO_KEY);
        assert!(NO_KEY.contains("--jwt-secret") && NO_KEY.contains("ARCGATE_JWT_SECRET"));
        assert!(NO_KEY.contains("--jwt-public-key") && NO_KEY.contains("--dev"));
        let dev = Config::load(ServeArgs {
            dev: Some(true),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!((dev.key, dev.dev), (None, true));
        let both = ServeArgs {
            jwt_public_key: Some("k.pem".into()),
            ..with_secret()
        };
        assert!(one_error(both).starts_with("jwt_secret and jwt_public_key are both set"));
        let missing = ServeArgs {
            jwt_public_key: Some("/nonexistent/k.pem".into()),
            ..ServeArgs::default()
        };
        assert!(
            one_error(missing).starts_with("cannot read jwt_public_key \"/nonexistent/k.pem\": ")
        );
        let private = ServeArgs {
            jwt_public_key: Some(
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rsa_private.pem").into(),
            ),
            ..ServeArgs::default()
        };
        let err = one_error(private);
        assert!(
            err.starts_with("invalid jwt_public_key \"") && err.contains("private key"),
            "{err}"
        );
        let empty = ServeArgs {
            jwt_secret: Some(String::new()),
            ..ServeArgs::default()
        };
        assert_eq!(one_error(empty), "invalid jwt_secret: empty secret");
    }

    #[test]
    fn each_bad_value_is_named_with_what_is_allowed() {
        let between = "expected between 125 and 67108864 (64 MiB)";
        let cases = [
            ("jwt_leeway", "abc", DURATION),
            ("listen", "nowhere", "expected an address like 0.0.0.0:8080"),
            ("admin_listen", "1.2.3.4", "expected an address like 127.0.0.1:9090"),
            ("workers", "0", "expected at least 1"),
            ("workers", "two", "expected a whole number"),
            ("max_message_size", "124", between),
            ("max_message_size", "65MiB", between),
            ("max_message_size", "lots", "expected a size in bytes, like 65536, 64KiB or 1MiB"),
            ("rate_burst", "0", "expected at least 1 when rate_limit is above 0"),
            ("ping_interval", "0s", "expected a duration above 0, like 500ms, 10s or 2m"),
            ("pong_timeout", "0ms", "expected a duration above 0, like 500ms, 10s or 2m"),
            ("rate_limit_close_after", "0", "expected at least 1"),
            ("max_connections", "0", "expected at least 1"),
            ("max_outbound_bytes", "1000", "expected at least max_message_size (65536)"),
            ("io", "fast", "expected one of auto, uring, epoll"),
            ("log_format", "xml", "expected one of text, json"),
            ("log_level", "inof", "expected error, warn, info, debug, trace, off, or a filter like info,arcgate=debug"),
            ("jwt_audience", " ", "expected a non-empty value (leave it out to not check it)"),
        ];
        for (key, value, expected) in cases {
            let mut args = with_secret();
            *args.slot(key).unwrap() = Some(value.to_string());
            assert_eq!(
                one_error(args),
                format!("invalid value {value:?} for {key}: {expected}")
            );
        }
        // The exact text of one message, as the documentation shows it.
        let mut args = with_secret();
        args.jwt_leeway = Some("abc".into());
        let expected =
            "invalid value \"abc\" for jwt_leeway: expected a duration like 500ms, 10s or 2m";
        assert_eq!(one_error(args), expected);
    }

    #[test]
    fn a_larger_message_size_needs_a_larger_outbound_queue() {
        let args = ServeArgs {
            max_message_size: Some("2MiB".into()),
            ..with_secret()
        };
        let expected = "invalid value \"1048576\" for max_outbound_bytes: expected at least max_message_size (2097152)";
        assert_eq!(one_error(args), expected);
        let both = ServeArgs {
            max_message_size: Some("2MiB".into()),
            max_outbound_bytes: Some("4MiB".into()),
            ..with_secret()
        };
        assert_eq!(Config::load(both).unwrap().max_outbound_bytes, 4 << 20);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let args = ServeArgs {
            workers: Some("0".into()),
            io: Some("x".into()),
            jwt_leeway: Some("x".into()),
            ..ServeArgs::default()
        };
        let errs = errors(args);
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs.contains(&NO_KEY.to_string()));
        let joined = ConfigError(errs).to_string();
        assert_eq!(joined.lines().count(), 4);
    }

    #[test]
    fn rate_burst_may_be_zero_when_rate_limit_is_off() {
        let args = ServeArgs {
            rate_limit: Some("0".into()),
            rate_burst: Some("0".into()),
            ..with_secret()
        };
        assert_eq!(Config::load(args).unwrap().rate_limit, 0);
    }

    #[test]
    fn handshake_limits_have_bounds() {
        let load = |pending: &str, head: &str| {
            Config::load(ServeArgs {
                max_pending_handshakes: Some(pending.into()),
                max_header_bytes: Some(head.into()),
                ..with_secret()
            })
        };
        let c = load("16", "16KiB").unwrap();
        assert_eq!((c.max_pending_handshakes, c.max_header_bytes), (16, 16384));
        let d = Config::load(with_secret()).unwrap();
        assert_eq!((d.max_pending_handshakes, d.max_header_bytes), (8192, 8192));
        let errs = load("0", "512").unwrap_err().0;
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("max_pending_handshakes: expected at least 1"));
        assert!(errs[1].contains("max_header_bytes: expected between 1024 and 65536"));
        assert!(load("8", "128KiB").is_err());
    }

    #[test]
    fn origins_must_be_scheme_host_and_port() {
        let load = |v: &str| {
            Config::load(ServeArgs {
                allowed_origins: Some(v.into()),
                ..with_secret()
            })
        };
        let ok =
            load(" https://Panel.Example.com ,http://localhost:3000,http://[::1]:8080").unwrap();
        let expected = [
            "https://panel.example.com",
            "http://localhost:3000",
            "http://[::1]:8080",
        ];
        assert_eq!(
            ok.allowed_origins.unwrap(),
            expected.map(String::from).to_vec()
        );
        for bad in [
            "panel.example.com",
            "https://",
            "https://a.com/",
            "https://a.com:99999",
            "://a.com",
            "",
        ] {
            let errs = load(bad).unwrap_err().0;
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert!(
                errs[0].contains("for allowed_origins: expected origins like https://"),
                "{bad}: {errs:?}"
            );
        }
        let errs = load("https://ok.example,ftp//bad").unwrap_err().0;
        assert_eq!(
            errs,
            vec![format!(
                "invalid value \"ftp//bad\" for allowed_origins: {ORIGINS}"
            )]
        );
    }

    #[test]
    fn durations_sizes_addresses_and_levels_parse() {
        let d = |s: &str| humantime::parse_duration(s).unwrap();
        let args = ServeArgs {
            jwt_leeway: Some("500ms".into()),
            auth_timeout: Some("2m".into()),
            drain_duration: Some("1h 30m".into()),
            max_message_size: Some("64KiB".into()),
            max_outbound_bytes: Some("2MiB".into()),
            listen: Some("localhost:8081".into()),
            admin_listen: Some("[::1]:9091".into()),
            log_level: Some("info,arcgate=debug".into()),
            log_format: Some("JSON".into()),
            io: Some("epoll".into()),
            max_connections: Some("100000".into()),
            ..with_secret()
        };
        let c = Config::load(args).unwrap();
        assert_eq!(c.jwt_leeway, Duration::from_millis(500));
        assert_eq!(c.auth_timeout, d("120s"));
        assert_eq!(c.drain_duration, Duration::from_secs(5400));
        assert_eq!((c.max_message_size, c.max_outbound_bytes), (65536, 2 << 20));
        assert_eq!(c.listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.admin_listen.to_string(), "[::1]:9091");
        assert_eq!(c.log_level, "info,arcgate=debug");
        assert_eq!((c.log_format, c.io), (LogFormat::Json, IoMode::Epoll));
        assert_eq!(c.max_connections, Some(100000));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("-1"), None);
        assert_eq!(parse_log_level("DEBUG").as_deref(), Some("debug"));
    }

    #[test]
    fn rendering_masks_the_secret_and_reads_back() {
        let args = ServeArgs {
            jwt_issuer: Some("panel".into()),
            allowed_origins: Some("https://a.example".into()),
            ..with_secret()
        };
        let c = Config::load(args).unwrap();
        let text = c.render_masked();
        assert!(text.contains("jwt_secret = \"****\"\n"), "{text}");
        assert!(!text.contains("0123456789abcdef"));
        assert!(text.contains("# jwt_audience: unset (not checked)\n"));
        // What check-config prints is itself a valid file for the same configuration.
        let path = temp_file(
            "render",
            &text.replace("\"****\"", "\"0123456789abcdef0123456789abcdef\""),
        );
        let again = Config::load(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(again.render_masked(), text);
        assert_eq!(again.jwt_issuer.as_deref(), Some("panel"));
        assert_eq!(again.agent_lease, c.agent_lease);
    }

    #[test]
    fn short_secrets_are_warned_about() {
        let short = Config::load(ServeArgs {
            jwt_secret: Some("abc".into()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(short.warnings().len(), 1);
        assert!(short.warnings()[0].contains("3 bytes"));
        assert!(Config::load(with_secret()).unwrap().warnings().is_empty());
    }

    #[test]
    fn tls_needs_both_files_and_names_the_bad_one() {
        let half = one_error(ServeArgs {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            ..with_secret()
        });
        assert!(half.contains("tls_cert and tls_key go together"), "{half}");
        let missing = one_error(ServeArgs {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            ..with_secret()
        });
        assert!(
            missing.contains("/nonexistent/cert.pem: cannot read"),
            "{missing}"
        );
    }

    #[test]
    fn every_text_key_is_a_flag_and_a_field() {
        use clap::CommandFactory;
        let cmd = Cmd::command();
        let mut flags: Vec<String> = cmd
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        flags.retain(|f| f != "config" && f != "dev");
        flags.sort();
        let mut keys: Vec<String> = TEXT_KEYS.iter().map(|k| k.to_string()).collect();
        keys.sort();
        assert_eq!(flags, keys);
        let mut args = ServeArgs::default();
        for key in TEXT_KEYS {
            *args.slot(key).unwrap() = Some(format!("v-{key}"));
            assert_eq!(args.get(key), Some(format!("v-{key}").as_str()));
        }
        let long = cmd
            .get_arguments()
            .find(|a| a.get_id() == "jwt_leeway")
            .unwrap();
        assert_eq!(long.get_long(), Some("jwt-leeway"));
    }
}
