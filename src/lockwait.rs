//! Blocking lock waits that end when the waiting process is interrupted.
//!
//! A `F_SETLKW`/`F_OFD_SETLKW`/`flock` wait through the mount is forwarded as
//! a blocking `F_OFD_SETLKW` on the backing file, on a thread of its own.
//! When the waiting process gets a signal, the kernel sends FUSE_INTERRUPT;
//! fuser 0.18 does not pass that on (it answers ENOSYS itself, after which
//! the kernel sends no more and waits for the reply, killable only before
//! the request was read: a SIGKILLed waiter sleeps uninterruptibly until the
//! lock comes). So the daemon watches the waiters itself: every
//! [`TICK`] it reads the waiting thread's pending and blocked signals from
//! `/proc/<tid>/status`. SIGKILL, a thread that is gone, or any other
//! unblocked signal still pending on the next tick (one being handled
//! elsewhere in its process is gone by then) cancels the wait: the daemon
//! interrupts its own blocking `F_OFD_SETLKW` with a signal (the backing
//! filesystem then drops the queued request, so no lock is left behind)
//! and answers EINTR. The kernel turns that into a restart or EINTR
//! exactly as for a local lock: `flock -w 2` times out after 2 s.
//!
//! That is for backing filesystems whose locks the kernel manages itself
//! (ext4, xfs, btrfs, tmpfs). Over a FUSE or network filesystem an
//! interrupted blocking request may still be granted later (GlusterFS's
//! client does that), which would leave a lock behind: there the wait
//! polls with non-blocking requests instead (backing off from 1 ms to
//! [`POLL_MAX`]), so nothing is ever queued that would need cancelling.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::fs::{Errno, Result};
use crate::sys;

/// How often waiting callers are checked for signals.
pub const TICK: Duration = Duration::from_millis(50);

/// The longest pause between two tries of a polled wait.
pub const POLL_MAX: Duration = Duration::from_millis(100);

/// How a wait is done on the backing filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// One blocking request, interrupted by a signal if need be.
    Blocking,
    /// Non-blocking requests until one succeeds.
    Poll,
}

const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);

struct Waiter {
    /// The thread of the calling process that waits (FUSE's request pid).
    caller: u32,
    /// The daemon thread blocked in `F_OFD_SETLKW` for it.
    thread: i32,
    cancelled: AtomicBool,
    /// Ticks in a row that found a signal pending.
    strikes: AtomicU64,
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<u64, Arc<Waiter>>,
    next: u64,
    watching: bool,
}

/// The waits in progress, and the thread that watches their callers.
pub struct LockWaits {
    inner: Arc<(Mutex<Inner>, Condvar)>,
    signal: Option<i32>,
}

impl Default for LockWaits {
    fn default() -> Self {
        Self::new()
    }
}

impl LockWaits {
    pub fn new() -> LockWaits {
        let signal = match sys::install_wakeup_handler() {
            Ok(()) => Some(sys::wakeup_signal()),
            Err(e) => {
                tracing::warn!(error = %e, "lock waits cannot be interrupted");
                None
            }
        };
        LockWaits {
            inner: Arc::new((Mutex::new(Inner::default()), Condvar::new())),
            signal,
        }
    }

    /// Take a lock for the process thread `caller` with `lock(block)` (a
    /// lock request on this thread, blocking or not); EINTR if `caller` is
    /// interrupted first.
    pub fn wait(
        &self,
        caller: u32,
        mode: WaitMode,
        mut lock: impl FnMut(bool) -> Result<()>,
    ) -> Result<()> {
        // No caller to watch (pid 0: not visible in the daemon's pid
        // namespace): a plain wait.
        let Some(sig) = self.signal.filter(|_| caller != 0) else {
            return lock(true);
        };
        if mode == WaitMode::Blocking && sys::unblock_signal(sig).is_err() {
            return lock(true);
        }
        let w = Arc::new(Waiter {
            caller,
            // A polled wait needs no signal: it sees the flag between tries.
            thread: if mode == WaitMode::Blocking {
                sys::gettid()
            } else {
                0
            },
            cancelled: AtomicBool::new(false),
            strikes: AtomicU64::new(0),
        });
        let key = {
            let (lock, cv) = &*self.inner;
            let mut g = lock.lock();
            g.next += 1;
            let key = g.next;
            g.waiters.insert(key, Arc::clone(&w));
            if !g.watching {
                g.watching = true;
                let inner = Arc::clone(&self.inner);
                let spawned = std::thread::Builder::new()
                    .name("lock-watch".into())
                    .spawn(move || watch(inner, sig));
                if let Err(e) = spawned {
                    g.watching = false;
                    tracing::error!(error = %e, "cannot start the lock-wait watcher");
                }
            }
            cv.notify_one();
            key
        };
        let mut pause = Duration::from_millis(1);
        let r = loop {
            if w.cancelled.load(Ordering::SeqCst) {
                break Err(Errno(libc::EINTR));
            }
            match (mode, lock(mode == WaitMode::Blocking)) {
                // Our own wakeup (or a stray signal): look again.
                (_, Err(Errno(libc::EINTR))) => continue,
                (WaitMode::Poll, Err(Errno(e))) if e == libc::EAGAIN || e == libc::EACCES => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(POLL_MAX);
                }
                (_, r) => break r,
            }
        };
        // Deregistered under the lock the watcher signals under: no signal
        // is sent to this thread after this.
        self.inner.0.lock().waiters.remove(&key);
        if w.cancelled.load(Ordering::SeqCst) && r.is_err() {
            tracing::debug!(caller, "lock wait interrupted");
        }
        r
    }
}

/// The signals pending for thread `tid` and not blocked by it; `None` if
/// the thread is gone.
fn pending_signals(tid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    Some((field("SigPnd:") | field("ShdPnd:")) & !field("SigBlk:"))
}

fn watch(inner: Arc<(Mutex<Inner>, Condvar)>, sig: i32) {
    let (lock, cv) = &*inner;
    let mut g = lock.lock();
    loop {
        if g.waiters.is_empty() {
            cv.wait(&mut g);
            continue;
        }
        cv.wait_for(&mut g, TICK);
        for w in g.waiters.values() {
            if !w.cancelled.load(Ordering::SeqCst) {
                let cancel = match pending_signals(w.caller) {
                    None => true,
                    Some(p) if p & SIGKILL_BIT != 0 => true,
                    Some(0) => {
                        w.strikes.store(0, Ordering::Relaxed);
                        false
                    }
                    Some(_) => w.strikes.fetch_add(1, Ordering::Relaxed) >= 1,
                };
                if !cancel {
                    continue;
                }
                w.cancelled.store(true, Ordering::SeqCst);
            }
            // Until the waiter has deregistered (again each tick: the first
            // may come before it is in the syscall).
            if w.thread != 0 {
                let _ = sys::signal_own_thread(w.thread, sig);
            }
        }
    }
}
