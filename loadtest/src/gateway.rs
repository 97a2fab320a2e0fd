//! The gateway process as the load generator sees it: CPU time and memory from /proc.

const SEC: u64 = 1_000_000_000;

/// CPU time and resident memory of the gateway process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_ns: u64,
    /// The part of `cpu_ns` spent in the kernel on the process's behalf.
    pub system_ns: u64,
    pub rss_bytes: u64,
}

pub fn sample_proc(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    let page = if page > 0 { page as u64 } else { 4096 };
    Some(ProcSample {
        cpu_ns: (utime + stime) * (SEC / hz),
        system_ns: stime * (SEC / hz),
        rss_bytes: rss_pages * page,
    })
}

/// The gateway as seen during the run.
#[derive(Debug, Clone, Default)]
pub struct GatewaySeen {
    pub pid: u32,
    pub before: Option<ProcSample>,
    pub at_t0: Option<ProcSample>,
    pub at_t1: Option<ProcSample>,
    pub peak_rss: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let s = sample_proc(std::process::id()).expect("/proc of this process");
        assert!(s.rss_bytes > 0);
        assert!(sample_proc(u32::MAX).is_none());
    }
}
