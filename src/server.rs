//! `arcgate serve`: binds the listeners (or takes them from systemd), starts one pinned
//! worker per core on the chosen io backend, the admin listener, the signal handling
//! (drain on SIGTERM/SIGINT, reload on SIGHUP) and the systemd notifications, and waits
//! for the drain.

use std::net::TcpListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use signal_hook::iterator::Signals;

use crate::admin::Admin;
use crate::auth::{Revocations, Verifier};
use crate::bus::{Bus, BusConfig, Deliver, Inbound};
use crate::certs::{self, CertStore};
use crate::config::{Config, IoMode, ServeArgs};
use crate::hub::{Hub, Shared};
use crate::io::{self, listener, tls, uring, Backend, Conns, Notifier};
use crate::protocol::handshake::Policy;
use crate::protocol::session::{Limits, AGENT_PATH, CLIENT_PATH};
use crate::worker::{Admission, Env, Inboxes, Lifecycle, Msg, Settings, Worker};
use crate::{fault, systemd};

/// Descriptors kept free for the process itself (listeners, rings, logs, admin).
const FD_RESERVE: usize = 128;
/// What a worker thread tells the start: its loop is set up, or it ended (and how).
enum WorkerEvent {
    Started(u16),
    Ended {
        worker: u16,
        outcome: Result<(), String>,
    },
}

/// Logs a worker's death; the error ends the process (exit status 1).
fn worker_died(worker: u16, why: &str) -> anyhow::Error {
    tracing::error!(
        worker,
        error = %why,
        "a worker died; exiting so that the service manager restarts the gateway"
    );
    anyhow!("worker {worker} died: {why}")
}

/// The text of a panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "a panic without a message",
    }
}

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

/// io_uring if asked for or available, epoll otherwise. The probe builds the ring the
/// workers will build (`table`: their file-table size), before anything listens.
fn choose_backend(mode: IoMode, table: u32) -> anyhow::Result<Backend> {
    match mode {
        IoMode::Epoll => Ok(Backend::Epoll),
        IoMode::Uring => {
            uring::probe(table).context("io_uring was requested (--io uring)")?;
            Ok(Backend::Uring)
        }
        IoMode::Auto => match uring::probe(table) {
            Ok(()) => Ok(Backend::Uring),
            Err(e) => {
                tracing::warn!(reason = %e, "io_uring cannot be used here; falling back to epoll (in a container, Docker's default seccomp profile blocks io_uring: run with packaging/container/seccomp-io_uring.json; on a host, see kernel.io_uring_disabled)");
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

/// The socket systemd passed, shared by every worker (each accepts from its own copy).
fn shared_listener(socket: TcpListener, workers: usize) -> anyhow::Result<Vec<TcpListener>> {
    // The epoll loop accepts until EAGAIN; io_uring does not mind either way.
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it, as with the sockets arcgate binds (NoDelay= in the
    // socket unit does the same).
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads a live c_int of the given size.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let mut all = Vec::with_capacity(workers);
    for _ in 1..workers {
        all.push(socket.try_clone()?);
    }
    all.insert(0, socket);
    Ok(all)
}

/// The settings a configuration implies; the verifier also refuses revoked tokens.
pub fn settings(config: &Config, revocations: &Arc<Revocations>) -> anyhow::Result<Settings> {
    let key = config
        .key
        .as_ref()
        .ok_or_else(|| anyhow!("no JWT key configured"))?;
    let verifier = Verifier::new(
        key,
        config.jwt_issuer.as_deref(),
        config.jwt_audience.as_deref(),
        config.jwt_leeway,
    )
    .map_err(|e| anyhow!("invalid JWT key: {e}"))?
    .with_revocations(revocations.clone());
    Ok(Settings {
        limits: limits(config),
        verifier,
        command_timeout: config.command_timeout,
        drain_duration: config.drain_duration,
    })
}

/// Where the bus hands what arrives: another node's event goes, as one `Deliver`, to each
/// worker with clients (its hub gives it to the cluster's users there). Peer changes are
/// logged and counted by the bus itself for now.
struct ToWorkers {
    inboxes: Arc<Inboxes>,
    shared: Arc<Shared>,
}

impl Deliver for ToWorkers {
    fn deliver(&self, msg: Inbound) {
        let Inbound::Event { cluster, bytes } = msg else {
            return;
        };
        let cluster: Arc<str> = cluster.into();
        for (w, presence) in self.shared.workers.iter().enumerate() {
            if presence.receives(false) {
                let msg = crate::hub::Msg::Deliver {
                    cluster: cluster.clone(),
                    frame: bytes.clone(),
                    services_only: false,
                    remote: true,
                    // Generations order one node's connections; across nodes, later.
                    stamp: None,
                };
                self.inboxes.post(w as u16, msg);
            }
        }
    }
}

/// What the signal and watchdog threads work with.
struct Control {
    env: Arc<Env>,
    /// The arguments `serve` started with: a reload reads the file they name again.
    args: Option<ServeArgs>,
    /// The configuration in force.
    config: Mutex<Config>,
}

impl Control {
    fn drain(&self, signal: i32) {
        if self.env.lifecycle.draining.swap(true, Ordering::SeqCst) {
            tracing::warn!(signal, "second signal: exiting now");
            std::process::exit(1);
        }
        let drain = self.env.settings().drain_duration;
        tracing::info!(signal, drain = ?drain, "draining: closing connections with 1012");
        systemd::notify("STOPPING=1\nSTATUS=draining");
        self.env.inboxes.wake_all();
    }

    /// SIGHUP: reads the configuration again and applies the keys, limits and log level;
    /// a configuration that does not validate is refused and the running one stays.
    fn reload(&self) {
        if let Some(store) = &self.env.tls {
            store.reload("SIGHUP");
        }
        let Some(args) = &self.args else {
            tracing::warn!("SIGHUP ignored: this gateway was not started from a command line");
            return;
        };
        systemd::notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            systemd::monotonic_usec()
        ));
        match self.try_reload(args) {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(problems) => {
                for problem in problems {
                    tracing::error!(%problem, "configuration reload refused; the running configuration stays");
                }
            }
        }
        systemd::notify("READY=1");
    }

    fn try_reload(&self, args: &ServeArgs) -> Result<(), Vec<String>> {
        let mut config = Config::load(args.clone()).map_err(|e| e.0)?;
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        if config.key.is_none() && config.dev {
            // The generated --dev secret lives as long as the process.
            config.key = current.key.clone();
        }
        let settings =
            settings(&config, &self.env.revocations).map_err(|e| vec![format!("{e:#}")])?;
        crate::logging::set_level(&config.log_level).map_err(|e| vec![e])?;
        for key in restart_only_changes(&current, &config) {
            tracing::warn!(
                key,
                "changed in the configuration; takes effect at the next restart"
            );
        }
        let settings = Arc::new(settings);
        *self.env.settings.write().unwrap_or_else(|e| e.into_inner()) = settings.clone();
        for w in 0..self.env.inboxes.len() {
            self.env
                .inboxes
                .post(w as u16, Msg::Reload(settings.clone()));
        }
        *current = config;
        Ok(())
    }
}

/// The keys that differ between `old` and `new` and are read only at start (the
/// settings table marks them `reload: No`).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    old.restart_only_changes(new)
}

/// Catches the signals from now on; they are acted on once the signal thread runs.
fn catch_signals() -> anyhow::Result<Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    Ok(Signals::new([SIGTERM, SIGINT, SIGHUP])?)
}

/// SIGTERM/SIGINT start the drain (a second one exits at once); SIGHUP reloads.
fn spawn_signal_thread(control: Arc<Control>, mut signals: Signals) -> anyhow::Result<()> {
    use signal_hook::consts::SIGHUP;
    std::thread::Builder::new()
        .name("arcgate-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => control.reload(),
                    _ => control.drain(signal),
                }
            }
        })?;
    Ok(())
}

/// Pings systemd's watchdog at half its interval, but only while every worker's loop
/// keeps turning: a stuck worker stops the pings and systemd restarts the service.
fn spawn_watchdog(shared: Arc<Shared>, interval: Duration) -> anyhow::Result<()> {
    let period = interval / 2;
    // An idle loop turns at least every 500 ms.
    let stale = period.max(Duration::from_secs(1));
    std::thread::Builder::new()
        .name("arcgate-watchdog".into())
        .spawn(move || {
            let mut warned = false;
            loop {
                std::thread::sleep(period);
                if shared.metrics.workers_alive(Instant::now(), stale) {
                    systemd::notify("WATCHDOG=1");
                    warned = false;
                } else if !warned {
                    tracing::error!(
                        ?stale,
                        "a worker loop stopped turning; withholding the watchdog ping"
                    );
                    warned = true;
                }
            }
        })?;
    Ok(())
}

/// Runs the gateway until it has drained after SIGTERM/SIGINT; SIGHUP logs that there is
/// nothing to reload from.
pub fn run(config: Config) -> anyhow::Result<()> {
    start(config, None)
}

/// Like `run`, and SIGHUP reloads the configuration from `args` (file, environment, flags).
pub fn run_reloadable(config: Config, args: ServeArgs) -> anyhow::Result<()> {
    start(config, Some(args))
}

fn unix_now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn start(config: Config, args: Option<ServeArgs>) -> anyhow::Result<()> {
    let started = unix_now_secs();
    // Caught before anything else, so that a reload or stop during the start is not fatal.
    let signals = catch_signals()?;
    // A peer that vanished must not kill the process on write.
    // SAFETY: ignoring SIGPIPE is process-wide and always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let activated = systemd::take_listeners().context("socket activation")?;
    let nofile = raise_nofile_limit();
    let revocations = Arc::new(Revocations::default());
    let settings = settings(&config, &revocations)?;
    let cert_store = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(
            CertStore::load(cert.into(), key.into())
                .map_err(|e| anyhow!("TLS certificate refused: {e}"))?,
        )),
        _ => None,
    };
    let tls_config = match &cert_store {
        Some(store) => Some(
            store
                .server_config()
                .map_err(|e| anyhow!("TLS setup: {e}"))?,
        ),
        None => None,
    };
    let workers = config.workers.max(1);
    let per_worker = nofile.saturating_sub(FD_RESERVE).max(1);
    let table = uring::file_table_size(per_worker, nofile);
    let backend = choose_backend(config.io, table)?;
    let max_connections = config.max_connections.unwrap_or(match backend {
        // Direct descriptors: each ring's table may hold up to the open-files limit.
        Backend::Uring => table as usize * workers,
        Backend::Epoll => per_worker,
    });

    let socket_activated = activated.websocket.is_some();
    let listeners = match activated.websocket {
        Some(socket) => shared_listener(socket, workers)?,
        None => bind_listeners(&config)?,
    };
    let local = listeners[0].local_addr()?;
    let admin_listener = match activated.admin {
        Some(socket) => socket,
        None => TcpListener::bind(config.admin_listen).with_context(|| {
            format!("cannot listen on {} for the admin API", config.admin_listen)
        })?,
    };
    let admin_addr = admin_listener.local_addr()?;

    let notifiers = (0..workers)
        .map(|_| Notifier::new().map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let inboxes = Arc::new(Inboxes::new(notifiers.clone()));
    let mut shared = Shared::new(workers);
    shared.bus = config.nats_url.is_some();
    let shared = Arc::new(shared);
    // The bus before the workers, so that they have it from their first turn.
    let bus = match BusConfig::from_config(&config) {
        Some(bus) => {
            let node = bus.node_name.clone();
            let to_workers = Arc::new(ToWorkers {
                inboxes: inboxes.clone(),
                shared: shared.clone(),
            });
            let bus = Bus::start(bus, to_workers).context("the bus (nats_url)")?;
            tracing::info!(node, "bus started");
            Some(bus)
        }
        None => None,
    };
    let env = Arc::new(Env {
        settings: std::sync::RwLock::new(Arc::new(settings)),
        admission: Admission::new(max_connections, config.max_connection_rate),
        lifecycle: Lifecycle::default(),
        revocations,
        inboxes,
        max_pending_handshakes: config.max_pending_handshakes,
        tls: cert_store.clone(),
        bus: bus.as_ref().map(|b| b.link().clone()),
    });
    if let Some(store) = &cert_store {
        certs::spawn_watcher(store.clone())?;
    }

    let admin = Arc::new(Admin::new(
        env.clone(),
        shared.clone(),
        backend.as_str(),
        started,
    ));
    crate::admin::spawn(admin_listener, admin.clone())?;
    let control = Arc::new(Control {
        env: env.clone(),
        args,
        config: Mutex::new(config.clone()),
    });
    spawn_signal_thread(control, signals)?;

    let (events, lives) = mpsc::channel();
    for (index, listener) in listeners.into_iter().enumerate() {
        let env = env.clone();
        let command_timeout = env.settings().command_timeout;
        let hub = Hub::new(index as u16, shared.clone(), command_timeout);
        let notifier = notifiers[index].clone();
        let max_outbound = config.max_outbound_bytes;
        let shared = shared.clone();
        let tls_config = tls_config.clone();
        let events = events.clone();
        std::thread::Builder::new()
            .name(format!("arcgate-w{index}"))
            .stack_size(8 << 20)
            .spawn(move || {
                pin_to_core(index);
                let worker = index as u16;
                let metrics = &shared.metrics;
                // The loop is set up: the start need not wait for its first turn.
                let running = || {
                    let now = metrics.since_epoch_ms(Instant::now());
                    metrics.worker(worker).last_turn_ms.set(now);
                    let _ = events.send(WorkerEvent::Started(worker));
                };
                let ended = catch_unwind(AssertUnwindSafe(|| {
                    if fault::setup_fails(worker) {
                        return Err(std::io::Error::other("injected fault: loop setup"));
                    }
                    let mut worker = Worker::new(env, hub);
                    let mut worker = tls::Layer::new(&mut worker, tls_config);
                    let mut conns = Conns::new(max_outbound);
                    io::run(
                        backend,
                        listener,
                        notifier,
                        table,
                        &mut conns,
                        &mut worker,
                        running,
                    )
                }));
                metrics.worker(worker).last_turn_ms.set(u64::MAX);
                let outcome = match ended {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("{e}")),
                    Err(panic) => Err(format!("panicked: {}", panic_message(&*panic))),
                };
                let _ = events.send(WorkerEvent::Ended { worker, outcome });
            })?;
    }
    drop(events);
    // Nothing is announced until every loop is set up: a worker that cannot set up its
    // loop ends the start with its reason, before READY=1 or "listening".
    let mut started = vec![false; workers];
    let mut ended = 0;
    while started.contains(&false) {
        match lives.recv() {
            Ok(WorkerEvent::Started(w)) => started[usize::from(w)] = true,
            // A stop during the start: this worker drained already.
            Ok(WorkerEvent::Ended {
                outcome: Ok(()), ..
            }) => ended += 1,
            Ok(WorkerEvent::Ended {
                worker,
                outcome: Err(why),
            }) if !started[usize::from(worker)] => {
                tracing::error!(worker, error = %why, "a worker could not start; exiting");
                return Err(anyhow!(
                    "worker {worker} could not set up its {} loop: {why}",
                    backend.as_str()
                ));
            }
            Ok(WorkerEvent::Ended {
                worker,
                outcome: Err(why),
            }) => return Err(worker_died(worker, &why)),
            Err(_) => return Err(anyhow!("the workers ended before they started")),
        }
    }
    env.lifecycle.started.store(true, Ordering::SeqCst);
    tracing::info!(
        listen = %local,
        admin = %admin_addr,
        socket_activated,
        backend = backend.as_str(),
        tls = certs::status(cert_store.as_deref()).mode,
        workers,
        max_connections,
        "arcgate is listening"
    );
    systemd::notify(&format!(
        "READY=1\nSTATUS=listening on {local} ({workers} workers, {})",
        backend.as_str()
    ));
    if let Some(interval) = systemd::watchdog_interval() {
        spawn_watchdog(shared.clone(), interval)?;
    }
    // A worker that dies takes the process down at once (docs/operations.md, "A worker
    // died"): half a gateway would keep its connections, presence and inbox forever.
    while ended < workers {
        match lives.recv() {
            Ok(WorkerEvent::Ended {
                outcome: Ok(()), ..
            }) => ended += 1,
            Ok(WorkerEvent::Ended {
                worker,
                outcome: Err(why),
            }) => return Err(worker_died(worker, &why)),
            Ok(WorkerEvent::Started(_)) => {}
            Err(_) => break,
        }
    }
    // Let admin answers already decided (503 to pending commands) reach their clients.
    admin.wait_idle(Duration::from_secs(1));
    if let Some(bus) = bus {
        bus.stop();
    }
    tracing::info!("drained; exiting");
    Ok(())
}
