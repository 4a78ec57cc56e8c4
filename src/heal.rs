//! Which base files are in use, for the daemon: a shared [`RefIndex`] kept
//! fresh at most once per interval, consulted when a lookup under a
//! protected path misses (restore on access) and before expiry purges a
//! quarantined file.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::refs::RefIndex;

/// How stale the reference index may be when asked.
const FRESH: Duration = Duration::from_secs(2);

/// A reference index over one instances directory, shared by threads.
pub struct References {
    root: PathBuf,
    inner: Mutex<(RefIndex, Option<Instant>)>,
}

impl References {
    /// `root`: a path that reaches the backing directory (the daemon passes
    /// `/proc/self/fd/N`); `prefixes`: absolute paths under which instance
    /// disks may name base files (this node's mountpoint, the backing path).
    pub fn new(root: PathBuf, prefixes: Vec<PathBuf>) -> References {
        References {
            root,
            inner: Mutex::new((RefIndex::new(prefixes), None)),
        }
    }

    /// The instance disks whose backing chains name `rel` (relative to the
    /// instances directory). Rescans (cheaply: unchanged headers are not
    /// re-read) when the last scan is older than a couple of seconds.
    pub fn disks_using(&self, rel: &Path) -> Vec<PathBuf> {
        self.with_fresh(|index| index.references(rel))
    }

    /// Every file that some instance disk's backing chain names.
    pub fn referenced(&self) -> HashSet<PathBuf> {
        self.with_fresh(|index| index.referenced())
    }

    /// For the command line: the index over a backing directory descriptor.
    pub fn for_backing(fd: BorrowedFd<'_>, prefixes: Vec<PathBuf>) -> References {
        References::new(
            PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            prefixes,
        )
    }

    fn with_fresh<R>(&self, f: impl FnOnce(&RefIndex) -> R) -> R {
        let mut g = self.inner.lock();
        let (index, at) = &mut *g;
        if at.is_none_or(|t| t.elapsed() > FRESH) {
            match index.scan(&self.root) {
                Ok(_) => *at = Some(Instant::now()),
                Err(e) => tracing::warn!(error = %e, "cannot scan instance disks"),
            }
        }
        f(index)
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
