//! arcgate: a thread-per-core WebSocket gateway for game-server hosting panels.
//!
//! Layers (see docs/architecture.md): `protocol` is sans-IO (handshake, frames,
//! envelope, the per-connection session); `io` is the only code that touches
//! sockets; `hub` routes events between connections and workers; `worker` glues
//! one core's io loop, sessions, hub shard and timers together.

pub mod admin;
pub mod auth;
pub mod bus;
pub mod certs;
pub mod config;
pub mod conn;
pub mod fault;
pub mod hub;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod systemd;
pub mod timer;
pub mod worker;
