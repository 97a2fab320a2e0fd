//! Fan-out of one encoded event to 10,000 local connections: queueing the shared frame on
//! each connection, then draining the queues as a flush does once the sockets took it.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arcgate::auth::{Identity, Role};
use arcgate::hub::{Hub, Shared};
use arcgate::io::conns::Queued;
use arcgate::io::{ConnId, Conns, Notifier};
use arcgate::protocol::envelope;
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
            debug_assert_eq!(queued, Queued::Ok);
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

/// The whole routing path: `Hub::relay` encodes once and queues on every subscriber.
fn hub(c: &mut Criterion) {
    let notifier = Arc::new(Notifier::new().expect("eventfd"));
    let shared = Arc::new(Shared::new(vec![notifier]));
    let mut hub = Hub::new(0, shared, Duration::from_secs(30));
    let mut table = Table::new();
    let who = user("clu_abc");
    for &id in &table.ids {
        hub.online(&mut table.conns, id, &who, "", TS);
    }
    hub.relay(
        &mut table.conns,
        "server:updated",
        "mch_123",
        "clu_abc",
        DATA,
        false,
        TS,
    );
    assert!(table.drain() > RECIPIENTS * DATA.len());

    let mut g = c.benchmark_group("fanout 10k");
    g.throughput(Throughput::Elements(RECIPIENTS as u64));
    g.bench_function("Hub::relay (encode + queue)", |b| {
        b.iter_custom(|iters| {
            timed_part(
                iters,
                &mut table,
                |t| {
                    hub.relay(
                        &mut t.conns,
                        "server:updated",
                        "mch_123",
                        "clu_abc",
                        DATA,
                        false,
                        TS,
                    )
                },
                |t| {
                    t.drain();
                },
            )
        })
    });
    g.finish();
    assert!(hub.overflowed.is_empty());
}

criterion_group!(benches, conns, hub);
criterion_main!(benches);
