//! FUSE-over-io_uring, the raw part: one io_uring instance (SQE128, single issuer, task
//! work deferred to `io_uring_enter`) and the FUSE ring entries registered through it, behind
//! a safe API. Part of the one unsafe room ([`crate::sys`]).
//!
//! Written from the kernel's uapi (`include/uapi/linux/io_uring.h`, `linux/fuse.h`) and
//! `fs/fuse/dev_uring.c` (6.14+); no io_uring crate, so that every `unsafe` stays here.
//!
//! Ownership of an entry's buffers is the whole safety argument: an [`Entry`] value is
//! either held by the caller (the kernel has handed it a request and waits for a commit, so
//! it does not touch the buffers) or consumed by [`Ring::register`]/[`Ring::commit`] and kept
//! inside the [`Ring`] until its completion is reaped (only then may the kernel write them,
//! and only inside `io_uring_enter`, because task work is deferred to it). The buffers are
//! never unmapped: the kernel keeps their addresses in its entries for the life of the
//! connection, so they live as long as the process.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use super::cvt;

/// `struct fuse_uring_req_header`: 128 bytes `in_out`, 128 bytes `op_in`, 32 bytes
/// `fuse_uring_ent_in_out`.
pub const HEADER_LEN: usize = 288;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;

const IORING_SETUP_CQSIZE: u32 = 1 << 3;
const IORING_SETUP_SQE128: u32 = 1 << 10;
const IORING_SETUP_SINGLE_ISSUER: u32 = 1 << 12;
const IORING_SETUP_DEFER_TASKRUN: u32 = 1 << 13;
const IORING_FEAT_SINGLE_MMAP: u32 = 1 << 0;
const IORING_OFF_SQ_RING: i64 = 0;
const IORING_OFF_CQ_RING: i64 = 0x800_0000;
const IORING_OFF_SQES: i64 = 0x1000_0000;
const IORING_ENTER_GETEVENTS: u32 = 1;
const IORING_OP_POLL_ADD: u8 = 6;
const IORING_OP_URING_CMD: u8 = 46;
const SQE_LEN: usize = 128;
const CQE_LEN: usize = 16;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// `user_data` of a poll: the top bit set (entries use their index).
const POLL_BIT: u64 = 1 << 63;

#[repr(C)]
#[derive(Default)]
struct SqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqOffsets,
    cq_off: CqOffsets,
}

/// A shared mapping that is unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

/// A fresh read-write mapping of `len` bytes (`fd` -1 for anonymous memory).
fn mmap(len: usize, flags: i32, fd: i32, offset: i64) -> io::Result<*mut u8> {
    // SAFETY: a new mapping at an address the kernel picks (no existing memory is
    // touched); checked for MAP_FAILED.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(ptr.cast())
}

impl Map {
    /// The ring's own memory, shared with the kernel.
    fn new(fd: BorrowedFd<'_>, len: usize, offset: i64) -> io::Result<Map> {
        let flags = libc::MAP_SHARED | libc::MAP_POPULATE;
        let ptr = mmap(len, flags, fd.as_raw_fd(), offset)?;
        Ok(Map { ptr, len })
    }

    /// The u32 at byte `off` (a ring index shared with the kernel).
    fn atomic(&self, off: u32) -> &AtomicU32 {
        assert!(off as usize + 4 <= self.len);
        // SAFETY: in bounds, 4-aligned (the kernel's offsets are), and only ever accessed
        // atomically by this process and the kernel.
        unsafe { &*self.ptr.add(off as usize).cast::<AtomicU32>() }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// One FUSE ring entry: a header buffer and a payload buffer registered with the kernel.
/// Holding it means the kernel waits for its commit and leaves the buffers alone.
#[derive(Debug)]
pub struct Entry {
    index: u32,
    header: *mut u8,
    payload: *mut u8,
    payload_len: usize,
    /// The iovecs the kernel reads at REGISTER (kept at a stable address).
    iov: *mut libc::iovec,
}

// SAFETY: an `Entry` is the unique handle to its buffers (never cloned); moving it to another
// thread moves that exclusive access with it.
unsafe impl Send for Entry {}

impl Entry {
    /// Map never-freed buffers for a new entry (see the module comment).
    fn new(index: u32, payload_len: usize) -> io::Result<Entry> {
        let page = 4096;
        let head_len = page; // header + the two iovecs, one page
        let len = head_len + payload_len.div_ceil(page) * page;
        let base = mmap(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)?;
        // SAFETY: all three are inside the mapping: header at 0, iovecs at 512 (aligned),
        // payload from one page on.
        let (header, iov, payload) = unsafe {
            (
                base,
                base.add(512).cast::<libc::iovec>(),
                base.add(head_len),
            )
        };
        // SAFETY: `iov` points at two iovecs' worth of our own, suitably aligned memory.
        unsafe {
            iov.write(libc::iovec {
                iov_base: header.cast(),
                iov_len: HEADER_LEN,
            });
            iov.add(1).write(libc::iovec {
                iov_base: payload.cast(),
                iov_len: payload_len,
            });
        }
        Ok(Entry {
            index,
            header,
            payload,
            payload_len,
            iov,
        })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The header buffer (`fuse_uring_req_header`).
    pub fn header(&self) -> &[u8] {
        // SAFETY: HEADER_LEN bytes of our mapping; exclusive by ownership of `self`.
        unsafe { std::slice::from_raw_parts(self.header, HEADER_LEN) }
    }

    pub fn header_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `header`, and `&mut self` makes it unique.
        unsafe { std::slice::from_raw_parts_mut(self.header, HEADER_LEN) }
    }

    /// The payload buffer, whole.
    pub fn payload(&self) -> &[u8] {
        // SAFETY: payload_len bytes of our mapping; exclusive by ownership of `self`.
        unsafe { std::slice::from_raw_parts(self.payload, self.payload_len) }
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `payload`, and `&mut self` makes it unique.
        unsafe { std::slice::from_raw_parts_mut(self.payload, self.payload_len) }
    }

    /// `fuse_uring_ent_in_out.commit_id` and `.payload_sz` as the kernel wrote them.
    pub fn commit_id(&self) -> u64 {
        u64_at(self.header(), ENT_IN_OUT + 8)
    }

    pub fn payload_size(&self) -> usize {
        u32_at(self.header(), ENT_IN_OUT + 16) as usize
    }

    /// The per-opcode header area (`op_in`).
    pub fn op_in(&self) -> &[u8] {
        &self.header()[OP_IN..OP_IN + 128]
    }

    /// Say how many payload bytes the reply has.
    pub fn set_payload_size(&mut self, n: u32) {
        let h = self.header_mut();
        h[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&n.to_le_bytes());
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// What a completion was for.
#[derive(Debug)]
pub enum Completion {
    /// An entry's REGISTER or COMMIT_AND_FETCH completed: on `Ok`, the kernel put a request
    /// in it; on `Err`, the entry is out of the kernel's hands for good (teardown, errors).
    Entry(Entry, io::Result<()>),
    /// A poll armed with [`Ring::poll`] fired (or failed).
    Poll(u64, i32),
}

/// One io_uring instance serving FUSE ring entries of a /dev/fuse connection. Must be used
/// by the thread that created it (single issuer).
pub struct Ring {
    fd: OwnedFd,
    fuse: OwnedFd,
    sq: Map,
    cq: Option<Map>,
    sqes: Map,
    p: Params,
    /// Entries in the kernel's hands, by index.
    inflight: HashMap<u32, Entry>,
    next_index: u32,
    queued: u32,
}

// SAFETY: the raw pointers are to our own mappings; the ring is used by one thread at a time
// (the single-issuer flag makes the kernel refuse any other thread's submissions).
unsafe impl Send for Ring {}

impl Ring {
    /// A ring with room for `depth` submissions, on the /dev/fuse connection `fuse`.
    pub fn new(fuse: OwnedFd, depth: u32) -> io::Result<Ring> {
        let mut p = Params {
            flags: IORING_SETUP_SQE128
                | IORING_SETUP_SINGLE_ISSUER
                | IORING_SETUP_DEFER_TASKRUN
                | IORING_SETUP_CQSIZE,
            cq_entries: depth * 2,
            ..Params::default()
        };
        // SAFETY: io_uring_setup reads and fills `p`, a correctly laid out io_uring_params.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_io_uring_setup,
                depth,
                &mut p as *mut Params as *mut libc::c_void,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if p.features & IORING_FEAT_SINGLE_MMAP == 0 {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
        let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * CQE_LEN;
        let sq = Map::new(
            std::os::fd::AsFd::as_fd(&fd),
            sq_len.max(cq_len),
            IORING_OFF_SQ_RING,
        )?;
        let _ = IORING_OFF_CQ_RING; // one mapping for both rings (IORING_FEAT_SINGLE_MMAP)
        let sqes = Map::new(
            std::os::fd::AsFd::as_fd(&fd),
            p.sq_entries as usize * SQE_LEN,
            IORING_OFF_SQES,
        )?;
        Ok(Ring {
            fd,
            fuse,
            sq,
            cq: None,
            sqes,
            p,
            inflight: HashMap::new(),
            next_index: 0,
            queued: 0,
        })
    }

    /// A new entry with a payload buffer of `payload_len` bytes (at least the connection's
    /// max_write), not yet registered.
    pub fn new_entry(&mut self, payload_len: usize) -> io::Result<Entry> {
        let e = Entry::new(self.next_index, payload_len)?;
        self.next_index += 1;
        Ok(e)
    }

    fn cq(&self) -> &Map {
        self.cq.as_ref().unwrap_or(&self.sq)
    }

    /// Fill the next SQE (zeroed, then `fill`); submitted by the next [`Ring::submit`].
    fn push(&mut self, fill: impl FnOnce(&mut [u8; SQE_LEN])) -> io::Result<()> {
        let mask = self
            .sq
            .atomic(self.p.sq_off.ring_mask)
            .load(Ordering::Relaxed);
        let head = self.sq.atomic(self.p.sq_off.head).load(Ordering::Acquire);
        let tail = self.sq.atomic(self.p.sq_off.tail).load(Ordering::Relaxed);
        if tail.wrapping_sub(head) >= self.p.sq_entries {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let idx = tail & mask;
        let mut sqe = [0u8; SQE_LEN];
        fill(&mut sqe);
        // SAFETY: `idx` < sq_entries, so the SQE slot and the array slot are inside their
        // mappings; the kernel reads them only after the tail store below.
        unsafe {
            std::ptr::copy_nonoverlapping(
                sqe.as_ptr(),
                self.sqes.ptr.add(idx as usize * SQE_LEN),
                SQE_LEN,
            );
            self.sq
                .ptr
                .add(self.p.sq_off.array as usize + idx as usize * 4)
                .cast::<u32>()
                .write(idx);
        }
        self.sq
            .atomic(self.p.sq_off.tail)
            .store(tail.wrapping_add(1), Ordering::Release);
        self.queued += 1;
        Ok(())
    }

    fn push_cmd(&mut self, e: Entry, op: u32, qid: u16, commit_id: u64) -> io::Result<()> {
        let fuse = self.fuse.as_raw_fd();
        let (index, iov) = (e.index, e.iov as u64);
        let r = self.push(|s| {
            s[0] = IORING_OP_URING_CMD;
            s[4..8].copy_from_slice(&fuse.to_le_bytes());
            s[8..12].copy_from_slice(&op.to_le_bytes()); // cmd_op
            s[16..24].copy_from_slice(&iov.to_le_bytes()); // addr
            s[24..28].copy_from_slice(&2u32.to_le_bytes()); // len: 2 iovecs
            s[32..40].copy_from_slice(&u64::from(index).to_le_bytes()); // user_data
            // struct fuse_uring_cmd_req at the command area (byte 48)
            s[56..64].copy_from_slice(&commit_id.to_le_bytes());
            s[64..66].copy_from_slice(&qid.to_le_bytes());
        });
        match r {
            Ok(()) => {
                self.inflight.insert(index, e);
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Give `e` to the kernel for queue `qid` (FUSE_IO_URING_CMD_REGISTER).
    pub fn register(&mut self, e: Entry, qid: u16) -> io::Result<()> {
        self.push_cmd(e, FUSE_IO_URING_CMD_REGISTER, qid, 0)
    }

    /// Answer the request in `e` (its header's `in_out` holds the `fuse_out_header`, its
    /// payload the rest, [`Entry::set_payload_size`] said how much) and take the next
    /// (FUSE_IO_URING_CMD_COMMIT_AND_FETCH).
    pub fn commit(&mut self, e: Entry, qid: u16, commit_id: u64) -> io::Result<()> {
        self.push_cmd(e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, qid, commit_id)
    }

    /// Arm a one-shot poll for input on `fd`; completes as `Completion::Poll(token, _)`.
    pub fn poll(&mut self, fd: BorrowedFd<'_>, token: u32) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        self.push(|s| {
            s[0] = IORING_OP_POLL_ADD;
            s[4..8].copy_from_slice(&raw.to_le_bytes());
            s[28..32].copy_from_slice(&(libc::POLLIN as u32).to_le_bytes());
            s[32..40].copy_from_slice(&(POLL_BIT | u64::from(token)).to_le_bytes());
        })
    }

    /// Submit what was queued and wait until at least one completion is there; return
    /// them all.
    pub fn submit_and_wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.enter(out, 1)
    }

    /// Submit what was queued without waiting; return the completions already there (an
    /// error from a REGISTER comes back at once, a request only when one arrives).
    pub fn submit(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.enter(out, 0)
    }

    fn enter(&mut self, out: &mut Vec<Completion>, wait: u32) -> io::Result<()> {
        loop {
            let to_submit = self.queued;
            // SAFETY: plain syscall on our ring descriptor; no signal mask argument.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd.as_raw_fd(),
                    to_submit,
                    wait,
                    IORING_ENTER_GETEVENTS,
                    std::ptr::null::<libc::c_void>(),
                    0usize,
                )
            };
            match cvt(r as libc::c_int) {
                Ok(n) => {
                    self.queued -= (n as u32).min(self.queued);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return Err(e),
            }
            self.reap(out);
            if !out.is_empty() || (wait == 0 && self.queued == 0) {
                return Ok(());
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let (head_off, tail_off, mask_off, cqes_off) = (
            self.p.cq_off.head,
            self.p.cq_off.tail,
            self.p.cq_off.ring_mask,
            self.p.cq_off.cqes,
        );
        let mask = self.cq().atomic(mask_off).load(Ordering::Relaxed);
        let mut head = self.cq().atomic(head_off).load(Ordering::Relaxed);
        let tail = self.cq().atomic(tail_off).load(Ordering::Acquire);
        while head != tail {
            let at = cqes_off as usize + (head & mask) as usize * CQE_LEN;
            let mut cqe = [0u8; CQE_LEN];
            assert!(at + CQE_LEN <= self.cq().len);
            // SAFETY: in bounds (checked); the kernel published this CQE before `tail`.
            unsafe {
                std::ptr::copy_nonoverlapping(self.cq().ptr.add(at), cqe.as_mut_ptr(), CQE_LEN);
            }
            let user_data = u64_at(&cqe, 0);
            let res = i32::from_le_bytes([cqe[8], cqe[9], cqe[10], cqe[11]]);
            if user_data & POLL_BIT != 0 {
                out.push(Completion::Poll(user_data & !POLL_BIT, res));
            } else if let Some(e) = self.inflight.remove(&(user_data as u32)) {
                let r = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(())
                };
                out.push(Completion::Entry(e, r));
            }
            head = head.wrapping_add(1);
        }
        self.cq().atomic(head_off).store(head, Ordering::Release);
    }

    /// Entries in the kernel's hands.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }
}

// No `Drop` for `Ring` beyond its fields': entries still registered keep their buffers,
// which are never unmapped (see the module comment); `Entry` has no `Drop` either.

/// An eventfd, to wake a ring's thread from another thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall returning a new descriptor.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add 1 to an eventfd's counter.
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a valid buffer.
    let r = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
    Ok(())
}

/// Reset an eventfd's counter.
pub fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a valid buffer.
    unsafe {
        libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8);
    }
}

/// Pin the calling thread to one CPU (a FUSE ring queue serves the requests made on its CPU).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for
    // cpu < CPU_SETSIZE (checked).
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        cvt(libc::sched_setaffinity(
            0,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        ))?;
    }
    Ok(())
}

/// `statx` with `AT_STATX_FORCE_SYNC`: on FUSE, always a GETATTR request.
pub fn statx_sync(path: &std::path::Path) -> io::Result<()> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = std::mem::MaybeUninit::<libc::statx>::uninit();
    // SAFETY: valid C string and an out buffer of the right type.
    cvt(unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BASIC_STATS,
            buf.as_mut_ptr(),
        )
    })?;
    Ok(())
}
