//! The admin listener (docs/protocol.md section 15): health, readiness, metrics and the
//! backend API. A thread per connection, at most `MAX_CONNECTIONS` at once, so that a
//! command waiting for its agent never holds up `/healthz` or `/metrics`.

pub(crate) mod api;
pub mod http;
mod sampler;
mod status;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::hub::Shared;
use crate::worker::Env;
use http::{Incoming, Reader, Response};

/// Admin connections served at once; more get `503` straight away.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a kept-alive connection may wait for its next request.
const IDLE: Duration = Duration::from_secs(15);
/// Requests served on one connection before it is closed.
const MAX_REQUESTS: usize = 1000;

/// What the admin threads share.
pub struct Admin {
    pub env: Arc<Env>,
    pub shared: Arc<Shared>,
    pub backend: &'static str,
    /// Unix seconds the process started.
    pub started: f64,
    connections: AtomicUsize,
    /// Requests between their head and the end of their answer.
    busy: AtomicUsize,
    /// The last minutes of per-second counter readings (status page).
    samples: Mutex<sampler::Samples>,
}

impl Admin {
    pub fn new(env: Arc<Env>, shared: Arc<Shared>, backend: &'static str, started: f64) -> Admin {
        Admin {
            env,
            shared,
            backend,
            started,
            connections: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            samples: Mutex::new(sampler::Samples::default()),
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Waits up to `within` for the requests being answered to finish.
    pub fn wait_idle(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.busy.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The readings; a reader that panicked left them whole (pushes cannot half-happen).
    fn samples(&self) -> MutexGuard<'_, sampler::Samples> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn started(&self) -> bool {
        self.env.lifecycle.started.load(Ordering::Relaxed)
    }

    fn draining(&self) -> bool {
        self.env.lifecycle.draining.load(Ordering::Relaxed)
    }
}

/// Decrements a counter when dropped.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves admin requests on `listener` until the process exits.
pub fn spawn(listener: TcpListener, admin: Arc<Admin>) -> std::io::Result<()> {
    status::spawn_sampler(admin.clone())?;
    std::thread::Builder::new()
        .name("arcgate-admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => accept(stream, &admin),
                    Err(e) => {
                        tracing::debug!(error = %e, "admin accept failed");
                        // Out of descriptors: do not spin.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    Ok(())
}

fn accept(mut stream: TcpStream, admin: &Arc<Admin>) {
    let n = admin.connections.fetch_add(1, Ordering::AcqRel);
    if n >= MAX_CONNECTIONS {
        admin.connections.fetch_sub(1, Ordering::AcqRel);
        let busy = Response::error(503, "too many admin connections; retry shortly")
            .with_header("Retry-After", "1");
        let _ = http::write(&mut stream, &busy, false, false);
        return;
    }
    let admin = admin.clone();
    let spawned = std::thread::Builder::new()
        .name("arcgate-admin-conn".into())
        .spawn(move || {
            let _held = Held(&admin.connections);
            if let Err(e) = serve(stream, &admin) {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start an admin connection thread");
    }
}

/// Answers requests on one connection until it closes, is idle too long, or asks to close.
fn serve(mut stream: TcpStream, admin: &Admin) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut reader = Reader::new();
    for _ in 0..MAX_REQUESTS {
        let request = match reader.next(&mut stream, IDLE)? {
            Incoming::Closed => return Ok(()),
            Incoming::Invalid(response) => {
                return http::write(&mut stream, &response, false, false);
            }
            Incoming::Request(r) => r,
        };
        admin.busy.fetch_add(1, Ordering::AcqRel);
        let _busy = Held(&admin.busy);
        let response = api::route(admin, &request);
        // While draining, answers close their connection so that the process can exit.
        let keep_alive = request.keep_alive && !admin.draining();
        let head_only = request.method == "HEAD";
        http::write(&mut stream, &response, keep_alive, head_only)?;
        if !keep_alive {
            return Ok(());
        }
    }
    Ok(())
}
