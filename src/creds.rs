//! Per-request credentials: each request runs with the caller's fsuid, fsgid
//! and supplementary groups on the worker thread that serves it, as virtiofsd
//! does, so that files get the right owner and the backing filesystem makes
//! the permission decisions. Root callers run as the daemon (root stays root).
//!
//! The switch is per thread (raw syscalls, see [`crate::sys`]) and memoised:
//! a thread that serves the same caller twice in a row makes no syscall.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::sys;

/// Who is asking, as FUSE tells us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };
}

#[derive(Clone, PartialEq, Eq)]
struct ThreadCreds {
    uid: u32,
    gid: u32,
    groups: Arc<[u32]>,
}

thread_local! {
    static CURRENT: RefCell<Option<ThreadCreds>> = const { RefCell::new(None) };
}

const GROUPS_TTL: Duration = Duration::from_secs(2);
const GROUPS_CACHE_MAX: usize = 4096;

/// Supplementary groups of callers, read from `/proc/PID/status` and kept
/// for a short time (a process's groups rarely change; pids are reused only
/// slowly).
pub struct Credentials {
    daemon_groups: Arc<[u32]>,
    groups: DashMap<u32, (Instant, Arc<[u32]>)>,
}

impl Default for Credentials {
    fn default() -> Self {
        Self::new()
    }
}

impl Credentials {
    pub fn new() -> Credentials {
        Credentials {
            daemon_groups: read_groups("self").unwrap_or_else(|| Arc::from(vec![0u32])),
            groups: DashMap::new(),
        }
    }

    fn groups_of(&self, pid: u32, gid: u32) -> Arc<[u32]> {
        if pid != 0 {
            if let Some(e) = self.groups.get(&pid) {
                if e.0.elapsed() < GROUPS_TTL {
                    return Arc::clone(&e.1);
                }
            }
            if let Some(g) = read_groups(&pid.to_string()) {
                if self.groups.len() >= GROUPS_CACHE_MAX {
                    self.groups.clear();
                }
                self.groups.insert(pid, (Instant::now(), Arc::clone(&g)));
                return g;
            }
        }
        Arc::from(vec![gid])
    }

    /// Run the rest of the request as `caller` on this thread. Root callers
    /// keep the daemon's credentials. The thread keeps them until the next
    /// switch (memoised), so work that needs the daemon's rights calls
    /// [`Credentials::become_daemon`] first.
    pub fn become_caller(&self, caller: Caller) {
        if caller.uid == 0 {
            self.become_daemon();
        } else {
            let want_groups = self.groups_of(caller.pid, caller.gid);
            set(ThreadCreds {
                uid: caller.uid,
                gid: caller.gid,
                groups: want_groups,
            });
        }
    }

    /// Run `f` with the daemon's credentials, then go back to those the
    /// thread had (work of the guard's own in the middle of a caller's
    /// request).
    pub fn as_daemon<R>(&self, f: impl FnOnce() -> R) -> R {
        let prev = CURRENT.with(|c| c.borrow().clone());
        self.become_daemon();
        let r = f();
        if let Some(p) = prev {
            set(p);
        }
        r
    }

    /// Switch this thread back to the daemon's own credentials (root).
    pub fn become_daemon(&self) {
        set(ThreadCreds {
            uid: 0,
            gid: 0,
            groups: Arc::clone(&self.daemon_groups),
        });
    }
}

fn set(want: ThreadCreds) {
    CURRENT.with(|cur| {
        let mut cur = cur.borrow_mut();
        let initial = cur.is_none();
        if cur.as_ref() == Some(&want) {
            return;
        }
        let same_ids = cur
            .as_ref()
            .is_some_and(|c| c.uid == want.uid && c.gid == want.gid);
        if initial || !same_ids {
            // Order: become root first so the group change is permitted,
            // then set groups, then the target ids.
            sys::set_thread_fsuid(0);
            sys::set_thread_fsgid(0);
        }
        if initial || cur.as_ref().is_none_or(|c| c.groups != want.groups) {
            // Failure leaves the old groups: fail closed by dropping to the
            // primary group only.
            if sys::set_thread_groups(&want.groups).is_err() {
                let _ = sys::set_thread_groups(&[want.gid]);
            }
        }
        if initial || !same_ids {
            sys::set_thread_fsgid(want.gid);
            sys::set_thread_fsuid(want.uid);
        }
        *cur = Some(want);
    });
}

/// `Groups:` of `/proc/PID/status`.
fn read_groups(pid: &str) -> Option<Arc<[u32]>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    let groups: Vec<u32> = line["Groups:".len()..]
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    Some(Arc::from(groups))
}
