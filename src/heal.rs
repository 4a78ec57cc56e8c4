//! Which base files are in use, for the daemon: a shared [`RefIndex`] kept
//! fresh at most once per interval, consulted when a lookup under a
//! protected path misses (restore on access) and before expiry purges a
//! quarantined file.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::quarantine::{Entry, Quarantine};
use crate::refs::{MAX_CHAIN_DEPTH, RefIndex, Resolved};

/// How stale the reference index may be when asked.
const FRESH: Duration = Duration::from_secs(2);
/// How stale the reference index may be when a quarantined path is asked
/// about (a restore on access depends on the answer).
const FRESH_FOR_HEAL: Duration = Duration::from_millis(200);
/// How long a listing of the quarantine is reused while its directory's
/// stamp is unchanged (timestamps can be coarse: keep this short).
const LIST_REUSE: Duration = Duration::from_secs(1);

/// The quarantine's newest entry per original path, cached against the
/// entries directory's stamp so that lookups that miss cost one `fstat`.
#[derive(Default)]
pub struct QuarantinedPaths {
    cache: Mutex<Option<Listing>>,
}

type Stamp = (i64, i64, i64, i64, u64);

/// A listing of the quarantine and when it was taken.
struct Listing {
    stamp: Stamp,
    at: Instant,
    /// The newest held entry per original path.
    by_path: HashMap<PathBuf, Entry>,
    /// The file names among those paths: a name not in here needs no path.
    names: HashSet<OsString>,
}

impl QuarantinedPaths {
    /// The newest held entry for the file called `name` whose path
    /// (relative to the backing root) `rel` gives; `rel` is only asked for
    /// when the quarantine holds some file of that name.
    pub fn latest(
        &self,
        q: &Quarantine,
        name: &OsStr,
        rel: impl FnOnce() -> Option<PathBuf>,
    ) -> Option<Entry> {
        let stamp = q.stamp().ok()?;
        let mut g = self.cache.lock();
        let fresh = g
            .as_ref()
            .is_some_and(|l| l.stamp == stamp && l.at.elapsed() < LIST_REUSE);
        if !fresh {
            let mut by_path: HashMap<PathBuf, Entry> = HashMap::new();
            for e in q.list().ok()? {
                let newer = by_path
                    .get(&e.orig_path())
                    .is_none_or(|o| e.sort_key() > o.sort_key());
                if newer {
                    by_path.insert(e.orig_path(), e);
                }
            }
            let names = by_path
                .keys()
                .filter_map(|p| p.file_name().map(OsString::from))
                .collect();
            *g = Some(Listing {
                stamp,
                at: Instant::now(),
                by_path,
                names,
            });
        }
        let listing = g.as_ref()?;
        if !listing.names.contains(name) {
            return None;
        }
        listing.by_path.get(&rel()?).cloned()
    }
}

/// A reference index over one instances directory, shared by threads.
///
/// Paths asked about and answered are relative to the guarded directory
/// (the mount root, as the quarantine records them). In the usual layout
/// that is the instances directory itself; in the `_base`-only layout (see
/// [`BaseLayout`]) it is `_base`, and the index, which works relative to the
/// instances directory, is asked about `_base/<rel>`.
pub struct References {
    root: PathBuf,
    /// The guarded directory relative to the instances directory: empty, or
    /// `_base` in the `_base`-only layout.
    prefix: PathBuf,
    /// Keeps the instances directory's descriptor (behind `root`) open.
    _instances: Option<OwnedFd>,
    inner: Mutex<(RefIndex, Option<Instant>)>,
}

/// The `_base`-only layout: baseguard serves Nova's `_base` directory alone,
/// and instance disks stay in its parent, off FUSE.
#[derive(Debug)]
pub struct BaseLayout {
    /// The instances directory (where `<uuid>/disk` live), opened `O_PATH`
    /// before the mount, so it is read directly, never through the mount.
    pub instances: OwnedFd,
    /// Its path, for messages and as a known prefix of backing names.
    pub instances_path: PathBuf,
    /// The guarded directory's name within it, as backing chains name it
    /// (`_base`).
    pub name: PathBuf,
}

impl BaseLayout {
    /// The layout for a guarded directory `backing`: `instances` if given,
    /// else the parent of `backing` when `backing` is named `_base`; `None`
    /// for the usual layout (the guarded directory is the instances dir).
    pub fn detect(backing: &Path, instances: Option<&Path>) -> Result<Option<BaseLayout>, String> {
        let named_base = backing.file_name() == Some(OsStr::new(crate::refs::BASE_DIR));
        let dir = match instances {
            Some(d) => d.to_path_buf(),
            None if named_base => match backing.parent() {
                Some(p) => p.to_path_buf(),
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        let fd = crate::sys::open_path(&dir, libc::O_PATH | libc::O_DIRECTORY).map_err(|e| {
            format!(
                "the instances directory {} cannot be opened: {e}",
                dir.display()
            )
        })?;
        Ok(Some(BaseLayout {
            instances: fd,
            instances_path: dir,
            // Instance disks name `.../_base/<file>` whatever the backing
            // directory is called.
            name: PathBuf::from(crate::refs::BASE_DIR),
        }))
    }
}

impl References {
    /// `root`: a path that reaches the backing directory (the daemon passes
    /// `/proc/self/fd/N`); `prefixes`: absolute paths under which instance
    /// disks may name base files (this node's mountpoint, the backing path).
    pub fn new(root: PathBuf, prefixes: Vec<PathBuf>) -> References {
        References {
            root,
            prefix: PathBuf::new(),
            _instances: None,
            inner: Mutex::new((RefIndex::new(prefixes), None)),
        }
    }

    /// The index for a guarded directory reached through `backing` (the
    /// daemon's root descriptor, or the CLI's), in either layout. `backing`
    /// must stay open as long as the index is used.
    pub fn for_layout(
        backing: BorrowedFd<'_>,
        layout: Option<BaseLayout>,
        mut prefixes: Vec<PathBuf>,
    ) -> References {
        let backing_path = PathBuf::from(format!("/proc/self/fd/{}", backing.as_raw_fd()));
        let Some(l) = layout else {
            return References::new(backing_path, prefixes);
        };
        prefixes.push(l.instances_path.clone());
        let mut index = RefIndex::new(prefixes);
        // `instances/_base` may be the mount itself: read it through the
        // backing descriptor instead.
        index.map_dir(l.name.clone(), backing_path);
        References {
            root: PathBuf::from(format!("/proc/self/fd/{}", l.instances.as_raw_fd())),
            prefix: l.name,
            _instances: Some(l.instances),
            inner: Mutex::new((index, None)),
        }
    }

    /// The guarded directory relative to the instances directory (empty in
    /// the usual layout, `_base` in the `_base`-only one).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    fn to_index(&self, rel: &Path) -> PathBuf {
        self.prefix.join(rel)
    }

    /// The instance disks whose backing chains name `rel` (relative to the
    /// instances directory). Rescans (cheaply: unchanged headers are not
    /// re-read) when the last scan is older than a couple of seconds.
    pub fn disks_using(&self, rel: &Path) -> Vec<PathBuf> {
        let rel = self.to_index(rel);
        self.with_fresh(FRESH, |index| index.references(&rel))
    }

    /// As [`Self::disks_using`], with an index at most a fraction of a second
    /// old (for restore on access, where a stale "unused" would be wrong).
    ///
    /// A miss always rescans: the link that names `rel` may have been
    /// restored a moment ago (qemu opening a two-level chain restores the
    /// resized copy, reads its header, then looks up the original), after
    /// the last scan. Only names the quarantine holds are asked about.
    pub fn disks_using_now(&self, rel: &Path) -> Vec<PathBuf> {
        let rel = self.to_index(rel);
        let mut g = self.inner.lock();
        let (index, at) = &mut *g;
        if at.is_some_and(|t| t.elapsed() <= FRESH_FOR_HEAL) {
            let disks = index.references(&rel);
            if !disks.is_empty() {
                return disks;
            }
        }
        match index.scan(&self.root) {
            Ok(_) => *at = Some(Instant::now()),
            Err(e) => tracing::warn!(error = %e, "cannot scan instance disks"),
        }
        index.references(&rel)
    }

    /// Every file in the guarded directory that some instance disk's
    /// backing chain names (relative to the guarded directory).
    pub fn referenced(&self) -> HashSet<PathBuf> {
        let all = self.with_fresh(FRESH, |index| index.referenced());
        if self.prefix.as_os_str().is_empty() {
            return all;
        }
        all.into_iter()
            .filter_map(|p| p.strip_prefix(&self.prefix).ok().map(Path::to_path_buf))
            .filter(|p| !p.as_os_str().is_empty())
            .collect()
    }

    /// For the command line: the index over a backing directory descriptor.
    pub fn for_backing(fd: BorrowedFd<'_>, prefixes: Vec<PathBuf>) -> References {
        References::new(
            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            prefixes,
        )
    }

    fn with_fresh<R>(&self, fresh: Duration, f: impl FnOnce(&RefIndex) -> R) -> R {
        let mut g = self.inner.lock();
        let (index, at) = &mut *g;
        if at.is_none_or(|t| t.elapsed() > fresh) {
            match index.scan(&self.root) {
                Ok(_) => *at = Some(Instant::now()),
                Err(e) => tracing::warn!(error = %e, "cannot scan instance disks"),
            }
        }
        f(index)
    }

    /// Every file of the guarded directory that an instance disk needs,
    /// with the disks that need it: the files its backing chains name, and,
    /// where a chain stops at a file held in `q`, the files that file's own
    /// header names (its chain goes on inside the quarantine), transitively.
    /// Without the second part, a resized copy and its original quarantined
    /// together would keep the copy but let the original expire.
    pub fn needed(&self, q: &Quarantine) -> HashMap<PathBuf, Vec<PathBuf>> {
        let held: HashMap<PathBuf, Entry> = {
            let mut m: HashMap<PathBuf, Entry> = HashMap::new();
            for e in q.list().unwrap_or_default() {
                if m.get(&e.orig_path())
                    .is_none_or(|o| e.sort_key() > o.sort_key())
                {
                    m.insert(e.orig_path(), e);
                }
            }
            m
        };
        let entries = PathBuf::from(format!("/proc/self/fd/{}/entries", q.dir_fd().as_raw_fd()));
        self.with_fresh(FRESH, |index| {
            let mut needed: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
            for p in index.referenced() {
                if let Some(rel) = self.guarded_rel(&p) {
                    needed.insert(rel, index.references(&p));
                }
            }
            let mut work: Vec<(PathBuf, usize)> = needed.keys().map(|p| (p.clone(), 0)).collect();
            while let Some((rel, depth)) = work.pop() {
                if depth >= MAX_CHAIN_DEPTH {
                    continue;
                }
                let Some(e) = held.get(&rel) else { continue };
                let data = entries.join(format!("{}.data", e.id));
                let Ok(Ok(Some(h))) = crate::qcow2::read_header(&data) else {
                    continue;
                };
                let Some(name) = h.backing_file else { continue };
                let Resolved::Inside(next) = index.resolve(&self.prefix.join(&rel), &name) else {
                    continue;
                };
                let Some(next) = self.guarded_rel(&next) else {
                    continue;
                };
                if needed.contains_key(&next) {
                    continue;
                }
                let disks = needed.get(&rel).cloned().unwrap_or_default();
                needed.insert(next.clone(), disks);
                work.push((next, depth + 1));
            }
            needed
        })
    }

    /// [`Self::keep_reason`] for every entry of `q` at once: computed once,
    /// including what quarantined links of a chain still need (see
    /// [`Self::needed`]).
    pub fn keeper(&self, q: &Quarantine) -> impl Fn(&Entry) -> Option<String> + use<> {
        let needed = self.needed(q);
        move |e: &Entry| needed.get(&e.orig_path()).and_then(|d| reason(d))
    }

    /// A path relative to the instances directory as a path relative to
    /// the guarded directory, if it is inside it.
    fn guarded_rel(&self, p: &Path) -> Option<PathBuf> {
        let r = p.strip_prefix(&self.prefix).ok()?;
        (!r.as_os_str().is_empty()).then(|| r.to_path_buf())
    }

    /// Why a quarantined file must be kept, if an instance disk uses it.
    pub fn keep_reason(&self, rel: &Path) -> Option<String> {
        reason(&self.disks_using(rel))
    }
}

fn reason(disks: &[PathBuf]) -> Option<String> {
    let first = disks.first()?;
    Some(if disks.len() == 1 {
        format!("referenced by {}", first.display())
    } else {
        format!(
            "referenced by {} and {} other disk(s)",
            first.display(),
            disks.len() - 1
        )
    })
}
