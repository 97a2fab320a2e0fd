//! The Debian package of scripts/build-deb.sh, built from the debug binaries of this test run
//! (a release build with fat LTO takes minutes): its files, control fields and maintainer
//! scripts (dpkg-deb), and lintian's verdict when lintian is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn found(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// arcgate-load of the same build: `cargo test --workspace` builds it; a nested cargo
/// would wait forever for the build lock this test run holds.
fn load_binary() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_BIN_EXE_arcgate")).parent().unwrap();
    let bin = dir.join("arcgate-load");
    if bin.exists() {
        return Some(bin);
    }
    assert!(
        !in_ci(),
        "{} is missing: CI runs cargo test --workspace",
        bin.display()
    );
    eprintln!(
        "SKIPPED: no {} (cargo build -p arcgate-load, or cargo test --workspace)",
        bin.display()
    );
    None
}

#[test]
fn debian_package_holds_what_an_operator_needs() {
    if !found("dpkg-deb") {
        assert!(!in_ci(), "dpkg-deb is missing: CI runs on Debian");
        eprintln!("SKIPPED: dpkg-deb is not installed; the Debian package was not built");
        return;
    }
    let Some(load) = load_binary() else { return };
    let out = std::env::temp_dir().join(format!("arcgate-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let printed = run(Command::new("bash")
        .arg(root().join("scripts/build-deb.sh"))
        .arg(&out)
        .env("ARCGATE_BIN", env!("CARGO_BIN_EXE_arcgate"))
        .env("ARCGATE_LOAD_BIN", load));
    let deb = PathBuf::from(printed.lines().last().unwrap().trim());
    assert!(deb.exists(), "{printed}");

    // Control fields.
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in\n{info}"))
            .to_string()
    };
    assert_eq!(field("Package"), "arcgate");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    assert!(field("Depends").contains("libc6"), "{info}");

    // Files.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/arcgate",
        "./usr/bin/arcgate-load",
        "./usr/lib/systemd/system/arcgate.service",
        "./usr/lib/systemd/system/arcgate.socket",
        "./usr/lib/sysusers.d/arcgate.conf",
        "./usr/lib/sysctl.d/60-arcgate.conf",
        "./etc/arcgate/arcgate.toml",
        "./usr/share/bash-completion/completions/arcgate",
        "./usr/share/zsh/vendor-completions/_arcgate",
        "./usr/share/fish/vendor_completions.d/arcgate.fish",
        "./usr/share/man/man1/arcgate.1.gz",
        "./usr/share/man/man1/arcgate-serve.1.gz",
        "./usr/share/doc/arcgate/copyright",
        "./usr/share/doc/arcgate/changelog.Debian.gz",
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} missing:\n{listing}"));
        assert!(line.contains("root/root"), "{line}");
        if path.starts_with("./usr/bin/") {
            assert!(line.starts_with("-rwxr-xr-x"), "{line}");
        }
        if path == "./etc/arcgate/arcgate.toml" {
            // It holds the JWT secret; postinst gives it to the arcgate group.
            assert!(line.starts_with("-rw-r-----"), "{line}");
        }
    }
    assert!(!listing.contains("generate-assets"), "{listing}");

    // Contents: the units point at the packaged binary, which runs.
    let tree = out.join("tree");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree));
    let service =
        std::fs::read_to_string(tree.join("usr/lib/systemd/system/arcgate.service")).unwrap();
    assert!(
        service.contains("ExecStart=/usr/bin/arcgate serve --config /etc/arcgate/arcgate.toml"),
        "{service}"
    );
    assert!(!service.contains("/usr/local"), "{service}");
    let version = run(Command::new(tree.join("usr/bin/arcgate")).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("arcgate {}", env!("CARGO_PKG_VERSION"))
    );
    run(Command::new(tree.join("usr/bin/arcgate-load")).arg("--help"));
    let shipped = std::fs::read(tree.join("etc/arcgate/arcgate.toml")).unwrap();
    assert_eq!(
        shipped,
        std::fs::read(root().join("packaging/arcgate.toml")).unwrap()
    );

    // Maintainer scripts: valid shell, and the documented enable/start policy.
    let control = out.join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/arcgate/arcgate.toml");
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        run(Command::new("sh").arg("-n").arg(&path));
        let mode = std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o755, "{script}");
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    for needed in [
        "systemd-sysusers arcgate.conf",
        "deb-systemd-helper enable",
        "daemon-reload",
        "try-restart arcgate.service",
        "chown root:arcgate /etc/arcgate/arcgate.toml",
        "systemd-sysctl 60-arcgate.conf",
    ] {
        assert!(postinst.contains(needed), "postinst lacks {needed}");
    }
    // Enabled, never started by a first install: the shipped configuration has no key yet.
    let code: String = postinst
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        !code.contains("invoke start") && !code.contains("systemctl start"),
        "{postinst}"
    );
    let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
    assert!(
        prerm.contains(r#""$1" = remove"#) && prerm.contains("stop arcgate.service"),
        "{prerm}"
    );
    let postrm = std::fs::read_to_string(control.join("postrm")).unwrap();
    assert!(postrm.contains("deb-systemd-helper purge"), "{postrm}");

    lintian(&deb);
    std::fs::remove_dir_all(&out).unwrap();
}

/// lintian finds nothing but the placeholder maintainer address (set ARCGATE_DEB_MAINTAINER
/// when shipping) and the absence of a Debian bug to close.
fn lintian(deb: &Path) {
    if !found("lintian") {
        eprintln!("SKIPPED: lintian is not installed (apt-get install lintian)");
        return;
    }
    let out = Command::new("lintian")
        .args([
            "--suppress-tags",
            "bogus-mail-host,bogus-mail-host-in-debian-changelog,initial-upload-closes-no-bugs",
        ])
        .arg(deb)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let findings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(
        findings.is_empty(),
        "lintian:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
