//! The quarantine store: where protected files go instead of being deleted.
//!
//! The store lives on the backing filesystem (default `BACKING/.baseguard/`),
//! so that every stash is an atomic rename of the original inode. Layout:
//!
//! ```text
//! <q>/                      mode 0700, root-owned
//! <q>/entries/<id>.json     the record (written first, fsync'd, then linked in)
//! <q>/entries/<id>.data     the file itself (the original inode, renamed)
//! <q>/entries/<id>.claim.<host>.<boot>.<pid>.<start>
//!                           transient: the data while a restore is placing
//!                           it; the name says which process claimed it
//!                           (`<id>.claim` alone: from an older version)
//! <q>/entries/.tmp-<id>.json, .<id>.copy   transient temporaries
//! ```
//!
//! Crash safety (kill -9 at any instant): a record is always complete before
//! its data arrives, and data always leaves before its record is removed. So
//! every file is either at its original path or in `entries/` with a record
//! naming its original path. A record without data ("pending") is what a
//! crash between the two steps leaves (or an in-flight stash, for a moment);
//! it is harmless, hidden by [`Quarantine::list`], and removed by
//! [`Quarantine::purge_expired`] only once it is an hour old.
//!
//! A claim whose owner died on this host (its pid gone, or now another
//! process, or the host rebooted since) is put back as `<id>.data` by the
//! next look at that entry (`list`, `show`, `restore`, heal): a killed
//! restore never hides a file. Another host's claim cannot be checked from
//! here: it is listed as restoring and put back by the sweep after
//! [`CLAIM_GRACE`]. (Host tags must differ between the nodes sharing a
//! quarantine, as they already must for ids to say where a file came from.)
//!
//! Concurrency across processes and nodes sharing one quarantine relies only
//! on atomic per-file syscalls: a restore first renames `<id>.data` to
//! its claim (exactly one caller can), a purge unlinks `<id>.data` (exactly
//! one caller can, and not after a claim), and nothing reads-modifies-writes
//! a shared index. Destinations are never overwritten: `RENAME_NOREPLACE`,
//! or `link` + `unlink` on filesystems without it (NFS).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::sys;

/// Name of the quarantine directory under the backing root by default.
pub const DEFAULT_DIR_NAME: &str = ".baseguard";
const ENTRIES: &CStr = c"entries";
/// A record without data younger than this may be an in-flight stash from
/// another node: never removed before.
pub const PENDING_GRACE: Duration = Duration::from_secs(3600);
/// A claim (restore in progress) older than this is from a crashed restore
/// and is put back as `<id>.data` by the sweep.
pub const CLAIM_GRACE: Duration = Duration::from_secs(15 * 60);
const RECORD_VERSION: u32 = 1;
/// Largest record read. A real one is a few hundred bytes; the worst case
/// (a 4 KiB non-UTF-8 path, kept twice, the bytes as a pretty-printed JSON
/// array, and a command line cut at [`MAX_CMDLINE`]) stays under 64 KiB.
pub const MAX_RECORD: u64 = 256 << 10;
/// Command lines are cut to this many bytes in records.
pub const MAX_CMDLINE: usize = 4096;

/// Who caused a quarantine (or a restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `/proc/PID/comm`.
    pub comm: String,
    /// `/proc/PID/cmdline` with NULs turned into spaces.
    pub cmdline: String,
    pub host: String,
}

impl Who {
    /// Describe process `pid` acting as `uid`/`gid` (as FUSE reports them).
    /// A process that has already exited gets `comm` `?` and no command line.
    pub fn from_pid(pid: u32, uid: u32, gid: u32) -> Who {
        let comm = std::fs::read(format!("/proc/{pid}/comm"))
            .map(|b| String::from_utf8_lossy(&b).trim_end().to_string())
            .unwrap_or_else(|_| "?".to_string());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                let s: Vec<u8> = b
                    .iter()
                    .take(MAX_CMDLINE)
                    .map(|&c| if c == 0 { b' ' } else { c })
                    .collect();
                String::from_utf8_lossy(&s).trim_end().to_string()
            })
            .unwrap_or_default();
        Who {
            pid,
            uid,
            gid,
            comm,
            cmdline,
            host: sys::hostname(),
        }
    }

    /// This process (the CLI), with its effective uid/gid.
    pub fn current() -> Who {
        let (uid, gid) = std::fs::metadata("/proc/self")
            .map(|m| (m.uid(), m.gid()))
            .unwrap_or((sys::geteuid(), u32::MAX));
        Who::from_pid(std::process::id(), uid, gid)
    }
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}[{}] uid={}@{}",
            self.comm, self.pid, self.uid, self.host
        )
    }
}

/// Why a file was quarantined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// `unlink` of a protected file.
    Unlink,
    /// A `rename` onto a protected file (the old target is kept).
    RenameOver,
    /// A `link` onto a protected file name (the old target is kept).
    LinkOver,
    /// A truncating open/setattr of a protected file (contents copied first).
    Truncate,
    /// `baseguard restore --force` displaced the file at the destination.
    RestoreForce,
    /// A protected file renamed to an unprotected name (a link is kept).
    RenameOut,
    /// A protected file opened for writing, or about to have a hole
    /// punched or a range zeroed (contents copied first).
    Overwrite,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Why::Unlink => "unlink",
            Why::RenameOver => "rename-over",
            Why::LinkOver => "link-over",
            Why::Truncate => "truncate",
            Why::RestoreForce => "restore-force",
            Why::RenameOut => "rename-out",
            Why::Overwrite => "overwrite",
        })
    }
}

/// What kind of file an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Symlink,
    Other,
}

/// How the data got into the quarantine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The original inode, renamed in ([`Quarantine::stash_rename`]).
    Rename,
    /// A hard link to the original inode ([`Quarantine::stash_link`]).
    Link,
    /// A copy of the contents ([`Quarantine::stash_copy`]).
    Copy,
}

/// Where an entry stands, seen from its files in `entries/`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryState {
    /// Record and data present: listed, restorable, purgeable.
    #[default]
    Held,
    /// Record without data: a stash in flight, or a crash between writing
    /// the record and moving the file (the file is still at its path).
    Pending,
    /// The data is claimed by a restore in progress (or a crashed one).
    Restoring,
}

/// One quarantine record (the JSON file) plus its observed state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(default)]
    pub version: u32,
    pub id: String,
    /// Original path relative to the backing root (lossy if not UTF-8; see
    /// [`Entry::orig_path`] for the exact one).
    pub path: String,
    /// The exact original path bytes, only when it is not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_bytes: Option<Vec<u8>>,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub mtime: i64,
    #[serde(default)]
    pub mtime_nsec: i64,
    /// Inode number of the original file on the backing filesystem.
    pub ino: u64,
    /// Unix time (seconds) when it was quarantined.
    pub quarantined_at: u64,
    /// Nanoseconds part of `quarantined_at` (orders entries of one second).
    #[serde(default)]
    pub quarantined_nsec: u32,
    pub why: Why,
    pub method: Method,
    pub who: Who,
    /// Not stored: filled in from the files present when read.
    #[serde(skip)]
    pub state: EntryState,
    /// Not stored: for an entry being restored, who claimed it (from the
    /// claim's file name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
}

/// A restore's claim on an entry: `<id>.claim.<host>.<boot>.<pid>.<start>`,
/// so the owner is known from the one atomic rename that makes the claim.
/// (`<id>.claim` alone is a claim of an older version: owner unknown.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The claim's file name in `entries/`.
    pub name: String,
    /// Who holds it, when the name tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ClaimOwner>,
    /// Whether the owner still runs, as far as this host can tell.
    pub owner_state: OwnerState,
}

/// The process that claimed an entry for a restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimOwner {
    /// The host tag (as in ids: the short host name, `[A-Za-z0-9-]`).
    pub host: String,
    /// The host's boot id (`/proc/sys/kernel/random/boot_id`, hex digits).
    pub boot: String,
    pub pid: u32,
    /// The process's start time (`/proc/PID/stat` field 22): with the pid,
    /// it names one process even after the pid is reused.
    pub start: u64,
}

/// Whether a claim's owner still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerState {
    /// The owner runs on this host: the restore is in progress.
    Alive,
    /// The owner was on this host and is gone (or the host rebooted since):
    /// the claim is put back at once.
    Dead,
    /// On another host, or an owner that was not recorded: put back by the
    /// sweep after [`CLAIM_GRACE`].
    Unknown,
}

fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().chars().filter(|c| c.is_ascii_hexdigit()).collect())
            .unwrap_or_default()
    })
}

/// Start time of process `pid` (`/proc/PID/stat` field 22), if it runs.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl ClaimOwner {
    /// This process on this host.
    pub fn current() -> ClaimOwner {
        let pid = std::process::id();
        ClaimOwner {
            host: host_tag(&sys::hostname()),
            boot: boot_id().to_string(),
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    }

    /// Process `pid` on this host, if it runs (tests use it to stand for a
    /// restore that gets killed).
    pub fn of_pid(pid: u32) -> Option<ClaimOwner> {
        Some(ClaimOwner {
            pid,
            start: process_start(pid)?,
            ..ClaimOwner::current()
        })
    }

    /// As written at the end of a claim name.
    fn suffix(&self) -> String {
        format!("{}.{}.{}.{}", self.host, self.boot, self.pid, self.start)
    }

    fn parse(s: &str) -> Option<ClaimOwner> {
        let mut it = s.rsplitn(4, '.');
        let start = it.next()?.parse().ok()?;
        let pid = it.next()?.parse().ok()?;
        let boot = it.next()?;
        let host = it.next()?;
        let ok = |t: &str, f: fn(char) -> bool| !t.is_empty() && t.chars().all(f);
        if !ok(host, |c| c.is_ascii_alphanumeric() || c == '-')
            || !ok(boot, |c| c.is_ascii_hexdigit())
        {
            return None;
        }
        Some(ClaimOwner {
            host: host.into(),
            boot: boot.into(),
            pid,
            start,
        })
    }

    /// Does the owner still run? Decided only on its own host: there a pid
    /// that is gone, or now names a process started at another time, or a
    /// boot id that is not this boot's, means the owner is dead.
    pub fn state(&self) -> OwnerState {
        if self.host != host_tag(&sys::hostname()) {
            return OwnerState::Unknown;
        }
        if self.boot != boot_id() {
            return OwnerState::Dead;
        }
        match process_start(self.pid) {
            Some(t) if t == self.start => OwnerState::Alive,
            _ => OwnerState::Dead,
        }
    }
}

impl fmt::Display for ClaimOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}@{}", self.pid, self.host)
    }
}

impl Claim {
    /// The claim named `name` for entry `id`, if it is one.
    fn parse(id: &str, name: &str) -> Option<Claim> {
        let rest = name.strip_prefix(id)?.strip_prefix(".claim")?;
        let owner = if rest.is_empty() {
            None
        } else {
            Some(ClaimOwner::parse(rest.strip_prefix('.')?)?)
        };
        let owner_state = owner
            .as_ref()
            .map_or(OwnerState::Unknown, ClaimOwner::state);
        Some(Claim {
            name: name.into(),
            owner,
            owner_state,
        })
    }
}

impl Entry {
    /// The exact original path, relative to the backing root.
    pub fn orig_path(&self) -> PathBuf {
        match &self.path_bytes {
            Some(b) => PathBuf::from(OsStr::from_bytes(b)),
            None => PathBuf::from(&self.path),
        }
    }

    /// Orders entries by quarantine time (ids break ties).
    pub fn sort_key(&self) -> (u64, u32, &str) {
        (self.quarantined_at, self.quarantined_nsec, &self.id)
    }

    /// Time since it was quarantined (zero if the record is from the future,
    /// i.e. another node's clock runs ahead).
    pub fn age(&self, now: SystemTime) -> Duration {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        Duration::from_secs(now.saturating_sub(self.quarantined_at))
    }
}

/// Errors of the store, each with a one-sentence `Display`.
#[derive(Debug)]
pub enum QError {
    /// Not a syntactically valid id.
    BadId(String),
    /// A valid id with no record.
    UnknownId(String),
    /// Neither an id nor the original path of any held entry.
    NoMatch(String),
    /// The entry exists but its data is gone or being restored right now
    /// (another process won a race), or it never arrived (pending).
    Gone {
        id: String,
        state: EntryState,
    },
    /// The restore destination exists and `force` was not given.
    DestExists(PathBuf),
    /// The restore destination is a directory (never replaced, even with force).
    DestIsDir(PathBuf),
    /// A path that would leave the instances (backing) directory or enter
    /// the quarantine itself.
    Escapes {
        path: PathBuf,
        reason: String,
    },
    /// A parent directory of the destination does not exist.
    ParentMissing {
        path: PathBuf,
        missing: PathBuf,
    },
    /// `--quarantine` is not on the backing filesystem.
    OtherFilesystem {
        quarantine: PathBuf,
        backing: String,
    },
    Io {
        what: String,
        err: io::Error,
    },
}

impl fmt::Display for QError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QError::BadId(s) => write!(
                f,
                "'{s}' is not a quarantine id (ids use only letters, digits, '.', '_' and '-'; see 'baseguard list')"
            ),
            QError::UnknownId(s) => write!(
                f,
                "no quarantine entry has id '{s}' (it may have been restored or purged already; see 'baseguard list')"
            ),
            QError::NoMatch(s) => write!(
                f,
                "nothing in the quarantine matches '{s}': it is neither an entry id nor the original path of a quarantined file (see 'baseguard list')"
            ),
            QError::Gone { id, state } => match state {
                EntryState::Pending => write!(
                    f,
                    "entry '{id}' holds no file: either its stash did not complete (the file was never moved) or a restore put the file back and did not get to remove the record; check its original path"
                ),
                _ => write!(
                    f,
                    "entry '{id}' is gone: another process restored or purged it first (or is restoring it right now)"
                ),
            },
            QError::DestExists(p) => write!(
                f,
                "'{}' already exists; use --force to move it into the quarantine and restore over it, or --to DEST to restore elsewhere",
                p.display()
            ),
            QError::DestIsDir(p) => write!(
                f,
                "'{}' is a directory; baseguard never replaces a directory, use --to DEST to restore elsewhere",
                p.display()
            ),
            QError::Escapes { path, reason } => {
                write!(f, "path '{}' is refused: {reason}", path.display())
            }
            QError::ParentMissing { path, missing } => write!(
                f,
                "cannot restore to '{}': directory '{}' does not exist (create it with the owner Nova expects, or use --to DEST)",
                path.display(),
                missing.display()
            ),
            QError::OtherFilesystem {
                quarantine,
                backing,
            } => write!(
                f,
                "quarantine directory '{}' is on a different filesystem than the backing directory {backing}; it must be on the same one so files can be moved atomically",
                quarantine.display()
            ),
            QError::Io { what, err } => write!(f, "{what}: {err}"),
        }
    }
}

impl std::error::Error for QError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QError::Io { err, .. } => Some(err),
            _ => None,
        }
    }
}

impl QError {
    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            QError::BadId(_) => libc::EINVAL,
            QError::UnknownId(_) | QError::NoMatch(_) | QError::Gone { .. } => libc::ENOENT,
            QError::DestExists(_) => libc::EEXIST,
            QError::DestIsDir(_) => libc::EISDIR,
            QError::Escapes { .. } => libc::EACCES,
            QError::ParentMissing { .. } => libc::ENOENT,
            QError::OtherFilesystem { .. } => libc::EXDEV,
            QError::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    fn io(what: impl Into<String>, err: io::Error) -> QError {
        QError::Io {
            what: what.into(),
            err,
        }
    }
}

impl From<QError> for io::Error {
    fn from(e: QError) -> io::Error {
        let kind = io::Error::from_raw_os_error(e.errno()).kind();
        io::Error::new(kind, e)
    }
}

/// A completed restore.
#[derive(Clone, Debug)]
pub struct Restored {
    /// The record of what was restored (its state is no longer meaningful).
    pub entry: Entry,
    /// Where it went, relative to the backing root.
    pub dest: PathBuf,
    /// With `force`: the file that was at `dest`, now quarantined.
    pub displaced: Option<Entry>,
}

/// What [`Quarantine::purge_expired`] did with one entry or leftover.
#[derive(Debug)]
pub enum PurgeOutcome {
    /// Deleted for good.
    Purged(Entry),
    /// Old enough, but the `keep` callback vetoed it with this reason.
    Kept { entry: Entry, reason: String },
    /// Purging failed (it stays).
    Failed { id: String, error: QError },
    /// A stale claim of a crashed restore was put back as held data.
    Recovered { id: String },
    /// A stale leftover without file contents of its own was removed: a
    /// record whose data never arrived, or a temporary.
    Cleaned { name: String },
}

/// The `status` summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// Held entries.
    pub entries: usize,
    /// Sum of the held entries' sizes.
    pub bytes: u64,
    /// The oldest held entry.
    pub oldest: Option<Entry>,
    /// Records without data (in-flight or crashed stashes).
    pub pending: usize,
    /// Entries claimed by a restore in progress (or a crashed one).
    pub restoring: usize,
    /// `<id>.data` files without a record (never deleted by baseguard).
    pub orphans: usize,
}

/// A held [`Quarantine::lock_name`] lock; dropping it releases the lock.
#[derive(Debug)]
pub struct NameLock {
    _fd: OwnedFd,
}

/// The quarantine store. Holds its own descriptors; `Send + Sync`.
#[derive(Debug)]
pub struct Quarantine {
    root: OwnedFd,
    dir: OwnedFd,
    entries: OwnedFd,
    dir_id: (u64, u64),
    entries_id: (u64, u64),
    host_tag: String,
    counter: AtomicU64,
    link_fallback: AtomicBool,
    pending_grace: AtomicU64,
    claim_grace: AtomicU64,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn dev_ino(st: &sys::Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn cname(s: &str) -> CString {
    // Names built here never contain NUL.
    CString::new(s).unwrap_or_default()
}

fn fsync_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    File::from(fd.try_clone_to_owned()?).sync_all()
}

/// Is `s` a syntactically valid id (so it can be used as a file name)?
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Check and normalise a path relative to the backing root: no `..`, not
/// absolute, not empty; `.` components dropped.
pub fn clean_rel(p: &Path) -> Result<PathBuf, QError> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(QError::Escapes {
                    path: p.to_path_buf(),
                    reason: "'..' would leave the instances directory".into(),
                });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(QError::Escapes {
                    path: p.to_path_buf(),
                    reason: "it is absolute; give a path relative to the instances directory"
                        .into(),
                });
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(QError::Escapes {
            path: p.to_path_buf(),
            reason: "it names the instances directory itself, not a file in it".into(),
        });
    }
    Ok(out)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn utc_parts(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}

/// `2026-11-23 21:33:01 UTC`.
pub fn fmt_utc(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// The host part of ids: the short host name, restricted to `[A-Za-z0-9-]`.
fn host_tag(host: &str) -> String {
    let short = host.split('.').next().unwrap_or("");
    let t: String = short
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect();
    let t = t.trim_matches('-').to_string();
    if t.is_empty() { "host".into() } else { t }
}

/// The backing directory's path, for messages.
fn backing_name(root: BorrowedFd<'_>) -> String {
    std::fs::read_link(Path::new(OsStr::from_bytes(
        sys::proc_fd_path(root).as_bytes(),
    )))
    .map(|p| format!("'{}'", p.display()))
    .unwrap_or_else(|_| "(the backing directory)".into())
}

impl Quarantine {
    /// Open the quarantine for the daemon, creating it (mode 0700, owned by
    /// root when running as root) if missing. `backing` is the backing root
    /// (any directory descriptor, `O_PATH` is fine; it is duplicated).
    /// `dir`: `None` for `BACKING/.baseguard`, or a path that must be on the
    /// same filesystem as `backing`.
    pub fn open(backing: BorrowedFd<'_>, dir: Option<&Path>) -> io::Result<Quarantine> {
        Quarantine::open_impl(backing, dir, true)
    }

    /// Open an existing quarantine without creating or changing anything
    /// (for the CLI). A missing one is `ErrorKind::NotFound`.
    pub fn open_existing(backing: BorrowedFd<'_>, dir: Option<&Path>) -> io::Result<Quarantine> {
        Quarantine::open_impl(backing, dir, false)
    }

    fn open_impl(
        backing: BorrowedFd<'_>,
        dir: Option<&Path>,
        create: bool,
    ) -> io::Result<Quarantine> {
        let root = backing.try_clone_to_owned()?;
        let root_st = sys::fstat(root.as_fd())?;
        let dflags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let shown = match dir {
            Some(p) => p.display().to_string(),
            None => std::fs::read_link(Path::new(OsStr::from_bytes(
                sys::proc_fd_path(root.as_fd()).as_bytes(),
            )))
            .map(|b| b.join(DEFAULT_DIR_NAME).display().to_string())
            .unwrap_or_else(|_| format!("(the backing directory)/{DEFAULT_DIR_NAME}")),
        };
        let missing = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no quarantine at {shown}: nothing has been quarantined there yet, or --dir/--quarantine point elsewhere"
                    ),
                )
            } else {
                io::Error::new(e.kind(), format!("cannot open quarantine {shown}: {e}"))
            }
        };
        let qdir = match dir {
            None => {
                let name = cname(DEFAULT_DIR_NAME);
                if create {
                    match sys::mkdirat(root.as_fd(), &name, 0o700) {
                        Err(e) if errno(&e) != libc::EEXIST => return Err(missing(e)),
                        _ => {}
                    }
                }
                sys::openat(root.as_fd(), &name, dflags, 0).map_err(missing)?
            }
            Some(p) => {
                // Never create a directory on the wrong filesystem: check
                // where it would go first.
                let parent_dev = p
                    .parent()
                    .and_then(|d| {
                        std::fs::metadata(if d.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            d
                        })
                        .ok()
                    })
                    .map(|m| std::os::unix::fs::MetadataExt::dev(&m));
                if create && !p.exists() && parent_dev.is_some_and(|d| d != root_st.st_dev) {
                    let e = QError::OtherFilesystem {
                        quarantine: PathBuf::from(&shown),
                        backing: backing_name(root.as_fd()),
                    };
                    return Err(io::Error::new(io::ErrorKind::CrossesDevices, e));
                }
                if create {
                    use std::os::unix::fs::DirBuilderExt;
                    match std::fs::DirBuilder::new().mode(0o700).create(p) {
                        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                            return Err(io::Error::new(
                                e.kind(),
                                format!("cannot create quarantine directory {shown}: {e}"),
                            ));
                        }
                        _ => {}
                    }
                }
                sys::open_path(p, libc::O_RDONLY | libc::O_DIRECTORY).map_err(missing)?
            }
        };
        let qst = sys::fstat(qdir.as_fd())?;
        if qst.st_dev != root_st.st_dev {
            let e = QError::OtherFilesystem {
                quarantine: PathBuf::from(&shown),
                backing: format!(
                    "{} (device {:#x} vs {:#x})",
                    backing_name(root.as_fd()),
                    root_st.st_dev,
                    qst.st_dev
                ),
            };
            return Err(io::Error::new(io::ErrorKind::CrossesDevices, e));
        }
        if dev_ino(&qst) == dev_ino(&root_st) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "quarantine directory {shown} is the backing directory itself; choose a subdirectory"
                ),
            ));
        }
        if create {
            tighten(qdir.as_fd(), &shown);
            match sys::mkdirat(qdir.as_fd(), ENTRIES, 0o700) {
                Err(e) if errno(&e) != libc::EEXIST => return Err(missing(e)),
                _ => {}
            }
        }
        let entries = sys::openat(qdir.as_fd(), ENTRIES, dflags, 0).map_err(missing)?;
        if create {
            tighten(entries.as_fd(), &format!("{shown}/entries"));
        }
        let est = sys::fstat(entries.as_fd())?;
        Ok(Quarantine {
            root,
            dir: qdir,
            entries,
            dir_id: dev_ino(&qst),
            entries_id: dev_ino(&est),
            host_tag: host_tag(&sys::hostname()),
            counter: AtomicU64::new(0),
            link_fallback: AtomicBool::new(false),
            pending_grace: AtomicU64::new(PENDING_GRACE.as_secs()),
            claim_grace: AtomicU64::new(CLAIM_GRACE.as_secs()),
        })
    }

    /// `(st_dev, st_ino)` of the quarantine directory, so the FUSE layer can
    /// hide it.
    pub fn dir_ino(&self) -> (u64, u64) {
        self.dir_id
    }

    /// The quarantine directory descriptor (`O_RDONLY|O_DIRECTORY`).
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// A stamp of the entries directory that changes whenever an entry is
    /// added or removed (by any node): for callers that cache [`Self::list`].
    pub fn stamp(&self) -> io::Result<(i64, i64, i64, i64, u64)> {
        let st = sys::fstat(self.entries.as_fd())?;
        Ok((
            st.st_mtime,
            st.st_mtime_nsec,
            st.st_ctime,
            st.st_ctime_nsec,
            st.st_size as u64 ^ ((st.st_nlink as u64) << 48),
        ))
    }

    /// Serialize replacing the protected name `rel` across every node that
    /// shares this quarantine (a blocking OFD lock on one byte of
    /// `<q>/rename.lock`, chosen by the name), for filesystems without
    /// `RENAME_EXCHANGE`. Held until the returned guard is dropped.
    pub fn lock_name(&self, rel: &Path) -> io::Result<NameLock> {
        let fd = sys::openat(
            self.dir.as_fd(),
            c"rename.lock",
            libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW,
            0o600,
        )?;
        // FNV-1a: stable across nodes and versions.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in rel.as_os_str().as_bytes() {
            h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let at = h % (1 << 30);
        let lock = sys::LockRange {
            typ: libc::F_WRLCK,
            start: at,
            end: at,
            pid: 0,
        };
        loop {
            match sys::ofd_setlk(fd.as_fd(), &lock, true) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            }
            return Ok(NameLock { _fd: fd });
        }
    }

    /// Use `link` + `unlink` instead of `renameat2(RENAME_NOREPLACE)` from now
    /// on (automatic on filesystems that reject the flag, such as NFS; tests
    /// call it to cover that path).
    #[doc(hidden)]
    pub fn force_link_fallback(&self) {
        self.link_fallback.store(true, Ordering::Relaxed);
    }

    /// Override [`PENDING_GRACE`] and [`CLAIM_GRACE`] (tests simulate old
    /// crash leftovers with zero).
    #[doc(hidden)]
    pub fn set_graces(&self, pending: Duration, claim: Duration) {
        self.pending_grace
            .store(pending.as_secs(), Ordering::Relaxed);
        self.claim_grace.store(claim.as_secs(), Ordering::Relaxed);
    }

    fn grace(&self, g: &AtomicU64) -> Duration {
        Duration::from_secs(g.load(Ordering::Relaxed))
    }

    fn new_id(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (y, mo, d, h, mi, s) = utc_parts(now.as_secs());
        let mut hasher = std::hash::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(now.as_nanos());
        let r = hasher.finish() & 0xff_ffff;
        format!(
            "{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}-{}-{r:06x}",
            self.host_tag
        )
    }

    fn record_name(id: &str) -> CString {
        cname(&format!("{id}.json"))
    }
    fn data_name(id: &str) -> CString {
        cname(&format!("{id}.data"))
    }
    fn claim_name(id: &str) -> CString {
        cname(&format!("{id}.claim"))
    }
    /// The claim a restore by `owner` makes on entry `id`.
    pub fn claim_name_for(id: &str, owner: &ClaimOwner) -> String {
        format!("{id}.claim.{}", owner.suffix())
    }

    fn fsync_entries(&self) {
        if let Err(e) = fsync_fd(self.entries.as_fd()) {
            tracing::warn!(error = %e, "fsync of the quarantine entries directory failed");
        }
    }

    /// Move `olddir/old` to `newdir/new` unless `new` exists (`EEXIST`).
    fn place_noreplace(
        &self,
        olddir: BorrowedFd<'_>,
        old: &CStr,
        newdir: BorrowedFd<'_>,
        new: &CStr,
    ) -> io::Result<()> {
        if !self.link_fallback.load(Ordering::Relaxed) {
            match sys::renameat2(olddir, old, newdir, new, libc::RENAME_NOREPLACE) {
                Err(e) if matches!(errno(&e), libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    self.link_fallback.store(true, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        sys::linkat(olddir, old, newdir, new)?;
        if let Err(e) = sys::unlinkat(olddir, old, 0) {
            // Both names now refer to one inode; nothing is lost.
            tracing::warn!(error = %e, "could not remove the old name after link");
        }
        Ok(())
    }

    fn make_entry(
        &self,
        st: &sys::Stat,
        orig_rel: &Path,
        who: &Who,
        why: Why,
        method: Method,
    ) -> Entry {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        };
        Entry {
            version: RECORD_VERSION,
            id: String::new(),
            path: orig_rel.to_string_lossy().into_owned(),
            path_bytes: match orig_rel.to_str() {
                Some(_) => None,
                None => Some(orig_rel.as_os_str().as_bytes().to_vec()),
            },
            kind,
            size: st.st_size as u64,
            mode: st.st_mode,
            owner_uid: st.st_uid,
            owner_gid: st.st_gid,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
            ino: st.st_ino,
            quarantined_at: now.as_secs(),
            quarantined_nsec: now.subsec_nanos(),
            why,
            method,
            who: who.clone(),
            state: EntryState::Pending,
            claim: None,
        }
    }

    /// Give `e` a fresh unique id and write its record durably:
    /// temp file, fsync, link to `<id>.json` (fails if the id is taken, on
    /// NFS too), fsync the directory.
    fn write_record(&self, e: &mut Entry) -> io::Result<()> {
        for _ in 0..16 {
            e.id = self.new_id();
            let tmp = cname(&format!(".tmp-{}.json", e.id));
            let json = serde_json::to_vec_pretty(&e).map_err(io::Error::other)?;
            let fd = match sys::openat(
                self.entries.as_fd(),
                &tmp,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                0o600,
            ) {
                Err(err) if errno(&err) == libc::EEXIST => continue,
                r => r?,
            };
            let mut f = File::from(fd);
            let written = f.write_all(&json).and_then(|_| f.sync_all());
            drop(f);
            let placed = written.and_then(|_| {
                sys::linkat(
                    self.entries.as_fd(),
                    &tmp,
                    self.entries.as_fd(),
                    &Self::record_name(&e.id),
                )
            });
            let _ = sys::unlinkat(self.entries.as_fd(), &tmp, 0);
            match placed {
                Err(err) if errno(&err) == libc::EEXIST => continue,
                Err(err) => return Err(err),
                Ok(()) => {
                    self.fsync_entries();
                    return Ok(());
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "could not find a free quarantine id",
        ))
    }

    fn drop_record(&self, id: &str) {
        match sys::unlinkat(self.entries.as_fd(), &Self::record_name(id), 0) {
            Ok(()) => self.fsync_entries(),
            Err(e) => tracing::warn!(id, error = %e, "could not remove quarantine record"),
        }
    }

    fn check_orig(orig_rel: &Path) -> io::Result<PathBuf> {
        clean_rel(orig_rel).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn log_stash(&self, e: &Entry) {
        tracing::info!(
            id = %e.id,
            path = %e.path,
            size = e.size,
            why = %e.why,
            method = ?e.method,
            pid = e.who.pid,
            comm = %e.who.comm,
            uid = e.who.uid,
            host = %e.who.host,
            "quarantined"
        );
    }

    /// The unlink interception: move `parent/name` (original path `orig_rel`
    /// relative to the backing root) into the quarantine. The record is
    /// written first, then the file renamed in; if the rename fails the
    /// record is removed and the rename's error returned unchanged (ENOENT,
    /// EACCES, ...: what unlink would have seen). Directories: `EISDIR`.
    pub fn stash_rename(
        &self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        orig_rel: &Path,
        who: &Who,
        why: Why,
    ) -> io::Result<Entry> {
        self.stash_by_name(parent, name, orig_rel, who, why, Method::Rename)
    }

    /// Keep a hard link of `parent/name` in the quarantine (before a rename
    /// or link replaces that name, so its old inode survives). The original
    /// name is untouched. Directories: `EISDIR`.
    pub fn stash_link(
        &self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        orig_rel: &Path,
        who: &Who,
        why: Why,
    ) -> io::Result<Entry> {
        self.stash_by_name(parent, name, orig_rel, who, why, Method::Link)
    }

    /// Record first, then move (`Rename`) or link (`Link`) `parent/name`
    /// into the quarantine; if that fails, drop the record and return the
    /// syscall's own error.
    fn stash_by_name(
        &self,
        parent: BorrowedFd<'_>,
        name: &CStr,
        orig_rel: &Path,
        who: &Who,
        why: Why,
        method: Method,
    ) -> io::Result<Entry> {
        let orig = Self::check_orig(orig_rel)?;
        let st = sys::statat(parent, name)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        let mut e = self.make_entry(&st, &orig, who, why, method);
        self.write_record(&mut e)?;
        let data = Self::data_name(&e.id);
        let moved = match method {
            Method::Link => sys::linkat(parent, name, self.entries.as_fd(), &data),
            _ => sys::renameat2(parent, name, self.entries.as_fd(), &data, 0),
        };
        if let Err(err) = moved {
            self.drop_record(&e.id);
            return Err(err);
        }
        self.fsync_entries();
        e.state = EntryState::Held;
        self.log_stash(&e);
        Ok(e)
    }

    /// Preserve the contents of the regular file behind `src` (any
    /// descriptor of it, `O_PATH` included: it is reopened read-only through
    /// `/proc/self/fd`, so the caller's offset never moves) before anything
    /// destructive to its bytes (a truncate, and equally an overwrite, a
    /// hole punch or a zero-range: `why` says which): a reflink where the
    /// filesystem can, else a sparse-aware `copy_file_range` copy. Mode,
    /// owner, times and every extended attribute are preserved (an xattr
    /// that cannot be copied is logged as an error; the copy still counts).
    /// The record is written first, the copy arrives complete under its
    /// final name, so a crash leaves either no entry or a whole one. Not a
    /// regular file: `EINVAL`.
    pub fn stash_copy(
        &self,
        src: BorrowedFd<'_>,
        orig_rel: &Path,
        who: &Who,
        why: Why,
    ) -> io::Result<Entry> {
        let orig = Self::check_orig(orig_rel)?;
        let st = sys::fstat(src)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut e = self.make_entry(&st, &orig, who, why, Method::Copy);
        self.write_record(&mut e)?;
        let tmp = cname(&format!(".{}.copy", e.id));
        let copied = self.copy_into(src, &st, &tmp).and_then(|_| {
            sys::renameat2(
                self.entries.as_fd(),
                &tmp,
                self.entries.as_fd(),
                &Self::data_name(&e.id),
                0,
            )
        });
        if let Err(err) = copied {
            let _ = sys::unlinkat(self.entries.as_fd(), &tmp, 0);
            self.drop_record(&e.id);
            return Err(err);
        }
        self.fsync_entries();
        e.state = EntryState::Held;
        self.log_stash(&e);
        Ok(e)
    }

    fn copy_into(&self, src: BorrowedFd<'_>, st: &sys::Stat, tmp: &CStr) -> io::Result<()> {
        // Our own open file description, so seeking never moves the caller's
        // offset; fall back to positional I/O on a duplicate.
        let (rd, own) = match sys::reopen(src, libc::O_RDONLY) {
            Ok(fd) => (File::from(fd), true),
            Err(_) => (File::from(src.try_clone_to_owned()?), false),
        };
        let out = File::from(sys::openat(
            self.entries.as_fd(),
            tmp,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
            0o600,
        )?);
        if sys::ficlone(out.as_fd(), rd.as_fd()).is_err() {
            sparse_copy(&rd, &out, own)?;
            let size = sys::fstat(rd.as_fd())?.st_size as u64;
            out.set_len(size)?;
        }
        if let Err(e) = std::os::unix::fs::fchown(&out, Some(st.st_uid), Some(st.st_gid)) {
            tracing::warn!(error = %e, "could not preserve the owner of a quarantined copy");
        }
        out.set_permissions(std::fs::Permissions::from_mode(st.st_mode & 0o7777))?;
        // After chown (which drops security.capability) and chmod: every
        // extended attribute (libvirt's trusted.libvirt.security.*, SELinux
        // and other security.* labels, user.*, ACLs), as a rename keeps them.
        // A failure is logged and does not fail the stash: the bytes matter
        // most, and refusing would make the truncation itself fail.
        let failed = copy_xattrs(rd.as_fd(), out.as_fd());
        if !failed.is_empty() {
            let names: Vec<String> = failed.iter().map(|(n, e)| format!("{n}: {e}")).collect();
            tracing::error!(
                failed = %names.join(", "),
                "could not copy some extended attributes to a quarantined copy"
            );
        }
        let t = |s: i64, ns: i64| {
            if s >= 0 {
                UNIX_EPOCH + Duration::new(s as u64, ns.clamp(0, 999_999_999) as u32)
            } else {
                UNIX_EPOCH
            }
        };
        out.set_times(
            std::fs::FileTimes::new()
                .set_accessed(t(st.st_atime, st.st_atime_nsec))
                .set_modified(t(st.st_mtime, st.st_mtime_nsec)),
        )?;
        out.sync_all()
    }

    /// Read and parse `<id>.json`. Never blocks and never reads much: the
    /// record is opened non-blocking without following a symlink, and
    /// anything but a regular file of at most [`MAX_RECORD`] bytes is
    /// `InvalidData` (a FIFO or a huge file named like a record, put there
    /// by mistake or malice, is skipped, not waited on or read whole).
    fn read_record(&self, id: &str) -> io::Result<Entry> {
        let fd = sys::openat(
            self.entries.as_fd(),
            &Self::record_name(id),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
        )
        .map_err(|e| {
            if errno(&e) == libc::ELOOP {
                io::Error::new(io::ErrorKind::InvalidData, "the record is a symbolic link")
            } else {
                e
            }
        })?;
        let st = sys::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the record is not a regular file",
            ));
        }
        if st.st_size as u64 > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the record is {} bytes, more than a record can be ({MAX_RECORD})",
                    st.st_size
                ),
            ));
        }
        let mut s = String::new();
        File::from(fd).take(MAX_RECORD + 1).read_to_string(&mut s)?;
        if s.len() as u64 > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the record grew past the size a record can be",
            ));
        }
        let mut e: Entry = serde_json::from_str(&s)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
        if e.id != id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("record {id}.json carries id {}", e.id),
            ));
        }
        e.state = EntryState::Pending;
        e.claim = None;
        Ok(e)
    }

    fn exists(&self, name: &CStr) -> bool {
        sys::statat(self.entries.as_fd(), name).is_ok()
    }

    fn state_of(&self, id: &str) -> EntryState {
        self.observe(id, None).0
    }

    /// The state of entry `id` and its claim, if a restore holds it; a claim
    /// whose owner died on this host is put back at once (the entry is then
    /// held). `names`: a listing of `entries/` to look for claims in (read
    /// if needed and not given).
    fn observe(&self, id: &str, names: Option<&HashSet<Vec<u8>>>) -> (EntryState, Option<Claim>) {
        for _ in 0..4 {
            if self.exists(&Self::data_name(id)) {
                return (EntryState::Held, None);
            }
            let claim = if self.exists(&Self::claim_name(id)) {
                Claim::parse(id, &format!("{id}.claim"))
            } else {
                self.find_claim(id, names)
            };
            let Some(claim) = claim else {
                // Between the claim and the data? Look once more.
                if self.exists(&Self::data_name(id)) {
                    return (EntryState::Held, None);
                }
                return (EntryState::Pending, None);
            };
            if claim.owner_state != OwnerState::Dead {
                return (EntryState::Restoring, Some(claim));
            }
            if self.recover_claim(id, &claim) {
                return (EntryState::Held, None);
            }
            // Someone else recovered it, or it completed: look again.
        }
        (EntryState::Pending, None)
    }

    /// A claim with an owner in its name for `id`, from `names` (a listing
    /// taken moments ago: a claim made since then is missed, and the entry
    /// looks pending for that moment) or else a fresh listing (only when the
    /// entry has neither data nor a plain claim).
    fn find_claim(&self, id: &str, names: Option<&HashSet<Vec<u8>>>) -> Option<Claim> {
        let prefix = format!("{id}.claim.");
        let find = |names: &HashSet<Vec<u8>>| {
            names
                .iter()
                .filter(|n| n.starts_with(prefix.as_bytes()))
                .filter_map(|n| std::str::from_utf8(n).ok())
                .filter_map(|n| Claim::parse(id, n))
                .filter(|c| self.exists(&cname(&c.name)))
                .min_by_key(|c| c.name.clone())
        };
        match names {
            Some(n) => find(n),
            None => self.names().ok().and_then(|n| find(&n)),
        }
    }

    /// Put back the claim of a restore that died: `<claim>` becomes
    /// `<id>.data` again (never over an existing one). Exactly one of
    /// several processes doing this succeeds.
    fn recover_claim(&self, id: &str, claim: &Claim) -> bool {
        let ent = self.entries.as_fd();
        match self.place_noreplace(ent, &cname(&claim.name), ent, &Self::data_name(id)) {
            Ok(()) => {
                self.fsync_entries();
                tracing::warn!(
                    id,
                    claim = %claim.name,
                    owner = %claim.owner.as_ref().map(ToString::to_string).unwrap_or_default(),
                    "put back the entry of a restore that died"
                );
                true
            }
            Err(_) => false,
        }
    }

    fn names(&self) -> io::Result<HashSet<Vec<u8>>> {
        let p = sys::proc_fd_path(self.entries.as_fd());
        let mut out = HashSet::new();
        for de in std::fs::read_dir(Path::new(OsStr::from_bytes(p.as_bytes())))? {
            out.insert(de?.file_name().as_bytes().to_vec());
        }
        Ok(out)
    }

    /// The held entries, reading only the records that are not in `known`
    /// (records never change once written, so a record read before is read
    /// again only if it was removed and its id reused, which ids prevent).
    /// Returns every record now present (for the next call) and the held
    /// ones among them, in no particular order. One `readdir` and a read
    /// per new record: for the daemon's cache of the quarantine, where
    /// reading thousands of records on every change cost tens of ms per
    /// lookup.
    pub fn held_incremental(&self, known: &Records) -> io::Result<(Records, Vec<Arc<Entry>>)> {
        // Borrowed slices of one listing: no allocation per known name.
        let p = sys::proc_fd_path(self.entries.as_fd());
        let mut names = Vec::with_capacity(known.len() * 2 + 16);
        for de in std::fs::read_dir(Path::new(OsStr::from_bytes(p.as_bytes())))? {
            names.push(de?.file_name());
        }
        let data: HashSet<&[u8]> = names
            .iter()
            .filter_map(|n| n.as_bytes().strip_suffix(b".data"))
            .collect();
        // Claims only (few): so that an entry without data costs no readdir.
        let claims: HashSet<Vec<u8>> = names
            .iter()
            .map(|n| n.as_bytes())
            .filter(|n| n.windows(7).any(|w| w == b".claim."))
            .map(<[u8]>::to_vec)
            .collect();
        let mut records = Records::with_capacity(known.len() + 16);
        let mut held = Vec::new();
        for n in &names {
            let Some(id) = n.as_bytes().strip_suffix(b".json") else {
                continue;
            };
            let Ok(id) = std::str::from_utf8(id) else {
                continue;
            };
            let (key, rec) = match known.get_key_value(id) {
                Some((k, r)) => (k.clone(), r.clone()),
                None if !valid_id(id) => continue,
                None => match self.read_record(id) {
                    Ok(e) => (Arc::from(id), Arc::new(e)),
                    Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                    Err(err) => {
                        tracing::warn!(id, error = %err, "skipping unreadable quarantine record");
                        continue;
                    }
                },
            };
            // Not held in this listing: look again (readdir is no snapshot)
            // and recover the claim of a restore that died.
            if data.contains(id.as_bytes()) || self.observe(id, Some(&claims)).0 == EntryState::Held
            {
                held.push(rec.clone());
            }
            records.insert(key, rec);
        }
        Ok((records, held))
    }

    /// Every record with its state (held, pending, restoring), oldest first.
    /// Unreadable records are skipped with a warning.
    pub fn list_all(&self) -> io::Result<Vec<Entry>> {
        let names = self.names()?;
        let mut out = Vec::new();
        for n in &names {
            let Some(id) = n.strip_suffix(b".json") else {
                continue;
            };
            let Ok(id) = std::str::from_utf8(id) else {
                continue;
            };
            if !valid_id(id) {
                continue;
            }
            let mut e = match self.read_record(id) {
                Ok(e) => e,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => {
                    tracing::warn!(id, error = %err, "skipping unreadable quarantine record");
                    continue;
                }
            };
            (e.state, e.claim) = if names.contains(format!("{id}.data").as_bytes()) {
                (EntryState::Held, None)
            } else {
                // readdir is no snapshot: look again.
                self.observe(id, Some(&names))
            };
            out.push(e);
        }
        out.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        Ok(out)
    }

    /// The held entries (restorable), oldest first.
    pub fn list(&self) -> io::Result<Vec<Entry>> {
        let mut v = self.list_all()?;
        v.retain(|e| e.state == EntryState::Held);
        Ok(v)
    }

    /// One entry by id, in whatever state it is.
    pub fn get(&self, id: &str) -> Result<Entry, QError> {
        if !valid_id(id) {
            return Err(QError::BadId(id.to_string()));
        }
        let mut e = match self.read_record(id) {
            Ok(e) => e,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(QError::UnknownId(id.to_string()));
            }
            Err(err) => return Err(QError::io(format!("cannot read record {id}"), err)),
        };
        (e.state, e.claim) = self.observe(id, None);
        Ok(e)
    }

    /// Every held entry whose original path is exactly `orig_rel`, oldest
    /// first.
    pub fn held_for(&self, orig_rel: &Path) -> io::Result<Vec<Entry>> {
        let want = clean_rel(orig_rel).map_err(io::Error::from)?;
        let mut v = self.list()?;
        v.retain(|e| e.orig_path() == want);
        Ok(v)
    }

    /// When the instance disk at `disk` (relative to the backing root) was
    /// made, as [`pick_version`] needs it: its birth time where the
    /// filesystem keeps one, else its change time (an upper bound). `None`
    /// if it cannot be stat'ed.
    pub fn disk_time(&self, disk: &Path) -> Option<DiskTime> {
        let base = sys::proc_fd_path(self.root.as_fd());
        let p = Path::new(OsStr::from_bytes(base.as_bytes())).join(clean_rel(disk).ok()?);
        let m = std::fs::metadata(p).ok()?;
        let (t, exact) = match m.created() {
            Ok(t) => (t, true),
            Err(_) => (
                UNIX_EPOCH
                    + Duration::new(
                        m.ctime().max(0) as u64,
                        m.ctime_nsec().clamp(0, 999_999_999) as u32,
                    ),
                false,
            ),
        };
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Some(DiskTime {
            secs: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
            exact,
        })
    }

    /// Which of the held entries for `orig_rel` the instance disks `disks`
    /// (relative to the backing root) were created on; see [`pick_version`].
    pub fn version_for(&self, orig_rel: &Path, disks: &[PathBuf]) -> io::Result<VersionChoice> {
        let held = self.held_for(orig_rel)?;
        let times: Vec<DiskTime> = disks.iter().filter_map(|d| self.disk_time(d)).collect();
        Ok(pick_version(&held, &times))
    }

    /// The newest held entry whose original path is exactly `orig_rel`.
    pub fn latest_for(&self, orig_rel: &Path) -> Option<Entry> {
        let want = clean_rel(orig_rel).ok()?;
        self.list()
            .ok()?
            .into_iter()
            .filter(|e| e.orig_path() == want)
            .max_by(|a, b| a.sort_key().cmp(&b.sort_key()))
    }

    /// An id, or an original path relative to the backing root meaning its
    /// newest held entry.
    pub fn resolve(&self, id_or_path: &str) -> Result<Entry, QError> {
        let id_like = valid_id(id_or_path);
        if id_like {
            match self.get(id_or_path) {
                Err(QError::UnknownId(_)) => {}
                r => return r,
            }
        }
        let rel = clean_rel(Path::new(id_or_path))?;
        self.latest_for(&rel).ok_or_else(|| {
            if id_like && !id_or_path.contains('/') {
                QError::UnknownId(id_or_path.to_string())
            } else {
                QError::NoMatch(id_or_path.to_string())
            }
        })
    }

    /// Open the parent directory of `rel` by walking from the backing root
    /// one component at a time (`O_PATH|O_NOFOLLOW|O_DIRECTORY`): no `..`,
    /// no symlinks, never into the quarantine. Missing directories are an
    /// error (never created).
    fn walk_parent(&self, rel: &Path) -> Result<(OwnedFd, CString), QError> {
        let rel = clean_rel(rel)?;
        let comps: Vec<&OsStr> = rel.iter().collect();
        let (last, dirs) = comps.split_last().ok_or_else(|| QError::Escapes {
            path: rel.clone(),
            reason: "empty path".into(),
        })?;
        let mut cur = self
            .root
            .try_clone()
            .map_err(|e| QError::io("cannot duplicate the backing directory descriptor", e))?;
        let mut sofar = PathBuf::new();
        let inside_q = |st: &sys::Stat, p: &Path| {
            let id = dev_ino(st);
            if id == self.dir_id || id == self.entries_id {
                Err(QError::Escapes {
                    path: rel.clone(),
                    reason: format!("'{}' is the quarantine itself", p.display()),
                })
            } else {
                Ok(())
            }
        };
        for c in dirs {
            sofar.push(c);
            let cc = sys::cstr(c).map_err(|e| QError::io("bad path", e))?;
            match sys::openat(
                cur.as_fd(),
                &cc,
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY,
                0,
            ) {
                Ok(fd) => {
                    let st = sys::fstat(fd.as_fd())
                        .map_err(|e| QError::io(format!("cannot stat {}", sofar.display()), e))?;
                    inside_q(&st, &sofar)?;
                    cur = fd;
                }
                Err(e) if errno(&e) == libc::ENOENT => {
                    return Err(QError::ParentMissing {
                        path: rel.clone(),
                        missing: sofar,
                    });
                }
                Err(e) if matches!(errno(&e), libc::ENOTDIR | libc::ELOOP) => {
                    let is_link = sys::statat(cur.as_fd(), &cc)
                        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
                        .unwrap_or(false);
                    return Err(QError::Escapes {
                        path: rel.clone(),
                        reason: if is_link {
                            format!(
                                "'{}' is a symbolic link, which could lead outside the instances directory",
                                sofar.display()
                            )
                        } else {
                            format!("'{}' is not a directory", sofar.display())
                        },
                    });
                }
                Err(e) => return Err(QError::io(format!("cannot open {}", sofar.display()), e)),
            }
        }
        let name = sys::cstr(last).map_err(|e| QError::io("bad path", e))?;
        if let Ok(st) = sys::statat(cur.as_fd(), &name) {
            inside_q(&st, &rel)?;
        }
        Ok((cur, name))
    }

    /// Put an entry back: at its original path, or at `to` (relative to the
    /// backing root). Never overwrites: with `force`, the file at the
    /// destination is first quarantined itself (why `restore-force`).
    /// Destination directories must exist (they are never created).
    /// Exactly one of several concurrent restores/purges of one entry
    /// succeeds; the others get [`QError::Gone`].
    pub fn restore(
        &self,
        id_or_path: &str,
        to: Option<&Path>,
        force: bool,
        who: &Who,
    ) -> Result<Restored, QError> {
        let e = self.resolve(id_or_path)?;
        if e.state != EntryState::Held {
            return Err(QError::Gone {
                id: e.id.clone(),
                state: e.state,
            });
        }
        let dest = clean_rel(&to.map(Path::to_path_buf).unwrap_or_else(|| e.orig_path()))?;
        let (parent, name) = self.walk_parent(&dest)?;
        let check_dest = || -> Result<bool, QError> {
            match sys::statat(parent.as_fd(), &name) {
                Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                    Err(QError::DestIsDir(dest.clone()))
                }
                Ok(_) => Ok(true),
                Err(_) => Ok(false),
            }
        };
        if check_dest()? && !force {
            return Err(QError::DestExists(dest));
        }
        // Claim the data: exactly one caller's rename can succeed.
        // The claim's name says who holds it, so that a restore killed
        // between here and the end is recognised (and undone) at once.
        let (data, claim) = (
            Self::data_name(&e.id),
            cname(&Self::claim_name_for(&e.id, &ClaimOwner::current())),
        );
        let ent = self.entries.as_fd();
        if let Err(err) = sys::renameat2(ent, &data, ent, &claim, 0) {
            return Err(if errno(&err) == libc::ENOENT {
                QError::Gone {
                    id: e.id.clone(),
                    state: EntryState::Restoring,
                }
            } else {
                QError::io(format!("cannot claim entry {}", e.id), err)
            });
        }
        let unclaim = |err: QError| -> QError {
            if let Err(e2) = sys::renameat2(ent, &claim, ent, &data, 0) {
                tracing::error!(id = %e.id, error = %e2, "could not put a claimed entry back; the sweep will recover it");
            }
            err
        };
        let mut displaced = None;
        let mut attempts = 0;
        loop {
            match self.place_noreplace(ent, &claim, parent.as_fd(), &name) {
                Ok(()) => break,
                Err(err) if errno(&err) == libc::EEXIST && force && attempts < 8 => {
                    attempts += 1;
                    if let Err(q) = check_dest() {
                        return Err(unclaim(q));
                    }
                    match self.stash_rename(parent.as_fd(), &name, &dest, who, Why::RestoreForce) {
                        Ok(d) => displaced = Some(d),
                        Err(err) if errno(&err) == libc::ENOENT => {}
                        Err(err) => {
                            return Err(unclaim(QError::io(
                                format!(
                                    "cannot move the existing {} into the quarantine",
                                    dest.display()
                                ),
                                err,
                            )));
                        }
                    }
                }
                Err(err) if errno(&err) == libc::EEXIST => {
                    return Err(unclaim(QError::DestExists(dest)));
                }
                Err(err) => {
                    return Err(unclaim(QError::io(
                        format!("cannot restore to {}", dest.display()),
                        err,
                    )));
                }
            }
        }
        self.fsync_entries();
        self.drop_record(&e.id);
        tracing::info!(
            id = %e.id,
            path = %e.path,
            dest = %dest.display(),
            displaced = displaced.as_ref().map(|d: &Entry| d.id.as_str()).unwrap_or(""),
            pid = who.pid,
            comm = %who.comm,
            uid = who.uid,
            host = %who.host,
            "restored"
        );
        crate::audit::record(self, "restored", &e, who, Some(&dest), None);
        Ok(Restored {
            entry: e,
            dest,
            displaced,
        })
    }

    /// Delete one held entry for good (the only real deletion baseguard
    /// does). Logged with `tracing::info!`.
    pub fn purge(&self, id: &str) -> Result<Entry, QError> {
        self.purge_because(id, None)
    }

    /// [`Quarantine::purge`], with the reason recorded in the audit trail
    /// (`expired`, `below min_free`).
    pub fn purge_because(&self, id: &str, reason: Option<&str>) -> Result<Entry, QError> {
        let e = self.get(id)?;
        if let Err(err) = sys::unlinkat(self.entries.as_fd(), &Self::data_name(id), 0) {
            return Err(if errno(&err) == libc::ENOENT {
                QError::Gone {
                    id: id.to_string(),
                    state: self.state_of(id),
                }
            } else {
                QError::io(format!("cannot purge {id}"), err)
            });
        }
        self.drop_record(id);
        let age = e.age(SystemTime::now()).as_secs();
        tracing::info!(
            id = %e.id,
            path = %e.path,
            size = e.size,
            age_secs = age,
            why = %e.why,
            by_comm = %e.who.comm,
            by_pid = e.who.pid,
            by_host = %e.who.host,
            "purged"
        );
        crate::audit::record(self, "purged", &e, &Who::current(), None, reason);
        Ok(e)
    }

    /// The periodic sweep: purge held entries at least `retain` old unless
    /// `keep` gives a reason to keep them (logged); put back claims of
    /// crashed restores older than [`CLAIM_GRACE`]; remove records without
    /// data and temporaries older than [`PENDING_GRACE`].
    pub fn purge_expired(
        &self,
        retain: Duration,
        keep: &dyn Fn(&Entry) -> Option<String>,
    ) -> Vec<PurgeOutcome> {
        let mut out = Vec::new();
        let all = match self.list_all() {
            Ok(v) => v,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list the quarantine");
                out.push(PurgeOutcome::Failed {
                    id: String::new(),
                    error: QError::io("cannot list the quarantine", err),
                });
                return out;
            }
        };
        let now = SystemTime::now();
        for e in all {
            match e.state {
                EntryState::Held if e.age(now) >= retain => {
                    if let Some(reason) = keep(&e) {
                        tracing::info!(id = %e.id, path = %e.path, reason = %reason, "expired entry kept");
                        out.push(PurgeOutcome::Kept { entry: e, reason });
                        continue;
                    }
                    match self.purge_because(&e.id, Some("expired")) {
                        Ok(p) => out.push(PurgeOutcome::Purged(p)),
                        // Someone else restored or purged it meanwhile.
                        Err(QError::Gone { .. } | QError::UnknownId(_)) => {}
                        Err(error) => {
                            tracing::warn!(id = %e.id, error = %error, "purge failed");
                            out.push(PurgeOutcome::Failed { id: e.id, error });
                        }
                    }
                }
                EntryState::Held => {}
                EntryState::Restoring => {
                    let Some(c) = &e.claim else { continue };
                    let claim = cname(&c.name);
                    if self.older_than(&claim, self.grace(&self.claim_grace))
                        && self
                            .place_noreplace(
                                self.entries.as_fd(),
                                &claim,
                                self.entries.as_fd(),
                                &Self::data_name(&e.id),
                            )
                            .is_ok()
                    {
                        tracing::warn!(id = %e.id, path = %e.path, "recovered the entry of an interrupted restore");
                        out.push(PurgeOutcome::Recovered { id: e.id });
                    }
                }
                EntryState::Pending => {
                    let rec = Self::record_name(&e.id);
                    if self.older_than(&rec, self.grace(&self.pending_grace))
                        && e.age(now) >= self.grace(&self.pending_grace)
                        && self.state_of(&e.id) == EntryState::Pending
                    {
                        // No file contents here: the file never left its path.
                        self.drop_record(&e.id);
                        tracing::info!(id = %e.id, path = %e.path, "removed a stale record without data");
                        out.push(PurgeOutcome::Cleaned {
                            name: format!("{}.json", e.id),
                        });
                    }
                }
            }
        }
        // Temporaries of crashed stashes (the originals were never moved).
        if let Ok(names) = self.names() {
            for n in names {
                let is_tmp = n.starts_with(b".tmp-") && n.ends_with(b".json")
                    || n.starts_with(b".") && n.ends_with(b".copy");
                if !is_tmp {
                    continue;
                }
                let Ok(c) = CString::new(n.clone()) else {
                    continue;
                };
                if self.older_than(&c, self.grace(&self.pending_grace))
                    && sys::unlinkat(self.entries.as_fd(), &c, 0).is_ok()
                {
                    let name = String::from_utf8_lossy(&n).into_owned();
                    tracing::info!(name = %name, "removed a stale quarantine temporary");
                    out.push(PurgeOutcome::Cleaned { name });
                }
            }
        }
        out
    }

    /// Did `name` in `entries/` last change (ctime: renames count) more than
    /// `grace` ago?
    fn older_than(&self, name: &CStr, grace: Duration) -> bool {
        match sys::statat(self.entries.as_fd(), name) {
            Ok(st) => {
                let changed = st.st_ctime.max(st.st_mtime).max(0) as u64;
                unix_now().saturating_sub(changed) >= grace.as_secs()
            }
            Err(_) => false,
        }
    }

    /// Counts for `baseguard status`.
    pub fn status(&self) -> io::Result<Status> {
        let all = self.list_all()?;
        let names = self.names()?;
        let mut s = Status::default();
        for e in &all {
            match e.state {
                EntryState::Held => {
                    s.entries += 1;
                    s.bytes += e.size;
                    if s.oldest.is_none() {
                        s.oldest = Some(e.clone());
                    }
                }
                EntryState::Pending => s.pending += 1,
                EntryState::Restoring => s.restoring += 1,
            }
        }
        let ids: HashSet<&str> = all.iter().map(|e| e.id.as_str()).collect();
        s.orphans = names
            .iter()
            .filter_map(|n| n.strip_suffix(b".data"))
            .filter_map(|id| std::str::from_utf8(id).ok())
            .filter(|id| valid_id(id) && !ids.contains(id))
            .count();
        Ok(s)
    }
}

/// Records by id as read (their `state` not filled in), for
/// [`Quarantine::held_incremental`].
pub type Records = HashMap<Arc<str>, Arc<Entry>>;

/// When an instance disk was created, for [`pick_version`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskTime {
    pub secs: i64,
    pub nsec: u32,
    /// A birth time (the filesystem keeps one: ext4, XFS, btrfs, tmpfs);
    /// `false`: the change time, only an upper bound on the creation.
    pub exact: bool,
}

/// What [`pick_version`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionChoice {
    /// Nothing held for that path.
    Nothing,
    /// This entry holds the version the disks were created on.
    One(Box<Entry>),
    /// Several different versions could be it: restore none, report these
    /// (oldest first) so a person can choose.
    Ambiguous(Vec<Entry>),
}

/// A version's identity: entries with equal keys hold the same bytes as far
/// as can be told without reading them (a file stashed twice, by link and
/// by rename, or copied).
fn version_key(e: &Entry) -> (u64, i64, i64) {
    (e.size, e.mtime, e.mtime_nsec)
}

/// Allowance between the clock that stamps `quarantined_at` (the daemon's)
/// and the one that stamps file times (the file server's).
const CLOCK_SLACK: i64 = 2;

/// Choose, among the held entries of one path, the version that instance
/// disks created at `disks` were created on, for restore on access and
/// `check --restore`. The rule:
///
/// 1. A version existed at the path when a disk was created at time T if
///    its contents were last modified no later than T (`mtime <= T`) and it
///    left the path no earlier than T (`quarantined_at >= T`, less a couple
///    of seconds of clock slack). The second condition needs T to be the
///    disk's birth time; when the filesystem has none (NFS), T is the disk's
///    change time, only an upper bound, and only the first condition is
///    applied.
/// 2. Among the versions that qualify, empty ones are dropped when a
///    non-empty one qualifies (a truncation leaves an empty file that is
///    newer, and must never win over the copy the truncation kept).
/// 3. If what is left is one version (entries with equal size and mtime are
///    one version; the newest such entry is taken), that is the answer.
///    If nothing qualifies (clocks too far apart), the same is applied to
///    every held entry. If several different versions are left, or the
///    disks disagree, nothing is chosen ([`VersionChoice::Ambiguous`]):
///    restoring the wrong base file would corrupt the disk silently, and
///    the entries stay in the quarantine for a person to choose.
///
/// Example: `: > golden; rm golden` after a disk was created on a 1 MiB
/// `golden` leaves a truncate copy (1 MiB, old mtime, quarantined after the
/// disk was made) and an unlink entry (empty, mtime of the truncation, after
/// the disk): rule 1 keeps only the copy. Without birth times rule 2 drops
/// the empty one.
pub fn pick_version(held: &[Entry], disks: &[DiskTime]) -> VersionChoice {
    let files: Vec<&Entry> = held.iter().collect();
    if files.is_empty() {
        return VersionChoice::Nothing;
    }
    let decide = |cands: Vec<&Entry>| -> Result<Entry, Vec<Entry>> {
        let nonempty: Vec<&Entry> = cands.iter().copied().filter(|e| e.size > 0).collect();
        let cands = if nonempty.is_empty() { cands } else { nonempty };
        let first = version_key(cands[0]);
        if cands.iter().all(|e| version_key(e) == first) {
            let newest = cands
                .iter()
                .max_by(|a, b| a.sort_key().cmp(&b.sort_key()))
                .copied()
                .cloned();
            Ok(newest.unwrap_or_else(|| cands[0].clone()))
        } else {
            let mut v: Vec<Entry> = cands.into_iter().cloned().collect();
            v.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
            Err(v)
        }
    };
    let mut chosen: Vec<Entry> = Vec::new();
    let per_disk: Vec<Result<Entry, Vec<Entry>>> = if disks.is_empty() {
        vec![decide(files.clone())]
    } else {
        disks
            .iter()
            .map(|t| {
                let at = (t.secs, i64::from(t.nsec));
                let cands: Vec<&Entry> = files
                    .iter()
                    .copied()
                    .filter(|e| (e.mtime, e.mtime_nsec) <= at)
                    .filter(|e| !t.exact || e.quarantined_at as i64 + CLOCK_SLACK >= t.secs)
                    .collect();
                if cands.is_empty() {
                    decide(files.clone())
                } else {
                    decide(cands)
                }
            })
            .collect()
    };
    for r in per_disk {
        match r {
            Ok(e) => chosen.push(e),
            Err(v) => return VersionChoice::Ambiguous(v),
        }
    }
    let first = version_key(&chosen[0]);
    if chosen.iter().all(|e| version_key(e) == first) {
        let best = chosen
            .into_iter()
            .max_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        best.map_or(VersionChoice::Nothing, |e| VersionChoice::One(Box::new(e)))
    } else {
        let mut ids = HashSet::new();
        chosen.retain(|e| ids.insert(e.id.clone()));
        chosen.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        VersionChoice::Ambiguous(chosen)
    }
}

/// Tighten a quarantine directory to 0700, owned by root when we are root.
fn tighten(fd: BorrowedFd<'_>, shown: &str) {
    let Ok(st) = sys::fstat(fd) else { return };
    if st.st_mode & 0o7777 != 0o700
        && let Err(e) = sys::chmod_fd(fd, 0o700)
    {
        tracing::warn!(dir = shown, error = %e, "cannot set quarantine directory mode 0700");
    }
    if sys::geteuid() == 0
        && (st.st_uid != 0 || st.st_gid != 0)
        && let Err(e) = sys::chown_fd(fd, 0, 0)
    {
        // NFS with root_squash: root cannot chown; mode 0700 still applies.
        tracing::warn!(dir = shown, error = %e, "cannot make the quarantine directory root-owned");
    }
}

/// One xattr call that sizes its buffer: ask for the size, then the data,
/// again if it grew meanwhile (`ERANGE`).
fn xattr_bytes(call: impl Fn(usize) -> io::Result<sys::XattrReply>) -> io::Result<Vec<u8>> {
    for _ in 0..8 {
        let size = match call(0)? {
            sys::XattrReply::Size(0) => return Ok(Vec::new()),
            sys::XattrReply::Size(n) => n,
            sys::XattrReply::Data(d) => return Ok(d),
        };
        match call(size) {
            Ok(sys::XattrReply::Data(d)) => return Ok(d),
            Ok(sys::XattrReply::Size(_)) => return Ok(Vec::new()),
            Err(e) if errno(&e) == libc::ERANGE => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

/// Copy every extended attribute of `from` to `to`; returns the ones that
/// could not be copied (name, error), or `("*", error)` if they could not
/// even be listed. A filesystem without xattrs is not a failure.
fn copy_xattrs(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> Vec<(String, io::Error)> {
    let list = match xattr_bytes(|n| sys::listxattr_fd(from, n)) {
        Ok(l) => l,
        Err(e) if matches!(errno(&e), libc::ENOTSUP | libc::ENOSYS) => return Vec::new(),
        Err(e) => return vec![("*".into(), e)],
    };
    let mut failed = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let shown = String::from_utf8_lossy(name).into_owned();
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let copied = xattr_bytes(|n| sys::getxattr_fd(from, &cname, n))
            .and_then(|v| sys::setxattr_fd(to, &cname, &v, 0));
        match copied {
            Ok(()) => {}
            // Removed between list and get: nothing to keep.
            Err(e) if errno(&e) == libc::ENODATA => {}
            Err(e) => failed.push((shown, e)),
        }
    }
    failed
}

fn is_copy_unsupported(e: &io::Error) -> bool {
    matches!(
        errno(e),
        libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | libc::EBADF
    )
}

/// Copy `[off, off+len)` (`len` `None`: to EOF) from `rd` to the same offsets
/// in `out`, with `copy_file_range`, falling back to pread/pwrite.
fn copy_range(rd: &File, out: &File, mut off: u64, len: Option<u64>) -> io::Result<()> {
    let end = len.map(|l| off + l);
    let mut plain = false;
    let mut buf = Vec::new();
    loop {
        let want = match end {
            Some(e) if off >= e => return Ok(()),
            Some(e) => (e - off).min(1 << 30) as usize,
            None => 1 << 30,
        };
        if !plain {
            match sys::copy_file_range(rd.as_fd(), off as i64, out.as_fd(), off as i64, want, 0) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    off += n as u64;
                    continue;
                }
                Err(e) if is_copy_unsupported(&e) => plain = true,
                Err(e) => return Err(e),
            }
        }
        if buf.is_empty() {
            buf = vec![0u8; 1 << 20];
        }
        let n = rd.read_at(&mut buf[..want.min(1 << 20)], off)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
}

/// Copy all data of `rd` to `out`, skipping holes when `seekable` (our own
/// file description) and the filesystem reports them.
fn sparse_copy(rd: &File, out: &File, seekable: bool) -> io::Result<()> {
    if !seekable {
        return copy_range(rd, out, 0, None);
    }
    let mut pos: i64 = 0;
    loop {
        let data = match sys::lseek(rd.as_fd(), pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if errno(&e) == libc::ENXIO => return Ok(()),
            Err(_) if pos == 0 => return copy_range(rd, out, 0, None),
            Err(e) => return Err(e),
        };
        let hole = sys::lseek(rd.as_fd(), data, libc::SEEK_HOLE)?;
        if hole <= data {
            return copy_range(rd, out, data as u64, None);
        }
        copy_range(rd, out, data as u64, Some((hole - data) as u64))?;
        pos = hole;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("20261123-213301-node1-a1b2c3"));
        assert!(!valid_id(""));
        assert!(!valid_id(".."));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("-rf"));
        assert!(!valid_id("a b"));
        assert_eq!(host_tag("compute-1.example.org"), "compute-1");
        assert_eq!(host_tag("we!rd_host"), "we-rd-host");
        assert_eq!(host_tag(""), "host");
    }

    #[test]
    fn utc() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(fmt_utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }

    #[test]
    fn clean() {
        assert_eq!(
            clean_rel(Path::new("./_base/x")).unwrap(),
            PathBuf::from("_base/x")
        );
        assert!(matches!(
            clean_rel(Path::new("../x")),
            Err(QError::Escapes { .. })
        ));
        assert!(matches!(
            clean_rel(Path::new("/etc/passwd")),
            Err(QError::Escapes { .. })
        ));
        assert!(matches!(
            clean_rel(Path::new(".")),
            Err(QError::Escapes { .. })
        ));
    }

    fn ent(id: &str, size: u64, mtime: i64, q_at: u64) -> Entry {
        Entry {
            version: 1,
            id: id.into(),
            path: "_base/g".into(),
            path_bytes: None,
            kind: FileKind::File,
            size,
            mode: 0o100644,
            owner_uid: 0,
            owner_gid: 0,
            mtime,
            mtime_nsec: 0,
            ino: 1,
            quarantined_at: q_at,
            quarantined_nsec: 0,
            why: Why::Unlink,
            method: Method::Rename,
            who: Who::current(),
            state: EntryState::Held,
            claim: None,
        }
    }

    fn born(secs: i64, exact: bool) -> DiskTime {
        DiskTime {
            secs,
            nsec: 0,
            exact,
        }
    }

    fn one(c: VersionChoice) -> String {
        match c {
            VersionChoice::One(e) => e.id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pick_version_rules() {
        // Base written at 100, disk made at 200, `: > g` at 300 (copy), rm at
        // 400 (the empty file).
        let copy = ent("copy", 1 << 20, 100, 300);
        let empty = ent("empty", 0, 300, 400);
        let held = [copy.clone(), empty.clone()];
        assert_eq!(one(pick_version(&held, &[born(200, true)])), "copy");
        // Without birth times (change time 500, after everything): the empty
        // one never wins over a complete one.
        assert_eq!(one(pick_version(&held, &[born(500, false)])), "copy");
        assert_eq!(one(pick_version(&held, &[])), "copy");
        // Only the empty version held: that is what there is.
        assert_eq!(
            one(pick_version(
                std::slice::from_ref(&empty),
                &[born(200, true)]
            )),
            "empty"
        );
        assert_eq!(
            pick_version(&[], &[born(200, true)]),
            VersionChoice::Nothing
        );
        // Truncated and rewritten with other bytes, then deleted: with a
        // birth time the copy is the one; without, it cannot be told.
        let other = ent("other", 5000, 300, 400);
        let held = [copy.clone(), other.clone()];
        assert_eq!(one(pick_version(&held, &[born(200, true)])), "copy");
        assert!(matches!(
            pick_version(&held, &[born(500, false)]),
            VersionChoice::Ambiguous(v) if v.len() == 2
        ));
        // A version replaced before the disk was made is not it.
        let old = ent("old", 7000, 50, 150);
        let cur = ent("cur", 9000, 150, 400);
        assert_eq!(
            one(pick_version(
                &[old.clone(), cur.clone()],
                &[born(200, true)]
            )),
            "cur"
        );
        // The same version stashed twice is one version: the newest entry.
        let twin = ent("twin", 1 << 20, 100, 350);
        assert_eq!(
            one(pick_version(&[copy.clone(), twin], &[born(200, true)])),
            "twin"
        );
        // Two disks made on different versions: ambiguous.
        assert!(matches!(
            pick_version(&[old, cur], &[born(100, true), born(200, true)]),
            VersionChoice::Ambiguous(_)
        ));
    }

    #[test]
    fn record_roundtrip() {
        let w = Who::current();
        assert_eq!(w.pid, std::process::id());
        assert!(!w.comm.is_empty());
        let e = Entry {
            version: 1,
            id: "x".into(),
            path: "_base/a".into(),
            path_bytes: None,
            kind: FileKind::File,
            size: 3,
            mode: 0o100644,
            owner_uid: 0,
            owner_gid: 0,
            mtime: 1,
            mtime_nsec: 2,
            ino: 7,
            quarantined_at: 9,
            quarantined_nsec: 10,
            why: Why::RenameOver,
            method: Method::Link,
            who: w,
            state: EntryState::Held,
            claim: None,
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"rename-over\""));
        assert!(!s.contains("state"));
        let mut back: Entry = serde_json::from_str(&s).unwrap();
        back.state = EntryState::Held;
        assert_eq!(back, e);
    }
}
