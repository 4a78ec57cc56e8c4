//! fstab-style mount options (`-o retain=14d,protect=_base/*,noatime`) for `baseguard mount`.
//!
//! The same string reaches us two ways: an operator typing `baseguard mount -o ...`, and
//! mount(8) running `/sbin/mount.fuse.baseguard SRC DIR -o ...` for an fstab line, which
//! hands the option column on unchanged (see `mount-helpers/mount.fuse.baseguard`).
//!
//! # Syntax
//!
//! Comma-separated items, each either a bare flag (`noatime`) or `key=value`. Values cannot
//! contain commas (fstab has no quoting for them). Keys are case-sensitive, and `_` and `-`
//! are interchangeable inside baseguard's own keys (`log_file` = `log-file`).
//!
//! Repeatable list options (`protect=`, `ignore=`) are repeated by repeating the key:
//! `protect=_base/*,protect=snapshots/*`. A value is never split on `:` (or anything else),
//! because `:` is a legal file-name character and globs are matched against real names.
//! Every other key may appear more than once and the last one wins, as mount(8) does for
//! `ro,rw` and friends; this lets `mount -o` on the command line override the fstab column.
//!
//! # Mapping
//!
//! | option | `baseguard mount` flag |
//! |---|---|
//! | `retain=DUR` (`30s`, `30m`, `12h`, `14d`, `2w`, `1d12h`) | `--retain=DUR` |
//! | `quarantine=DIR` | `--quarantine=DIR` |
//! | `instances=DIR` (the `_base`-only layout) | `--instances=DIR` |
//! | `protect=GLOB` (repeatable) | `--protect=GLOB` each |
//! | `ignore=GLOB` (repeatable) | `--ignore=GLOB` each |
//! | `heal=on\|off` | `off` → `--no-heal` |
//! | `threads=N` (1..=1024) | `--threads=N` |
//! | `passthrough=on\|off` | `off` → `--no-passthrough` |
//! | `transport=auto\|uring\|dev` | `--transport=...` |
//! | `log_file=PATH` / `log-file=PATH` | `--log-file=PATH` |
//! | `stats_file=PATH` / `stats-file=PATH` | `--stats-file=PATH` |
//! | `min_free=N%\|SIZE` (`10%`, `20G`) | `--min-free=N%\|SIZE` |
//! | `log_level=LEVEL` (`warn`, `info`, `debug`, or a directive) | `--log-level=LEVEL` |
//! | `metrics_file=PATH` | `--metrics-file=PATH` |
//! | `allow_other` | `--allow-other` |
//! | `ro` / `rw` (last wins) | `ro` → `--ro` |
//!
//! `on|off` also accepts `yes|no` and `true|false`.
//!
//! Kernel-level flags are kept, in order, in `FstabOptions::kernel` and re-emitted as one
//! `-o` argument: `noatime atime relatime strictatime nodiratime diratime nosuid suid nodev dev
//! noexec exec sync async dirsync default_permissions`. Within each group of opposites
//! (`noatime/atime/relatime/strictatime`, `nodiratime/diratime`, `nosuid/suid`, `nodev/dev`,
//! `noexec/exec`, `sync/async`) the last one wins.
//!
//! Dropped silently (recorded in `FstabOptions::dropped`), because they are meant for
//! mount(8), systemd or fstab tooling and a helper must ignore them: `defaults`, `auto`,
//! `noauto`, `_netdev`, `nofail`, `user`, `user=NAME`, `nouser`, `users`, `owner`, `group`,
//! `x-*` and `X-*` (e.g. `x-systemd.requires-mounts-for=`, `X-mount.mkdir`), `comment=*`,
//! `loop`, `offset=`, `sizelimit=` and the propagation flags (`shared`, `private`, `slave`,
//! `unbindable` and their `r` forms). mount(8) already strips most of these before it runs a
//! helper, but `_netdev`, `nofail`, `defaults` and the `user` family do reach helpers, and an
//! operator may type any of them on the command line.
//!
//! Anything else (`frobnicate`, `threads=abc`, `heal=maybe`, `noatime=1`) is an error whose
//! message is one sentence naming the option.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Highest accepted `threads=` value; beyond it is almost certainly a typo.
pub const MAX_THREADS: usize = 1024;

/// A rejected option: which item, and one sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    /// The offending item exactly as written (e.g. `threads=abc`).
    pub option: String,
    /// The complete sentence, ready to print.
    pub message: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OptionError {}

/// The parsed option string. `None`/empty means "not given": the caller decides how it
/// combines with explicit command-line flags (suggested: an explicit flag wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FstabOptions {
    /// `retain=`: how long quarantined files are kept.
    pub retain: Option<Duration>,
    /// `quarantine=`: the quarantine directory.
    pub quarantine: Option<PathBuf>,
    /// `instances=`: the instances directory, when baseguard serves `_base` alone.
    pub instances: Option<PathBuf>,
    /// `protect=`: globs, in the order given.
    pub protect: Vec<String>,
    /// `ignore=`: globs, in the order given.
    pub ignore: Vec<String>,
    /// `heal=on|off`.
    pub heal: Option<bool>,
    /// `threads=N`, 1..=[`MAX_THREADS`].
    pub threads: Option<usize>,
    /// `passthrough=on|off`.
    pub passthrough: Option<bool>,
    /// `transport=auto|uring|dev`.
    pub transport: Option<String>,
    /// `log_file=` / `log-file=`.
    pub log_file: Option<PathBuf>,
    /// `stats_file=` / `stats-file=`.
    pub stats_file: Option<PathBuf>,
    /// `min_free=`: the free-space floor, as written (`10%`, `20G`).
    pub min_free: Option<String>,
    /// `log_level=`.
    pub log_level: Option<String>,
    /// `metrics_file=`: Prometheus textfile written periodically.
    pub metrics_file: Option<PathBuf>,
    /// `allow_other` was given.
    pub allow_other: bool,
    /// `ro` (`Some(true)`) or `rw` (`Some(false)`), whichever came last.
    pub read_only: Option<bool>,
    /// Kernel-level flags to pass to the FUSE mount, in order, opposites resolved.
    pub kernel: Vec<String>,
    /// Items ignored on purpose (mount(8)/systemd options), for `-v` output.
    pub dropped: Vec<String>,
}

/// Kernel flags we pass through, grouped so that later opposites replace earlier ones.
const KERNEL_GROUPS: &[&[&str]] = &[
    &["noatime", "atime", "relatime", "strictatime"],
    &["nodiratime", "diratime"],
    &["nosuid", "suid"],
    &["nodev", "dev"],
    &["noexec", "exec"],
    &["sync", "async"],
    &["dirsync"],
    &["default_permissions"],
];

/// Bare words that mount(8)/systemd conventions say a helper must ignore.
const DROPPED_FLAGS: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "loop",
    "shared",
    "rshared",
    "private",
    "rprivate",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
];

/// `key=` forms that are ignored whatever their value.
const DROPPED_KEYS: &[&str] = &["comment", "user", "loop", "offset", "sizelimit"];

impl FstabOptions {
    /// Parses an option string. Empty items (`a,,b`, a trailing comma) are skipped.
    pub fn parse(s: &str) -> Result<Self, OptionError> {
        let mut o = FstabOptions::default();
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            o.apply(item)?;
        }
        Ok(o)
    }

    fn apply(&mut self, item: &str) -> Result<(), OptionError> {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };

        // Options addressed to mount(8), systemd or fstab tooling.
        if key.starts_with("x-")
            || key.starts_with("X-")
            || (value.is_none() && DROPPED_FLAGS.contains(&key))
            || (value.is_some() && DROPPED_KEYS.contains(&key))
        {
            self.dropped.push(item.to_string());
            return Ok(());
        }

        let norm = key.replace('-', "_");
        match (norm.as_str(), value) {
            ("retain", Some(v)) => {
                let d = parse_duration(v).map_err(|why| {
                    err(item, format!("Mount option `{item}` is invalid: {why}."))
                })?;
                self.retain = Some(d);
            }
            ("quarantine", Some(v)) => self.quarantine = Some(PathBuf::from(nonempty(item, v)?)),
            ("instances", Some(v)) => self.instances = Some(PathBuf::from(nonempty(item, v)?)),
            ("protect", Some(v)) => self.protect.push(nonempty(item, v)?.to_string()),
            ("ignore", Some(v)) => self.ignore.push(nonempty(item, v)?.to_string()),
            ("heal", Some(v)) => self.heal = Some(on_off(item, v)?),
            ("passthrough", Some(v)) => self.passthrough = Some(on_off(item, v)?),
            ("transport", Some(v)) => {
                if crate::session::ring::Choice::parse(v).is_none() {
                    return Err(err(
                        item,
                        format!(
                            "Mount option `{item}` is invalid: use auto, uring (FUSE-over-io_uring) or dev (/dev/fuse)."
                        ),
                    ));
                }
                self.transport = Some(
                    crate::session::ring::Choice::parse(v)
                        .unwrap_or_default()
                        .name()
                        .to_string(),
                );
            }
            ("threads", Some(v)) => {
                let n = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_THREADS).contains(n));
                self.threads = Some(n.ok_or_else(|| {
                    err(
                        item,
                        format!(
                            "Mount option `{item}` is invalid: expected a whole number of threads from 1 to {MAX_THREADS}."
                        ),
                    )
                })?);
            }
            ("log_file", Some(v)) => self.log_file = Some(absolute(item, v)?),
            ("stats_file", Some(v)) => self.stats_file = Some(absolute(item, v)?),
            ("metrics_file", Some(v)) => self.metrics_file = Some(absolute(item, v)?),
            ("min_free", Some(v)) => {
                crate::policy::MinFree::parse(v).map_err(|why| {
                    err(item, format!("Mount option `{item}` is invalid: {why}."))
                })?;
                self.min_free = Some(v.to_string());
            }
            ("log_level", Some(v)) => {
                check_log_level(v).map_err(|why| {
                    err(item, format!("Mount option `{item}` is invalid: {why}."))
                })?;
                self.log_level = Some(v.to_string());
            }
            ("allow_other", None) => self.allow_other = true,
            ("ro", None) => self.read_only = Some(true),
            ("rw", None) => self.read_only = Some(false),
            (
                "retain" | "quarantine" | "instances" | "protect" | "ignore" | "heal"
                | "passthrough" | "threads" | "log_file" | "stats_file" | "min_free" | "log_level"
                | "metrics_file" | "transport",
                None,
            ) => {
                return Err(err(
                    item,
                    format!("Mount option `{item}` needs a value, as in `{key}=...`."),
                ));
            }
            ("allow_other" | "ro" | "rw", Some(_)) => return Err(takes_no_value(item, key)),
            _ => {
                if let Some(group) = KERNEL_GROUPS.iter().find(|g| g.contains(&key)) {
                    if value.is_some() {
                        return Err(takes_no_value(item, key));
                    }
                    self.kernel.retain(|k| !group.contains(&k.as_str()));
                    self.kernel.push(key.to_string());
                } else {
                    return Err(err(
                        item,
                        format!(
                            "Unknown mount option `{item}` (baseguard knows retain, quarantine, instances, protect, ignore, heal, threads, passthrough, transport, log_file, stats_file, min_free, log_level, metrics_file, allow_other, ro, rw and the kernel flags noatime, nosuid, nodev, noexec and the like)."
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The equivalent `baseguard mount` arguments (without `mount`, BACKING and MOUNTPOINT).
    ///
    /// Values use the `--flag=value` form so that a glob starting with `-` is not taken for a
    /// flag. Kernel flags come last as `-o a,b,c`, which parses back to the same
    /// `FstabOptions::kernel`. Settings equal to the default (`heal=on`, `rw`) emit nothing.
    pub fn to_mount_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(n) = self.threads {
            a.push(format!("--threads={n}"));
        }
        if self.passthrough == Some(false) {
            a.push("--no-passthrough".into());
        }
        if let Some(t) = &self.transport {
            a.push(format!("--transport={t}"));
        }
        if self.allow_other {
            a.push("--allow-other".into());
        }
        if self.read_only == Some(true) {
            a.push("--ro".into());
        }
        if let Some(d) = self.retain {
            a.push(format!("--retain={}", format_duration(d)));
        }
        if let Some(q) = &self.quarantine {
            a.push(format!("--quarantine={}", q.display()));
        }
        if let Some(d) = &self.instances {
            a.push(format!("--instances={}", d.display()));
        }
        for g in &self.protect {
            a.push(format!("--protect={g}"));
        }
        for g in &self.ignore {
            a.push(format!("--ignore={g}"));
        }
        if self.heal == Some(false) {
            a.push("--no-heal".into());
        }
        if let Some(p) = &self.log_file {
            a.push(format!("--log-file={}", p.display()));
        }
        if let Some(p) = &self.stats_file {
            a.push(format!("--stats-file={}", p.display()));
        }
        if let Some(m) = &self.min_free {
            a.push(format!("--min-free={m}"));
        }
        if let Some(l) = &self.log_level {
            a.push(format!("--log-level={l}"));
        }
        if let Some(p) = &self.metrics_file {
            a.push(format!("--metrics-file={}", p.display()));
        }
        if !self.kernel.is_empty() {
            a.push("-o".into());
            a.push(self.kernel.join(","));
        }
        a
    }
}

fn err(item: &str, message: String) -> OptionError {
    OptionError {
        option: item.to_string(),
        message,
    }
}

fn takes_no_value(item: &str, key: &str) -> OptionError {
    err(
        item,
        format!("Mount option `{item}` takes no value; write just `{key}`."),
    )
}

fn nonempty<'a>(item: &str, v: &'a str) -> Result<&'a str, OptionError> {
    if v.is_empty() {
        Err(err(
            item,
            format!("Mount option `{item}` has an empty value."),
        ))
    } else {
        Ok(v)
    }
}

/// A node-local file (log, metrics, stats) must be named from `/`: relative to
/// what? From fstab the working directory is wherever `mount -a` ran, and the
/// backing directory is shared by every node.
fn absolute(item: &str, v: &str) -> Result<PathBuf, OptionError> {
    let v = nonempty(item, v)?;
    if !v.starts_with('/') {
        return Err(err(
            item,
            format!(
                "Mount option `{item}` is invalid: `{v}` is not an absolute path (write it from /)."
            ),
        ));
    }
    Ok(PathBuf::from(v))
}

/// A log level: `error`, `warn`, `info`, `debug`, `trace`, `off`, or a
/// tracing directive (`baseguard=debug`). Errors are a phrase.
pub fn check_log_level(v: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if !v.contains(['=', ',']) && !LEVELS.contains(&v.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "`{v}` is not a log level (use error, warn, info, debug or trace, or a directive such as baseguard=debug)"
        ));
    }
    crate::logging::filter(Some(v)).map(|_| ())
}

fn on_off(item: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(err(
            item,
            format!("Mount option `{item}` is invalid: expected `on` or `off`."),
        )),
    }
}

const UNITS: &[(char, u64)] = &[
    ('w', 7 * 86_400),
    ('d', 86_400),
    ('h', 3_600),
    ('m', 60),
    ('s', 1),
];

/// Parses a retention period: whole numbers with a unit, `s`, `m`, `h`, `d` or `w`
/// (`30s`, `30m`, `12h`, `14d`, `2w`), optionally several in a row (`1d12h`).
///
/// A bare number is rejected because the unit is not obvious. Errors are a phrase without a
/// trailing full stop, e.g. `` `5x` has an unknown unit `x` (use s, m, h, d or w) ``.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("the duration is empty (write something like 30m, 12h or 14d)".into());
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "`{t}` is not a duration (write whole numbers with a unit, like 30m, 12h or 14d)"
            ));
        }
        let (num, after) = rest.split_at(digits);
        let Some(unit) = after.chars().next() else {
            return Err(format!(
                "`{t}` has no unit (add s, m, h, d or w, as in {num}d)"
            ));
        };
        if unit == '.' || unit == ',' {
            return Err(format!(
                "`{t}` is not a whole number (write 90m rather than 1.5h, for instance)"
            ));
        }
        let Some(&(_, secs)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(format!(
                "`{t}` has an unknown unit `{unit}` (use s, m, h, d or w)"
            ));
        };
        let n: u64 = num.parse().map_err(|_| format!("`{t}` is too large"))?;
        total = n
            .checked_mul(secs)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("`{t}` is too large"))?;
        rest = &after[unit.len_utf8()..];
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration with the largest unit that divides it exactly (`14d`, `90m`, `2w`),
/// so that [`parse_duration`] reads it back unchanged. Sub-second parts are dropped.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    for &(u, n) in UNITS {
        if secs % n == 0 {
            return format!("{}{u}", secs / n);
        }
    }
    unreachable!("the last unit is one second")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("14d"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(
            parse_duration(" 1d12h "),
            Ok(Duration::from_secs(36 * 3600))
        );
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn duration_errors_are_specific() {
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("unknown unit `x`")
        );
        assert!(parse_duration("14").unwrap_err().contains("no unit"));
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("d").unwrap_err().contains("not a duration"));
        assert!(
            parse_duration("1.5h")
                .unwrap_err()
                .contains("not a whole number")
        );
        assert!(
            parse_duration("-3d")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(
            parse_duration("99999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
        assert!(
            parse_duration("9999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn format_round_trips() {
        for s in ["30s", "90m", "12h", "14d", "2w", "1d12h", "0s", "61s"] {
            let d = parse_duration(s).unwrap();
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d, "{s}");
        }
        assert_eq!(format_duration(Duration::from_secs(14 * 86_400)), "2w");
        assert_eq!(format_duration(Duration::from_secs(5400)), "90m");
    }

    #[test]
    fn kernel_opposites_last_wins() {
        let o = FstabOptions::parse("atime,nosuid,noatime,relatime,suid,dirsync").unwrap();
        assert_eq!(o.kernel, ["relatime", "suid", "dirsync"]);
    }

    #[test]
    fn ro_rw_last_wins() {
        assert_eq!(FstabOptions::parse("ro,rw").unwrap().read_only, Some(false));
        assert_eq!(FstabOptions::parse("rw,ro").unwrap().read_only, Some(true));
    }
}
