//! One `Config` for `serve`: defaults < TOML file < `ARCGATE_*` environment < flags, validated once.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::KeySource;

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
    pub rate_limit_close_after: u32,
    pub max_message_size: usize,
    /// `None`: sized from the open-files limit and the io backend at start.
    pub max_connections: Option<usize>,
    /// New connections per second on this node; 0 = off.
    pub max_connection_rate: u32,
    pub max_outbound_bytes: usize,
    pub allowed_origins: Option<Vec<String>>,
    pub workers: usize,
    pub io: IoMode,
    pub drain_duration: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub dev: bool,
}
