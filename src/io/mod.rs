//! The only code that touches sockets: a per-worker event loop (io_uring, or epoll as the
//! fallback) driving a table of connections and calling a `Handler` with their bytes.

pub mod conns;
pub mod epoll;
pub mod listener;
pub mod notify;
pub mod tls;
pub mod uring;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use conns::{ConnId, Conns};
pub use notify::Notifier;

/// How long a closing connection may linger (flushing, then waiting for the peer's FIN)
/// before its socket is closed regardless.
pub const LINGER: Duration = Duration::from_secs(2);

/// What a worker does with the events of its loop. Every callback gets the connection
/// table, through which it queues bytes and closes connections.
pub trait Handler {
    /// A connection was accepted (its slot is live). Called for every accepted socket,
    /// also while draining: the handler answers or closes it.
    fn on_accept(&mut self, conns: &mut Conns, id: ConnId, now: Instant);
    /// Bytes arrived; the handler may modify them in place.
    fn on_data(&mut self, conns: &mut Conns, id: ConnId, data: &mut [u8], now: Instant);
    /// The connection is gone (peer closed, error, or a close finished). Called once;
    /// the slot is freed right after.
    fn on_close(&mut self, conns: &mut Conns, id: ConnId, now: Instant);
    /// The worker's notifier fired: messages from other threads are waiting.
    fn on_wake(&mut self, conns: &mut Conns, now: Instant);
    /// Once per loop turn, after the completions of that turn: timers and housekeeping.
    fn on_tick(&mut self, conns: &mut Conns, now: Instant);
    /// The latest instant the loop may sleep until.
    fn next_deadline(&self) -> Option<Instant>;
    /// Whether new connections are refused (draining).
    fn accepting(&self) -> bool;
    /// Whether the loop should end (after draining, once `conns` is empty).
    fn finished(&self, conns: &Conns) -> bool;
}

/// Which loop runs a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Runs `handler` on a loop of `backend` over `listener` until the handler is finished;
/// `ready` is called once the loop is set up. `max_conns` sizes io_uring's table of
/// direct descriptors (epoll needs none).
pub fn run<H: Handler>(
    backend: Backend,
    listener: TcpListener,
    notifier: Arc<Notifier>,
    max_conns: u32,
    conns: &mut Conns,
    handler: &mut H,
    ready: impl FnOnce(),
) -> std::io::Result<()> {
    match backend {
        Backend::Uring => {
            let mut l = uring::UringLoop::new(listener, notifier, max_conns)?;
            ready();
            l.run(conns, handler)
        }
        Backend::Epoll => {
            let mut l = epoll::EpollLoop::new(listener, notifier)?;
            ready();
            l.run(conns, handler)
        }
    }
}

/// How long to sleep until `deadline` (capped, so a lost wake-up costs at most that long).
pub(crate) fn sleep_for(now: Instant, deadline: Option<Instant>) -> Duration {
    const MAX_SLEEP: Duration = Duration::from_millis(500);
    match deadline {
        Some(d) => d.saturating_duration_since(now).min(MAX_SLEEP),
        None => MAX_SLEEP,
    }
}
