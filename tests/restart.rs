//! The restartable daemon, through real mounts: the serving process is killed (SIGKILL) at
//! random moments and replaced with `baseguard upgrade` while qemu-io clients and a metadata
//! loop run; nobody sees an error, every pattern reads back, open files and locks survive,
//! and another node never gets a running VM's image lock.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baseguard::session::registry;
use baseguard::sys::{self, LockRange};
use common::{BIN, Mount, have, is_mounted};

struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let seed = std::env::var("BG_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(t | 1);
        eprintln!("restart test seed: BG_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// The session's published state (supervisor pid, server pid, counts).
fn session(mp: &Path) -> registry::Entry {
    let start = Instant::now();
    loop {
        if let Some(e) = registry::find(mp) {
            if e.server_pid != 0 {
                return e;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no session published for {}",
            mp.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILL the serving process and wait until the supervisor has started the next one.
fn kill_server(mp: &Path) -> registry::Entry {
    let before = session(mp);
    sys::kill(before.server_pid as i32, libc::SIGKILL).unwrap();
    let start = Instant::now();
    loop {
        let e = session(mp);
        if e.generation > before.generation {
            return e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no new serving process"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn upgrade(mp: &Path, binary: &Path) -> std::process::Output {
    Command::new(BIN)
        .arg("upgrade")
        .arg(mp)
        .arg("--binary")
        .arg(binary)
        .output()
        .unwrap()
}

fn wrlock(start: u64) -> LockRange {
    LockRange {
        typ: libc::F_WRLCK,
        start,
        end: start,
        pid: 0,
    }
}

#[test]
fn open_files_and_locks_survive_kills() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    std::fs::write(backing.join("disk"), b"0123456789").unwrap();
    std::fs::create_dir(backing.join("d")).unwrap();
    std::fs::write(backing.join("d/a"), b"a").unwrap();
    let m = Mount::new(&backing, &[]);

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("disk"))
        .unwrap();
    sys::ofd_setlk(f.as_fd(), &wrlock(100), false).unwrap();
    let mut listing = std::fs::read_dir(m.path("d")).unwrap();

    for round in 0..3 {
        let e = kill_server(&m.mountpoint);
        assert_eq!(e.restarts, round + 1);
        // The handle opened before the kill answers fstat/fsync/ftruncate (these reach the
        // daemon) and writes.
        let st = f.metadata().unwrap();
        assert_eq!(st.len(), 10 + round);
        f.sync_all().unwrap();
        f.set_len(11 + round).unwrap();
        // The lock is still held: another open file description (as another node would
        // have) cannot take it.
        let other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing.join("disk"))
            .unwrap();
        let err = sys::ofd_setlk(other.as_fd(), &wrlock(100), false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "round {round}");
        // New opens and lookups work.
        assert_eq!(std::fs::read(m.path("d/a")).unwrap(), b"a");
    }
    // The directory opened before the kills is still readable.
    let names: Vec<_> = listing.by_ref().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().any(|n| n == "a"), "{names:?}");
    drop(listing);
    // Closing releases the lock for everybody (the supervisor's copy too). The kernel
    // sends RELEASE after close() returns, so wait for it.
    drop(f);
    let other = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(backing.join("disk"))
        .unwrap();
    let start = Instant::now();
    while let Err(e) = sys::ofd_setlk(other.as_fd(), &wrlock(100), false) {
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the lock outlived the file"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(m.unmount().code(), Some(0));
}

#[test]
fn upgrade_to_a_broken_binary_keeps_the_mount_served() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    std::fs::write(backing.join("f"), b"x").unwrap();
    let m = Mount::new(&backing, &[]);
    let f = std::fs::File::open(m.path("f")).unwrap();
    let before = session(&m.mountpoint);
    let out = upgrade(&m.mountpoint, Path::new("/bin/false"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("before it answered"), "{err}");
    let after = session(&m.mountpoint);
    assert!(after.generation > before.generation);
    assert_eq!(after.binary, before.binary);
    f.sync_all().unwrap();
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"x");
    drop(f);
    assert_eq!(m.unmount().code(), Some(0));
}

#[test]
fn status_json_shows_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let m = Mount::new(&backing, &[]);
    kill_server(&m.mountpoint);
    let e = session(&m.mountpoint);
    let out = Command::new(BIN)
        .args(["status", "--json", "--dir"])
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mine = v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["mountpoint"].as_str() == m.mountpoint.to_str())
        .cloned()
        .unwrap();
    assert_eq!(mine["supervisor_pid"], e.supervisor_pid);
    assert_eq!(mine["server_pid"], e.server_pid);
    assert_eq!(mine["alive"], true);
    assert_eq!(mine["restarts"], 1);
    assert!(mine["server_started"].as_u64().unwrap() > 0);
    assert_eq!(m.unmount().code(), Some(0));
}

/// One qemu-io client: commands go to its stdin as the test runs; its output is kept.
struct Client {
    child: Child,
    input: std::process::ChildStdin,
    output: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
    /// Last pattern written at each offset.
    written: BTreeMap<u64, u8>,
}

impl Client {
    fn start(image: &Path) -> Client {
        let mut child = Command::new("qemu-io")
            .args(["-t", "none"])
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let o = Arc::clone(&output);
        let reader = std::thread::spawn(move || {
            let o2 = Arc::clone(&o);
            let e = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                o2.lock().unwrap().push_str(&s);
            });
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            e.join().unwrap();
        });
        // The image is open (and locked) once qemu-io prompts for a command.
        let start = Instant::now();
        while !output.lock().unwrap().contains("qemu-io>") {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("qemu-io exited: {st}: {}", output.lock().unwrap());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-io did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Client {
            child,
            input,
            output,
            reader,
            written: BTreeMap::new(),
        }
    }

    /// Write a pattern at a 64 KiB slot, flush, read it back.
    fn step(&mut self, slot: u64, pattern: u8) {
        let off = slot * 65536;
        let cmds = format!("write -P {pattern} {off} 64k\nflush\nread -P {pattern} {off} 64k\n");
        self.input.write_all(cmds.as_bytes()).unwrap();
        self.written.insert(off, pattern);
    }

    /// Close stdin, wait, and return (exit success, output).
    fn finish(mut self) -> (bool, String, BTreeMap<u64, u8>) {
        drop(self.input);
        let st = self.child.wait().unwrap();
        self.reader.join().unwrap();
        let out = self.output.lock().unwrap().clone();
        (st.success(), out, self.written)
    }
}

/// Output lines that are not the normal chatter of write/read/flush.
fn client_errors(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| l.trim_start_matches("qemu-io> ").trim())
        .filter(|l| !l.is_empty())
        .filter(|l| !(l.starts_with("wrote ") || l.starts_with("read ") || l.contains(" ops; ")))
        .map(str::to_string)
        .collect()
}

#[test]
fn qemu_clients_and_metadata_see_no_error_across_kills_and_an_upgrade() {
    if !have("qemu-io") || !have("qemu-img") {
        eprintln!("qemu-io/qemu-img not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir_all(backing.join("inst")).unwrap();
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    std::fs::create_dir_all(backing.join("meta")).unwrap();
    for i in 0..4 {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(backing.join(format!("inst/disk{i}.qcow2")))
            .arg("64M")
            .status()
            .unwrap();
        assert!(st.success());
    }
    // Node A serves the VMs; node B is another compute node over the same directory.
    let a = Mount::new(&backing, &[]);
    let b = Mount::new(&backing, &[]);
    let mut clients: Vec<Client> = (0..4)
        .map(|i| Client::start(&a.path(&format!("inst/disk{i}.qcow2"))))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    // The metadata loop: create, stat, rename, list, unlink (the unlink under _base/ goes
    // to the quarantine).
    let meta_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let quarantined = Arc::new(AtomicU64::new(0));
    let meta = {
        let (stop, errs, q) = (
            Arc::clone(&stop),
            Arc::clone(&meta_errors),
            Arc::clone(&quarantined),
        );
        let root = a.mountpoint.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            let err = |what: &str, e: std::io::Error| {
                errs.lock().unwrap().push(format!("{what}: {e}"));
            };
            while !stop.load(Ordering::Relaxed) {
                let dir = if i % 4 == 0 { "_base" } else { "meta" };
                let p = root.join(format!("{dir}/f{i}"));
                let r = root.join(format!("{dir}/g{i}"));
                if let Err(e) = std::fs::write(&p, i.to_string()) {
                    err("create", e);
                }
                if let Err(e) = std::fs::metadata(&p) {
                    err("stat", e);
                }
                if let Err(e) = std::fs::rename(&p, &r) {
                    err("rename", e);
                }
                match std::fs::read_dir(root.join(dir)) {
                    Ok(rd) => {
                        for e in rd {
                            if let Err(e) = e {
                                err("readdir", e);
                            }
                        }
                    }
                    Err(e) => err("opendir", e),
                }
                match std::fs::read_to_string(&r) {
                    Ok(s) if s == i.to_string() => {}
                    Ok(s) => errs.lock().unwrap().push(format!("read {r:?}: {s:?}")),
                    Err(e) => err("read", e),
                }
                match std::fs::remove_file(&r) {
                    Ok(()) if dir == "_base" => {
                        q.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(()) => {}
                    Err(e) => err(&format!("unlink {}", r.display()), e),
                }
                i += 1;
            }
            i
        })
    };
    // Node B tries to open a running VM's disk, as qemu would on a second node.
    let lock_leaks = Arc::new(Mutex::new(Vec::<String>::new()));
    let checks = Arc::new(AtomicU64::new(0));
    let checker = {
        let (stop, leaks, checks) = (
            Arc::clone(&stop),
            Arc::clone(&lock_leaks),
            Arc::clone(&checks),
        );
        let images: Vec<PathBuf> = (0..4)
            .map(|i| b.path(&format!("inst/disk{i}.qcow2")))
            .collect();
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let img = &images[n % images.len()];
                n += 1;
                let out = Command::new("qemu-io")
                    .args(["-r", "-c", "read 0 512"])
                    .arg(img)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stderr).to_string()
                    + &String::from_utf8_lossy(&out.stdout);
                checks.fetch_add(1, Ordering::Relaxed);
                if out.status.success() || !text.contains("Failed to get") {
                    leaks
                        .lock()
                        .unwrap()
                        .push(format!("{}: {text}", img.display()));
                }
            }
        })
    };

    let mut rng = Rng::seeded();
    let mut step = 0u64;
    let mut drive = |clients: &mut Vec<Client>, ms: u64| {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            for (i, c) in clients.iter_mut().enumerate() {
                step += 1;
                c.step((step + i as u64) % 64, (step % 250) as u8 + 1);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    drive(&mut clients, 300);
    for k in 0..12 {
        let e = kill_server(&a.mountpoint);
        assert_eq!(e.restarts, k + 1);
        drive(&mut clients, 20 + rng.below(280));
    }
    // Hand node A's session to a new binary (a copy, as an installed upgrade would be).
    let newbin = dir.path().join("baseguard-new");
    std::fs::copy(BIN, &newbin).unwrap();
    let out = upgrade(&a.mountpoint, &newbin);
    assert!(
        out.status.success(),
        "upgrade failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drive(&mut clients, 300);
    let e = session(&a.mountpoint);
    assert_eq!(e.binary, newbin);
    assert_eq!(e.upgrades, 1);
    // And kill the upgraded server too.
    kill_server(&a.mountpoint);
    drive(&mut clients, 200);

    stop.store(true, Ordering::Relaxed);
    let iterations = meta.join().unwrap();
    checker.join().unwrap();
    let mut finals = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let (ok, out, written) = c.finish();
        let errs = client_errors(&out);
        assert!(ok && errs.is_empty(), "client {i}: {errs:?}");
        finals.push(written);
    }
    let errs = meta_errors.lock().unwrap().clone();
    assert!(errs.is_empty(), "metadata loop errors: {errs:?}");
    let leaks = lock_leaks.lock().unwrap().clone();
    assert!(
        leaks.is_empty(),
        "node B got a running VM's image: {leaks:?}"
    );
    assert!(checks.load(Ordering::Relaxed) > 0);
    assert!(iterations > 0);
    // Every pattern reads back, through the mount (after the kills and the upgrade).
    for (i, written) in finals.iter().enumerate() {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-t", "none", "-r"]);
        for (off, p) in written {
            cmd.arg("-c").arg(format!("read -P {p} {off} 64k"));
        }
        let out = cmd
            .arg(a.path(&format!("inst/disk{i}.qcow2")))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("failed"),
            "disk{i}: {text}"
        );
    }
    // Every unlink under _base/ left exactly one quarantine entry.
    let out = Command::new(BIN)
        .args(["list", "--json", "--dir"])
        .arg(&backing)
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = list["entries"].as_array().unwrap();
    let q = quarantined.load(Ordering::Relaxed);
    let mut paths: Vec<&str> = entries.iter().filter_map(|e| e["path"].as_str()).collect();
    paths.sort();
    let before = paths.len();
    paths.dedup();
    assert_eq!(before, paths.len(), "a file was quarantined twice");
    assert_eq!(entries.len() as u64, q, "quarantine entries vs unlinks");
    eprintln!(
        "metadata iterations {iterations}, quarantined {q}, lock checks {}",
        checks.load(Ordering::Relaxed)
    );
    assert!(is_mounted(&a.mountpoint));
    assert_eq!(a.unmount().code(), Some(0));
    assert_eq!(b.unmount().code(), Some(0));
}

#[test]
fn sigterm_unmounts_and_both_processes_exit() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let m = Mount::new(&backing, &[]);
    let e = session(&m.mountpoint);
    let mp = m.mountpoint.clone();
    assert_eq!(m.signal("TERM").code(), Some(0));
    assert!(!is_mounted(&mp));
    let start = Instant::now();
    while Path::new(&format!("/proc/{}", e.server_pid)).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server left behind"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(registry::find(&mp).is_none());
}

#[test]
fn a_first_server_killed_at_once_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    std::fs::write(backing.join("f"), b"x").unwrap();
    // Mounted (the supervisor mounts before the first server answers INIT): kill that
    // server at once, before or after INIT.
    let m = Mount::new(&backing, &[]);
    let e = kill_server(&m.mountpoint);
    assert_eq!(e.restarts, 1);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"x");
    assert_eq!(m.unmount().code(), Some(0));
}
