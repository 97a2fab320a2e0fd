//! Faults injected on demand in debug builds only (`ARCGATE_FAULT`), so that tests can make a worker die the ways real code can.
//!
//! `ARCGATE_FAULT=setup:<worker>`: that worker's loop setup fails (as a ring the kernel
//! refuses after the probe would). `ARCGATE_FAULT=wake:<worker>`: that worker panics at its
//! first wake-up (outside the per-connection guard, as a bug in wake handling would).
//! Release builds read nothing and every check is `false`.

/// Whether `ARCGATE_FAULT` asks for fault `kind` in worker `worker`.
#[cfg(debug_assertions)]
fn injected(kind: &str, worker: u16) -> bool {
    use std::sync::OnceLock;
    static FAULT: OnceLock<Option<(String, u16)>> = OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var("ARCGATE_FAULT").ok()?;
        let (k, w) = v.split_once(':')?;
        Some((k.to_string(), w.parse().ok()?))
    });
    fault
        .as_ref()
        .is_some_and(|(k, w)| k == kind && *w == worker)
}

#[cfg(not(debug_assertions))]
fn injected(_kind: &str, _worker: u16) -> bool {
    false
}

/// Worker `worker`'s loop setup is to fail.
pub fn setup_fails(worker: u16) -> bool {
    injected("setup", worker)
}

/// Worker `worker` is to panic when woken.
pub fn panics_on_wake(worker: u16) -> bool {
    injected("wake", worker)
}
