//! The bus thread: a current-thread tokio runtime running the `async-nats` client, the link's queue, subscriptions and heartbeats.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use super::peers::{PeerEvent, Peers};
use super::subjects::Subjects;
use super::{BusConfig, BusState, Deliver, Inbound, Link, Outbound, HEARTBEAT};

/// Time given to the last flush on stop.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// Longest pause between reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// The thread's body: reports on `ready` whether the client could be set up, then serves
/// the link until it is stopped.
pub(super) fn run(
    config: BusConfig,
    link: Arc<Link>,
    deliver: Arc<dyn Deliver>,
    ready: mpsc::Sender<anyhow::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(anyhow::Error::new(e).context("bus runtime")));
            return;
        }
    };
    runtime.block_on(async move {
        let client = match connect(&config, &link).await {
            Ok(client) => client,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        Node::new(config, link, deliver, client).serve().await;
    });
}

/// The client, connecting in the background and reconnecting forever; its events drive
/// the link's state.
async fn connect(config: &BusConfig, link: &Arc<Link>) -> anyhow::Result<Client> {
    let servers = config
        .urls
        .split(',')
        .map(|url| url.trim().parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("nats_url {:?}", config.urls))?;
    let events = link.clone();
    let mut options = ConnectOptions::new()
        .name(format!("arcgate {}", config.node_name))
        // A node's own events already reached its local receivers.
        .no_echo()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            let ms = 50u64.saturating_mul(1 << attempts.min(6));
            Duration::from_millis(ms).min(MAX_RECONNECT_DELAY)
        })
        .event_callback(move |event| {
            let link = events.clone();
            async move { on_event(&link, event) }
        });
    if let Some(creds) = &config.creds {
        options = options
            .credentials_file(creds)
            .await
            .with_context(|| format!("nats_creds {}", creds.display()))?;
    }
    if let Some(ca) = &config.tls_ca {
        std::fs::metadata(ca).with_context(|| format!("nats_tls_ca {}", ca.display()))?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    options
        .connect(servers)
        .await
        .context("cannot set up the NATS client")
}

fn on_event(link: &Link, event: Event) {
    match event {
        Event::Connected => {
            link.connects.fetch_add(1, Ordering::Relaxed);
            link.set_state(BusState::Up);
            tracing::info!(node = %link.node_name, "bus up: connected to NATS");
        }
        Event::Disconnected | Event::Closed => {
            link.set_state(BusState::Down);
            tracing::warn!(node = %link.node_name, "bus down: NATS connection lost; reconnecting");
        }
        other => tracing::warn!(node = %link.node_name, event = %other, "bus"),
    }
}

/// What the bus thread holds.
struct Node {
    config: BusConfig,
    link: Arc<Link>,
    deliver: Arc<dyn Deliver>,
    client: Client,
    subjects: Subjects,
    /// Cluster → (local receivers, the task reading its subscription).
    interest: HashMap<Box<str>, (usize, JoinHandle<()>)>,
    peers: Arc<Mutex<Peers>>,
}

impl Node {
    fn new(config: BusConfig, link: Arc<Link>, deliver: Arc<dyn Deliver>, client: Client) -> Node {
        Node {
            subjects: Subjects::new(&config.cluster_name),
            peers: Arc::new(Mutex::new(Peers::new(config.node_timeout))),
            config,
            link,
            deliver,
            client,
            interest: HashMap::new(),
        }
    }

    async fn serve(mut self) {
        let heartbeats = self.listen_to_peers().await;
        let mut beat = tokio::time::interval(HEARTBEAT);
        // Expiry is checked 4 times per timeout, so a dead peer is reported at most a
        // quarter late.
        let mut expiry =
            tokio::time::interval((self.config.node_timeout / 4).max(Duration::from_millis(10)));
        let link = self.link.clone();
        while !link.stopping.load(Ordering::Acquire) {
            tokio::select! {
                _ = link.wake.notified() => self.drain().await,
                _ = beat.tick() => self.heartbeat().await,
                _ = expiry.tick() => self.expire(),
            }
        }
        self.drain().await;
        let _ = tokio::time::timeout(FINAL_FLUSH, self.client.flush()).await;
        heartbeats.abort();
        for (_, (_, task)) in self.interest.drain() {
            task.abort();
        }
    }

    /// Everything the workers queued, in order.
    async fn drain(&mut self) {
        while let Some(msg) = self.link.pop() {
            match msg {
                Outbound::Publish { cluster, bytes } => self.publish(&cluster, bytes).await,
                Outbound::Subscribe(cluster) => self.subscribe(cluster).await,
                Outbound::Unsubscribe(cluster) => self.unsubscribe(&cluster),
            }
        }
    }

    async fn publish(&self, cluster: &str, bytes: Bytes) {
        // Lost with the connection since it was queued: counted, not retried.
        if self.link.state() != BusState::Up {
            self.link.dropped_down.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self
            .client
            .publish(self.subjects.events(cluster), bytes)
            .await
        {
            Ok(()) => self.link.published.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.link.dropped_down.fetch_add(1, Ordering::Relaxed),
        };
    }

    async fn subscribe(&mut self, cluster: Box<str>) {
        if let Some((count, _)) = self.interest.get_mut(&cluster) {
            *count += 1;
            return;
        }
        let subject = self.subjects.events(&cluster);
        let mut sub = match self.client.subscribe(subject.clone()).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::error!(%subject, error = %e, "bus: cannot subscribe");
                return;
            }
        };
        let (link, deliver, name) = (self.link.clone(), self.deliver.clone(), cluster.clone());
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                link.received.fetch_add(1, Ordering::Relaxed);
                deliver.deliver(Inbound::Event {
                    cluster: name.clone(),
                    bytes: msg.payload,
                });
            }
        });
        self.interest.insert(cluster, (1, task));
    }

    fn unsubscribe(&mut self, cluster: &str) {
        let Some((count, _)) = self.interest.get_mut(cluster) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            // Dropping the subscriber (with its task) unsubscribes at the broker.
            if let Some((_, task)) = self.interest.remove(cluster) {
                task.abort();
            }
        }
    }

    /// Reads every node's heartbeats into the peer table (its own are skipped).
    async fn listen_to_peers(&self) -> JoinHandle<()> {
        let subject = self.subjects.heartbeats();
        let sub = self.client.subscribe(subject.clone()).await;
        let (subjects, me) = (self.subjects.clone(), self.config.node_name.clone());
        let (link, deliver, peers) = (self.link.clone(), self.deliver.clone(), self.peers.clone());
        tokio::spawn(async move {
            let mut sub = match sub {
                Ok(sub) => sub,
                Err(e) => {
                    tracing::error!(%subject, error = %e, "bus: cannot hear the other nodes");
                    return;
                }
            };
            while let Some(msg) = sub.next().await {
                let Some(node) = subjects.node_of(&msg.subject).filter(|n| *n != me) else {
                    continue;
                };
                let mut table = peers.lock().unwrap_or_else(|e| e.into_inner());
                let event = table.seen(node, Instant::now());
                link.peers.store(table.len() as u64, Ordering::Relaxed);
                drop(table);
                if let Some(event) = event {
                    report(&deliver, event);
                }
            }
        })
    }

    async fn heartbeat(&self) {
        if self.link.state() != BusState::Up {
            return;
        }
        let subject = self.subjects.heartbeat(&self.config.node_name);
        let _ = self.client.publish(subject, Bytes::new()).await;
    }

    fn expire(&self) {
        let mut table = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let dead = table.expire(Instant::now());
        self.link.peers.store(table.len() as u64, Ordering::Relaxed);
        drop(table);
        for event in dead {
            report(&self.deliver, event);
        }
    }
}

/// Logs a peer's change and hands it on.
fn report(deliver: &Arc<dyn Deliver>, event: PeerEvent) {
    match &event {
        PeerEvent::Up(node) => tracing::info!(peer = %node, "bus: peer node up"),
        PeerEvent::Dead(node) => {
            tracing::warn!(peer = %node, "bus: peer node dead (no heartbeat within node_timeout)")
        }
    }
    deliver.deliver(Inbound::Peer(event));
}
