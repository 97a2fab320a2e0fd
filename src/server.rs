//! `arcgate serve`: binds the listeners, starts one pinned worker per core on the chosen
//! io backend, the admin listener and the signal handling, and waits for the drain.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, Context};

use crate::auth::Verifier;
use crate::config::{Config, IoMode};
use crate::hub::{Hub, Shared};
use crate::io::{epoll::EpollLoop, listener, uring, Backend, Conns, Notifier};
use crate::protocol::handshake::Policy;
use crate::protocol::session::{Limits, AGENT_PATH, CLIENT_PATH};
use crate::worker::{Admission, Env, Lifecycle, Worker};

/// Descriptors kept free for the process itself (listeners, rings, logs, admin).
const FD_RESERVE: usize = 128;

/// The session limits a configuration implies.
pub fn limits(config: &Config) -> Limits {
    Limits {
        policy: Policy {
            paths: vec![AGENT_PATH.to_string(), CLIENT_PATH.to_string()],
            allowed_origins: config.allowed_origins.clone(),
            max_header_bytes: config.max_header_bytes,
        },
        handshake_timeout: config.handshake_timeout,
        auth_timeout: config.auth_timeout,
        ping_interval: config.ping_interval,
        pong_timeout: config.pong_timeout,
        agent_lease: config.agent_lease,
        token_expiry_warning: config.token_expiry_warning,
        jwt_leeway: config.jwt_leeway,
        rate_limit: config.rate_limit,
        rate_burst: config.rate_burst,
        rate_limit_close_after: config.rate_limit_close_after,
        max_message_size: config.max_message_size,
    }
}

/// Raises the soft open-files limit to the hard one and returns it.
fn raise_nofile_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a live struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur as usize
}

/// io_uring if asked for or available, epoll otherwise.
fn choose_backend(mode: IoMode) -> anyhow::Result<Backend> {
    match mode {
        IoMode::Epoll => Ok(Backend::Epoll),
        IoMode::Uring => {
            uring::probe().context("io_uring was requested (--io uring) but cannot be set up")?;
            Ok(Backend::Uring)
        }
        IoMode::Auto => match uring::probe() {
            Ok(()) => Ok(Backend::Uring),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring cannot be set up here (kernel.io_uring_disabled or a seccomp filter?); falling back to epoll");
                Ok(Backend::Epoll)
            }
        },
    }
}

fn pin_to_core(index: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(index % cores, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Listens on `config.listen` with one socket per worker, all on the same port.
fn bind_listeners(config: &Config) -> anyhow::Result<Vec<TcpListener>> {
    let first = listener::bind_reuseport(config.listen)
        .with_context(|| format!("cannot listen on {} (is the port in use?)", config.listen))?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..config.workers {
        all.push(
            listener::bind_reuseport(addr).with_context(|| format!("cannot listen on {addr}"))?,
        );
    }
    Ok(all)
}

/// Watches SIGTERM/SIGINT: the first starts the drain, a second exits at once.
fn spawn_signal_thread(env: Arc<Env>, shared: Arc<Shared>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new().name("arcgate-signals".into()).spawn(move || {
        for signal in signals.forever() {
            if env.lifecycle.draining.swap(true, Ordering::SeqCst) {
                tracing::warn!(signal, "second signal: exiting now");
                std::process::exit(1);
            }
            tracing::info!(signal, drain = ?env.drain_duration, "draining: closing connections with 1012");
            for inbox in &shared.inboxes {
                inbox.notifier.notify();
            }
        }
    })?;
    Ok(())
}

/// Runs the gateway until it has drained after SIGTERM/SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    // A peer that vanished must not kill the process on write.
    // SAFETY: ignoring SIGPIPE is process-wide and always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let nofile = raise_nofile_limit();
    let key = config
        .key
        .clone()
        .ok_or_else(|| anyhow!("no JWT key configured"))?;
    let verifier = Verifier::new(
        &key,
        config.jwt_issuer.as_deref(),
        config.jwt_audience.as_deref(),
        config.jwt_leeway,
    )
    .map_err(|e| anyhow!("invalid JWT key: {e}"))?;
    let backend = choose_backend(config.io)?;
    let workers = config.workers.max(1);
    let per_worker = nofile.saturating_sub(FD_RESERVE).max(1);
    let max_connections = config.max_connections.unwrap_or(match backend {
        // Direct descriptors: each ring's table may hold up to the open-files limit.
        Backend::Uring => per_worker * workers,
        Backend::Epoll => per_worker,
    });

    let listeners = bind_listeners(&config)?;
    let local = listeners[0].local_addr()?;
    let admin = TcpListener::bind(config.admin_listen)
        .with_context(|| format!("cannot listen on {} for the admin API", config.admin_listen))?;

    let env = Arc::new(Env {
        limits: limits(&config),
        verifier,
        admission: Admission::new(max_connections, config.max_connection_rate),
        lifecycle: Lifecycle::default(),
        drain_duration: config.drain_duration,
        max_pending_handshakes: config.max_pending_handshakes,
    });
    let notifiers = (0..workers)
        .map(|_| Notifier::new().map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let shared = Arc::new(Shared::new(notifiers.clone()));

    crate::admin::spawn(admin, env.clone())?;
    spawn_signal_thread(env.clone(), shared.clone())?;

    let mut threads = Vec::new();
    for (index, listener) in listeners.into_iter().enumerate() {
        let env = env.clone();
        let hub = Hub::new(index as u16, shared.clone(), config.command_timeout);
        let notifier = notifiers[index].clone();
        let max_outbound = config.max_outbound_bytes;
        let thread = std::thread::Builder::new()
            .name(format!("arcgate-w{index}"))
            .stack_size(8 << 20)
            .spawn(move || -> anyhow::Result<()> {
                pin_to_core(index);
                let mut worker = Worker::new(env, hub);
                let mut conns = Conns::new(max_outbound);
                match backend {
                    Backend::Uring => uring::UringLoop::new(listener, notifier, per_worker as u32)?
                        .run(&mut conns, &mut worker)?,
                    Backend::Epoll => {
                        EpollLoop::new(listener, notifier)?.run(&mut conns, &mut worker)?
                    }
                }
                Ok(())
            })?;
        threads.push(thread);
    }
    tracing::info!(
        listen = %local,
        admin = %config.admin_listen,
        backend = backend.as_str(),
        workers,
        max_connections,
        "arcgate is listening"
    );
    for t in threads {
        match t.join() {
            Ok(r) => r?,
            Err(_) => return Err(anyhow!("a worker thread panicked")),
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}
