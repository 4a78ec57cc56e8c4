//! Request counters, cheap enough for every request (one relaxed atomic add).
//! Dumped as JSON by the daemon on SIGUSR1 and at exit (`--stats-file`), so
//! tests and benchmarks can prove that file data never reached the daemon.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! ops {
    ($($v:ident => $name:literal),* $(,)?) => {
        /// A counted operation (or byte total).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Op { $($v),* }
        const NAMES: &[&str] = &[$($name),*];
        const N: usize = NAMES.len();
    };
}

ops! {
    Lookup => "lookup", Forget => "forget", Getattr => "getattr", Setattr => "setattr",
    Readlink => "readlink", Mknod => "mknod", Mkdir => "mkdir", Symlink => "symlink",
    Link => "link", Unlink => "unlink", Rmdir => "rmdir", Rename => "rename",
    Open => "open", Create => "create", Read => "read", Write => "write",
    ReadBytes => "read_bytes", WriteBytes => "write_bytes", Flush => "flush",
    Release => "release", Fsync => "fsync", Fallocate => "fallocate", Lseek => "lseek",
    CopyFileRange => "copy_file_range", Getlk => "getlk", Setlk => "setlk",
    Opendir => "opendir", Readdir => "readdir", Releasedir => "releasedir",
    Fsyncdir => "fsyncdir", Statfs => "statfs", Access => "access",
    Getxattr => "getxattr", Listxattr => "listxattr", Setxattr => "setxattr",
    Removexattr => "removexattr", Passthrough => "passthrough_opens",
    Quarantined => "quarantined", Healed => "healed", Errors => "errors",
    UringRequests => "uring_requests",
    // Of `read_bytes`, those spliced from the backing file into the reply.
    SplicedBytes => "spliced_bytes",
}

/// The counters.
pub struct Stats {
    counters: [AtomicU64; N],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Stats {
    pub fn count(&self, op: Op) {
        self.add(op, 1);
    }

    pub fn add(&self, op: Op, n: u64) {
        self.counters[op as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, op: Op) -> u64 {
        self.counters[op as usize].load(Ordering::Relaxed)
    }

    /// All counters as a JSON object (`{"lookup": 3, ...}`).
    pub fn to_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = NAMES
            .iter()
            .zip(self.counters.iter())
            .map(|(k, v)| ((*k).to_string(), v.load(Ordering::Relaxed).into()))
            .collect();
        serde_json::Value::Object(map)
    }
}
