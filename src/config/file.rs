//! The `--config` TOML file: read into the shape of the flags; the example file written from the table.

use std::fmt::Write as _;
use std::path::Path;

use super::declare::Reload;
use super::{settings, ServeArgs};

/// Fills every key not given as flag or environment from the file.
pub fn overlay(args: &mut ServeArgs, file: ServeArgs) {
    let mut file = file;
    for s in settings() {
        if let (Some(slot), Some(from_file)) = (args.slot(s.name), file.slot(s.name)) {
            if slot.is_none() {
                *slot = from_file.take();
            }
        }
    }
    if args.dev.is_none() {
        args.dev = file.dev;
    }
}

/// Reads the TOML file into the same shape as the flags, with the problems of its
/// entries (unknown keys, values of the wrong type); an unreadable file is an error.
pub fn read(path: &Path) -> Result<(ServeArgs, Vec<String>), String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {shown}: {e}"))?;
    let table = toml::from_str::<toml::Table>(&text)
        .map_err(|e| format!("config file {shown}: {}", one_line(&e.to_string())))?;
    let mut out = ServeArgs::default();
    let mut errors = Vec::new();
    for (key, value) in table {
        if let Err(e) = entry(&mut out, path, &key, &value) {
            errors.push(e);
        }
    }
    Ok((out, errors))
}

fn entry(out: &mut ServeArgs, path: &Path, key: &str, value: &toml::Value) -> Result<(), String> {
    let shown = path.display();
    let bad = |expected: &str| {
        format!("invalid value {value} for {key} in config file {shown}: {expected}")
    };
    if key == "dev" {
        out.dev = Some(
            value
                .as_bool()
                .ok_or_else(|| bad("expected true or false"))?,
        );
        return Ok(());
    }
    let (list, is_path) = ServeArgs::file_shape(key)
        .ok_or_else(|| format!("config file {shown}: unknown key \"{key}\""))?;
    let text = value_text(value, list).map_err(bad)?;
    let text = match is_path {
        true => relative_to(path, &text),
        false => text,
    };
    if let Some(slot) = out.slot(key) {
        *slot = Some(text);
    }
    Ok(())
}

/// A file value as the text a flag would carry (an array only where `list` allows it).
fn value_text(value: &toml::Value, list: bool) -> Result<String, &'static str> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Array(items) if list => {
            let texts: Option<Vec<&str>> = items.iter().map(toml::Value::as_str).collect();
            texts
                .map(|t| t.join(","))
                .ok_or("expected an array of strings")
        }
        _ => Err("expected a single value"),
    }
}

/// A relative key path in the file is relative to the file, not to the working directory.
fn relative_to(config_file: &Path, path: &str) -> String {
    let p = Path::new(path);
    match config_file.parent() {
        Some(dir) if p.is_relative() && !dir.as_os_str().is_empty() => {
            dir.join(p).to_string_lossy().into_owned()
        }
        _ => path.to_string(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

const EXAMPLE_HEAD: &str = "\
# /etc/arcgate/arcgate.toml: the configuration of `arcgate serve --config`.
#
# Every key is shown with its default, commented out (`arcgate example-config` prints this
# file). Precedence: defaults < this file < ARCGATE_<KEY> environment variables <
# command-line flags (--<key> in kebab-case). Durations are written 500ms, 10s, 2m; sizes
# in bytes or with KiB/MiB/GiB. Check a file with
#   arcgate check-config --config /etc/arcgate/arcgate.toml
# The file holds the JWT secret: keep it readable by root and the arcgate group only
# (chown root:arcgate, chmod 0640).
#
# SIGHUP (systemctl reload arcgate) applies the keys marked [reload]: open connections
# stay, new ones use the new values. A file that does not validate is refused with a log
# line and the running configuration stays. Keys marked [restart] take effect at the next
# restart.
";

const EXAMPLE_TAIL: &str = "
# --- Trying it out -----------------------------------------------------------------------

# Generate a throwaway secret and print tokens (never in production).
# dev = false
";

/// The example configuration file (packaging/arcgate.toml): every setting of the table
/// with its doc, whether a reload applies it, and its default (or an example value).
pub fn example_file() -> String {
    let mut out = EXAMPLE_HEAD.to_string();
    for s in settings() {
        if let Some(section) = s.extra.section {
            let head = format!("# --- {section} ");
            let _ = write!(out, "\n{head:-<91}\n");
        }
        let when = match s.reload {
            Reload::Yes => "[reload]",
            Reload::No => "[restart]",
        };
        let mut doc = s.doc.iter();
        let _ = writeln!(
            out,
            "\n# {} {when}",
            doc.next().copied().unwrap_or_default()
        );
        for line in doc {
            let _ = writeln!(out, "# {line}");
        }
        let value = s.extra.example.map(String::from).or(s.default.clone());
        let _ = writeln!(out, "# {} = {}", s.name, value.unwrap_or_default());
    }
    out.push_str(EXAMPLE_TAIL);
    out
}
