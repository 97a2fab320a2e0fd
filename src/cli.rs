//! The subcommands of `arcgate`: argument shapes, `token`, `check-config`, and the `--dev` start.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arcgate::auth::{mint_hs256, KeySource, TokenSpec};
use arcgate::config::{Config, ServeArgs};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// A thread-per-core WebSocket gateway for game-server hosting panels.
#[derive(Debug, Parser)]
#[command(name = "arcgate", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway
    Serve(ServeArgs),
    /// Print a signed HS256 token
    Token(TokenArgs),
    /// Print the effective configuration of `serve` (secrets masked), or what is wrong with it
    CheckConfig(ServeArgs),
    /// Print the example configuration file: every key with its default, commented out
    ExampleConfig,
    /// Write the man pages and shell completions into a directory (packaging)
    #[command(hide = true)]
    GenerateAssets(crate::generate::AssetArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Agent,
    User,
    Service,
}

impl RoleArg {
    fn as_str(self) -> &'static str {
        match self {
            RoleArg::Agent => "agent",
            RoleArg::User => "user",
            RoleArg::Service => "service",
        }
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// HS256 shared secret (the gateway's --jwt-secret)
    #[arg(long, env = "ARCGATE_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Who the token speaks for
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// Machine id, user id or service name
    #[arg(long)]
    pub sub: String,
    /// The agent's cluster (agents only, required)
    #[arg(long)]
    pub cluster: Option<String>,
    /// The clusters a user sees, comma-separated (users only, required)
    #[arg(long, value_name = "A,B")]
    pub clusters: Option<String>,
    /// Command types a user may issue, comma-separated; "*" for all, "" for none (users only)
    #[arg(long, value_name = "T1,T2")]
    pub perms: Option<String>,
    /// Lifetime of the token
    #[arg(long, default_value = "1h", value_name = "DUR", value_parser = parse_ttl)]
    pub ttl: Duration,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.as_secs() >= 1 => Ok(d),
        Ok(_) => Err("expected at least 1s".to_string()),
        Err(_) => Err("expected a duration like 10m, 1h or 30d".to_string()),
    }
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl TokenArgs {
    /// The token to mint, once the role's required claims are checked.
    pub fn spec(&self) -> Result<TokenSpec, String> {
        if self.secret.is_empty() {
            return Err("--secret must not be empty".to_string());
        }
        if self.sub.trim().is_empty() {
            return Err("--sub must not be empty".to_string());
        }
        let role = self.role;
        match role {
            RoleArg::Agent if self.cluster.as_deref().is_none_or(|c| c.trim().is_empty()) => {
                return Err("an agent token needs --cluster CLUSTER_ID".to_string())
            }
            RoleArg::User if self.clusters.is_none() => {
                return Err(
                    "a user token needs --clusters A,B (the clusters it may see)".to_string(),
                )
            }
            _ => {}
        }
        if role != RoleArg::Agent && self.cluster.is_some() {
            return Err(
                "--cluster applies to agent tokens only (users take --clusters)".to_string(),
            );
        }
        if role != RoleArg::User && (self.clusters.is_some() || self.perms.is_some()) {
            return Err("--clusters and --perms apply to user tokens only".to_string());
        }
        Ok(TokenSpec {
            role: role.as_str().to_string(),
            sub: self.sub.trim().to_string(),
            cluster: self.cluster.as_ref().map(|c| c.trim().to_string()),
            clusters: self.clusters.as_deref().map(list),
            perms: self.perms.as_deref().map(list),
            ttl: self.ttl,
        })
    }
}

/// Starts the gateway with its configuration and the arguments it came from (a reload
/// reads the same file, environment and flags again).
pub type RunServer = fn(Config, ServeArgs) -> anyhow::Result<()>;

/// Runs the parsed command line; `run_server` starts the gateway.
pub fn run(cli: Cli, run_server: RunServer) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(args, run_server),
        Command::Token(args) => token(&args),
        Command::CheckConfig(args) => check_config(args),
        Command::ExampleConfig => {
            print!("{}", arcgate::config::example_file());
            ExitCode::SUCCESS
        }
        Command::GenerateAssets(args) => crate::generate::run(&args),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn token(args: &TokenArgs) -> ExitCode {
    match args.spec() {
        Ok(spec) => {
            println!("{}", mint_hs256(&args.secret, &spec, unix_now()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_errors(e: &arcgate::config::ConfigError) {
    for line in &e.0 {
        eprintln!("error: {line}");
    }
}

fn check_config(args: ServeArgs) -> ExitCode {
    match Config::load(args) {
        Ok(config) => {
            for w in config.warnings() {
                println!("# warning: {w}");
            }
            print!("{}", config.render_masked());
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_errors(&e);
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs, run_server: RunServer) -> ExitCode {
    let mut config = match Config::load(args.clone()) {
        Ok(config) => config,
        Err(e) => {
            print_errors(&e);
            return ExitCode::from(2);
        }
    };
    if let Err(e) = arcgate::logging::init(config.log_format, &config.log_level) {
        eprintln!("error: cannot set up logging: {e}");
        return ExitCode::from(2);
    }
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    if config.key.is_none() {
        match dev_secret() {
            Ok(secret) => {
                print!("{}", dev_block(&secret, config.listen, unix_now()));
                config.key = Some(KeySource::Secret(secret));
            }
            Err(e) => {
                eprintln!("error: cannot generate a dev secret: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match run_server(config, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// 32 random bytes, hex-encoded.
fn dev_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// The sub and cluster of the `--dev` tokens.
pub const DEV_AGENT: &str = "mch_dev";
pub const DEV_USER: &str = "usr_dev";
pub const DEV_SERVICE: &str = "svc_dev";
pub const DEV_CLUSTER: &str = "clu_dev";
const DEV_TTL: Duration = Duration::from_secs(24 * 3600);

/// What `serve --dev` prints on stdout: the secret, one token per role, and a way to connect.
pub fn dev_block(secret: &str, listen: SocketAddr, now: u64) -> String {
    let mint = |role: &str, sub: &str, cluster: Option<&str>, clusters: Option<Vec<String>>| {
        let spec = TokenSpec {
            role: role.to_string(),
            sub: sub.to_string(),
            cluster: cluster.map(String::from),
            clusters,
            perms: None,
            ttl: DEV_TTL,
        };
        mint_hs256(secret, &spec, now)
    };
    let agent = mint("agent", DEV_AGENT, Some(DEV_CLUSTER), None);
    let user = mint("user", DEV_USER, None, Some(vec![DEV_CLUSTER.to_string()]));
    let service = mint("service", DEV_SERVICE, None, None);
    let auth = format!(
        r#"{{"event":"auth","data":{{"token":"{agent}","machineId":"{DEV_AGENT}","version":"dev"}}}}"#
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "arcgate dev mode: generated secret and tokens valid 24h; not for production"
    );
    let _ = writeln!(out, "secret:        {secret}");
    let _ = writeln!(out, "agent token:   {agent}");
    let _ = writeln!(out, "user token:    {user}");
    let _ = writeln!(out, "service token: {service}");
    let _ = writeln!(
        out,
        "claims:        agent sub={DEV_AGENT} cluster={DEV_CLUSTER}; user sub={DEV_USER} \
         clusters=[{DEV_CLUSTER}]; service sub={DEV_SERVICE}"
    );
    let _ = writeln!(
        out,
        "try:           (echo '{auth}'; cat) | websocat ws://{}/ws/agent",
        connect_addr(listen)
    );
    out
}

/// Where a local client reaches a listener bound to every interface.
fn connect_addr(listen: SocketAddr) -> SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => [127, 0, 0, 1].into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;
    use arcgate::auth::{Role, Verifier};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("arcgate").chain(args.iter().copied()))
    }

    fn token_args(args: &[&str]) -> TokenArgs {
        let mut all = vec!["token", "--secret", "s3cret"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Token(t) => t,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn verify(secret: &str, token: &str, now: u64) -> arcgate::auth::Identity {
        let key = KeySource::Secret(secret.to_string());
        let v = Verifier::new(&key, None, None, Duration::from_secs(5)).unwrap();
        v.verify(token, now).unwrap()
    }

    #[test]
    fn token_arguments_become_a_spec() {
        let spec = token_args(&[
            "--role",
            "user",
            "--sub",
            "usr_1",
            "--clusters",
            "a, b",
            "--perms",
            "",
        ])
        .spec()
        .unwrap();
        assert_eq!(spec.role, "user");
        assert_eq!(spec.clusters, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(spec.perms, Some(vec![]));
        assert_eq!(spec.ttl, Duration::from_secs(3600));
        let agent = token_args(&[
            "--role",
            "agent",
            "--sub",
            "m",
            "--cluster",
            "c",
            "--ttl",
            "10m",
        ]);
        let spec = agent.spec().unwrap();
        assert_eq!(
            (spec.cluster.as_deref(), spec.ttl),
            (Some("c"), Duration::from_secs(600))
        );
    }

    #[test]
    fn token_role_requirements_are_enforced() {
        let err = |args: &[&str]| token_args(args).spec().unwrap_err();
        assert!(err(&["--role", "agent", "--sub", "m"]).contains("--cluster"));
        assert!(err(&["--role", "user", "--sub", "u"]).contains("--clusters"));
        assert!(
            err(&["--role", "service", "--sub", "s", "--perms", "*"]).contains("user tokens only")
        );
        assert!(err(&[
            "--role",
            "user",
            "--sub",
            "u",
            "--clusters",
            "a",
            "--cluster",
            "a"
        ])
        .contains("agent tokens only"));
        assert!(token_args(&["--role", "service", "--sub", "panel"])
            .spec()
            .is_ok());
        assert!(parse(&["token", "--secret", "s", "--role", "admin", "--sub", "x"]).is_err());
        assert!(parse(&[
            "token", "--secret", "s", "--role", "user", "--sub", "x", "--ttl", "soon"
        ])
        .is_err());
    }

    #[test]
    fn dev_block_tokens_verify_with_the_printed_secret() {
        let now = 1_700_000_000;
        let block = dev_block("abc123", "0.0.0.0:8080".parse().unwrap(), now);
        let field = |label: &str| {
            let line = block.lines().find(|l| l.starts_with(label)).unwrap();
            line.split_whitespace().last().unwrap().to_string()
        };
        assert_eq!(field("secret:"), "abc123");
        let agent = verify("abc123", &field("agent token:"), now);
        assert_eq!((agent.role, &*agent.sub), (Role::Agent, DEV_AGENT));
        assert_eq!(agent.cluster.as_deref(), Some(DEV_CLUSTER));
        assert_eq!(agent.exp, now + 24 * 3600);
        let user = verify("abc123", &field("user token:"), now);
        assert_eq!(user.clusters, vec![Box::<str>::from(DEV_CLUSTER)]);
        let service = verify("abc123", &field("service token:"), now);
        assert_eq!((service.role, &*service.sub), (Role::Service, DEV_SERVICE));
        let try_line = block.lines().find(|l| l.starts_with("try:")).unwrap();
        assert!(
            try_line.ends_with("websocat ws://127.0.0.1:8080/ws/agent"),
            "{try_line}"
        );
        assert!(try_line.contains(r#""machineId":"mch_dev""#), "{try_line}");
    }

    #[test]
    fn dev_secrets_are_random_hex() {
        let (a, b) = (dev_secret().unwrap(), dev_secret().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn connect_address_of_a_wildcard_listener_is_loopback() {
        assert_eq!(
            connect_addr("0.0.0.0:80".parse().unwrap()).to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(
            connect_addr("[::]:80".parse().unwrap()).to_string(),
            "[::1]:80"
        );
        assert_eq!(
            connect_addr("10.0.0.2:81".parse().unwrap()).to_string(),
            "10.0.0.2:81"
        );
    }

    #[test]
    fn subcommands_parse() {
        assert!(
            matches!(parse(&["serve", "--dev"]).unwrap().command, Command::Serve(a) if a.dev == Some(true))
        );
        let cmd = parse(&["check-config", "--listen", "1.2.3.4:5"])
            .unwrap()
            .command;
        assert!(matches!(cmd, Command::CheckConfig(a) if a.listen.as_deref() == Some("1.2.3.4:5")));
        assert!(parse(&["serve", "--no-such-flag"]).is_err());
    }
}
