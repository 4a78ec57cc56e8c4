//! The inode store: FUSE node ids mapped to backing inodes.
//!
//! An inode is known by its backing `(dev, ino)`, never by a path string, so a
//! rename by another compute node or a symlink inside the tree can never make
//! the daemon act on a different file. The FUSE node id, which is also the
//! inode number `stat` shows (fuser gives the kernel one number for both), is
//! the backing inode number, so the real numbers show and hard links share
//! one, GlusterFS's numbers >= 2^62 included. Made-up ids (counted from 2^62,
//! skipping any in use) go only where the backing number cannot be unique:
//! inodes of another filesystem mounted below the backing directory, a
//! backing inode numbered 0 or 1 (the root is always 1), and the new file of
//! a reused inode number while the kernel still knows the old one.
//!
//! Inode numbers are reused: when another node deletes a file and the backing
//! filesystem gives its number to a new file, `(dev, ino)` names a different
//! file. Where the filesystem gives file handles (which embed the inode's
//! generation), a lookup compares the handle and a new incarnation becomes a
//! new inode with a fresh node id (never one the kernel may still hold), so
//! the new file is served and the old one's node id keeps failing with
//! ESTALE only for the deleted file. Where it gives none, each known inode
//! pins an `O_PATH` descriptor, which keeps the number from being reused.
//!
//! Descriptors are bounded: where the filesystem has durable file handles
//! (`name_to_handle_at`: ext4, xfs, btrfs, NFS…), an inode keeps only its
//! handle and its `O_PATH` descriptor lives in a bounded cache, reopened on
//! demand with `open_by_handle_at`. Where it has none (a FUSE filesystem
//! such as GlusterFS's client: on kernel 6.18 `name_to_handle_at` is
//! refused, and where it is accepted, `open_by_handle_at` gives ESTALE once
//! the client forgot the inode, so FUSE backing filesystems never use
//! handles), directories pin a descriptor (they must survive renames by
//! other nodes), and other inodes keep a descriptor in the same bounded
//! cache and the directory and name they were last looked up by: evicted,
//! they are reopened by that name and checked against their `(dev, ino)`
//! and type (a file renamed by another node meanwhile gives ESTALE, on which
//! the kernel looks the path up again).

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use parking_lot::Mutex;

use crate::sys::{self, FileHandle, Stat};

pub const ROOT_ID: u64 = 1;
const SYNTHETIC_BASE: u64 = 1 << 62;

/// One backing inode the kernel knows about.
#[derive(Debug)]
pub struct Inode {
    pub id: u64,
    pub dev: u64,
    pub ino: u64,
    /// `S_IFMT` bits of the mode (the type never changes).
    pub kind: u32,
    handle: Option<FileHandle>,
    /// Pinned descriptor: the root, and directories on filesystems without
    /// durable handles.
    pinned: Option<Arc<OwnedFd>>,
    /// Without a handle or a pin: the directory and name it was last looked
    /// up by, to reopen it by when its cached descriptor was evicted.
    origin: Option<Mutex<(u64, OsString)>>,
    nlookup: AtomicU64,
    /// Where the kernel reached this inode: the guard decides from this,
    /// never from a path read back from the backing filesystem.
    place: Mutex<Place>,
    /// A digest of size and times, so the kernel keeps what it cached while
    /// they stay the same (0: none yet). A file (without kernel
    /// passthrough): when it was last opened, for its page cache (0 while a
    /// writer has it open). A directory: when its listing was last read, for
    /// the kernel's cached listing.
    pub data_stamp: AtomicU64,
}

/// How many names of one file the guard remembers (hard links).
const MAX_NAMES: usize = 8;

/// The names through which the kernel reached an inode.
#[derive(Debug, Default)]
struct Place {
    /// Directories: the one (parent id, name) the kernel used last (a
    /// directory has one name). Files: the protected names the kernel used,
    /// and every name of a file with several hard links (the flag says
    /// whether that name is protected).
    names: Vec<(u64, OsString, bool)>,
    /// Ever reached through a protected name (sticky: the guard errs
    /// towards keeping).
    protected: bool,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// The handle this inode is known by (where the filesystem gives handles).
    pub fn handle(&self) -> Option<&FileHandle> {
        self.handle.as_ref()
    }

    /// The kernel reached this inode as `parent/name`; `protected` says
    /// whether the guard protects that name.
    /// `linked`: the file has other hard links.
    pub fn reached(&self, parent: u64, name: &OsStr, protected: bool, linked: bool) {
        let mut p = self.place.lock();
        p.protected |= protected;
        if self.is_dir() || self.kind == libc::S_IFLNK {
            if p.names
                .first()
                .is_none_or(|(i, n, _)| *i != parent || n != name)
            {
                p.names.clear();
                p.names.push((parent, name.to_os_string(), protected));
            }
            return;
        }
        if !(protected || linked) {
            return;
        }
        let names = &mut p.names;
        if let Some(slot) = names.iter_mut().find(|(i, n, _)| *i == parent && n == name) {
            slot.2 |= protected;
        } else if names.len() < MAX_NAMES {
            names.push((parent, name.to_os_string(), protected));
        } else if protected {
            // Keep protected names over unprotected ones.
            if let Some(slot) = names.iter_mut().find(|(_, _, prot)| !prot) {
                *slot = (parent, name.to_os_string(), true);
            }
        }
    }

    /// The name `parent/name` of this inode is gone (unlinked, or renamed
    /// away through the mount).
    pub fn left(&self, parent: u64, name: &OsStr) {
        let mut p = self.place.lock();
        if !self.is_dir() {
            p.names.retain(|(i, n, _)| *i != parent || n != name);
        }
    }

    /// Was this inode ever reached through a protected name?
    pub fn was_protected(&self) -> bool {
        self.place.lock().protected
    }

    /// The protected names the kernel used for this file (empty for
    /// directories).
    pub fn protected_names(&self) -> Vec<(u64, OsString)> {
        self.names_where(|prot| prot)
    }

    /// The names the guard recorded for this file that are not protected
    /// (a hard link's elsewhere).
    pub fn other_names(&self) -> Vec<(u64, OsString)> {
        self.names_where(|prot| !prot)
    }

    /// Every name the guard recorded for this file.
    pub fn names(&self) -> Vec<(u64, OsString)> {
        self.names_where(|_| true)
    }

    fn names_where(&self, keep: impl Fn(bool) -> bool) -> Vec<(u64, OsString)> {
        if self.is_dir() {
            return Vec::new();
        }
        let p = self.place.lock();
        p.names
            .iter()
            .filter(|(_, _, prot)| keep(*prot))
            .map(|(i, n, _)| (*i, n.clone()))
            .collect()
    }

    /// A symlink's (parent id, name), as the kernel last reached it (its
    /// own extended attributes are reached through its parent).
    pub fn link_name(&self) -> Option<(u64, OsString)> {
        if self.kind != libc::S_IFLNK {
            return None;
        }
        self.dir_name()
    }

    /// A directory's (parent id, name), as the kernel last reached it.
    pub fn dir_name(&self) -> Option<(u64, OsString)> {
        let p = self.place.lock();
        p.names.first().map(|(i, n, _)| (*i, n.clone()))
    }

    /// The inode was just found as `name` in `parent`.
    fn seen_at(&self, origin: Option<(u64, &OsStr)>) {
        if let (Some(slot), Some((parent, name))) = (&self.origin, origin) {
            let mut g = slot.lock();
            if g.0 != parent || g.1 != name {
                *g = (parent, name.to_os_string());
            }
        }
    }
}

/// A bounded FIFO cache of `O_PATH` descriptors for handle-backed inodes.
/// Removal is O(1): the order queue may hold stale ids, skipped (by
/// sequence number) on eviction and compacted when it grows.
struct FdCache {
    cap: usize,
    inner: Mutex<FdCacheInner>,
}

#[derive(Default)]
struct FdCacheInner {
    map: HashMap<u64, (Arc<OwnedFd>, u64)>,
    order: VecDeque<(u64, u64)>,
    seq: u64,
}

impl FdCache {
    fn get(&self, id: u64) -> Option<Arc<OwnedFd>> {
        self.inner.lock().map.get(&id).map(|(fd, _)| Arc::clone(fd))
    }

    fn insert(&self, id: u64, fd: Arc<OwnedFd>) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        if let Some(slot) = g.map.get_mut(&id) {
            slot.0 = fd;
            return;
        }
        g.seq += 1;
        g.map.insert(id, (fd, g.seq));
        g.order.push_back((id, g.seq));
        while g.map.len() > self.cap {
            let Some((old, seq)) = g.order.pop_front() else {
                break;
            };
            if g.map.get(&old).is_some_and(|(_, s)| *s == seq) {
                g.map.remove(&old);
            }
        }
        if g.order.len() > 2 * self.cap + 64 {
            let map = &g.map;
            g.order
                .retain(|(id, seq)| map.get(id).is_some_and(|(_, s)| s == seq));
        }
    }

    fn remove(&self, id: u64) {
        self.inner.lock().map.remove(&id);
    }

    /// Drop the oldest descriptors until at most `keep` remain.
    fn shrink(&self, keep: usize) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        while g.map.len() > keep {
            let Some((old, seq)) = g.order.pop_front() else {
                break;
            };
            if g.map.get(&old).is_some_and(|(_, s)| *s == seq) {
                g.map.remove(&old);
            }
        }
    }

    fn len(&self) -> usize {
        self.inner.lock().map.len()
    }
}

/// The inode table.
pub struct InodeStore {
    inodes: DashMap<u64, Arc<Inode>>,
    /// `(dev, ino)` -> id of the current incarnation, where that id is not
    /// the backing inode number (other devices, numbers >= 2^62, and new
    /// incarnations of a reused number whose old one is still known).
    synthetic: DashMap<(u64, u64), u64>,
    next_synthetic: AtomicU64,
    /// Serialises the creation of inodes (the lookup of a known inode does
    /// not take it), so two lookups of one new file make one inode.
    creating: Mutex<()>,
    root_dev: u64,
    cache: FdCache,
    use_handles: bool,
    /// A real (not `O_PATH`) descriptor of the root: `open_by_handle_at`
    /// needs one to name the filesystem.
    mount_fd: Option<OwnedFd>,
    /// Handles of inodes the kernel forgot, newest last (bounded): a file
    /// handle given out through the mount (`name_to_handle_at`) names a node
    /// id the kernel may ask about again after it dropped its caches.
    retired: Mutex<(HashMap<u64, Retired>, VecDeque<u64>)>,
}

/// How many forgotten inodes can still be found by node id.
const RETIRED_CAP: usize = 32 * 1024;

/// A forgotten inode, enough to bring it back.
struct Retired {
    dev: u64,
    ino: u64,
    kind: u32,
    handle: FileHandle,
}

impl InodeStore {
    /// A store rooted at `root` (an `O_PATH` descriptor of the backing
    /// directory) that keeps at most `fd_cache` descriptors for inodes it can
    /// reopen by handle.
    pub fn new(root: OwnedFd, fd_cache: usize) -> io::Result<InodeStore> {
        let st = sys::fstat(root.as_fd())?;
        let mount_fd = sys::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).ok();
        // A FUSE filesystem's handles open only while its kernel inode is
        // cached (no export support, e.g. GlusterFS): not durable.
        let fuse = sys::fs_magic(root.as_fd()).is_ok_and(|m| m == sys::FUSE_SUPER_MAGIC);
        let use_handles = !fuse && mount_fd.is_some() && sys::name_to_handle(root.as_fd()).is_ok();
        tracing::info!(
            handles = use_handles,
            fuse_backing = fuse,
            "inodes are kept by {}",
            if use_handles {
                "file handle"
            } else {
                "descriptor and name"
            }
        );
        let store = InodeStore {
            inodes: DashMap::new(),
            synthetic: DashMap::new(),
            next_synthetic: AtomicU64::new(SYNTHETIC_BASE),
            creating: Mutex::new(()),
            root_dev: st.st_dev,
            cache: FdCache {
                cap: fd_cache.max(16),
                inner: Mutex::new(FdCacheInner::default()),
            },
            use_handles,
            mount_fd,
            retired: Mutex::new((HashMap::new(), VecDeque::new())),
        };
        store.inodes.insert(
            ROOT_ID,
            Arc::new(Inode {
                id: ROOT_ID,
                dev: st.st_dev,
                ino: st.st_ino,
                kind: libc::S_IFDIR,
                handle: None,
                pinned: Some(Arc::new(root)),
                origin: None,
                nlookup: AtomicU64::new(1),
                place: Mutex::new(Place::default()),
                data_stamp: AtomicU64::new(0),
            }),
        );
        Ok(store)
    }

    pub fn root(&self) -> Arc<Inode> {
        self.get(ROOT_ID).expect("root inode is never forgotten")
    }

    pub fn root_fd(&self) -> Arc<OwnedFd> {
        self.root().pinned.clone().expect("root is pinned")
    }

    pub fn get(&self, id: u64) -> Option<Arc<Inode>> {
        self.inodes.get(&id).map(|r| Arc::clone(&r))
    }

    /// The node id a backing `(dev, ino)` gets when nothing else holds it:
    /// its own inode number, on the backing directory's filesystem (0 and 1
    /// are reserved by FUSE; GlusterFS's numbers >= 2^62 are fine).
    fn natural_id(&self, dev: u64, ino: u64) -> Option<u64> {
        (dev == self.root_dev && ino > ROOT_ID).then_some(ino)
    }

    /// A node id nothing holds, for an inode that cannot have its natural
    /// one. An id is never handed out while the kernel may still know it.
    fn fresh_id(&self) -> u64 {
        loop {
            let id = self.next_synthetic.fetch_add(1, Ordering::Relaxed);
            if id > ROOT_ID && !self.inodes.contains_key(&id) {
                return id;
            }
        }
    }

    /// The node id of the current incarnation of `(dev, ino)`, if known.
    fn current_id(&self, dev: u64, ino: u64) -> Option<u64> {
        match self.synthetic.get(&(dev, ino)) {
            Some(id) => Some(*id),
            None => self.natural_id(dev, ino),
        }
    }

    /// Record a new inode (a file not known, or a new incarnation of a
    /// reused inode number) with one lookup, unless another thread just did.
    fn create(
        &self,
        st: &Stat,
        handle: Option<FileHandle>,
        fd: Option<OwnedFd>,
        origin: Option<(u64, &OsStr)>,
    ) -> io::Result<Arc<Inode>> {
        let _g = self.creating.lock();
        if let Some(inode) = self.known_as(st, handle.as_ref()) {
            inode.seen_at(origin);
            if let Some(fd) = fd {
                if inode.pinned.is_none() && self.cache.get(inode.id).is_none() {
                    self.cache.insert(inode.id, Arc::new(fd));
                }
            }
            return Ok(inode);
        }
        let key = (st.st_dev, st.st_ino);
        let natural = self.natural_id(key.0, key.1);
        // The natural id is taken while the kernel still knows an older
        // incarnation of this number: then a fresh one, never reused.
        let id = match natural {
            Some(n) if !self.inodes.contains_key(&n) => n,
            _ => self.fresh_id(),
        };
        let fd = fd.map(Arc::new);
        let kind = st.st_mode & libc::S_IFMT;
        let mut kept_origin = None;
        let pinned = match (&handle, fd) {
            (Some(_), Some(fd)) => {
                self.cache.insert(id, fd);
                None
            }
            (Some(_), None) => None,
            (None, Some(fd)) => match origin {
                Some((parent, name)) if kind != libc::S_IFDIR => {
                    self.cache.insert(id, fd);
                    kept_origin = Some(Mutex::new((parent, name.to_os_string())));
                    None
                }
                _ => Some(fd),
            },
            (None, None) => return Err(io::Error::from_raw_os_error(libc::ESTALE)),
        };
        let inode = Arc::new(Inode {
            id,
            dev: st.st_dev,
            ino: st.st_ino,
            kind,
            handle,
            pinned,
            origin: kept_origin,
            nlookup: AtomicU64::new(1),
            place: Mutex::new(Place::default()),
            data_stamp: AtomicU64::new(0),
        });
        self.inodes.insert(id, Arc::clone(&inode));
        if Some(id) == natural {
            self.synthetic.remove(&key);
        } else {
            self.synthetic.insert(key, id);
        }
        Ok(inode)
    }

    /// The inode's `O_PATH` descriptor if one is held (pinned or cached).
    pub fn cached_fd(&self, inode: &Inode) -> Option<Arc<OwnedFd>> {
        match &inode.pinned {
            Some(p) => Some(Arc::clone(p)),
            None => self.cache.get(inode.id),
        }
    }

    /// An `O_PATH` descriptor for the inode (from the pin, the cache, or by
    /// reopening its handle). Must be called with the daemon's own credentials.
    pub fn fd(&self, inode: &Inode) -> io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.cached_fd(inode) {
            return Ok(fd);
        }
        let Some(handle) = inode.handle.as_ref() else {
            return self.reopen_by_name(inode);
        };
        let mount_fd = self
            .mount_fd
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
        let fd = sys::open_by_handle(mount_fd.as_fd(), handle, libc::O_PATH | libc::O_NOFOLLOW)?;
        let st = sys::fstat(fd.as_fd())?;
        if st.st_ino != inode.ino || st.st_dev != inode.dev {
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        let fd = Arc::new(fd);
        self.cache.insert(inode.id, Arc::clone(&fd));
        Ok(fd)
    }

    /// Reopen an inode without a handle by the directory and name it was
    /// last seen as; ESTALE if that name is now another file.
    fn reopen_by_name(&self, inode: &Inode) -> io::Result<Arc<OwnedFd>> {
        let stale = || io::Error::from_raw_os_error(libc::ESTALE);
        let (parent, name) = inode.origin.as_ref().ok_or_else(stale)?.lock().clone();
        let parent = self.get(parent).ok_or_else(stale)?;
        let pfd = self.fd(&parent)?;
        let fd = sys::openat(
            pfd.as_fd(),
            &sys::cstr(&name)?,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => stale(),
            _ => e,
        })?;
        let st = sys::fstat(fd.as_fd())?;
        if st.st_ino != inode.ino
            || st.st_dev != inode.dev
            || st.st_mode & libc::S_IFMT != inode.kind
        {
            return Err(stale());
        }
        let fd = Arc::new(fd);
        self.cache.insert(inode.id, Arc::clone(&fd));
        Ok(fd)
    }

    /// Record one kernel lookup of the inode behind `fd` (an `O_PATH`
    /// descriptor just opened by name) whose attributes are `st`.
    /// `origin`: the directory and name it was opened by.
    pub fn lookup_fd(
        &self,
        fd: OwnedFd,
        st: &Stat,
        origin: Option<(u64, &OsStr)>,
    ) -> io::Result<Arc<Inode>> {
        let handle = if self.handles_for(st.st_dev) {
            sys::name_to_handle(fd.as_fd()).ok()
        } else {
            None
        };
        if let Some(inode) = self.known_as(st, handle.as_ref()) {
            inode.seen_at(origin);
            if inode.pinned.is_none() && self.cache.get(inode.id).is_none() {
                self.cache.insert(inode.id, Arc::new(fd));
            }
            return Ok(inode);
        }
        self.create(st, handle, Some(fd), origin)
    }

    /// Can new inodes on this device be recorded by handle alone?
    pub fn handles_for(&self, dev: u64) -> bool {
        self.use_handles && dev == self.root_dev
    }

    /// Record one kernel lookup of the inode whose file handle is `handle`
    /// (no descriptor is opened until one is needed).
    pub fn lookup_handle(&self, handle: FileHandle, st: &Stat) -> io::Result<Arc<Inode>> {
        if let Some(inode) = self.known_as(st, Some(&handle)) {
            return Ok(inode);
        }
        self.create(st, Some(handle), None, None)
    }

    /// Is this `(dev, ino)` already known? (Avoids opening a descriptor.)
    /// Counts a lookup if so. Only for inodes whose number cannot have been
    /// reused behind the store's back: prefer [`Self::known_as`].
    pub fn known(&self, st: &Stat) -> Option<Arc<Inode>> {
        self.known_as(st, None)
    }

    /// Whether inodes are kept by file handle (else by descriptor and name).
    pub fn uses_handles(&self) -> bool {
        self.use_handles
    }

    /// The inode with attributes `st`, if known, is now `name` in `parent`
    /// (no lookup is counted).
    pub fn moved(&self, st: &Stat, parent: u64, name: &OsStr) {
        if let Some(id) = self.current_id(st.st_dev, st.st_ino) {
            if let Some(inode) = self.get(id) {
                if inode.dev == st.st_dev && inode.ino == st.st_ino {
                    inode.seen_at(Some((parent, name)));
                }
            }
        }
    }

    /// As [`Self::known`], for an inode just found as `name` in `parent`
    /// (remembered, to reopen it by if need be).
    pub fn known_at(&self, st: &Stat, parent: u64, name: &OsStr) -> Option<Arc<Inode>> {
        let inode = self.known_as(st, None)?;
        inode.seen_at(Some((parent, name)));
        Some(inode)
    }

    /// The known current incarnation of `(dev, ino)` if it is the file
    /// whose handle is `handle` (a new file that got a reused inode number
    /// has another handle: not this inode). Counts a lookup if so.
    pub fn known_as(&self, st: &Stat, handle: Option<&FileHandle>) -> Option<Arc<Inode>> {
        let id = self.current_id(st.st_dev, st.st_ino)?;
        // Count the lookup while holding the shard's read lock, so a
        // concurrent `forget` (which takes the write lock) cannot drop it.
        let r = self.inodes.get(&id)?;
        let same = r.dev == st.st_dev
            && r.ino == st.st_ino
            && match (handle, &r.handle) {
                (Some(h), Some(mine)) => h == mine,
                _ => true,
            };
        if !same {
            return None;
        }
        r.nlookup.fetch_add(1, Ordering::Relaxed);
        Some(Arc::clone(&r))
    }

    /// The kernel dropped `n` lookups of `id`.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        if let Entry::Occupied(e) = self.inodes.entry(id) {
            let prev = e.get().nlookup.load(Ordering::Relaxed);
            let left = prev.saturating_sub(n);
            e.get().nlookup.store(left, Ordering::Relaxed);
            if left == 0 {
                // Into the graveyard before it leaves the table (under the
                // entry's lock): a LOOKUP of "." in this node id (a file
                // handle decoded after the kernel dropped its caches) that
                // comes meanwhile finds it in one or the other, never in
                // neither (it got ESTALE).
                if let Some(handle) = e.get().handle.clone() {
                    self.retire(id, e.get(), handle);
                }
                // `remove` consumes the entry and releases its lock before
                // the synthetic map is touched (`create` takes them in the
                // other order).
                let inode = e.remove();
                self.cache.remove(id);
                self.synthetic
                    .remove_if(&(inode.dev, inode.ino), |_, v| *v == inode.id);
            }
        }
    }

    /// The inode number `stat` shows through the mount for node `id`: the
    /// node id itself (the kernel numbers a looked-up inode by its node id),
    /// which is the backing inode number except where that cannot be unique
    /// (another filesystem mounted below the backing directory; a reused
    /// number whose old file the kernel still knows); the root shows the
    /// backing directory's own number.
    pub fn shown_ino(&self, id: u64, st: &Stat) -> u64 {
        if id == ROOT_ID { st.st_ino } else { id }
    }

    /// The inode with these `(dev, ino)`, if known, without counting a
    /// lookup (for decisions, not replies).
    pub fn peek(&self, st: &Stat) -> Option<Arc<Inode>> {
        let id = self.current_id(st.st_dev, st.st_ino)?;
        let r = self.inodes.get(&id)?;
        (r.dev == st.st_dev && r.ino == st.st_ino).then(|| Arc::clone(&r))
    }

    fn retire(&self, id: u64, inode: &Inode, handle: FileHandle) {
        let mut g = self.retired.lock();
        let (map, order) = &mut *g;
        let r = Retired {
            dev: inode.dev,
            ino: inode.ino,
            kind: inode.kind,
            handle,
        };
        if map.insert(id, r).is_none() {
            order.push_back(id);
        }
        while map.len() > RETIRED_CAP {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
        if order.len() > 2 * RETIRED_CAP {
            order.retain(|i| map.contains_key(i));
        }
    }

    /// The inode with node id `id`, counting one kernel lookup: a known
    /// one, or one the kernel forgot but whose handle is still kept (the
    /// kernel asks for `.` in a node id when it decodes a file handle after
    /// dropping its caches). Must be called with the daemon's credentials.
    pub fn lookup_id(&self, id: u64) -> io::Result<Arc<Inode>> {
        if let Some(r) = self.inodes.get(&id) {
            r.nlookup.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::clone(&r));
        }
        let (dev, ino, kind, handle) = {
            let g = self.retired.lock();
            let r =
                g.0.get(&id)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
            (r.dev, r.ino, r.kind, r.handle.clone())
        };
        let mount_fd = self
            .mount_fd
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
        let fd = sys::open_by_handle(mount_fd.as_fd(), &handle, libc::O_PATH | libc::O_NOFOLLOW)?;
        let st = sys::fstat(fd.as_fd())?;
        if (st.st_dev, st.st_ino, st.st_mode & libc::S_IFMT) != (dev, ino, kind) {
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        self.lookup_fd(fd, &st, None)
    }

    /// The path of directory `id` below the root, from the names the kernel
    /// used to reach it and its ancestors (never read back from the backing
    /// filesystem, so it cannot be fooled by a moved or over-long backing
    /// path). `None` when the chain is broken (the guard then refuses).
    pub fn dir_path(&self, id: u64) -> Option<PathBuf> {
        let mut names: Vec<OsString> = Vec::new();
        let mut at = id;
        while at != ROOT_ID {
            if names.len() > 4096 {
                return None;
            }
            let inode = self.get(at)?;
            if !inode.is_dir() {
                return None;
            }
            let (parent, name) = inode.dir_name()?;
            names.push(name);
            at = parent;
        }
        Some(names.iter().rev().collect())
    }

    /// Was directory `id` or one of its ancestors ever reached through a
    /// protected name?
    pub fn under_protected(&self, id: u64) -> bool {
        let mut at = id;
        for _ in 0..4096 {
            if at == ROOT_ID {
                return false;
            }
            let Some(inode) = self.get(at) else {
                return true;
            };
            if inode.was_protected() {
                return true;
            }
            match inode.dir_name() {
                Some((parent, _)) => at = parent,
                None => return true,
            }
        }
        true
    }

    /// Keep at most `keep` cached descriptors (open files need them more).
    pub fn shrink_cache(&self, keep: usize) {
        self.cache.shrink(keep);
    }

    /// Descriptors held in the cache.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Number of inodes known, and descriptors held (for stats).
    pub fn counts(&self) -> (usize, usize) {
        let pinned = self
            .inodes
            .iter()
            .filter(|i| i.value().pinned.is_some())
            .count();
        (self.inodes.len(), pinned + self.cache.len())
    }
}
