//! The quarantine store and the quarantine CLI on a plain temporary backing
//! directory (no FUSE mount needed).

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use baseguard::quarantine::{
    EntryState, FileKind, Method, PurgeOutcome, QError, Quarantine, Who, Why,
};
use baseguard::sys;

struct Fx {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    fd: OwnedFd,
    q: Quarantine,
}

fn fx() -> Fx {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("instances");
    fs::create_dir_all(root.join("_base")).unwrap();
    let fd = sys::open_path(&root, libc::O_PATH | libc::O_DIRECTORY).unwrap();
    let q = Quarantine::open(fd.as_fd(), None).unwrap();
    Fx {
        _tmp: tmp,
        root,
        fd,
        q,
    }
}

fn who() -> Who {
    Who::current()
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

impl Fx {
    fn dir(&self, rel: &str) -> OwnedFd {
        sys::open_path(&self.root.join(rel), libc::O_PATH | libc::O_DIRECTORY).unwrap()
    }
    fn write(&self, rel: &str, data: &[u8]) {
        fs::write(self.root.join(rel), data).unwrap();
    }
    fn read(&self, rel: &str) -> Vec<u8> {
        fs::read(self.root.join(rel)).unwrap()
    }
    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.root.join(rel)).is_ok()
    }
    /// Quarantine `_base/<name>` as unlink would.
    fn unlink(&self, name: &str) -> baseguard::quarantine::Entry {
        let d = self.dir("_base");
        self.q
            .stash_rename(
                d.as_fd(),
                &c(name),
                Path::new(&format!("_base/{name}")),
                &who(),
                Why::Unlink,
            )
            .unwrap()
    }
    fn entries_dir(&self) -> PathBuf {
        self.root.join(".baseguard/entries")
    }
}

fn content(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn stash_list_show_restore_round_trip() {
    let f = fx();
    let data = content(300_000, 7);
    f.write("_base/abc", &data);
    let ino = fs::metadata(f.root.join("_base/abc")).unwrap().ino();
    let e = f.unlink("abc");
    assert!(!f.exists("_base/abc"));
    assert_eq!(e.path, "_base/abc");
    assert_eq!(e.size, data.len() as u64);
    assert_eq!(e.kind, FileKind::File);
    assert_eq!(e.why, Why::Unlink);
    assert_eq!(e.method, Method::Rename);
    assert_eq!(e.ino, ino);
    assert_eq!(e.who.pid, std::process::id());
    assert!(!e.who.host.is_empty());
    assert!(
        e.id.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "{}",
        e.id
    );
    // Quarantine dir: 0700.
    let m = fs::metadata(f.root.join(".baseguard")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    let (dev, qino) = f.q.dir_ino();
    assert_eq!((m.dev(), m.ino()), (dev, qino));

    let l = f.q.list().unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].id, e.id);
    assert_eq!(l[0].state, EntryState::Held);
    let g = f.q.get(&e.id).unwrap();
    assert_eq!(g.path, "_base/abc");
    assert_eq!(f.q.latest_for(Path::new("_base/abc")).unwrap().id, e.id);
    let st = f.q.status().unwrap();
    assert_eq!((st.entries, st.bytes), (1, data.len() as u64));

    let r = f.q.restore(&e.id, None, false, &who()).unwrap();
    assert_eq!(r.dest, PathBuf::from("_base/abc"));
    assert!(r.displaced.is_none());
    assert_eq!(f.read("_base/abc"), data);
    assert_eq!(fs::metadata(f.root.join("_base/abc")).unwrap().ino(), ino);
    assert!(f.q.list().unwrap().is_empty());
    assert!(matches!(f.q.get(&e.id), Err(QError::UnknownId(_))));
    // Nothing left behind in entries/.
    assert_eq!(fs::read_dir(f.entries_dir()).unwrap().count(), 0);
}

#[test]
fn symlinks_are_stashed_as_links() {
    let f = fx();
    std::os::unix::fs::symlink("/nonexistent/target", f.root.join("_base/ln")).unwrap();
    let e = f.unlink("ln");
    assert_eq!(e.kind, FileKind::Symlink);
    f.q.restore("_base/ln", None, false, &who()).unwrap();
    assert_eq!(
        fs::read_link(f.root.join("_base/ln")).unwrap(),
        PathBuf::from("/nonexistent/target")
    );
}

#[test]
fn stash_errors_are_unlinks_errors() {
    let f = fx();
    let d = f.dir("_base");
    let err =
        f.q.stash_rename(
            d.as_fd(),
            &c("missing"),
            Path::new("_base/missing"),
            &who(),
            Why::Unlink,
        )
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    fs::create_dir(f.root.join("_base/sub")).unwrap();
    let err =
        f.q.stash_rename(
            d.as_fd(),
            &c("sub"),
            Path::new("_base/sub"),
            &who(),
            Why::Unlink,
        )
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
    assert!(f.q.list_all().unwrap().is_empty());
    assert_eq!(fs::read_dir(f.entries_dir()).unwrap().count(), 0);
}

#[test]
fn restore_by_path_takes_the_newest() {
    let f = fx();
    f.write("_base/x", b"one");
    let a = f.unlink("x");
    f.write("_base/x", b"two");
    let b = f.unlink("x");
    assert_ne!(a.id, b.id);
    let r = f.q.restore("_base/x", None, false, &who()).unwrap();
    assert_eq!(r.entry.id, b.id);
    assert_eq!(f.read("_base/x"), b"two");
    // The older one is still held.
    assert_eq!(f.q.list().unwrap()[0].id, a.id);
    assert!(matches!(
        f.q.restore("_base/nothing", None, false, &who()),
        Err(QError::NoMatch(_))
    ));
}

#[test]
fn restore_refuses_to_overwrite_and_force_stashes() {
    let f = fx();
    f.write("_base/img", b"old contents");
    let e = f.unlink("img");
    f.write("_base/img", b"new contents");
    let err = f.q.restore(&e.id, None, false, &who()).unwrap_err();
    assert!(matches!(err, QError::DestExists(_)), "{err}");
    assert!(err.to_string().contains("--force"));
    assert_eq!(f.read("_base/img"), b"new contents");
    assert_eq!(f.q.get(&e.id).unwrap().state, EntryState::Held);

    let r = f.q.restore(&e.id, None, true, &who()).unwrap();
    assert_eq!(f.read("_base/img"), b"old contents");
    let d = r.displaced.expect("the existing file is stashed");
    assert_eq!(d.why, Why::RestoreForce);
    assert_eq!(d.path, "_base/img");
    let l = f.q.list().unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].id, d.id);
    // And it can come back too, elsewhere.
    f.q.restore(&d.id, Some(Path::new("_base/img.new")), false, &who())
        .unwrap();
    assert_eq!(f.read("_base/img.new"), b"new contents");

    // A directory in the way is never replaced.
    f.write("_base/d", b"x");
    let e = f.unlink("d");
    fs::create_dir(f.root.join("_base/d")).unwrap();
    assert!(matches!(
        f.q.restore(&e.id, None, true, &who()),
        Err(QError::DestIsDir(_))
    ));
    assert_eq!(f.q.get(&e.id).unwrap().state, EntryState::Held);
}

#[test]
fn path_escapes_are_refused() {
    let f = fx();
    f.write("_base/a", b"a");
    let e = f.unlink("a");
    let outside = f._tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, f.root.join("link")).unwrap();
    fs::write(f.root.join("plainfile"), b"").unwrap();
    for to in [
        "../x",
        "/etc/passwd",
        "_base/../../x",
        "link/x",
        ".baseguard/x",
        ".baseguard/entries/x",
        ".baseguard",
        "plainfile/x",
        ".",
    ] {
        let err =
            f.q.restore(&e.id, Some(Path::new(to)), false, &who())
                .unwrap_err();
        assert!(matches!(err, QError::Escapes { .. }), "{to}: {err}");
    }
    let err =
        f.q.restore(&e.id, Some(Path::new("link/x")), false, &who())
            .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    let err =
        f.q.restore(&e.id, Some(Path::new("nodir/x")), false, &who())
            .unwrap_err();
    assert!(matches!(err, QError::ParentMissing { .. }), "{err}");
    assert!(!f.exists("nodir"));
    // Ids that try to leave entries/.
    for id in ["../../x", "/etc/passwd", ".tmp-x", "a/b"] {
        assert!(matches!(f.q.get(id), Err(QError::BadId(_))), "{id}");
        assert!(matches!(f.q.purge(id), Err(QError::BadId(_))), "{id}");
    }
    // Still held, untouched.
    assert_eq!(f.q.get(&e.id).unwrap().state, EntryState::Held);
}

#[test]
fn stash_link_keeps_the_old_inode() {
    let f = fx();
    f.write("_base/t", b"target");
    let d = f.dir("_base");
    let e =
        f.q.stash_link(
            d.as_fd(),
            &c("t"),
            Path::new("_base/t"),
            &who(),
            Why::RenameOver,
        )
        .unwrap();
    assert_eq!(e.method, Method::Link);
    assert_eq!(fs::metadata(f.root.join("_base/t")).unwrap().nlink(), 2);
    // A rename replaces the name; the old inode survives in the quarantine.
    f.write("_base/new", b"replacement");
    fs::rename(f.root.join("_base/new"), f.root.join("_base/t")).unwrap();
    f.q.restore(&e.id, Some(Path::new("_base/t.old")), false, &who())
        .unwrap();
    assert_eq!(f.read("_base/t.old"), b"target");
    assert_eq!(f.read("_base/t"), b"replacement");
}

#[test]
fn stash_copy_preserves_contents_and_metadata() {
    let f = fx();
    let p = f.root.join("_base/sparse");
    {
        use std::os::unix::fs::FileExt;
        let file = fs::File::create(&p).unwrap();
        file.write_all_at(&content(70_000, 1), 0).unwrap();
        file.write_all_at(&content(5000, 2), 16 << 20).unwrap();
        file.set_len(20 << 20).unwrap();
    }
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    let mtime = std::time::UNIX_EPOCH + Duration::new(1_600_000_000, 123_000_000);
    fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let orig = fs::read(&p).unwrap();
    // An O_PATH descriptor is fine: the store reopens it.
    let src = sys::open_path(&p, libc::O_PATH).unwrap();
    let e =
        f.q.stash_copy(
            src.as_fd(),
            Path::new("_base/sparse"),
            &who(),
            Why::Truncate,
        )
        .unwrap();
    assert_eq!(e.method, Method::Copy);
    assert_eq!(e.size, 20 << 20);
    // The truncate happens; the copy is intact.
    fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(0)
        .unwrap();
    let data = f.entries_dir().join(format!("{}.data", e.id));
    let m = fs::metadata(&data).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    assert_eq!(m.modified().unwrap(), mtime);
    assert!(
        m.blocks() * 512 < 4 << 20,
        "holes kept: {} blocks",
        m.blocks()
    );
    f.q.restore(&e.id, Some(Path::new("_base/sparse.copy")), false, &who())
        .unwrap();
    assert_eq!(f.read("_base/sparse.copy"), orig);
}

fn race_restores(fallback: bool, different_dests: bool) {
    let f = Arc::new(fx());
    if fallback {
        f.q.force_link_fallback();
    }
    let data = content(100_000, 3);
    f.write("_base/race", &data);
    let e = f.unlink("race");
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (f, b, id) = (f.clone(), barrier.clone(), e.id.clone());
            std::thread::spawn(move || {
                let to = different_dests.then(|| PathBuf::from(format!("_base/race.{i}")));
                b.wait();
                f.q.restore(&id, to.as_deref(), false, &who())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    for r in &results {
        if let Err(err) = r {
            assert!(
                matches!(
                    err,
                    QError::Gone { .. } | QError::UnknownId(_) | QError::DestExists(_)
                ),
                "{err}"
            );
        }
    }
    let restored: Vec<_> = fs::read_dir(f.root.join("_base"))
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!(
        fs::read(f.root.join("_base").join(&restored[0])).unwrap(),
        data
    );
    assert!(f.q.list_all().unwrap().is_empty());
    assert_eq!(fs::read_dir(f.entries_dir()).unwrap().count(), 0);
}

#[test]
fn concurrent_restores_exactly_one_wins() {
    race_restores(false, false);
    race_restores(false, true);
}

#[test]
fn concurrent_restores_exactly_one_wins_without_renameat2() {
    race_restores(true, false);
    race_restores(true, true);
}

#[test]
fn concurrent_stash_purge_restore_lose_nothing() {
    let f = Arc::new(fx());
    const N: usize = 120;
    for i in 0..N {
        f.write(&format!("_base/f{i}"), format!("file {i}").as_bytes());
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stashers: Vec<_> = (0..3)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut ok = Vec::new();
                for i in (t..N).step_by(3) {
                    ok.push(f.unlink(&format!("f{i}")).id);
                }
                ok
            })
        })
        .collect();
    let purgers: Vec<_> = (0..2)
        .map(|t| {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut purged, mut restored) = (Vec::new(), Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for e in f.q.list().unwrap() {
                        let h = e.id.bytes().map(|b| b as usize).sum::<usize>();
                        if h % 2 == t {
                            if let Ok(p) = f.q.purge(&e.id) {
                                purged.push(p.path);
                            }
                        } else if let Ok(r) = f.q.restore(&e.id, None, false, &who()) {
                            restored.push(r.entry.path);
                        }
                    }
                }
                (purged, restored)
            })
        })
        .collect();
    let stashed: usize = stashers.into_iter().map(|h| h.join().unwrap().len()).sum();
    assert_eq!(stashed, N);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut purged, mut restored) = (Vec::new(), Vec::new());
    for h in purgers {
        let (p, r) = h.join().unwrap();
        purged.extend(p);
        restored.extend(r);
    }
    let held: Vec<String> = f.q.list().unwrap().into_iter().map(|e| e.path).collect();
    // Every file is accounted for exactly once.
    let mut all: Vec<String> = purged
        .iter()
        .chain(&restored)
        .chain(&held)
        .cloned()
        .collect();
    all.sort();
    let mut want: Vec<String> = (0..N).map(|i| format!("_base/f{i}")).collect();
    want.sort();
    assert_eq!(all, want);
    for p in &restored {
        let i = &p["_base/f".len()..];
        assert_eq!(f.read(p), format!("file {i}").as_bytes());
    }
    for p in purged.iter().chain(&held) {
        assert!(!f.exists(p), "{p}");
    }
    assert!(
        f.q.list_all()
            .unwrap()
            .iter()
            .all(|e| e.state == EntryState::Held)
    );
}

#[test]
fn expiry_purges_only_old_entries_and_honours_the_veto() {
    let f = fx();
    for n in ["old1", "old-keep"] {
        f.write(&format!("_base/{n}"), n.as_bytes());
        f.unlink(n);
    }
    std::thread::sleep(Duration::from_millis(2100));
    f.write("_base/young", b"young");
    let young = f.unlink("young");
    let out = f.q.purge_expired(Duration::from_secs(2), &|e| {
        e.path
            .ends_with("keep")
            .then(|| "still referenced by an instance".to_string())
    });
    let mut purged = Vec::new();
    let mut kept = Vec::new();
    for o in out {
        match o {
            PurgeOutcome::Purged(e) => purged.push(e.path),
            PurgeOutcome::Kept { entry, reason } => {
                assert_eq!(reason, "still referenced by an instance");
                kept.push(entry.path)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(purged, vec!["_base/old1"]);
    assert_eq!(kept, vec!["_base/old-keep"]);
    let left: Vec<String> = f.q.list().unwrap().into_iter().map(|e| e.path).collect();
    assert_eq!(left, vec!["_base/old-keep", "_base/young"]);
    assert_eq!(f.q.get(&young.id).unwrap().state, EntryState::Held);
}

#[test]
fn simulated_crashes_leave_nothing_wrong() {
    let f = fx();
    f.write("_base/keep", b"k");
    let real = f.unlink("keep");
    // Crash between record and rename: a record whose data never arrived.
    let rec = fs::read_to_string(f.entries_dir().join(format!("{}.json", real.id))).unwrap();
    let ghost = "20000101-000000-elsewhere-abcdef";
    fs::write(
        f.entries_dir().join(format!("{ghost}.json")),
        rec.replace(&real.id, ghost)
            .replace("\"_base/keep\"", "\"_base/ghost\""),
    )
    .unwrap();
    // Crash mid-record and mid-copy: temporaries.
    fs::write(f.entries_dir().join(".tmp-20000101-000000-x-1.json"), b"{").unwrap();
    fs::write(
        f.entries_dir().join(".20000101-000000-x-2.copy"),
        b"partial",
    )
    .unwrap();
    // A restore that crashed after claiming.
    f.write("_base/claimed", b"claimed data");
    let cl = f.unlink("claimed");
    fs::rename(
        f.entries_dir().join(format!("{}.data", cl.id)),
        f.entries_dir().join(format!("{}.claim", cl.id)),
    )
    .unwrap();

    let held: Vec<_> = f.q.list().unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(held, vec![real.id.clone()]);
    let all = f.q.list_all().unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].id, ghost);
    assert_eq!(all[0].state, EntryState::Pending);
    assert!(matches!(
        f.q.restore(ghost, None, false, &who()),
        Err(QError::Gone {
            state: EntryState::Pending,
            ..
        })
    ));
    assert!(matches!(f.q.purge(ghost), Err(QError::Gone { .. })));
    assert!(matches!(
        f.q.restore(&cl.id, None, false, &who()),
        Err(QError::Gone {
            state: EntryState::Restoring,
            ..
        })
    ));
    let st = f.q.status().unwrap();
    assert_eq!((st.entries, st.pending, st.restoring), (1, 1, 1));

    // A sweep within the grace periods touches none of it.
    let out = f.q.purge_expired(Duration::from_secs(3600), &|_| None);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(f.q.list_all().unwrap().len(), 3);

    // Once old, the leftovers are cleaned and the claim is recovered.
    f.q.set_graces(Duration::ZERO, Duration::ZERO);
    let out = f.q.purge_expired(Duration::from_secs(3600), &|_| None);
    let mut cleaned = Vec::new();
    let mut recovered = Vec::new();
    for o in out {
        match o {
            PurgeOutcome::Cleaned { name } => cleaned.push(name),
            PurgeOutcome::Recovered { id } => recovered.push(id),
            other => panic!("unexpected {other:?}"),
        }
    }
    cleaned.sort();
    assert_eq!(
        cleaned,
        vec![
            ".20000101-000000-x-2.copy".to_string(),
            ".tmp-20000101-000000-x-1.json".to_string(),
            format!("{ghost}.json"),
        ]
    );
    assert_eq!(recovered, vec![cl.id.clone()]);
    f.q.restore(&cl.id, None, false, &who()).unwrap();
    assert_eq!(f.read("_base/claimed"), b"claimed data");
    assert_eq!(f.q.list().unwrap().len(), 1);
}

#[test]
fn quarantine_on_another_filesystem_is_refused() {
    let f = fx();
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() || fs::metadata(shm).unwrap().dev() == fs::metadata(&f.root).unwrap().dev() {
        eprintln!("skipped: no second filesystem at /dev/shm");
        return;
    }
    let qd = tempfile::tempdir_in(shm).unwrap();
    let err = Quarantine::open(f.fd.as_fd(), Some(&qd.path().join("q"))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::CrossesDevices);
    let msg = err.to_string();
    assert!(msg.contains("different filesystem"), "{msg}");
    assert!(msg.contains(&qd.path().display().to_string()), "{msg}");
    assert!(msg.contains(&f.root.display().to_string()), "{msg}");
}

#[test]
fn custom_quarantine_dir_on_the_same_filesystem() {
    let f = fx();
    let qd = f._tmp.path().join("q");
    let q = Quarantine::open(f.fd.as_fd(), Some(&qd)).unwrap();
    f.write("_base/z", b"z");
    let d = f.dir("_base");
    let e = q
        .stash_rename(
            d.as_fd(),
            &c("z"),
            Path::new("_base/z"),
            &who(),
            Why::Unlink,
        )
        .unwrap();
    assert!(qd.join(format!("entries/{}.data", e.id)).exists());
    let q2 = Quarantine::open_existing(f.fd.as_fd(), Some(&qd)).unwrap();
    assert_eq!(q2.list().unwrap().len(), 1);
    let missing =
        Quarantine::open_existing(f.fd.as_fd(), Some(&f._tmp.path().join("nope"))).unwrap_err();
    assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
}

// ---------------------------------------------------------------- the CLI

fn bg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baseguard"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit status 1 with a one-sentence message on stderr containing `want`.
fn fails(o: &Output, want: &str) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        out(o),
        err(o)
    );
    let e = err(o);
    assert!(e.contains(want), "stderr {e:?} lacks {want:?}");
    assert!(e.starts_with("baseguard: "), "{e:?}");
}

fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for de in fs::read_dir(&d).unwrap() {
            let p = de.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
                v.push((p, Vec::new()));
            } else if m.is_file() {
                v.push((p.clone(), fs::read(&p).unwrap()));
            } else {
                v.push((p, b"<other>".to_vec()));
            }
        }
    }
    v.sort();
    v
}

#[test]
fn cli_list_show_restore_purge() {
    let f = fx();
    let dir = f.root.to_str().unwrap().to_string();
    let o = bg(&["list", "--dir", &dir]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("empty"));

    f.write("_base/aaa", &content(5000, 9));
    let a = f.unlink("aaa");
    f.write("_base/bbb", b"bbb");
    let b = f.unlink("bbb");

    let o = bg(&["list", "--dir", &dir]);
    assert!(o.status.success(), "{}", err(&o));
    let s = out(&o);
    for want in [
        "ID",
        "EXPIRES",
        &a.id,
        "_base/aaa",
        "4.9 KiB",
        &b.id,
        "uid=0@",
    ] {
        assert!(s.contains(want), "{want} missing in\n{s}");
    }
    // 14 days from now, or a second less on a busy machine (the list rounds down).
    assert!(s.contains("in 14d") || s.contains("in 13d23h"), "{s}");
    let o = bg(&["list", "--dir", &dir, "--json", "--retain", "2w"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    let v = v["entries"].clone();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["path"], "_base/aaa");
    assert_eq!(v[0]["state"], "held");
    assert_eq!(v[0]["why"], "unlink");
    assert_eq!(
        v[0]["expires_at"].as_u64().unwrap(),
        a.quarantined_at + 14 * 86_400
    );

    let o = bg(&["show", "--dir", &dir, &a.id]);
    assert!(o.status.success(), "{}", err(&o));
    let s = out(&o);
    for want in [
        "_base/aaa",
        "unlink",
        "command line:",
        "5000 bytes",
        &a.who.host,
    ] {
        assert!(s.contains(want), "{want} missing in\n{s}");
    }
    let o = bg(&["show", "--dir", &dir, "--json", "_base/bbb"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["entry"]["id"], b.id.as_str());

    // Restore by absolute path under --dir.
    let abs = format!("{dir}/_base/aaa");
    let o = bg(&["restore", "--dir", &dir, &abs]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains(&format!("restored {}", a.id)));
    assert_eq!(f.read("_base/aaa"), content(5000, 9));

    // Restore onto an existing file: refused, nothing changed.
    f.write("_base/bbb", b"in the way");
    let before = snapshot(&f.root);
    let o = bg(&["restore", "--dir", &dir, &b.id]);
    fails(&o, "already exists; use --force");
    assert_eq!(snapshot(&f.root), before);
    // --force: the file in the way is quarantined.
    let o = bg(&["restore", "--dir", &dir, &b.id, "--force"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("now quarantined as"), "{}", out(&o));
    assert_eq!(f.read("_base/bbb"), b"bbb");
    let l = f.q.list().unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].why, Why::RestoreForce);
    let displaced = l[0].id.clone();

    // Restore --to.
    let o = bg(&["restore", "--dir", &dir, &displaced, "--to", "_base/bbb.2"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(f.read("_base/bbb.2"), b"in the way");

    // Purge: refused without --yes, then done.
    let c1 = f.unlink("bbb.2");
    let before = snapshot(&f.root);
    let o = bg(&["purge", "--dir", &dir, &c1.id]);
    fails(&o, "would delete");
    assert!(err(&o).contains("--yes"));
    assert_eq!(snapshot(&f.root), before);
    let o = bg(&["purge", "--dir", &dir, &c1.id, "--yes"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains(&format!("purged {}", c1.id)));
    assert!(f.q.list().unwrap().is_empty());
    assert!(!f.exists("_base/bbb.2"));

    // Status.
    f.write("_base/s", b"status");
    f.unlink("s");
    let o = bg(&["status", "--dir", &dir]);
    assert!(o.status.success(), "{}", err(&o));
    let s = out(&o);
    assert!(s.contains("entries:     1"), "{s}");
    assert!(s.contains("6 B"), "{s}");
    let o = bg(&["status", "--dir", &dir, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["entries"], 1);
    assert_eq!(v["bytes"], 6);
    assert_eq!(v["mounted"], false);
}

#[test]
fn cli_purge_expired_and_older_than() {
    let f = fx();
    let dir = f.root.to_str().unwrap().to_string();
    f.write("_base/old", b"old");
    f.unlink("old");
    std::thread::sleep(Duration::from_millis(2100));
    f.write("_base/new", b"new");
    f.unlink("new");
    let o = bg(&["purge", "--dir", &dir, "--older-than", "2s"]);
    fails(&o, "would delete 1 entry");
    assert!(err(&o).contains("_base/old"));
    assert_eq!(f.q.list().unwrap().len(), 2);
    let o = bg(&[
        "purge",
        "--dir",
        &dir,
        "--expired",
        "--retain",
        "2s",
        "--yes",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("1 purged"), "{}", out(&o));
    let left: Vec<_> = f.q.list().unwrap().into_iter().map(|e| e.path).collect();
    assert_eq!(left, vec!["_base/new"]);
    let o = bg(&["purge", "--dir", &dir, "--older-than", "1h", "--yes"]);
    assert!(o.status.success());
    assert!(out(&o).contains("Nothing to purge"));
}

#[test]
fn cli_errors_exit_1_and_change_nothing() {
    let f = fx();
    let dir = f.root.to_str().unwrap().to_string();
    f.write("_base/e", b"e");
    let e = f.unlink("e");
    let outside = f._tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, f.root.join("evil")).unwrap();
    let before = snapshot(f._tmp.path());
    let never = format!("{dir}/_base/never");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["show", "20991231-000000-none-000000"],
            "no quarantine entry has id",
        ),
        (
            vec!["restore", "20991231-000000-none-000000"],
            "no quarantine entry has id",
        ),
        (
            vec!["purge", "20991231-000000-none-000000", "--yes"],
            "no quarantine entry has id",
        ),
        (
            vec!["purge", "../../etc/passwd", "--yes"],
            "is not a quarantine id",
        ),
        (vec!["show", "../x"], "'..' would leave"),
        (vec!["restore", "_base/never"], "neither an entry id nor"),
        (vec!["restore", &never], "neither an entry id nor"),
        (
            vec!["restore", "/etc/passwd"],
            "outside the instances directory",
        ),
        (vec!["restore", &e.id, "--to", "../x"], "'..' would leave"),
        (
            vec!["restore", &e.id, "--to", "/etc/passwd"],
            "outside the instances directory",
        ),
        (vec!["restore", &e.id, "--to", "evil/x"], "symbolic link"),
        (
            vec!["restore", &e.id, "--to", ".baseguard/entries/x"],
            "the quarantine itself",
        ),
        (vec!["restore", &e.id, "--to", "nodir/x"], "does not exist"),
    ];
    // A quarantine that cannot be used is "could not check" (3).
    let o = bg(&["list", "--quarantine", "/dev/shm", "--dir", &dir]);
    assert_eq!(o.status.code(), Some(3), "{}", err(&o));
    assert!(err(&o).contains("different filesystem"), "{}", err(&o));
    for (args, want) in cases {
        let mut a = args.clone();
        a.extend(["--dir", &dir]);
        let o = bg(&a);
        fails(&o, want);
        assert_eq!(err(&o).lines().count(), 1, "{args:?}: {}", err(&o));
        assert_eq!(
            snapshot(f._tmp.path()),
            before,
            "{args:?} changed something"
        );
    }
    // Usage errors (clap) are exit 64 (EX_USAGE: 2 means a loss) with a hint.
    let o = bg(&["list", "--dir", &dir, "--retain", "14"]);
    assert_eq!(o.status.code(), Some(64));
    assert!(err(&o).contains("has no unit"), "{}", err(&o));
    let o = bg(&["purge", "--dir", &dir]);
    assert_eq!(o.status.code(), Some(64));
    // A missing --dir: could not check (3).
    let o = bg(&["list", "--dir", "/nonexistent/instances"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(err(&o).contains("cannot open the instances directory"));
}

#[test]
fn cli_help_has_examples() {
    for cmd in ["list", "show", "restore", "purge", "status"] {
        let o = bg(&[cmd, "--help"]);
        assert!(o.status.success());
        let s = out(&o);
        assert!(s.contains("Examples:"), "{cmd}: {s}");
        assert!(s.contains("--dir"), "{cmd}: {s}");
    }
}

/// Run `f` on a thread; panic with `what` if it has not finished after a
/// generous while (a hang, not a speed check). `unblock` is called before
/// panicking so that the stuck thread can finish.
fn must_not_hang<T: Send + 'static>(
    what: &str,
    unblock: impl FnOnce(),
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(v) => v,
        Err(_) => {
            unblock();
            panic!("{what} hung");
        }
    }
}

/// Open a FIFO for writing without blocking (frees a reader stuck in open).
fn unblock_fifo(p: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p);
}

/// Peak resident set size of this process, in KiB.
fn vm_hwm_kib() -> u64 {
    let s = fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_fifo_or_a_huge_file_named_like_a_record_is_skipped() {
    let f = Arc::new(fx());
    f.write("_base/real", b"real");
    let real = f.unlink("real");
    let fifo = f.entries_dir().join("20261130-000000-evil-000001.json");
    // mkfifo(1): tests use no unsafe.
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // A sparse 512 MiB "record".
    let huge = f.entries_dir().join("20261130-000000-evil-000002.json");
    fs::File::create(&huge).unwrap().set_len(512 << 20).unwrap();
    let before = vm_hwm_kib();
    let f2 = f.clone();
    let ids: Vec<String> = must_not_hang(
        "list with a FIFO record",
        || unblock_fifo(&fifo),
        move || f2.q.list_all().unwrap().into_iter().map(|e| e.id).collect(),
    );
    assert_eq!(ids, vec![real.id.clone()]);
    let f3 = f.clone();
    let got = must_not_hang(
        "get of a FIFO record",
        || unblock_fifo(&fifo),
        move || f3.q.get("20261130-000000-evil-000001").is_err(),
    );
    assert!(got);
    assert!(f.q.get("20261130-000000-evil-000002").is_err());
    let grown = vm_hwm_kib().saturating_sub(before);
    assert!(
        grown < 128 << 10,
        "a huge record was read whole: +{grown} KiB"
    );
    // The CLI too.
    let o = must_not_hang("baseguard list", || unblock_fifo(&fifo), {
        let root = f.root.clone();
        move || bg(&["list", "--dir", root.to_str().unwrap()])
    });
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains(&real.id));
}

fn xattr_of(p: &Path, name: &str) -> Option<Vec<u8>> {
    let o = Command::new("getfattr")
        .args(["--absolute-names", "--only-values", "-n", name])
        .arg(p)
        .output()
        .unwrap();
    o.status.success().then_some(o.stdout)
}

#[test]
fn stash_copy_keeps_extended_attributes() {
    let f = fx();
    f.write("_base/labelled", &content(100_000, 9));
    let p = f.root.join("_base/labelled");
    let attrs: &[(&str, &[u8])] = &[
        ("user.baseguard.test", b"user value"),
        (
            "trusted.libvirt.security.dac",
            b"+107:+107\0with a NUL and \xff bytes",
        ),
        ("trusted.libvirt.security.ref_dac", b"1"),
        ("security.baseguard", b"label"),
        ("user.empty", b""),
    ];
    let src = sys::open_path(&p, libc::O_RDONLY).unwrap();
    for (n, v) in attrs {
        sys::setxattr_fd(src.as_fd(), &c(n), v, 0).unwrap();
    }
    let big = content(1500, 4);
    sys::setxattr_fd(src.as_fd(), &c("user.big"), &big, 0).unwrap();
    let e =
        f.q.stash_copy(
            src.as_fd(),
            Path::new("_base/labelled"),
            &who(),
            Why::Truncate,
        )
        .unwrap();
    let data = f.entries_dir().join(format!("{}.data", e.id));
    for (n, v) in attrs {
        assert_eq!(xattr_of(&data, n).as_deref(), Some(*v), "{n} on the copy");
    }
    assert_eq!(xattr_of(&data, "user.big"), Some(big.clone()));
    // And they come back with a restore.
    f.q.restore(&e.id, Some(Path::new("_base/labelled.back")), false, &who())
        .unwrap();
    let back = f.root.join("_base/labelled.back");
    for (n, v) in attrs {
        assert_eq!(xattr_of(&back, n).as_deref(), Some(*v), "{n} restored");
    }
}

#[test]
fn a_killed_restore_never_hides_a_file() {
    use baseguard::quarantine::{ClaimOwner, OwnerState};
    let f = fx();
    let dir = f.root.to_str().unwrap().to_string();
    let claim_as = |id: &str, name: &str| {
        fs::rename(
            f.entries_dir().join(format!("{id}.data")),
            f.entries_dir().join(name),
        )
        .unwrap();
    };
    // A claim as older versions make it (owner unknown), left by a SIGKILLed
    // restore: listed, and `show` tells the truth.
    f.write("_base/old", b"old claim");
    let old = f.unlink("old");
    claim_as(&old.id, &format!("{}.claim", old.id));
    let o = bg(&["list", "--dir", &dir]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains(&old.id), "{}", out(&o));
    assert!(out(&o).contains("restoring"), "{}", out(&o));
    let o = bg(&["show", &old.id, "--dir", &dir]);
    assert!(!out(&o).contains("never completed") && !err(&o).contains("never completed"));
    assert!(out(&o).contains("restoring"), "{}", out(&o));

    // A restore in progress on this host (a live process holds the claim).
    f.write("_base/busy", b"busy");
    let busy = f.unlink("busy");
    let mut child = Command::new("sleep").arg("600").spawn().unwrap();
    let owner = ClaimOwner::of_pid(child.id()).unwrap();
    claim_as(&busy.id, &Quarantine::claim_name_for(&busy.id, &owner));
    let e = f.q.get(&busy.id).unwrap();
    assert_eq!(e.state, EntryState::Restoring);
    let c = e.claim.unwrap();
    assert_eq!(c.owner.as_ref(), Some(&owner));
    assert_eq!(c.owner_state, OwnerState::Alive);
    assert!(matches!(
        f.q.restore(&busy.id, None, false, &who()),
        Err(QError::Gone {
            state: EntryState::Restoring,
            ..
        })
    ));
    let o = bg(&["list", "--dir", &dir]);
    assert!(
        out(&o).contains(&format!("by pid {}@", child.id())),
        "{}",
        out(&o)
    );
    let o = bg(&["list", "--json", "--dir", &dir]);
    let v: serde_json::Value = serde_json::from_str(&out(&o)).unwrap();
    let row = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == busy.id.as_str())
        .unwrap();
    assert_eq!(row["state"], "restoring");
    assert_eq!(row["claim"]["owner"]["pid"], child.id());
    // The restore is SIGKILLed: the very next look puts the file back.
    child.kill().unwrap();
    child.wait().unwrap();
    let held: Vec<String> = f.q.list().unwrap().into_iter().map(|e| e.id).collect();
    assert!(held.contains(&busy.id), "{held:?}");
    f.q.restore(&busy.id, None, false, &who()).unwrap();
    assert_eq!(f.read("_base/busy"), b"busy");
    // A pid that was reused by another process is no owner either.
    f.write("_base/reused", b"reused");
    let reused = f.unlink("reused");
    let mut me = ClaimOwner::current();
    me.start += 1;
    claim_as(&reused.id, &Quarantine::claim_name_for(&reused.id, &me));
    assert_eq!(f.q.get(&reused.id).unwrap().state, EntryState::Held);
    // Another host's claim: listed, kept for the grace period.
    f.write("_base/far", b"far");
    let far = f.unlink("far");
    let mut other = ClaimOwner::current();
    other.host = "elsewhere".into();
    claim_as(&far.id, &Quarantine::claim_name_for(&far.id, &other));
    let e = f.q.get(&far.id).unwrap();
    assert_eq!(e.state, EntryState::Restoring);
    assert_eq!(e.claim.unwrap().owner_state, OwnerState::Unknown);
    let o = bg(&["list", "--dir", &dir]);
    assert!(out(&o).contains("another host"), "{}", out(&o));
    let o = bg(&["show", &far.id, "--dir", &dir]);
    assert!(out(&o).contains("restoring by pid"), "{}", out(&o));
    f.q.set_graces(Duration::from_secs(3600), Duration::ZERO);
    let out = f.q.purge_expired(Duration::from_secs(3600), &|_| None);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(f.q.list().unwrap().len(), 3);
}

#[test]
fn the_held_listing_reads_only_new_records() {
    use baseguard::quarantine::Records;
    let f = fx();
    let ids = |v: &[std::sync::Arc<baseguard::quarantine::Entry>]| {
        let mut v: Vec<String> = v.iter().map(|e| e.id.clone()).collect();
        v.sort();
        v
    };
    f.write("_base/a", b"a");
    f.write("_base/b", b"b");
    let a = f.unlink("a");
    let b = f.unlink("b");
    let (known, held) = f.q.held_incremental(&Records::new()).unwrap();
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort();
    assert_eq!(ids(&held), want);
    // A known record is not read again (here: it could not be parsed now).
    fs::write(f.entries_dir().join(format!("{}.json", a.id)), b"{").unwrap();
    f.write("_base/c", b"c");
    let c = f.unlink("c");
    f.q.restore(&b.id, None, false, &who()).unwrap();
    let (known2, held) = f.q.held_incremental(&known).unwrap();
    let mut want = vec![a.id.clone(), c.id.clone()];
    want.sort();
    assert_eq!(ids(&held), want);
    assert!(!known2.contains_key(b.id.as_str()));
    // From scratch, the damaged record is skipped.
    let (_, held) = f.q.held_incremental(&Records::new()).unwrap();
    assert_eq!(ids(&held), vec![c.id.clone()]);
}
