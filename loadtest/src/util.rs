//! Clocks, a small random number generator, and the parsing of durations and address ranges.

use std::net::Ipv4Addr;
use std::time::Duration;

/// Nanoseconds of CLOCK_MONOTONIC: one clock for every process on the machine, so a send
/// time written by one worker process can be compared with a receive time in another.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Unix time in seconds.
pub fn unix_s() -> u64 {
    unix_ms() / 1000
}

/// xorshift64*: fast and good enough for jitter, masks and picking agents (not for secrets).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from the operating system.
    pub fn from_os() -> Rng {
        let mut seed = [0u8; 8];
        if getrandom::fill(&mut seed).is_err() {
            seed = mono_ns().to_le_bytes();
        }
        Rng::new(u64::from_le_bytes(seed))
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

/// A duration like `30s`, `500ms`, `5m` (humantime), or `0` for none.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))
}

/// Source addresses: `127.0.0.1-127.0.0.20` (a range), `a,b,c` (a list), or a mix.
pub fn parse_sources(s: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: Ipv4Addr = lo.parse().map_err(|_| format!("bad address {lo:?}"))?;
        let hi: Ipv4Addr = hi.parse().map_err(|_| format!("bad address {hi:?}"))?;
        let (lo, hi) = (u32::from(lo), u32::from(hi));
        if hi < lo || hi - lo > 65_535 {
            return Err(format!("bad address range {part:?}"));
        }
        out.extend((lo..=hi).map(Ipv4Addr::from));
    }
    if out.is_empty() {
        return Err("no source address given".into());
    }
    Ok(out)
}

/// Appends the decimal digits of `n`.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The unsigned decimal number at the start of `b` (None without a digit).
pub fn leading_u64(b: &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    let mut any = false;
    for &c in b {
        if !c.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_lists_of_sources() {
        let v = parse_sources("127.0.0.1-127.0.0.3,127.0.0.9").unwrap();
        assert_eq!(
            v,
            ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.9"]
                .map(|s| s.parse::<Ipv4Addr>().unwrap())
        );
        assert!(parse_sources("127.0.0.5-127.0.0.1").is_err());
        assert!(parse_sources("nope").is_err());
    }

    #[test]
    fn digits_round_trip() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut v = Vec::new();
            push_u64(&mut v, n);
            assert_eq!(String::from_utf8(v.clone()).unwrap(), n.to_string());
            v.push(b',');
            assert_eq!(leading_u64(&v), Some(n));
        }
        assert_eq!(leading_u64(b"x1"), None);
        assert_eq!(leading_u64(b"99999999999999999999999"), None);
    }

    #[test]
    fn below_stays_in_range_and_spreads() {
        let mut r = Rng::new(42);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[r.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800 && c < 1200), "{seen:?}");
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a && a > 0);
    }
}
