use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use nix::errno::Errno;

use crate::dev_fuse::DevFuse;
use crate::passthrough::BackingId;

/// A raw communication channel to the FUSE kernel driver
#[derive(Debug, Clone)]
pub(crate) struct Channel(Arc<DevFuse>);

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Channel {
    /// Create a new communication channel to the kernel driver by mounting the
    /// given path. The kernel driver will delegate filesystem operations of
    /// the given path to the channel.
    pub(crate) fn new(device: Arc<DevFuse>) -> Self {
        Self(device)
    }

    /// Receives data up to the capacity of the given buffer (can block).
    fn receive(&self, buffer: &mut [u8]) -> nix::Result<usize> {
        nix::unistd::read(&self.0, buffer)
    }

    /// Receives data up to the capacity of the given buffer (can block),
    /// retrying on errors that are safe to retry (ENOENT, EINTR, EAGAIN).
    ///
    /// - ENOENT: Operation interrupted. According to FUSE, this is safe to retry.
    /// - EINTR: Interrupted system call, retry.
    /// - EAGAIN: Explicitly instructed to try again.
    pub(crate) fn receive_retrying(&self, buffer: &mut [u8]) -> nix::Result<usize> {
        loop {
            match self.receive(buffer) {
                Ok(size) => return Ok(size),
                Err(Errno::ENOENT | Errno::EINTR | Errno::EAGAIN) => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// Returns a sender object for this channel. The sender object can be
    /// used to send to the channel. Multiple sender objects can be used
    /// and they can safely be sent to other threads.
    pub(crate) fn sender(&self) -> ChannelSender {
        // Since write/writev syscalls are threadsafe, we can simply create
        // a sender by using the same file and use it in other threads.
        ChannelSender(self.0.clone())
    }

    /// Clone the FUSE device fd using FUSE_DEV_IOC_CLONE ioctl.
    ///
    /// This creates a new fd that can read FUSE requests independently,
    /// enabling true parallel request processing. The kernel distributes
    /// requests across all cloned fds.
    ///
    /// Requires Linux 4.5+. Returns an error on older kernels or non-Linux.
    #[cfg(target_os = "linux")]
    pub(crate) fn clone_fd(&self) -> io::Result<Channel> {
        use std::os::fd::AsRawFd;

        let new_dev = DevFuse::open()?;

        let mut source_fd = self.0.as_raw_fd() as u32;
        // SAFETY: fuse_dev_ioc_clone is a valid ioctl for /dev/fuse
        unsafe {
            crate::ll::ioctl::fuse_dev_ioc_clone(new_dev.as_raw_fd(), &mut source_fd)?;
        }

        Ok(Channel::new(Arc::new(new_dev)))
    }
}

#[derive(Clone, Debug)]
pub(crate) struct ChannelSender(Arc<DevFuse>);

impl ChannelSender {
    pub(crate) fn send(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<()> {
        let rc = nix::sys::uio::writev(&self.0, bufs)?;
        // writev is atomic, so do not need to check how many bytes are written.
        // libfuse does not do it either
        // https://github.com/libfuse/libfuse/blob/6278995cca991978abd25ebb2c20ebd3fc9e8a13/lib/fuse_lowlevel.c#L267
        debug_assert_eq!(bufs.iter().map(|b| b.len()).sum::<usize>(), rc);
        Ok(())
    }

    /// Reply to request `unique` with `len` bytes of `file` from `offset` (fewer at the end
    /// of the file), moved with splice(2) and never copied into this process: the payload
    /// goes into one pipe, the header into a second, the payload after it (pipe to pipe
    /// moves page references), and the whole message into the FUSE device at once.
    /// Returns the payload's length. On an error nothing was sent, and the caller may still
    /// answer the request otherwise.
    pub(crate) fn splice_reply(
        &self,
        unique: u64,
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        SPLICE_PIPES.with(|cell| {
            let mut slot = cell.borrow_mut();
            let r = splice_reply_through(&mut slot, &self.0, unique, file, offset, len);
            match &r {
                // Too large for this thread's pipes: nothing was put in them.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {}
                // Whatever is left in the pipes goes with them.
                Err(_) => *slot = None,
                Ok(_) => {}
            }
            r
        })
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId> {
        BackingId::create(&self.0, fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        unsafe { BackingId::wrap_raw(&self.0, id) }
    }
}

/// A serving thread's two pipes for spliced replies, and how many bytes each holds.
struct SplicePipes {
    data: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    msg: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    capacity: usize,
    /// They could not be made as large as asked: larger ones cannot be made either.
    capped: bool,
}

thread_local! {
    static SPLICE_PIPES: std::cell::RefCell<Option<SplicePipes>> =
        const { std::cell::RefCell::new(None) };
}

fn splice_pipes(slot: &mut Option<SplicePipes>, need: usize) -> io::Result<&SplicePipes> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    match slot.as_ref() {
        Some(p) if p.capacity < need && p.capped => {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Some(p) if p.capacity < need => *slot = None,
        _ => {}
    }
    if slot.is_none() {
        let data = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let msg = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // A page per pipe buffer, one more for an unaligned start, one for the header.
        let want = (need.div_ceil(4096) + 2) * 4096;
        // Past /proc/sys/fs/pipe-max-size (1 MiB by default) only with CAP_SYS_RESOURCE
        // (EPERM): then as large as that allows, and a reply too large for it is copied
        // (ENOSPC, below) while smaller ones still splice.
        let size = |fd| {
            fcntl(fd, FcntlArg::F_SETPIPE_SZ(want as i32))
                .or_else(|_| fcntl(fd, FcntlArg::F_SETPIPE_SZ(1 << 20)))
                .unwrap_or(16 * 4096)
        };
        let (a, b) = (size(&data.1), size(&msg.1));
        *slot = Some(SplicePipes {
            data,
            msg,
            capacity: (a.min(b) as usize).saturating_sub(2 * 4096),
            capped: (a.min(b) as usize) < want,
        });
    }
    match slot.as_ref() {
        Some(p) if p.capacity >= need => Ok(p),
        _ => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
    }
}

fn splice_reply_through(
    slot: &mut Option<SplicePipes>,
    dev: &DevFuse,
    unique: u64,
    file: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    use nix::fcntl::{SpliceFFlags, splice};
    let p = splice_pipes(slot, len)?;
    let nb = SpliceFFlags::SPLICE_F_NONBLOCK;
    // The payload: as much of `len` as the file has.
    let mut off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut n = 0usize;
    while n < len {
        match splice(file, Some(&mut off), &p.data.1, None, len - n, nb) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // The header, then the payload moved behind it.
    let total = 16 + n;
    let mut head = [0u8; 16];
    head[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
    head[8..16].copy_from_slice(&unique.to_ne_bytes());
    if nix::unistd::write(&p.msg.1, &head)? != head.len() {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    let mut moved = 0usize;
    while moved < n {
        match splice(&p.data.0, None, &p.msg.1, None, n - moved, nb) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(k) => moved += k,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // The kernel takes a reply whole, from one splice.
    match splice(&p.msg.0, None, dev, None, total, SpliceFFlags::empty()) {
        Ok(k) if k == total => Ok(n),
        Ok(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        Err(e) => Err(e.into()),
    }
}
