//! The bus: one thread per node linking it to the other nodes over NATS, bridged to the workers by lock-free queues.
//!
//! Workers (never blocked, never async) push `Outbound` into the link's bounded queue and
//! wake the bus thread; the bus thread runs a small current-thread tokio runtime with
//! `async-nats` (client.rs) and hands `Inbound` to a `Deliver` (the workers' inboxes).

mod client;
pub mod peers;
pub mod subjects;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::SegQueue;

use crate::config::Config;
pub use peers::PeerEvent;

/// Publishes waiting for the bus thread, at most; more are dropped and counted.
pub const QUEUE_BOUND: usize = 65_536;
/// Interval of this node's heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How to reach the bus, from the `nats_*`, `cluster_name`, `node_name` and `node_timeout` settings.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// One or more server URLs, separated by commas.
    pub urls: String,
    pub cluster_name: String,
    pub node_name: String,
    pub node_timeout: Duration,
    pub creds: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
}

impl BusConfig {
    /// `None` when `nats_url` is unset: the node runs alone.
    pub fn from_config(config: &Config) -> Option<BusConfig> {
        Some(BusConfig {
            urls: config.nats_url.clone()?,
            cluster_name: config.cluster_name.clone(),
            node_name: config.node_name.clone(),
            node_timeout: config.node_timeout,
            creds: config.nats_creds.as_ref().map(PathBuf::from),
            tls_ca: config.nats_tls_ca.as_ref().map(PathBuf::from),
        })
    }
}

/// What a worker asks of the bus.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// An event of cluster `cluster` for the other nodes, encoded once.
    Publish { cluster: Box<str>, bytes: Bytes },
    /// This node has (one more) receiver of cluster `cluster`'s events.
    Subscribe(Box<str>),
    /// One receiver of cluster `cluster`'s events fewer.
    Unsubscribe(Box<str>),
}

/// What the bus hands to the workers.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// An event another node published for cluster `cluster`.
    Event { cluster: Box<str>, bytes: Bytes },
    /// A change in a peer node's liveness.
    Peer(PeerEvent),
}

/// Where the bus thread hands what arrives, one call per message, in arrival order per
/// subject. It must not block (the workers' inboxes: a queue push and a coalesced wake).
pub trait Deliver: Send + Sync + 'static {
    fn deliver(&self, msg: Inbound);
}

/// The connection to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusState {
    /// Not connected yet since the start.
    Connecting = 0,
    Up = 1,
    /// Lost; the client reconnects by itself.
    Down = 2,
}

impl BusState {
    pub const ALL: [BusState; 3] = [BusState::Connecting, BusState::Up, BusState::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            BusState::Connecting => "connecting",
            BusState::Up => "up",
            BusState::Down => "down",
        }
    }

    fn from_u8(v: u8) -> BusState {
        match v {
            1 => BusState::Up,
            2 => BusState::Down,
            _ => BusState::Connecting,
        }
    }
}

/// The bus's numbers at one moment, for /metrics and /v1/status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusSnapshot {
    pub state: BusState,
    pub cluster_name: String,
    pub node_name: String,
    /// Events published to the other nodes.
    pub published: u64,
    /// Events received from the other nodes.
    pub received: u64,
    /// Events not published because the bus was down (counted, not retried).
    pub dropped_down: u64,
    /// Events not published because the queue to the bus thread was full.
    pub dropped_full: u64,
    /// Connections made to the broker (the first and every reconnect).
    pub connects: u64,
    /// Peer nodes alive (a heartbeat within `node_timeout`).
    pub peers: u64,
    /// Messages waiting for the bus thread.
    pub queued: u64,
}

/// The shared end of the bus: workers and the admin thread use it, the bus thread serves it.
#[derive(Debug)]
pub struct Link {
    queue: SegQueue<Outbound>,
    queued: AtomicUsize,
    wake: tokio::sync::Notify,
    /// Set while a wake is on its way, so a batch costs one.
    wake_pending: AtomicBool,
    stopping: AtomicBool,
    state: AtomicU8,
    published: AtomicU64,
    received: AtomicU64,
    dropped_down: AtomicU64,
    dropped_full: AtomicU64,
    connects: AtomicU64,
    peers: AtomicU64,
    cluster_name: String,
    node_name: String,
}

impl Link {
    fn new(config: &BusConfig) -> Link {
        Link {
            queue: SegQueue::new(),
            queued: AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
            wake_pending: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            state: AtomicU8::new(BusState::Connecting as u8),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_down: AtomicU64::new(0),
            dropped_full: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            peers: AtomicU64::new(0),
            cluster_name: config.cluster_name.clone(),
            node_name: config.node_name.clone(),
        }
    }

    /// Queues an event for the other nodes; never blocks. While the bus is down, or with the
    /// queue over its bound, the event is dropped and counted.
    pub fn publish(&self, cluster: &str, bytes: Bytes) {
        if self.state() != BusState::Up {
            self.dropped_down.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.queued.load(Ordering::Relaxed) >= QUEUE_BOUND {
            self.dropped_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.push(Outbound::Publish {
            cluster: cluster.into(),
            bytes,
        });
    }

    /// One more local receiver of `cluster`'s events (interest is never dropped: it is
    /// small and must not be lost).
    pub fn subscribe(&self, cluster: &str) {
        self.push(Outbound::Subscribe(cluster.into()));
    }

    /// One local receiver of `cluster`'s events fewer.
    pub fn unsubscribe(&self, cluster: &str) {
        self.push(Outbound::Unsubscribe(cluster.into()));
    }

    fn push(&self, msg: Outbound) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.queue.push(msg);
        self.wake();
    }

    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// The next message for the bus thread. Clears the wake flag first, so a push after
    /// the queue ran empty wakes it again.
    fn pop(&self) -> Option<Outbound> {
        self.wake_pending.store(false, Ordering::Release);
        let msg = self.queue.pop()?;
        self.queued.fetch_sub(1, Ordering::Relaxed);
        Some(msg)
    }

    fn set_state(&self, state: BusState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub fn state(&self) -> BusState {
        BusState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn snapshot(&self) -> BusSnapshot {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BusSnapshot {
            state: self.state(),
            cluster_name: self.cluster_name.clone(),
            node_name: self.node_name.clone(),
            published: n(&self.published),
            received: n(&self.received),
            dropped_down: n(&self.dropped_down),
            dropped_full: n(&self.dropped_full),
            connects: n(&self.connects),
            peers: n(&self.peers),
            queued: self.queued.load(Ordering::Relaxed) as u64,
        }
    }
}

/// A running bus thread; stopped (after a last flush) by `stop` or on drop.
pub struct Bus {
    link: Arc<Link>,
    thread: Option<JoinHandle<()>>,
}

impl Bus {
    /// Starts the bus thread. It connects in the background (and keeps trying): only a
    /// configuration that cannot work (an unreadable credentials or CA file, a bad URL)
    /// is an error here.
    pub fn start(config: BusConfig, deliver: Arc<dyn Deliver>) -> anyhow::Result<Bus> {
        let link = Arc::new(Link::new(&config));
        let (ready, started) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("arcgate-bus".into())
            .spawn({
                let link = link.clone();
                move || client::run(config, link, deliver, ready)
            })?;
        match started.recv() {
            Ok(Ok(())) => Ok(Bus {
                link,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(anyhow::anyhow!("the bus thread ended at start"))
            }
        }
    }

    /// The shared end, for workers and the admin API.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    pub fn state(&self) -> BusState {
        self.link.state()
    }

    /// Flushes what is queued (briefly) and ends the thread.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.link.stopping.store(true, Ordering::Release);
        self.link.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.shut();
    }
}
