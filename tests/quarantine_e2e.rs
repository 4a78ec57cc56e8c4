//! The quarantine issue's acceptance criteria, end to end through real
//! mounts: the incident and its restore command, what is (not) protected,
//! what a deleted file looks like until restored, crash safety under
//! SIGKILL, multi-node races, expiry, and truncation.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

const PY: &str = "/usr/bin/python3";
const SHA: &str = "3c1f2a9e8d7b6c5a4f3e2d1c0b9a8f7e6d5c4b3a";
const UUID: &str = "9d2e4f6a-1b3c-4d5e-8f70-a1b2c3d4e5f6";

// ---- helpers ---------------------------------------------------------------

/// A scratch directory holding the backing directory `instances/_base`.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let b = t.path().join("instances");
    fs::create_dir_all(b.join("_base")).unwrap();
    (t, b)
}

/// Run the CLI (its audit logging kept off stderr).
fn bg(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn ok(what: &str, o: &Output) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `baseguard list --json` (held entries), or with `--all`.
fn list(dir: &Path, all: bool) -> Vec<Value> {
    let mut args = vec!["list", "--json"];
    if all {
        args.push("--all");
    }
    let s = ok("list", &bg(&args, dir));
    serde_json::from_str::<Value>(&s).unwrap()["entries"]
        .as_array()
        .unwrap()
        .clone()
}

fn paths_of(l: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = l
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn id_of(e: &Value) -> String {
    e["id"].as_str().unwrap().to_string()
}

/// The quarantined bytes of entry `id`, read on the backing side.
fn data_of(backing: &Path, id: &str) -> Vec<u8> {
    fs::read(backing.join(format!(".baseguard/entries/{id}.data"))).unwrap()
}

/// Files in the quarantine's entries directory (none if it does not exist).
fn entry_files(backing: &Path) -> Vec<String> {
    match fs::read_dir(backing.join(".baseguard/entries")) {
        Ok(rd) => rd
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error").raw_os_error().unwrap()
}

fn cmd_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    ok(&format!("{cmd:?}"), &o)
}

/// Delete the way Nova's image cache manager does; returns the deleting
/// process's pid.
fn nova_remove(path: &Path) -> u32 {
    let child = Command::new(PY)
        .args(["-c", "import os, sys; os.remove(sys.argv[1])"])
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let o = child.wait_with_output().unwrap();
    ok("python os.remove", &o);
    pid
}

/// A tiny PRNG (xorshift64*), seeded from the clock or `BG_E2E_SEED`.
struct Rng(u64);

impl Rng {
    fn seeded(test: &str) -> Rng {
        let seed = std::env::var("BG_E2E_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{test}: seed {seed} (rerun with BG_E2E_SEED={seed})");
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Distinct, recognisable contents for file `i` of a set.
fn contents(tag: &str, i: usize) -> Vec<u8> {
    let mut v = format!("{tag}{i:04}:").into_bytes();
    v.extend((0..64).map(|k| ((i * 31 + k * 7) % 251) as u8));
    v
}

// ---- 1. the incident ---------------------------------------------------------

#[test]
fn the_incident_with_a_restore_command() {
    let (_t, backing) = scratch();
    let a = Mount::new(&backing, &["--no-heal"]);
    let b = Mount::new(&backing, &["--no-heal"]);

    // Node B downloads the base image (as Nova does: to `.part`, then a
    // rename into place) and boots an instance on it.
    let base_b = b.path(&format!("_base/{SHA}"));
    let part = b.path(&format!("_base/{SHA}.part"));
    cmd_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&part)
            .arg("4M"),
    );
    cmd_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x42 0 1M"])
            .arg(&part),
    );
    fs::rename(&part, &base_b).unwrap();
    fs::create_dir(b.path(UUID)).unwrap();
    let disk = b.path(&format!("{UUID}/disk"));
    cmd_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base_b)
            .arg(&disk),
    );
    let read = || {
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -P 0x42 0 1M"])
            .arg(&disk)
            .output()
            .unwrap()
    };
    let o = read();
    assert!(o.status.success(), "{o:?}");

    // Node A's image cache manager thinks the base is unused and deletes it.
    let pid = nova_remove(&a.path(&format!("_base/{SHA}")));
    assert!(!backing.join("_base").join(SHA).exists());

    // The quarantine names the culprit.
    let l = list(&a.mountpoint, false);
    assert_eq!(l.len(), 1, "{l:#?}");
    let e = &l[0];
    assert_eq!(e["path"], format!("_base/{SHA}"));
    assert_eq!(e["why"], "unlink");
    assert_eq!(e["who"]["comm"], "python3", "{e:#}");
    assert_eq!(e["who"]["pid"], pid, "{e:#}");
    assert_eq!(e["who"]["uid"], 0, "{e:#}");
    assert!(
        e["who"]["cmdline"].as_str().unwrap().contains("os.remove"),
        "{e:#}"
    );
    let id = id_of(e);

    // Node B's kernel forgets the name within the 1 s TTL: the instance's
    // disk no longer opens (no restore on access with --no-heal).
    std::thread::sleep(Duration::from_millis(1200));
    let o = read();
    assert!(
        !o.status.success(),
        "the disk opened without its base: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No such file or directory"), "{err}");

    // The operator restores it on node B by id.
    let out = ok("restore", &bg(&["restore", &id], &b.mountpoint));
    assert!(out.starts_with(&format!("restored {id} to ")), "{out}");
    let o = read();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(out.contains("read 1048576/1048576 bytes"), "{out}");
    assert!(list(&b.mountpoint, true).is_empty());
}

// ---- 2. what is not protected really goes ------------------------------------

#[test]
fn unprotected_and_ignored_deletions_really_delete() {
    let (_t, backing) = scratch();
    let m = Mount::new(&backing, &[]);
    let files = [
        "_base/x.part",
        "_base/x.converted",
        "console.log",
        "compute_nodes",
        &format!("{UUID}/disk.info"),
        &format!("{UUID}/console.log"),
    ];
    fs::create_dir(m.path(UUID)).unwrap();
    let tree = "9d2e4f6a-0000-4d5e-8f70-a1b2c3d4e5f6_del";
    fs::create_dir_all(m.path(&format!("{tree}/a/b/c"))).unwrap();
    for (i, f) in files.iter().enumerate() {
        fs::write(m.path(f), contents("u", i)).unwrap();
    }
    for f in ["disk", "a/x", "a/b/y", "a/b/c/z", "a/b/c/.hidden"] {
        fs::write(m.path(&format!("{tree}/{f}")), b"tree").unwrap();
    }
    fs::write(m.path("_base/abc"), b"protected").unwrap();

    for f in &files {
        fs::remove_file(m.path(f)).unwrap();
    }
    cmd_ok(Command::new("rm").arg("-rf").arg(m.path(tree)));
    for f in files.iter().chain([&tree]) {
        assert!(
            fs::symlink_metadata(backing.join(f)).is_err(),
            "{f} still in the backing directory"
        );
        assert_eq!(errno(fs::symlink_metadata(m.path(f))), libc::ENOENT);
    }
    assert!(list(&m.mountpoint, true).is_empty());
    assert!(
        entry_files(&backing).is_empty(),
        "{:?}",
        entry_files(&backing)
    );

    // The control: a protected file goes to the quarantine.
    fs::remove_file(m.path("_base/abc")).unwrap();
    assert!(!backing.join("_base/abc").exists());
    let l = list(&m.mountpoint, true);
    assert_eq!(paths_of(&l), ["_base/abc"]);
    assert_eq!(data_of(&backing, &id_of(&l[0])), b"protected");
    drop(m);

    // --protect and --ignore replace the defaults.
    let (_t2, backing) = scratch();
    let m = Mount::new(
        &backing,
        &["--protect", "snapshots/**", "--ignore", "snapshots/*.tmp"],
    );
    fs::create_dir_all(m.path("snapshots/deep")).unwrap();
    let all = [
        "snapshots/s1",
        "snapshots/s1.tmp",
        "snapshots/deep/s2",
        "snapshots/deep/s2.tmp",
        "_base/abc",
        "_base/abc.part",
    ];
    for (i, f) in all.iter().enumerate() {
        fs::write(m.path(f), contents("p", i)).unwrap();
    }
    for f in &all {
        fs::remove_file(m.path(f)).unwrap();
        assert!(!backing.join(f).exists(), "{f}");
    }
    let l = list(&m.mountpoint, true);
    // The ignore glob is per component: `snapshots/*.tmp` does not reach
    // into `snapshots/deep/`.
    assert_eq!(
        paths_of(&l),
        ["snapshots/deep/s2", "snapshots/deep/s2.tmp", "snapshots/s1"]
    );
    for e in &l {
        let i = all.iter().position(|f| *f == e["path"]).unwrap();
        assert_eq!(data_of(&backing, &id_of(e)), contents("p", i));
    }
    // `_base` is no longer protected: an rm -rf of it really deletes.
    fs::write(m.path("_base/zzz"), b"z").unwrap();
    cmd_ok(Command::new("rm").arg("-rf").arg(m.path("_base")));
    assert!(!backing.join("_base").exists());
    assert_eq!(list(&m.mountpoint, true).len(), 3);
}

// ---- 3. a deleted file stays deleted until restored ---------------------------

#[test]
fn a_deleted_protected_file_stays_deleted_until_restored() {
    let (_t, backing) = scratch();
    let a = Mount::new(&backing, &[]);
    let b = Mount::new(&backing, &[]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    fs::write(a.path("_base/abc"), &data).unwrap();
    fs::write(a.path("_base/other"), b"other").unwrap();
    // B knows the file (a cached positive entry) before A deletes it.
    assert_eq!(fs::read(b.path("_base/abc")).unwrap(), data);

    cmd_ok(Command::new("rm").arg(a.path("_base/abc")));
    assert!(!backing.join("_base/abc").exists());
    std::thread::sleep(Duration::from_millis(1200));

    let gone = |m: &Mount| {
        let p = m.path("_base/abc");
        assert_eq!(errno(fs::metadata(&p)), libc::ENOENT);
        assert_eq!(errno(fs::symlink_metadata(&p)), libc::ENOENT);
        assert_eq!(errno(fs::File::open(&p)), libc::ENOENT);
        assert_eq!(
            errno(fs::OpenOptions::new().write(true).open(&p)),
            libc::ENOENT
        );
        let names: Vec<String> = fs::read_dir(m.path("_base"))
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["other"]);
    };
    // Repeatedly, across several TTLs, from both mounts.
    for _ in 0..5 {
        gone(&a);
        gone(&b);
        std::thread::sleep(Duration::from_millis(300));
    }
    // The O_WRONLY opens created nothing.
    assert!(!backing.join("_base/abc").exists());
    let l = list(&a.mountpoint, false);
    assert_eq!(paths_of(&l), ["_base/abc"]);

    // Restore through A's mountpoint: visible at once there, byte-identical.
    let out = ok("restore", &bg(&["restore", "_base/abc"], &a.mountpoint));
    assert!(out.starts_with(&format!("restored {} to ", id_of(&l[0]))));
    let md = fs::metadata(a.path("_base/abc")).unwrap();
    assert_eq!(md.len(), data.len() as u64);
    assert_eq!(fs::read(a.path("_base/abc")).unwrap(), data);
    let start = Instant::now();
    loop {
        match fs::read(b.path("_base/abc")) {
            Ok(d) => {
                assert_eq!(d, data);
                break;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::NotFound);
                assert!(
                    start.elapsed() < Duration::from_millis(1200),
                    "mount B still does not see the restored file"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(list(&a.mountpoint, true).is_empty());
}

// ---- 4. crash safety -----------------------------------------------------------

const CRASH_FILES: usize = 2000;

/// Two of these (even and odd names) delete what they list through the
/// mount (no lookups of names already gone). Each pauses 1.5 ms after a
/// successful deletion, so that three kills at most 400 ms in can never see
/// all 2,000 files gone on any machine: every kill lands mid-run, while
/// requests are in flight.
const DELETER: &str = r#"
import os, sys, time
d, off = sys.argv[1], int(sys.argv[2])
names = sorted(n for n in os.listdir(d) if int(n[1:]) % 2 == off)
print("go", flush=True)
for n in names:
    try:
        os.remove(os.path.join(d, n))
    except OSError:
        continue
    time.sleep(0.0015)
"#;

/// Every file is at its path or held in the quarantine, exactly once, with
/// its bytes and inode, as seen from `root` (the backing directory or a
/// mount of it; quarantined data is read on the backing side). Returns
/// (at path, quarantined, pending records).
fn check_crash_invariant(root: &Path, backing: &Path, inos: &[u64]) -> (usize, usize, usize) {
    let all = list(root, true);
    let mut held: HashMap<String, Vec<&Value>> = HashMap::new();
    let mut pending = Vec::new();
    for e in &all {
        let path = e["path"].as_str().unwrap().to_string();
        match e["state"].as_str().unwrap() {
            "held" => held.entry(path).or_default().push(e),
            "pending" => pending.push((path, e)),
            s => panic!("unexpected state {s}: {e:#}"),
        }
    }
    // A record whose data never arrived (the kill came between the two
    // steps of a stash): the file never left its path, though a later
    // deletion may have quarantined it since under a new id. The stale
    // record is harmless (hidden from `list`, swept after an hour).
    for (path, e) in &pending {
        assert!(
            fs::symlink_metadata(root.join(path)).is_ok() || held.contains_key(path),
            "pending record, and the file neither at its path nor held: {e:#}"
        );
    }
    let (mut at_path, mut quarantined) = (0, 0);
    for (i, &ino) in inos.iter().enumerate() {
        let rel = format!("_base/f{i:04}");
        let here = fs::symlink_metadata(root.join(&rel)).ok();
        let kept = held.remove(&rel).unwrap_or_default();
        match (&here, kept.as_slice()) {
            (Some(md), []) => {
                at_path += 1;
                assert_eq!(md.ino(), ino, "{rel}: another inode");
                assert_eq!(fs::read(root.join(&rel)).unwrap(), contents("f", i));
            }
            (None, [e]) => {
                quarantined += 1;
                assert_eq!(e["ino"], ino, "{rel}: {e:#}");
                assert_eq!(e["size"], contents("f", i).len(), "{rel}: {e:#}");
                assert_eq!(data_of(backing, &id_of(e)), contents("f", i), "{rel}");
            }
            _ => panic!(
                "{rel}: at its path: {}, quarantine entries: {kept:#?}",
                here.is_some()
            ),
        }
    }
    assert!(held.is_empty(), "entries for unknown paths: {held:#?}");
    (at_path, quarantined, pending.len())
}

#[test]
fn sigkill_mid_deletion_loses_nothing() {
    let (_t, backing) = scratch();
    let mut inos = Vec::with_capacity(CRASH_FILES);
    for i in 0..CRASH_FILES {
        let p = backing.join(format!("_base/f{i:04}"));
        fs::write(&p, contents("f", i)).unwrap();
        inos.push(fs::metadata(&p).unwrap().ino());
    }
    let mut rng = Rng::seeded("sigkill_mid_deletion_loses_nothing");
    let mut m = Mount::new(&backing, &[]);
    let mut last_quarantined = 0;
    for cycle in 0..3 {
        let deleters: Vec<_> = (0..2)
            .map(|off| {
                let mut py = Command::new(PY)
                    .args(["-c", DELETER])
                    .arg(m.path("_base"))
                    .arg(off.to_string())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut line = String::new();
                BufReader::new(py.stdout.take().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                assert_eq!(line, "go\n");
                py
            })
            .collect();
        let delay = 50 + rng.below(351);
        std::thread::sleep(Duration::from_millis(delay));
        m.crash();
        for mut py in deleters {
            py.wait().unwrap();
        }
        // Both deleters were still running when the daemon died: each has
        // files left (after the crash their removals fail at once).
        for off in 0..2 {
            assert!(
                (off..CRASH_FILES)
                    .step_by(2)
                    .any(|i| backing.join(format!("_base/f{i:04}")).exists()),
                "cycle {cycle}: deleter {off} finished within {delay} ms"
            );
        }

        // Checked on the plain backing directory, then through a new mount.
        let (at, q, pending) = check_crash_invariant(&backing, &backing, &inos);
        eprintln!(
            "cycle {cycle}: killed after {delay} ms: {at} at their path, {q} quarantined, {pending} pending records"
        );
        assert!(q > last_quarantined, "cycle {cycle}: nothing was deleted");
        assert!(at > 0);
        last_quarantined = q;
        m = Mount::new(&backing, &[]);
        assert_eq!(
            check_crash_invariant(&m.mountpoint, &backing, &inos),
            (at, q, pending)
        );
        // The new daemon serves the survivors.
        let first = (0..CRASH_FILES)
            .find(|i| backing.join(format!("_base/f{i:04}")).exists())
            .unwrap();
        assert_eq!(
            fs::read(m.path(&format!("_base/f{first:04}"))).unwrap(),
            contents("f", first)
        );
    }
    // Quarantined files restore intact after the crashes.
    let held = list(&m.mountpoint, false);
    for e in held.iter().take(5) {
        let p = e["path"].as_str().unwrap();
        let i: usize = p["_base/f".len()..].parse().unwrap();
        ok("restore", &bg(&["restore", &id_of(e)], &m.mountpoint));
        assert_eq!(fs::read(m.path(p)).unwrap(), contents("f", i));
    }
    check_crash_invariant(&backing, &backing, &inos);
}

// ---- 5. multi-node races --------------------------------------------------------

#[derive(Default)]
struct Ledger {
    /// id -> number of "restored <id>" lines.
    restored: HashMap<String, usize>,
    /// id -> original path, from "purged <id> (<path>, ...)" lines.
    purged: HashMap<String, String>,
    deletes_ok: usize,
    cli_failures: usize,
}

#[test]
fn racing_deletes_restores_and_purges_on_two_nodes_lose_nothing() {
    const N: usize = 200;
    let (_t, backing) = scratch();
    let names: Vec<String> = (0..N).map(|i| format!("r{i:03}")).collect();
    let mut inos = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let p = backing.join("_base").join(n);
        fs::write(&p, contents("r", i)).unwrap();
        inos.push(fs::metadata(&p).unwrap().ino());
    }
    let a = Mount::new(&backing, &[]);
    let b = Mount::new(&backing, &[]);
    let mps = [a.mountpoint.clone(), b.mountpoint.clone()];
    let seed = Rng::seeded("racing_deletes_restores_and_purges").next();
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let names = Arc::new(names);
    let mut threads = Vec::new();

    // Deleters: two per node, walking the same names in different orders.
    for t in 0..4u64 {
        let (stop, ledger, names) = (stop.clone(), ledger.clone(), names.clone());
        let mp = mps[(t % 2) as usize].clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(seed ^ ((t + 1) * 0x9e37_79b9));
            while !stop.load(Ordering::Relaxed) {
                let n = &names[rng.below(N as u64) as usize];
                if fs::remove_file(mp.join("_base").join(n)).is_ok() {
                    ledger.lock().unwrap().deletes_ok += 1;
                }
            }
        }));
    }
    // Restorers (by path, on either node) and a purger (by id).
    for t in 0..3u64 {
        let (stop, ledger) = (stop.clone(), ledger.clone());
        let mps = mps.clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(seed ^ ((t + 11) * 0x51_7cc1_b727));
            while !stop.load(Ordering::Relaxed) {
                let dir = &mps[rng.below(2) as usize];
                let l = list(dir, false);
                if l.is_empty() {
                    continue;
                }
                let e = &l[rng.below(l.len() as u64) as usize];
                let purge = t == 2;
                let o = if purge {
                    bg(&["purge", &id_of(e), "--yes", "--force"], dir)
                } else if rng.below(2) == 0 {
                    bg(&["restore", e["path"].as_str().unwrap()], dir)
                } else {
                    bg(&["restore", &id_of(e)], dir)
                };
                let out = String::from_utf8_lossy(&o.stdout);
                let mut l = ledger.lock().unwrap();
                if !o.status.success() {
                    l.cli_failures += 1;
                }
                for line in out.lines() {
                    let w: Vec<&str> = line.split(' ').collect();
                    match w.as_slice() {
                        ["restored", id, ..] => *l.restored.entry(id.to_string()).or_default() += 1,
                        ["purged", id, path, ..] => {
                            let path = path.trim_start_matches('(').trim_end_matches(',');
                            let old = l.purged.insert(id.to_string(), path.to_string());
                            assert!(old.is_none(), "{id} purged twice");
                        }
                        _ => {}
                    }
                }
                drop(l);
                if purge {
                    std::thread::sleep(Duration::from_millis(150));
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }

    let l = ledger.lock().unwrap();
    eprintln!(
        "{} deletions, {} restores, {} purges, {} CLI refusals",
        l.deletes_ok,
        l.restored.len(),
        l.purged.len(),
        l.cli_failures
    );
    assert!(l.deletes_ok > N, "too little happened");
    assert!(!l.restored.is_empty() && !l.purged.is_empty());
    for (id, n) in &l.restored {
        assert_eq!(*n, 1, "{id} restored {n} times");
        assert!(!l.purged.contains_key(id), "{id} both restored and purged");
    }
    let mut purged_paths: HashMap<&str, usize> = HashMap::new();
    for p in l.purged.values() {
        *purged_paths.entry(p.as_str()).or_default() += 1;
    }

    let all = list(&backing, true);
    let mut held: HashMap<String, Vec<&Value>> = HashMap::new();
    for e in &all {
        assert_eq!(e["state"], "held", "left behind: {e:#}");
        held.entry(e["path"].as_str().unwrap().to_string())
            .or_default()
            .push(e);
    }
    let (mut at, mut q, mut gone) = (0, 0, 0);
    for (i, n) in names.iter().enumerate() {
        let rel = format!("_base/{n}");
        let here = fs::symlink_metadata(backing.join(&rel)).ok();
        let kept = held.remove(&rel).unwrap_or_default();
        let purged = purged_paths.get(rel.as_str()).copied().unwrap_or(0);
        match (&here, kept.as_slice(), purged) {
            (Some(md), [], 0) => {
                at += 1;
                assert_eq!(md.ino(), inos[i], "{rel}");
                assert_eq!(fs::read(backing.join(&rel)).unwrap(), contents("r", i));
            }
            (None, [e], 0) => {
                q += 1;
                assert_eq!(e["ino"], inos[i], "{rel}");
                assert_eq!(data_of(&backing, &id_of(e)), contents("r", i), "{rel}");
            }
            (None, [], 1) => gone += 1,
            _ => panic!(
                "{rel}: at its path: {}, held: {kept:#?}, purges reported: {purged}",
                here.is_some()
            ),
        }
    }
    assert!(held.is_empty(), "{held:#?}");
    eprintln!("end: {at} at their path, {q} quarantined, {gone} purged");
    let leftovers: Vec<String> = entry_files(&backing)
        .into_iter()
        .filter(|f| !f.ends_with(".json") && !f.ends_with(".data"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Both daemons still answer, and agree with the backing directory.
    std::thread::sleep(Duration::from_millis(1200));
    let mut want: Vec<String> = fs::read_dir(backing.join("_base"))
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    want.sort();
    for m in [&a, &b] {
        let mut got: Vec<String> = fs::read_dir(m.path("_base"))
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        assert_eq!(got, want);
        assert!(m.stats().is_object());
    }
}

// ---- 6. expiry -------------------------------------------------------------------

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn expiry_purges_old_entries_only() {
    let (_t, backing) = scratch();
    let m = Mount::new(&backing, &["--retain", "2s"]);
    let keep = ["keep1", "keep2.part"];
    for (i, k) in keep.iter().enumerate() {
        fs::write(m.path(&format!("_base/{k}")), contents("k", i)).unwrap();
    }
    fs::write(m.path("console.log"), b"log").unwrap();
    let before: BTreeMap<PathBuf, (u64, i64, i64)> =
        ["_base/keep1", "_base/keep2.part", "console.log"]
            .iter()
            .map(|p| {
                let md = fs::metadata(backing.join(p)).unwrap();
                (PathBuf::from(p), (md.ino(), md.mtime(), md.mtime_nsec()))
            })
            .collect();

    for i in 0..3 {
        fs::write(m.path(&format!("_base/old{i}")), contents("o", i)).unwrap();
    }
    for i in 0..3 {
        fs::remove_file(m.path(&format!("_base/old{i}"))).unwrap();
    }
    let l = list(&m.mountpoint, false);
    assert_eq!(l.len(), 3);
    let s0 = l
        .iter()
        .map(|e| e["quarantined_at"].as_u64().unwrap())
        .max()
        .unwrap();
    // Quarantine the young one in the second the old ones fall due (ages
    // are whole seconds): they go by the next 1 s sweep, it is due a whole
    // second later.
    while unix_secs() < s0 + 2 {
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::write(m.path("_base/young"), b"young").unwrap();
    fs::remove_file(m.path("_base/young")).unwrap();
    let start = Instant::now();
    let l = loop {
        let l = list(&m.mountpoint, false);
        if !l
            .iter()
            .any(|e| e["path"].as_str().unwrap().contains("old"))
        {
            break l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "never purged: {l:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(paths_of(&l), ["_base/young"], "{l:#?}");
    let young = l[0]["quarantined_at"].as_u64().unwrap();
    assert!(unix_secs() < young + 2, "the check came too late");

    // And the young one goes in its turn.
    let start = Instant::now();
    while !list(&m.mountpoint, true).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "young one never purged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        entry_files(&backing).is_empty(),
        "{:?}",
        entry_files(&backing)
    );
    // Nothing else was touched.
    for (p, v) in &before {
        let md = fs::metadata(backing.join(p)).unwrap();
        assert_eq!(
            (md.ino(), md.mtime(), md.mtime_nsec()),
            *v,
            "{}",
            p.display()
        );
    }
    for (i, k) in keep.iter().enumerate() {
        assert_eq!(
            fs::read(m.path(&format!("_base/{k}"))).unwrap(),
            contents("k", i)
        );
    }
    let mut names: Vec<String> = fs::read_dir(backing.join("_base"))
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, keep);
}

// ---- 7. truncation -----------------------------------------------------------------

#[test]
fn truncation_preserves_the_old_contents() {
    let (_t, backing) = scratch();
    let m = Mount::new(&backing, &[]);
    let old_a: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    let old_b: Vec<u8> = (0..70_000u32).map(|i| (i % 239) as u8 ^ 0x5a).collect();
    fs::write(m.path("_base/a"), &old_a).unwrap();
    fs::write(m.path("_base/b"), &old_b).unwrap();
    fs::write(m.path("_base/empty"), b"").unwrap();
    fs::write(m.path("_base/grow"), b"small").unwrap();

    // truncate(1): open without O_TRUNC, then ftruncate.
    cmd_ok(
        Command::new("truncate")
            .args(["-s", "0"])
            .arg(m.path("_base/a")),
    );
    // Python's open(path, 'w'): O_WRONLY|O_CREAT|O_TRUNC on an existing file.
    cmd_ok(
        Command::new(PY)
            .args(["-c", "import sys; open(sys.argv[1], 'w').close()"])
            .arg(m.path("_base/b")),
    );
    for f in ["_base/a", "_base/b"] {
        assert_eq!(fs::metadata(m.path(f)).unwrap().len(), 0, "{f}");
        assert_eq!(fs::read(m.path(f)).unwrap(), b"", "{f}");
        assert_eq!(fs::read(backing.join(f)).unwrap(), b"", "{f}");
    }
    let l = list(&m.mountpoint, true);
    assert_eq!(paths_of(&l), ["_base/a", "_base/b"], "{l:#?}");
    for e in &l {
        assert_eq!(e["state"], "held");
        // truncate(1) opens for writing first: if the kernel still passes
        // the inode through for the writer before it (its RELEASE is
        // asynchronous), the copy is made at that open, as an overwrite.
        let why = e["why"].as_str().unwrap();
        assert!(
            why == "truncate" || (why == "overwrite" && e["path"] == "_base/a"),
            "{e:#}"
        );
        let (want, comm) = if e["path"] == "_base/a" {
            (&old_a, "truncate")
        } else {
            (&old_b, "python3")
        };
        assert_eq!(e["who"]["comm"], comm, "{e:#}");
        assert_eq!(e["size"], want.len());
        assert_eq!(&data_of(&backing, &id_of(e)), want, "{}", e["path"]);
    }

    // Growing, or truncating what is already empty, destroys nothing.
    let before = l.len();
    cmd_ok(
        Command::new("truncate")
            .args(["-s", "1M"])
            .arg(m.path("_base/grow")),
    );
    cmd_ok(
        Command::new("truncate")
            .args(["-s", "0"])
            .arg(m.path("_base/empty")),
    );
    cmd_ok(
        Command::new(PY)
            .args(["-c", "import sys; open(sys.argv[1], 'w').close()"])
            .arg(m.path("_base/empty")),
    );
    // (and the files truncated above are empty now)
    cmd_ok(
        Command::new("truncate")
            .args(["-s", "0"])
            .arg(m.path("_base/a")),
    );
    let grown = fs::read(m.path("_base/grow")).unwrap();
    assert_eq!(grown.len(), 1 << 20);
    assert_eq!(&grown[..5], b"small");
    assert_eq!(list(&m.mountpoint, true).len(), before);
    assert_eq!(
        entry_files(&backing).len(),
        2 * before,
        "{:?}",
        entry_files(&backing)
    );

    // Restoring the old contents next to the truncated file gives them back.
    let id = id_of(&l[0]);
    ok(
        "restore",
        &bg(&["restore", &id, "--to", "_base/a.old"], &m.mountpoint),
    );
    assert_eq!(fs::read(m.path("_base/a.old")).unwrap(), old_a);
}

fn getfattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let o = Command::new("getfattr")
        .args(["--absolute-names", "--only-values", "-n", name])
        .arg(p)
        .output()
        .unwrap();
    o.status.success().then_some(o.stdout)
}

#[test]
fn truncation_keeps_the_extended_attributes() {
    let (_t, backing) = scratch();
    let m = Mount::new(&backing, &[]);
    let f = m.path("_base/labelled");
    fs::write(&f, vec![7u8; 50_000]).unwrap();
    // libvirt's DAC/SELinux remember labels, and a user attribute, set
    // through the mount.
    let attrs = [
        ("trusted.libvirt.security.dac", "+107:+107"),
        ("trusted.libvirt.security.ref_dac", "1"),
        ("user.origin", "glance"),
    ];
    for (n, v) in attrs {
        cmd_ok(Command::new("setfattr").args(["-n", n, "-v", v]).arg(&f));
    }
    cmd_ok(Command::new("truncate").args(["-s", "0"]).arg(&f));
    let l = list(&m.mountpoint, true);
    assert_eq!(l.len(), 1, "{l:#?}");
    let data = backing.join(format!(".baseguard/entries/{}.data", id_of(&l[0])));
    assert_eq!(fs::read(&data).unwrap(), vec![7u8; 50_000]);
    for (n, v) in attrs {
        assert_eq!(
            getfattr(&data, n).as_deref(),
            Some(v.as_bytes()),
            "{n} on the copy"
        );
    }
}

#[test]
fn a_fifo_named_like_a_record_hangs_no_lookup_and_no_list() {
    let (_t, backing) = scratch();
    let m = Mount::new(&backing, &[]);
    fs::write(m.path("_base/x"), b"x").unwrap();
    fs::remove_file(m.path("_base/x")).unwrap();
    let fifo = backing.join(".baseguard/entries/20261130-000000-evil-000001.json");
    cmd_ok(Command::new("mkfifo").arg(&fifo));
    // A change of the quarantine, then a lookup that misses in _base (the
    // daemon looks at the quarantine for restore on access), and `list`.
    let (tx, rx) = std::sync::mpsc::channel();
    let (y, p, mp) = (
        m.path("_base/y"),
        m.path("_base/missing"),
        m.mountpoint.clone(),
    );
    std::thread::spawn(move || {
        fs::write(&y, b"y").unwrap();
        fs::remove_file(&y).unwrap();
        let miss = fs::metadata(&p).unwrap_err().kind();
        let o = bg(&["list", "--json"], &mp);
        let _ = tx.send((miss, o));
    });
    let Ok((miss, o)) = rx.recv_timeout(Duration::from_secs(20)) else {
        // Free whoever is stuck (so that the mount can end), then fail.
        use std::os::unix::fs::OpenOptionsExt;
        for _ in 0..500 {
            let _ = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo);
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = fs::remove_file(&fifo);
        panic!("a FIFO record hung a lookup or list");
    };
    assert_eq!(miss, ErrorKind::NotFound);
    let v: Value = serde_json::from_str(&ok("list", &o)).unwrap();
    let v = v["entries"].as_array().unwrap().clone();
    assert_eq!(paths_of(&v), ["_base/x", "_base/y"]);
}
