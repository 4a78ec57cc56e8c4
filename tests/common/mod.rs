//! Shared test harness: real `baseguard mount` processes over temporary
//! directories, unmounted and reaped on drop, even when a test fails.
#![allow(dead_code)]

pub mod nova;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_baseguard");

/// A mounted baseguard daemon.
pub struct Mount {
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub stats: PathBuf,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

pub fn is_mounted(mp: &Path) -> bool {
    let want = mp.to_str().unwrap().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.len() > 4 && f[4] == want && l.contains(" - fuse.baseguard ")
        })
}

impl Mount {
    /// Mount `backing` on a fresh temporary mountpoint.
    pub fn new(backing: &Path, args: &[&str]) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("mnt");
        std::fs::create_dir(&mp).unwrap();
        let mut m = Mount::at(backing, &mp, args);
        m._dir = Some(dir);
        m
    }

    /// Mount `backing` on `mp` (which may be the same path).
    pub fn at(backing: &Path, mp: &Path, args: &[&str]) -> Mount {
        Mount::wrapped(&[], backing, mp, args)
    }

    /// Mount with the daemon started through `prefix` (e.g. `prlimit ...`).
    pub fn wrapped(prefix: &[&str], backing: &Path, mp: &Path, args: &[&str]) -> Mount {
        static N: AtomicU64 = AtomicU64::new(0);
        let stats = std::env::temp_dir().join(format!(
            "bg-stats-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["mount", "--foreground"])
            .args(args)
            .arg("--stats-file")
            .arg(&stats)
            .arg(backing)
            .arg(mp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            );
        if std::env::var_os("BG_TEST_VERBOSE").is_none() {
            cmd.stderr(Stdio::null());
        }
        let child = no_node_config(&mut cmd).spawn().expect("spawn baseguard");
        let mut m = Mount {
            mountpoint: mp.to_path_buf(),
            backing: backing.to_path_buf(),
            stats,
            child: Some(child),
            _dir: None,
        };
        let start = Instant::now();
        while !is_mounted(mp) {
            if let Some(c) = m.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("baseguard mount exited early: {st}");
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "mount did not appear"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The daemon's request counters (asks for a fresh dump with SIGUSR1).
    pub fn stats(&self) -> serde_json::Value {
        let _ = std::fs::remove_file(&self.stats);
        let _ = Command::new("kill")
            .args(["-USR1", &self.pid().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&self.stats) {
                if let Ok(v) = serde_json::from_str(&s) {
                    return v;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no stats file");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmount with umount(8) and wait for the daemon; returns its exit status.
    pub fn unmount(mut self) -> std::process::ExitStatus {
        let st = Command::new("umount")
            .arg(&self.mountpoint)
            .status()
            .unwrap();
        assert!(st.success(), "umount failed");
        let mut c = self.child.take().unwrap();
        wait_timeout(&mut c, Duration::from_secs(10)).expect("daemon did not exit after umount")
    }

    /// Signal the daemon and wait for it; returns its exit status.
    pub fn signal(mut self, sig: &str) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        Command::new("kill")
            .args([&format!("-{sig}"), &c.id().to_string()])
            .status()
            .unwrap();
        wait_timeout(&mut c, Duration::from_secs(10)).expect("daemon did not exit on signal")
    }

    /// SIGKILL the daemon and reap it, leaving its dead mount in place (the
    /// mount is still cleaned up on drop).
    pub fn kill9(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // The whole daemon: the supervisor (stopped first, so that it
            // starts no new serving process) and its serving process.
            // kill(2) only queues the signal: wait until it has stopped,
            // or a server it starts meanwhile would be missed (and left
            // serving the mount, which would then not be dead).
            let _ = stop_and_wait(c.id());
            for p in children(c.id()) {
                let _ = Command::new("kill")
                    .args(["-KILL", &p.to_string()])
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The serving process(es) of the daemon (its supervisor's children).
    pub fn servers(&self) -> Vec<u32> {
        children(self.pid())
    }

    /// Stop the whole daemon (a stopped daemon is one that answers
    /// nothing): the supervisor first, so that it starts no serving process
    /// meanwhile, then its serving processes. Returns once every thread of
    /// them is stopped: kill(2) only queues SIGSTOP, and a thread that has
    /// not yet acted on it still reads and answers requests (a probe right
    /// after `kill -STOP` was answered, or read and then left unanswered).
    /// The daemon goes on when the returned guard is dropped, also when the
    /// test fails (a stopped serving process would outlive the test).
    #[must_use = "the daemon resumes when this is dropped"]
    pub fn stop(&self) -> Stopped<'_> {
        let stopped = Stopped(self);
        assert!(stop_and_wait(self.pid()), "the supervisor did not stop");
        for p in self.servers() {
            assert!(stop_and_wait(p), "the serving process did not stop");
        }
        stopped
    }

    /// Send a signal to the daemon without waiting for it: to the
    /// supervisor, and CONT to its serving process too (see [`Mount::stop`]
    /// for STOP).
    pub fn send(&self, sig: &str) {
        assert_ne!(
            sig, "STOP",
            "use Mount::stop, which waits until it is stopped"
        );
        let mut pids = vec![self.pid()];
        if sig == "CONT" {
            pids.extend(self.servers());
        }
        for p in pids {
            Command::new("kill")
                .args([&format!("-{sig}"), &p.to_string()])
                .status()
                .unwrap();
        }
    }

    /// Whether the daemon process has exited (and its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kill the daemon with SIGKILL (crash) and clean the dead mount.
    pub fn crash(mut self) {
        self.kill9();
        let _ = self.child.take();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

/// A daemon stopped by [`Mount::stop`]; dropping this resumes it.
pub struct Stopped<'a>(&'a Mount);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let m = self.0;
        for p in std::iter::once(m.pid()).chain(m.servers()) {
            let _ = Command::new("kill")
                .args(["-CONT", &p.to_string()])
                .status();
        }
    }
}

/// Send SIGSTOP to process `pid` and wait until every one of its threads
/// is stopped (state `T` in `/proc/PID/task/*/stat`); `false` if it is
/// gone or did not stop within 10 s.
pub fn stop_and_wait(pid: u32) -> bool {
    let st = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status();
    if !st.is_ok_and(|s| s.success()) {
        return false;
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if all_threads_stopped(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // "TID (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        match state {
            Some('T') => any = true,
            // A thread that ended meanwhile (or a leader that did, its
            // other threads going on).
            None | Some('Z' | 'X') => {}
            Some(_) => return false,
        }
    }
    any
}

/// The child processes of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

pub fn wait_timeout(c: &mut Child, t: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < t {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if is_mounted(&self.mountpoint) {
                let ok = Command::new("umount")
                    .arg(&self.mountpoint)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    let _ = Command::new("umount")
                        .arg("-l")
                        .arg(&self.mountpoint)
                        .status();
                }
            }
            if wait_timeout(&mut c, Duration::from_secs(5)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_file(&self.stats);
    }
}

/// Run a command, returning its output.
pub fn run(cmd: &mut Command) -> Output {
    no_node_config(cmd).output().expect("run command")
}

/// Tests never read the machine's `/etc/baseguard/baseguard.toml`: an empty
/// `BASEGUARD_CONFIG` means no configuration file, unless the test names one.
pub fn no_node_config(cmd: &mut Command) -> &mut Command {
    if !cmd.get_envs().any(|(k, _)| k == "BASEGUARD_CONFIG") {
        cmd.env("BASEGUARD_CONFIG", "");
    }
    cmd
}

/// A mount made detached (by `baseguard mount` without `-f`, or mount(8)),
/// unmounted on drop even when the test fails.
pub struct Detached {
    pub mp: PathBuf,
}

impl Drop for Detached {
    fn drop(&mut self) {
        // Something may hold the mount for a moment (a `status` probe of
        // another test): try again, and detach it as a last resort.
        for _ in 0..30 {
            if !is_mounted(&self.mp) {
                return;
            }
            let _ = Command::new("umount")
                .arg(&self.mp)
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
    }
}

/// Run a shell snippet as an unprivileged user (uid/gid 65534).
pub fn as_nobody(script: &str) -> Output {
    run(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        "sh",
        "-c",
        script,
    ]))
}

/// The scenario script shared by transparency tests.
pub fn scenario(root: &Path, user: Option<u32>) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scenario.py");
    let mut cmd = if let Some(uid) = user {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            script,
        ]);
        c
    } else {
        let mut c = Command::new("/usr/bin/python3");
        c.arg(script);
        c
    };
    let out = run(cmd.arg(root));
    assert!(
        out.status.success(),
        "scenario failed in {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
