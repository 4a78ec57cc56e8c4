//! The FUSE-over-io_uring transport (kernel >= 6.14, `fuse.enable_uring=1`): per CPU queue,
//! a few threads, each with its own io_uring and one ring entry (header + payload buffers)
//! registered on the /dev/fuse connection. A completion is a request in the entry; it goes
//! through the same fuser dispatch as a request read from /dev/fuse (so `fs.rs` and the
//! adapter do not know which transport carried it), and its reply is written into the entry
//! and committed with the next fetch in one submission.
//!
//! A reply sent later from another thread (a blocking lock wait) parks its entry: the ring
//! thread registers a fresh entry so that its queue never runs out, and commits the parked
//! one when an eventfd says its reply is in. FORGET and INTERRUPT still arrive on /dev/fuse
//! (the kernel sends them there), so the /dev/fuse event loops keep running.
//!
//! What happens to the rings when the serving process dies, and why `transport=auto` keeps
//! /dev/fuse for now, is in [`crate::session::supervisor`] and the README ("Restarts and
//! upgrades"): on kernel 6.18, a request that sat in a dead process's ring entry is never
//! resent (`FUSE_NOTIFY_RESEND` only reaches /dev/fuse queues) and its caller waits for
//! good.

use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::fs::Passthrough;
use crate::fuse::FuseAdapter;
use crate::stats::Op;
use crate::sys::uring::{Completion, Entry, HEADER_LEN, Ring};

/// Which transport carries requests, as `status` and the log say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Dev,
    Uring,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Dev => "dev",
            Transport::Uring => "uring",
        }
    }
}

/// The `transport=` mount option.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Choice {
    /// /dev/fuse, for now (see [`AUTO_USES_URING`]).
    #[default]
    Auto,
    /// FUSE-over-io_uring when the kernel allows it, else /dev/fuse (logged).
    Uring,
    /// /dev/fuse.
    Dev,
}

impl Choice {
    pub fn parse(s: &str) -> Option<Choice> {
        match s {
            "auto" => Some(Choice::Auto),
            "uring" | "io_uring" => Some(Choice::Uring),
            "dev" => Some(Choice::Dev),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Choice::Auto => "auto",
            Choice::Uring => "uring",
            Choice::Dev => "dev",
        }
    }

    /// Ask the kernel for the rings at INIT.
    pub fn wants_uring(self) -> bool {
        match self {
            Choice::Auto => AUTO_USES_URING,
            Choice::Uring => true,
            Choice::Dev => false,
        }
    }
}

/// Whether `transport=auto` asks for the rings. No: on kernel 6.18 a request that a killed
/// serving process held in a ring entry is never answered (its caller waits for good), where
/// /dev/fuse hands it to the next server (`FUSE_NOTIFY_RESEND`); the promise that Nova does
/// not notice a crash or an upgrade outranks a faster metadata path.
pub const AUTO_USES_URING: bool = false;

/// The transport this process serves with, for the run file (`status`).
static CURRENT: Mutex<&'static str> = Mutex::new("dev");

pub fn set_current(t: Transport) {
    *CURRENT.lock() = t.name();
}

pub fn current() -> &'static str {
    *CURRENT.lock()
}

/// The module parameter that allows FUSE-over-io_uring.
pub const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether this kernel has FUSE-over-io_uring and whether it is allowed now.
pub fn kernel_allows() -> Option<bool> {
    let s = std::fs::read_to_string(ENABLE_PARAM).ok()?;
    Some(matches!(s.trim(), "Y" | "y" | "1"))
}

/// Number of CPU queues the kernel makes: one per possible CPU.
pub fn possible_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let mut n = 0;
    for part in s.trim().split(',') {
        let mut it = part.split('-');
        let a: Option<usize> = it.next().and_then(|x| x.parse().ok());
        let b: Option<usize> = it.next().and_then(|x| x.parse().ok());
        match (a, b) {
            (Some(a), Some(b)) => n = n.max(b + 1).max(a + 1),
            (Some(a), None) => n = n.max(a + 1),
            _ => {}
        }
    }
    n.max(1)
}

/// Payload buffer size: the largest request or reply the connection allows (max_write is
/// set to this at INIT when the ring is asked for).
pub const PAYLOAD: usize = 1 << 20;

/// Requests served through the rings, and requests being dispatched from them now (a
/// hand-over waits for 0).
#[derive(Default)]
pub struct RingStats {
    pub busy: AtomicUsize,
    pub served: AtomicU64,
}

/// Where a ring request's reply goes: the entry, until the reply is written into it.
#[derive(Debug)]
struct Slot {
    state: Mutex<SlotState>,
    qid: u16,
    commit_id: u64,
}

#[derive(Debug)]
struct SlotState {
    entry: Option<Entry>,
    replied: bool,
    /// The ring thread moved on: whoever replies hands the entry back through `park`.
    parked: Option<Arc<Parked>>,
}

/// Parked entries whose reply is in, for their ring thread to commit.
#[derive(Debug)]
struct Parked {
    done: Mutex<Vec<(Entry, u16, u64)>>,
    wake: OwnedFd,
}

impl fuser::ExternalReply for Slot {
    fn send(&self, data: &[IoSlice<'_>]) -> std::io::Result<()> {
        let mut st = self.state.lock();
        if st.replied {
            return Err(std::io::Error::from_raw_os_error(libc::EALREADY));
        }
        let Some(e) = st.entry.as_mut() else {
            return Err(std::io::Error::from_raw_os_error(libc::ENOTCONN));
        };
        write_reply(e, data)?;
        st.replied = true;
        if let Some(p) = st.parked.take() {
            if let Some(e) = st.entry.take() {
                p.done.lock().push((e, self.qid, self.commit_id));
                crate::sys::uring::eventfd_signal(p.wake.as_fd())?;
            }
        }
        Ok(())
    }
}

/// Copy a /dev/fuse-style reply (out header, then body) into the entry.
fn write_reply(e: &mut Entry, data: &[IoSlice<'_>]) -> std::io::Result<()> {
    let total: usize = data.iter().map(|s| s.len()).sum();
    if total < 16 || total - 16 > e.payload().len() {
        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
    }
    let (mut hdr, mut pay) = (0usize, 0usize);
    for s in data {
        let mut b: &[u8] = s;
        if hdr < 16 {
            let n = (16 - hdr).min(b.len());
            e.header_mut()[hdr..hdr + n].copy_from_slice(&b[..n]);
            hdr += n;
            b = &b[n..];
        }
        e.payload_mut()[pay..pay + b.len()].copy_from_slice(b);
        pay += b.len();
    }
    // The out header's `len` covers what the kernel reads from the payload too.
    e.header_mut()[0..4].copy_from_slice(&(total as u32).to_le_bytes());
    e.set_payload_size(pay as u32);
    Ok(())
}

/// An error reply (a request that could not be parsed).
fn write_error(e: &mut Entry, unique: u64, errno: i32) {
    let h = e.header_mut();
    h[0..4].copy_from_slice(&16u32.to_le_bytes());
    h[4..8].copy_from_slice(&(-errno).to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    e.set_payload_size(0);
}

/// Rebuild the request as /dev/fuse would deliver it: `fuse_in_header`, the per-opcode
/// header (from `op_in`; its size is what `len` leaves after the payload), the payload.
fn request_bytes(e: &Entry, buf: &mut Vec<u8>) -> bool {
    let h = e.header();
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let payload = e.payload_size();
    if payload > e.payload().len() || len < 40 + payload || len - 40 - payload > 128 {
        return false;
    }
    let op = len - 40 - payload;
    buf.clear();
    buf.extend_from_slice(&h[..40]);
    buf.extend_from_slice(&e.op_in()[..op]);
    buf.extend_from_slice(&e.payload()[..payload]);
    true
}

/// Start the ring threads: `per_queue` threads for each CPU queue. Returns once every
/// thread's first entry is registered (then the kernel serves every request after INIT
/// through the rings), or the first error (then nothing was registered on at least one
/// queue, and the kernel keeps using /dev/fuse).
pub fn start(
    fuse: &OwnedFd,
    dispatcher: fuser::Dispatcher<FuseAdapter>,
    per_queue: usize,
    stats: Arc<Passthrough>,
    ring_stats: Arc<RingStats>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let queues = possible_cpus();
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let mut threads = Vec::new();
    for qid in 0..queues {
        for t in 0..per_queue.max(1) {
            let fuse = fuse
                .try_clone()
                .map_err(|e| format!("cannot duplicate the FUSE descriptor: {e}"))?;
            let (d, tx, stats, rs) = (
                dispatcher.clone(),
                tx.clone(),
                Arc::clone(&stats),
                Arc::clone(&ring_stats),
            );
            let h = std::thread::Builder::new()
                .name(format!("uring-{qid}.{t}"))
                .spawn(move || serve_queue(qid as u16, fuse, d, tx, stats, rs))
                .map_err(|e| format!("cannot start a ring thread: {e}"))?;
            threads.push(h);
        }
    }
    drop(tx);
    for _ in 0..threads.len() {
        let r = match rx.recv() {
            Ok(r) => r,
            Err(_) => Err("a ring thread ended before it registered".into()),
        };
        if let Err(e) = r {
            turn_off(fuse);
            return Err(e);
        }
    }
    Ok(threads)
}

/// After a failure with some queues registered: make the kernel give up the rings for
/// this connection (it waits for every queue before it sends a request otherwise). A
/// REGISTER it refuses does that; one for a queue that does not exist is always refused.
fn turn_off(fuse: &OwnedFd) {
    let r = fuse.try_clone().and_then(|f| {
        let mut ring = Ring::new(f, 2)?;
        let e = ring.new_entry(PAYLOAD)?;
        ring.register(e, u16::MAX)?;
        ring.submit(&mut Vec::new())
    });
    if let Err(e) = r {
        tracing::error!(error = %e, "cannot turn the rings off: requests may wait");
    }
}

fn serve_queue(
    qid: u16,
    fuse: OwnedFd,
    d: fuser::Dispatcher<FuseAdapter>,
    ready: mpsc::Sender<Result<(), String>>,
    stats: Arc<Passthrough>,
    rs: Arc<RingStats>,
) {
    // Requests come to a queue from its CPU: serve them there.
    let _ = crate::sys::uring::pin_to_cpu(qid as usize);
    let setup = || -> Result<(Ring, Arc<Parked>), String> {
        let mut ring = Ring::new(fuse, 64).map_err(|e| format!("io_uring_setup: {e}"))?;
        let wake = crate::sys::uring::eventfd().map_err(|e| format!("eventfd: {e}"))?;
        let parked = Arc::new(Parked {
            done: Mutex::new(Vec::new()),
            wake,
        });
        ring.poll(parked.wake.as_fd(), 0)
            .map_err(|e| format!("io_uring poll: {e}"))?;
        let e = ring
            .new_entry(PAYLOAD)
            .map_err(|e| format!("ring buffers: {e}"))?;
        ring.register(e, qid)
            .map_err(|e| format!("ring register: {e}"))?;
        Ok((ring, parked))
    };
    let (mut ring, parked) = match setup() {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut out = Vec::new();
    // The registration is submitted now: an error comes back at once; success shows only
    // when a request arrives.
    if let Err(e) = ring.submit(&mut out) {
        let _ = ready.send(Err(format!("io_uring_enter: {e}")));
        return;
    }
    for c in &out {
        if let Completion::Entry(_, Err(err)) = c {
            let _ = ready.send(Err(format!("FUSE_IO_URING_CMD_REGISTER: {err}")));
            return;
        }
    }
    let _ = ready.send(Ok(()));
    drop(ready);
    let mut buf = Vec::with_capacity(PAYLOAD + HEADER_LEN);
    loop {
        if out.is_empty() {
            if let Err(e) = ring.submit_and_wait(&mut out) {
                tracing::error!(qid, error = %e, "ring thread stops");
                return;
            }
        }
        for c in std::mem::take(&mut out) {
            match c {
                Completion::Entry(_, Err(err)) => {
                    // ENOTCONN/ECONNABORTED: unmounted or aborted; the entry is gone.
                    tracing::debug!(qid, error = %err, "ring entry ended");
                }
                Completion::Entry(mut e, Ok(())) => {
                    let commit_id = e.commit_id();
                    rs.busy.fetch_add(1, Ordering::SeqCst);
                    if !request_bytes(&e, &mut buf) {
                        tracing::error!(qid, "malformed ring request");
                        write_error(&mut e, commit_id, libc::EIO);
                        let _ = ring.commit(e, qid, commit_id);
                        rs.busy.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    stats.stats.count(Op::UringRequests);
                    rs.served.fetch_add(1, Ordering::Relaxed);
                    let slot = Arc::new(Slot {
                        state: Mutex::new(SlotState {
                            entry: Some(e),
                            replied: false,
                            parked: None,
                        }),
                        qid,
                        commit_id,
                    });
                    if !d.dispatch(&buf, slot.clone()) {
                        let mut st = slot.state.lock();
                        if let Some(e) = st.entry.as_mut() {
                            write_error(e, commit_id, libc::EIO);
                        }
                        st.replied = true;
                    }
                    let mut st = slot.state.lock();
                    if st.replied {
                        if let Some(e) = st.entry.take() {
                            drop(st);
                            if let Err(err) = ring.commit(e, qid, commit_id) {
                                tracing::error!(qid, error = %err, "cannot commit a ring reply");
                            }
                        }
                    } else {
                        // Answered later from another thread: keep the queue served meanwhile.
                        st.parked = Some(Arc::clone(&parked));
                        drop(st);
                        match ring.new_entry(PAYLOAD) {
                            Ok(fresh) => {
                                if let Err(err) = ring.register(fresh, qid) {
                                    tracing::error!(qid, error = %err, "cannot add a ring entry");
                                }
                            }
                            Err(err) => {
                                tracing::error!(qid, error = %err, "cannot add a ring entry")
                            }
                        }
                    }
                    rs.busy.fetch_sub(1, Ordering::SeqCst);
                }
                Completion::Poll(_, _) => {
                    crate::sys::uring::eventfd_drain(parked.wake.as_fd());
                    let done: Vec<_> = std::mem::take(&mut *parked.done.lock());
                    for (e, q, id) in done {
                        if let Err(err) = ring.commit(e, q, id) {
                            tracing::error!(qid, error = %err, "cannot commit a ring reply");
                        }
                    }
                    if let Err(err) = ring.poll(parked.wake.as_fd(), 0) {
                        tracing::error!(qid, error = %err, "cannot re-arm the ring's wake-up");
                    }
                }
            }
        }
        if ring.inflight() == 0 && parked.done.lock().is_empty() {
            // Every entry ended (unmount): this thread is done.
            return;
        }
    }
}

/// After a restart: requests that arrived while no entry was registered wait in their
/// queue until an entry of that queue commits (a new registration does not fetch them).
/// One request made on each CPU gets every queue going again.
pub fn kick_queues(mountpoint: &std::path::Path) {
    for cpu in 0..possible_cpus() {
        let mp = mountpoint.to_path_buf();
        let _ = std::thread::Builder::new()
            .name(format!("uring-kick-{cpu}"))
            .spawn(move || {
                if crate::sys::uring::pin_to_cpu(cpu).is_ok() {
                    let _ = crate::sys::uring::statx_sync(&mp);
                }
            });
    }
}
