//! The supervisor: a small process that owns the FUSE connection and never parses a
//! request.
//!
//! ```text
//! supervisor (baseguard mount, foreground child)        serving process (same binary,
//!   open /dev/fuse, mount(2) with fd=N                   `mount ... --session-server`)
//!   spawn server, stdin = one end of a socket pair  ──▶  Hello + [/dev/fuse, backing dir]
//!   send every kept record + its descriptor          ──▶  Kept..., Go
//!                                                         first server: answer INIT, send Params
//!                                                         later ones: Session::resume (no INIT),
//!                                                         import the handles, FUSE_NOTIFY_RESEND
//!   READY to `mount`'s parent                       ◀──  Serving
//!   store records by key, hold their descriptors    ◀──  Put{key}+fd / Del{keys} (before the
//!   (read in batches every 5 ms while they come;          kernel hears of a handle / after it
//!   at once when the doorbell rings)                      released it); the doorbell's end, and
//!                                                         a ring on it when something waits
//!   server died (kill -9, panic, OOM): read the rest of its messages, start the next one at
//!   once with the same connection and every kept descriptor (files stay open, locks held).
//!   `baseguard upgrade`: Drain ──▶ server stops taking requests, finishes the started ones,
//!   ◀── Drained, exits; the next server (from the new binary) takes over the same way.
//!   SIGTERM/SIGINT: unmount; the server reads ENODEV and exits 0; so does the supervisor.
//! ```
//!
//! Requests that arrive while no server runs wait in the kernel; requests a dead server had
//! read and not answered are handed out again by `FUSE_NOTIFY_RESEND` (kernel >= 6.9).
//! Not with FUSE-over-io_uring (`transport=uring`, [`super::ring`]): on 6.18 a request held
//! in a dead server's ring entry is never resent and its caller waits until the mount is
//! aborted, so `transport=auto` keeps /dev/fuse.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::proto::{Bell, LINGER, Link, Params, ToServer, ToSupervisor, wait_for_ring};
use super::registry::{self, Entry};
use crate::sys;

/// The hidden flag that makes `baseguard mount` a serving process.
pub const SERVER_FLAG: &str = "--session-server";

/// How long an upgrade waits for the new server to answer.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the supervisor needs.
pub struct Plan {
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    /// `O_PATH` descriptor of the backing directory, opened before mounting (the mount may
    /// cover it); every server gets it.
    pub root: OwnedFd,
    /// `MS_*` flags for mount(2).
    pub flags: u64,
    /// Options after `fd=,rootmode=,user_id=,group_id=` (`allow_other`...).
    pub options: String,
    /// The serving binary and its arguments.
    pub exe: PathBuf,
    pub server_args: Vec<OsString>,
    /// Say READY to the detaching parent once the first server answers, and then let go
    /// of the terminal.
    pub notify_ready: bool,
}

/// Records kept for the serving process, with their descriptors.
#[derive(Default)]
struct Store {
    params: Option<Params>,
    /// Each record as its JSON text: a parsed value costs about ten times the
    /// memory (2 KiB a node; a node is kept for every inode the kernel holds).
    kept: BTreeMap<String, (Box<str>, Option<OwnedFd>)>,
}

/// Where the answer to `baseguard upgrade` goes: the new server's pid, or why not.
type Answer = Sender<Result<u32, String>>;

enum Event {
    Serving(u64),
    Failed(u64, String),
    Exited(u64, Option<ExitStatus>),
    Upgrade(PathBuf, Answer),
    Signal(i32),
}

/// The current serving process.
struct Server {
    generation: u64,
    pid: u32,
    link: Arc<Link>,
    binary: PathBuf,
    started: u64,
    serving: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mount and supervise until the filesystem is unmounted. Errors before the first server
/// answers are returned (and the mount is undone); later, servers are restarted forever.
pub fn run(plan: Plan) -> Result<(), String> {
    let sigs = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1];
    sys::block_signals(&sigs).map_err(|e| format!("cannot set up signals: {e}"))?;

    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("cannot open /dev/fuse: {e}"))?;
    let mp = &plan.mountpoint;
    let meta = std::fs::metadata(mp).map_err(|e| format!("mountpoint {}: {e}", mp.display()))?;
    let me = std::fs::metadata("/proc/self").map_err(|e| e.to_string())?;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        fuse.as_raw_fd(),
        meta.mode() & libc::S_IFMT,
        me.uid(),
        me.gid()
    );
    if !plan.options.is_empty() {
        data.push(',');
        data.push_str(&plan.options);
    }
    let source = plan.backing.display().to_string();
    sys::mount_fuse(&source, mp, "fuse.baseguard", plan.flags, &data)
        .map_err(|e| mount_error(mp, e))?;
    tracing::info!(mountpoint = %mp.display(), backing = %source, "mounted (supervisor)");

    let r = supervise(&plan, OwnedFd::from(fuse), &sigs);
    if r.is_err() {
        let _ = sys::umount_detach(mp);
    }
    r
}

fn mount_error(mountpoint: &Path, e: std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EBUSY) => format!("mountpoint {} is busy.", mountpoint.display()),
        Some(libc::ENOENT) => format!("mountpoint {} does not exist.", mountpoint.display()),
        Some(libc::EPERM) => format!(
            "not permitted to mount on {} (need root and access to /dev/fuse): {e}",
            mountpoint.display()
        ),
        _ => format!("cannot mount on {}: {e}", mountpoint.display()),
    }
}

struct Supervisor<'a> {
    plan: &'a Plan,
    fuse: OwnedFd,
    store: Arc<Mutex<Store>>,
    tx: Sender<Event>,
    entry: Entry,
    dir: PathBuf,
}

fn supervise(plan: &Plan, fuse: OwnedFd, sigs: &[i32]) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<Event>();
    {
        let tx = tx.clone();
        let sigs = sigs.to_vec();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                while let Ok(s) = sys::wait_signal(&sigs) {
                    if tx.send(Event::Signal(s)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    }
    let dir = registry::run_dir();
    let pid = std::process::id();
    let control = registry::control_path(&dir, pid);
    if let Err(e) = listen(&dir, &control, tx.clone()) {
        tracing::warn!(error = %e, path = %control.display(), "no control socket: `baseguard upgrade` will not find this mount");
    }
    let mut sup = Supervisor {
        plan,
        fuse,
        store: Arc::default(),
        tx,
        entry: Entry {
            mountpoint: plan.mountpoint.clone(),
            backing: plan.backing.clone(),
            supervisor_pid: pid,
            control,
            ..Entry::default()
        },
        dir,
    };
    let r = sup.main_loop(rx);
    registry::remove(&sup.dir, pid);
    r
}

impl Supervisor<'_> {
    fn publish(&self) {
        if let Err(e) = registry::write(&self.dir, &self.entry) {
            tracing::warn!(error = %e, "cannot publish the session's status");
        }
    }

    /// Start a serving process of generation `generation` from `binary`, hand it the
    /// connection and every kept record, and watch it.
    fn spawn(&self, binary: &Path, generation: u64) -> Result<Server, String> {
        let (mine, theirs) = Link::pair().map_err(|e| format!("cannot make a socket pair: {e}"))?;
        let mut child = Command::new(binary)
            .args(&self.plan.server_args)
            .stdin(Stdio::from(theirs.into_fd()))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let pid = child.id();
        let link = Arc::new(mine);
        {
            let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
            let hello = ToServer::Hello {
                params: store.params,
                generation,
                mountpoint: self.plan.mountpoint.clone(),
                backing: self.plan.backing.clone(),
            };
            let mut r = link.send(&hello, &[self.fuse.as_fd(), self.plan.root.as_fd()]);
            for (key, (rec, fd)) in &store.kept {
                if r.is_err() {
                    break;
                }
                let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
                // Stored from a value this process parsed: it parses again.
                let rec = serde_json::from_str(rec).unwrap_or(serde_json::Value::Null);
                let msg = ToServer::Kept {
                    key: key.clone(),
                    rec,
                };
                r = link.send(&msg, &fds);
            }
            if let Err(e) = r.and_then(|_| link.send(&ToServer::Go, &[])) {
                tracing::warn!(pid, error = %e, "the new serving process did not take the session");
            }
        }
        let (store, tx, rlink) = (Arc::clone(&self.store), self.tx.clone(), Arc::clone(&link));
        std::thread::Builder::new()
            .name(format!("server-{generation}"))
            .spawn(move || {
                keep(&rlink, &store, &tx, generation);
                // Every message of this server is in; now it may be replaced.
                let status = child.wait().ok();
                let _ = tx.send(Event::Exited(generation, status));
            })
            .map_err(|e| format!("cannot start a watcher thread: {e}"))?;
        Ok(Server {
            generation,
            pid,
            link,
            binary: binary.to_path_buf(),
            started: now(),
            serving: false,
        })
    }

    fn main_loop(&mut self, rx: mpsc::Receiver<Event>) -> Result<(), String> {
        let exe = self.plan.exe.clone();
        let mut cur = self.spawn(&exe, 1)?;
        self.entry.generation = 1;
        self.entry.server_pid = cur.pid;
        self.entry.server_started = cur.started;
        self.entry.binary = exe.clone();
        self.publish();
        let mut ready = false;
        let mut unmounting = false;
        // An upgrade in progress: the binary to start next, who asked, and the one to fall
        // back to.
        let mut upgrade: Option<(PathBuf, Answer)> = None;
        let mut upgraded: Option<(Answer, PathBuf, Instant)> = None;
        let mut failures = 0u32;
        let mut failed_upgrade: Option<(Answer, String)> = None;
        loop {
            let Ok(ev) = rx.recv() else {
                return Ok(());
            };
            match ev {
                Event::Serving(g) if g == cur.generation => {
                    cur.serving = true;
                    failures = 0;
                    if !ready {
                        ready = true;
                        if self.plan.notify_ready {
                            crate::daemon::notify_ready();
                            if let Err(e) = sys::redirect_stdio_to_devnull() {
                                tracing::warn!(error = %e, "cannot detach from the starting terminal");
                            }
                        }
                    }
                    if let Some((reply, _, _)) = upgraded.take() {
                        let _ = reply.send(Ok(cur.pid));
                    }
                    tracing::info!(pid = cur.pid, generation = g, "serving process answers");
                }
                Event::Failed(g, msg) if g == cur.generation && !ready => {
                    // It cannot start (a configuration error): say why, once.
                    let _ = sys::kill(cur.pid as i32, libc::SIGKILL);
                    return Err(msg);
                }
                Event::Failed(g, msg) => {
                    tracing::error!(generation = g, "serving process failed: {msg}");
                }
                Event::Exited(g, status) if g == cur.generation => {
                    let clean = status.is_some_and(|s| s.success());
                    if unmounting || (clean && upgrade.is_none()) {
                        tracing::info!(mountpoint = %self.plan.mountpoint.display(), "unmounted");
                        return Ok(());
                    }
                    // Before the first server answers, a server that exits on its own
                    // cannot start (it said why with `Failed`); one killed is replaced, a
                    // few times.
                    let killed = status.is_some_and(|s| s.code().is_none());
                    if !ready && (!killed || failures >= 5) {
                        return Err(format!(
                            "the serving process {} before it answered",
                            describe(status)
                        ));
                    }
                    let mut binary = cur.binary.clone();
                    if let Some((next, reply)) = upgrade.take() {
                        upgraded = Some((reply, cur.binary.clone(), Instant::now()));
                        binary = next;
                        self.entry.upgrades += 1;
                    } else if let Some((reply, previous, _)) = upgraded.take() {
                        // The new binary died before it answered: back to the old one
                        // (the caller hears of it once that one runs).
                        let msg = format!(
                            "the new serving process {} before it answered; {} serves again",
                            describe(status),
                            previous.display()
                        );
                        failed_upgrade = Some((reply, msg));
                        binary = previous;
                    } else {
                        self.entry.restarts += 1;
                        tracing::warn!(
                            pid = cur.pid,
                            "serving process {}; starting another",
                            describe(status)
                        );
                        if !cur.serving {
                            failures += 1;
                            let wait = Duration::from_millis(50 << failures.min(6));
                            std::thread::sleep(wait);
                        }
                    }
                    let generation = cur.generation + 1;
                    cur = loop {
                        match self.spawn(&binary, generation) {
                            Ok(s) => break s,
                            Err(e) => {
                                tracing::error!("{e}");
                                if let Some((reply, previous, _)) = upgraded.take() {
                                    let _ = reply.send(Err(e));
                                    binary = previous;
                                } else {
                                    std::thread::sleep(Duration::from_secs(1));
                                }
                            }
                        }
                    };
                    self.entry.generation = generation;
                    self.entry.server_pid = cur.pid;
                    self.entry.server_started = cur.started;
                    self.entry.binary = cur.binary.clone();
                    self.publish();
                    if let Some((reply, msg)) = failed_upgrade.take() {
                        let _ = reply.send(Err(msg));
                    }
                }
                Event::Exited(..) | Event::Serving(_) => {}
                Event::Upgrade(binary, reply) => {
                    if upgrade.is_some() || upgraded.is_some() || unmounting || !cur.serving {
                        let _ = reply.send(Err(
                            "the mount is busy (starting, upgrading or unmounting); try again"
                                .into(),
                        ));
                        continue;
                    }
                    tracing::info!(binary = %binary.display(), "upgrade: draining the serving process");
                    if let Err(e) = cur.link.send(&ToServer::Drain, &[]) {
                        let _ = reply.send(Err(format!("cannot reach the serving process: {e}")));
                        continue;
                    }
                    upgrade = Some((binary, reply));
                }
                Event::Signal(libc::SIGUSR1) => {
                    let _ = sys::kill(cur.pid as i32, libc::SIGUSR1);
                }
                Event::Signal(libc::SIGHUP) => {
                    tracing::info!("SIGHUP ignored (stop with SIGTERM or umount)");
                }
                // Never detach a busy mount: the directory underneath would
                // show while VMs run (detaching is an explicit request:
                // `baseguard umount --lazy`).
                Event::Signal(sig) => {
                    let mp = &self.plan.mountpoint;
                    match crate::mountinfo::unmount_unless_busy(mp) {
                        crate::mountinfo::Unmount::Done => {
                            tracing::info!(signal = sig, "unmounting");
                            unmounting = true;
                        }
                        crate::mountinfo::Unmount::Busy(h) => {
                            tracing::warn!(
                                signal = sig,
                                error = "EBUSY",
                                holders = %crate::mountinfo::describe_holders(&h),
                                "not unmounting: files are open through the mount; still serving \
                                 (stop the holders, or detach with 'baseguard umount --lazy {}')",
                                mp.display()
                            );
                        }
                        crate::mountinfo::Unmount::Failed(e) => {
                            tracing::warn!(signal = sig, error = %e, "cannot unmount; still serving");
                        }
                    }
                }
            }
            if let Some((reply, previous, since)) = upgraded.as_ref() {
                if since.elapsed() > UPGRADE_TIMEOUT {
                    let _ = reply.send(Err(format!(
                        "the new serving process did not answer within {}s",
                        UPGRADE_TIMEOUT.as_secs()
                    )));
                    let _ = previous;
                    upgraded = None;
                }
            }
        }
    }
}

fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "exited".into(),
        },
        None => "vanished".into(),
    }
}

/// Take a server's messages until it closes its end: keep and drop records, acknowledge.
///
/// Once the server has handed over its doorbell, messages are read in batches: after a
/// batch the keeper lets [`LINGER`] pass (unless the server rings or goes away) before it
/// looks again, and it blocks only when a look finds nothing. See [`super::proto`].
fn keep(link: &Link, store: &Mutex<Store>, tx: &Sender<Event>, generation: u64) {
    keep_lingering(link, store, tx, generation, LINGER)
}

/// [`keep`], letting records gather for `pause` (a test makes it long: only the doorbell
/// may wake the keeper then).
fn keep_lingering(
    link: &Link,
    store: &Mutex<Store>,
    tx: &Sender<Event>,
    generation: u64,
    pause: Duration,
) {
    let mut bell: Option<OwnedFd> = None;
    // The last look found a message: look again without waiting.
    let mut busy = false;
    loop {
        let r = if busy {
            link.try_recv::<ToSupervisor>()
        } else {
            link.recv::<ToSupervisor>()
        };
        let (msg, mut fds) = match r {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                busy = false;
                if let Some(b) = &bell {
                    if wait_for_ring(b.as_fd(), pause) == Bell::Closed {
                        bell = None; // the server is exiting: its messages end with EOF
                    }
                }
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "bad message from the serving process");
                continue;
            }
            // The server is gone (ECONNRESET when it died with messages unread).
            Err(_) => return,
        };
        busy = bell.is_some();
        match msg {
            ToSupervisor::Params { params } => {
                store.lock().unwrap_or_else(|p| p.into_inner()).params = Some(params);
            }
            ToSupervisor::Put { key, rec } => {
                let fd = fds.pop();
                let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
                s.kept.insert(key, (rec.to_string().into_boxed_str(), fd));
            }
            ToSupervisor::Del { keys, ack } => {
                {
                    let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
                    for k in keys {
                        s.kept.remove(&k);
                    }
                }
                if ack {
                    let _ = link.send(&ToServer::Ack, &[]);
                }
            }
            ToSupervisor::Serving => {
                let _ = tx.send(Event::Serving(generation));
            }
            ToSupervisor::Failed { msg } => {
                let _ = tx.send(Event::Failed(generation, msg));
            }
            ToSupervisor::Drained => {
                tracing::info!(generation, "serving process drained");
            }
            ToSupervisor::Doorbell => {
                bell = fds.pop();
                busy = bell.is_some();
            }
        }
    }
}

/// The control socket: one JSON request per connection, one JSON answer.
fn listen(dir: &Path, path: &Path, tx: Sender<Event>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in l.incoming().flatten() {
                let mut line = String::new();
                let mut r = BufReader::new(&conn);
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let answer = match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Upgrade { binary }) => {
                        let (rtx, rrx) = mpsc::channel();
                        let _ = tx.send(Event::Upgrade(binary, rtx));
                        match rrx.recv_timeout(UPGRADE_TIMEOUT + Duration::from_secs(5)) {
                            Ok(Ok(pid)) => serde_json::json!({"ok": true, "server_pid": pid}),
                            Ok(Err(e)) => serde_json::json!({"ok": false, "error": e}),
                            Err(_) => serde_json::json!({"ok": false, "error": "no answer"}),
                        }
                    }
                    Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                };
                let mut w = &conn;
                let _ = writeln!(w, "{answer}");
            }
        })?;
    Ok(())
}

/// A control request.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Hand the mount to a serving process started from `binary`.
    Upgrade { binary: PathBuf },
}

/// Ask the supervisor of `mountpoint` to hand its session to a serving process started from
/// `binary`; returns the new server's pid.
pub fn upgrade(mountpoint: &Path, binary: &Path) -> Result<u32, String> {
    let e = registry::find(mountpoint).ok_or_else(|| {
        format!(
            "no baseguard supervisor runs for {} (is it mounted by this version?)",
            mountpoint.display()
        )
    })?;
    let conn = std::os::unix::net::UnixStream::connect(&e.control).map_err(|err| {
        format!(
            "cannot reach the supervisor at {}: {err}",
            e.control.display()
        )
    })?;
    let req = Request::Upgrade {
        binary: binary.to_path_buf(),
    };
    let mut w = &conn;
    writeln!(
        w,
        "{}",
        serde_json::to_string(&req).map_err(|e| e.to_string())?
    )
    .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .map_err(|_| "the supervisor closed the connection without an answer".to_string())?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["server_pid"].as_u64().unwrap_or(0) as u32)
    } else {
        Err(v["error"].as_str().unwrap_or("upgrade failed").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keeper_takes_every_record_and_answers_acks_while_it_lingers() {
        let (server, sup) = Link::pair().unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        let (tx, rx) = mpsc::channel();
        let keeper = {
            let store = Arc::clone(&store);
            // Records gather for an hour: an Ack can only come from the doorbell.
            let pause = Duration::from_secs(3600);
            std::thread::spawn(move || keep_lingering(&sup, &store, &tx, 7, pause))
        };
        server.install_doorbell().unwrap();
        let f = tempfile::tempfile().unwrap();
        for round in 0..50 {
            // A burst of records, then a lock's Del that waits for its Ack: the keeper is
            // lingering by then and must be woken by the doorbell.
            for i in 0..20 {
                let msg = ToSupervisor::Put {
                    key: format!("f/{round}/{i}"),
                    rec: serde_json::json!({ "round": round }),
                };
                server.send(&msg, &[f.as_fd()]).unwrap();
            }
            let del = ToSupervisor::Del {
                keys: vec![format!("f/{round}/0")],
                ack: true,
            };
            server.send_now(&del, &[]).unwrap();
            assert!(
                server.wait_readable(Duration::from_secs(60)).unwrap(),
                "round {round}: no Ack (the doorbell did not wake the keeper)"
            );
            match server.recv::<ToServer>().unwrap() {
                Some((ToServer::Ack, _)) => {}
                other => panic!("expected an Ack, got {other:?}"),
            }
        }
        // A server that goes away ends the keeper's pause too (its doorbell closes), after
        // every message it sent is taken.
        server.send(&ToSupervisor::Serving, &[]).unwrap();
        drop(server);
        keeper.join().unwrap();
        assert!(matches!(rx.try_recv(), Ok(Event::Serving(7))));
        let s = store.lock().unwrap();
        assert_eq!(s.kept.len(), 50 * 19);
        assert!(s.kept.values().all(|(_, fd)| fd.is_some()));
        assert!(!s.kept.contains_key("f/3/0") && s.kept.contains_key("f/3/1"));
    }
}
