//! The kinds of setting values: how each is parsed from text, what it allows, how it is written back.

use std::net::SocketAddr;
use std::time::Duration;

/// What a refused value allowed; `part` names the piece at fault when it is not the whole
/// value (one origin of a list). `{default}` in `expected` is replaced by the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub part: Option<String>,
    pub expected: String,
}

fn refuse<T>(expected: impl Into<String>) -> Result<T, Vec<Refusal>> {
    Err(vec![Refusal {
        part: None,
        expected: expected.into(),
    }])
}

/// How a setting of type `T` is read from the text of a flag, variable or file entry.
pub trait Kind<T> {
    /// The placeholder of the flag in `--help`.
    fn value_name(&self) -> &'static str;
    /// Parses the text as given (kinds that ignore surrounding blanks trim it themselves).
    fn parse(&self, text: &str) -> Result<T, Vec<Refusal>>;
    /// The value as a TOML value; `None` when unset.
    fn toml(&self, value: &T) -> Option<String>;
    /// A TOML array of strings is accepted and joined with commas.
    fn list(&self) -> bool {
        false
    }
    /// A relative path in the file is relative to the file.
    fn path(&self) -> bool {
        false
    }
    /// Values are never shown (`--help` hides the variable's value, rendering masks it).
    fn secret(&self) -> bool {
        false
    }
}

pub const DURATION: &str = "expected a duration like 500ms, 10s or 2m";
pub const WHOLE: &str = "expected a whole number";
pub const BYTES: &str = "expected a size in bytes, like 65536, 64KiB or 1MiB";
pub const ORIGINS: &str =
    "expected origins like https://panel.example.com or http://localhost:3000, \
separated by commas";
const LOG_LEVEL: &str =
    "expected error, warn, info, debug, trace, off, or a filter like info,arcgate=debug";

fn quoted(s: &str) -> Option<String> {
    Some(format!("{s:?}"))
}

/// `host:port`, or `localhost:port`.
pub struct Addr;

impl Kind<SocketAddr> for Addr {
    fn value_name(&self) -> &'static str {
        "ADDR"
    }
    fn parse(&self, text: &str) -> Result<SocketAddr, Vec<Refusal>> {
        parse_addr(text.trim()).map_or_else(|| refuse("expected an address like {default}"), Ok)
    }
    fn toml(&self, value: &SocketAddr) -> Option<String> {
        quoted(&value.to_string())
    }
}

/// A duration like `500ms`; `Dur { positive: true }` refuses zero.
pub struct Dur {
    pub positive: bool,
}

impl Kind<Duration> for Dur {
    fn value_name(&self) -> &'static str {
        "DUR"
    }
    fn parse(&self, text: &str) -> Result<Duration, Vec<Refusal>> {
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() && self.positive => {
                refuse("expected a duration above 0, like 500ms, 10s or 2m")
            }
            Ok(d) => Ok(d),
            Err(_) => refuse(DURATION),
        }
    }
    fn toml(&self, value: &Duration) -> Option<String> {
        quoted(&humantime::format_duration(*value).to_string())
    }
}

/// A whole number of at least `min`.
pub struct AtLeast<T>(pub T);

impl<T> Kind<T> for AtLeast<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    fn value_name(&self) -> &'static str {
        "N"
    }
    fn parse(&self, text: &str) -> Result<T, Vec<Refusal>> {
        match text.trim().parse::<T>() {
            Ok(n) if n < self.0 => refuse(format!("expected at least {}", self.0)),
            Ok(n) => Ok(n),
            Err(_) => refuse(WHOLE),
        }
    }
    fn toml(&self, value: &T) -> Option<String> {
        Some(value.to_string())
    }
}

/// A byte count like `65536` or `64KiB`, between `min` and `max`.
pub struct Bytes {
    pub min: usize,
    pub max: usize,
}

impl Bytes {
    /// Any size.
    pub const ANY: Bytes = Bytes {
        min: 0,
        max: usize::MAX,
    };
}

impl Kind<usize> for Bytes {
    fn value_name(&self) -> &'static str {
        "BYTES"
    }
    fn parse(&self, text: &str) -> Result<usize, Vec<Refusal>> {
        match parse_bytes(text.trim()) {
            Some(n) if (self.min..=self.max).contains(&n) => Ok(n),
            Some(_) => refuse(format!(
                "expected between {} and {} ({})",
                self.min,
                self.max,
                binary_size(self.max)
            )),
            None => refuse(BYTES),
        }
    }
    fn toml(&self, value: &usize) -> Option<String> {
        Some(value.to_string())
    }
}

/// `64 MiB` for 67108864: the largest binary unit that divides the size.
fn binary_size(n: usize) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} B")
}

/// One of a few names (any case), each standing for a value.
pub struct Choice<T: 'static>(pub &'static str, pub &'static [(&'static str, T)]);

impl<T: Copy + PartialEq> Kind<T> for Choice<T> {
    fn value_name(&self) -> &'static str {
        self.0
    }
    fn parse(&self, text: &str) -> Result<T, Vec<Refusal>> {
        let text = text.trim();
        match self.1.iter().find(|(n, _)| n.eq_ignore_ascii_case(text)) {
            Some((_, v)) => Ok(*v),
            None => {
                let names: Vec<&str> = self.1.iter().map(|(n, _)| *n).collect();
                refuse(format!("expected one of {}", names.join(", ")))
            }
        }
    }
    fn toml(&self, value: &T) -> Option<String> {
        self.1
            .iter()
            .find(|(_, v)| v == value)
            .and_then(|(n, _)| quoted(n))
    }
}

/// Free text that must not be blank (blank reads as a mistake, not as unset).
pub struct Text(pub &'static str);

impl Kind<String> for Text {
    fn value_name(&self) -> &'static str {
        self.0
    }
    fn parse(&self, text: &str) -> Result<String, Vec<Refusal>> {
        match text.trim().is_empty() {
            true => refuse("expected a non-empty value (leave it out to not check it)"),
            false => Ok(text.to_string()),
        }
    }
    fn toml(&self, value: &String) -> Option<String> {
        quoted(value)
    }
}

/// A NATS subject token: letters, digits, `-` and `_` (no dots, no wildcards).
pub struct Subject;

impl Kind<String> for Subject {
    fn value_name(&self) -> &'static str {
        "NAME"
    }
    fn parse(&self, text: &str) -> Result<String, Vec<Refusal>> {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        match !text.is_empty() && text.len() <= 64 && text.chars().all(ok) {
            true => Ok(text.to_string()),
            false => refuse("expected 1 to 64 letters, digits, '-' or '_'"),
        }
    }
    fn toml(&self, value: &String) -> Option<String> {
        quoted(value)
    }
}

/// The host name as a subject token: other characters (the dots of a domain) become `-`.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a live buffer.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name: String = String::from_utf8_lossy(&buf[..end])
        .chars()
        .take(64)
        .map(|c| match c.is_ascii_alphanumeric() || c == '_' {
            true => c,
            false => '-',
        })
        .collect();
    match ok && !name.is_empty() {
        true => name,
        false => "arcgate".to_string(),
    }
}

/// NATS server URLs separated by commas: `nats://`, `tls://` or a bare `host:port`.
pub struct NatsUrls;

impl Kind<String> for NatsUrls {
    fn value_name(&self) -> &'static str {
        "URL"
    }
    fn parse(&self, text: &str) -> Result<String, Vec<Refusal>> {
        let items: Vec<&str> = text.split(',').map(str::trim).collect();
        let good = |item: &str| {
            let rest = ["nats://", "tls://"]
                .iter()
                .find_map(|s| item.strip_prefix(s))
                .unwrap_or(item);
            let host_port = rest.rsplit('@').next().unwrap_or(rest);
            matches!(host_port.rsplit_once(':'), Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok())
                && !item.contains(char::is_whitespace)
        };
        match items.iter().all(|i| good(i)) {
            true => Ok(items.join(",")),
            false => {
                refuse("expected nats://HOST:PORT or tls://HOST:PORT, several separated by commas")
            }
        }
    }
    fn toml(&self, value: &String) -> Option<String> {
        quoted(value)
    }
}

/// A secret, taken as given (the verifier judges it) and never shown.
pub struct Secret;

impl Kind<String> for Secret {
    fn value_name(&self) -> &'static str {
        "SECRET"
    }
    fn parse(&self, text: &str) -> Result<String, Vec<Refusal>> {
        Ok(text.to_string())
    }
    fn toml(&self, _: &String) -> Option<String> {
        quoted("****")
    }
    fn secret(&self) -> bool {
        true
    }
}

/// A file path, relative to the configuration file when given there.
pub struct File(pub &'static str);

impl Kind<String> for File {
    fn value_name(&self) -> &'static str {
        self.0
    }
    fn parse(&self, text: &str) -> Result<String, Vec<Refusal>> {
        Ok(text.to_string())
    }
    fn toml(&self, value: &String) -> Option<String> {
        quoted(value)
    }
    fn path(&self) -> bool {
        true
    }
}

/// Browser origins, `scheme://host[:port]`, lowercased.
pub struct Origins;

impl Kind<Vec<String>> for Origins {
    fn value_name(&self) -> &'static str {
        "A,B"
    }
    fn parse(&self, text: &str) -> Result<Vec<String>, Vec<Refusal>> {
        let items: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            return refuse(ORIGINS);
        }
        let (good, bad): (Vec<_>, Vec<_>) = items
            .into_iter()
            .map(|item| parse_origin(item).ok_or(item))
            .partition(Result::is_ok);
        if bad.is_empty() {
            return Ok(good.into_iter().flatten().collect());
        }
        let refusal = |item: &str| Refusal {
            part: Some(item.to_string()),
            expected: ORIGINS.to_string(),
        };
        Err(bad
            .into_iter()
            .filter_map(Result::err)
            .map(refusal)
            .collect())
    }
    fn toml(&self, value: &Vec<String>) -> Option<String> {
        Some(format!("{value:?}"))
    }
    fn list(&self) -> bool {
        true
    }
}

/// A log level or a `tracing` filter.
pub struct LogLevel;

impl Kind<String> for LogLevel {
    fn value_name(&self) -> &'static str {
        "LEVEL"
    }
    fn parse(&self, text: &str) -> Result<String, Vec<Refusal>> {
        parse_log_level(text.trim()).map_or_else(|| refuse(LOG_LEVEL), Ok)
    }
    fn toml(&self, value: &String) -> Option<String> {
        quoted(value)
    }
}

/// A setting that may stay unset (`None`).
pub struct Unset<K>(pub K);

impl<T, K: Kind<T>> Kind<Option<T>> for Unset<K> {
    fn value_name(&self) -> &'static str {
        self.0.value_name()
    }
    fn parse(&self, text: &str) -> Result<Option<T>, Vec<Refusal>> {
        self.0.parse(text).map(Some)
    }
    fn toml(&self, value: &Option<T>) -> Option<String> {
        value.as_ref().and_then(|v| self.0.toml(v))
    }
    fn list(&self) -> bool {
        self.0.list()
    }
    fn path(&self) -> bool {
        self.0.path()
    }
    fn secret(&self) -> bool {
        self.0.secret()
    }
}

pub fn parse_addr(s: &str) -> Option<SocketAddr> {
    if let Ok(addr) = s.parse() {
        return Some(addr);
    }
    // The one name worth accepting without a resolver.
    let port = s.strip_prefix("localhost:")?.parse().ok()?;
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A byte count, optionally with a binary suffix (KiB, MiB, GiB).
pub fn parse_bytes(s: &str) -> Option<usize> {
    let units = [("KiB", 1usize << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)];
    for (suffix, factor) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.trim().parse::<usize>().ok()?.checked_mul(factor);
        }
    }
    s.parse().ok()
}

pub fn parse_log_level(s: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let lower = s.to_ascii_lowercase();
    if LEVELS.contains(&lower.as_str()) {
        return Some(lower);
    }
    // A bare word would pass as a target name: only accept real filter syntax.
    if s.contains('=') || s.contains(',') {
        return tracing_subscriber::EnvFilter::try_new(s)
            .ok()
            .map(|_| s.to_string());
    }
    None
}

/// `scheme://host[:port]`, lowercased (origins compare case-insensitively).
fn parse_origin(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok || rest.is_empty() {
        return None;
    }
    let (host, port) = split_host_port(rest)?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c));
    if !host_ok || port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return None;
    }
    Some(s.to_ascii_lowercase())
}

fn split_host_port(rest: &str) -> Option<(&str, Option<&str>)> {
    if rest.starts_with('[') {
        let end = rest.find(']')?;
        let (host, after) = rest.split_at(end + 1);
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    match rest.split_once(':') {
        Some((host, port)) => Some((host, Some(port))),
        None => Some((rest, None)),
    }
}
