//! The settings as the binary shows them: `serve --help` gives each default that `check-config` prints, the shipped example file is what `example-config` writes, and every variable is read.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// The binary with no `ARCGATE_*` variable of the test's own environment.
fn arcgate(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arcgate"));
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ARCGATE_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// `--flag` → the text of its `[default: …]` in `serve --help`, `None` when it shows none.
fn help_defaults() -> BTreeMap<String, Option<String>> {
    let help = stdout(&arcgate(&["serve", "--help"]).output().unwrap());
    let mut out = BTreeMap::new();
    for line in help.lines().map(str::trim_start) {
        let Some(rest) = line.strip_prefix("--") else {
            continue;
        };
        let flag = rest.split([' ', '[']).next().unwrap().to_string();
        let default = line
            .split_once("[default: ")
            .map(|(_, d)| d.split_once(']').unwrap().0.to_string());
        out.insert(flag, default);
    }
    out
}

/// Each line of `check-config` as (key, value without quotes) or (key, "# " + its comment).
fn effective(extra: &[&str]) -> BTreeMap<String, String> {
    let mut args = vec!["check-config", "--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    let text = stdout(&arcgate(&args).output().unwrap());
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let (key, note) = comment.split_once(": ").unwrap();
            out.insert(key.to_string(), format!("# {note}"));
        } else {
            let (key, value) = line.split_once(" = ").unwrap();
            out.insert(key.to_string(), value.trim_matches('"').to_string());
        }
    }
    out
}

#[test]
fn help_shows_the_defaults_check_config_prints() {
    let help = help_defaults();
    let effective = effective(&[]);
    let mut compared = 0;
    for (key, value) in &effective {
        let flag = key.replace('_', "-");
        let shown = help
            .get(&flag)
            .unwrap_or_else(|| panic!("--{flag} is not in serve --help"));
        match (shown.as_deref(), value.strip_prefix("# ")) {
            // Given on the command line, so its default is not what check-config shows.
            _ if key == "jwt_secret" => continue,
            (None, None) => panic!("--{flag} shows no default; check-config prints {value}"),
            (None, Some(note)) => assert_eq!(note, "unset", "--{flag}"),
            (Some(words), Some(note)) => {
                assert_eq!(note, format!("unset ({words})"), "--{flag}")
            }
            (Some("number of cores"), None) => {
                let cores = std::thread::available_parallelism().unwrap().get();
                assert_eq!(value, &cores.to_string(), "--{flag}");
            }
            (Some("the host name"), None) => {
                let token = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
                assert!(
                    !value.is_empty() && value.chars().all(token),
                    "--{flag}: {value}"
                );
            }
            (Some(shown), None) => assert_eq!(shown, value, "--{flag}"),
        }
        compared += 1;
    }
    assert!(compared >= 28, "{effective:?}");
    assert_eq!(
        help["max-pending-handshakes"].as_deref(),
        Some("8192"),
        "{help:?}"
    );
}

#[test]
fn the_shipped_example_file_is_what_example_config_prints() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/arcgate.toml");
    let shipped = std::fs::read_to_string(shipped).unwrap();
    let printed = stdout(&arcgate(&["example-config"]).output().unwrap());
    assert!(
        shipped == printed,
        "packaging/arcgate.toml is stale: write it with \
         `cargo run -- example-config > packaging/arcgate.toml`"
    );
}

#[test]
fn example_file_shows_each_default_check_config_prints() {
    let text = stdout(&arcgate(&["example-config"]).output().unwrap());
    let effective = effective(&[]);
    let mut seen = 0;
    for line in text.lines() {
        let entry = line.strip_prefix("# ").and_then(|l| l.split_once(" = "));
        let Some((key, value)) = entry.filter(|(k, _)| !k.contains(' ')) else {
            continue;
        };
        seen += 1;
        let Some(current) = effective.get(key) else {
            assert_eq!(key, "dev");
            continue;
        };
        // Unset keys and machine-dependent defaults show an example instead.
        if !current.starts_with('#') && !matches!(key, "jwt_secret" | "workers" | "node_name") {
            assert_eq!(value.trim_matches('"'), current, "{line}");
        }
    }
    assert_eq!(seen, effective.len(), "{text}");
}

#[test]
fn every_setting_is_read_from_its_variable() {
    let effective = effective(&[]);
    for key in effective.keys() {
        let var = format!("ARCGATE_{}", key.to_ascii_uppercase());
        let out = arcgate(&["check-config", "--jwt-secret", SECRET])
            .env(&var, "not-a-value")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // A value no setting accepts names the key; the secret, paths and names (a
        // subject token like "not-a-value") take it.
        match key.as_str() {
            "jwt_secret" | "dev" => {}
            "jwt_public_key" => assert!(
                err.contains("jwt_secret and jwt_public_key"),
                "{var}: {err}"
            ),
            "tls_cert" | "tls_key" => assert!(
                err.contains("tls_cert and tls_key go together"),
                "{var}: {err}"
            ),
            "jwt_issuer" | "jwt_audience" | "cluster_name" | "node_name" | "nats_creds"
            | "nats_tls_ca" => {
                let text = stdout(&out);
                assert!(
                    text.contains(&format!("{key} = \"not-a-value\"\n")),
                    "{var}: {text}"
                );
            }
            _ => assert!(
                err.contains(&format!("invalid value \"not-a-value\" for {key}: ")),
                "{var}: {err}"
            ),
        }
    }
}

fn read_doc(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The same value written two ways (`90s` and `1m 30s`, `"auto"` and `auto`) compares equal.
fn same_value(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_matches('"'), b.trim_matches('"'));
    match (humantime::parse_duration(a), humantime::parse_duration(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

#[test]
fn readme_table_gives_the_declared_defaults() {
    let readme = read_doc("README.md");
    let mut checked = 0;
    for row in readme.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        // The backticked parts: the flags, and the defaults written as values.
        let quoted = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect()
        };
        let (flags, defaults) = (quoted(cells[0]), quoted(cells[1]));
        for (i, flag) in flags.iter().enumerate() {
            let key = flag[2..].split(' ').next().unwrap().replace('-', "_");
            let Some(setting) = arcgate::config::settings().iter().find(|s| s.name == key) else {
                continue;
            };
            let Some(value) = defaults.get(i).or(defaults.first()) else {
                continue;
            };
            let declared = setting.default.as_deref().unwrap_or_default();
            assert!(same_value(value, declared), "{row}: {key} is {declared}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
}

#[test]
fn operations_guide_names_the_restart_only_settings() {
    use arcgate::config::Reload;
    let guide = read_doc("docs/operations.md").replace('\n', " ");
    let list = guide
        .split_once("The other keys (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(list, _)| list)
        .unwrap();
    let mut named: Vec<&str> = list
        .split(',')
        .map(|k| k.trim().trim_matches('`'))
        .collect();
    let mut declared: Vec<&str> = arcgate::config::settings()
        .iter()
        .filter(|s| s.reload == Reload::No)
        .map(|s| s.name)
        .collect();
    named.sort();
    declared.sort();
    assert_eq!(named, declared);
}
