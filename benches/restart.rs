//! `cargo bench --bench restart` (root): what a restart and an upgrade of the serving
//! process cost a client, and what handing handles to the supervisor costs on the request
//! path.
//!
//! - kill: a client loops `fsync` on a file it opened through the mount (every `fsync`
//!   reaches the daemon); the serving process is SIGKILLed; reported: the time from the kill
//!   to the next answered request, and the longest single request around it (the stall the
//!   client saw). 20 rounds.
//! - upgrade: the same client while `baseguard upgrade` hands the mount to a copy of the
//!   binary: the command's wall time and the client's longest request. 5 rounds.
//! - hand-over cost: create+close and open+close of 2,000 files, with the hand-over on and
//!   off (hidden `--no-handover`), alternately, 3 rounds, medians.
//!
//! `cargo test --all-targets` builds and runs this without `--bench`: it exits at once.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baseguard::session::registry;
use baseguard::sys;

const BIN: &str = env!("CARGO_BIN_EXE_baseguard");

struct Mounted {
    mp: PathBuf,
    child: Child,
}

impl Mounted {
    fn new(backing: &Path, mp: &Path, extra: &[&str]) -> Mounted {
        std::fs::create_dir_all(mp).unwrap();
        let child = Command::new(BIN)
            .args(["mount", "--foreground"])
            .args(extra)
            .arg(backing)
            .arg(mp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while registry::find(mp).is_none_or(|e| e.server_pid == 0) {
            assert!(start.elapsed() < Duration::from_secs(15), "no mount");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The first request waits for INIT to be answered.
        std::fs::metadata(mp).unwrap();
        Mounted {
            mp: mp.to_path_buf(),
            child,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mp).status();
        let _ = self.child.wait();
    }
}

/// (start, end) of each request, from a client looping fsync on one open file.
struct Client {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Instant, Instant)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Client {
    fn start(path: &Path) -> Client {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let (s, l) = (Arc::clone(&stop), Arc::clone(&log));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let a = Instant::now();
                f.sync_all().expect("fsync through the mount failed");
                let b = Instant::now();
                l.lock().unwrap().push((a, b));
            }
        });
        Client { stop, log, thread }
    }

    /// (first answer after `t0`) - `t0`, and the longest request overlapping [t0, t1].
    fn around(&self, t0: Instant, t1: Instant) -> (Duration, Duration) {
        let log = self.log.lock().unwrap();
        let next = log
            .iter()
            .filter(|(_, b)| *b > t0)
            .map(|(_, b)| *b - t0)
            .min()
            .unwrap_or_default();
        let stall = log
            .iter()
            .filter(|(a, b)| *b >= t0 && *a <= t1)
            .map(|(a, b)| *b - *a)
            .max()
            .unwrap_or_default();
        (next, stall)
    }

    fn wait_for_answers_after(&self, t: Instant, n: usize) {
        let start = Instant::now();
        while self
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| *a > t)
            .count()
            < n
        {
            assert!(start.elapsed() < Duration::from_secs(30), "client stuck");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.log.lock().unwrap().len()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let q = |p: f64| ms(v[((v.len() - 1) as f64 * p).round() as usize]);
    println!(
        "{name:<44} median {:>7.2} ms   p90 {:>7.2} ms   max {:>7.2} ms   (n={})",
        q(0.5),
        q(0.9),
        q(1.0),
        v.len()
    );
}

fn per_op(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn create_open(mp: &Path, round: usize, n: usize) -> (f64, f64) {
    let dir = mp.join(format!("r{round}"));
    std::fs::create_dir(&dir).unwrap();
    let t = Instant::now();
    for i in 0..n {
        drop(std::fs::File::create(dir.join(format!("f{i}"))).unwrap());
    }
    let create = per_op(t.elapsed(), n);
    let t = Instant::now();
    for i in 0..n {
        drop(std::fs::File::open(dir.join(format!("f{i}"))).unwrap());
    }
    (create, per_op(t.elapsed(), n))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("restart bench: not run under `cargo test`; use `cargo bench --bench restart`");
        return;
    }
    if sys::geteuid() != 0 {
        eprintln!("restart bench: needs root (it mounts)");
        std::process::exit(2);
    }
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    std::fs::write(backing.join("disk"), vec![0u8; 1 << 20]).unwrap();
    let m = Mounted::new(&backing, &tmp.path().join("mnt"), &[]);

    // Kills.
    let client = Client::start(&m.mp.join("disk"));
    std::thread::sleep(Duration::from_millis(200));
    let (mut next, mut stall) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let e = registry::find(&m.mp).unwrap();
        let t0 = Instant::now();
        sys::kill(e.server_pid as i32, libc::SIGKILL).unwrap();
        client.wait_for_answers_after(t0, 50);
        let (n, s) = client.around(t0, t0);
        next.push(n);
        stall.push(s);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Upgrades.
    let newbin = tmp.path().join("baseguard-new");
    std::fs::copy(BIN, &newbin).unwrap();
    let (mut wall, mut ustall) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let bin = if i % 2 == 0 {
            newbin.as_path()
        } else {
            Path::new(BIN)
        };
        let t0 = Instant::now();
        let out = Command::new(BIN)
            .arg("upgrade")
            .arg(&m.mp)
            .arg("--binary")
            .arg(bin)
            .output()
            .unwrap();
        let t1 = Instant::now();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        client.wait_for_answers_after(t1, 50);
        wall.push(t1 - t0);
        ustall.push(client.around(t0, t1).1);
        std::thread::sleep(Duration::from_millis(100));
    }
    let requests = client.finish();
    println!("restart bench: {requests} fsync requests through the mount, 0 errors");
    summary("kill -9 -> next answered request", next);
    summary("kill -9: longest request (client stall)", stall);
    summary("upgrade: `baseguard upgrade` wall time", wall);
    summary("upgrade: longest request (client stall)", ustall);
    drop(m);

    // Hand-over cost on the request path.
    let on = Mounted::new(&backing, &tmp.path().join("on"), &[]);
    let off = Mounted::new(&backing, &tmp.path().join("off"), &["--no-handover"]);
    let (mut c_on, mut o_on, mut c_off, mut o_off) = (vec![], vec![], vec![], vec![]);
    for r in 0..3 {
        let (c, o) = create_open(&on.mp, 2 * r, 2000);
        c_on.push(c);
        o_on.push(o);
        let (c, o) = create_open(&off.mp, 2 * r + 1, 2000);
        c_off.push(c);
        o_off.push(o);
    }
    println!(
        "create+close: {:.1} us/file with hand-over, {:.1} without",
        median(c_on),
        median(c_off)
    );
    println!(
        "open+close:   {:.1} us/file with hand-over, {:.1} without",
        median(o_on),
        median(o_off)
    );
}
