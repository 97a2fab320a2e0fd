//! `settings!`: one entry per setting makes its field, default, flag, variable, file key, checks, rendering and example.
//!
//! Each entry of the table reads
//!
//! ```text
//! #[section = "Listeners"]            (optional: starts a section of the example file)
//! /// Help line, shown by --help and above the key in packaging/arcgate.toml.
//! /// More lines: only in the example file.
//! listen: SocketAddr = default_expr, Addr, reload: No, example: "…", unset: "…";
//! ```
//!
//! * the field name is the file key, the flag (`--listen`, kebab-case) and the variable
//!   (`ARCGATE_LISTEN`);
//! * the type and default give the `Config` field; the kind (see `kinds.rs`) says how the
//!   text is parsed and checked, what the error message allows, how the value is written
//!   back and what the flag's value is called;
//! * `reload: Yes` if SIGHUP applies a new value, `No` if it takes a restart (a reload that
//!   changes it logs so);
//! * `unset: "…"` says in words what an unset (or machine-dependent) default means, for
//!   `--help` and `check-config`; `example: "…"` is the TOML value the example file shows when
//!   the default cannot be written as one.
//!
//! Settings that depend on each other are checked by hand after the table (`Fields::check`).

use super::kinds::Kind;

/// Whether a reload (SIGHUP) applies a new value of a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Yes,
    No,
}

/// The optional parts of an entry.
#[derive(Debug, Clone, Copy)]
pub struct Extra {
    pub section: Option<&'static str>,
    pub unset: Option<&'static str>,
    pub example: Option<&'static str>,
}

impl Extra {
    pub const NONE: Extra = Extra {
        section: None,
        unset: None,
        example: None,
    };
}

/// What the table says about one setting, in text: for `--help`, the example file and tests.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The file key.
    pub name: &'static str,
    /// `ARCGATE_<NAME>`.
    pub env: String,
    /// The doc lines; the first is the flag's help.
    pub doc: Vec<&'static str>,
    pub reload: Reload,
    pub value_name: &'static str,
    pub secret: bool,
    /// The default as TOML, `None` when it is unset.
    pub default: Option<String>,
    pub extra: Extra,
}

impl Setting {
    pub fn new<T, K: Kind<T>>(
        name: &'static str,
        doc: &'static str,
        reload: Reload,
        extra: Extra,
        kind: &K,
        default: &T,
    ) -> Setting {
        Setting {
            name,
            env: format!("ARCGATE_{}", name.to_ascii_uppercase()),
            doc: doc
                .lines()
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect(),
            reload,
            value_name: kind.value_name(),
            secret: kind.secret(),
            default: kind.toml(default),
            extra,
        }
    }

    /// The default as `--help` shows it: in words when the table gives them, else the
    /// value without TOML quotes; `None` when there is nothing to show.
    pub fn shown_default(&self) -> Option<String> {
        match (self.extra.unset, &self.default) {
            (Some(words), _) => Some(words.to_string()),
            (None, Some(toml)) => Some(toml.trim_matches('"').to_string()),
            (None, None) => None,
        }
    }

    /// The flag's help: the first doc line and the default.
    pub fn help(&self) -> String {
        let first = self.doc.first().copied().unwrap_or_default();
        match self.shown_default() {
            Some(d) => format!("{first} [default: {d}]"),
            None => first.to_string(),
        }
    }
}

/// The TOML text of a value, with the kind inferred from the field.
pub fn toml_of<T, K: Kind<T>>(kind: &K, value: &T) -> Option<String> {
    kind.toml(value)
}

macro_rules! settings {
    ($(
        $(#[section = $section:literal])?
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $default:expr, $kind:expr, reload: $reload:ident
            $(, $extra:ident: $extra_value:literal)* ;
    )*) => {
        /// The effective configuration of `arcgate serve`, one field per setting of the table.
        #[derive(Debug, Clone)]
        pub struct Config {
            $(pub $name: $ty,)*
            /// From `jwt_secret` or `jwt_public_key`; `None` only before `--dev` filled it in
            /// (`serve` refuses to start without one).
            pub key: Option<KeySource>,
            pub dev: bool,
        }

        impl Default for Config {
            /// The documented defaults, with no key.
            fn default() -> Config {
                Config {
                    $($name: $default,)*
                    key: None,
                    dev: false,
                }
            }
        }

        /// The flags of `serve` and `check-config`. Values stay text here so that a bad value
        /// is reported the same way whether it came from a flag, the environment or the file.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct ServeArgs {
            $(
                #[arg(
                    long,
                    env = setting(stringify!($name)).env.as_str(),
                    value_name = setting(stringify!($name)).value_name,
                    hide_env_values = setting(stringify!($name)).secret,
                    help = setting(stringify!($name)).help(),
                )]
                pub $name: Option<String>,
            )*
            /// Try it out: without a key, generate a secret and print ready tokens [default: false]
            #[arg(
                long,
                env = "ARCGATE_DEV",
                value_name = "BOOL",
                num_args = 0..=1,
                default_missing_value = "true",
                value_parser = clap::builder::BoolishValueParser::new()
            )]
            pub dev: Option<bool>,
            /// TOML file with the same keys in snake_case (listen = "0.0.0.0:8080", …)
            #[arg(long, env = "ARCGATE_CONFIG", value_name = "FILE")]
            pub config: Option<PathBuf>,
        }

        /// The table in text, in its order.
        // An entry may give every optional part, leaving `..Extra::NONE` nothing to fill.
        #[allow(clippy::needless_update)]
        fn declared() -> Vec<Setting> {
            let d = Config::default();
            vec![$(
                Setting::new(
                    stringify!($name),
                    concat!($($doc, "\n"),*),
                    Reload::$reload,
                    Extra {
                        $(section: Some($section),)?
                        $($extra: Some($extra_value),)*
                        ..Extra::NONE
                    },
                    &$kind,
                    &d.$name,
                ),
            )*]
        }

        impl ServeArgs {
            fn get(&self, key: &str) -> Option<&str> {
                match key {
                    $(stringify!($name) => self.$name.as_deref(),)*
                    _ => None,
                }
            }

            fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
                match key {
                    $(stringify!($name) => Some(&mut self.$name),)*
                    _ => None,
                }
            }

            /// How the file may write `key`'s value: (a list of strings, a path).
            fn file_shape(key: &str) -> Option<(bool, bool)> {
                match key {
                    $(stringify!($name) => Some((
                        Kind::<$ty>::list(&$kind),
                        Kind::<$ty>::path(&$kind),
                    )),)*
                    _ => None,
                }
            }
        }

        impl Fields<'_> {
            /// Every setting of the table parsed, a bad one reported and left at its default.
            fn parse_all(&mut self) -> Config {
                let d = Config::default();
                Config {
                    $($name: self.field(stringify!($name), &$kind, d.$name),)*
                    key: None,
                    dev: self.raw.dev.unwrap_or(false),
                }
            }
        }

        impl Config {
            /// Each setting with its value as TOML (`None`: unset), in the table's order.
            fn entries(&self) -> Vec<(&'static str, Option<String>)> {
                vec![$((stringify!($name), toml_of(&$kind, &self.$name)),)*]
            }

            /// The settings that differ between `self` and `new` and are read only at start.
            pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
                let mut out = Vec::new();
                $(
                    if Reload::$reload == Reload::No && self.$name != new.$name {
                        out.push(stringify!($name));
                    }
                )*
                out
            }
        }
    };
}
