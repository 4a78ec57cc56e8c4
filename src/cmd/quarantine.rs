//! `baseguard list | show | restore | purge | status`: the quarantine CLI.
//!
//! Usable on any node, with or without a mount. `--dir` names the instances
//! directory: either a `fuse.baseguard` mountpoint (the backing directory is
//! then taken from the mount's source field in `/proc/self/mountinfo`) or the
//! backing directory itself. When baseguard is mounted over its own backing
//! directory, the command enters a private mount namespace and detaches the
//! mount there to reach the directory underneath (needs root).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::cmd::health::{self, MountHealth};
use crate::cmd::text::{self, exit, print_json, quote, rfc3339, visible};
use crate::heal::{BaseLayout, References};
use crate::policy;
use crate::quarantine::{
    self, Entry, EntryState, PurgeOutcome, QError, Quarantine, Status, Who, fmt_utc,
};
use crate::space::{FsSpace, Usage};
use crate::sys;

/// Where the instances directory is in a default Nova install.
pub const DEFAULT_DIR: &str = "/var/lib/nova/instances";
/// The filesystem type baseguard mounts show in `/proc/self/mountinfo`.
pub const FSTYPE: &str = "fuse.baseguard";

/// Options every quarantine command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Location {
    /// The instances directory: a baseguard mountpoint or the backing
    /// directory under it.
    /// [default: the configuration file's [commands] dir, else
    /// /var/lib/nova/instances]
    #[arg(long = "dir", value_name = "DIR", global = true)]
    pub dir_arg: Option<PathBuf>,
    /// The quarantine directory, if the daemon runs with --quarantine
    /// (default: DIR's backing directory/.baseguard; a relative QDIR is
    /// taken relative to the backing directory, as the mount option is).
    #[arg(long = "quarantine", value_name = "QDIR", global = true)]
    pub quarantine_arg: Option<PathBuf>,
    /// The instances directory, when baseguard serves `_base` alone and it
    /// is not `_base`'s parent (the daemon's --instances). When DIR has no
    /// baseguard mount but DIR/_base has, that mount is used.
    #[arg(long = "instances", value_name = "IDIR")]
    pub instances_arg: Option<PathBuf>,
}

impl Location {
    /// `--dir`, else the configuration file's, else [`DEFAULT_DIR`].
    pub fn dir(&self) -> PathBuf {
        self.dir_arg
            .clone()
            .or_else(|| crate::config::get().commands.dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
    }

    /// `--quarantine`, else the configuration file's.
    pub fn quarantine(&self) -> Option<PathBuf> {
        self.quarantine_arg
            .clone()
            .or_else(|| crate::config::get().commands.quarantine.clone())
    }

    /// `--instances`, else the configuration file's.
    pub fn instances(&self) -> Option<PathBuf> {
        self.instances_arg
            .clone()
            .or_else(|| crate::config::get().commands.instances.clone())
    }
}

/// Durations (`30m`, `12h`, `14d`, `2w`, `1d12h`): the one parser of the crate.
pub use crate::mountopts::parse_duration;

/// `1.5 GiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// `45s`, `12m`, `3h20m`, `5d3h`.
pub fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// When an entry becomes due for purging (saturating: a huge retention is
/// "never", not a time before it was quarantined).
pub fn expires_at(e: &Entry, retain: Duration) -> u64 {
    e.quarantined_at.saturating_add(retain.as_secs())
}

fn expires(e: &Entry, retain: Duration, now: SystemTime) -> String {
    let age = e.age(now);
    if age >= retain {
        "due".into()
    } else {
        format!("in {}", human_age(retain - age))
    }
}

pub use crate::mountinfo::MountInfo;
pub use crate::mountinfo::{parse as parse_mountinfo, read as read_mountinfo};

/// The baseguard mounts of this namespace.
pub fn baseguard_mounts() -> Vec<MountInfo> {
    read_mountinfo()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fstype == FSTYPE)
        .collect()
}

/// Lexically normalised absolute path; `..` is refused.
fn lexical_abs(p: &Path) -> Result<PathBuf, String> {
    let abs =
        std::path::absolute(p).map_err(|e| format!("cannot resolve '{}': {e}", p.display()))?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return Err(format!("'{}' leaves the root directory", p.display()));
                }
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Ok(out)
}

/// `p` with its parent resolved (symlinks) but its last component kept, so a
/// mountpoint itself is never looked up (a hung daemon cannot hang us).
pub fn abs_dir(p: &Path) -> Result<PathBuf, String> {
    let abs = lexical_abs(p)?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(std::fs::canonicalize(parent)
            .map(|c| c.join(name))
            .unwrap_or(abs)),
        _ => Ok(abs),
    }
}

/// The resolved backing directory.
pub struct Backing {
    /// `--dir` as an absolute path.
    pub dir: PathBuf,
    /// The backing directory path (equal to `dir` when not mounted).
    pub path: PathBuf,
    /// `O_PATH` descriptor of the backing directory.
    pub fd: OwnedFd,
    /// The baseguard mount at `dir`, if any.
    pub mount: Option<MountInfo>,
    /// The instances directory in the `_base`-only layout (the backing
    /// directory is then `_base`): `--instances`, or the backing
    /// directory's parent when it is named `_base`.
    pub instances: Option<PathBuf>,
    /// The baseguard mount at `dir` probed (before any private detach).
    pub health: Option<MountHealth>,
    /// The options that mount's daemon runs with (its run file), so that a
    /// command on that mount needs no `--quarantine`/`--instances` repeated.
    pub mount_options: Vec<String>,
}

impl Backing {
    /// The value of `key=` among the mount's options in effect.
    fn mount_option(&self, key: &str) -> Option<PathBuf> {
        self.mount_options
            .iter()
            .filter_map(|o| o.strip_prefix(key)?.strip_prefix('='))
            .next_back()
            .map(PathBuf::from)
    }
}

/// Resolve `--dir` to the backing directory (see the module docs). Must run
/// before the process starts any thread.
pub fn resolve_backing(dir: &Path) -> Result<Backing, String> {
    let mut dir_abs = abs_dir(dir)?;
    let mounts = baseguard_mounts();
    let at = |d: &Path| mounts.iter().rev().find(|m| m.mountpoint == d).cloned();
    let mut mount = at(&dir_abs);
    // The `_base`-only layout: the instances directory names `_base`'s mount.
    if mount.is_none() {
        let base = dir_abs.join(crate::refs::BASE_DIR);
        if let Some(m) = at(&base) {
            mount = Some(m);
            dir_abs = base;
        }
    }
    let path = match &mount {
        Some(m) => {
            let p = PathBuf::from(&m.source);
            if !p.is_absolute() {
                return Err(format!(
                    "the baseguard mount at '{}' does not name its backing directory (source '{}'); pass the backing directory with --dir",
                    dir_abs.display(),
                    m.source
                ));
            }
            p
        }
        None => dir_abs.clone(),
    };
    let health = mount.as_ref().map(MountHealth::of);
    let mount_options = match &mount {
        Some(m) => crate::metrics::RunFile::all()
            .into_iter()
            .find(|r| r.mountpoint == m.mountpoint)
            .map(|r| r.options)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let covered = |ms: &[MountInfo]| -> Option<PathBuf> {
        ms.iter()
            .rev()
            .filter(|m| m.fstype == FSTYPE && path.starts_with(&m.mountpoint))
            .map(|m| m.mountpoint.clone())
            .next()
    };
    if mount.is_some() && covered(&mounts).is_some() {
        sys::unshare_mount_namespace().map_err(|e| {
            format!(
                "baseguard is mounted over its own backing directory '{}'; reaching it needs a private mount namespace, which failed: {e} (run as root)",
                path.display()
            )
        })?;
        for _ in 0..16 {
            let ms = read_mountinfo().map_err(|e| format!("cannot read mountinfo: {e}"))?;
            let Some(mp) = covered(&ms) else { break };
            sys::umount_detach(&mp).map_err(|e| {
                format!(
                    "cannot detach the baseguard mount at '{}' in a private namespace: {e}",
                    mp.display()
                )
            })?;
        }
    }
    let fd = sys::open_path(&path, libc::O_PATH | libc::O_DIRECTORY).map_err(|e| {
        format!(
            "cannot open the instances directory '{}': {e}",
            path.display()
        )
    })?;
    let instances = (path.file_name() == Some(std::ffi::OsStr::new(crate::refs::BASE_DIR)))
        .then(|| path.parent().map(Path::to_path_buf))
        .flatten();
    Ok(Backing {
        dir: dir_abs,
        path,
        fd,
        mount,
        instances,
        health,
        mount_options,
    })
}

/// [`resolve_backing`] for a command's `--dir`, `--instances`.
pub fn resolve_location(loc: &Location) -> Result<Backing, String> {
    let mut b = resolve_backing(&loc.dir())?;
    // Not mounted, and the quarantine is in `_base` (the `_base`-only
    // layout seen from a node without the mount): use `DIR/_base`.
    let q = quarantine::DEFAULT_DIR_NAME;
    let base = b.path.join(crate::refs::BASE_DIR);
    if loc.quarantine().is_none()
        && b.mount.is_none()
        && b.instances.is_none()
        && !b.path.join(q).exists()
        && base.join(q).is_dir()
    {
        b = resolve_backing(&base)?;
    }
    if loc.instances().is_none()
        && let Some(i) = b.mount_option("instances")
    {
        b.instances = Some(i);
    }
    if let Some(i) = &loc.instances() {
        b.instances = Some(std::path::absolute(i).map_err(|e| {
            format!(
                "cannot resolve the instances directory '{}': {e}",
                i.display()
            )
        })?);
    }
    Ok(b)
}

impl Backing {
    /// The `_base`-only layout, if this is one (opens the instances dir).
    pub fn layout(&self) -> Result<Option<BaseLayout>, String> {
        BaseLayout::detect(&self.path, self.instances.as_deref())
    }

    /// Absolute paths under which instance disks may name base files.
    pub fn prefixes(&self) -> Vec<PathBuf> {
        let mut v = vec![self.dir.clone(), self.path.clone()];
        if self.instances.is_some() {
            v.extend(self.dir.parent().map(Path::to_path_buf));
        }
        v
    }

    /// The reference index over the instance disks, in either layout.
    pub fn references(&self) -> Result<References, String> {
        Ok(References::for_layout(
            self.fd.as_fd(),
            self.layout()?,
            self.prefixes(),
        ))
    }

    /// An `ID|PATH` or `--to` argument as a path relative to the backing
    /// root: relative paths are taken as they are; absolute ones must be
    /// under `--dir` (or the backing directory).
    pub fn relativize(&self, p: &OsStr) -> Result<PathBuf, QError> {
        let pp = Path::new(p);
        if !pp.is_absolute() {
            let rel = quarantine::clean_rel(pp)?;
            // Over `_base` alone, `_base/x` (relative to the instances
            // directory) is `x`.
            return Ok(
                match (&self.instances, rel.strip_prefix(crate::refs::BASE_DIR)) {
                    (Some(_), Ok(r)) if !r.as_os_str().is_empty() => r.to_path_buf(),
                    _ => rel,
                },
            );
        }
        let escapes = |reason: String| QError::Escapes {
            path: pp.to_path_buf(),
            reason,
        };
        let abs = lexical_abs(pp).map_err(escapes)?;
        let rel = abs
            .strip_prefix(&self.dir)
            .or_else(|_| abs.strip_prefix(&self.path))
            .map_err(|_| {
                escapes(format!(
                    "it is outside the instances directory '{}'",
                    self.dir.display()
                ))
            })?;
        quarantine::clean_rel(rel)
    }
}

/// Logging for the quarantine commands: restores and purges are audit events,
/// so they go where a detached daemon's log goes (syslog, journald or the
/// fallback file, `info`); otherwise only warnings reach stderr (the commands print their own results). `RUST_LOG`
/// overrides the level. Installs no thread (the namespace step needs none).
pub fn init_logging() {
    use crate::logging::{self, LogTarget};
    let env = std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty());
    // The same destination as a detached daemon's (syslog, journald, file).
    let target = logging::detached_target();
    if target != LogTarget::Stderr
        && let Ok((d, used)) = logging::build(&target, if env { None } else { Some("info") })
        && used != LogTarget::Stderr
    {
        let _ = tracing::dispatcher::set_global_default(d);
        return;
    }
    let _ = logging::init(LogTarget::Stderr, if env { None } else { Some("warn") });
}

/// A refused or failed request that changed nothing (exit 1).
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    text::fail_with(exit::ATTENTION, msg)
}

/// Could not check: the directory or the quarantine cannot be read (exit 3).
fn cannot(msg: impl std::fmt::Display) -> ExitCode {
    text::fail_with(exit::CANNOT, msg)
}

/// `--quarantine` (or the configuration file's), else the mount's own
/// `quarantine=`.
fn quarantine_of(b: &Backing, loc: &Location) -> Option<PathBuf> {
    loc.quarantine().or_else(|| b.mount_option("quarantine"))
}

/// The quarantine path a command uses, for messages.
fn quarantine_path(b: &Backing, loc: &Location) -> PathBuf {
    match &quarantine_of(b, loc) {
        Some(p) => b.path.join(p),
        None => b.path.join(quarantine::DEFAULT_DIR_NAME),
    }
}

/// Open the quarantine of a backing directory. `Ok(None)` only where a
/// baseguard mount serves the directory but keeps no quarantine (an
/// unguarded mount); a directory that is neither a baseguard mount nor a
/// backing directory with a quarantine is an error, as is a quarantine this
/// user may not read: a command never reports "empty" or "lost" for what it
/// could not see.
pub fn open_quarantine(b: &Backing, loc: &Location) -> Result<Option<Quarantine>, String> {
    // A relative --quarantine is relative to the backing directory.
    let qdir = quarantine_of(b, loc).map(|p| b.path.join(p));
    let qpath = quarantine_path(b, loc);
    match Quarantine::open_existing(b.fd.as_fd(), qdir.as_deref()) {
        Ok(q) => Ok(Some(q)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if quarantine_of(b, loc).is_some() {
                Err(format!(
                    "there is no quarantine at '{}' (--quarantine names a directory that does not exist)",
                    qpath.display()
                ))
            } else if b.mount.is_some() {
                Ok(None)
            } else {
                Err(format!(
                    "'{}' is not a baseguard mount or backing directory: it has no quarantine ({}); pass --dir with the instances directory baseguard serves",
                    b.dir.display(),
                    qpath.display()
                ))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(format!(
            "cannot read the quarantine at '{}': permission denied; it is readable by root only, run the command as root",
            qpath.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Open the quarantine for a command (see [`open_quarantine`]).
fn open(loc: &Location) -> Result<(Backing, Option<Quarantine>), String> {
    init_logging();
    let b = resolve_location(loc)?;
    let q = open_quarantine(&b, loc)?;
    Ok((b, q))
}

/// An entry's original path, quoted for a terminal (see [`text::quote`]).
fn qpath_of(e: &Entry) -> String {
    quote(e.orig_path().as_os_str())
}

fn who_str(e: &Entry) -> String {
    visible(&e.who.to_string())
}

/// An entry as JSON: the record, its state, age, expiry (epoch seconds and
/// RFC 3339) and, when measured, its data file's real size and allocation.
fn entry_json(
    e: &Entry,
    retain: Option<Duration>,
    now: SystemTime,
    usage: Option<&Usage>,
) -> serde_json::Value {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "state".into(),
            serde_json::to_value(e.state).unwrap_or_default(),
        );
        o.insert("age_secs".into(), e.age(now).as_secs().into());
        o.insert(
            "quarantined_at_rfc3339".into(),
            rfc3339(e.quarantined_at).into(),
        );
        o.insert(
            "mtime_rfc3339".into(),
            rfc3339(e.mtime.max(0) as u64).into(),
        );
        if let Some(r) = retain {
            let at = expires_at(e, r);
            o.insert("expires_at".into(), at.into());
            o.insert("expires_at_rfc3339".into(), rfc3339(at).into());
        }
        if let Some(f) = usage.and_then(|u| u.by_id.get(&e.id)) {
            o.insert("data_size".into(), f.size.into());
            o.insert("allocated_bytes".into(), f.allocated.into());
        }
    }
    v
}

/// `baseguard list`.
#[derive(clap::Args, Debug)]
#[command(
    about = "List quarantined files",
    long_about = "List the files baseguard kept instead of letting them be deleted, oldest first: id, \
original path, size, age, when the daemon's sweep will purge it, and who deleted it.",
    after_help = concat!("Examples:\n  baseguard list\n  baseguard list --json | jq '.entries[].path'\n  baseguard list --dir /srv/nova-backing --retain 30d\n\n", "DIR defaults to /var/lib/nova/instances (a baseguard mountpoint or its backing directory).\n\n", "Exit status: 0 listed; 3 could not read the quarantine (not root, not a baseguard directory).")
)]
pub struct ListArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Print JSON: {"version": 1, "retain_secs": N, "entries": [...]}.
    #[arg(long)]
    pub json: bool,
    #[arg(long, requires = "json", help = crate::cmd::text::COMPACT_HELP)]
    pub compact: bool,
    /// Also show records whose stash or restore is in flight or was
    /// interrupted (state pending/restoring).
    #[arg(long)]
    pub all: bool,
    /// Show the audit trail instead: every restore and purge of the last 90
    /// days (when, what, who), oldest first.
    #[arg(long, conflicts_with = "all")]
    pub history: bool,
    /// Retention time for the EXPIRES column (30m, 12h, 14d, 2w) [default:
    /// the shared policy's, see 'baseguard policy'].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub retain: Option<Duration>,
}

impl ListArgs {
    pub fn run(&self) -> ExitCode {
        let (b, q) = match open(&self.loc) {
            Ok(x) => x,
            Err(e) => return cannot(e),
        };
        warn_dead(&b);
        if self.history {
            return self.history(q.as_ref());
        }
        let entries = match &q {
            None => Vec::new(),
            // Entries being restored are always shown (a restore that died
            // must never hide a file), pending records only with --all.
            Some(q) => match q.list_all() {
                Ok(mut v) => {
                    if !self.all {
                        v.retain(|e| e.state != EntryState::Pending);
                    }
                    v
                }
                Err(e) => return cannot(format!("cannot list the quarantine: {e}")),
            },
        };
        let retain = policy::retain_for_cli(q.as_ref(), self.retain);
        let usage = q.as_ref().and_then(|q| Usage::measure(q).ok());
        let now = SystemTime::now();
        if self.json {
            let v: Vec<_> = entries
                .iter()
                .map(|e| entry_json(e, Some(retain), now, usage.as_ref()))
                .collect();
            print_json(serde_json::json!({
                "retain_secs": retain.as_secs(),
                "entries": v,
            }));
            return ExitCode::SUCCESS;
        }
        if entries.is_empty() {
            println!("The quarantine is empty.");
            return ExitCode::SUCCESS;
        }
        let rows: Vec<[String; 6]> = entries
            .iter()
            .map(|e| {
                let mut id = e.id.clone();
                if e.state != EntryState::Held {
                    id = format!("{id} ({})", state_word(e.state));
                }
                if let Some(c) = &e.claim {
                    id = format!("{id} {}", claim_str(c));
                }
                // The data file's own size: a record's can be stale or corrupt.
                let size = usage
                    .as_ref()
                    .and_then(|u| u.by_id.get(&e.id))
                    .map_or(e.size, |f| f.size);
                [
                    id,
                    qpath_of(e),
                    human_size(size),
                    human_age(e.age(now)),
                    expires(e, retain, now),
                    who_str(e),
                ]
            })
            .collect();
        print_table(&["ID", "PATH", "SIZE", "AGE", "EXPIRES", "BY"], &rows);
        // Each file once (hard links), as measured.
        let (held, alloc) = usage.as_ref().map_or((0, 0), |u| (u.apparent, u.allocated));
        println!(
            "{} entr{}, {} held ({} on disk)",
            entries.len(),
            if entries.len() == 1 { "y" } else { "ies" },
            human_size(held),
            human_size(alloc)
        );
        ExitCode::SUCCESS
    }
}

impl ListArgs {
    fn history(&self, q: Option<&Quarantine>) -> ExitCode {
        let events = match q.map(crate::audit::read).transpose() {
            Ok(v) => v.unwrap_or_default(),
            Err(e) => return cannot(format!("cannot read the audit trail: {e}")),
        };
        if self.json {
            let v: Vec<_> = events
                .iter()
                .map(|e| {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    v["at_rfc3339"] = rfc3339(e.at).into();
                    v
                })
                .collect();
            print_json(serde_json::json!({ "history": v }));
            return ExitCode::SUCCESS;
        }
        if events.is_empty() {
            println!("No restores or purges recorded.");
            return ExitCode::SUCCESS;
        }
        let rows: Vec<[String; 5]> = events
            .iter()
            .map(|e| {
                let what = match &e.dest {
                    Some(d) if *d != e.path => {
                        format!("{} -> {}", text::quote_str(&e.path), text::quote_str(d))
                    }
                    _ => text::quote_str(&e.path),
                };
                let what = match &e.reason {
                    Some(r) => format!("{what} ({r})"),
                    None => what,
                };
                [
                    fmt_utc(e.at),
                    e.action.clone(),
                    e.id.clone(),
                    what,
                    visible(&e.who.to_string()),
                ]
            })
            .collect();
        print_table(&["WHEN", "ACTION", "ID", "PATH", "BY"], &rows);
        ExitCode::SUCCESS
    }
}

/// `by pid 123@node1`, `by pid 123@node2 (another host)`, `(owner unknown)`.
fn claim_str(c: &quarantine::Claim) -> String {
    match (&c.owner, c.owner_state) {
        (Some(o), quarantine::OwnerState::Alive) => format!("by {o}"),
        (Some(o), quarantine::OwnerState::Dead) => format!("by {o}, which died"),
        (Some(o), quarantine::OwnerState::Unknown) => format!("by {o} (another host)"),
        (None, _) => "(owner unknown)".into(),
    }
}

fn state_word(s: EntryState) -> &'static str {
    match s {
        EntryState::Held => "held",
        EntryState::Pending => "pending",
        EntryState::Restoring => "restoring",
    }
}

fn print_table<const N: usize>(head: &[&str; N], rows: &[[String; N]]) {
    let mut w: [usize; N] = [0; N];
    for (i, h) in head.iter().enumerate() {
        w[i] = h.chars().count();
    }
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `baseguard show`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Show everything recorded about one quarantined file",
    long_about = "Show everything recorded about one quarantined file: where it was, who deleted it \
and how, when it expires, which instance disks reference it, and what to do next.",
    after_help = "Examples:\n  baseguard show 20261123-213301-compute1-a1b2c3\n  baseguard show 20261123-2133     (a unique prefix of an id)\n  baseguard show _base/5f1e0b2c...   (the newest entry of that original path)\n  baseguard show --json ID\n\nExit status: 0 shown; 1 no such entry; 3 could not read the quarantine."
)]
pub struct ShowArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Entry id (from `baseguard list`), a unique prefix of one, or an
    /// original path (relative to DIR, or absolute under DIR) meaning its
    /// newest entry.
    #[arg(value_name = "ID|PATH")]
    pub target: OsString,
    /// Print JSON: {"version": 1, "entry": {...}} with every key of
    /// `list --json` plus referenced_by and next_step.
    #[arg(long)]
    pub json: bool,
    #[arg(long, requires = "json", help = crate::cmd::text::COMPACT_HELP)]
    pub compact: bool,
    /// Retention time for the expiry [default: the shared policy's].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub retain: Option<Duration>,
}

impl ShowArgs {
    pub fn run(&self) -> ExitCode {
        let (b, q, e) = match open_entry(&self.loc, &self.target) {
            Ok(x) => x,
            Err((code, msg)) => return text::fail_with(code, msg),
        };
        let now = SystemTime::now();
        let retain = policy::retain_for_cli(Some(&q), self.retain);
        let usage = Usage::measure(&q).ok();
        let refs = References::for_backing(b.fd.as_fd(), vec![b.dir.clone(), b.path.clone()]);
        let disks = refs.disks_using(&e.orig_path());
        let present = present_at(&b, &e.orig_path());
        let next = next_step(&e, &disks, present);
        if self.json {
            let mut v = entry_json(&e, Some(retain), now, usage.as_ref());
            if let Some(o) = v.as_object_mut() {
                o.insert("referenced_by".into(), serde_json::json!(disks));
                o.insert("original_path_exists".into(), present.into());
                o.insert("next_step".into(), next.into());
            }
            print_json(serde_json::json!({ "entry": v }));
            return ExitCode::SUCCESS;
        }
        let kv = |k: &str, v: String| println!("{k:<16}{v}");
        kv("id:", e.id.clone());
        match &e.claim {
            Some(c) => kv(
                "state:",
                format!(
                    "restoring {} (put back at once if it dies on this host; after {} min otherwise)",
                    claim_str(c),
                    quarantine::CLAIM_GRACE.as_secs() / 60
                ),
            ),
            None => kv("state:", state_word(e.state).into()),
        }
        kv("path:", qpath_of(&e));
        kv("kind:", format!("{:?}", e.kind).to_lowercase());
        let size = usage.as_ref().and_then(|u| u.by_id.get(&e.id)).copied();
        match size {
            Some(f) => kv(
                "size:",
                format!(
                    "{} ({} bytes, {} on disk)",
                    human_size(f.size),
                    f.size,
                    human_size(f.allocated)
                ),
            ),
            None => kv(
                "size:",
                format!("{} ({} bytes)", human_size(e.size), e.size),
            ),
        }
        kv(
            "mode:",
            format!(
                "{:o} owner {}:{}",
                e.mode & 0o7777,
                e.owner_uid,
                e.owner_gid
            ),
        );
        kv("mtime:", fmt_utc(e.mtime.max(0) as u64));
        kv("inode:", e.ino.to_string());
        kv(
            "quarantined:",
            format!(
                "{} ({} ago)",
                fmt_utc(e.quarantined_at),
                human_age(e.age(now))
            ),
        );
        let due = expires_at(&e, retain);
        kv(
            "expires:",
            format!(
                "{} ({}; retention {})",
                fmt_utc(due.min(253_402_300_799)),
                expires(&e, retain, now),
                crate::mountopts::format_duration(retain)
            ),
        );
        kv("why:", e.why.to_string());
        kv("method:", format!("{:?}", e.method).to_lowercase());
        kv("by:", who_str(&e));
        kv(
            "process:",
            format!("{} (pid {})", visible(&e.who.comm), e.who.pid),
        );
        kv("command line:", visible(&e.who.cmdline));
        kv("uid/gid:", format!("{}/{}", e.who.uid, e.who.gid));
        kv("host:", visible(&e.who.host));
        if disks.is_empty() {
            kv("referenced by:", "no instance disk".into());
        } else {
            for (i, d) in disks.iter().enumerate() {
                kv(
                    if i == 0 { "referenced by:" } else { "" },
                    quote(d.as_os_str()),
                );
            }
        }
        kv("next step:", next);
        ExitCode::SUCCESS
    }
}

/// Is something at `rel` under the backing directory now?
fn present_at(b: &Backing, rel: &Path) -> bool {
    let here = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&b.fd));
    std::fs::symlink_metadata(Path::new(&here).join(rel)).is_ok()
}

/// What an operator should do about an entry.
fn next_step(e: &Entry, disks: &[PathBuf], present: bool) -> String {
    match (e.state, disks.is_empty(), present) {
        (EntryState::Held, false, false) => format!(
            "an instance disk needs this file and its path is empty: restore it now with 'baseguard restore {}'",
            e.id
        ),
        (EntryState::Held, false, true) => format!(
            "an instance disk references this path, which holds a file again; compare before restoring ('baseguard restore {} --to PATH')",
            e.id
        ),
        (EntryState::Held, true, false) => format!(
            "nothing references it; it is purged when it expires, or restore it with 'baseguard restore {}'",
            e.id
        ),
        (EntryState::Held, true, true) => format!(
            "nothing references it and its path holds a newer file; it is purged when it expires (or 'baseguard restore {} --to PATH')",
            e.id
        ),
        (EntryState::Pending, _, _) => {
            "its stash never completed: the file was never moved; check its original path".into()
        }
        (EntryState::Restoring, _, _) => {
            "a restore is in progress (or was interrupted: the sweep puts it back within 15 minutes)".into()
        }
    }
}

/// Open the quarantine and find `target` in it (see [`lookup`]). Errors
/// carry their exit status.
fn open_entry(
    loc: &Location,
    target: &OsStr,
) -> Result<(Backing, Quarantine, Entry), (u8, String)> {
    let (b, q) = open(loc).map_err(|m| (exit::CANNOT, m))?;
    let Some(q) = q else {
        return Err((
            exit::ATTENTION,
            format!(
                "nothing in the quarantine matches '{}': the baseguard mount at {} keeps no quarantine",
                quote(target),
                b.dir.display()
            ),
        ));
    };
    warn_dead(&b);
    let e = lookup(&q, &b, target).map_err(|e| (exit::ATTENTION, e))?;
    Ok((b, q, e))
}

/// An id (any state), a unique prefix of an id, or a path (its newest held
/// entry; the path may be any bytes).
fn lookup(q: &Quarantine, b: &Backing, target: &OsStr) -> Result<Entry, String> {
    lookup_q(q, b, target).map_err(|e| e.to_string())
}

fn lookup_q(q: &Quarantine, b: &Backing, target: &OsStr) -> Result<Entry, QError> {
    if Path::new(target).is_absolute() {
        let rel = b.relativize(target)?;
        return q
            .latest_for(&rel)
            .ok_or_else(|| QError::NoMatch(quote(target)));
    }
    let Some(t) = target.to_str() else {
        // Not UTF-8: only a path can be meant.
        let rel = quarantine::clean_rel(Path::new(target))?;
        return q
            .latest_for(&rel)
            .ok_or_else(|| QError::NoMatch(quote(target)));
    };
    // Over `_base` alone, records are relative to `_base`; accept the
    // path relative to the instances directory too.
    let in_base = b
        .instances
        .as_ref()
        .and_then(|_| t.strip_prefix(&format!("{}/", crate::refs::BASE_DIR)));
    let r = match (q.resolve(t), in_base) {
        (Err(e), Some(tb)) => q.resolve(tb).map_err(|_| e),
        (r, _) => r,
    };
    match r {
        // A unique prefix of an id names that entry.
        Err(err @ (QError::UnknownId(_) | QError::NoMatch(_))) if quarantine::valid_id(t) => {
            let all = q.list_all().unwrap_or_default();
            let mut hits = all.iter().filter(|e| e.id.starts_with(t));
            match (hits.next(), hits.next()) {
                (Some(one), None) => q.get(&one.id),
                (Some(_), Some(_)) => Err(QError::Io {
                    what: format!("'{t}' is the start of several entry ids; give more of the id"),
                    err: io::Error::from(io::ErrorKind::InvalidInput),
                }),
                _ => Err(err),
            }
        }
        r => r,
    }
}

/// A dead or hung daemon for `--dir` is said (the command still works on
/// the backing directory).
fn warn_dead(b: &Backing) {
    if let Some(p) = b.health.as_ref().and_then(MountHealth::problem) {
        eprintln!("baseguard: warning: {p}");
    }
}

/// `baseguard restore`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Put a quarantined file back",
    long_about = "Put a quarantined file back at its original path (or at --to DEST). The file is moved, \
not copied, and an existing file is never overwritten: with --force the file in the way is itself \
moved into the quarantine first, so nothing is lost. The destination's directory must exist.",
    after_help = "Examples:\n  baseguard restore 20261123-213301-compute1-a1b2c3\n  baseguard restore _base/5f1e0b2c4d...        (newest entry of that path)\n  baseguard restore /var/lib/nova/instances/_base/5f1e0b2c4d...\n  baseguard restore ID --to _base/5f1e0b2c4d.recovered\n  baseguard restore ID --force                 (stash the current file, then restore)\n\nExit status: 0 restored; 1 refused or failed, nothing changed; 3 could not read the quarantine."
)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Entry id, or original path (relative to DIR, or absolute under DIR)
    /// meaning its newest entry.
    #[arg(value_name = "ID|PATH")]
    pub target: OsString,
    /// Restore to this path instead (relative to DIR, or absolute under DIR).
    #[arg(long, value_name = "DEST")]
    pub to: Option<OsString>,
    /// If the destination exists, move it into the quarantine first.
    #[arg(long)]
    pub force: bool,
}

impl RestoreArgs {
    pub fn run(&self) -> ExitCode {
        let (b, q, e) = match open_entry(&self.loc, &self.target) {
            Ok(x) => x,
            Err((code, msg)) => return text::fail_with(code, msg),
        };
        let to = match &self.to {
            Some(t) => match b.relativize(t) {
                Ok(p) => Some(p),
                Err(err) => return fail(err),
            },
            None => None,
        };
        match q.restore(&e.id, to.as_deref(), self.force, &Who::current()) {
            Ok(r) => {
                println!(
                    "restored {} to {}",
                    r.entry.id,
                    quote(b.dir.join(&r.dest).as_os_str())
                );
                if let Some(d) = r.displaced {
                    println!(
                        "the file that was there is now quarantined as {} (restore it with 'baseguard restore {}')",
                        d.id, d.id
                    );
                }
                ExitCode::SUCCESS
            }
            Err(err) => fail(err),
        }
    }
}

/// `baseguard purge`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Delete quarantined files for good",
    long_about = "Delete quarantined files for good: one entry by id, every entry older than the \
retention time (--expired), or every entry older than AGE. This is the only real deletion \
baseguard does. Files an instance disk still references are kept (without --force). Without \
--yes nothing is deleted: the command shows exactly what --yes would do (the same plan; --dry-run \
asks for that explicitly and exits 0).",
    after_help = "Examples:\n  baseguard purge 20261123-213301-compute1-a1b2c3          (shows what it would delete)\n  baseguard purge 20261123-213301-compute1-a1b2c3 --yes\n  baseguard purge --expired --dry-run --json\n  baseguard purge --expired --yes            (retention: the shared policy's)\n  baseguard purge --older-than 30d --yes\n\nExit status: 0 done (or --dry-run); 1 a preview without --yes, a refused request, or a purge that failed; 3 could not read the quarantine."
)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["id", "expired", "older_than"])))]
pub struct PurgeArgs {
    #[command(flatten)]
    pub loc: Location,
    /// The entry id to delete.
    #[arg(value_name = "ID")]
    pub id: Option<String>,
    /// Delete every entry older than the retention time (--retain, or the
    /// shared policy's).
    #[arg(long)]
    pub expired: bool,
    /// Delete every entry older than AGE (30m, 12h, 14d, 2w).
    #[arg(long, value_name = "AGE", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Retention time for --expired [default: the shared policy's].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub retain: Option<Duration>,
    /// Really delete.
    #[arg(long, conflicts_with = "dry_run")]
    pub yes: bool,
    /// Show what --yes would delete and keep, and delete nothing (exit 0).
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON: {"version": 1, "purged": [...], "kept": [...]} (and
    /// "failed" when something failed); --dry-run prints exactly what --yes
    /// then does.
    #[arg(long)]
    pub json: bool,
    #[arg(long, requires = "json", help = crate::cmd::text::COMPACT_HELP)]
    pub compact: bool,
    /// Also delete files that an instance disk still references (without
    /// it they are kept, and said why).
    #[arg(long)]
    pub force: bool,
}

/// What a purge run will do: decided once, then shown (preview) or done.
struct PurgePlan {
    purge: Vec<Entry>,
    kept: Vec<(Entry, String)>,
}

fn purged_json(e: &Entry) -> serde_json::Value {
    serde_json::json!({"id": e.id, "path": e.path, "size": e.size})
}

impl PurgeArgs {
    pub fn run(&self) -> ExitCode {
        let (b, q) = match open(&self.loc) {
            Ok(x) => x,
            Err(e) => return cannot(e),
        };
        warn_dead(&b);
        let refs = match b.references() {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        // As the daemons' expiry: kept while an instance disk references
        // the path and the path is empty; a displaced copy of a file that is
        // back at its path is not.
        let needed = q.as_ref().map(|q| refs.keeper(q));
        let keep = |e: &Entry| {
            if self.force || present_at(&b, &e.orig_path()) {
                None
            } else {
                needed.as_ref().and_then(|k| k(e))
            }
        };
        let now = SystemTime::now();
        let retain = policy::retain_for_cli(q.as_ref(), self.retain);
        let age = self.older_than.unwrap_or(retain);
        let Some(q) = q else {
            return match &self.id {
                Some(id) => fail(QError::UnknownId(id.clone())),
                None => self.report(
                    &PurgePlan {
                        purge: vec![],
                        kept: vec![],
                    },
                    &[],
                    "nothing to purge",
                ),
            };
        };
        // Decide.
        let plan = if let Some(id) = &self.id {
            let e = match q.get(id) {
                Ok(e) if e.state != EntryState::Held => {
                    return fail(QError::Gone {
                        id: e.id,
                        state: e.state,
                    });
                }
                Ok(e) => e,
                Err(err) => return fail(err),
            };
            if let Some(reason) = keep(&e) {
                return fail(format!(
                    "{} ({}) is {reason}: purging it would lose that instance's disk; \
                     use --force to delete it anyway",
                    e.id,
                    qpath_of(&e)
                ));
            }
            PurgePlan {
                purge: vec![e],
                kept: vec![],
            }
        } else {
            let due: Vec<Entry> = match q.list() {
                Ok(v) => v.into_iter().filter(|e| e.age(now) >= age).collect(),
                Err(e) => return cannot(format!("cannot list the quarantine: {e}")),
            };
            let mut plan = PurgePlan {
                purge: vec![],
                kept: vec![],
            };
            for e in due {
                match keep(&e) {
                    Some(reason) => plan.kept.push((e, reason)),
                    None => plan.purge.push(e),
                }
            }
            plan
        };
        if !self.yes {
            return self.report(&plan, &[], "");
        }
        // Do exactly the plan.
        let mut failed = Vec::new();
        let mut done = Vec::new();
        for e in &plan.purge {
            match q.purge(&e.id) {
                Ok(_) => done.push(e.clone()),
                Err(error) => failed.push((e.clone(), error.to_string())),
            }
        }
        if self.id.is_none() {
            // The sweep's housekeeping, without purging anything more: put
            // back claims of crashed restores, remove stale leftovers.
            for o in q.purge_expired(Duration::MAX, &|_| None) {
                if !self.json {
                    match o {
                        PurgeOutcome::Recovered { id } => {
                            println!("recovered {id} from an interrupted restore")
                        }
                        PurgeOutcome::Cleaned { name } => {
                            println!("removed stale leftover {}", text::quote_str(&name))
                        }
                        _ => {}
                    }
                }
            }
        }
        let done_plan = PurgePlan {
            purge: done,
            kept: plan.kept,
        };
        self.report(&done_plan, &failed, "")
    }

    /// Print a plan (preview) or its outcome, and choose the exit status.
    /// The JSON of a dry run and of the real run agree exactly when nothing
    /// changed in between (and nothing failed).
    fn report(&self, plan: &PurgePlan, failed: &[(Entry, String)], empty: &str) -> ExitCode {
        let preview = !self.yes;
        let attention = !failed.is_empty() || (preview && !self.dry_run && !plan.purge.is_empty());
        let code = if attention {
            ExitCode::from(exit::ATTENTION)
        } else {
            ExitCode::SUCCESS
        };
        if self.json {
            let mut v = serde_json::json!({
                "purged": plan.purge.iter().map(purged_json).collect::<Vec<_>>(),
                "kept": plan.kept.iter().map(|(e, r)| {
                    let mut v = purged_json(e);
                    v["reason"] = r.clone().into();
                    v
                }).collect::<Vec<_>>(),
            });
            if !failed.is_empty() {
                v["failed"] = failed
                    .iter()
                    .map(|(e, r)| {
                        let mut v = purged_json(e);
                        v["error"] = r.clone().into();
                        v
                    })
                    .collect();
            }
            print_json(v);
            return code;
        }
        let now = SystemTime::now();
        let total = human_size(plan.purge.iter().map(|e| e.size).sum());
        let n = plan.purge.len();
        let entries = if n == 1 { "entry" } else { "entries" };
        let line = |e: &Entry| {
            format!(
                "{} ({}, {}, quarantined {} ago)",
                e.id,
                qpath_of(e),
                human_size(e.size),
                human_age(e.age(now))
            )
        };
        if plan.purge.is_empty() && plan.kept.is_empty() && failed.is_empty() {
            let why = if !empty.is_empty() {
                String::new()
            } else {
                match self.older_than.or(self.retain) {
                    Some(a) => format!(": no entry is older than {}", human_age(a)),
                    None => ": no entry is due".into(),
                }
            };
            println!("Nothing to purge{why}.");
        }
        if preview && !self.dry_run {
            // Exit 1, nothing done: the plan goes to stderr.
            if n > 0 {
                eprintln!(
                    "baseguard: would delete {n} {entries} ({total} in all) for good; run again with --yes to do it:"
                );
                for e in &plan.purge {
                    eprintln!("  {}", line(e));
                }
            }
            for (e, reason) in &plan.kept {
                eprintln!("  kept {} ({}): {reason}", e.id, qpath_of(e));
            }
            return code;
        }
        let verb = if preview { "would purge" } else { "purged" };
        for e in &plan.purge {
            println!("{verb} {}", line(e));
        }
        for (e, reason) in &plan.kept {
            println!("kept {} ({}): {reason}", e.id, qpath_of(e));
        }
        for (e, err) in failed {
            eprintln!("baseguard: could not purge {}: {err}", e.id);
        }
        if preview {
            println!("dry run: {n} {entries} would be purged ({total}); nothing was deleted");
        } else {
            println!("{n} purged");
        }
        code
    }
}

/// `baseguard status`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Show baseguard mounts on this host and a summary of the quarantine",
    long_about = "Show the baseguard mounts on this host, each probed (a statfs that must answer \
within 2 s), and a summary of DIR's quarantine: entries, bytes held, the oldest, and near misses \
(quarantined files an instance disk still uses) first. A baseguard daemon for DIR that is not \
running or not answering is said on stderr with what to do; other dead mounts of the host are \
listed and said too.",
    after_help = concat!("Examples:\n  baseguard status\n  baseguard status --json\n  baseguard status --dir /var/lib/nova/instances/_base\n\n", "DIR defaults to /var/lib/nova/instances (a baseguard mountpoint or its backing directory; \
with baseguard over _base alone, DIR/_base's mount is used).\n\n", "Exit status: 0 all well; 1 attention (a near miss: a quarantined file an instance disk needs; or DIR's daemon is not running or not answering); 3 could not read the quarantine.")
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Print JSON ({"version": 1, ...}).
    #[arg(long)]
    pub json: bool,
    #[arg(long, requires = "json", help = crate::cmd::text::COMPACT_HELP)]
    pub compact: bool,
    /// Retention time, to count entries due for purging [default: the shared
    /// policy's].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub retain: Option<Duration>,
}

impl StatusArgs {
    pub fn run(&self) -> ExitCode {
        // Read and probe the mounts before resolve_backing may detach one
        // privately: a dead or hung daemon is never reported healthy.
        let mounts = MountHealth::of_all(&baseguard_mounts());
        let problems: Vec<String> = mounts.iter().filter_map(MountHealth::problem).collect();
        for p in &problems {
            eprintln!("baseguard: {p}");
        }
        let (b, q) = match open(&self.loc) {
            Ok(x) => x,
            Err(e) => return cannot(e),
        };
        // The exit status is about DIR's mount; other dead mounts of the
        // host are listed (and said on stderr) but do not change it.
        let ok = match &b.health {
            Some(h) if !h.alive => ExitCode::from(health::EXIT_DEAD),
            _ => ExitCode::SUCCESS,
        };
        let st = match &q {
            None => Status::default(),
            Some(q) => match q.status() {
                Ok(s) => s,
                Err(e) => return cannot(format!("cannot read the quarantine: {e}")),
            },
        };
        let stored_policy = q
            .as_ref()
            .and_then(|q| policy::Policy::read(q).ok().flatten());
        let retain = policy::retain_for_cli(q.as_ref(), self.retain);
        let usage = q
            .as_ref()
            .and_then(|q| Usage::measure(q).ok())
            .unwrap_or_default();
        let space = FsSpace::of(b.fd.as_fd()).unwrap_or_default();
        let now = SystemTime::now();
        let due = match &q {
            Some(q) => q
                .list()
                .map(|v| v.iter().filter(|e| e.age(now) >= retain).count())
                .unwrap_or(0),
            None => 0,
        };
        // Near misses: quarantined files an instance disk still references,
        // which Nova's deletion would have lost.
        let refs = match b.references() {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        let referenced = refs.referenced();
        let near: Vec<Entry> = match &q {
            Some(q) => q
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter(|e| referenced.contains(&e.orig_path()))
                .filter(|e| {
                    let here = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&b.fd));
                    std::fs::symlink_metadata(Path::new(&here).join(e.orig_path())).is_err()
                })
                .collect(),
            None => Vec::new(),
        };
        let qpath = quarantine_path(&b, &self.loc).display().to_string();
        let runs = crate::metrics::RunFile::all();
        // What a daemon of this backing directory asks for that the shared
        // policy does not apply.
        let conflicts = |m: &MountHealth, run: Option<&crate::metrics::RunFile>| -> Vec<String> {
            match (run, &stored_policy) {
                (Some(r), Some(p)) if Path::new(&m.backing) == b.path => {
                    policy::conflicts_of(&r.options, p)
                }
                _ => Vec::new(),
            }
        };
        let code = if near.is_empty() {
            ok
        } else {
            ExitCode::from(exit::ATTENTION)
        };
        if self.json {
            let v = serde_json::json!({
                "near_misses": near.iter().map(|e| entry_json(e, Some(retain), now, Some(&usage))).collect::<Vec<_>>(),
                "referenced_base_files": referenced.len(),
                "mounts": mounts.iter().map(|m| {
                    // Health (alive, state), the session registry (supervisor
                    // and server pids, start, restarts) and the daemon's run
                    // file (log destination, options in effect).
                    let mut v = serde_json::to_value(m).unwrap_or_default();
                    crate::session::registry::add_status_fields(&mut v, &m.mountpoint);
                    let run = runs.iter().find(|r| r.mountpoint == m.mountpoint);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("log".into(), serde_json::json!(run.map(|r| r.log.clone())));
                        o.insert(
                            "transport".into(),
                            serde_json::json!(run.map(|r| r.transport.clone()).filter(|t| !t.is_empty())),
                        );
                        o.insert(
                            "options".into(),
                            serde_json::json!(run.map(|r| r.options.clone())),
                        );
                        o.insert(
                            "policy_conflicts".into(),
                            serde_json::json!(conflicts(m, run)),
                        );
                    }
                    v
                }).collect::<Vec<_>>(),
                "dir": b.dir,
                "backing": b.path,
                "instances": b.instances,
                "mounted": b.mount.is_some(),
                "alive": b.health.as_ref().map(|h| h.alive),
                "quarantine": qpath,
                "exists": q.is_some(),
                "entries": st.entries,
                "bytes": usage.apparent,
                "allocated_bytes": usage.allocated,
                "filesystem_bytes": space.total,
                "filesystem_available_bytes": space.available,
                "share_percent": space.percent(usage.allocated),
                "retain_secs": retain.as_secs(),
                "policy": stored_policy,
                "oldest": st.oldest.as_ref().map(|e| entry_json(e, Some(retain), now, Some(&usage))),
                "due": due,
                "pending": st.pending,
                "restoring": st.restoring,
                "orphans": st.orphans,
            });
            print_json(v);
            return code;
        }
        for e in &near {
            println!(
                "NEAR MISS:   {} was deleted by {} {} ago but an instance disk uses it: \
                 restore it with 'baseguard restore {}' (or 'baseguard check --restore')",
                qpath_of(e),
                who_str(e),
                human_age(e.age(now)),
                e.id
            );
        }
        if mounts.is_empty() {
            println!("mounts:      none (no fuse.baseguard mount on this host)");
        } else {
            for (i, m) in mounts.iter().enumerate() {
                let log = runs
                    .iter()
                    .find(|r| r.mountpoint == m.mountpoint)
                    .map(|r| {
                        let t = if r.transport.is_empty() {
                            "dev"
                        } else {
                            r.transport.as_str()
                        };
                        format!(", logging to {}, transport {t}", r.log)
                    })
                    .unwrap_or_default();
                println!(
                    "{:<13}{} (backing {}){}{log}",
                    if i == 0 { "mounts:" } else { "" },
                    quote(m.mountpoint.as_os_str()),
                    text::quote_str(&m.backing),
                    match m.state {
                        health::Liveness::Alive => "",
                        health::Liveness::NotConnected => " NOT RUNNING (dead mount)",
                        health::Liveness::NoAnswer => " NOT ANSWERING",
                        health::Liveness::Error => " NOT WORKING",
                    }
                );
                let run = runs.iter().find(|r| r.mountpoint == m.mountpoint);
                if let Some(r) = run {
                    println!("{:<13}  options {}", "", visible(&r.options.join(",")));
                }
                for c in conflicts(m, run) {
                    println!("{:<13}  POLICY CONFLICT: {}", "", visible(&c));
                }
            }
        }
        println!("{:<13}{}", "backing:", b.path.display());
        if let Some(i) = &b.instances {
            println!(
                "{:<13}{} (baseguard serves _base alone)",
                "instances:",
                i.display()
            );
        }
        println!(
            "{:<13}{} file(s) named by instance disks' backing chains",
            "referenced:",
            referenced.len()
        );
        if q.is_none() {
            println!(
                "{:<13}{qpath} (none: this mount keeps no quarantine)",
                "quarantine:"
            );
            return code;
        }
        println!("{:<13}{qpath}", "quarantine:");
        match &stored_policy {
            Some(p) => println!(
                "{:<13}retain {}{} (shared, set by {})",
                "policy:",
                crate::mountopts::format_duration(p.retain()),
                p.min_free
                    .map(|m| format!(", min_free {m}"))
                    .unwrap_or_default(),
                visible(&p.set_by)
            ),
            None => println!(
                "{:<13}none stored; retain {} assumed",
                "policy:",
                crate::mountopts::format_duration(retain)
            ),
        }
        if let Some(p) = &stored_policy {
            if !p.protect.is_empty() {
                let g: Vec<String> = p.protect.iter().map(|g| text::quote_str(g)).collect();
                println!("{:<13}  protect {} (on every node)", "", g.join(" "));
            }
            if !p.ignore.is_empty() {
                let g: Vec<String> = p.ignore.iter().map(|g| text::quote_str(g)).collect();
                println!(
                    "{:<13}  ignore {} (narrows the shared protect only)",
                    "",
                    g.join(" ")
                );
            }
        }
        println!("{:<13}{}", "entries:", st.entries);
        println!(
            "{:<13}{} ({} bytes); {} on disk, {:.1}% of the filesystem ({} free)",
            "held:",
            human_size(usage.apparent),
            usage.apparent,
            human_size(usage.allocated),
            space.percent(usage.allocated),
            human_size(space.available)
        );
        match &st.oldest {
            Some(e) => println!(
                "{:<13}{} ago: {} ({})",
                "oldest:",
                human_age(e.age(now)),
                e.id,
                qpath_of(e)
            ),
            None => println!("{:<13}-", "oldest:"),
        }
        println!("{:<13}{due} older than {}", "due:", human_age(retain));
        if st.pending + st.restoring + st.orphans > 0 {
            println!(
                "{:<13}{} pending, {} restoring, {} orphaned data files (see 'baseguard list --all')",
                "incomplete:", st.pending, st.restoring, st.orphans
            );
        }
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humans() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(20 << 30), "20.0 GiB");
        assert_eq!(human_age(Duration::from_secs(45)), "45s");
        assert_eq!(human_age(Duration::from_secs(3600 * 3 + 120)), "3h02m");
        assert_eq!(
            human_age(Duration::from_secs(86_400 * 5 + 3600 * 3)),
            "5d03h"
        );
    }

    #[test]
    fn mountinfo() {
        let t = "36 35 98:0 /mnt1 /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 90 29 0:50 / /var/lib/nova/instances rw,nosuid,nodev,relatime shared:1 - fuse.baseguard /var/lib/nova/instances rw,user_id=0\n\
                 91 29 0:51 / /mnt/with\\040space rw - fuse.baseguard /srv/back\\040ing rw\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].fstype, FSTYPE);
        assert_eq!(m[1].source, "/var/lib/nova/instances");
        assert_eq!(m[2].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[2].source, "/srv/back ing");
    }
}
