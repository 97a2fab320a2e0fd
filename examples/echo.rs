//! An echo server on arcgate's io loop and WebSocket codec, without auth or routing:
//! the target of the Autobahn|Testsuite conformance run.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;

use arcgate::io::{self, listener, Backend, ConnId, Conns, Handler, Notifier};
use arcgate::protocol::codec::{self, Decoder, Flow, Message};
use arcgate::protocol::handshake::{self, Outcome, Policy};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value = "uring", value_parser = ["uring", "epoll"])]
    io: String,
}

/// Autobahn sends messages of up to 16 MiB.
const MAX_MESSAGE: usize = 64 << 20;

enum Conn {
    Handshake(Vec<u8>),
    Open(Decoder),
}

struct Echo {
    policy: Policy,
    conns: Vec<Option<(ConnId, Conn)>>,
}

impl Echo {
    fn websocket(
        conns: &mut Conns,
        id: ConnId,
        decoder: &mut Decoder,
        data: &mut [u8],
        now: Instant,
    ) {
        let mut closed = false;
        let result = decoder.decode(data, |m| {
            let reply = match m {
                Message::Text(t) => codec::frame(codec::OP_TEXT, t.as_bytes()),
                Message::Binary(b) => codec::frame(codec::OP_BINARY, b),
                Message::Ping(p) => codec::frame(codec::OP_PONG, p),
                Message::Pong(_) => return Flow::Continue,
                Message::Close(code, _) => {
                    closed = true;
                    conns.send(id, codec::close_frame(code.unwrap_or(1000), ""));
                    return Flow::Stop;
                }
            };
            conns.send(id, reply);
            Flow::Continue
        });
        if let Err(reason) = result {
            conns.send(id, codec::close_frame(reason.code(), ""));
            closed = true;
        }
        if closed {
            conns.close(id, now);
        }
    }
}

impl Handler for Echo {
    fn on_accept(&mut self, _: &mut Conns, id: ConnId, _: Instant) {
        let slot = id.slot as usize;
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        self.conns[slot] = Some((id, Conn::Handshake(Vec::new())));
    }

    fn on_data(&mut self, conns: &mut Conns, id: ConnId, data: &mut [u8], now: Instant) {
        let Some(Some((cid, conn))) = self.conns.get_mut(id.slot as usize) else {
            return;
        };
        if *cid != id {
            return;
        }
        match conn {
            Conn::Open(decoder) => Echo::websocket(conns, id, decoder, data, now),
            Conn::Handshake(head) => {
                head.extend_from_slice(data);
                match handshake::parse(head, &self.policy) {
                    Outcome::Partial => {}
                    Outcome::Reject { response, .. } => {
                        conns.send(id, response);
                        conns.close(id, now);
                    }
                    Outcome::Upgrade {
                        response, consumed, ..
                    } => {
                        conns.send(id, response);
                        let mut rest = head.split_off(consumed);
                        let mut decoder = Decoder::new(MAX_MESSAGE);
                        Echo::websocket(conns, id, &mut decoder, &mut rest, now);
                        *conn = Conn::Open(decoder);
                    }
                }
            }
        }
    }

    fn on_close(&mut self, _: &mut Conns, id: ConnId, _: Instant) {
        if let Some(slot) = self.conns.get_mut(id.slot as usize) {
            *slot = None;
        }
    }

    fn on_wake(&mut self, _: &mut Conns, _: Instant) {}
    fn on_tick(&mut self, _: &mut Conns, _: Instant) {}

    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    fn accepting(&self) -> bool {
        true
    }

    fn finished(&self, _: &Conns) -> bool {
        false
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: ignoring SIGPIPE is process-wide and always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let listener = listener::bind_reuseport(args.listen)?;
    let notifier = Arc::new(Notifier::new()?);
    let mut echo = Echo {
        policy: Policy {
            paths: vec!["/".into()],
            allowed_origins: None,
            max_header_bytes: 8192,
        },
        conns: Vec::new(),
    };
    let mut conns = Conns::new(usize::MAX);
    eprintln!("echo listening on {} ({})", args.listen, args.io);
    let backend = match args.io.as_str() {
        "epoll" => Backend::Epoll,
        _ => Backend::Uring,
    };
    io::run(
        backend,
        listener,
        notifier,
        1024,
        &mut conns,
        &mut echo,
        || {},
    )?;
    Ok(())
}
