//! The serving process's side of keeping handles alive across its own death: every handle
//! the kernel learns (open file, open directory, lock description) is given, with a
//! duplicate of its descriptor, to the supervisor *before* the kernel hears of it, and taken
//! back when the kernel releases it. The supervisor holds the descriptors, so files stay
//! open and locks stay held while no server runs; a new server takes them over.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::proto::{Link, ToSupervisor};
use crate::fs::{Handle, HandleKey, Passthrough};

/// One kept handle: what the filesystem exports, and the passthrough backing id the
/// adapter registered for it (backing ids live in the kernel connection).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kept {
    pub handle: Handle,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<u32>,
}

/// The record key of a node the kernel knows.
pub fn inode_key(id: u64) -> String {
    format!("i/{id}")
}

/// The record key of a handle.
pub fn key(k: HandleKey) -> String {
    match k {
        HandleKey::File(fh) => format!("f/{fh}"),
        HandleKey::Dir(fh) => format!("d/{fh}"),
        HandleKey::Lock(fh, owner) => format!("l/{fh}/{owner}"),
    }
}

/// How long to wait for the supervisor to confirm it closed a lock description.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The serving process's link to the supervisor's keeper.
pub struct Custody {
    /// Every message is one `sendmsg`, atomic on the socket, so messages need no lock of
    /// their own; and none wakes the supervisor (it reads lazily, see [`super::proto`]).
    out: Arc<Link>,
    /// Serialises the messages that wait for an `Ack`, and receives the acks.
    acks: Mutex<Receiver<()>>,
    /// Lock descriptions handed to the supervisor, by (fh, owner).
    locks: Mutex<HashSet<(u64, u64)>>,
    /// Nodes handed to the supervisor.
    inodes: dashmap::DashSet<u64>,
}

impl Custody {
    pub fn new(link: Arc<Link>, acks: Receiver<()>) -> Custody {
        Custody {
            out: link,
            acks: Mutex::new(acks),
            locks: Mutex::new(HashSet::new()),
            inodes: dashmap::DashSet::new(),
        }
    }

    fn put(&self, fs: &Passthrough, k: HandleKey, backing: Option<u32>) -> io::Result<()> {
        let Some((handle, fd)) = fs.export_handle(k) else {
            return Ok(());
        };
        let rec = serde_json::to_value(Kept { handle, backing }).map_err(io::Error::other)?;
        let msg = ToSupervisor::Put { key: key(k), rec };
        self.out.send(&msg, &[fd.as_fd()])
    }

    fn del(&self, keys: Vec<String>, ack: bool) {
        if !ack {
            if let Err(e) = self.out.send(&ToSupervisor::Del { keys, ack }, &[]) {
                tracing::warn!(error = %e, "cannot reach the supervisor");
            }
            return;
        }
        // A lock's description: closed in the supervisor before the caller hears back.
        let r = {
            let acks = self.acks.lock();
            while acks.try_recv().is_ok() {}
            self.out
                .send(&ToSupervisor::Del { keys, ack }, &[])
                .map(|()| self.out.ring())
                .and_then(|_| match acks.recv_timeout(ACK_TIMEOUT) {
                    Ok(()) => Ok(()),
                    Err(RecvTimeoutError::Timeout) => Err(io::ErrorKind::TimedOut.into()),
                    Err(RecvTimeoutError::Disconnected) => Err(io::ErrorKind::BrokenPipe.into()),
                })
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "the supervisor did not take back a handle");
        }
    }

    /// An open file (and its backing id) is about to be given to the kernel.
    pub fn keep_file(&self, fs: &Passthrough, fh: u64, backing: Option<u32>) {
        if let Err(e) = self.put(fs, HandleKey::File(fh), backing) {
            tracing::error!(fh, error = %e, "cannot hand an open file to the supervisor");
        }
    }

    pub fn keep_dir(&self, fs: &Passthrough, fh: u64) {
        if let Err(e) = self.put(fs, HandleKey::Dir(fh), None) {
            tracing::error!(fh, error = %e, "cannot hand an open directory to the supervisor");
        }
    }

    /// A lock was taken through (fh, owner): keep its description (once).
    pub fn keep_lock(&self, fs: &Passthrough, fh: u64, owner: u64) {
        if !self.locks.lock().insert((fh, owner)) {
            return;
        }
        if let Err(e) = self.put(fs, HandleKey::Lock(fh, owner), None) {
            self.locks.lock().remove(&(fh, owner));
            tracing::error!(fh, error = %e, "cannot hand a lock to the supervisor");
        }
    }

    /// The lock description of (fh, owner) was closed here: close the supervisor's copy
    /// too (and wait for it, so the lock is gone before the caller hears back).
    pub fn forget_lock(&self, fh: u64, owner: u64) {
        if self.locks.lock().remove(&(fh, owner)) {
            self.del(vec![key(HandleKey::Lock(fh, owner))], true);
        }
    }

    /// The kernel released an open file: forget it and its lock descriptions.
    pub fn forget_file(&self, fh: u64) {
        let mut keys = vec![key(HandleKey::File(fh))];
        let mut locks = self.locks.lock();
        let mine: Vec<(u64, u64)> = locks.iter().filter(|l| l.0 == fh).copied().collect();
        for l in &mine {
            locks.remove(l);
            keys.push(key(HandleKey::Lock(l.0, l.1)));
        }
        drop(locks);
        self.del(keys, !mine.is_empty());
    }

    pub fn forget_dir(&self, fh: u64) {
        self.del(vec![key(HandleKey::Dir(fh))], false);
    }

    /// The kernel is about to learn node `id`: keep its record (once; again when `fresh`,
    /// as a new file may reuse a number whose old file the kernel has not forgotten yet).
    pub fn keep_inode(
        &self,
        fs: &Passthrough,
        id: u64,
        fresh: bool,
        file: Option<std::os::fd::BorrowedFd<'_>>,
    ) {
        if id == crate::inode::ROOT_ID {
            return;
        }
        let new = self.inodes.insert(id);
        if !new && !fresh {
            return;
        }
        let Some((rec, fd)) = fs.export_inode(id, file) else {
            self.inodes.remove(&id);
            return;
        };
        let r = serde_json::to_value(&rec)
            .map_err(std::io::Error::other)
            .and_then(|rec| {
                let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
                self.out.send(
                    &ToSupervisor::Put {
                        key: inode_key(id),
                        rec,
                    },
                    &fds,
                )
            });
        if let Err(e) = r {
            self.inodes.remove(&id);
            tracing::error!(id, error = %e, "cannot hand a node to the supervisor");
        }
    }

    /// The kernel forgot node `id` (and this process dropped it).
    pub fn forget_inode(&self, id: u64) {
        if self.inodes.remove(&id).is_some() {
            self.del(vec![inode_key(id)], false);
        }
    }

    /// What INIT negotiated, sent before the kernel gets the INIT reply: a server killed
    /// right after it must not leave the next one waiting for an INIT that never comes.
    pub fn keep_params(&self, params: super::proto::Params) {
        if let Err(e) = self.out.send(&ToSupervisor::Params { params }, &[]) {
            tracing::error!(error = %e, "cannot reach the supervisor");
        }
    }

    /// A node taken over from an earlier server.
    pub fn adopt_inode(&self, id: u64) {
        self.inodes.insert(id);
    }

    /// A lock description taken over from an earlier server.
    pub fn adopt_lock(&self, fh: u64, owner: u64) {
        self.locks.lock().insert((fh, owner));
    }
}
