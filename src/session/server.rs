//! The serving process's side of the session: take the connection from the supervisor,
//! answer INIT (first server) or resume (later ones: take over every kept handle, then ask
//! the kernel to resend what the previous server left unanswered), and serve.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use fuser::{Config, Session, SessionACL};

use super::custody::{Custody, Kept};
use super::proto::{Link, Params, ToServer, ToSupervisor};
use super::ring::{self, Choice, RingStats, Transport};
use crate::fs::{Handle, InodeRecord, Passthrough};
use crate::fuse::{FuseAdapter, Handover};

/// `FUSE_NOTIFY_RESEND`: the kernel puts every request a server read and did not answer
/// back in the queue, with bit 63 of its unique id set (echoed in the reply as usual).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// The session as the supervisor handed it over.
pub struct Attached {
    link: Arc<Link>,
    fuse: OwnedFd,
    /// The backing directory (`O_PATH`), opened by the supervisor before it mounted.
    pub root: OwnedFd,
    params: Option<Params>,
    generation: u64,
    kept: Vec<(String, serde_json::Value, Option<OwnedFd>)>,
    pub mountpoint: std::path::PathBuf,
    pub backing: std::path::PathBuf,
}

/// Take the session from the supervisor on stdin.
pub fn attach() -> Result<Attached, String> {
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("no session on stdin: {e}"))?;
    let link = Link::new(stdin);
    let bad = |what: &str| format!("the supervisor sent no {what} (is this a serving process?)");
    let (params, generation, mountpoint, backing, mut fds) = match link.recv::<ToServer>() {
        Ok(Some((
            ToServer::Hello {
                params,
                generation,
                mountpoint,
                backing,
            },
            fds,
        ))) if fds.len() == 2 => (params, generation, mountpoint, backing, fds),
        _ => return Err(bad("session")),
    };
    let root = fds.pop().ok_or_else(|| bad("backing directory"))?;
    let fuse = fds.pop().ok_or_else(|| bad("FUSE connection"))?;
    let mut kept = Vec::new();
    loop {
        match link.recv::<ToServer>() {
            Ok(Some((ToServer::Kept { key, rec }, mut fds))) => kept.push((key, rec, fds.pop())),
            Ok(Some((ToServer::Go, _))) => break,
            _ => return Err(bad("end of the kept handles")),
        }
    }
    // Stdin was the link: point it (and the rest) elsewhere later, once serving.
    Ok(Attached {
        link: Arc::new(link),
        fuse,
        root,
        params,
        generation,
        kept,
        mountpoint,
        backing,
    })
}

impl Attached {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Tell the supervisor why this server cannot start.
    pub fn failed(&self, msg: &str) {
        let _ = self.link.send_now(
            &ToSupervisor::Failed {
                msg: msg.to_string(),
            },
            &[],
        );
    }

    /// Serve `fs` on the session until it is unmounted (or handed over, in which case the
    /// process exits here). `on_serving` runs once requests are answered.
    #[allow(clippy::too_many_arguments)]
    pub fn serve(
        self,
        fs: Arc<Passthrough>,
        passthrough: bool,
        acl: SessionACL,
        threads: usize,
        handover: bool,
        transport: Choice,
        on_serving: impl FnOnce(),
    ) -> Result<(), String> {
        let Attached {
            link,
            fuse,
            root: _,
            params,
            generation,
            kept,
            mountpoint,
            ..
        } = self;
        let (ack_tx, ack_rx) = mpsc::channel();
        let custody = Arc::new(Custody::new(Arc::clone(&link), ack_rx));
        let shared = Arc::new(Handover::default());
        shared
            .want_uring
            .store(transport.wants_uring(), Ordering::Relaxed);
        if handover {
            if let Err(e) = link.install_doorbell() {
                tracing::warn!(error = %e, "no doorbell: the supervisor reads every message at once");
            }
            let _ = shared.custody.set(Arc::clone(&custody));
        }
        let adapter = FuseAdapter::with_handover(Arc::clone(&fs), passthrough, Arc::clone(&shared));
        let mut config = Config::default();
        config.acl = acl;
        config.n_threads = Some(threads.max(1));
        // Every thread reads the one shared descriptor: a per-thread clone would end the
        // requests it holds with ECONNABORTED when this process dies.
        config.clone_fd = false;
        let notify = fuse
            .try_clone()
            .map_err(|e| format!("cannot duplicate the FUSE descriptor: {e}"))?;
        let ring_fd = fuse
            .try_clone()
            .map_err(|e| format!("cannot duplicate the FUSE descriptor: {e}"))?;
        let mut agreed = params;
        let session = match params {
            None => {
                let s = Session::from_fd(adapter, fuse, acl, config)
                    .map_err(|e| format!("the FUSE handshake failed: {e}"))?;
                let (major, minor) = s.proto_version().unwrap_or((7, 0));
                let params = Params {
                    major,
                    minor,
                    passthrough: shared.passthrough.load(Ordering::Relaxed),
                    uring: shared.uring.load(Ordering::Relaxed),
                };
                link.send_now(&ToSupervisor::Params { params }, &[])
                    .map_err(|e| format!("cannot reach the supervisor: {e}"))?;
                agreed = Some(params);
                s
            }
            Some(p) => {
                shared.passthrough.store(p.passthrough, Ordering::Relaxed);
                shared.uring.store(p.uring, Ordering::Relaxed);
                let s = Session::resume(adapter, fuse, acl, config, (p.major, p.minor));
                let n = kept.len();
                let t = std::time::Instant::now();
                take_over(&fs, &shared, &custody, &link, &s, kept);
                tracing::info!(
                    generation,
                    handles = n,
                    took_us = t.elapsed().as_micros() as u64,
                    "took the session over"
                );
                s
            }
        };
        let _ = shared.gate.set(session.gate());
        let _ = shared.notifier.set(session.notifier());
        let uring = shared.uring.load(Ordering::Relaxed);
        let ring_stats = Arc::new(RingStats::default());
        listen(&link, &session.gate(), &ring_stats, ack_tx);
        if params.is_some() {
            let mut f = std::fs::File::from(notify);
            let mut msg = Vec::with_capacity(16);
            msg.extend_from_slice(&16u32.to_le_bytes());
            msg.extend_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
            msg.extend_from_slice(&0u64.to_le_bytes());
            if let Err(e) = f.write_all(&msg) {
                // Kernels before 6.9: requests the dead server held are lost (their callers
                // wait until they are interrupted).
                tracing::warn!(error = %e, "the kernel cannot resend requests in flight");
            }
        }
        let resumed = params.is_some();
        let mut on_serving = Some(on_serving);
        session
            .run_with(|dispatcher| {
                let threads = if uring {
                    let t = start_rings(
                        &ring_fd,
                        dispatcher,
                        threads,
                        &fs,
                        &ring_stats,
                        transport,
                        resumed.then_some(mountpoint.as_path()),
                    );
                    if t.is_empty() {
                        // The kernel turned the rings off for this connection (a failed
                        // REGISTER does): later servers must not try them again.
                        if let Some(mut p) = agreed {
                            p.uring = false;
                            let _ = link.send_now(&ToSupervisor::Params { params: p }, &[]);
                        }
                    }
                    t
                } else {
                    say_transport(Transport::Dev, transport, "");
                    Vec::new()
                };
                // Serving only once the rings (if any) are registered: `baseguard upgrade`
                // returns then, and a request made after it goes to this server's entries.
                if let Err(e) = link.send_now(&ToSupervisor::Serving, &[]) {
                    tracing::error!(error = %e, "cannot reach the supervisor");
                }
                if let Some(f) = on_serving.take() {
                    f();
                }
                threads
            })
            .map_err(|e| format!("the FUSE session ended with an error: {e}"))
    }
}

/// Register the ring entries (FUSE-over-io_uring was negotiated at INIT). On failure the
/// kernel has turned the rings off for this connection and /dev/fuse carries on.
fn start_rings(
    fuse: &OwnedFd,
    dispatcher: fuser::Dispatcher<FuseAdapter>,
    threads: usize,
    fs: &Arc<Passthrough>,
    ring_stats: &Arc<RingStats>,
    choice: Choice,
    resumed: Option<&std::path::Path>,
) -> Vec<std::thread::JoinHandle<()>> {
    let per_queue = threads.div_ceil(ring::possible_cpus()).max(2);
    match ring::start(
        fuse,
        dispatcher,
        per_queue,
        Arc::clone(fs),
        Arc::clone(ring_stats),
    ) {
        Ok(t) => {
            say_transport(Transport::Uring, choice, "");
            // Requests made while no server ran wait in their queues: get them going.
            if let Some(mp) = resumed {
                ring::kick_queues(mp);
            }
            t
        }
        Err(e) => {
            say_transport(Transport::Dev, choice, &e);
            Vec::new()
        }
    }
}

/// Log which transport serves, once per serving process, and publish it for `status`.
fn say_transport(t: Transport, choice: Choice, why: &str) {
    ring::set_current(t);
    match (t, choice) {
        (Transport::Uring, _) => tracing::warn!(
            transport = "uring",
            option = choice.name(),
            "requests go through FUSE-over-io_uring: a request held by a serving process \
             that is killed or upgraded can be lost (its caller hangs); see README"
        ),
        (Transport::Dev, Choice::Uring) => tracing::warn!(
            transport = "dev",
            option = "uring",
            reason = if why.is_empty() {
                "the kernel did not offer FUSE-over-io_uring (fuse.enable_uring=0 or kernel < 6.14)"
            } else {
                why
            },
            "FUSE-over-io_uring unavailable: requests go through /dev/fuse"
        ),
        (Transport::Dev, _) => tracing::info!(
            transport = "dev",
            option = choice.name(),
            "requests go through /dev/fuse"
        ),
    }
}

/// Import every kept handle; adopt the passthrough backing ids they use.
fn take_over(
    fs: &Passthrough,
    shared: &Handover,
    custody: &Custody,
    link: &Link,
    s: &Session<FuseAdapter>,
    kept: Vec<(String, serde_json::Value, Option<OwnedFd>)>,
) {
    let mut lost = Vec::new();
    let mut adopted = std::collections::HashSet::new();
    for (key, rec, fd) in kept {
        if key.starts_with("i/") {
            let r = serde_json::from_value::<InodeRecord>(rec)
                .map_err(|e| e.to_string())
                .and_then(|rec| {
                    let id = rec.id;
                    match fs.import_inode(rec, fd) {
                        Ok(got) if got == id => Ok(got),
                        Ok(got) => Err(format!("came back as {got}")),
                        Err(e) => Err(format!("errno {}", e.0)),
                    }
                });
            match r {
                Ok(id) => custody.adopt_inode(id),
                Err(e) => {
                    tracing::warn!(key, "cannot know a kept node again: {e}");
                    lost.push(key);
                }
            }
            continue;
        }
        let k: Kept = match serde_json::from_value(rec) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(key, error = %e, "unreadable kept record");
                lost.push(key);
                continue;
            }
        };
        let Some(fd) = fd else {
            lost.push(key);
            continue;
        };
        let handle = k.handle.clone();
        if let Err(e) = fs.import_handle(k.handle, fd) {
            tracing::error!(key, errno = e.0, "cannot take over a kept handle");
            lost.push(key);
            continue;
        }
        match handle {
            Handle::Lock { fh, owner } => custody.adopt_lock(fh, owner),
            Handle::File { fh, .. } => {
                if let (Some(id), Ok(f)) = (k.backing, fs.file(fh)) {
                    match shared.backing.entry(f.inode) {
                        dashmap::mapref::entry::Entry::Occupied(mut o) => o.get_mut().1 += 1,
                        // One owner per id, whatever the records say.
                        dashmap::mapref::entry::Entry::Vacant(v) if adopted.insert(id) => {
                            v.insert((s.adopt_backing(id), 1));
                        }
                        dashmap::mapref::entry::Entry::Vacant(_) => {
                            tracing::warn!(fh, id, "a backing id named twice; not adopted again");
                        }
                    }
                }
            }
            Handle::Dir { .. } => {}
        }
    }
    if !lost.is_empty() {
        let _ = link.send(
            &ToSupervisor::Del {
                keys: lost,
                ack: false,
            },
            &[],
        );
    }
}

/// Messages from the supervisor: acknowledgements, and the order to hand over.
fn listen(
    link: &Arc<Link>,
    gate: &Arc<fuser::Gate>,
    ring_stats: &Arc<RingStats>,
    acks: mpsc::Sender<()>,
) {
    let (link, gate) = (Arc::clone(link), Arc::clone(gate));
    let ring_stats = Arc::clone(ring_stats);
    let spawned = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || {
            loop {
                match link.recv::<ToServer>() {
                    Ok(Some((ToServer::Ack, _))) => {
                        let _ = acks.send(());
                    }
                    Ok(Some((ToServer::Drain, _))) => {
                        gate.close();
                        // Ring requests cannot be left to the next server (the kernel
                        // resends none from rings): the ring threads answer what they hold.
                        while gate.busy() > 0 || ring_stats.busy.load(Ordering::SeqCst) > 0 {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        tracing::info!("handed over: every request started is answered");
                        let _ = link.send_now(&ToSupervisor::Drained, &[]);
                        std::process::exit(0);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        tracing::warn!("the supervisor is gone; serving on without it");
                        return;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        tracing::warn!(error = %e, "bad message from the supervisor")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the supervisor; serving on without it");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot listen to the supervisor");
    }
}
