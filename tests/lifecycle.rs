//! The process's life (docs/protocol.md section 14.3): the drain on SIGTERM, a second signal,
//! reload on SIGHUP, systemd notifications and socket activation.

#[macro_use]
mod common;

use std::net::TcpListener as StdListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

both_backends!(
    sigterm_drains_with_1012_and_exits_0,
    socket_activation,
    a_worker_that_cannot_set_up_its_loop_stops_the_start,
    a_worker_that_panics_takes_the_process_down,
);

/// A file path under the temp dir, unique per test and process.
fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arcgate-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn sigterm_drains_with_1012_and_exits_0(io: &'static str) {
    let mut gw = Gateway::start(io, &["--drain-duration", "1s", "--command-timeout", "20s"]).await;
    let mut user = gw.user("usr_1", &["clu_a"]).await;
    let mut agent = gw.agent("mch_1", "clu_a").await;
    user.recv_event("machine:online").await;
    // A command from the user and one over HTTP, both waiting for the silent agent.
    user.send(json!({"event": "command", "id": "req_1", "data": {"machineId": "mch_1", "type": "server:stop"}}))
        .await;
    agent.recv_event("command").await;
    let token = service_token("panel");
    let gw_ref = &gw;
    let http_cmd = async {
        gw_ref
            .admin_request(
                "POST",
                "/v1/machines/mch_1/commands",
                Some(&token),
                Some(r#"{"type":"server:start"}"#),
            )
            .await
    };
    let trigger = async {
        agent.recv_event("command").await;
        gw_ref.signal(libc::SIGTERM);
        let started = Instant::now();
        // Readiness turns 503 at once.
        loop {
            let r = gw_ref.admin_request("GET", "/readyz", None, None).await;
            if r.status == 503 {
                r.assert_error(503, "UNAVAILABLE");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "readyz still {}",
                r.status
            );
        }
        assert_eq!(
            gw_ref
                .admin_request("GET", "/healthz", None, None)
                .await
                .status,
            200
        );
        // New HTTP commands are refused while draining.
        let refused = gw_ref
            .admin_request(
                "POST",
                "/v1/machines/mch_1/commands",
                Some(&token),
                Some(r#"{"type":"x"}"#),
            )
            .await;
        refused.assert_error(503, "UNAVAILABLE");
        agent.messages_until_close(Duration::from_secs(5)).await
    };
    let (pending, (agent_code, _)) = tokio::join!(http_cmd, trigger);
    pending.assert_error(503, "UNAVAILABLE");
    assert_eq!(agent_code, 1012);
    // The user hears about its command before its own 1012.
    let (code, before) = user.messages_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, 1012);
    let failed = before
        .iter()
        .find(|m| m["event"] == "error")
        .unwrap_or_else(|| panic!("no COMMAND_FAILED before the close: {before:?}"));
    assert_error(failed, "COMMAND_FAILED");
    assert_eq!(failed["id"], "req_1");
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("arcgate did not exit after the drain");
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(gw.log().contains("drained; exiting"), "{}", gw.log());
}

#[tokio::test]
async fn drain_spreads_closes_and_refuses_new_connections() {
    let mut gw = Gateway::start("uring", &["--drain-duration", "2s"]).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(gw.user(&format!("usr_{i}"), &["clu_a"]).await);
    }
    let t0 = Instant::now();
    gw.signal(libc::SIGTERM);
    let mut at = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.expect_close_within(Duration::from_secs(5)).await, 1012);
        at.push(t0.elapsed());
        if i > 0 {
            continue;
        }
        // The drain is under way and five clients are still open: a new connection is
        // not taken, whichever worker it meets. Its listener is closed (refused), or the
        // upgrade is answered 503.
        for _ in 0..4 {
            match tokio::net::TcpStream::connect(gw.addr).await {
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
                Ok(mut s) => {
                    use tokio::io::AsyncWriteExt;
                    let _ = s
                        .write_all(upgrade_request("/ws/client", &[]).as_bytes())
                        .await;
                    let status = read_response(&mut s, WAIT).await.map(|r| r.status);
                    assert!(matches!(status, None | Some(503)), "{status:?}");
                }
            }
        }
    }
    // Without agents, clients go in the second half of the drain, spread over it.
    let first = *at.iter().min().unwrap();
    let last = *at.iter().max().unwrap();
    assert!(first >= Duration::from_millis(900), "{at:?}");
    assert!(last - first >= Duration::from_millis(300), "{at:?}");
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("exit");
    assert!(status.success());
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut gw = Gateway::start("epoll", &["--drain-duration", "60s"]).await;
    let mut user = gw.user("usr_1", &["clu_a"]).await;
    gw.signal(libc::SIGINT);
    assert!(gw.wait_log("draining", WAIT).await);
    gw.signal(libc::SIGTERM);
    let status = gw.wait_exit(Duration::from_secs(3)).await.expect("exit");
    assert_eq!(status.code(), Some(1));
    let _ = user.poll(Duration::from_millis(100)).await;
}

/// A NOTIFY_SOCKET listener (file `name`) that collects what the gateway sends.
fn notify_socket(name: &str) -> (UnixDatagram, PathBuf) {
    let path = temp_path(name);
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    (sock, path)
}

/// Datagrams received until one contains `what` or `within` passes.
fn notifications_until(sock: &UnixDatagram, what: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == what);
            seen.push(msg);
            if done {
                break;
            }
        }
    }
    seen
}

#[tokio::test]
async fn notify_socket_gets_ready_watchdog_and_stopping() {
    let (sock, path) = notify_socket("notify.sock");
    let (mut cmd, addr, admin) = Gateway::command("uring");
    cmd.args(["--jwt-secret", SECRET, "--drain-duration", "0s"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000");
    let mut gw = Gateway::spawn("uring", cmd, addr, admin).await;
    let seen = notifications_until(&sock, "READY=1", WAIT);
    let ready = seen.last().expect("a notification");
    assert!(ready.lines().any(|l| l == "READY=1"), "{seen:?}");
    assert!(ready.contains("STATUS=listening on"), "{ready}");
    // Pings at half the interval while the workers turn.
    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let seen = notifications_until(&sock, "WATCHDOG=1", Duration::from_secs(2));
        assert!(
            seen.iter().any(|m| m == "WATCHDOG=1"),
            "no watchdog ping: {seen:?}"
        );
        pings += 1;
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // A reload is announced and closed with READY=1.
    gw.signal(libc::SIGHUP);
    let seen = notifications_until(&sock, "READY=1", WAIT);
    let reloading = seen
        .iter()
        .find(|m| m.starts_with("RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1: {seen:?}"));
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    assert!(seen.last().is_some_and(|m| m == "READY=1"), "{seen:?}");
    gw.signal(libc::SIGTERM);
    let seen = notifications_until(&sock, "STOPPING=1", WAIT);
    assert!(
        seen.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{seen:?}"
    );
    let status = gw.wait_exit(WAIT).await.expect("exit");
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_file(&path);
}

fn write_config(path: &Path, secret: &str, level: &str) {
    std::fs::write(
        path,
        format!("jwt_secret = \"{secret}\"\nlog_level = \"{level}\"\nrate_limit = 0\n"),
    )
    .unwrap();
}

#[tokio::test]
async fn sighup_reloads_keys_limits_and_log_level() {
    const NEW_SECRET: &str = "the-second-secret-0123456789abcdef-0123";
    let path = temp_path("reload.toml");
    write_config(&path, SECRET, "info");
    let (mut cmd, addr, admin) = Gateway::command("epoll");
    cmd.args(["--config", path.to_str().unwrap()]);
    let gw = Gateway::spawn("epoll", cmd, addr, admin).await;
    let mut before = gw.user("usr_1", &["clu_a"]).await;
    assert!(
        !gw.log().contains("connection accepted"),
        "debug lines at info"
    );

    write_config(&path, NEW_SECRET, "debug");
    gw.signal(libc::SIGHUP);
    assert!(
        gw.wait_log("configuration reloaded", WAIT).await,
        "{}",
        gw.log()
    );
    // New connections use the new key; the open one stays.
    let claims = user_claims("usr_2", &["clu_a"], None);
    gw.client(&sign_with(NEW_SECRET, &claims))
        .await
        .assert_open()
        .await;
    let mut old_key = gw.ws("/ws/client").await;
    old_key
        .send(client_auth(&user_token("usr_3", &["clu_a"], None)))
        .await;
    let e = old_key.expect_error("AUTH_FAILED").await;
    assert_eq!(e["data"]["message"], "bad signature");
    before.assert_open().await;
    assert!(
        gw.wait_log("connection accepted", WAIT).await,
        "log level not reloaded"
    );

    // A file that does not validate is refused and the running configuration stays.
    std::fs::write(&path, "jwt_secret = \"x\"\nrate_limit = \"lots\"\n").unwrap();
    gw.signal(libc::SIGHUP);
    assert!(
        gw.wait_log("configuration reload refused", WAIT).await,
        "{}",
        gw.log()
    );
    assert!(gw.log().contains("rate_limit"), "{}", gw.log());
    let claims = user_claims("usr_4", &["clu_a"], None);
    gw.client(&sign_with(NEW_SECRET, &claims))
        .await
        .assert_open()
        .await;
    before.assert_open().await;
    let _ = std::fs::remove_file(&path);
}

/// `arcgate serve` with `listener` passed as descriptor 3 the way systemd does it.
fn activated_command(io: &str, listener: &StdListener, admin: std::net::SocketAddr) -> Command {
    activated_with(io, &[listener], None, admin)
}

/// `arcgate serve` with `listeners` passed as descriptors 3, 4, … and `LISTEN_FDNAMES`
/// set to `names` if given, the way systemd does it.
fn activated_with(
    io: &str,
    listeners: &[&StdListener],
    names: Option<&str>,
    admin: std::net::SocketAddr,
) -> Command {
    let fds: Vec<i32> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        // LISTEN_PID must be the pid of the process that reads it: exec keeps the shell's.
        "LISTEN_PID=$$ exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_arcgate"),
        "serve",
        "--listen",
        "127.0.0.1:1",
        "--admin-listen",
        &admin.to_string(),
        "--jwt-secret",
        SECRET,
        "--io",
        io,
        "--workers",
        "2",
        "--drain-duration",
        "0s",
    ]);
    cmd.env("LISTEN_FDS", fds.len().to_string());
    match names {
        Some(names) => cmd.env("LISTEN_FDNAMES", names),
        None => cmd.env_remove("LISTEN_FDNAMES"),
    };
    // SAFETY: fcntl and dup2 are async-signal-safe. Every listener is first copied above
    // the target range, so that placing one cannot overwrite another; dup2 clears
    // close-on-exec on the final copies.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 8];
            for (i, &fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high[..fds.len()].iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `cmd` until it exits (at most `WAIT`); its status and output.
fn run_to_exit(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn arcgate");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {WAIT:?}; its output:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status, text)
}

fn free_addr() -> std::net::SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn socket_activation(io: &'static str) {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = free_addr();
    let mut gw = Gateway::spawn(io, activated_command(io, &listener, admin), addr, admin).await;
    assert!(
        gw.wait_log("socket_activated=true", WAIT).await,
        "{}",
        gw.log()
    );
    let mut agents = Vec::new();
    for i in 0..4 {
        agents.push(gw.agent(&format!("mch_{i}"), "clu_a").await);
    }
    for a in &mut agents {
        a.assert_open().await;
    }
    drop(agents);
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit(WAIT).await.and_then(|s| s.code()), Some(0));

    // While no gateway runs, the kernel queues connections on the socket systemd (here:
    // the test) holds; the next gateway answers them.
    let mut queued = tcp_connect(addr).await;
    use tokio::io::AsyncWriteExt;
    queued
        .write_all(upgrade_request("/ws/agent", &[]).as_bytes())
        .await
        .unwrap();
    let admin = free_addr();
    let gw = Gateway::spawn(io, activated_command(io, &listener, admin), addr, admin).await;
    let r = read_response(&mut queued, WAIT)
        .await
        .expect("answer to the queued request");
    assert_eq!(r.status, 101);
    drop(gw);
}

/// Makes `cmd`'s process see the kernel of Ubuntu 22.04 (5.15) as far as io_uring goes:
/// registering a provided-buffer ring (Linux 5.19) fails with EINVAL. A seccomp filter,
/// installed in the child before exec and inherited by every thread.
fn without_buffer_rings(cmd: &mut Command) {
    const IORING_REGISTER_PBUF_RING: u32 = 22;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: 0,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    // seccomp_data: the syscall number at 0, args[1] (its low half here) at 24.
    let filter = [
        stmt(load, 0),
        jeq(libc::SYS_io_uring_register as u32, 3),
        stmt(load, 24),
        jeq(IORING_REGISTER_PBUF_RING, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EINVAL as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    // SAFETY: prctl is async-signal-safe; the program outlives the call that copies it.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[tokio::test]
async fn io_auto_falls_back_to_epoll_where_the_ring_cannot_be_built() {
    let (mut cmd, addr, admin) = Gateway::command("auto");
    cmd.args(["--jwt-secret", SECRET]);
    without_buffer_rings(&mut cmd);
    let gw = Gateway::spawn("epoll", cmd, addr, admin).await;
    let log = gw.log();
    assert!(log.contains("falling back to epoll"), "{log}");
    assert!(
        log.contains("provided-buffer ring") && log.contains("EINVAL"),
        "{log}"
    );
    assert!(log.contains(r#"backend="epoll""#), "{log}");
    gw.agent("mch_1", "clu_a").await.assert_open().await;

    // Asked for io_uring, it says why it cannot and what to do, before it listens.
    let (mut cmd, _, _) = Gateway::command("uring");
    cmd.args(["--jwt-secret", SECRET]);
    without_buffer_rings(&mut cmd);
    let (status, log) = run_to_exit(cmd);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("io_uring setup failed: the provided-buffer ring needs Linux 5.19+")
            && log.contains("run with --io epoll"),
        "{log}"
    );
    assert!(!log.contains("is listening"), "{log}");
}

#[tokio::test]
async fn only_a_socket_named_admin_becomes_the_admin_listener() {
    // A second ListenStream= line in arcgate.socket (both named after the unit), and two
    // sockets without names: neither may end up serving the admin API.
    let ws = StdListener::bind("127.0.0.1:0").unwrap();
    let extra = StdListener::bind("127.0.0.1:0").unwrap();
    for names in [Some("arcgate:arcgate"), None] {
        let cmd = activated_with("epoll", &[&ws, &extra], names, free_addr());
        let (status, log) = run_to_exit(cmd);
        assert!(!status.success(), "{names:?}: {log}");
        assert!(
            log.contains("more than one WebSocket socket")
                && log.contains("FileDescriptorName=admin"),
            "{names:?}: {log}"
        );
        assert!(!log.contains("is listening"), "{names:?}: {log}");
    }

    // The socket named admin serves the admin API wherever it comes in the list, and the
    // other one is the WebSocket listener.
    let admin = StdListener::bind("127.0.0.1:0").unwrap();
    let (ws_addr, admin_addr) = (ws.local_addr().unwrap(), admin.local_addr().unwrap());
    let cmd = activated_with("epoll", &[&admin, &ws], Some("admin:arcgate"), free_addr());
    let gw = Gateway::spawn("epoll", cmd, ws_addr, admin_addr).await;
    assert_eq!(gw.admin_get("/metrics").await.status, 200);
    gw.agent("mch_1", "clu_a").await.assert_open().await;
    let r = http(ws_addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_ne!(r.map(|r| r.status), Some(200));
}

#[tokio::test]
async fn a_new_process_on_the_same_port_takes_over_during_the_drain() {
    let mut old = Gateway::start("uring", &["--drain-duration", "3s"]).await;
    let mut user = old.user("usr_1", &["clu_a"]).await;
    // The new version binds the same port (SO_REUSEPORT) before the old one is stopped.
    let admin = free_addr();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arcgate"));
    cmd.arg("serve")
        .args(["--listen", &old.addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--jwt-secret", SECRET, "--io", "epoll", "--workers", "2"]);
    let new = Gateway::spawn("epoll", cmd, old.addr, admin).await;
    old.signal(libc::SIGTERM);
    assert!(old.wait_log("draining", WAIT).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every new connection reaches the new process while the old one drains.
    for _ in 0..20 {
        let r = http(old.addr, &upgrade_request("/ws/agent", &[])).await;
        assert_eq!(r.map(|r| r.status), Some(101));
    }
    assert_eq!(user.expect_close_within(Duration::from_secs(5)).await, 1012);
    assert_eq!(old.wait_exit(WAIT).await.and_then(|s| s.code()), Some(0));
    drop(new);
}

/// `arcgate serve` with fault `fault` injected (`ARCGATE_FAULT`, debug builds only: see
/// src/fault.rs) and a NOTIFY_SOCKET; returns the child, its notify socket and admin address.
fn spawn_with_fault(
    io: &str,
    fault: &str,
) -> (
    std::process::Child,
    UnixDatagram,
    PathBuf,
    std::net::SocketAddr,
) {
    let (sock, path) = notify_socket(&format!("fault-{io}-{fault}.sock"));
    let (mut cmd, _, admin) = Gateway::command(io);
    let child = cmd
        .args(["--jwt-secret", SECRET])
        .env("ARCGATE_FAULT", fault)
        .env("NOTIFY_SOCKET", &path)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn arcgate");
    (child, sock, path, admin)
}

/// Waits for `child` to exit (a hang is a failure, after a bound no healthy exit needs);
/// returns its status and its log.
fn exit_and_log(child: &mut std::process::Child) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("arcgate still runs with a dead worker");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut log);
    (status, log)
}

/// Every notification waiting on `sock`.
fn pending_notifications(sock: &UnixDatagram) -> Vec<String> {
    notifications_until(sock, "never sent", Duration::from_millis(300))
}

/// A loop that fails to set up after the probe passed: no READY=1, no "listening", a
/// non-zero exit whose log names the worker and the reason.
async fn a_worker_that_cannot_set_up_its_loop_stops_the_start(io: &'static str) {
    let (mut child, sock, path, _) = spawn_with_fault(io, "setup:1");
    let (status, log) = exit_and_log(&mut child);
    assert!(!status.success(), "{status}; log:\n{log}");
    assert!(
        log.contains("worker 1 could not set up its") && log.contains("injected fault: loop setup"),
        "{log}"
    );
    assert!(!log.contains("arcgate is listening"), "{log}");
    let seen = pending_notifications(&sock);
    assert!(
        !seen.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "{seen:?}"
    );
    let _ = std::fs::remove_file(&path);
}

/// A worker that panics outside the per-connection guard (here in its wake handling)
/// takes the process down at once: a non-zero exit, a log line naming the worker and the
/// panic, and no READY=1 after the first.
async fn a_worker_that_panics_takes_the_process_down(io: &'static str) {
    let (mut child, sock, path, admin) = spawn_with_fault(io, "wake:1");
    let seen = notifications_until(&sock, "READY=1", Duration::from_secs(20));
    assert!(
        seen.last()
            .is_some_and(|m| m.lines().any(|l| l == "READY=1")),
        "no READY=1: {seen:?}"
    );
    // Listing the machines asks every worker through its inbox: worker 1 wakes and dies.
    let req = format!(
        "GET /v1/machines HTTP/1.1\r\nHost: arcgate\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
        service_token("panel")
    );
    let _ = http(admin, &req).await;
    let (status, log) = exit_and_log(&mut child);
    assert_eq!(status.code(), Some(1), "{status}; log:\n{log}");
    let died = log
        .lines()
        .find(|l| l.contains("a worker died"))
        .unwrap_or_else(|| panic!("no log line for the dead worker:\n{log}"));
    assert!(
        died.contains("worker=1") && died.contains("injected fault: worker 1 panics in on_wake"),
        "{died}"
    );
    let seen = pending_notifications(&sock);
    assert!(
        !seen.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "{seen:?}"
    );
    let _ = std::fs::remove_file(&path);
}
