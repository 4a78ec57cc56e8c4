//! FUSE-over-io_uring (`transport=`), through real mounts: requests are served from the
//! rings when the kernel allows them (counted), /dev/fuse carries on when it does not,
//! `auto` keeps /dev/fuse, kernel passthrough still carries file data, `status` names the
//! transport, and a restarted or upgraded serving process serves the rings again (requests
//! made while no server ran included).
//!
//! The kernel's switch, `/sys/module/fuse/parameters/enable_uring`, is global: every test
//! here sets it through [`Param`], which serialises them and puts the previous value back
//! (also when a test fails). Skipped, saying so, on kernels without it.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use baseguard::session::registry;
use baseguard::session::ring::ENABLE_PARAM;
use common::{BIN, Mount};

static SERIAL: Mutex<()> = Mutex::new(());

/// The module parameter set for the life of the guard, then restored.
struct Param {
    previous: String,
    _lock: MutexGuard<'static, ()>,
}

impl Param {
    /// `None` (after saying why) when the kernel has no FUSE-over-io_uring.
    fn set(on: bool) -> Option<Param> {
        let lock = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(previous) = std::fs::read_to_string(ENABLE_PARAM) else {
            eprintln!(
                "SKIPPED: {ENABLE_PARAM} does not exist (kernel without CONFIG_FUSE_IO_URING)"
            );
            return None;
        };
        std::fs::write(ENABLE_PARAM, if on { "1" } else { "0" }).unwrap();
        Some(Param {
            previous: previous.trim().to_string(),
            _lock: lock,
        })
    }
}

impl Drop for Param {
    fn drop(&mut self) {
        let v = if matches!(self.previous.as_str(), "Y" | "y" | "1") {
            "1"
        } else {
            "0"
        };
        if let Err(e) = std::fs::write(ENABLE_PARAM, v) {
            eprintln!("cannot restore {ENABLE_PARAM}: {e}");
        }
    }
}

fn backing() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("backing");
    std::fs::create_dir(&b).unwrap();
    (dir, b)
}

/// Create, stat, write, read and unlink `n` files through the mount.
fn churn(m: &Mount, n: usize) {
    for i in 0..n {
        let p = m.path(&format!("f{i}"));
        std::fs::write(&p, format!("file {i}")).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("file {i}"));
        std::fs::metadata(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
}

fn uring_requests(m: &Mount) -> u64 {
    m.stats()["uring_requests"].as_u64().unwrap()
}

/// `status --json`'s record of this mount.
fn status(mp: &Path) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let out = Command::new(BIN)
            .args(["status", "--json", "--dir"])
            .arg(mp)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mine = v["mounts"].as_array().and_then(|a| {
            a.iter()
                .find(|x| x["mountpoint"].as_str() == mp.to_str())
                .cloned()
        });
        if let Some(m) = mine.filter(|m| m["transport"].is_string()) {
            return m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "status never named the transport: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn requests_go_through_the_rings_when_the_kernel_allows_them() {
    let Some(_p) = Param::set(true) else { return };
    let (_d, b) = backing();
    let m = Mount::new(&b, &["--transport", "uring"]);
    churn(&m, 50);
    let n = uring_requests(&m);
    // 50 x (create, flush, release, lookup/getattr, open, ..., unlink): all of them.
    assert!(n >= 300, "only {n} requests came through the rings");
    let s = status(&m.mountpoint);
    assert_eq!(s["transport"], "uring", "{s}");
    assert_eq!(m.unmount().code(), Some(0));
}

#[test]
fn dev_fuse_carries_on_when_the_kernel_says_no() {
    let Some(_p) = Param::set(false) else { return };
    let (_d, b) = backing();
    let m = Mount::new(&b, &["--transport", "uring"]);
    churn(&m, 20);
    assert_eq!(uring_requests(&m), 0);
    let s = status(&m.mountpoint);
    assert_eq!(s["transport"], "dev", "{s}");
    assert_eq!(m.unmount().code(), Some(0));
}

#[test]
fn auto_keeps_dev_fuse_even_when_the_kernel_allows_rings() {
    let Some(_p) = Param::set(true) else { return };
    let (_d, b) = backing();
    // Also through the fstab-style option.
    let m = Mount::new(&b, &["-o", "transport=auto"]);
    churn(&m, 20);
    assert_eq!(uring_requests(&m), 0);
    assert_eq!(status(&m.mountpoint)["transport"], "dev");
    assert_eq!(m.unmount().code(), Some(0));
}

#[test]
fn passthrough_still_carries_the_data_over_the_rings() {
    let Some(_p) = Param::set(true) else { return };
    let (_d, b) = backing();
    let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(b.join("image"), &data).unwrap();
    let m = Mount::new(&b, &["-o", "transport=uring"]);
    let mut got = Vec::new();
    std::fs::File::open(m.path("image"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == data, "data read through the mount differs");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("image"))
        .unwrap();
    f.write_all(b"overwritten").unwrap();
    drop(f);
    let s = m.stats();
    assert_eq!(s["read"], 0, "{s}");
    assert_eq!(s["write"], 0, "{s}");
    assert!(s["passthrough_opens"].as_u64().unwrap() >= 2, "{s}");
    assert!(s["uring_requests"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(
        &std::fs::read(b.join("image")).unwrap()[..11],
        b"overwritten"
    );
    assert_eq!(m.unmount().code(), Some(0));
}

#[test]
fn file_data_through_the_daemon_travels_in_the_ring_payloads() {
    let Some(_p) = Param::set(true) else { return };
    let (_d, b) = backing();
    let m = Mount::new(&b, &["--transport", "uring", "--no-passthrough"]);
    // Larger than one payload buffer (1 MiB): the kernel splits it into requests.
    let data: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(m.path("blob"), &data).unwrap();
    assert!(
        std::fs::read(b.join("blob")).unwrap() == data,
        "written data differs"
    );
    // O_DIRECT: past the page cache the write filled, to the daemon.
    use std::os::unix::fs::FileExt;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("blob"))
        .unwrap();
    // Page-aligned 1 MiB chunks (the backing file is read with O_DIRECT too).
    let mut raw = vec![0u8; (1 << 20) + 4096];
    let skew = (4096 - raw.as_ptr() as usize % 4096) % 4096;
    let buf = &mut raw[skew..skew + (1 << 20)];
    let mut got = Vec::new();
    loop {
        let n = f.read_at(buf, got.len() as u64).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == data, "data read back differs");
    drop(f);
    let s = m.stats();
    assert!(s["write"].as_u64().unwrap() > 0, "{s}");
    assert!(s["read"].as_u64().unwrap() > 0, "{s}");
    assert!(s["uring_requests"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(m.unmount().code(), Some(0));
}

/// SIGKILL the serving process while the supervisor is stopped, make a request on every CPU
/// (they wait in the kernel's ring queues), then let the supervisor start the next server:
/// it registers new entries and makes one request per CPU, without which the waiting
/// requests would wait for the next request made on their CPU.
#[test]
fn a_killed_server_is_replaced_and_requests_made_meanwhile_are_answered() {
    let Some(_p) = Param::set(true) else { return };
    let (_d, b) = backing();
    for i in 0..4 {
        std::fs::write(b.join(format!("x{i}")), b"x").unwrap();
    }
    let m = Mount::new(&b, &["--transport", "uring"]);
    churn(&m, 5);
    let before = registry::find(&m.mountpoint).expect("session published");
    let sup = m.pid().to_string();
    let run = |args: &[&str]| Command::new("kill").args(args).status().unwrap();
    /// Lets the supervisor go again even if an assertion fails (a stopped supervisor would
    /// leave its next serving process behind).
    struct Cont(String);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-CONT", &self.0]).status();
        }
    }
    run(&["-STOP", &sup]);
    let _cont = Cont(sup.clone());
    baseguard::sys::kill(before.server_pid as i32, libc::SIGKILL).unwrap();
    // Wait until the server is gone (the supervisor, stopped, cannot reap it: a zombie).
    let start = Instant::now();
    while std::fs::read_to_string(format!("/proc/{}/stat", before.server_pid))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
    {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    // For a short while after the death the kernel still hands requests to the dead
    // process's ring entries, and ends them with ECANCELED (the documented risk of
    // `transport=uring`); after that they wait in the queues, which is what this tests.
    std::thread::sleep(Duration::from_secs(1));
    let cpus = baseguard::session::ring::possible_cpus();
    let (tx, rx) = std::sync::mpsc::channel();
    for cpu in 0..cpus {
        let (p, tx) = (m.path(&format!("x{}", cpu % 4)), tx.clone());
        std::thread::spawn(move || {
            let _ = baseguard::sys::uring::pin_to_cpu(cpu);
            let r = std::fs::metadata(&p).map(|_| ());
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rx.try_recv().is_err(),
        "a request was answered while no server ran"
    );
    run(&["-CONT", &sup]);
    for _ in 0..cpus {
        let r = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a request made while no server ran was never answered");
        assert_eq!(r, Ok(()));
    }
    let after = registry::find(&m.mountpoint).unwrap();
    assert!(after.generation > before.generation);
    churn(&m, 5);
    assert!(
        uring_requests(&m) > 0,
        "the new server does not serve the rings"
    );
    assert_eq!(m.unmount().code(), Some(0));
}

#[test]
fn an_upgraded_server_serves_the_rings() {
    let Some(_p) = Param::set(true) else { return };
    let (_d, b) = backing();
    let m = Mount::new(&b, &["--transport", "uring"]);
    churn(&m, 5);
    let out = Command::new(BIN)
        .arg("upgrade")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // For a moment after the old server exits, the kernel may still hand a request to one
    // of its ring entries and end it with ECANCELED (the documented risk of
    // `transport=uring`); what this tests is that the new server serves the rings.
    std::thread::sleep(Duration::from_secs(1));
    churn(&m, 10);
    assert!(uring_requests(&m) >= 50);
    assert_eq!(status(&m.mountpoint)["transport"], "uring");
    assert_eq!(m.unmount().code(), Some(0));
}

/// Why `transport=auto` keeps /dev/fuse, and a canary for the day the kernel changes: a
/// blocking lock wait being served when the serving process is killed. Through /dev/fuse
/// the kernel hands the request to the next server (`FUSE_NOTIFY_RESEND`) and the waiter
/// gets the lock once the holder lets go; through a ring it stays in the dead process's
/// entry, nobody answers it, and only aborting the connection (every /dev/fuse descriptor
/// closed: the supervisor killed too) ends it. If the uring half fails, the kernel now
/// resends ring requests: reconsider `ring::AUTO_USES_URING`.
#[test]
fn a_request_held_by_a_killed_server_is_resent_through_dev_fuse_and_lost_in_a_ring() {
    use std::os::fd::AsFd;
    let wr = baseguard::sys::LockRange {
        typ: libc::F_WRLCK,
        start: 0,
        end: 0,
        pid: 0,
    };
    for (transport, resent) in [("dev", true), ("uring", false)] {
        let Some(_p) = Param::set(true) else { return };
        let (_d, b) = backing();
        std::fs::write(b.join("lk"), b"x").unwrap();
        let mut m = Mount::new(&b, &["--transport", transport]);
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap()
        };
        let holder = open(&m.path("lk"));
        baseguard::sys::ofd_setlk(holder.as_fd(), &wr, false).unwrap();
        let waiter = open(&m.path("lk"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = baseguard::sys::ofd_setlk(waiter.as_fd(), &wr, true);
            let _ = tx.send(r.map_err(|e| e.raw_os_error()));
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            rx.try_recv().is_err(),
            "{transport}: the waiter did not wait"
        );
        let before = registry::find(&m.mountpoint).expect("session published");
        baseguard::sys::kill(before.server_pid as i32, libc::SIGKILL).unwrap();
        let start = Instant::now();
        while registry::find(&m.mountpoint).is_none_or(|e| e.generation == before.generation) {
            assert!(start.elapsed() < Duration::from_secs(10), "no new server");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::metadata(m.path("lk")).unwrap(); // the new server answers
        drop(holder); // its lock goes (through the new server)
        let r = rx.recv_timeout(Duration::from_secs(5));
        if resent {
            assert_eq!(r, Ok(Ok(())), "{transport}: the resent lock request");
            assert_eq!(m.unmount().code(), Some(0));
        } else {
            assert!(
                r.is_err(),
                "{transport}: the request held by the killed server was answered ({r:?}): \
                 the kernel resends ring requests now"
            );
            m.kill9();
            let r = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("aborting the connection ends the lost request");
            assert!(r.is_err(), "{r:?}");
            m.crash();
        }
    }
}
