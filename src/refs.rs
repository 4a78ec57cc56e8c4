//! Which files under the instances directory are *in use*: the reference
//! index built from the qcow2 backing chains of instance disks.
//!
//! Nova keeps one directory per instance under the (NFS-shared) instances
//! directory, e.g. `/var/lib/nova/instances/<uuid>/disk`, and the Glance images
//! those disks are based on as backing files in `_base/`. [`RefIndex::scan`]
//! finds the instance disks, follows each one's backing chain and records
//! every link; [`RefIndex::referenced`] and [`RefIndex::references`] answer
//! "is this `_base` file in use, and by whom?".
//!
//! # Paths
//!
//! Everything is relative to the `root` passed to [`RefIndex::scan`]. The
//! daemon passes `/proc/self/fd/N` paths, so `root` is never canonicalized
//! and no link is resolved through the real filesystem path of `root`: links
//! are resolved lexically, as qemu does.
//!
//! * A **relative** backing name is relative to the directory of the image
//!   that names it (qemu semantics), e.g. `../_base/abc` in `<uuid>/disk` is
//!   `_base/abc`. A name that climbs out of `root` with `..` is external.
//! * An **absolute** backing name is matched from its last `_base` component
//!   on: a disk created on another compute node names that node's mountpoint
//!   (`/var/lib/nova/instances/_base/abc` in production, anything in tests),
//!   and it still means `_base/abc` here. Failing that, if it starts with one
//!   of the known mountpoint prefixes given to [`RefIndex::new`], the prefix is
//!   stripped. Otherwise the file is outside the instances directory: it is
//!   reported as [`LinkState::External`] (not missing) and not followed.
//!
//! # What counts as an instance disk
//!
//! In `root/<dir>/`, where `<dir>` is a UUID (`8-4-4-4-12` hex digits) or
//! `instance-` followed by at least 8 hex digits, optionally with the suffix
//! `_resize` (directories ending in `_del` are being deleted and are skipped):
//! files named `disk`, `disk.local`, `disk.swap`, `disk.eph*` or `*.rescue`.
//! Also `root/snapshots/*/*.delta` (libvirt live snapshots).
//!
//! # Cost
//!
//! Headers (of disks and of the images they name) are cached by relative
//! path, keyed by (device, inode, size, mtime, ctime), and re-read only when
//! one of those changes. A rescan of unchanged instances costs one `readdir`
//! per instance directory, one `stat` per disk and one `stat` per distinct
//! backing file. Note that a running VM's disk changes mtime constantly, so
//! its header (one small read) is re-read on every scan.

use crate::qcow2::{self, Header, HeaderError};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// Longest backing chain followed, counted in links below the disk.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// The directory Nova's image cache lives in, relative to the instances dir.
pub const BASE_DIR: &str = "_base";

/// One link of a backing chain: an image named as backing file by the
/// previous image (the disk, for the first link).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    /// The backing file name exactly as written in the naming image's header.
    pub name: String,
    /// The backing format declared alongside it (`raw`, `qcow2`, ...), if any.
    pub format: Option<String>,
    /// Where it resolves: relative to root for [`LinkState::Present`] and
    /// [`LinkState::Missing`] (e.g. `_base/<sha1>`); for
    /// [`LinkState::External`] the lexically normalized name (absolute, or
    /// relative to root starting with `..`).
    pub path: PathBuf,
    /// Whether the file exists.
    pub state: LinkState,
}

/// Whether a chain link resolved to an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Inside root and present.
    Present,
    /// Inside root and absent (deleted, or perhaps quarantined: the caller
    /// decides). Ends the chain.
    Missing,
    /// Outside the instances directory; not inspected. Ends the chain.
    External,
}

/// Why a backing chain ends where it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "end", rename_all = "snake_case")]
pub enum ChainEnd {
    /// The last image has no backing file, is not qcow2 (raw), or is declared
    /// with a non-qcow2 backing format (qemu then does not probe it).
    Complete,
    /// The last link is missing.
    Missing,
    /// The last link is outside the instances directory.
    External,
    /// The last link names an image already in the chain (or the disk).
    Loop,
    /// The chain is longer than [`MAX_CHAIN_DEPTH`] links; the rest is not
    /// followed.
    TooDeep,
    /// The image at `path` (the disk or a link) has a malformed qcow2 header.
    BadHeader { path: PathBuf, error: HeaderError },
    /// The image at `path` could not be stat'ed or read.
    Unreadable { path: PathBuf, error: String },
}

/// A disk and its backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskChain {
    /// The disk, relative to root (e.g. `<uuid>/disk`).
    pub disk: PathBuf,
    /// Whether the disk itself is a qcow2 image (false: raw or unreadable).
    pub qcow2: bool,
    /// Backing chain, nearest first. Empty for raw disks and qcow2 disks
    /// without backing file.
    pub chain: Vec<Link>,
    /// Why the chain ends.
    pub end: ChainEnd,
}

/// A directory that could not be listed during a scan (other than vanishing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScanProblem {
    /// Relative to root.
    pub path: PathBuf,
    pub error: String,
}

/// Counters for one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScanStats {
    /// Instance (and snapshot) directories listed.
    pub dirs: usize,
    /// Disks found.
    pub disks: usize,
    /// Distinct files stat'ed (disks and backing files).
    pub stats: usize,
    /// Headers read from disk (cache misses).
    pub header_reads: usize,
}

/// The result of [`RefIndex::scan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scan {
    /// Every disk found, sorted by path.
    pub disks: Vec<DiskChain>,
    /// Directories that could not be read.
    pub problems: Vec<ScanProblem>,
    pub stats: ScanStats,
}

/// Where a backing name points, see [`RefIndex::resolve`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "snake_case")]
pub enum Resolved {
    /// Inside root; the path is relative to root, without `.` or `..`.
    Inside(PathBuf),
    /// Outside root (absolute, or relative starting with `..`).
    External(PathBuf),
}

/// Identity and version of a file, used to validate cached headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(m: &fs::Metadata) -> Self {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

type Verdict = Result<Option<Header>, HeaderError>;

#[derive(Clone)]
struct CachedHeader {
    key: FileKey,
    verdict: Verdict,
    generation: u64,
}

/// Result of stat'ing one relative path, memoized within a scan.
#[derive(Clone)]
enum Stat {
    File(FileKey),
    Missing,
    Error(String),
}

/// The reference index. Keep one around and call [`RefIndex::scan`]
/// repeatedly: headers are cached between scans. Cloning it is cheap next to
/// a scan (a map of small headers), so a caller can scan a copy without
/// holding a lock and swap it in afterwards.
#[derive(Clone)]
pub struct RefIndex {
    known_prefixes: Vec<PathBuf>,
    headers: HashMap<PathBuf, CachedHeader>,
    generation: u64,
    /// Relative path of every in-root link -> disks whose chains name it.
    reverse: HashMap<PathBuf, Vec<PathBuf>>,
    /// Subdirectories of root read elsewhere: (relative dir, real path).
    mapped: Vec<(PathBuf, PathBuf)>,
}

impl RefIndex {
    /// A new, empty index. `known_prefixes` are the absolute mountpoints the
    /// instances directory is known under on any node (e.g.
    /// `/var/lib/nova/instances`); relative or empty entries are ignored.
    pub fn new(known_prefixes: Vec<PathBuf>) -> Self {
        let known_prefixes = known_prefixes
            .into_iter()
            .filter(|p| p.is_absolute())
            .map(|p| normalize(&p).0)
            .collect();
        RefIndex {
            known_prefixes,
            headers: HashMap::new(),
            generation: 0,
            reverse: HashMap::new(),
            mapped: Vec::new(),
        }
    }

    /// Reads everything under `rel` (a directory relative to root, e.g.
    /// `_base`) from `real` instead of `root/rel`. For the `_base`-only
    /// layout: the daemon scans the instances directory through a descriptor
    /// opened before its mount, but `root/_base` is its own mountpoint, and
    /// a scan must never go through the mount it serves; `real` (a
    /// `/proc/self/fd/N` path of the backing `_base`) reaches the files
    /// directly.
    pub fn map_dir(&mut self, rel: PathBuf, real: PathBuf) {
        let rel = normalize(&rel).0;
        self.mapped.retain(|(r, _)| r != &rel);
        self.mapped.push((rel, real));
    }

    /// Resolves backing `name`, found in the image at `image` (relative to
    /// root), to a path relative to root or an external path. Purely
    /// lexical; see the module docs for the rules.
    pub fn resolve(&self, image: &Path, name: &str) -> Resolved {
        let p = Path::new(name);
        if p.is_absolute() {
            let (abs, _) = normalize(p);
            let comps: Vec<Component<'_>> = abs.components().collect();
            // From the last `_base` component that has something after it.
            if let Some(i) = comps
                .iter()
                .rposition(|c| c.as_os_str() == BASE_DIR)
                .filter(|&i| i + 1 < comps.len())
            {
                return Resolved::Inside(comps[i..].iter().collect());
            }
            for prefix in &self.known_prefixes {
                if let Ok(rest) = abs.strip_prefix(prefix) {
                    if rest.as_os_str().is_empty() {
                        break;
                    }
                    return Resolved::Inside(rest.to_path_buf());
                }
            }
            Resolved::External(abs)
        } else {
            let dir = image.parent().unwrap_or(Path::new(""));
            let (rel, escaped) = normalize(&dir.join(p));
            if escaped || rel.as_os_str().is_empty() {
                Resolved::External(rel)
            } else {
                Resolved::Inside(rel)
            }
        }
    }

    /// Scans the instances directory at `root`: finds every instance disk and
    /// follows its backing chain. Fails only if `root` itself cannot be
    /// listed; unreadable instance directories are reported in
    /// [`Scan::problems`], and directories or disks that vanish mid-scan are
    /// skipped. Afterwards [`referenced`](Self::referenced) and
    /// [`references`](Self::references) answer from this scan.
    pub fn scan(&mut self, root: &Path) -> io::Result<Scan> {
        self.generation += 1;
        let mut ctx = ScanCtx {
            root,
            mapped: self.mapped.clone(),
            stats: HashMap::new(),
            counters: ScanStats::default(),
            problems: Vec::new(),
        };
        let mut disks = Vec::new();
        for entry in fs::read_dir(root)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == "snapshots" {
                let snap_root = PathBuf::from(name);
                for sub in ctx.list(&snap_root) {
                    let sub_rel = snap_root.join(&sub);
                    for file in ctx.list(&sub_rel) {
                        if file.ends_with(".delta") {
                            disks.push(sub_rel.join(file));
                        }
                    }
                }
            } else if is_instance_dir(name) {
                let dir = PathBuf::from(name);
                for file in ctx.list(&dir) {
                    if is_disk_name(&file) {
                        disks.push(dir.join(file));
                    }
                }
            }
        }
        disks.sort();

        let mut chains = Vec::with_capacity(disks.len());
        for disk in disks {
            if let Some(chain) = self.chain_of(&mut ctx, disk) {
                chains.push(chain);
            }
        }
        ctx.counters.disks = chains.len();
        ctx.counters.stats = ctx.stats.len();

        let generation = self.generation;
        self.headers.retain(|_, c| c.generation == generation);
        self.reverse.clear();
        for d in &chains {
            for link in &d.chain {
                if link.state != LinkState::External {
                    let users = self.reverse.entry(link.path.clone()).or_default();
                    if users.last() != Some(&d.disk) {
                        users.push(d.disk.clone());
                    }
                }
            }
        }
        Ok(Scan {
            disks: chains,
            problems: ctx.problems,
            stats: ctx.counters,
        })
    }

    /// Every path (relative to root) named by some disk's backing chain in the
    /// last scan, present or missing; external links are not included. This
    /// includes `_base/` files and any intermediate overlays inside root.
    pub fn referenced(&self) -> HashSet<PathBuf> {
        self.reverse.keys().cloned().collect()
    }

    /// Whether `rel` (relative to root) was named by some chain in the last
    /// scan.
    pub fn is_referenced(&self, rel: &Path) -> bool {
        self.reverse.contains_key(&normalize(rel).0)
    }

    /// The disks (relative to root, sorted) whose backing chains named `rel`
    /// in the last scan; empty if none. `rel` is normalized lexically, so
    /// `./_base/x` and `_base/x` are the same.
    pub fn references(&self, rel: &Path) -> Vec<PathBuf> {
        self.reverse
            .get(&normalize(rel).0)
            .cloned()
            .unwrap_or_default()
    }

    /// Number of cached headers (disks and backing images).
    pub fn cached_headers(&self) -> usize {
        self.headers.len()
    }

    /// Header of the image at `rel` with the given key, from cache or disk.
    fn header(&mut self, ctx: &mut ScanCtx<'_>, rel: &Path, key: FileKey) -> io::Result<Verdict> {
        let generation = self.generation;
        if let Some(c) = self.headers.get_mut(rel)
            && c.key == key
        {
            c.generation = generation;
            return Ok(c.verdict.clone());
        }
        ctx.counters.header_reads += 1;
        let file = open_image(&ctx.real(rel))?;
        // Cache under what was read (the name may have moved since the stat).
        let key = FileKey::of(&file.metadata()?);
        let verdict = qcow2::read_header_from(file)?;
        self.headers.insert(
            rel.to_path_buf(),
            CachedHeader {
                key,
                verdict: verdict.clone(),
                generation,
            },
        );
        Ok(verdict)
    }

    /// Reads the chain of one disk; `None` if the disk vanished.
    fn chain_of(&mut self, ctx: &mut ScanCtx<'_>, disk: PathBuf) -> Option<DiskChain> {
        let key = match ctx.stat(&disk) {
            Stat::File(key) => key,
            Stat::Missing => return None,
            Stat::Error(error) => {
                return Some(DiskChain {
                    end: ChainEnd::Unreadable {
                        path: disk.clone(),
                        error,
                    },
                    disk,
                    qcow2: false,
                    chain: Vec::new(),
                });
            }
        };
        let mut chain = Vec::new();
        let mut visited: HashSet<PathBuf> = HashSet::new();
        visited.insert(disk.clone());
        let mut qcow2 = false;
        let mut cur = disk.clone();
        let mut cur_key = key;
        let end = loop {
            let header = match self.header(ctx, &cur, cur_key) {
                Ok(Ok(Some(h))) => h,
                Ok(Ok(None)) => break ChainEnd::Complete,
                Ok(Err(error)) => break ChainEnd::BadHeader { path: cur, error },
                Err(e) => {
                    if e.kind() == io::ErrorKind::NotFound && chain.is_empty() {
                        return None; // the disk vanished between stat and open
                    }
                    break ChainEnd::Unreadable {
                        path: cur,
                        error: e.to_string(),
                    };
                }
            };
            if chain.is_empty() {
                qcow2 = true;
            }
            let Some(name) = header.backing_file else {
                break ChainEnd::Complete;
            };
            if chain.len() >= MAX_CHAIN_DEPTH {
                break ChainEnd::TooDeep;
            }
            let format = header.backing_format;
            let rel = match self.resolve(&cur, &name) {
                Resolved::External(path) => {
                    chain.push(Link {
                        name,
                        format,
                        path,
                        state: LinkState::External,
                    });
                    break ChainEnd::External;
                }
                Resolved::Inside(rel) => rel,
            };
            if !visited.insert(rel.clone()) {
                // Already in this chain, so it exists: we read its header.
                chain.push(Link {
                    name,
                    format,
                    path: rel,
                    state: LinkState::Present,
                });
                break ChainEnd::Loop;
            }
            let stat = ctx.stat(&rel);
            // qemu probes only when no format is declared.
            let follow = format.as_deref().is_none_or(|f| f == "qcow2");
            chain.push(Link {
                name,
                format,
                path: rel.clone(),
                state: match stat {
                    Stat::Missing => LinkState::Missing,
                    _ => LinkState::Present,
                },
            });
            match stat {
                Stat::Missing => break ChainEnd::Missing,
                Stat::Error(error) => break ChainEnd::Unreadable { path: rel, error },
                Stat::File(key) if follow => {
                    cur = rel;
                    cur_key = key;
                }
                Stat::File(_) => break ChainEnd::Complete,
            }
        };
        Some(DiskChain {
            disk,
            qcow2,
            chain,
            end,
        })
    }
}

/// Per-scan state: the root, a stat memo and counters.
struct ScanCtx<'a> {
    root: &'a Path,
    mapped: Vec<(PathBuf, PathBuf)>,
    stats: HashMap<PathBuf, Stat>,
    counters: ScanStats,
    problems: Vec<ScanProblem>,
}

impl ScanCtx<'_> {
    /// Where the file at `rel` (relative to root) is read from.
    fn real(&self, rel: &Path) -> PathBuf {
        for (dir, real) in &self.mapped {
            if let Ok(rest) = rel.strip_prefix(dir) {
                return real.join(rest);
            }
        }
        self.root.join(rel)
    }

    /// Names in directory `rel`; a vanished or non-directory entry yields
    /// nothing, other failures are recorded as problems.
    fn list(&mut self, rel: &Path) -> Vec<String> {
        let iter = match fs::read_dir(self.real(rel)) {
            Ok(it) => it,
            Err(e) => {
                if !is_gone(&e) {
                    self.problems.push(ScanProblem {
                        path: rel.to_path_buf(),
                        error: e.to_string(),
                    });
                }
                return Vec::new();
            }
        };
        self.counters.dirs += 1;
        let mut names = Vec::new();
        for entry in iter {
            match entry {
                Ok(e) => {
                    if let Ok(n) = e.file_name().into_string() {
                        names.push(n);
                    }
                }
                Err(e) => {
                    self.problems.push(ScanProblem {
                        path: rel.to_path_buf(),
                        error: e.to_string(),
                    });
                    break;
                }
            }
        }
        names
    }

    /// stat (following symlinks, as qemu does) of `rel`, once per scan.
    fn stat(&mut self, rel: &Path) -> Stat {
        if let Some(s) = self.stats.get(rel) {
            return s.clone();
        }
        let s = match fs::metadata(self.real(rel)) {
            Ok(m) if m.is_file() || m.file_type().is_block_device() => Stat::File(FileKey::of(&m)),
            // Never open FIFOs, sockets or character devices: opening a FIFO
            // blocks until a writer appears.
            Ok(m) if m.is_dir() => Stat::Error("is a directory".into()),
            Ok(_) => Stat::Error("not a regular file".into()),
            Err(e) if is_gone(&e) => Stat::Missing,
            Err(e) => Stat::Error(e.to_string()),
        };
        self.stats.insert(rel.to_path_buf(), s.clone());
        s
    }
}

/// Opens an image to read its header without ever blocking or following a
/// symlink in its last component: the name may have been swapped since it
/// was stat'ed (a user can exchange their instance's `disk` with a FIFO, whose
/// open would wait for a writer forever), so the type is checked on the
/// descriptor and anything but a regular file is refused.
pub(crate) fn open_image(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other("is a symbolic link (not followed when reading headers)")
            } else {
                e
            }
        })?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Lexically normalizes `p`: drops `.`, applies `..`. Returns the result and
/// whether a relative path climbed above its start (the result then starts
/// with `..`). For absolute paths `/..` is `/`.
fn normalize(p: &Path) -> (PathBuf, bool) {
    let mut out: Vec<Component<'_>> = Vec::new();
    let mut ups = 0usize;
    let mut absolute = false;
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                absolute = true;
                out.clear();
                ups = 0;
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if out.pop().is_none() && !absolute {
                    ups += 1;
                }
            }
            Component::Normal(_) => out.push(c),
        }
    }
    let mut path = PathBuf::new();
    if absolute {
        path.push("/");
    }
    for _ in 0..ups {
        path.push("..");
    }
    path.extend(out);
    (path, ups > 0)
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `8-4-4-4-12` hex digits.
fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && is_hex(p))
}

/// Whether a directory name under root is an instance directory whose disks
/// count: `<uuid>`, `instance-<hex{8,}>`, each optionally with `_resize`.
pub fn is_instance_dir(name: &str) -> bool {
    let base = name.strip_suffix("_resize").unwrap_or(name);
    if is_uuid(base) {
        return true;
    }
    match base.strip_prefix("instance-") {
        Some(hex) => hex.len() >= 8 && is_hex(hex),
        None => false,
    }
}

/// Whether a file name in an instance directory is a disk whose backing
/// chain counts: `disk`, `disk.local`, `disk.swap`, `disk.eph*`, `*.rescue`.
pub fn is_disk_name(name: &str) -> bool {
    matches!(name, "disk" | "disk.local" | "disk.swap")
        || name.starts_with("disk.eph")
        || (name.ends_with(".rescue") && name.len() > ".rescue".len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(prefixes: &[&str]) -> RefIndex {
        RefIndex::new(prefixes.iter().map(PathBuf::from).collect())
    }

    #[test]
    fn names() {
        assert!(is_instance_dir("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"));
        assert!(is_instance_dir(
            "0B1C2D3E-4F50-6172-8394-A5B6C7D8E9F0_resize"
        ));
        assert!(!is_instance_dir("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0_del"));
        assert!(!is_instance_dir("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f"));
        assert!(!is_instance_dir("0b1c2d3e4f50-6172-8394-a5b6c7d8e9f0-"));
        assert!(is_instance_dir("instance-0000002a"));
        assert!(is_instance_dir("instance-10000002a_resize"));
        assert!(!is_instance_dir("instance-2a"));
        assert!(!is_instance_dir("_base"));
        assert!(!is_instance_dir("locks"));
        for d in [
            "disk",
            "disk.local",
            "disk.swap",
            "disk.eph0",
            "disk.rescue",
        ] {
            assert!(is_disk_name(d), "{d}");
        }
        for d in [
            "disk.config",
            "console.log",
            "disk.info",
            ".rescue",
            "libvirt.xml",
        ] {
            assert!(!is_disk_name(d), "{d}");
        }
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize(Path::new("a/./b/../c")), ("a/c".into(), false));
        assert_eq!(normalize(Path::new("a/../../c")), ("../c".into(), true));
        assert_eq!(normalize(Path::new("/../a/./b")), ("/a/b".into(), false));
        assert_eq!(normalize(Path::new("")), ("".into(), false));
    }

    #[test]
    fn resolve_rules() {
        let i = idx(&["/mnt/a/", "/srv/x/../nova"]);
        let disk = Path::new("u/disk");
        let inside = |p: &str| Resolved::Inside(p.into());
        let ext = |p: &str| Resolved::External(p.into());
        assert_eq!(i.resolve(disk, "../_base/abc"), inside("_base/abc"));
        assert_eq!(i.resolve(disk, "disk.local"), inside("u/disk.local"));
        assert_eq!(i.resolve(disk, "./../../x"), ext("../x"));
        assert_eq!(i.resolve(disk, ".."), ext(""));
        assert_eq!(
            i.resolve(disk, "/var/lib/nova/instances/_base/abc"),
            inside("_base/abc")
        );
        assert_eq!(
            i.resolve(disk, "/other/node/_base/abc"),
            inside("_base/abc")
        );
        assert_eq!(i.resolve(disk, "/a/_base/../_base/b"), inside("_base/b"));
        assert_eq!(i.resolve(disk, "/mnt/a/u2/disk"), inside("u2/disk"));
        assert_eq!(i.resolve(disk, "/srv/nova/u2/disk"), inside("u2/disk"));
        assert_eq!(i.resolve(disk, "/mnt/a"), ext("/mnt/a"));
        assert_eq!(i.resolve(disk, "/mnt/ab/u2/disk"), ext("/mnt/ab/u2/disk"));
        assert_eq!(i.resolve(disk, "/images/x.img"), ext("/images/x.img"));
        assert_eq!(i.resolve(disk, "/x/_base"), ext("/x/_base"));
        let s = Path::new("snapshots/tmpab/s.delta");
        assert_eq!(i.resolve(s, "../../_base/abc"), inside("_base/abc"));
    }
}
