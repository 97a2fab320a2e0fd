//! The configuration: layering, validation messages, rendering, and the settings table.

use super::kinds::{parse_bytes, parse_log_level, DURATION, ORIGINS};
use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    serve: ServeArgs,
}

fn with_secret() -> ServeArgs {
    ServeArgs {
        jwt_secret: Some("0123456789abcdef0123456789abcdef".into()),
        ..ServeArgs::default()
    }
}

fn errors(args: ServeArgs) -> Vec<String> {
    Config::load(args).unwrap_err().0
}

fn one_error(args: ServeArgs) -> String {
    let errs = errors(args);
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}

/// A file under the temp dir, unique per test.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arcgate-config-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("arcgate.toml");
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn defaults_apply_when_nothing_is_given() {
    let c = Config::load(with_secret()).unwrap();
    let d = Config::default();
    assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(c.jwt_leeway, Duration::from_secs(5));
    assert_eq!((c.jwt_issuer, c.jwt_audience), (None, None));
    assert_eq!(c.auth_timeout, Duration::from_secs(10));
    assert_eq!(c.handshake_timeout, Duration::from_secs(5));
    assert_eq!(
        (c.ping_interval, c.pong_timeout),
        (Duration::from_secs(30), Duration::from_secs(30))
    );
    assert_eq!(c.agent_lease, Duration::from_secs(90));
    assert_eq!(c.token_expiry_warning, Duration::from_secs(60));
    assert_eq!(c.command_timeout, Duration::from_secs(30));
    assert_eq!(
        (c.rate_limit, c.rate_burst, c.rate_limit_close_after),
        (100, 200, 10)
    );
    assert_eq!(c.max_message_size, 65536);
    assert_eq!((c.max_connections, c.max_connection_rate), (None, 0));
    assert_eq!(c.max_outbound_bytes, 1048576);
    assert_eq!(c.allowed_origins, None);
    assert_eq!(c.workers, d.workers);
    assert!(c.workers >= 1);
    assert_eq!(c.io, IoMode::Auto);
    assert_eq!(c.drain_duration, Duration::from_secs(10));
    assert_eq!(
        (c.log_format, c.log_level.as_str()),
        (LogFormat::Text, "info")
    );
    assert!(!c.dev);
    assert_eq!(
        c.key,
        Some(KeySource::Secret("0123456789abcdef0123456789abcdef".into()))
    );
}

#[test]
fn file_beats_defaults_and_flags_beat_the_file() {
    let path = temp_file(
        "layers",
        r#"
        listen = "127.0.0.1:7000"
        admin_listen = "127.0.0.1:7001"
        jwt_secret = "from-file-secret-from-file-secret"
        workers = 3
        rate_limit = 7
        allowed_origins = ["https://a.example", "HTTP://B.example:8080"]
        dev = true
        "#,
    );
    let path = path.to_str().unwrap();
    let cmd = Cmd::try_parse_from([
        "x",
        "--config",
        path,
        "--listen",
        "127.0.0.1:9000",
        "--workers",
        "5",
    ])
    .unwrap();
    let c = Config::load(cmd.serve).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:7001");
    assert_eq!(c.workers, 5);
    assert_eq!(c.rate_limit, 7);
    assert_eq!(c.rate_burst, 200);
    assert!(c.dev);
    assert_eq!(
        c.key,
        Some(KeySource::Secret(
            "from-file-secret-from-file-secret".into()
        ))
    );
    let origins = c.allowed_origins.unwrap();
    assert_eq!(
        origins,
        vec![
            "https://a.example".to_string(),
            "http://b.example:8080".to_string()
        ]
    );
}

/// The only test that touches the process environment; the keys it sets are read by
/// no other test.
#[test]
fn environment_beats_the_file_and_flags_beat_the_environment() {
    let path = temp_file(
        "env",
        "agent_lease = \"1s\"\ncommand_timeout = \"2s\"\njwt_secret = \"s\"\n",
    );
    std::env::set_var("ARCGATE_AGENT_LEASE", "7s");
    std::env::set_var("ARCGATE_COMMAND_TIMEOUT", "8s");
    let parsed = Cmd::try_parse_from([
        "x",
        "--config",
        path.to_str().unwrap(),
        "--command-timeout",
        "9s",
    ]);
    std::env::remove_var("ARCGATE_AGENT_LEASE");
    std::env::remove_var("ARCGATE_COMMAND_TIMEOUT");
    let c = Config::load(parsed.unwrap().serve).unwrap();
    assert_eq!(c.agent_lease, Duration::from_secs(7));
    assert_eq!(c.command_timeout, Duration::from_secs(9));
}

#[test]
fn unknown_file_keys_are_named() {
    let path = temp_file("unknown", "lisen = \"0.0.0.0:1\"\n");
    let args = ServeArgs {
        config: Some(path.clone()),
        ..with_secret()
    };
    let err = one_error(args);
    assert_eq!(
        err,
        format!("config file {}: unknown key \"lisen\"", path.display())
    );
    let two = temp_file("unknown2", "lisen = 1\nworkers = \"0\"\ntimeout = \"5s\"\n");
    let errs = errors(ServeArgs {
        config: Some(two),
        ..with_secret()
    });
    // Every unknown key, and the bad values of the known ones, in one pass.
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(errs[0].ends_with("unknown key \"lisen\""), "{errs:?}");
    assert!(errs[1].ends_with("unknown key \"timeout\""), "{errs:?}");
    assert_eq!(
        errs[2],
        "invalid value \"0\" for workers: expected at least 1"
    );
}

#[test]
fn bad_files_are_reported() {
    let missing = ServeArgs {
        config: Some("/nonexistent/arcgate.toml".into()),
        ..with_secret()
    };
    assert!(one_error(missing).starts_with("cannot read config file /nonexistent/arcgate.toml: "));
    let syntax = temp_file("syntax", "listen = \n");
    let err = one_error(ServeArgs {
        config: Some(syntax.clone()),
        ..with_secret()
    });
    assert!(
        err.starts_with(&format!("config file {}: ", syntax.display())),
        "{err}"
    );
    assert!(!err.contains('\n'));
    let dev = temp_file("dev", "dev = \"yes\"\n");
    let err = one_error(ServeArgs {
        config: Some(dev),
        ..with_secret()
    });
    assert!(
        err.starts_with("invalid value \"yes\" for dev in config file"),
        "{err}"
    );
    let table = temp_file("table", "[listen]\nport = 1\n");
    let err = one_error(ServeArgs {
        config: Some(table),
        ..with_secret()
    });
    assert!(
        err.contains("for listen in config file") && err.ends_with("expected a single value"),
        "{err}"
    );
}

#[test]
fn file_values_are_validated_like_flags() {
    let path = temp_file("values", "workers = 0\njwt_leeway = 5\n");
    let errs = errors(ServeArgs {
        config: Some(path),
        ..with_secret()
    });
    assert_eq!(
        errs,
        vec![
            "invalid value \"5\" for jwt_leeway: expected a duration like 500ms, 10s or 2m"
                .to_string(),
            "invalid value \"0\" for workers: expected at least 1".to_string(),
        ]
    );
}

#[test]
fn public_key_in_the_file_is_relative_to_the_file() {
    let path = temp_file("pem", "jwt_public_key = \"ec.pem\"\n");
    let pem = include_bytes!("../../tests/keys/ec_p256_public.pem");
    std::fs::write(path.parent().unwrap().join("ec.pem"), pem).unwrap();
    let c = Config::load(ServeArgs {
        config: Some(path),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(c.key, Some(KeySource::PublicKeyPem(pem.to_vec())));
    assert!(c
        .render_masked()
        .contains("# jwt_public_key: an EC P-256 public key (ES256)\n"));
}

#[test]
fn key_problems_are_explained() {
    assert_eq!(one_error(ServeArgs::default()), NO_KEY);
    assert!(NO_KEY.contains("--jwt-secret") && NO_KEY.contains("ARCGATE_JWT_SECRET"));
    assert!(NO_KEY.contains("--jwt-public-key") && NO_KEY.contains("--dev"));
    let dev = Config::load(ServeArgs {
        dev: Some(true),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!((dev.key, dev.dev), (None, true));
    let both = ServeArgs {
        jwt_public_key: Some("k.pem".into()),
        ..with_secret()
    };
    assert!(one_error(both).starts_with("jwt_secret and jwt_public_key are both set"));
    let missing = ServeArgs {
        jwt_public_key: Some("/nonexistent/k.pem".into()),
        ..ServeArgs::default()
    };
    assert!(one_error(missing).starts_with("cannot read jwt_public_key \"/nonexistent/k.pem\": "));
    let private = ServeArgs {
        jwt_public_key: Some(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rsa_private.pem").into(),
        ),
        ..ServeArgs::default()
    };
    let err = one_error(private);
    assert!(
        err.starts_with("invalid jwt_public_key \"") && err.contains("private key"),
        "{err}"
    );
    let empty = ServeArgs {
        jwt_secret: Some(String::new()),
        ..ServeArgs::default()
    };
    assert_eq!(one_error(empty), "invalid jwt_secret: empty secret");
}

#[test]
fn each_bad_value_is_named_with_what_is_allowed() {
    let between = "expected between 125 and 67108864 (64 MiB)";
    let cases = [
        ("jwt_leeway", "abc", DURATION),
        ("listen", "nowhere", "expected an address like 0.0.0.0:8080"),
        (
            "admin_listen",
            "1.2.3.4",
            "expected an address like 127.0.0.1:9090",
        ),
        ("workers", "0", "expected at least 1"),
        ("workers", "two", "expected a whole number"),
        ("max_message_size", "124", between),
        ("max_message_size", "65MiB", between),
        (
            "max_message_size",
            "lots",
            "expected a size in bytes, like 65536, 64KiB or 1MiB",
        ),
        (
            "rate_burst",
            "0",
            "expected at least 1 when rate_limit is above 0",
        ),
        (
            "ping_interval",
            "0s",
            "expected a duration above 0, like 500ms, 10s or 2m",
        ),
        (
            "pong_timeout",
            "0ms",
            "expected a duration above 0, like 500ms, 10s or 2m",
        ),
        ("rate_limit_close_after", "0", "expected at least 1"),
        ("max_connections", "0", "expected at least 1"),
        (
            "max_outbound_bytes",
            "1000",
            "expected at least max_message_size (65536)",
        ),
        ("io", "fast", "expected one of auto, uring, epoll"),
        ("log_format", "xml", "expected one of text, json"),
        (
            "log_level",
            "inof",
            "expected error, warn, info, debug, trace, off, or a filter like info,arcgate=debug",
        ),
        (
            "jwt_audience",
            " ",
            "expected a non-empty value (leave it out to not check it)",
        ),
    ];
    for (key, value, expected) in cases {
        let mut args = with_secret();
        *args.slot(key).unwrap() = Some(value.to_string());
        assert_eq!(
            one_error(args),
            format!("invalid value {value:?} for {key}: {expected}")
        );
    }
    // The exact text of one message, as the documentation shows it.
    let mut args = with_secret();
    args.jwt_leeway = Some("abc".into());
    let expected =
        "invalid value \"abc\" for jwt_leeway: expected a duration like 500ms, 10s or 2m";
    assert_eq!(one_error(args), expected);
}

#[test]
fn a_larger_message_size_needs_a_larger_outbound_queue() {
    let args = ServeArgs {
        max_message_size: Some("2MiB".into()),
        ..with_secret()
    };
    let expected = "invalid value \"1048576\" for max_outbound_bytes: expected at least max_message_size (2097152)";
    assert_eq!(one_error(args), expected);
    let both = ServeArgs {
        max_message_size: Some("2MiB".into()),
        max_outbound_bytes: Some("4MiB".into()),
        ..with_secret()
    };
    assert_eq!(Config::load(both).unwrap().max_outbound_bytes, 4 << 20);
}

#[test]
fn every_problem_is_reported_at_once() {
    let args = ServeArgs {
        workers: Some("0".into()),
        io: Some("x".into()),
        jwt_leeway: Some("x".into()),
        ..ServeArgs::default()
    };
    let errs = errors(args);
    assert_eq!(errs.len(), 4, "{errs:?}");
    assert!(errs.contains(&NO_KEY.to_string()));
    let joined = ConfigError(errs).to_string();
    assert_eq!(joined.lines().count(), 4);
}

#[test]
fn rate_burst_may_be_zero_when_rate_limit_is_off() {
    let args = ServeArgs {
        rate_limit: Some("0".into()),
        rate_burst: Some("0".into()),
        ..with_secret()
    };
    assert_eq!(Config::load(args).unwrap().rate_limit, 0);
}

#[test]
fn handshake_limits_have_bounds() {
    let load = |pending: &str, head: &str| {
        Config::load(ServeArgs {
            max_pending_handshakes: Some(pending.into()),
            max_header_bytes: Some(head.into()),
            ..with_secret()
        })
    };
    let c = load("16", "16KiB").unwrap();
    assert_eq!((c.max_pending_handshakes, c.max_header_bytes), (16, 16384));
    let d = Config::load(with_secret()).unwrap();
    assert_eq!((d.max_pending_handshakes, d.max_header_bytes), (8192, 8192));
    let errs = load("0", "512").unwrap_err().0;
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].contains("max_pending_handshakes: expected at least 1"));
    assert!(errs[1].contains("max_header_bytes: expected between 1024 and 65536"));
    assert!(load("8", "128KiB").is_err());
}

#[test]
fn origins_must_be_scheme_host_and_port() {
    let load = |v: &str| {
        Config::load(ServeArgs {
            allowed_origins: Some(v.into()),
            ..with_secret()
        })
    };
    let ok = load(" https://Panel.Example.com ,http://localhost:3000,http://[::1]:8080").unwrap();
    let expected = [
        "https://panel.example.com",
        "http://localhost:3000",
        "http://[::1]:8080",
    ];
    assert_eq!(
        ok.allowed_origins.unwrap(),
        expected.map(String::from).to_vec()
    );
    for bad in [
        "panel.example.com",
        "https://",
        "https://a.com/",
        "https://a.com:99999",
        "://a.com",
        "",
    ] {
        let errs = load(bad).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert!(
            errs[0].contains("for allowed_origins: expected origins like https://"),
            "{bad}: {errs:?}"
        );
    }
    let errs = load("https://ok.example,ftp//bad").unwrap_err().0;
    assert_eq!(
        errs,
        vec![format!(
            "invalid value \"ftp//bad\" for allowed_origins: {ORIGINS}"
        )]
    );
}

#[test]
fn durations_sizes_addresses_and_levels_parse() {
    let d = |s: &str| humantime::parse_duration(s).unwrap();
    let args = ServeArgs {
        jwt_leeway: Some("500ms".into()),
        auth_timeout: Some("2m".into()),
        drain_duration: Some("1h 30m".into()),
        max_message_size: Some("64KiB".into()),
        max_outbound_bytes: Some("2MiB".into()),
        listen: Some("localhost:8081".into()),
        admin_listen: Some("[::1]:9091".into()),
        log_level: Some("info,arcgate=debug".into()),
        log_format: Some("JSON".into()),
        io: Some("epoll".into()),
        max_connections: Some("100000".into()),
        ..with_secret()
    };
    let c = Config::load(args).unwrap();
    assert_eq!(c.jwt_leeway, Duration::from_millis(500));
    assert_eq!(c.auth_timeout, d("120s"));
    assert_eq!(c.drain_duration, Duration::from_secs(5400));
    assert_eq!((c.max_message_size, c.max_outbound_bytes), (65536, 2 << 20));
    assert_eq!(c.listen.to_string(), "127.0.0.1:8081");
    assert_eq!(c.admin_listen.to_string(), "[::1]:9091");
    assert_eq!(c.log_level, "info,arcgate=debug");
    assert_eq!((c.log_format, c.io), (LogFormat::Json, IoMode::Epoll));
    assert_eq!(c.max_connections, Some(100000));
    assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
    assert_eq!(parse_bytes("-1"), None);
    assert_eq!(parse_log_level("DEBUG").as_deref(), Some("debug"));
}

#[test]
fn rendering_masks_the_secret_and_reads_back() {
    let args = ServeArgs {
        jwt_issuer: Some("panel".into()),
        allowed_origins: Some("https://a.example".into()),
        ..with_secret()
    };
    let c = Config::load(args).unwrap();
    let text = c.render_masked();
    assert!(text.contains("jwt_secret = \"****\"\n"), "{text}");
    assert!(!text.contains("0123456789abcdef"));
    assert!(text.contains("# jwt_audience: unset (not checked)\n"));
    // What check-config prints is itself a valid file for the same configuration.
    let path = temp_file(
        "render",
        &text.replace("\"****\"", "\"0123456789abcdef0123456789abcdef\""),
    );
    let again = Config::load(ServeArgs {
        config: Some(path),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(again.render_masked(), text);
    assert_eq!(again.jwt_issuer.as_deref(), Some("panel"));
    assert_eq!(again.agent_lease, c.agent_lease);
}

#[test]
fn short_secrets_are_warned_about() {
    let short = Config::load(ServeArgs {
        jwt_secret: Some("abc".into()),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(short.warnings().len(), 1);
    assert!(short.warnings()[0].contains("3 bytes"));
    assert!(Config::load(with_secret()).unwrap().warnings().is_empty());
}

#[test]
fn every_text_key_is_a_flag_and_a_field() {
    use clap::CommandFactory;
    let cmd = Cmd::command();
    let mut flags: Vec<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    flags.retain(|f| f != "config" && f != "dev");
    flags.sort();
    let mut keys: Vec<String> = settings().iter().map(|s| s.name.to_string()).collect();
    keys.sort();
    assert_eq!(flags, keys);
    let mut args = ServeArgs::default();
    for key in settings().iter().map(|s| s.name) {
        *args.slot(key).unwrap() = Some(format!("v-{key}"));
        assert_eq!(args.get(key), Some(format!("v-{key}").as_str()));
    }
    let long = cmd
        .get_arguments()
        .find(|a| a.get_id() == "jwt_leeway")
        .unwrap();
    assert_eq!(long.get_long(), Some("jwt-leeway"));
}

#[test]
fn tls_needs_both_files_and_names_the_bad_one() {
    let half = one_error(ServeArgs {
        tls_cert: Some("/nonexistent/cert.pem".into()),
        ..with_secret()
    });
    assert!(half.contains("tls_cert and tls_key go together"), "{half}");
    let missing = one_error(ServeArgs {
        tls_cert: Some("/nonexistent/cert.pem".into()),
        tls_key: Some("/nonexistent/key.pem".into()),
        ..with_secret()
    });
    assert!(
        missing.contains("/nonexistent/cert.pem: cannot read"),
        "{missing}"
    );
}

#[test]
fn restart_only_settings_come_from_the_table() {
    let restart: Vec<&str> = settings()
        .iter()
        .filter(|s| s.reload == Reload::No)
        .map(|s| s.name)
        .collect();
    let expected = [
        "listen",
        "admin_listen",
        "tls_cert",
        "tls_key",
        "max_connections",
        "max_connection_rate",
        "max_outbound_bytes",
        "max_pending_handshakes",
        "workers",
        "io",
        "nats_url",
        "cluster_name",
        "node_name",
        "node_timeout",
        "nats_creds",
        "nats_tls_ca",
        "log_format",
    ];
    assert_eq!(restart, expected);
    // Changing every setting at once names exactly the restart-only ones.
    let old = Config::load(with_secret()).unwrap();
    let dir = temp_file("restart-only", "").with_file_name("tls");
    let (cert, key) = crate::certs::selfsigned::write_localhost(&dir).unwrap();
    let changed = ServeArgs {
        listen: Some("127.0.0.1:1".into()),
        admin_listen: Some("127.0.0.1:2".into()),
        tls_cert: Some(cert.to_string_lossy().into()),
        tls_key: Some(key.to_string_lossy().into()),
        jwt_secret: Some("another-secret-another-secret-0123".into()),
        jwt_leeway: Some("6s".into()),
        jwt_issuer: Some("i".into()),
        jwt_audience: Some("a".into()),
        auth_timeout: Some("11s".into()),
        handshake_timeout: Some("6s".into()),
        ping_interval: Some("31s".into()),
        pong_timeout: Some("31s".into()),
        agent_lease: Some("91s".into()),
        token_expiry_warning: Some("61s".into()),
        command_timeout: Some("31s".into()),
        rate_limit: Some("101".into()),
        rate_burst: Some("201".into()),
        rate_limit_close_after: Some("11".into()),
        max_message_size: Some("65537".into()),
        max_connections: Some("5".into()),
        max_connection_rate: Some("5".into()),
        max_outbound_bytes: Some("2MiB".into()),
        max_pending_handshakes: Some("5".into()),
        max_header_bytes: Some("8193".into()),
        allowed_origins: Some("https://a.example".into()),
        workers: Some((old.workers + 1).to_string()),
        io: Some("epoll".into()),
        drain_duration: Some("11s".into()),
        nats_url: Some("nats://127.0.0.1:4222".into()),
        cluster_name: Some("other".into()),
        node_name: Some(format!("{}-2", old.node_name)),
        node_timeout: Some("6s".into()),
        nats_creds: Some("/etc/arcgate/nats.creds".into()),
        nats_tls_ca: Some("/etc/arcgate/ca.pem".into()),
        log_format: Some("json".into()),
        log_level: Some("debug".into()),
        ..ServeArgs::default()
    };
    let new = Config::load(changed).unwrap();
    assert_eq!(old.restart_only_changes(&new), expected);
    assert!(old.restart_only_changes(&old.clone()).is_empty());
    // Every setting was changed: only the masked secret, the unset public key and `dev`
    // render the same.
    let (a, b) = (old.render_masked(), new.render_masked());
    let same: Vec<&str> = a
        .lines()
        .zip(b.lines())
        .filter(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect();
    let expected = [
        "jwt_secret = \"****\"",
        "# jwt_public_key: unset",
        "dev = false",
    ];
    assert_eq!(same, expected);
}

#[test]
fn help_and_file_come_from_the_table() {
    let s = setting("max_pending_handshakes");
    assert_eq!(s.env, "ARCGATE_MAX_PENDING_HANDSHAKES");
    assert_eq!(s.default.as_deref(), Some("8192"));
    assert!(s.help().ends_with("[default: 8192]"), "{}", s.help());
    assert_eq!(
        setting("jwt_issuer").shown_default().as_deref(),
        Some("not checked")
    );
    assert_eq!(setting("jwt_secret").shown_default(), None);
    let file = example_file();
    for s in settings() {
        let when = match s.reload {
            Reload::Yes => "[reload]",
            Reload::No => "[restart]",
        };
        let first = format!("\n# {} {when}\n", s.doc[0]);
        assert!(file.contains(&first), "{first}");
        assert!(file.contains(&format!("\n# {} = ", s.name)), "{}", s.name);
    }
}

#[test]
fn bus_settings_default_to_a_node_alone() {
    let c = Config::load(with_secret()).unwrap();
    assert_eq!(c.nats_url, None);
    assert_eq!(c.cluster_name, "arcgate");
    assert_eq!(c.node_timeout, Duration::from_secs(5));
    assert_eq!(
        (c.nats_creds.as_deref(), c.nats_tls_ca.as_deref()),
        (None, None)
    );
    // The host name, made a subject token.
    assert!(
        kinds::Subject.parse(&c.node_name).is_ok(),
        "{}",
        c.node_name
    );
    assert_eq!(c.node_name, kinds::host_name());
}

#[test]
fn bus_settings_are_checked() {
    let c = Config::load(ServeArgs {
        nats_url: Some("nats://10.0.0.5:4222, tls://user:pw@nats.example.com:4443".into()),
        cluster_name: Some("prod_eu-1".into()),
        node_name: Some("gw-1".into()),
        node_timeout: Some("3s".into()),
        ..with_secret()
    })
    .unwrap();
    assert_eq!(
        c.nats_url.as_deref(),
        Some("nats://10.0.0.5:4222,tls://user:pw@nats.example.com:4443")
    );
    assert_eq!(
        (c.cluster_name.as_str(), c.node_name.as_str()),
        ("prod_eu-1", "gw-1")
    );
    assert_eq!(c.node_timeout, Duration::from_secs(3));
    let errs = errors(ServeArgs {
        nats_url: Some("http://nats:4222x".into()),
        cluster_name: Some("a.b".into()),
        node_name: Some("gw*".into()),
        node_timeout: Some("0s".into()),
        ..with_secret()
    });
    assert_eq!(errs.len(), 4, "{errs:?}");
    assert!(
        errs[0].contains("nats_url: expected nats://HOST:PORT"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains("cluster_name: expected 1 to 64 letters"),
        "{errs:?}"
    );
    assert!(
        errs[2].contains("node_name: expected 1 to 64 letters"),
        "{errs:?}"
    );
    assert!(
        errs[3].contains("node_timeout: expected a duration above 0"),
        "{errs:?}"
    );
}
