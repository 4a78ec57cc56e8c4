//! The node-local configuration file, `/etc/baseguard/baseguard.toml`, read by
//! the daemon and the commands alike.
//!
//! ```toml
//! [mount]            # defaults for every baseguard mount on this node
//! log_level = "info"
//! log_file = "/var/log/baseguard.log"
//! metrics_file = "/var/lib/prometheus/node-exporter/baseguard.prom"
//! threads = 8
//! passthrough = true
//! heal = true
//! quarantine = ".baseguard"      # relative: to the backing directory
//! instances = ".."               # relative: to the backing directory
//! retain = "14d"                 # a proposal to the shared policy
//! min_free = "10%"               # a proposal to the shared policy
//! protect = ["_base/**"]
//! ignore = ["_base/*.part", "_base/*.converted"]
//!
//! [commands]         # defaults for list, show, restore, purge, status, check, policy, metrics
//! dir = "/var/lib/nova/instances"
//! json = "pretty"                # or "compact"
//! ```
//!
//! Precedence: a command-line flag or mount option, then this file, then the
//! built-in default. The file is found at `--config FILE`, else at
//! `$BASEGUARD_CONFIG`, else at [`DEFAULT_PATH`]; only the default may be
//! missing (an empty `BASEGUARD_CONFIG=` reads no file at all). A bad value or
//! an unknown key is one sentence naming the file, the line and the key.
//!
//! Parsed with the `toml` crate (1.x, parse only) through serde: TOML is what operators already
//! write for node-local services, and the crate gives the byte span of every
//! error, from which the line and key are named.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Deserializer, Serialize};

/// Where the configuration file is read from when nothing else is said.
pub const DEFAULT_PATH: &str = "/etc/baseguard/baseguard.toml";
/// The environment variable naming another configuration file.
pub const ENV: &str = "BASEGUARD_CONFIG";

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Defaults for `baseguard mount` (and fstab lines).
    #[serde(default)]
    pub mount: MountDefaults,
    /// Defaults for the quarantine commands.
    #[serde(default)]
    pub commands: CommandDefaults,
    /// The file it came from (`None`: built-in defaults only).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `[mount]`: the mount options a node uses unless a mount says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountDefaults {
    #[serde(
        default,
        deserialize_with = "de_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub retain: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_min_free",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_free: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_log_level",
        skip_serializing_if = "Option::is_none"
    )]
    pub log_level: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_abs_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub log_file: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "de_abs_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub metrics_file: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "de_abs_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub stats_file: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "de_threads",
        skip_serializing_if = "Option::is_none"
    )]
    pub threads: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<bool>,
    /// `auto`, `uring` or `dev` (see `transport=`).
    #[serde(
        default,
        deserialize_with = "de_transport",
        skip_serializing_if = "Option::is_none"
    )]
    pub transport: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heal: Option<bool>,
    #[serde(
        default,
        deserialize_with = "de_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub quarantine: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "de_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub instances: Option<PathBuf>,
    #[serde(
        default,
        deserialize_with = "de_globs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub protect: Vec<String>,
    #[serde(
        default,
        deserialize_with = "de_globs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ignore: Vec<String>,
}

/// `[commands]`: defaults of the quarantine commands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandDefaults {
    /// The default `--dir`.
    #[serde(
        default,
        deserialize_with = "de_abs_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub dir: Option<PathBuf>,
    /// The default `--quarantine` (relative: to the backing directory).
    #[serde(
        default,
        deserialize_with = "de_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub quarantine: Option<PathBuf>,
    /// The default `--instances`.
    #[serde(
        default,
        deserialize_with = "de_abs_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub instances: Option<PathBuf>,
    /// `pretty` (the default) or `compact` JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<JsonStyle>,
}

/// How `--json` documents are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JsonStyle {
    Pretty,
    Compact,
}

fn custom<'de, D: Deserializer<'de>>(why: String) -> D::Error {
    serde::de::Error::custom(why)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    crate::mountopts::parse_duration(&s).map_err(custom::<D>)?;
    Ok(Some(s))
}

fn de_min_free<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    crate::policy::MinFree::parse(&s).map_err(custom::<D>)?;
    Ok(Some(s))
}

fn de_log_level<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    crate::mountopts::check_log_level(&s).map_err(custom::<D>)?;
    Ok(Some(s))
}

fn de_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Err(custom::<D>("the path is empty".into()));
    }
    Ok(Some(PathBuf::from(s)))
}

fn de_abs_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let p = de_path(d)?;
    if let Some(p) = &p
        && !p.is_absolute()
    {
        return Err(custom::<D>(format!(
            "`{}` is not an absolute path (write it from /)",
            p.display()
        )));
    }
    Ok(p)
}

fn de_threads<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=crate::mountopts::MAX_THREADS as i64).contains(&n) {
        return Err(custom::<D>(format!(
            "{n} is not a number of threads from 1 to {}",
            crate::mountopts::MAX_THREADS
        )));
    }
    Ok(Some(n as u32))
}

fn de_transport<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = String::deserialize(d)?;
    match crate::session::ring::Choice::parse(&v) {
        Some(_) => Ok(Some(v)),
        None => Err(custom::<D>(format!(
            "`{v}` is not a transport (auto, uring or dev)"
        ))),
    }
}

fn de_globs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    crate::guard::Guard::new(&v, &[]).map_err(custom::<D>)?;
    Ok(v)
}

impl Config {
    /// Parse `text`, read from `file` (named in errors).
    pub fn parse(text: &str, file: &Path) -> Result<Config, String> {
        let mut c: Config = toml::from_str(text).map_err(|e| describe(&e, text, file))?;
        c.file = Some(file.to_path_buf());
        Ok(c)
    }

    /// The file to read: `--config`, else `$BASEGUARD_CONFIG`, else the
    /// default (which alone may be missing). `None`: read none.
    fn which(flag: Option<&Path>) -> Option<(PathBuf, Option<&'static str>)> {
        if let Some(f) = flag {
            return Some((f.to_path_buf(), Some("--config")));
        }
        match std::env::var_os(ENV) {
            Some(v) if v.is_empty() => None,
            Some(v) => Some((PathBuf::from(v), Some(ENV))),
            None => Some((PathBuf::from(DEFAULT_PATH), None)),
        }
    }

    /// Load the configuration (see the module docs).
    pub fn load(flag: Option<&Path>) -> Result<Config, String> {
        let Some((path, named_by)) = Config::which(flag) else {
            return Ok(Config::default());
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && named_by.is_none() => {
                Ok(Config::default())
            }
            Err(e) => Err(format!(
                "cannot read the configuration file {}{}: {}",
                path.display(),
                named_by
                    .map(|n| format!(" (named by {n})"))
                    .unwrap_or_default(),
                crate::cmd::text::io_reason(&e)
            )),
        }
    }

    /// As JSON, to hand to the processes a mount starts (they apply exactly
    /// what the mount read, even if the file changes meanwhile).
    pub fn to_json(&self) -> String {
        serde_json::json!({ "file": self.file, "config": self }).to_string()
    }

    pub fn from_json(s: &str) -> Result<Config, String> {
        #[derive(Deserialize)]
        struct Handed {
            file: Option<PathBuf>,
            config: Config,
        }
        let h: Handed = serde_json::from_str(s)
            .map_err(|e| format!("the configuration handed over is invalid: {e}"))?;
        Ok(Config {
            file: h.file,
            ..h.config
        })
    }
}

/// One sentence for a parse error: the file, the line, the key, what is wrong.
fn describe(e: &toml::de::Error, text: &str, file: &Path) -> String {
    // toml's messages may run over lines ("invalid table header\nexpected ...").
    let mut parts = e.message().trim().lines().map(str::trim);
    let first = parts.next().unwrap_or("").to_string();
    let rest: Vec<&str> = parts.filter(|l| !l.is_empty()).collect();
    let msg = if rest.is_empty() {
        first
    } else {
        format!("{first} ({})", rest.join("; "))
    };
    let msg = msg.trim_end_matches('.').to_string();
    let Some(span) = e.span() else {
        return format!("{}: {msg}.", file.display());
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let header = line.trim_start().starts_with('[');
    // The table the line is in (the nearest `[name]` above it).
    let table = text
        .lines()
        .take(if header { line_no - 1 } else { line_no })
        .filter_map(|l| {
            let t = l.trim();
            (t.starts_with('[') && !t.starts_with("[[") && t.ends_with(']'))
                .then(|| t[1..t.len() - 1].trim().to_string())
        })
        .last();
    let key = if let Some(rest) = msg.strip_prefix("unknown field `") {
        rest.split('`').next().map(str::to_string)
    } else {
        line.split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_string())
            .filter(|k| !k.is_empty() && !k.starts_with('['))
    };
    let what = if let Some(rest) = msg.strip_prefix("unknown field `") {
        let known = rest
            .split_once("expected one of ")
            .or_else(|| rest.split_once("expected "))
            .map(|(_, k)| k.replace('`', ""))
            .unwrap_or_default();
        match &table {
            Some(t) if !known.is_empty() => {
                format!("unknown key (the keys of [{t}] are {known})")
            }
            None if !known.is_empty() => {
                format!("unknown table (the tables are {known})")
            }
            _ => "unknown key".to_string(),
        }
    } else {
        msg
    };
    let full_key = match (&table, &key) {
        (Some(t), Some(k)) => format!(", key `{t}.{k}`"),
        (None, Some(k)) => format!(", key `{k}`"),
        _ => String::new(),
    };
    format!("{}, line {line_no}{full_key}: {what}.", file.display())
}

static LOADED: OnceLock<Config> = OnceLock::new();

/// Make `c` the configuration of this process (once, from `main`).
pub fn install(c: Config) {
    let _ = LOADED.set(c);
}

/// The configuration of this process (built-in defaults if none was installed).
pub fn get() -> &'static Config {
    LOADED.get_or_init(Config::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("/etc/b.toml")).unwrap_err()
    }

    #[test]
    fn parses_both_tables() {
        let c = Config::parse(
            "[mount]\nretain = \"30d\"\nthreads = 4\nheal = false\nprotect = [\"_base/**\"]\n\n[commands]\ndir = \"/srv/x\"\njson = \"compact\"\n",
            Path::new("/x.toml"),
        )
        .unwrap();
        assert_eq!(c.mount.retain.as_deref(), Some("30d"));
        assert_eq!(c.mount.threads, Some(4));
        assert_eq!(c.mount.heal, Some(false));
        assert_eq!(c.commands.dir.as_deref(), Some(Path::new("/srv/x")));
        assert_eq!(c.commands.json, Some(JsonStyle::Compact));
        let back = Config::from_json(&c.to_json()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn the_shipped_example_changes_nothing_and_every_key_in_it_is_valid() {
        let text = include_str!("../mount-helpers/baseguard.toml");
        let c = Config::parse(text, Path::new("/x")).unwrap();
        assert_eq!(c.mount, MountDefaults::default());
        assert_eq!(c.commands, CommandDefaults::default());
        // Uncomment every setting: each is a valid key with a valid value.
        let on: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(kv) if kv.contains(" = ") => kv.to_string(),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&on, Path::new("/x")).unwrap();
        assert_eq!(c.mount.threads, Some(8));
        assert_eq!(c.mount.ignore.len(), 2);
        assert_eq!(c.commands.json, Some(JsonStyle::Pretty));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err("[mount]\nthreads = 4\nretian = \"1d\"\n");
        assert!(
            e.starts_with("/etc/b.toml, line 3, key `mount.retian`: unknown key"),
            "{e}"
        );
        assert!(e.contains("retain"), "{e}");
        let e = err("[mount]\n\nretain = \"5x\"\n");
        assert_eq!(
            e,
            "/etc/b.toml, line 3, key `mount.retain`: `5x` has an unknown unit `x` (use s, m, h, d or w)."
        );
        let e = err("[mount]\nlog_file = \"var/log/x\"\n");
        assert!(
            e.contains("line 2, key `mount.log_file`: `var/log/x` is not an absolute path"),
            "{e}"
        );
        let e = err("[mount]\nthreads = 0\n");
        assert!(e.contains("line 2, key `mount.threads`"), "{e}");
        let e = err("[mnt]\n");
        assert_eq!(
            e,
            "/etc/b.toml, line 1, key `mnt`: unknown table (the tables are mount or commands)."
        );
        let e = err("[mount]\nheal = \"maybe\"\n");
        assert!(e.contains("line 2, key `mount.heal`"), "{e}");
        let e = err("[mount\n");
        assert!(e.starts_with("/etc/b.toml, line 1"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
