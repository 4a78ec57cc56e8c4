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
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PY: &str = "/usr/bin/python3";
const SHA: &str = "5d41402abc4b2a76b9719d911017c592aa000001";

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
    _tmp: Vec<tempfile::TempDir>,
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
        Nodes::wrapped(backend, test, &[], args)
    }

    /// As [`Nodes::new`], the daemons started through `prefix` (`prlimit …`).
    fn wrapped(backend: Backend, test: &str, prefix: &[&str], args: &[&str]) -> Option<Nodes> {
        let mount = |backing: &Path| {
            let mp = tempfile::tempdir().unwrap();
            fs::create_dir(mp.path().join("mnt")).unwrap();
            let m = Mount::wrapped(prefix, backing, &mp.path().join("mnt"), args);
            (m, mp)
        };
        match backend {
            Backend::Local => {
                let t = tempfile::tempdir().unwrap();
                let shared = t.path().join("shared");
                fs::create_dir(&shared).unwrap();
                let ((a, ta), (b, tb)) = (mount(&shared), mount(&shared));
                Some(Nodes {
                    a,
                    b,
                    native_a: shared.clone(),
                    native_b: shared,
                    _cleanup: Cleanup {
                        dir: None,
                        _tmp: vec![ta, tb, t],
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
                let ((a, ta), (b, tb)) = (mount(&na), mount(&nb));
                Some(Nodes {
                    a,
                    b,
                    native_a: na.clone(),
                    native_b: nb,
                    _cleanup: Cleanup {
                        dir: Some(na),
                        _tmp: vec![ta, tb],
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
            eventually(|| try_lock(kind, &n.b.path(&name))).is_some(),
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
    let start_vm = || {
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-t", "none", "-c", "sleep 60000"])
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut vm = start_vm();
    let other = n.b.path("disk.qcow2");
    let start = Instant::now();
    let mut last;
    let refused = loop {
        let o = run(Command::new("qemu-img").arg("info").arg(&other));
        last = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() && last.contains("lock") {
            break true;
        }
        if let Ok(Some(st)) = vm.try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut vm.stderr.take().unwrap(), &mut err);
            // qemu-img create's own lock may not be released yet (below).
            assert!(
                err.contains("lock"),
                "qemu-io on node A exited ({st}): {err}"
            );
            vm = start_vm();
        }
        if start.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(
        refused,
        "node B opened an image that qemu on node A holds (last: {last})"
    );
    let took = eventually(|| {
        run(Command::new("qemu-img").arg("info").arg(&other))
            .status
            .success()
    });
    assert!(
        took.is_some(),
        "image still locked after qemu on node A exited"
    );
    say(&format!(
        "locks over {backend:?}: qemu's image lock was free on node B {:?} after qemu on node A exited",
        took.unwrap()
    ));
}

/// Poll `f` until it holds, for at most 10 s; how long it took. (A lock
/// that dies with its open file is released when the daemon handles the
/// kernel's RELEASE, which FUSE sends asynchronously after the last close.)
fn eventually(mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
on_both!(locks_across_nodes: locks_across_nodes_local, locks_across_nodes_gluster);

// ---- inode numbers reused by another node -----------------------------------------

/// Node A creates a file through its mount; another node deletes it and
/// creates a new one, which the backing filesystem may give the same inode
/// number. Node A must see the new file, never ESTALE.
fn reused_inode_numbers(backend: Backend) {
    let Some(n) = Nodes::new(backend, "reuse", &[]) else {
        return;
    };
    fs::create_dir(n.a.path("r")).unwrap();
    const ROUNDS: usize = 400;
    let (mut reused, mut failed) = (0, Vec::new());
    for i in 0..ROUNDS {
        let (old, new) = (format!("r/old{i}"), format!("r/new{i}"));
        fs::File::create(n.a.path(&old)).unwrap();
        let other = |p: &str| n.native_b.join(p);
        let old_ino = fs::metadata(other(&old)).unwrap().ino();
        fs::remove_file(other(&old)).unwrap();
        fs::write(other(&new), b"data\n").unwrap();
        if fs::metadata(other(&new)).unwrap().ino() == old_ino {
            reused += 1;
        }
        match fs::read(n.a.path(&new)) {
            Ok(d) => assert_eq!(d, b"data\n", "round {i}: wrong contents"),
            Err(e) => failed.push((i, e.to_string())),
        }
        fs::remove_file(other(&new)).unwrap();
    }
    say(&format!(
        "reused_inode_numbers over {backend:?}: {reused} of {ROUNDS} rounds reused the old \
         inode number, {} failed",
        failed.len()
    ));
    assert!(
        failed.is_empty(),
        "{} of {ROUNDS} rounds failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}
on_both!(reused_inode_numbers: reused_inode_numbers_local, reused_inode_numbers_gluster);

// ---- inode numbers shown -------------------------------------------------------------

/// `stat` through the mount shows the backing filesystem's inode numbers
/// (GlusterFS's are >= 2^62), the same whether the kernel answers from its
/// cache or asks again, in listings too, and hard links share one.
fn inode_numbers_are_the_backing_ones(backend: Backend) {
    let Some(n) = Nodes::new(backend, "inos", &[]) else {
        return;
    };
    fs::write(n.a.path("f"), b"x").unwrap();
    fs::hard_link(n.a.path("f"), n.a.path("g")).unwrap();
    fs::create_dir(n.a.path("d")).unwrap();
    for name in ["f", "g", "d"] {
        let native = fs::symlink_metadata(n.native_a.join(name)).unwrap().ino();
        for m in [&n.a, &n.b] {
            assert_eq!(
                fs::symlink_metadata(m.path(name)).unwrap().ino(),
                native,
                "{name}"
            );
        }
        let listed = fs::read_dir(&n.b.mountpoint)
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.file_name() == name)
            .unwrap();
        assert_eq!(
            std::os::unix::fs::DirEntryExt::ino(&listed),
            native,
            "{name} listed"
        );
    }
    let f = fs::metadata(n.a.path("f")).unwrap().ino();
    assert_eq!(
        fs::metadata(n.b.path("g")).unwrap().ino(),
        f,
        "hard links differ"
    );
    // After the attribute cache expired (getattr instead of the lookup's reply).
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fs::metadata(n.a.path("g")).unwrap().ino(), f);
    say(&format!(
        "inode numbers over {backend:?}: e.g. {f} (>= 2^62: {})",
        f >= 1 << 62
    ));
}
on_both!(inode_numbers_are_the_backing_ones: inode_numbers_local, inode_numbers_gluster);

// ---- the guard's renames where RENAME_NOREPLACE is refused (GlusterFS) ----------------

/// `baseguard list --json` through a mountpoint: the quarantined paths.
fn quarantined(dir: &Path) -> Vec<String> {
    let o = run(Command::new(BIN).args(["list", "--json", "--dir"]).arg(dir));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut p: Vec<String> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    p.sort();
    p
}

/// Nova's download: `<sha>.part` renamed onto the final name in `_base`,
/// which the guard does with RENAME_NOREPLACE (GlusterFS: EINVAL, then a
/// plain rename), and a second download over it, whose old file is kept.
fn renames_onto_protected_names(backend: Backend) {
    let Some(n) = Nodes::new(backend, "renames", &[]) else {
        return;
    };
    fs::create_dir(n.a.path("_base")).unwrap();
    let (part, fin) = (format!("_base/{SHA}.part"), format!("_base/{SHA}"));
    fs::write(n.a.path(&part), b"first").unwrap();
    fs::rename(n.a.path(&part), n.a.path(&fin)).unwrap();
    assert_eq!(fs::read(n.b.path(&fin)).unwrap(), b"first");
    assert!(quarantined(&n.a.mountpoint).is_empty());
    // Node B downloads the same image again and renames over it.
    fs::write(n.b.path(&part), b"second").unwrap();
    fs::rename(n.b.path(&part), n.b.path(&fin)).unwrap();
    assert_eq!(fs::read(n.b.path(&fin)).unwrap(), b"second");
    // Node A's kernel keeps names for 1 s (the mount's entry timeout).
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fs::read(n.a.path(&fin)).unwrap(), b"second");
    assert_eq!(quarantined(&n.a.mountpoint), vec![fin.clone()]);
    assert!(!n.native_a.join(&part).exists());
}
on_both!(renames_onto_protected_names: renames_onto_protected_names_local, renames_onto_protected_names_gluster);

// ---- interrupted lock waits ------------------------------------------------------------

/// Wait for `c` at most `limit`; `None` if it is still running then.
fn wait_for(c: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    wait_timeout(c, limit)
}

/// How long a waiter may take to give up before the test calls it stuck
/// (then the holder lets go, so the test ends, and fails).
const STUCK: Duration = Duration::from_secs(15);

/// A blocking lock wait through node A while node B holds the lock ends
/// when the waiter is interrupted: `flock -w 2` times out with rc 1, a
/// signal handler's exception interrupts fcntl/flock waits, SIGKILL ends the
/// waiter (never stuck in D state), and no lock is left behind.
fn interrupted_lock_waits(backend: Backend) {
    let Some(n) = Nodes::new(backend, "intr", &[]) else {
        return;
    };
    let mut figures = Vec::new();
    // util-linux flock -w: SIGALRM after 2 s.
    fs::write(n.a.path("f-flock"), b"x").unwrap();
    let h = Holder::new("flock", &n.b.path("f-flock"));
    let t = Instant::now();
    let mut c = Command::new("flock")
        .args(["-w", "2"])
        .arg(n.a.path("f-flock"))
        .arg("true")
        .spawn()
        .unwrap();
    let st = wait_for(&mut c, STUCK);
    let took = t.elapsed();
    if st.is_none() {
        h.release();
        let st = c.wait().unwrap();
        panic!("flock -w 2 was not interrupted: it waited for the holder (rc {st})");
    }
    assert_eq!(st.unwrap().code(), Some(1), "flock -w 2 must time out");
    figures.push(format!("flock -w 2: rc 1 after {took:?}"));
    h.release();

    // A signal handler that raises, during fcntl (POSIX), OFD and flock
    // waits; the waiter lives on, so a lock left behind would show.
    for kind in ["posix", "ofd", "flock"] {
        let name = format!("f-{kind}");
        fs::write(n.a.path(&name), b"x").unwrap();
        let h = Holder::new(kind, &n.b.path(&name));
        let script = format!(
            "{LOCKER}\nimport signal\ndef alarm(*a):\n    raise TimeoutError()\n\
             signal.signal(signal.SIGALRM, alarm)\nsignal.alarm(2)\n\
             try:\n    lock(True)\n    print('locked', flush=True)\n\
             except TimeoutError:\n    print('interrupted', flush=True)\nsys.stdin.read()\n"
        );
        let t = Instant::now();
        let mut w = Command::new(PY)
            .args(["-c", &script, kind])
            .arg(n.a.path(&name))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = w.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(STUCK) {
            Ok(l) => l,
            Err(_) => {
                h.release();
                let _ = w.kill();
                let _ = w.wait();
                panic!("{kind}: the lock wait was not interrupted");
            }
        };
        let took = t.elapsed();
        assert_eq!(line.trim(), "interrupted", "{kind}");
        figures.push(format!("{kind}: EINTR after {took:?}"));
        // The holder lets go; node B can lock at once: the interrupted
        // waiter (still running) holds nothing.
        h.release();
        assert!(
            eventually(|| try_lock(kind, &n.b.path(&name))).is_some(),
            "{kind}: the interrupted wait left a lock behind"
        );
        drop(w.stdin.take());
        let _ = w.wait();
    }

    // SIGKILL of a waiter: it dies, instead of sleeping uninterruptibly
    // until the holder lets go.
    fs::write(n.a.path("f-kill"), b"x").unwrap();
    let h = Holder::new("flock", &n.b.path("f-kill"));
    let mut c = Command::new("flock")
        .arg(n.a.path("f-kill"))
        .arg("true")
        .spawn()
        .unwrap();
    // Let it reach the wait (if it is not there yet, SIGKILL ends it anyway).
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    c.kill().unwrap();
    let st = wait_for(&mut c, STUCK);
    let took = t.elapsed();
    if st.is_none() {
        h.release();
        let _ = c.wait();
        panic!("a SIGKILLed lock waiter stayed until the holder let go");
    }
    figures.push(format!("SIGKILLed waiter gone after {took:?}"));
    h.release();
    assert!(
        eventually(|| try_lock("flock", &n.b.path("f-kill"))).is_some(),
        "the killed waiter left a lock behind"
    );
    say(&format!(
        "interrupted lock waits over {backend:?}: {}",
        figures.join("; ")
    ));
}
on_both!(interrupted_lock_waits: interrupted_lock_waits_local, interrupted_lock_waits_gluster);

// ---- no ESTALE when the backing filesystem's caches are dropped ------------------------

/// 100 directories held open through node A, more files read than its
/// descriptor cache keeps (the daemon runs under a 1024-descriptor limit),
/// the kernel's caches dropped (GlusterFS's client then forgets its inodes,
/// and their file handles stop opening): stat, open and readdir through
/// both nodes still work, for every file.
fn no_estale_after_dropping_caches(backend: Backend) {
    let Some(n) = Nodes::wrapped(backend, "estale", &["prlimit", "--nofile=1024:1024"], &[]) else {
        return;
    };
    const DIRS: usize = 100;
    let (mut held, mut held_files) = (Vec::new(), Vec::new());
    for i in 0..DIRS {
        let d = n.a.path(&format!("d{i:03}"));
        fs::create_dir(&d).unwrap();
        fs::write(d.join("f"), format!("{i}")).unwrap();
        // Held the way a shell's cwd or an O_PATH descriptor holds it: the
        // daemon is not asked to open it.
        held.push(
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(&d)
                .unwrap(),
        );
        // And a file held the same way, then renamed through the mount.
        fs::write(d.join("x"), b"x").unwrap();
        held_files.push(
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(d.join("x"))
                .unwrap(),
        );
        fs::rename(d.join("x"), d.join("y")).unwrap();
    }
    // Other files, read through node A: more than its descriptors.
    const MANY: usize = 1000;
    fs::create_dir(n.native_b.join("many")).unwrap();
    for i in 0..MANY {
        fs::write(n.native_b.join(format!("many/{i}")), b"x").unwrap();
    }
    for i in 0..MANY {
        assert_eq!(fs::read(n.a.path(&format!("many/{i}"))).unwrap(), b"x");
    }
    let st = n.a.stats();
    let before = format!("{} inodes, {} descriptors", st["inodes"], st["descriptors"]);
    fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap();
    // Past the mount's attribute timeout: the kernel asks the daemon.
    std::thread::sleep(Duration::from_millis(1100));
    let mut failed = Vec::new();
    // First, before any listing looks the names up again.
    for (i, h) in held_files.iter().enumerate() {
        if let Err(e) = h.metadata() {
            failed.push(format!("held d{i:03}/y: {e}"));
        }
    }
    for (i, h) in held.iter().enumerate() {
        let via = PathBuf::from(format!("/proc/self/fd/{}", h.as_raw_fd()));
        let r = h
            .metadata()
            .and_then(|_| fs::read_to_string(via.join("f")))
            .and_then(|s| {
                assert_eq!(s, format!("{i}"));
                fs::read_dir(&via).map(|r| r.count())
            });
        if let Err(e) = r {
            failed.push(format!("held d{i:03}: {e}"));
        }

        for m in [&n.a, &n.b] {
            let d = m.path(&format!("d{i:03}"));
            let r = fs::metadata(&d)
                .and_then(|_| fs::read_to_string(d.join("f")))
                .and_then(|_| fs::read_dir(&d).map(|r| r.count()));
            if let Err(e) = r {
                failed.push(format!("{}: {e}", d.display()));
            }
        }
    }
    say(&format!(
        "no_estale_after_dropping_caches over {backend:?}: {} of {} accesses failed \
         (node A held {before} before the caches were dropped)",
        failed.len(),
        4 * DIRS
    ));
    assert!(
        failed.is_empty(),
        "{} of {} accesses failed, e.g. {:?}",
        failed.len(),
        4 * DIRS,
        &failed[..failed.len().min(3)]
    );
}
on_both!(no_estale_after_dropping_caches: no_estale_after_dropping_caches_local, no_estale_after_dropping_caches_gluster);

// ---- the incident, with restore on access -------------------------------------------------

fn ok_cmd(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Node A's image cache manager deletes a base file that an instance on
/// node B uses (and one nobody uses); qemu on node B opens the instance
/// disk, and the base file comes back with its bytes; the unused one stays
/// deleted on both nodes.
fn the_incident_heals_on_the_other_node(backend: Backend) {
    let Some(n) = Nodes::new(backend, "incident", &[]) else {
        return;
    };
    let uuid = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let unused = "0000000000000000000000000000000000000000";
    fs::create_dir(n.b.path("_base")).unwrap();
    fs::create_dir(n.b.path(uuid)).unwrap();
    // Base files made as Nova makes them: a `.part`, renamed into place.
    for (name, pattern) in [(SHA, "0x42"), (unused, "0x11")] {
        let part = n.b.path(&format!("_base/{name}.part"));
        ok_cmd(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&part)
                .arg("16M"),
        );
        ok_cmd(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 1M")])
                .arg(&part),
        );
        fs::rename(&part, n.b.path(&format!("_base/{name}"))).unwrap();
    }
    let base_b = n.b.path(&format!("_base/{SHA}"));
    let disk = n.b.path(&format!("{uuid}/disk"));
    ok_cmd(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base_b)
            .arg(&disk),
    );
    // Node A removes both, as Nova does.
    for name in [SHA, unused] {
        ok_cmd(
            Command::new(PY)
                .args(["-c", "import os, sys; os.remove(sys.argv[1])"])
                .arg(n.a.path(&format!("_base/{name}"))),
        );
    }
    assert!(!n.native_b.join("_base").join(SHA).exists());
    // Node B's kernel keeps names for 1 s.
    std::thread::sleep(Duration::from_millis(1200));
    let out = ok_cmd(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-t", "none", "-c", "read -P 0x42 0 1M"])
            .arg(&disk),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(n.native_a.join("_base").join(SHA).exists());
    assert!(n.b.stats()["healed"].as_u64().unwrap() >= 1);
    for m in [&n.a, &n.b] {
        let e = fs::metadata(m.path(&format!("_base/{unused}"))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
    assert_eq!(
        quarantined(&n.a.mountpoint),
        vec![format!("_base/{unused}")]
    );
}
on_both!(the_incident_heals_on_the_other_node: incident_local, incident_gluster);

// ---- deletes, restores and purges racing on two nodes ----------------------------------------

/// Node A and node B delete the same protected files while node A restores
/// and node B purges: no entry is restored twice or both restored and
/// purged, and every file ends at its path with its bytes, held in the
/// quarantine, or reported purged.
fn racing_restores_and_purges_lose_nothing(backend: Backend) {
    let Some(n) = Nodes::new(backend, "races", &[]) else {
        return;
    };
    const N: usize = 40;
    fs::create_dir(n.a.path("_base")).unwrap();
    let body = |i: usize| format!("base file {i} ").repeat(100 + i);
    for i in 0..N {
        fs::write(n.a.path(&format!("_base/r{i:02}")), body(i)).unwrap();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let restored = std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new());
    let purged = std::sync::Mutex::new(Vec::<(String, String)>::new());
    let cli = |args: &[&str], dir: &Path| run(Command::new(BIN).args(args).arg("--dir").arg(dir));
    std::thread::scope(|s| {
        for (k, m) in [&n.a, &n.b].into_iter().enumerate() {
            let stop = &stop;
            s.spawn(move || {
                let mut i = k * 7;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs::remove_file(m.path(&format!("_base/r{:02}", i % N)));
                    i += 3;
                }
            });
        }
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for p in quarantined(&n.a.mountpoint).iter().take(3) {
                    let o = cli(&["restore", p], &n.a.mountpoint);
                    for l in String::from_utf8_lossy(&o.stdout).lines() {
                        if let Some(id) = l.strip_prefix("restored ") {
                            let id = id.split(' ').next().unwrap().to_string();
                            *restored.lock().unwrap().entry(id).or_default() += 1;
                        }
                    }
                }
            }
        });
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let o = cli(&["list", "--json"], &n.b.mountpoint);
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                if let Some(e) = v["entries"].as_array().and_then(|a| a.first()) {
                    let id = e["id"].as_str().unwrap().to_string();
                    let o = cli(&["purge", &id, "--yes", "--force"], &n.b.mountpoint);
                    if o.status.success() {
                        let path = e["path"].as_str().unwrap().to_string();
                        purged.lock().unwrap().push((id, path));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let (restored, purged) = (restored.into_inner().unwrap(), purged.into_inner().unwrap());
    for (id, k) in &restored {
        assert_eq!(*k, 1, "{id} restored {k} times");
        assert!(
            !purged.iter().any(|(p, _)| p == id),
            "{id} restored and purged"
        );
    }
    let held = quarantined(&n.a.mountpoint);
    let (mut at, mut q, mut gone) = (0, 0, 0);
    for i in 0..N {
        let rel = format!("_base/r{i:02}");
        match fs::read_to_string(n.native_a.join(&rel)) {
            Ok(s) => {
                assert_eq!(s, body(i), "{rel}");
                at += 1;
            }
            Err(_) if held.contains(&rel) => q += 1,
            Err(_) if purged.iter().any(|(_, p)| *p == rel) => gone += 1,
            Err(e) => panic!("{rel} was lost: {e}"),
        }
    }
    say(&format!(
        "races over {backend:?}: {} restores, {} purges; end: {at} at their path, {q} held, \
         {gone} purged",
        restored.len(),
        purged.len()
    ));
    assert!(
        !restored.is_empty() && !purged.is_empty(),
        "too little happened"
    );
}
on_both!(racing_restores_and_purges_lose_nothing: races_local, races_gluster);
