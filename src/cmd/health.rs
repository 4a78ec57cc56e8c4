//! Is a baseguard mount alive? A probe with a timeout, the processes that
//! keep a mount busy, recovery of a dead mount, and `baseguard umount`.
//!
//! A mount whose daemon died (kill -9, OOM, panic) stays in the mount table:
//! every request on it fails with ENOTCONN until someone detaches it. A
//! stopped or stuck daemon answers nothing. Neither is healthy, and neither
//! shows in `/proc/self/mountinfo`, so `status`, `check` and `mount` ask the
//! filesystem itself: `statfs` on the mountpoint always reaches the daemon
//! (the kernel caches no answer for it), given [`PROBE_TIMEOUT`] to answer.
//! The `statfs` is made by a child process ([`sys::statfs_in_child`]): a
//! daemon that read the request and never answers (stuck in its backing
//! filesystem, or stopped just after it read it) holds the caller
//! uninterruptibly, and a thread of ours held so would keep the command
//! from ever ending.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use serde::Serialize;

use crate::cmd::quarantine::{FSTYPE, abs_dir};
use crate::mountinfo::MountInfo;
use crate::sys;

/// How long a mountpoint has to answer a probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Exit status of `status` and `check` when a baseguard daemon is not running
/// (attention: it needs a person; nothing was lost).
pub const EXIT_DEAD: u8 = crate::cmd::text::exit::ATTENTION;

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// The daemon answered.
    Alive,
    /// ENOTCONN: the daemon is gone; the mount is dead until detached.
    NotConnected,
    /// No answer within the timeout: the daemon is stopped, stuck or
    /// being replaced.
    NoAnswer,
    /// Some other error (the errno is in [`Probe::errno`]).
    Error,
}

/// The result of probing one mountpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub state: Liveness,
    pub errno: Option<i32>,
}

impl Probe {
    pub fn alive(&self) -> bool {
        self.state == Liveness::Alive
    }
}

/// `statfs` on `mp` from a child process, waiting at most `timeout`. On a
/// hung mount the child is left behind, and the thread waiting for it (which
/// ends with the process); the child ends once the mount answers or is
/// aborted.
pub fn probe(mp: &Path, timeout: Duration) -> Probe {
    let (tx, rx) = mpsc::channel();
    let path = mp.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            let r = sys::statfs_in_child(&path);
            let _ = tx.send(r.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)));
        });
    if spawned.is_err() {
        return Probe {
            state: Liveness::Error,
            errno: Some(libc::EAGAIN),
        };
    }
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Probe {
            state: Liveness::Alive,
            errno: None,
        },
        // ECONNABORTED: the connection was aborted under a request (the
        // last holder of /dev/fuse died meanwhile): dead all the same.
        Ok(Err(e @ (libc::ENOTCONN | libc::ECONNABORTED))) => Probe {
            state: Liveness::NotConnected,
            errno: Some(e),
        },
        Ok(Err(e)) => Probe {
            state: Liveness::Error,
            errno: Some(e),
        },
        Err(_) => Probe {
            state: Liveness::NoAnswer,
            errno: None,
        },
    }
}

/// One baseguard mount as `status --json` reports it. Room is left for what
/// a supervisor knows (its pid, the serving process's pid, start time and
/// restart count): optional fields, omitted when unknown.
#[derive(Debug, Clone, Serialize)]
pub struct MountHealth {
    pub mountpoint: PathBuf,
    pub backing: String,
    pub alive: bool,
    pub state: Liveness,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supervisor_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_started: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u64>,
}

impl MountHealth {
    /// Probe `m`.
    pub fn of(m: &MountInfo) -> MountHealth {
        let p = probe(&m.mountpoint, PROBE_TIMEOUT);
        MountHealth {
            alive: p.alive(),
            state: p.state,
            ..MountHealth::unknown(m)
        }
    }

    /// Probe several mounts at once (at most [`PROBE_TIMEOUT`] in all).
    pub fn of_all(ms: &[MountInfo]) -> Vec<MountHealth> {
        std::thread::scope(|sc| {
            let hs: Vec<_> = ms
                .iter()
                .map(|m| sc.spawn(move || MountHealth::of(m)))
                .collect();
            hs.into_iter()
                .zip(ms)
                .map(|(h, m)| {
                    h.join().unwrap_or_else(|_| MountHealth {
                        alive: false,
                        state: Liveness::Error,
                        ..MountHealth::unknown(m)
                    })
                })
                .collect()
        })
    }

    fn unknown(m: &MountInfo) -> MountHealth {
        MountHealth {
            mountpoint: m.mountpoint.clone(),
            backing: m.source.clone(),
            alive: false,
            state: Liveness::Error,
            supervisor_pid: None,
            server_pid: None,
            server_started: None,
            restarts: None,
        }
    }

    /// The line for the operator when the mount is not healthy.
    pub fn problem(&self) -> Option<String> {
        let mp = self.mountpoint.display();
        let remount = format!(
            "run 'baseguard mount {} {mp}' (or 'mount {mp}' for an fstab entry): it replaces the dead mount",
            self.backing
        );
        match self.state {
            Liveness::Alive => None,
            Liveness::NotConnected => Some(format!(
                "the baseguard daemon for {mp} is not running; the mount is dead (every access \
                 fails with 'Transport endpoint is not connected'): {remount}."
            )),
            Liveness::NoAnswer => Some(format!(
                "the baseguard daemon for {mp} is not running or not answering (no reply within {}s); \
                 find it with 'pgrep -af \"baseguard mount\"': if it is stopped, 'kill -CONT PID'; \
                 if it is stuck, 'kill -9 PID' and then {remount}.",
                PROBE_TIMEOUT.as_secs()
            )),
            Liveness::Error => Some(format!(
                "the baseguard mount at {mp} does not work; look at the daemon's log, then {remount}."
            )),
        }
    }
}

pub use crate::mountinfo::{
    Holder, Unmount, describe_holders, holders, mount_at, unmount_unless_busy,
};

/// Before mounting at `mp`: a dead baseguard mount there (its daemon gone)
/// is detached, so the new mount replaces it. Returns what it did, for the
/// operator, or why it cannot go on (a live or hung baseguard mount, or a
/// dead mount of another filesystem: not ours to remove).
pub fn clear_dead_mount(mp: &Path) -> Result<Option<String>, String> {
    let mp = abs_dir(mp)?;
    let mut done = None;
    for _ in 0..8 {
        let Some(m) = mount_at(&mp) else {
            return Ok(done);
        };
        if !m.fstype.starts_with("fuse") {
            return Ok(done);
        }
        let p = probe(&mp, PROBE_TIMEOUT);
        let ours = m.fstype == FSTYPE;
        match p.state {
            Liveness::Alive if ours => {
                return Err(format!(
                    "mountpoint {} is busy: baseguard is already mounted there (and answering).",
                    mp.display()
                ));
            }
            Liveness::Alive => return Ok(done),
            Liveness::NotConnected if ours => {
                sys::umount_detach(&mp).map_err(|e| {
                    format!(
                        "mountpoint {} has a dead baseguard mount (its daemon is gone) that cannot be detached: {e}; run 'umount -l {}'.",
                        mp.display(),
                        mp.display()
                    )
                })?;
                tracing::warn!(mountpoint = %mp.display(), "detached a dead baseguard mount");
                done = Some(format!(
                    "{} had a dead baseguard mount (its daemon was gone): detached it; mounting again",
                    mp.display()
                ));
            }
            Liveness::NotConnected => {
                return Err(format!(
                    "mountpoint {} has a dead {} mount (not baseguard's); unmount it first with 'umount -l {}'.",
                    mp.display(),
                    m.fstype,
                    mp.display()
                ));
            }
            Liveness::NoAnswer if ours => {
                return Err(format!(
                    "the baseguard daemon for {} is not answering (no reply within {}s), so it was left alone; \
                     find it with 'pgrep -af \"baseguard mount\"': if it is stopped, 'kill -CONT PID'; \
                     if it is stuck, 'kill -9 PID' and run this command again (it replaces the dead mount).",
                    mp.display(),
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            _ => {
                return Err(format!(
                    "mountpoint {} has a {} mount that does not answer; unmount it first.",
                    mp.display(),
                    m.fstype
                ));
            }
        }
    }
    Ok(done)
}

/// `baseguard umount`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Unmount a baseguard mount, refusing while files are open",
    long_about = "Unmount a baseguard mount. While files are open through it (a running VM's \
disk, a shell's working directory) the mount is busy: the command lists who holds it and exits 1, \
and the mount keeps serving. --lazy detaches it anyway: open files keep working through the daemon \
until closed, but new accesses to MOUNTPOINT see the directory underneath. SIGTERM and Ctrl-C to the \
daemon behave like the plain command: a busy mount is never detached by a signal.",
    after_help = "Examples:\n  baseguard umount /var/lib/nova/instances\n  baseguard umount --lazy /var/lib/nova/instances/_base"
)]
pub struct UmountArgs {
    /// The baseguard mountpoint.
    pub mountpoint: PathBuf,
    /// Detach even if files are open (they keep working until closed).
    #[arg(long, short = 'l')]
    pub lazy: bool,
}

impl UmountArgs {
    pub fn run(&self) -> ExitCode {
        let mp = match abs_dir(&self.mountpoint) {
            Ok(p) => p,
            Err(e) => return fail(&e),
        };
        match mount_at(&mp) {
            Some(m) if m.fstype == FSTYPE => {}
            Some(m) => {
                return fail(&format!(
                    "{} is a {} mount, not baseguard's.",
                    mp.display(),
                    m.fstype
                ));
            }
            None => return fail(&format!("nothing is mounted at {}.", mp.display())),
        }
        if self.lazy {
            return match sys::umount_detach(&mp) {
                Ok(()) => {
                    println!(
                        "detached {}: files still open through it keep working until closed",
                        mp.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("cannot detach {}: {e}", mp.display())),
            };
        }
        match unmount_unless_busy(&mp) {
            Unmount::Done => {
                println!("unmounted {}", mp.display());
                ExitCode::SUCCESS
            }
            Unmount::Busy(h) => fail(&format!(
                "{} is busy, so it stays mounted: {}. Stop those first, or detach it with \
                 'baseguard umount --lazy {}' (open files keep working until closed, but \
                 the directory underneath shows at the mountpoint meanwhile).",
                mp.display(),
                if h.is_empty() {
                    "files are open on it".to_string()
                } else {
                    format!("held by {}", describe_holders(&h))
                },
                mp.display()
            )),
            Unmount::Failed(e) => fail(&format!("cannot unmount {}: {e}", mp.display())),
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("baseguard: {msg}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_reports_what_statfs_says() {
        let d = tempfile::tempdir().unwrap();
        assert!(probe(d.path(), PROBE_TIMEOUT).alive());
        let p = probe(&d.path().join("missing"), PROBE_TIMEOUT);
        assert_eq!((p.state, p.errno), (Liveness::Error, Some(libc::ENOENT)));
        let f = d.path().join("file");
        std::fs::write(&f, "x").unwrap();
        let p = probe(&f, PROBE_TIMEOUT);
        assert_eq!((p.state, p.errno), (Liveness::Error, Some(libc::ENOTDIR)));
    }
}
