//! This machine's floor for fan-out over loopback TCP, with no gateway at all: what one
//! small `write` costs its sender in CPU, and how long a burst of one frame to each of N
//! sockets takes until a single reader has read them all. The sender threads stand for
//! the gateway's workers, the reader for the load generator.
//!   cargo run --release --example loopback_floor -- --sockets 1000 --rate 30

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use mio::{Events, Interest, Poll, Token};

#[derive(Parser)]
struct Args {
    /// Receiving sockets (dashboards)
    #[arg(long, default_value_t = 1000)]
    sockets: usize,
    /// Sending threads, each writing to its share of the sockets
    #[arg(long, default_value_t = 2)]
    senders: usize,
    /// Bursts per second
    #[arg(long, default_value_t = 30.0)]
    rate: f64,
    /// Bursts in all
    #[arg(long, default_value_t = 300)]
    bursts: usize,
    /// Bytes per frame (a relayed `server:status` is about 200)
    #[arg(long, default_value_t = 200)]
    frame: usize,
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..args.sockets {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        readers.push(mio::net::TcpStream::from_std(client));
        writers.push(server);
    }

    // The reader reports when each burst has been read whole.
    let (done_tx, done_rx) = mpsc::channel::<Instant>();
    let per_burst = args.sockets * args.frame;
    let bursts = args.bursts;
    let reader = thread::spawn(move || -> std::io::Result<Duration> {
        let start = thread_cpu();
        let mut poll = Poll::new()?;
        for (i, s) in readers.iter_mut().enumerate() {
            poll.registry().register(s, Token(i), Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        let mut reported = 0;
        while reported < bursts {
            poll.poll(&mut events, None)?;
            for ev in &events {
                loop {
                    match readers[ev.token().0].read(&mut buf) {
                        Ok(0) => return Ok(thread_cpu() - start),
                        Ok(n) => got += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            while got >= per_burst {
                got -= per_burst;
                reported += 1;
                let _ = done_tx.send(Instant::now());
            }
        }
        Ok(thread_cpu() - start)
    });

    // Each sender writes one frame to each of its sockets when the burst starts.
    let frame = vec![b'x'; args.frame];
    let share = args.sockets.div_ceil(args.senders.max(1)).max(1);
    let mut go = Vec::new();
    let mut senders = Vec::new();
    let mut writers = writers.into_iter();
    loop {
        let mut socks: Vec<TcpStream> = writers.by_ref().take(share).collect();
        if socks.is_empty() {
            break;
        }
        let (tx, rx) = mpsc::channel::<()>();
        go.push(tx);
        let frame = frame.clone();
        senders.push(thread::spawn(move || -> std::io::Result<Duration> {
            let mut cpu = Duration::ZERO;
            while rx.recv().is_ok() {
                let t = thread_cpu();
                for s in &mut socks {
                    s.write_all(&frame)?;
                }
                cpu += thread_cpu() - t;
            }
            Ok(cpu)
        }));
    }

    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let mut latencies = Vec::with_capacity(args.bursts);
    for _ in 0..args.bursts {
        let t0 = Instant::now();
        for tx in &go {
            let _ = tx.send(());
        }
        let last = done_rx.recv().expect("the reader reports each burst");
        latencies.push(last - t0);
        if let Some(rest) = period.checked_sub(t0.elapsed()) {
            thread::sleep(rest);
        }
    }
    drop(go);
    let send_cpu: Duration = senders
        .into_iter()
        .map(|h| h.join().expect("sender thread"))
        .sum::<std::io::Result<Duration>>()?;
    let read_cpu = reader.join().expect("reader thread")?;

    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let sends = (args.bursts * args.sockets) as f64;
    println!(
        "{} bursts of {} x {} B over {} sender thread(s), {}/s",
        args.bursts, args.sockets, args.frame, args.senders, args.rate
    );
    println!(
        "sender cpu per write   {:.2} µs",
        send_cpu.as_secs_f64() * 1e6 / sends
    );
    println!(
        "reader cpu per frame   {:.2} µs",
        read_cpu.as_secs_f64() * 1e6 / sends
    );
    println!(
        "burst start -> last frame read: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    );
    Ok(())
}
