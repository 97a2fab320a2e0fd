//! Frame codec hot paths: decoding masked client frames in place, encoding server frames.

use std::hint::black_box;

use arcgate::protocol::codec::{self, Decoder, Flow, FrameBuf, Message, OP_TEXT};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const MAX_MESSAGE: usize = 1 << 20;

/// A heartbeat message of 120 bytes.
const HEARTBEAT: &[u8] = br#"{"event":"heartbeat","data":{"machineId":"mch_8f3a2c9d","timestamp":1700000000,"cpu":12.5,"memory":48.1,"uptime":86400}}"#;

/// Decodes `buf` (unmasking it), returning the number of text bytes delivered.
fn decode_all(decoder: &mut Decoder, buf: &mut [u8]) -> usize {
    let mut seen = 0;
    let result = decoder.decode(buf, |m| {
        if let Message::Text(t) = m {
            seen += black_box(t).len();
        }
        Flow::Continue
    });
    assert!(result.is_ok());
    seen
}

/// Decoding unmasks in place: each iteration first copies a pristine (masked) input into
/// a reused buffer. The `copy only` rows measure that copy alone, to subtract.
fn decode(c: &mut Criterion) {
    assert_eq!(HEARTBEAT.len(), 120);
    let one = codec::client_frame(true, OP_TEXT, HEARTBEAT, MASK);
    let hundred: Vec<u8> = one.repeat(100);
    let mut g = c.benchmark_group("frame decode");
    for (name, pristine, frames) in [("1 frame", &one, 1usize), ("100 frames", &hundred, 100)] {
        g.throughput(Throughput::Elements(frames as u64));
        let mut buf = pristine.clone();
        let mut decoder = Decoder::new(MAX_MESSAGE);
        g.bench_function(format!("{name} (copy + decode)"), |b| {
            b.iter(|| {
                buf.copy_from_slice(pristine);
                let seen = decode_all(&mut decoder, black_box(&mut buf));
                debug_assert_eq!(seen, HEARTBEAT.len() * frames);
                seen
            })
        });
        g.bench_function(format!("{name} (copy only)"), |b| {
            b.iter(|| {
                buf.copy_from_slice(pristine);
                black_box(&mut buf);
            })
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame encode");
    for size in [120usize, 1024] {
        let payload = vec![b'a'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("frame {size} B"), |b| {
            b.iter(|| codec::frame(OP_TEXT, black_box(&payload)))
        });
        g.bench_function(format!("FrameBuf {size} B"), |b| {
            b.iter(|| {
                let mut f = FrameBuf::with_capacity(size);
                f.payload().extend_from_slice(black_box(&payload));
                f.finish(OP_TEXT)
            })
        });
    }
    // Reference point: what masking alone costs (the decoder does it for every byte).
    let mut block = vec![0u8; 1024];
    g.throughput(Throughput::Bytes(1024));
    g.bench_function("apply_mask 1024 B", |b| {
        b.iter(|| codec::apply_mask(black_box(&mut block), MASK))
    });
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
