//! The inode store: FUSE node ids mapped to backing inodes.
//!
//! An inode is known by its backing `(dev, ino)`, never by a path string, so a
//! rename by another compute node or a symlink inside the tree can never make
//! the daemon act on a different file. The FUSE node id is the backing inode
//! number (so `stat` through the mount shows the real numbers and hard links
//! share one), except for the root (always 1) and the rare collision (another
//! device below the backing directory, or a backing inode numbered 1), which
//! get a synthetic id.
//!
//! Descriptors are bounded: where the filesystem supports file handles
//! (`name_to_handle_at`: ext4, xfs, NFS…), an inode keeps only its handle and
//! its `O_PATH` descriptor lives in a bounded cache, reopened on demand with
//! `open_by_handle_at`. Only where handles are unsupported is a descriptor
//! pinned per inode.

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
    /// Pinned descriptor: the root, and inodes on filesystems without handles.
    pinned: Option<Arc<OwnedFd>>,
    nlookup: AtomicU64,
    /// Where the kernel reached this inode: the guard decides from this,
    /// never from a path read back from the backing filesystem.
    place: Mutex<Place>,
    /// Without kernel passthrough: a digest of the file's size and times
    /// when it was last opened, so that an unchanged file keeps the kernel's
    /// page cache across opens (0: none yet, or a writer has it open).
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

    fn new(id: u64, st: &Stat, handle: Option<FileHandle>, pinned: Option<Arc<OwnedFd>>) -> Inode {
        Inode {
            id,
            dev: st.st_dev,
            ino: st.st_ino,
            kind: st.st_mode & libc::S_IFMT,
            handle,
            pinned,
            nlookup: AtomicU64::new(0),
            place: Mutex::new(Place::default()),
            data_stamp: AtomicU64::new(0),
        }
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
    fn dir_name(&self) -> Option<(u64, OsString)> {
        let p = self.place.lock();
        p.names.first().map(|(i, n, _)| (*i, n.clone()))
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
    /// `(dev, ino)` -> id, for the ids that are not the backing inode number.
    synthetic: DashMap<(u64, u64), u64>,
    next_synthetic: AtomicU64,
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
        let use_handles = mount_fd.is_some() && sys::name_to_handle(root.as_fd()).is_ok();
        let store = InodeStore {
            inodes: DashMap::new(),
            synthetic: DashMap::new(),
            next_synthetic: AtomicU64::new(SYNTHETIC_BASE),
            root_dev: st.st_dev,
            cache: FdCache {
                cap: fd_cache.max(16),
                inner: Mutex::new(FdCacheInner::default()),
            },
            use_handles,
            mount_fd,
            retired: Mutex::new((HashMap::new(), VecDeque::new())),
        };
        let root = Inode::new(ROOT_ID, &st, None, Some(Arc::new(root)));
        root.nlookup.store(1, Ordering::Relaxed);
        store.inodes.insert(ROOT_ID, Arc::new(root));
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

    /// The node id for a backing `(dev, ino)`.
    fn id_for(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root_dev && ino != ROOT_ID && ino < SYNTHETIC_BASE {
            return ino;
        }
        *self
            .synthetic
            .entry((dev, ino))
            .or_insert_with(|| self.next_synthetic.fetch_add(1, Ordering::Relaxed))
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
        let handle = inode
            .handle
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
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

    /// Record one kernel lookup of the inode behind `fd` (an `O_PATH`
    /// descriptor just opened by name) whose attributes are `st`.
    pub fn lookup_fd(&self, fd: OwnedFd, st: &Stat) -> io::Result<Arc<Inode>> {
        let id = self.id_for(st.st_dev, st.st_ino);
        match self.inodes.entry(id) {
            Entry::Occupied(e) => {
                let inode = Arc::clone(e.get());
                if inode.dev == st.st_dev && inode.ino == st.st_ino {
                    inode.nlookup.fetch_add(1, Ordering::Relaxed);
                    if inode.pinned.is_none() && self.cache.get(id).is_none() {
                        self.cache.insert(id, Arc::new(fd));
                    }
                    return Ok(inode);
                }
                // Same number, other device: should not happen (id_for
                // separates devices); refuse rather than confuse inodes.
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
            Entry::Vacant(v) => {
                let handle = if self.use_handles && st.st_dev == self.root_dev {
                    sys::name_to_handle(fd.as_fd()).ok()
                } else {
                    None
                };
                let fd = Arc::new(fd);
                let pinned = if handle.is_some() {
                    self.cache.insert(id, Arc::clone(&fd));
                    None
                } else {
                    Some(fd)
                };
                let inode = Arc::new(Inode::new(id, st, handle, pinned));
                inode.nlookup.store(1, Ordering::Relaxed);
                v.insert(Arc::clone(&inode));
                Ok(inode)
            }
        }
    }

    /// Can new inodes on this device be recorded by handle alone?
    pub fn handles_for(&self, dev: u64) -> bool {
        self.use_handles && dev == self.root_dev
    }

    /// Record one kernel lookup of a new inode known by its file handle only
    /// (no descriptor is opened until one is needed).
    pub fn lookup_handle(&self, handle: FileHandle, st: &Stat) -> io::Result<Arc<Inode>> {
        let id = self.id_for(st.st_dev, st.st_ino);
        let inode = self
            .inodes
            .entry(id)
            .or_insert_with(|| Arc::new(Inode::new(id, st, Some(handle), None)));
        if inode.dev != st.st_dev || inode.ino != st.st_ino {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        inode.nlookup.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::clone(&inode))
    }

    /// The inode with these `(dev, ino)`, if known, without counting a
    /// lookup (for decisions, not replies).
    pub fn peek(&self, st: &Stat) -> Option<Arc<Inode>> {
        let id = if st.st_dev == self.root_dev && st.st_ino != ROOT_ID && st.st_ino < SYNTHETIC_BASE
        {
            st.st_ino
        } else {
            *self.synthetic.get(&(st.st_dev, st.st_ino))?
        };
        let r = self.inodes.get(&id)?;
        (r.dev == st.st_dev && r.ino == st.st_ino).then(|| Arc::clone(&r))
    }

    /// Is this `(dev, ino)` already known? (Avoids opening a descriptor.)
    pub fn known(&self, st: &Stat) -> Option<Arc<Inode>> {
        let id = if st.st_dev == self.root_dev && st.st_ino != ROOT_ID && st.st_ino < SYNTHETIC_BASE
        {
            st.st_ino
        } else {
            *self.synthetic.get(&(st.st_dev, st.st_ino))?
        };
        // Count the lookup while holding the shard's read lock, so a
        // concurrent `forget` (which takes the write lock) cannot drop it.
        let r = self.inodes.get(&id)?;
        if r.dev == st.st_dev && r.ino == st.st_ino {
            r.nlookup.fetch_add(1, Ordering::Relaxed);
            Some(Arc::clone(&r))
        } else {
            None
        }
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
                let inode = e.remove();
                self.cache.remove(id);
                if inode.id >= SYNTHETIC_BASE {
                    self.synthetic.remove(&(inode.dev, inode.ino));
                } else if let Some(handle) = inode.handle.clone() {
                    self.retire(id, &inode, handle);
                }
            }
        }
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
        self.lookup_fd(fd, &st)
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
