//! Which base files are in use, for the daemon: a shared [`RefIndex`] kept
//! fresh at most once per interval, consulted when a lookup under a
//! protected path misses (restore on access) and before expiry purges a
//! quarantined file.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::hash::Hasher;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::quarantine::{Entry, EntryState, Quarantine, Records};
use crate::refs::RefIndex;

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
pub struct References {
    root: PathBuf,
    published: Mutex<Published>,
}

/// The index readers see, and when the scan that built it started.
struct Published {
    index: Arc<RefIndex>,
    at: Option<Instant>,
}

impl References {
    /// `root`: a path that reaches the backing directory (the daemon passes
    /// `/proc/self/fd/N`); `prefixes`: absolute paths under which instance
    /// disks may name base files (this node's mountpoint, the backing path).
    pub fn new(root: PathBuf, prefixes: Vec<PathBuf>) -> References {
        References {
            root,
            published: Mutex::new(Published {
                index: Arc::new(RefIndex::new(prefixes)),
                at: None,
            }),
        }
    }

    /// The instance disks whose backing chains name `rel` (relative to the
    /// instances directory). Rescans (cheaply: unchanged headers are not
    /// re-read) when the last scan is older than a couple of seconds.
    pub fn disks_using(&self, rel: &Path) -> Vec<PathBuf> {
        self.fresh(FRESH).references(rel)
    }

    /// As [`Self::disks_using`], with an index at most a fraction of a second
    /// old (for restore on access, where a stale "unused" would be wrong).
    pub fn disks_using_now(&self, rel: &Path) -> Vec<PathBuf> {
        self.fresh(FRESH_FOR_HEAL).references(rel)
    }

    /// Every file that some instance disk's backing chain names.
    pub fn referenced(&self) -> HashSet<PathBuf> {
        self.fresh(FRESH).referenced()
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

    /// Why a quarantined file must be kept, if an instance disk uses it.
    pub fn keep_reason(&self, rel: &Path) -> Option<String> {
        let disks = self.disks_using(rel);
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
}
