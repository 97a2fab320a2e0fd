//! The command line: one subcommand per scenario, common options, and the plan they make.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::plan::{FlatOut, Plan, Scenario, Storm, Target};
use crate::util::{parse_duration, parse_sources, Rng};

/// The load generator bundled with arcgate: simulated agents, dashboard users and a
/// service client against a running gateway, with honest numbers.
#[derive(Debug, Parser)]
#[command(name = "arcgate-load", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open N agents at --connect-rate (or as fast as --concurrency allows) and hold them
    Connect(ConnectArgs),
    /// A fleet at realistic rates: heartbeats, metrics, status changes, players, commands
    Steady(SteadyArgs),
    /// N agents send heartbeats flat out, a bounded number in flight: inbound capacity
    Flood(FloodArgs),
    /// M users of one cluster, A agents sending server:status at R per second in all
    Fanout(FanoutArgs),
    /// The whole fleet drops and reconnects, or the gateway restarts (--restart-cmd)
    Storm(StormArgs),
    /// A service issues commands at a rate to random agents: round trips
    Commands(CommandsArgs),
    /// One worker process (started by the coordinator; reads its plan on stdin)
    #[command(name = "__worker", hide = true)]
    Worker,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The gateway's base URL, ws:// or wss:// (/ws/agent and /ws/client are appended);
    /// repeat it or separate with commas for several gateways
    ///
    /// With several URLs (the nodes of one fleet), agents, users and service clients are
    /// spread over them round-robin by their number, and a connection whose gateway is gone
    /// (refused, reset, closed without a close frame, no answer in time, or closed with 1001
    /// or 1012) reconnects, after its backoff, to the next URL in the list. The report counts
    /// the connections per URL and those that reconnected elsewhere.
    #[arg(
        long,
        value_name = "URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080"
    )]
    pub url: Vec<String>,
    /// wss://: PEM certificates to trust (the gateway's own, for a self-signed one)
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// wss://: accept any certificate (tests only)
    #[arg(long)]
    pub insecure: bool,
    /// HS256 secret to mint tokens with (the gateway's --jwt-secret)
    #[arg(long, env = "ARCGATE_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// How long the measured window lasts
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Write a machine-readable report here
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML page with the latency curve and the rates over time
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// The gateway's process id: its CPU time per message and memory per connection (with
    /// several --url, of that one gateway)
    #[arg(long, value_name = "PID")]
    pub gateway_pid: Option<u32>,
    /// No live status line on stderr
    #[arg(long)]
    pub quiet: bool,
    /// IPv4 source addresses to spread connections over, e.g. 127.0.0.1-127.0.0.20
    #[arg(long, value_name = "A-B,C")]
    pub sources: Option<String>,
    /// Worker processes (each under ~19,000 sockets); their results are merged
    #[arg(long, default_value_t = 1)]
    pub procs: u32,
    /// Clusters the agents are spread over
    #[arg(long, default_value_t = 10)]
    pub clusters: u32,
    /// New connections per second while setting up (0: as fast as --concurrency allows)
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Connection attempts in progress at most while setting up
    #[arg(long, default_value_t = 256)]
    pub concurrency: u32,
    /// Agent heartbeat period (each agent starts at a random phase; 0: none)
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Agent metrics period (random phase; 0: none)
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub metrics_interval: Duration,
    /// How long an agent takes to answer a command
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub command_latency: Duration,
    /// Deadline of one connection attempt (TCP, upgrade and auth)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Longest wait for the whole fleet to be authenticated before the window starts
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub setup_timeout: Duration,
    /// Longest wait after the window for deliveries and answers still on their way
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Messages an agent keeps while disconnected, resent after it reconnects
    #[arg(long, default_value_t = 256)]
    pub queue_limit: u32,
    /// Largest message accepted from the gateway
    #[arg(long, default_value_t = 1 << 20)]
    pub max_message_size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Agents to open
    #[arg(long, default_value_t = 1000)]
    pub agents: u32,
}

#[derive(Debug, Clone, Args)]
pub struct SteadyArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 100)]
    pub agents: u32,
    /// Dashboard users
    #[arg(long, default_value_t = 10)]
    pub clients: u32,
    /// Clusters each user sees
    #[arg(long, default_value_t = 1)]
    pub user_clusters: u32,
    /// server:status changes per second across the fleet
    #[arg(long, default_value_t = 10.0)]
    pub status_rate: f64,
    /// player:joined/left per second across the fleet
    #[arg(long, default_value_t = 2.0)]
    pub player_rate: f64,
    /// Commands per second from the service client (0: no service client)
    #[arg(long, default_value_t = 1.0)]
    pub command_rate: f64,
    /// Agent connections per second dropped and reopened after a backoff, across the fleet
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
}

#[derive(Debug, Clone, Args)]
pub struct FloodArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 100)]
    pub agents: u32,
    /// Messages per agent sent and not yet acknowledged (by a ping's pong) at most
    #[arg(long, default_value_t = 32)]
    pub in_flight: u32,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users of the one cluster
    #[arg(long, default_value_t = 100)]
    pub clients: u32,
    #[arg(long, default_value_t = 10)]
    pub agents: u32,
    /// server:status per second from all agents together (0: flat out)
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// With --rate 0: messages per agent not yet acknowledged at most
    #[arg(long, default_value_t = 32)]
    pub in_flight: u32,
}

#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 1000)]
    pub agents: u32,
    /// Dashboard users watching meanwhile
    #[arg(long, default_value_t = 0)]
    pub clients: u32,
    /// server:status per second across the fleet meanwhile
    #[arg(long, default_value_t = 0.0)]
    pub status_rate: f64,
    /// When the storm starts, after the window opens
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub storm_after: Duration,
    /// Restart the gateway with this shell command instead of dropping the connections
    #[arg(long, value_name = "CMD")]
    pub restart_cmd: Option<String>,
    /// Reconnect at once, without backoff (the worst case, not what a good client does)
    #[arg(long)]
    pub herd: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CommandsArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 100)]
    pub agents: u32,
    /// Commands per second
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
}

/// What the coordinator does besides running the plan.
#[derive(Debug, Clone)]
pub struct Output {
    pub json: Option<PathBuf>,
    pub html: Option<PathBuf>,
    pub quiet: bool,
    pub gateway_pid: Option<u32>,
    pub restart_cmd: Option<String>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Host header, socket address, base path and TLS settings of a `ws://` or `wss://` URL.
fn resolve(url: &str, c: &Common) -> Result<Target, String> {
    let (rest, wss) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => {
            return Err(format!(
                "--url {url:?}: expected ws://HOST:PORT or wss://HOST:PORT"
            ))
        }
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:{}", if wss { 443 } else { 80 })
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("--url {url:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--url {url:?}: no address"))?;
    let tls = wss.then(|| crate::tls::TlsPlan {
        server_name: host_of(authority),
        ca_file: c.ca_file.clone(),
        insecure: c.insecure,
    });
    if let Some(tls) = &tls {
        // Checked here so that a bad file is reported before any worker starts.
        crate::tls::Connector::new(tls)?;
    }
    Ok(Target {
        url: url.to_string(),
        addr,
        host: authority.to_string(),
        base_path: path.to_string(),
        tls,
    })
}

/// The host of an authority (`name:port`, `[v6]:port`), as the certificate names it.
fn host_of(authority: &str) -> String {
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && !authority.ends_with(']') => h,
        _ => authority,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

fn base(scenario: Scenario, c: &Common) -> Result<Plan, String> {
    let targets = c
        .url
        .iter()
        .map(|u| resolve(u.trim(), c))
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err("--url: at least one gateway URL is needed".into());
    }
    if c.secret.is_empty() {
        return Err("--secret must not be empty".into());
    }
    if c.procs == 0 || c.procs > 64 {
        return Err("--procs must be between 1 and 64".into());
    }
    if c.duration.is_zero() {
        return Err("--duration must be more than 0".into());
    }
    let sources = match &c.sources {
        Some(s) => parse_sources(s)?,
        None => Vec::new(),
    };
    let run_id = format!("{:06x}", Rng::from_os().next_u64() & 0xFF_FFFF);
    let ttl = c.duration + c.setup_timeout + c.drain + Duration::from_secs(3600);
    Ok(Plan {
        scenario,
        targets,
        secret: c.secret.clone(),
        run_id,
        agents: 0,
        users: 0,
        service: false,
        clusters: c.clusters.max(1),
        user_clusters: 1,
        heartbeat_ms: ms(c.heartbeat_interval),
        metrics_ms: ms(c.metrics_interval),
        status_rate: 0.0,
        player_rate: 0.0,
        command_rate: 0.0,
        churn_rate: 0.0,
        command_latency_ms: ms(c.command_latency),
        flat_out: None,
        in_flight: 32,
        connect_rate: c.connect_rate.max(0.0),
        concurrency: c.concurrency.max(1),
        attempt_timeout_ms: ms(c.timeout).max(1),
        setup_timeout_ms: ms(c.setup_timeout),
        duration_ms: ms(c.duration),
        drain_ms: ms(c.drain),
        sources,
        storm: None,
        token_ttl_s: ttl.as_secs(),
        queue_limit: c.queue_limit,
        max_message: c.max_message_size.max(1024),
        proc_index: 0,
        procs: c.procs,
    })
}

impl Command {
    /// The plan and the output options of a scenario subcommand (`None` for the worker).
    pub fn plan(&self) -> Result<Option<(Plan, Output)>, String> {
        let (plan, common, restart_cmd) = match self {
            Command::Worker => return Ok(None),
            Command::Connect(a) => {
                let mut p = base(Scenario::Connect, &a.common)?;
                p.agents = a.agents;
                (p, &a.common, None)
            }
            Command::Steady(a) => {
                let mut p = base(Scenario::Steady, &a.common)?;
                p.agents = a.agents;
                p.users = a.clients;
                p.user_clusters = a.user_clusters.max(1);
                p.status_rate = a.status_rate.max(0.0);
                p.player_rate = a.player_rate.max(0.0);
                p.command_rate = a.command_rate.max(0.0);
                p.churn_rate = a.churn.max(0.0);
                p.service = p.command_rate > 0.0;
                (p, &a.common, None)
            }
            Command::Flood(a) => {
                let mut p = base(Scenario::Flood, &a.common)?;
                p.agents = a.agents;
                p.flat_out = Some(FlatOut::Heartbeat);
                p.in_flight = a.in_flight.max(1);
                (p, &a.common, None)
            }
            Command::Fanout(a) => {
                let mut p = base(Scenario::Fanout, &a.common)?;
                p.agents = a.agents;
                p.users = a.clients;
                p.clusters = 1;
                if a.rate > 0.0 {
                    p.status_rate = a.rate;
                } else {
                    p.flat_out = Some(FlatOut::Status);
                }
                p.in_flight = a.in_flight.max(1);
                (p, &a.common, None)
            }
            Command::Storm(a) => {
                let mut p = base(Scenario::Storm, &a.common)?;
                p.agents = a.agents;
                p.users = a.clients;
                p.status_rate = a.status_rate.max(0.0);
                p.storm = Some(Storm {
                    after_ms: ms(a.storm_after),
                    drop: a.restart_cmd.is_none(),
                    herd: a.herd,
                });
                if a.storm_after >= a.common.duration {
                    return Err("--storm-after must be shorter than --duration".into());
                }
                (p, &a.common, a.restart_cmd.clone())
            }
            Command::Commands(a) => {
                let mut p = base(Scenario::Commands, &a.common)?;
                p.agents = a.agents;
                p.command_rate = a.rate.max(0.0);
                p.service = true;
                (p, &a.common, None)
            }
        };
        let output = Output {
            json: common.json.clone(),
            html: common.html.clone(),
            quiet: common.quiet,
            gateway_pid: common.gateway_pid,
            restart_cmd,
        };
        Ok(Some((plan, output)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let mut v = vec!["arcgate-load"];
        v.extend_from_slice(args);
        let cli = Cli::try_parse_from(v).map_err(|e| e.to_string())?;
        cli.command.plan().map(|p| p.expect("a scenario").0)
    }

    /// The common options of a plan made from `args`.
    fn common(args: &[&str]) -> Common {
        let mut v = vec!["arcgate-load", "connect", "--secret", "s"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Connect(a) => a.common,
            _ => unreachable!("a connect command"),
        }
    }

    #[test]
    fn urls_resolve_with_base_paths() {
        let c = common(&[]);
        let t = resolve("ws://127.0.0.1:9001/", &c).unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.addr.port(),
                t.base_path.as_str(),
                t.tls.is_none()
            ),
            ("127.0.0.1:9001", 9001, "", true)
        );
        let t = resolve("ws://localhost:7/gw", &c).unwrap();
        assert_eq!((t.addr.port(), t.base_path.as_str()), (7, "/gw"));
        let t = resolve("wss://localhost", &common(&["--insecure"])).unwrap();
        let name = t.tls.map(|tls| tls.server_name);
        assert_eq!((name.as_deref(), t.addr.port()), (Some("localhost"), 443));
        assert_eq!(host_of("[::1]:8443"), "::1");
        assert!(resolve("http://x:1", &c).is_err());
    }

    #[test]
    fn several_urls_repeated_or_comma_separated() {
        let urls = |p: &Plan| p.targets.iter().map(|t| t.addr.port()).collect::<Vec<_>>();
        let p = plan(&["connect", "--secret", "s"]).unwrap();
        assert_eq!(urls(&p), [8080]);
        let p = plan(&[
            "connect",
            "--secret",
            "s",
            "--url",
            "ws://127.0.0.1:1,ws://127.0.0.1:2",
            "--url",
            "ws://127.0.0.1:3/gw",
        ])
        .unwrap();
        assert_eq!(urls(&p), [1, 2, 3]);
        assert_eq!(p.targets[2].url, "ws://127.0.0.1:3/gw");
        assert_eq!((p.url_of(0), p.url_of(4), p.url_of(5)), (0, 1, 2));
        assert_eq!((p.next_url(1), p.next_url(2)), (2, 0));
        let e = plan(&[
            "connect",
            "--secret",
            "s",
            "--url",
            "ws://127.0.0.1:1,http://x:2",
        ])
        .unwrap_err();
        assert!(e.contains("http://x:2"), "{e}");
    }

    #[test]
    fn wss_needs_a_ca_file_or_insecure() {
        let err = plan(&["connect", "--secret", "s", "--url", "wss://localhost:1"]).unwrap_err();
        assert!(err.contains("--ca-file"), "{err}");
        let args = [
            "connect",
            "--secret",
            "s",
            "--url",
            "wss://localhost:1,ws://127.0.0.1:2,wss://127.0.0.1:3",
            "--insecure",
        ];
        let p = plan(&args).unwrap();
        let names: Vec<Option<&str>> = p
            .targets
            .iter()
            .map(|t| t.tls.as_ref().map(|tls| tls.server_name.as_str()))
            .collect();
        assert_eq!(names, [Some("localhost"), None, Some("127.0.0.1")]);
        assert!(p.targets.iter().flat_map(|t| &t.tls).all(|t| t.insecure));
    }

    #[test]
    fn scenarios_make_their_plans() {
        let p = plan(&[
            "fanout",
            "--secret",
            "s",
            "--clients",
            "5",
            "--agents",
            "2",
            "--rate",
            "0",
        ])
        .unwrap();
        assert_eq!((p.users, p.agents, p.clusters), (5, 2, 1));
        assert_eq!(p.flat_out, Some(FlatOut::Status));
        let p = plan(&["steady", "--secret", "s", "--command-rate", "0"]).unwrap();
        assert!(!p.service);
        let p = plan(&["commands", "--secret", "s", "--rate", "5", "--procs", "2"]).unwrap();
        assert!(p.service && p.command_rate == 5.0 && p.procs == 2);
        let p = plan(&[
            "storm",
            "--secret",
            "s",
            "--restart-cmd",
            "true",
            "--duration",
            "9s",
        ])
        .unwrap();
        assert!(!p.storm.unwrap().drop);
        assert!(plan(&[
            "storm",
            "--secret",
            "s",
            "--duration",
            "2s",
            "--storm-after",
            "3s"
        ])
        .is_err());
        assert!(plan(&["flood", "--secret", ""]).is_err());
        let p = plan(&[
            "connect",
            "--secret",
            "s",
            "--sources",
            "127.0.0.1-127.0.0.4",
        ])
        .unwrap();
        assert_eq!(p.sources.len(), 4);
    }
}
