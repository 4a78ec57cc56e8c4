//! `baseguard list | show | restore | purge | status`: the quarantine CLI.
//!
//! Usable on any node, with or without a mount. `--dir` names the instances
//! directory: either a `fuse.baseguard` mountpoint (the backing directory is
//! then taken from the mount's source field in `/proc/self/mountinfo`) or the
//! backing directory itself. When baseguard is mounted over its own backing
//! directory, the command enters a private mount namespace and detaches the
//! mount there to reach the directory underneath (needs root).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::cmd::health::{self, MountHealth};
use crate::heal::{BaseLayout, References};
use crate::quarantine::{
    self, Entry, EntryState, PurgeOutcome, QError, Quarantine, Status, Who, fmt_utc,
};
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
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// The quarantine directory, if the daemon runs with --quarantine
    /// (default: DIR's backing directory/.baseguard).
    #[arg(long, value_name = "QDIR")]
    pub quarantine: Option<PathBuf>,
    /// The instances directory, when baseguard serves `_base` alone and it
    /// is not `_base`'s parent (the daemon's --instances). When DIR has no
    /// baseguard mount but DIR/_base has, that mount is used.
    #[arg(long, value_name = "IDIR")]
    pub instances: Option<PathBuf>,
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
    })
}

/// [`resolve_backing`] for a command's `--dir`, `--instances`.
pub fn resolve_location(loc: &Location) -> Result<Backing, String> {
    let mut b = resolve_backing(&loc.dir)?;
    // Not mounted, and the quarantine is in `_base` (the `_base`-only
    // layout seen from a node without the mount): use `DIR/_base`.
    let q = quarantine::DEFAULT_DIR_NAME;
    let base = b.path.join(crate::refs::BASE_DIR);
    if loc.quarantine.is_none()
        && b.mount.is_none()
        && b.instances.is_none()
        && !b.path.join(q).exists()
        && base.join(q).is_dir()
    {
        b = resolve_backing(&base)?;
    }
    if let Some(i) = &loc.instances {
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
    pub fn relativize(&self, p: &str) -> Result<PathBuf, QError> {
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
/// so they go to syslog (`info`) when `/dev/log` is there; otherwise only
/// warnings reach stderr (the commands print their own results). `RUST_LOG`
/// overrides the level. Installs no thread (the namespace step needs none).
pub fn init_logging() {
    use crate::logging::{self, LogTarget};
    let env = std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty());
    if let Ok((d, LogTarget::Syslog { .. })) =
        logging::build(&LogTarget::syslog(), if env { None } else { Some("info") })
    {
        let _ = tracing::dispatcher::set_global_default(d);
        return;
    }
    let _ = logging::init(LogTarget::Stderr, if env { None } else { Some("warn") });
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("baseguard: {msg}");
    ExitCode::from(1)
}

/// Open the quarantine for a command; `Ok(None)` when none exists yet.
fn open(loc: &Location) -> Result<(Backing, Option<Quarantine>), String> {
    init_logging();
    let b = resolve_location(loc)?;
    match Quarantine::open_existing(b.fd.as_fd(), loc.quarantine.as_deref()) {
        Ok(q) => Ok((b, Some(q))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((b, None)),
        Err(e) => Err(e.to_string()),
    }
}

fn who_str(e: &Entry) -> String {
    e.who.to_string()
}

fn entry_json(e: &Entry, retain: Option<Duration>, now: SystemTime) -> serde_json::Value {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "state".into(),
            serde_json::to_value(e.state).unwrap_or_default(),
        );
        o.insert("age_secs".into(), e.age(now).as_secs().into());
        if let Some(r) = retain {
            o.insert("expires_at".into(), (e.quarantined_at + r.as_secs()).into());
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
    after_help = concat!("Examples:\n  baseguard list\n  baseguard list --json | jq '.[].path'\n  baseguard list --dir /srv/nova-backing --retain 30d\n\n", "DIR defaults to /var/lib/nova/instances (a baseguard mountpoint or its backing directory).")
)]
pub struct ListArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also show records whose stash or restore is in flight or was
    /// interrupted (state pending/restoring).
    #[arg(long)]
    pub all: bool,
    /// The daemon's retention time, used for the EXPIRES column (30m, 12h,
    /// 14d, 2w).
    #[arg(long, value_name = "DUR", default_value = "14d", value_parser = parse_duration)]
    pub retain: Duration,
}

impl ListArgs {
    pub fn run(&self) -> ExitCode {
        let (b, q) = match open(&self.loc) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        warn_dead(&b);
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
                Err(e) => return fail(format!("cannot list the quarantine: {e}")),
            },
        };
        let now = SystemTime::now();
        if self.json {
            let v: Vec<_> = entries
                .iter()
                .map(|e| entry_json(e, Some(self.retain), now))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
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
                [
                    id,
                    e.path.clone(),
                    human_size(e.size),
                    human_age(e.age(now)),
                    expires(e, self.retain, now),
                    who_str(e),
                ]
            })
            .collect();
        print_table(&["ID", "PATH", "SIZE", "AGE", "EXPIRES", "BY"], &rows);
        let total: u64 = entries
            .iter()
            .filter(|e| e.state == EntryState::Held)
            .map(|e| e.size)
            .sum();
        println!(
            "{} entr{}, {} held",
            entries.len(),
            if entries.len() == 1 { "y" } else { "ies" },
            human_size(total)
        );
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
    after_help = "Examples:\n  baseguard show 20261123-213301-compute1-a1b2c3\n  baseguard show _base/5f1e0b2c...   (the newest entry of that original path)\n  baseguard show --json ID"
)]
pub struct ShowArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Entry id (from `baseguard list`) or original path (relative to DIR, or
    /// absolute under DIR) meaning its newest entry.
    #[arg(value_name = "ID|PATH")]
    pub target: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl ShowArgs {
    pub fn run(&self) -> ExitCode {
        let (_, _, e) = match open_entry(&self.loc, &self.target) {
            Ok(x) => x,
            Err(msg) => return fail(msg),
        };
        let now = SystemTime::now();
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&entry_json(&e, None, now)).unwrap_or_default()
            );
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
        kv("path:", e.path.clone());
        kv("kind:", format!("{:?}", e.kind).to_lowercase());
        kv(
            "size:",
            format!("{} ({} bytes)", human_size(e.size), e.size),
        );
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
        kv("why:", e.why.to_string());
        kv("method:", format!("{:?}", e.method).to_lowercase());
        kv("by:", who_str(&e));
        kv("process:", format!("{} (pid {})", e.who.comm, e.who.pid));
        kv("command line:", e.who.cmdline.clone());
        kv("uid/gid:", format!("{}/{}", e.who.uid, e.who.gid));
        kv("host:", e.who.host.clone());
        ExitCode::SUCCESS
    }
}

/// Open the quarantine and find `target` in it (see [`lookup`]).
fn open_entry(loc: &Location, target: &str) -> Result<(Backing, Quarantine, Entry), String> {
    let (b, q) = open(loc)?;
    let Some(q) = q else {
        return Err(format!(
            "nothing in the quarantine matches '{target}': nothing has been quarantined under {} yet",
            b.dir.display()
        ));
    };
    warn_dead(&b);
    let e = lookup(&q, &b, target).map_err(|e| e.to_string())?;
    Ok((b, q, e))
}

/// An id (any state) or a path (its newest held entry).
fn lookup(q: &Quarantine, b: &Backing, target: &str) -> Result<Entry, QError> {
    if Path::new(target).is_absolute() {
        let rel = b.relativize(target)?;
        return q
            .latest_for(&rel)
            .ok_or_else(|| QError::NoMatch(target.to_string()));
    }
    // Over `_base` alone, records are relative to `_base`; accept the
    // path relative to the instances directory too.
    let in_base = b
        .instances
        .as_ref()
        .and_then(|_| target.strip_prefix(&format!("{}/", crate::refs::BASE_DIR)));
    match (q.resolve(target), in_base) {
        (Err(e), Some(t)) => q.resolve(t).map_err(|_| e),
        (r, _) => r,
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
    after_help = "Examples:\n  baseguard restore 20261123-213301-compute1-a1b2c3\n  baseguard restore _base/5f1e0b2c4d...        (newest entry of that path)\n  baseguard restore /var/lib/nova/instances/_base/5f1e0b2c4d...\n  baseguard restore ID --to _base/5f1e0b2c4d.recovered\n  baseguard restore ID --force                 (stash the current file, then restore)"
)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Entry id, or original path (relative to DIR, or absolute under DIR)
    /// meaning its newest entry.
    #[arg(value_name = "ID|PATH")]
    pub target: String,
    /// Restore to this path instead (relative to DIR, or absolute under DIR).
    #[arg(long, value_name = "DEST")]
    pub to: Option<String>,
    /// If the destination exists, move it into the quarantine first.
    #[arg(long)]
    pub force: bool,
}

impl RestoreArgs {
    pub fn run(&self) -> ExitCode {
        let (b, q, e) = match open_entry(&self.loc, &self.target) {
            Ok(x) => x,
            Err(msg) => return fail(msg),
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
                    b.dir.join(&r.dest).display()
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
baseguard does. Without --yes nothing is deleted: the command lists what it would delete and \
exits with status 1.",
    after_help = "Examples:\n  baseguard purge 20261123-213301-compute1-a1b2c3          (shows what it would delete)\n  baseguard purge 20261123-213301-compute1-a1b2c3 --yes\n  baseguard purge --expired --retain 14d --yes\n  baseguard purge --older-than 30d --yes"
)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["id", "expired", "older_than"])))]
pub struct PurgeArgs {
    #[command(flatten)]
    pub loc: Location,
    /// The entry id to delete.
    #[arg(value_name = "ID")]
    pub id: Option<String>,
    /// Delete every entry older than the retention time (--retain).
    #[arg(long)]
    pub expired: bool,
    /// Delete every entry older than AGE (30m, 12h, 14d, 2w).
    #[arg(long, value_name = "AGE", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Retention time for --expired.
    #[arg(long, value_name = "DUR", default_value = "14d", value_parser = parse_duration)]
    pub retain: Duration,
    /// Really delete.
    #[arg(long)]
    pub yes: bool,
    /// Also delete files that an instance disk still references (without
    /// it they are kept, and said why).
    #[arg(long)]
    pub force: bool,
}

impl PurgeArgs {
    pub fn run(&self) -> ExitCode {
        let (b, q) = match open(&self.loc) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        warn_dead(&b);
        let refs = match b.references() {
            Ok(r) => r,
            Err(e) => return fail(e),
        };
        let needed = q.as_ref().map(|q| refs.keeper(q));
        let keep = |e: &Entry| {
            if self.force {
                None
            } else {
                needed.as_ref().and_then(|k| k(e))
            }
        };
        let now = SystemTime::now();
        if let Some(id) = &self.id {
            let Some(q) = q else {
                return fail(QError::UnknownId(id.clone()));
            };
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
                    e.id, e.path
                ));
            }
            if !self.yes {
                eprintln!(
                    "baseguard: would delete {} ({}, {}, quarantined {} ago) for good; run again with --yes to do it",
                    e.id,
                    e.path,
                    human_size(e.size),
                    human_age(e.age(now))
                );
                return ExitCode::from(1);
            }
            return match q.purge(id) {
                Ok(e) => {
                    println!("purged {} ({}, {})", e.id, e.path, human_size(e.size));
                    ExitCode::SUCCESS
                }
                Err(err) => fail(err),
            };
        }
        let age = self.older_than.unwrap_or(self.retain);
        let Some(q) = q else {
            println!("Nothing to purge: the quarantine is empty.");
            return ExitCode::SUCCESS;
        };
        let due: Vec<Entry> = match q.list() {
            Ok(v) => v.into_iter().filter(|e| e.age(now) >= age).collect(),
            Err(e) => return fail(format!("cannot list the quarantine: {e}")),
        };
        if due.is_empty() {
            println!(
                "Nothing to purge: no entry is older than {}.",
                human_age(age)
            );
            return ExitCode::SUCCESS;
        }
        if !self.yes {
            eprintln!(
                "baseguard: would delete {} entr{} older than {} ({} in all) for good; run again with --yes to do it:",
                due.len(),
                if due.len() == 1 { "y" } else { "ies" },
                human_age(age),
                human_size(due.iter().map(|e| e.size).sum())
            );
            for e in &due {
                eprintln!(
                    "  {}  {}  {}  {} old",
                    e.id,
                    e.path,
                    human_size(e.size),
                    human_age(e.age(now))
                );
            }
            return ExitCode::from(1);
        }
        let mut failed = false;
        let mut n = 0;
        for o in q.purge_expired(age, &keep) {
            match o {
                PurgeOutcome::Purged(e) => {
                    n += 1;
                    println!("purged {} ({}, {})", e.id, e.path, human_size(e.size));
                }
                PurgeOutcome::Failed { id, error } => {
                    failed = true;
                    eprintln!("baseguard: could not purge {id}: {error}");
                }
                PurgeOutcome::Kept { entry, reason } => {
                    println!("kept {} ({}): {reason}", entry.id, entry.path);
                }
                PurgeOutcome::Recovered { id } => {
                    println!("recovered {id} from an interrupted restore");
                }
                PurgeOutcome::Cleaned { name } => {
                    println!("removed stale leftover {name}");
                }
            }
        }
        println!("{n} purged");
        if failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// `baseguard status`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Show baseguard mounts on this host and a summary of the quarantine",
    long_about = "Show the baseguard mounts on this host, each probed (a statfs that must answer \
within 2 s), and a summary of DIR's quarantine: entries, bytes held, the oldest, and near misses \
(quarantined files an instance disk still uses) first. Exit status 2 when the baseguard daemon \
for DIR is not running or not answering (with a line saying what to do); other dead mounts of \
the host are listed and said on stderr.",
    after_help = concat!("Examples:\n  baseguard status\n  baseguard status --json\n  baseguard status --dir /var/lib/nova/instances/_base\n\n", "DIR defaults to /var/lib/nova/instances (a baseguard mountpoint or its backing directory; \
with baseguard over _base alone, DIR/_base's mount is used).")
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The daemon's retention time, to count entries due for purging.
    #[arg(long, value_name = "DUR", default_value = "14d", value_parser = parse_duration)]
    pub retain: Duration,
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
            Err(e) => return fail(e),
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
                Err(e) => return fail(format!("cannot read the quarantine: {e}")),
            },
        };
        let now = SystemTime::now();
        let due = match &q {
            Some(q) => q
                .list()
                .map(|v| v.iter().filter(|e| e.age(now) >= self.retain).count())
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
        let qpath = match &self.loc.quarantine {
            Some(p) => p.display().to_string(),
            None => b
                .path
                .join(quarantine::DEFAULT_DIR_NAME)
                .display()
                .to_string(),
        };
        if self.json {
            let v = serde_json::json!({
                "near_misses": near.iter().map(|e| entry_json(e, Some(self.retain), now)).collect::<Vec<_>>(),
                "referenced_base_files": referenced.len(),
                "mounts": mounts.iter().map(|m| {
                    // Health (alive, state) and, from the session registry,
                    // the supervisor and server (pids, start, restarts).
                    let mut v = serde_json::to_value(m).unwrap_or_default();
                    crate::session::registry::add_status_fields(&mut v, &m.mountpoint);
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
                "bytes": st.bytes,
                "oldest": st.oldest.as_ref().map(|e| entry_json(e, Some(self.retain), now)),
                "due": due,
                "pending": st.pending,
                "restoring": st.restoring,
                "orphans": st.orphans,
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            return ok;
        }
        for e in &near {
            println!(
                "NEAR MISS:   {} was deleted by {} {} ago but an instance disk uses it: \
                 restore it with 'baseguard restore {}' (or 'baseguard check --restore')",
                e.path,
                who_str(e),
                human_age(e.age(now)),
                e.id
            );
        }
        if mounts.is_empty() {
            println!("mounts:      none (no fuse.baseguard mount on this host)");
        } else {
            for (i, m) in mounts.iter().enumerate() {
                println!(
                    "{:<13}{} (backing {}){}",
                    if i == 0 { "mounts:" } else { "" },
                    m.mountpoint.display(),
                    m.backing,
                    match m.state {
                        health::Liveness::Alive => "",
                        health::Liveness::NotConnected => " NOT RUNNING (dead mount)",
                        health::Liveness::NoAnswer => " NOT ANSWERING",
                        health::Liveness::Error => " NOT WORKING",
                    }
                );
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
                "{:<13}{qpath} (does not exist yet: nothing quarantined)",
                "quarantine:"
            );
            return ok;
        }
        println!("{:<13}{qpath}", "quarantine:");
        println!("{:<13}{}", "entries:", st.entries);
        println!(
            "{:<13}{} ({} bytes)",
            "held:",
            human_size(st.bytes),
            st.bytes
        );
        match &st.oldest {
            Some(e) => println!(
                "{:<13}{} ago: {} ({})",
                "oldest:",
                human_age(e.age(now)),
                e.id,
                e.path
            ),
            None => println!("{:<13}-", "oldest:"),
        }
        println!("{:<13}{due} older than {}", "due:", human_age(self.retain));
        if st.pending + st.restoring + st.orphans > 0 {
            println!(
                "{:<13}{} pending, {} restoring, {} orphaned data files (see 'baseguard list --all')",
                "incomplete:", st.pending, st.restoring, st.orphans
            );
        }
        ok
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
