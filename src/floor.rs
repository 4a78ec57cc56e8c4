//! The free-space floor (`min_free=`): the quarantine must never be the
//! reason a VM gets `ENOSPC`. When the backing filesystem's available space
//! falls below the floor, the oldest entries that no instance disk
//! references are purged, one at a time, until it is back above. Referenced
//! entries are never purged for space. Each purge is logged with why.

use std::os::fd::BorrowedFd;

use crate::policy::MinFree;
use crate::quarantine::{Entry, Quarantine};
use crate::space::FsSpace;

/// What one check of the floor did.
#[derive(Debug, Default)]
pub struct FloorRun {
    /// Entries purged for space, oldest first.
    pub purged: Vec<Entry>,
    /// The floor was not reached even after purging everything allowed.
    pub still_below: bool,
}

/// Check the floor once and purge what it takes (see the module docs).
/// `keep` says why an entry must stay (an instance disk references it).
pub fn enforce(
    q: &Quarantine,
    backing: BorrowedFd<'_>,
    floor: MinFree,
    keep: &dyn Fn(&Entry) -> Option<String>,
) -> FloorRun {
    let mut run = FloorRun::default();
    let Ok(space) = FsSpace::of(backing) else {
        return run;
    };
    let want = floor.bytes(space.total);
    if space.available >= want {
        return run;
    }
    let Ok(entries) = q.list() else {
        return run;
    };
    let mut avail = space.available;
    for e in entries {
        if avail >= want {
            break;
        }
        if let Some(reason) = keep(&e) {
            tracing::debug!(id = %e.id, path = %e.path, reason = %reason, "below the free-space floor, but kept");
            continue;
        }
        let before = avail;
        match q.purge_because(&e.id, Some("below min_free")) {
            Ok(p) => {
                avail = FsSpace::of(backing).map(|s| s.available).unwrap_or(avail);
                tracing::warn!(
                    id = %p.id,
                    path = %p.path,
                    available = before,
                    floor = want,
                    min_free = %floor,
                    freed = avail.saturating_sub(before),
                    "purged for space: the backing filesystem was below min_free (oldest unreferenced entry first)"
                );
                run.purged.push(p);
            }
            Err(err) => tracing::debug!(id = %e.id, error = %err, "could not purge for space"),
        }
    }
    if avail < want {
        run.still_below = true;
    }
    run
}
