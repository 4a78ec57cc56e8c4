//! Correct over the shared filesystems clouds really use: two baseguard
//! mounts standing in for two compute nodes, over one ext4 directory and over
//! two FUSE clients of one GlusterFS volume (`.ci/gluster-up` starts it and
//! names the client mountpoints in `BG_GLUSTER_A` / `BG_GLUSTER_B`).
//!
//! Every test runs on both. Without those variables the GlusterFS variants
//! say on stderr that they were skipped (written past the test harness's
//! capture, so a run shows it) instead of passing silently.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PY: &str = "/usr/bin/python3";

// ---- two nodes ---------------------------------------------------------------

/// Which shared filesystem a test runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// One ext4 (or whatever /tmp is) directory under both mounts.
    Local,
    /// Two GlusterFS client mounts of one volume.
    Gluster,
}

/// Two compute nodes: each a baseguard mount over its own view of the
/// shared directory (`native_a`, `native_b`: the same directory as that node
/// sees it without baseguard).
#[allow(dead_code)]
struct Nodes {
    a: Mount,
    b: Mount,
    native_a: PathBuf,
    native_b: PathBuf,
    _cleanup: Cleanup,
}

/// Removes the shared directory after the mounts are gone (declared last
/// in [`Nodes`], so dropped last).
struct Cleanup {
    dir: Option<PathBuf>,
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = fs::remove_dir_all(d);
        }
    }
}

fn say(msg: &str) {
    // Past libtest's output capture: a skip must be visible in a normal run.
    let _ = writeln!(std::io::stderr(), "{msg}");
}

impl Nodes {
    /// Two nodes over `backend`, both mounted with `args`; `None` (after
    /// saying so) when that backend is not available.
    fn new(backend: Backend, test: &str, args: &[&str]) -> Option<Nodes> {
        match backend {
            Backend::Local => {
                let t = tempfile::tempdir().unwrap();
                let shared = t.path().join("shared");
                fs::create_dir(&shared).unwrap();
                Some(Nodes {
                    a: Mount::new(&shared, args),
                    b: Mount::new(&shared, args),
                    native_a: shared.clone(),
                    native_b: shared,
                    _cleanup: Cleanup {
                        dir: None,
                        _tmp: Some(t),
                    },
                })
            }
            Backend::Gluster => {
                let (Some(ga), Some(gb)) = (
                    std::env::var_os("BG_GLUSTER_A"),
                    std::env::var_os("BG_GLUSTER_B"),
                ) else {
                    say(&format!(
                        "SKIPPED {test} over GlusterFS: BG_GLUSTER_A/BG_GLUSTER_B are not set \
                         (run .ci/gluster-up, as .ci/run does)"
                    ));
                    return None;
                };
                let sub = format!("{test}-{}", std::process::id());
                let (na, nb) = (Path::new(&ga).join(&sub), Path::new(&gb).join(&sub));
                let _ = fs::remove_dir_all(&na);
                fs::create_dir(&na).unwrap();
                let start = Instant::now();
                while !nb.is_dir() {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "node B never saw {sub}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                Some(Nodes {
                    a: Mount::new(&na, args),
                    b: Mount::new(&nb, args),
                    native_a: na.clone(),
                    native_b: nb,
                    _cleanup: Cleanup {
                        dir: Some(na),
                        _tmp: None,
                    },
                })
            }
        }
    }
}

/// `#[test]`s for both backends from one `fn(Backend)`.
macro_rules! on_both {
    ($body:ident: $local:ident, $gluster:ident) => {
        #[test]
        fn $local() {
            $body(Backend::Local);
        }
        #[test]
        fn $gluster() {
            $body(Backend::Gluster);
        }
    };
}

// ---- close-to-open -------------------------------------------------------------

/// Append and close through one node, open and read through the other: the
/// reader sees every byte, both ways, every round.
fn close_to_open(backend: Backend, args: &[&str], test: &str) {
    let Some(n) = Nodes::new(backend, test, args) else {
        return;
    };
    const ROUNDS: usize = 25;
    for (w, r, name) in [(&n.a, &n.b, "ab"), (&n.b, &n.a, "ba")] {
        let (wp, rp) = (w.path(name), r.path(name));
        let mut stale = Vec::new();
        for i in 1..=ROUNDS {
            let line = format!("line {i:04}\n");
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&wp)
                .unwrap();
            f.write_all(line.as_bytes()).unwrap();
            drop(f);
            let got = fs::read_to_string(&rp).unwrap();
            if got.len() != i * line.len() || !got.ends_with(&line) {
                stale.push(i);
            }
        }
        assert!(
            stale.is_empty(),
            "{backend:?} {args:?}: node {name} read stale data in rounds {stale:?} of {ROUNDS}"
        );
    }
}

fn close_to_open_passthrough(b: Backend) {
    close_to_open(b, &[], "c2o-pt");
}
fn close_to_open_no_passthrough(b: Backend) {
    close_to_open(b, &["--no-passthrough"], "c2o-nopt");
}
on_both!(close_to_open_passthrough: close_to_open_local, close_to_open_gluster);
on_both!(close_to_open_no_passthrough: close_to_open_no_passthrough_local, close_to_open_no_passthrough_gluster);

// ---- locks across nodes ----------------------------------------------------------

/// A python process holding a lock of `kind` on `path` until its stdin closes.
struct Holder(Child);

const LOCKER: &str = r#"
import fcntl, os, struct, sys
kind, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
def lock(block):
    if kind == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    elif kind == "ofd":
        cmd = 38 if block else 37   # F_OFD_SETLKW / F_OFD_SETLK
        fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
"#;

impl Holder {
    fn new(kind: &str, path: &Path) -> Holder {
        let script =
            format!("{LOCKER}\nlock(True)\nprint('locked', flush=True)\nsys.stdin.read()\n");
        let mut c = Command::new(PY)
            .args(["-c", &script, kind])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "locked",
            "holder could not lock {}",
            path.display()
        );
        Holder(c)
    }

    fn release(mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Try a non-blocking lock of `kind`: true if granted.
fn try_lock(kind: &str, path: &Path) -> bool {
    let script = format!(
        "{LOCKER}\ntry:\n    lock(False)\nexcept (BlockingIOError, PermissionError):\n    sys.exit(3)\n"
    );
    let o = run(Command::new(PY).args(["-c", &script, kind]).arg(path));
    match o.status.code() {
        Some(0) => true,
        Some(3) => false,
        _ => panic!("lock probe failed: {}", String::from_utf8_lossy(&o.stderr)),
    }
}

fn locks_across_nodes(backend: Backend) {
    let Some(n) = Nodes::new(backend, "locks", &[]) else {
        return;
    };
    for kind in ["posix", "ofd", "flock"] {
        let name = format!("lock-{kind}");
        fs::write(n.a.path(&name), b"x").unwrap();
        let h = Holder::new(kind, &n.a.path(&name));
        assert!(
            !try_lock(kind, &n.b.path(&name)),
            "{kind}: node B got a lock node A holds"
        );
        h.release();
        assert!(
            try_lock(kind, &n.b.path(&name)),
            "{kind}: lock not released on node A"
        );
        // And the other way round.
        let h = Holder::new(kind, &n.b.path(&name));
        assert!(
            !try_lock(kind, &n.a.path(&name)),
            "{kind}: node A got a lock node B holds"
        );
        h.release();
    }
    // qemu's image locks: a qcow2 image open read-write on node A cannot be
    // opened on node B.
    if !have("qemu-io") {
        say("SKIPPED qemu image locks: qemu-io is not installed");
        return;
    }
    let img = n.a.path("disk.qcow2");
    let o = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut vm = Command::new("qemu-io")
        .args(["-f", "qcow2", "-t", "none", "-c", "sleep 60000"])
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let other = n.b.path("disk.qcow2");
    let start = Instant::now();
    let refused = loop {
        let o = run(Command::new("qemu-img").arg("info").arg(&other));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() && err.contains("lock") {
            break true;
        }
        if start.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(refused, "node B opened an image that qemu on node A holds");
    let o = run(Command::new("qemu-img").arg("info").arg(&other));
    assert!(
        o.status.success(),
        "image still locked after qemu on node A exited: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
on_both!(locks_across_nodes: locks_across_nodes_local, locks_across_nodes_gluster);
