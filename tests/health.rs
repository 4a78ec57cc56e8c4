//! A dead or hung mount is never reported healthy; `mount` over a dead one
//! recovers it; a busy mount is never detached by a signal.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nova::*;
use common::*;

/// `status` reports every baseguard mount of the host, so the tests that
/// leave a dead or stopped daemon around for a while run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn bg(args: &[&str]) -> (i32, String, String) {
    let out = run(Command::new(BIN).args(args));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Unmounts a mount made by a detached `baseguard mount` on drop (its daemon
/// then exits by itself).
struct Unmounter(PathBuf);

impl Drop for Unmounter {
    fn drop(&mut self) {
        for _ in 0..50 {
            if !is_mounted(&self.0) {
                return;
            }
            let ok = Command::new("umount")
                .arg(&self.0)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_killed_daemon_is_reported_and_mount_recovers_it() {
    let _serial = serial();
    let t = scratch();
    let backing = t.path().join("backing");
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    let mp = t.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mut m = Mount::at(&backing, &mp, &[]);
    std::fs::write(m.path("hello"), "world").unwrap();
    let (code, _, err) = bg(&["status", "--dir", s(&mp)]);
    assert_eq!(code, 0, "{err}");

    m.kill9();
    // status: non-zero, one clear line saying what to do.
    let (code, out, err) = bg(&["status", "--dir", s(&mp)]);
    assert_eq!(code, 1, "{out}{err}");
    let want = format!("the baseguard daemon for {} is not running", mp.display());
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("baseguard mount"), "{err}");
    assert!(out.contains("NOT RUNNING"), "{out}");
    let (code, out, _) = bg(&["status", "--json", "--dir", s(&mp)]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mine: Vec<&serde_json::Value> = v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["mountpoint"] == s(&mp))
        .collect();
    assert_eq!(mine.len(), 1, "{out}");
    assert_eq!(mine[0]["alive"], false, "{out}");
    assert_eq!(v["alive"], false, "{out}");
    // check: the same line, and still the chains (none here).
    let (code, _, err) = bg(&["check", "--dir", s(&mp)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&want), "{err}");

    // mount over it: says so, replaces the dead mount, never "not a directory".
    let out = run(Command::new(BIN).args(["mount", s(&backing), s(&mp)]));
    let _u = Unmounter(mp.clone());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("not a directory"), "{err}");
    assert!(err.contains("dead baseguard mount"), "{err}");
    assert_eq!(std::fs::read_to_string(mp.join("hello")).unwrap(), "world");
    let (code, _, err) = bg(&["status", "--dir", s(&mp)]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = bg(&["check", "--dir", s(&mp)]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_dead_mount_over_its_own_backing_is_recovered() {
    let _serial = serial();
    let t = scratch();
    let dir = t.path().join("instances");
    std::fs::create_dir_all(dir.join("_base")).unwrap();
    std::fs::write(dir.join("_base/img"), "x").unwrap();
    let mut m = Mount::at(&dir, &dir, &[]);
    m.kill9();
    let e = std::fs::metadata(dir.join("_base/img")).unwrap_err();
    // A request caught by the abort gets ECONNABORTED, later ones ENOTCONN.
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "{e}"
    );
    let out = run(Command::new(BIN).args(["mount", s(&dir), s(&dir)]));
    let _u = Unmounter(dir.clone());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("dead baseguard mount"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("_base/img")).unwrap(), "x");
    // The recovered mount guards again.
    std::fs::remove_file(dir.join("_base/img")).unwrap();
    let (code, out, err) = bg(&["list", "--json", "--dir", s(&dir)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("_base/img"), "{out}");
}

#[test]
fn a_stopped_daemon_is_not_answering_and_is_left_alone() {
    let _serial = serial();
    let t = scratch();
    let backing = t.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let m = Mount::new(&backing, &[]);
    // Answering first (its serving process started and past INIT).
    let (code, _, err) = bg(&["status", "--dir", s(&m.mountpoint)]);
    assert_eq!(code, 0, "{err}");
    let stopped = m.stop();
    let (code, _, err) = bg(&["status", "--dir", s(&m.mountpoint)]);
    let out = run(Command::new(BIN).args(["mount", s(&backing), s(&m.mountpoint)]));
    drop(stopped);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not answering"), "{err}");
    assert!(!out.status.success());
    let merr = String::from_utf8_lossy(&out.stderr);
    assert!(merr.contains("not answering"), "{merr}");
    assert!(merr.contains("kill -CONT"), "{merr}");
    // Resumed: healthy again.
    let (code, _, err) = bg(&["status", "--dir", s(&m.mountpoint)]);
    assert_eq!(code, 0, "{err}");
}

/// Runs `cmd`; `None` if it has not ended (and closed its output) within
/// `limit`. Left running then: it ends once what holds it goes on.
fn run_within(cmd: &mut Command, limit: Duration) -> Option<std::process::Output> {
    let child = no_node_config(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run command");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(limit)
        .ok()
        .map(|r| r.expect("wait for command"))
}

/// A daemon that took the probe's request and does not answer it (stuck in
/// its backing filesystem, here another baseguard mount that is stopped):
/// `status` and `mount` say so after the probe's timeout and end. The
/// probe's request cannot be abandoned once the daemon has read it (the
/// kernel waits for the answer uninterruptibly), so whatever waits on it must
/// not keep the command from ending.
#[test]
fn a_daemon_holding_the_probe_unanswered_does_not_keep_status_or_mount_from_ending() {
    let _serial = serial();
    let t = scratch();
    let inner = t.path().join("inner");
    std::fs::create_dir_all(inner.join("sub")).unwrap();
    let a = Mount::new(&inner, &[]);
    // The stuck daemon: its backing directory is in `a`'s mount (a
    // subdirectory: `a` hides its own top-level quarantine name).
    let stuck_backing = a.path("sub");
    let stuck = Mount::new(&stuck_backing, &[]);
    std::fs::write(stuck.path("f"), "x").unwrap();
    let stopped = a.stop();
    // `status` probes every baseguard mount of the host; `stuck` reads the
    // probe and waits on `a` in its statfs. DIR is `a`'s backing directory,
    // read directly (not through a mount). Ends well within the limit
    // (after its 2 s probe timeout).
    let limit = Duration::from_secs(30);
    let out = run_within(
        Command::new(BIN).args(["status", "--dir", s(&inner)]),
        limit,
    );
    let mount = run_within(
        Command::new(BIN).args(["mount", s(&stuck_backing), s(&stuck.mountpoint)]),
        limit,
    );
    drop(stopped);
    let out = out.expect("status did not end while a daemon held its probe");
    let err = String::from_utf8_lossy(&out.stderr);
    // DIR is no mount: all well there; the stuck mount is said.
    assert_eq!(out.status.code(), Some(0), "{err}");
    let want = format!(
        "the baseguard daemon for {} is not running or not answering",
        stuck.mountpoint.display()
    );
    assert!(err.contains(&want), "{err}");
    let mount = mount.expect("mount did not end while the daemon held its probe");
    let merr = String::from_utf8_lossy(&mount.stderr);
    assert!(!mount.status.success(), "{merr}");
    assert!(merr.contains("not answering"), "{merr}");
    // Resumed: the stuck daemon answers again.
    assert_eq!(std::fs::read_to_string(stuck.path("f")).unwrap(), "x");
    let (code, _, err) = bg(&["status", "--dir", s(&inner)]);
    assert_eq!(code, 0, "{err}");
    let mp = stuck.mountpoint.display().to_string();
    assert!(!err.contains(&mp), "{err}");
}

#[test]
fn sigterm_with_open_files_keeps_serving_and_names_the_holders() {
    let _serial = serial();
    let t = scratch();
    let backing = t.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let log = t.path().join("daemon.log");
    let mut m = Mount::new(&backing, &["--log-file", s(&log)]);
    std::fs::write(m.path("disk"), "data").unwrap();
    let held = std::fs::File::open(m.path("disk")).unwrap();
    m.send("TERM");
    // Give the daemon time to act on the signal; it must still serve.
    std::thread::sleep(Duration::from_millis(500));
    assert!(m.exited().is_none(), "the daemon exited with files open");
    assert!(is_mounted(&m.mountpoint));
    assert_eq!(std::fs::read_to_string(m.path("disk")).unwrap(), "data");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("EBUSY"), "{text}");
    assert!(
        text.contains(&format!("pid {} ", std::process::id())),
        "the holder is not named: {text}"
    );
    // umount(8) refuses too (the kernel's EBUSY)...
    let st = Command::new("umount")
        .arg(&m.mountpoint)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!st.success());
    assert!(is_mounted(&m.mountpoint));
    assert!(m.path("disk").exists(), "the directory underneath shows");
    // ... and `baseguard umount`, naming the holder.
    let (code, _, err) = bg(&["umount", s(&m.mountpoint)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("busy"), "{err}");
    assert!(
        err.contains(&format!("pid {} ", std::process::id())),
        "{err}"
    );
    assert!(is_mounted(&m.mountpoint));
    // Once the file is closed, SIGTERM unmounts and the daemon exits 0.
    drop(held);
    m.send("TERM");
    let start = Instant::now();
    let st = loop {
        if let Some(st) = m.exited() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0));
    assert!(!is_mounted(&m.mountpoint));
}

#[test]
fn umount_lazy_detaches_a_busy_mount_on_request() {
    let _serial = serial();
    let t = scratch();
    let backing = t.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let mut m = Mount::new(&backing, &[]);
    std::fs::write(m.path("disk"), "data").unwrap();
    let held = std::fs::File::open(m.path("disk")).unwrap();
    let (code, out, err) = bg(&["umount", "--lazy", s(&m.mountpoint)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("detached"), "{out}");
    assert!(!is_mounted(&m.mountpoint));
    // The open file still works; the daemon ends once it is closed.
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut &held, &mut buf).unwrap();
    assert_eq!(buf, "data");
    drop(held);
    let start = Instant::now();
    while m.exited().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "no exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}
