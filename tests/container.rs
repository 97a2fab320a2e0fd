//! The container files (no container engine runs here): the seccomp profile is Docker's
//! default plus io_uring, and the Containerfile builds on bookworm and runs unprivileged.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The profile's rules, and the names that are allowed whatever the capabilities,
/// architecture or arguments.
fn profile() -> (Value, BTreeSet<String>) {
    let profile: Value = serde_json::from_str(&read("packaging/container/seccomp-io_uring.json"))
        .expect("the seccomp profile is valid JSON");
    let mut unconditional = BTreeSet::new();
    for rule in profile["syscalls"].as_array().expect("syscalls") {
        let names = rule["names"].as_array().expect("names");
        assert!(!names.is_empty(), "{rule}");
        let action = rule["action"].as_str().expect("action");
        assert!(
            ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"].contains(&action),
            "{rule}"
        );
        let conditional = ["args", "includes", "excludes"]
            .iter()
            .any(|k| rule.get(*k).is_some_and(|v| !v.is_null()));
        if action == "SCMP_ACT_ALLOW" && !conditional {
            unconditional.extend(names.iter().map(|n| n.as_str().unwrap().to_string()));
        }
    }
    (profile, unconditional)
}

#[test]
fn seccomp_profile_is_dockers_default_plus_io_uring() {
    let (profile, allowed) = profile();
    // Anything not listed fails with EPERM, as in Docker's default.
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    assert_eq!(profile["defaultErrnoRet"], 1);
    let arches: Vec<&str> = profile["archMap"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["architecture"].as_str().unwrap())
        .collect();
    assert!(arches.contains(&"SCMP_ARCH_X86_64") && arches.contains(&"SCMP_ARCH_AARCH64"));

    for name in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(name), "{name} is not allowed");
    }
    // What the gateway and its runtime use besides io_uring, and a sample of Docker's
    // default allow list: a profile missing any of these is not the default one.
    for name in [
        "accept4",
        "bind",
        "listen",
        "setsockopt",
        "getsockopt",
        "epoll_create1",
        "epoll_ctl",
        "epoll_wait",
        "epoll_pwait",
        "eventfd2",
        "read",
        "write",
        "readv",
        "writev",
        "recvfrom",
        "sendto",
        "sendmsg",
        "close",
        "shutdown",
        "mmap",
        "munmap",
        "mprotect",
        "madvise",
        "brk",
        "futex",
        "getrandom",
        "clock_gettime",
        "clock_nanosleep",
        "rt_sigaction",
        "rt_sigprocmask",
        "sigaltstack",
        "sched_getaffinity",
        "sched_yield",
        "prlimit64",
        "getrlimit",
        "setrlimit",
        "statx",
        "openat",
        "fcntl",
        "ioctl",
        "set_robust_list",
        "rseq",
        "exit_group",
        "tgkill",
        "timerfd_create",
        "pipe2",
        "uname",
        "gettid",
        "getpid",
        "memfd_create",
        "landlock_create_ruleset",
    ] {
        assert!(allowed.contains(name), "{name} is not allowed");
    }
    // socket (all but AF_VSOCK), clone (no namespace flags) and personality stay
    // argument-checked, as Docker has them; privileged calls need their capability.
    for name in [
        "socket",
        "clone",
        "clone3",
        "personality",
        "mount",
        "umount2",
        "unshare",
        "setns",
        "bpf",
        "ptrace",
        "kexec_load",
        "init_module",
        "reboot",
        "swapon",
        "keyctl",
        "add_key",
        "userfaultfd",
        "perf_event_open",
        "open_by_handle_at",
        "chroot",
    ] {
        assert!(!allowed.contains(name), "{name} is allowed unconditionally");
    }
    // glibc falls back to clone when clone3 answers ENOSYS.
    let clone3 = profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["names"] == serde_json::json!(["clone3"]))
        .expect("a clone3 rule");
    assert_eq!(
        (&clone3["action"], &clone3["errnoRet"]),
        (&Value::from("SCMP_ACT_ERRNO"), &Value::from(38))
    );
    assert!(allowed.len() > 300, "{} names", allowed.len());
}

#[test]
fn containerfile_builds_on_bookworm_and_runs_unprivileged() {
    let text = read("packaging/container/Containerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(
        froms[0].contains("bookworm") && froms[0].ends_with(" AS build"),
        "{froms:?}"
    );
    assert_eq!(froms[1], "FROM debian:bookworm-slim");
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "{user}"
    );
    // The runtime stage ends as that user, with the binary as its entry point.
    let runtime = &text[text.find(froms[1]).unwrap()..];
    assert!(runtime.contains("USER "), "{runtime}");
    assert!(runtime.contains("ENTRYPOINT [\"/usr/bin/arcgate\"]"));
    assert!(runtime.contains("COPY --from=build"));
    assert!(text.contains("--security-opt seccomp=packaging/container/seccomp-io_uring.json"));
    for flag in ["--locked", "--release"] {
        assert!(text.contains(flag), "{flag}");
    }
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l == "target"), "{ignore}");
}
