//! Fan-out of one encoded event to 10,000 local connections: queueing the shared frame on
//! each connection, then draining the queues as a flush does once the sockets took it.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arcgate::auth::{Identity, Role};
use arcgate::hub::{Action, Hub, Shared, Sink};
use arcgate::io::{ConnId, Conns};
use arcgate::protocol::envelope::{self, RelayKind};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECIPIENTS: usize = 10_000;
const MAX_IOVECS: usize = 64;
const DATA: &str = r#"{"serverId":"srv_xyz","status":"running","players":12,"maxPlayers":64}"#;
const TS: u64 = 1_700_000_000_123;

/// A connection table with `RECIPIENTS` open connections, and a reusable drain state.
struct Table {
    conns: Conns,
    ids: Vec<ConnId>,
    dirty: Vec<u32>,
    iov: Vec<libc::iovec>,
}

impl Table {
    fn new() -> Table {
        let mut conns = Conns::new(usize::MAX);
        let ids = (0..RECIPIENTS).map(|_| conns.insert_for_bench()).collect();
        Table {
            conns,
            ids,
            dirty: Vec::with_capacity(RECIPIENTS),
            iov: Vec::with_capacity(MAX_IOVECS),
        }
    }

    fn send_all(&mut self, frame: &Bytes) {
        for &id in &self.ids {
            let queued = self.conns.send(id, frame.clone());
            debug_assert!(queued);
            black_box(queued);
        }
    }

    fn drain(&mut self) -> usize {
        self.conns
            .drain_for_bench(&mut self.dirty, &mut self.iov, MAX_IOVECS)
    }
}

/// Times `timed` only; `untimed` runs after it in each iteration.
fn timed_part(
    iters: u64,
    table: &mut Table,
    mut timed: impl FnMut(&mut Table),
    mut untimed: impl FnMut(&mut Table),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        timed(table);
        total += start.elapsed();
        untimed(table);
    }
    total
}

fn conns(c: &mut Criterion) {
    let frame = envelope::relay("server:updated", "mch_123", "clu_abc", DATA, TS);
    let mut table = Table::new();
    // Every queue is drained back to empty: the table must end each round idle.
    table.send_all(&frame);
    assert_eq!(table.drain(), RECIPIENTS * frame.len());

    let mut g = c.benchmark_group("fanout 10k");
    g.throughput(Throughput::Elements(RECIPIENTS as u64));
    g.bench_function("Conns::send to idle queues", |b| {
        b.iter_custom(|iters| {
            timed_part(
                iters,
                &mut table,
                |t| t.send_all(&frame),
                |t| {
                    t.drain();
                },
            )
        })
    });
    g.bench_function("drain (iovecs + advance)", |b| {
        b.iter_custom(|iters| {
            timed_part(
                iters,
                &mut table,
                |t| {
                    black_box(t.drain());
                },
                |t| t.send_all(&frame),
            )
        })
    });
    // A queue that already holds a frame has its buffer: no allocation on this push.
    g.bench_function("Conns::send to queues holding one frame", |b| {
        b.iter_custom(|iters| {
            timed_part(
                iters,
                &mut table,
                |t| t.send_all(&frame),
                |t| {
                    t.drain();
                    t.send_all(&frame);
                },
            )
        })
    });
    table.drain();
    g.bench_function("send + drain", |b| {
        b.iter(|| {
            table.send_all(&frame);
            table.drain()
        })
    });
    g.finish();
}

fn user(cluster: &str) -> Identity {
    Identity {
        role: Role::User,
        sub: "usr_1".into(),
        cluster: None,
        clusters: vec![cluster.into()],
        perms: None,
        exp: u64::MAX,
        iat: None,
    }
}

/// Queues the hub's frames on the table, as a worker does.
struct Queue<'a>(&'a mut Conns);

impl Sink for Queue<'_> {
    fn act(&mut self, action: Action<'_>) {
        match action {
            Action::Deliver { to, frame } => {
                for &id in to {
                    black_box(self.0.send(id, frame.clone()));
                }
            }
            Action::Send { conn, frame } => {
                self.0.send(conn, frame);
            }
            _ => {}
        }
    }
}

/// The whole routing path: `Hub::relay` encodes once and queues on every subscriber.
fn hub(c: &mut Criterion) {
    let shared = Arc::new(Shared::new(1));
    let mut hub = Hub::new(0, shared, Duration::from_secs(30));
    let mut table = Table::new();
    let who = user("clu_abc");
    for &id in &table.ids {
        hub.online(id, &who, "", TS, &mut Queue(&mut table.conns));
    }
    let kind = RelayKind::ServerStatus {
        server_id: "srv_xyz".into(),
    };
    let relay = |hub: &mut Hub, conns: &mut Conns| {
        let out = &mut Queue(conns);
        hub.relay(&kind, "mch_123", "clu_abc", DATA, 1, TS, out)
    };
    relay(&mut hub, &mut table.conns);
    assert!(table.drain() > RECIPIENTS * DATA.len());

    let mut g = c.benchmark_group("fanout 10k");
    g.throughput(Throughput::Elements(RECIPIENTS as u64));
    g.bench_function("Hub::relay (encode + queue)", |b| {
        b.iter_custom(|iters| {
            timed_part(
                iters,
                &mut table,
                |t| relay(&mut hub, &mut t.conns),
                |t| {
                    t.drain();
                },
            )
        })
    });
    g.finish();
    assert_eq!(table.conns.pop_overflowed(), None);
}

criterion_group!(benches, conns, hub);
criterion_main!(benches);
