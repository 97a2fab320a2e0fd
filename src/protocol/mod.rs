//! The sans-IO protocol layer: no sockets, no threads, no clock reads (time is passed in).

pub mod codec;
pub mod envelope;
pub mod handshake;
pub mod session;
