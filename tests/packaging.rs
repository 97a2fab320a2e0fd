//! The files that install arcgate: the systemd units (checked with systemd-analyze when it
//! is installed, and required in CI), the sysctl settings and the example configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("arcgate-packaging-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The unit files, with `ExecStart` pointing at the binary just built (verify checks it).
fn unit_dir() -> PathBuf {
    let dir = temp_path("units");
    std::fs::create_dir_all(&dir).unwrap();
    let root = root().join("systemd");
    for name in ["arcgate.service", "arcgate.socket"] {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        let text = text.replace("/usr/local/bin/arcgate", env!("CARGO_BIN_EXE_arcgate"));
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

fn systemd_analyze() -> Option<()> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(());
    }
    // CI (CI=true, as CI services and .ci/run set it) must check the units, not skip them.
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "systemd-analyze is not installed, and CI must check the unit files (apt-get install systemd)"
    );
    eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
    None
}

#[test]
fn unit_files_verify() {
    if systemd_analyze().is_none() {
        return;
    }
    let dir = unit_dir();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("arcgate.service"))
        .arg(dir.join("arcgate.socket"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines about the host's own units are not ours to judge.
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("arcgate")).collect();
    assert!(out.status.success() && ours.is_empty(), "{text}");
}

#[test]
fn unit_file_exposure_is_at_most_2() {
    if systemd_analyze().is_none() {
        return;
    }
    let dir = unit_dir();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(dir.join("arcgate.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure line: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line}"));
    assert!(score <= 2.0, "{line}\n{text}");
}

#[test]
fn every_sysctl_setting_says_why() {
    let text = std::fs::read_to_string(root().join("packaging/sysctl.d/60-arcgate.conf")).unwrap();
    let mut previous = "";
    let mut settings = 0;
    for line in text.lines() {
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{line}"));
            let key = key.trim().trim_start_matches('-');
            assert!(key.contains('.') && !value.trim().is_empty(), "{line}");
            // A comment right above each setting, or a setting of the same group.
            assert!(
                previous.starts_with('#') || previous.contains('='),
                "no reason for {line}"
            );
            settings += 1;
        }
        previous = line;
    }
    for key in [
        "net.core.somaxconn",
        "net.ipv4.tcp_mem",
        "net.ipv4.ip_local_port_range",
        "fs.nr_open",
    ] {
        assert!(text.contains(&format!("{key} =")), "{key} missing");
    }
    assert!(settings >= 10);
}

#[test]
fn example_configuration_documents_every_key_and_its_values_are_valid() {
    let path = root().join("packaging/arcgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut keys: Vec<&str> = arcgate::config::settings().iter().map(|s| s.name).collect();
    keys.push("dev");
    for key in &keys {
        assert!(
            text.contains(&format!("\n# {key} = ")),
            "{key} is not documented"
        );
    }
    // Every example value, uncommented, is accepted (one key source at a time).
    let uncommented: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| keys.iter().any(|k| l.starts_with(&format!("{k} = "))))
        // Files that exist only on a real host.
        .filter(|l| !l.starts_with("jwt_public_key") && !l.starts_with("tls_"))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = temp_path("arcgate.toml");
    std::fs::write(&file, &uncommented).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_arcgate"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{uncommented}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // As shipped, with everything commented, only the key is missing.
    let out = Command::new(env!("CARGO_BIN_EXE_arcgate"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no key to verify tokens"),
        "{err}"
    );
}
