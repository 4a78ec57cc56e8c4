//! Which base files are in use, for the daemon: a shared [`RefIndex`] kept
//! fresh at most once per interval, consulted when a lookup under a
//! protected path misses (restore on access) and before expiry purges a
//! quarantined file.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::hash::Hasher;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::quarantine::{Entry, EntryState, Quarantine, Records};
use crate::refs::{MAX_CHAIN_DEPTH, RefIndex, Resolved};

/// How stale the reference index may be when asked.
const FRESH: Duration = Duration::from_secs(2);
/// How stale the reference index may be when a quarantined path is asked
/// about (a restore on access depends on the answer).
const FRESH_FOR_HEAL: Duration = Duration::from_millis(200);
/// How long a listing of the quarantine is reused while its directory's
/// stamp is unchanged (timestamps can be coarse: keep this short).
const LIST_REUSE: Duration = Duration::from_secs(1);

/// The quarantine's held entries per original path, cached against the
/// entries directory's stamp so that lookups that miss cost one `fstat`.
/// After a change only the new records are read (see
/// [`Quarantine::held_incremental`]), and no lock is held while reading:
/// the new listing is built aside and swapped in.
#[derive(Default)]
pub struct QuarantinedPaths {
    cache: Mutex<Option<Arc<Listing>>>,
}

type Stamp = (i64, i64, i64, i64, u64);

/// A listing of the quarantine and when it was taken.
struct Listing {
    stamp: Stamp,
    at: Instant,
    /// Every record read, for the next incremental refresh.
    records: Records,
    /// The held entries.
    held: Vec<Arc<Entry>>,
    /// Hashes of their file names: a name not in here needs no path (and
    /// nothing is allocated per entry to build this).
    names: HashSet<u64>,
}

/// Hash of the last component of a path given as bytes.
fn name_hash(path: &[u8]) -> u64 {
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    let mut h = std::hash::DefaultHasher::new();
    h.write(name);
    h.finish()
}

fn entry_name_hash(e: &Entry) -> u64 {
    name_hash(e.path_bytes.as_deref().unwrap_or(e.path.as_bytes()))
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
        self.held(q, name, rel).pop()
    }

    /// Every held entry (oldest first) for the file called `name` whose path
    /// `rel` gives, asked for only when the quarantine holds some file of
    /// that name; empty if none.
    pub fn held(
        &self,
        q: &Quarantine,
        name: &OsStr,
        rel: impl FnOnce() -> Option<PathBuf>,
    ) -> Vec<Entry> {
        let Some(listing) = self.listing(q) else {
            return Vec::new();
        };
        if !listing.names.contains(&name_hash(name.as_bytes())) {
            return Vec::new();
        }
        let Some(rel) = rel() else {
            return Vec::new();
        };
        let mut v: Vec<Entry> = listing
            .held
            .iter()
            .filter(|e| e.orig_path() == rel)
            .map(|e| Entry {
                state: EntryState::Held,
                ..Entry::clone(e)
            })
            .collect();
        v.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        v
    }

    fn listing(&self, q: &Quarantine) -> Option<Arc<Listing>> {
        let stamp = q.stamp().ok()?;
        let prev = self.cache.lock().clone();
        if let Some(l) = &prev
            && l.stamp == stamp
            && l.at.elapsed() < LIST_REUSE
        {
            return Some(l.clone());
        }
        let at = Instant::now();
        let empty = Records::new();
        let known = prev.as_ref().map_or(&empty, |l| &l.records);
        let (records, held) = match q.held_incremental(known) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the quarantine");
                return prev;
            }
        };
        let names = held.iter().map(|e| entry_name_hash(e)).collect();
        let listing = Arc::new(Listing {
            stamp,
            at,
            records,
            held,
            names,
        });
        let mut g = self.cache.lock();
        // Keep whichever listing was started last.
        if g.as_ref().is_none_or(|l| l.at <= at) {
            *g = Some(listing.clone());
        }
        Some(listing)
    }
}

/// A reference index over one instances directory, shared by threads.
///
/// The lock only guards swapping the published index: a scan (I/O on files
/// that users control) runs on a private copy with no lock held, and its
/// result is swapped in when done. So a scan that is slow (a hung NFS server)
/// never holds up the lookups that only read the index, and two threads that
/// both find it stale scan side by side rather than one waiting on the other.
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
    published: Mutex<Published>,
}

/// The index readers see, and when the scan that built it started.
struct Published {
    index: Arc<RefIndex>,
    at: Option<Instant>,
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
            published: Mutex::new(Published {
                index: Arc::new(RefIndex::new(prefixes)),
                at: None,
            }),
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
            published: Mutex::new(Published {
                index: Arc::new(index),
                at: None,
            }),
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
        self.fresh(FRESH).references(&rel)
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
        let disks = self.fresh(FRESH_FOR_HEAL).references(&rel);
        if !disks.is_empty() {
            return disks;
        }
        self.fresh(Duration::ZERO).references(&rel)
    }

    /// Every file in the guarded directory that some instance disk's
    /// backing chain names (relative to the guarded directory).
    pub fn referenced(&self) -> HashSet<PathBuf> {
        let all = self.fresh(FRESH).referenced();
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

    /// An index no older than `fresh`: the published one, or a new scan of a
    /// copy of it (its header cache included) made without the lock.
    fn fresh(&self, fresh: Duration) -> Arc<RefIndex> {
        let (current, stale) = {
            let g = self.published.lock();
            (g.index.clone(), g.at.is_none_or(|t| t.elapsed() > fresh))
        };
        if !stale {
            return current;
        }
        let started = Instant::now();
        let mut next = RefIndex::clone(&current);
        if let Err(e) = next.scan(&self.root) {
            tracing::warn!(error = %e, "cannot scan instance disks");
            return current;
        }
        let next = Arc::new(next);
        let mut g = self.published.lock();
        // Another thread may have published a scan that started later.
        if g.at.is_none_or(|t| t < started) {
            g.index = next.clone();
            g.at = Some(started);
        }
        next
    }

    fn with_fresh<R>(&self, fresh: Duration, f: impl FnOnce(&RefIndex) -> R) -> R {
        f(&self.fresh(fresh))
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
        // A scan made now, after the entries were listed: a purge must never
        // rest on an index older than the disk that needs the file.
        self.with_fresh(Duration::ZERO, |index| {
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
                // Never blocks or follows a link (see refs::open_image).
                let header =
                    crate::refs::open_image(&data).and_then(crate::qcow2::read_header_from);
                let Ok(Ok(Some(h))) = header else {
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
