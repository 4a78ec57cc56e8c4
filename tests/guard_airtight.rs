//! The guard is airtight: the hostile review's ways to destroy a protected
//! file's bytes through a mount, each replayed through real mounts (two
//! mounts of one backing directory stand for two compute nodes).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const PY: &str = "/usr/bin/python3";

/// A scratch directory holding the backing directory `instances/_base`.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let b = t.path().join("instances");
    fs::create_dir_all(b.join("_base")).unwrap();
    fs::create_dir_all(b.join("inst")).unwrap();
    (t, b)
}

/// Every held quarantine entry under `backing/.baseguard`: (id, recorded
/// path, why, bytes of its data).
fn held(backing: &Path) -> Vec<(String, String, String, Vec<u8>)> {
    let dir = backing.join(".baseguard/entries");
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(&dir) else {
        return out;
    };
    for e in rd {
        let name = e.unwrap().file_name().into_string().unwrap();
        let Some(id) = name.strip_suffix(".data") else {
            continue;
        };
        let rec: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(format!("{id}.json"))).unwrap()).unwrap();
        out.push((
            id.to_string(),
            rec["path"].as_str().unwrap().to_string(),
            rec["why"].as_str().unwrap().to_string(),
            fs::read(dir.join(&name)).unwrap(),
        ));
    }
    out.sort();
    out
}

/// The contents held for `path`.
fn held_for(backing: &Path, path: &str) -> Vec<Vec<u8>> {
    held(backing)
        .into_iter()
        .filter(|h| h.1 == path)
        .map(|h| h.3)
        .collect()
}

fn py(script: &str, args: &[&Path]) -> (bool, String) {
    let o = Command::new(PY)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn sh(script: &str) -> (bool, String) {
    let o = Command::new("sh").arg("-c").arg(script).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

// ---- 1. stale entries and open descriptors ----------------------------------

#[test]
fn a_stale_entry_never_writes_into_a_file_another_node_quarantined() {
    let (_t, bk) = scratch();
    let a = Mount::new(&bk, &[]);
    let b = Mount::new(&bk, &[]);
    let (ai, bi) = (a.path("_base/img"), b.path("_base/img"));
    // All within the kernel's entry timeout, so node A's entry is cached.
    let (ok, out) = sh(&format!(
        "printf ORIGINAL > '{ai}' && cat '{ai}' >/dev/null && rm '{bi}' && printf NEW > '{ai}'",
        ai = ai.display(),
        bi = bi.display()
    ));
    assert!(ok, "{out}");
    assert_eq!(fs::read(&ai).unwrap(), b"NEW", "the new file is a new file");
    let kept = held_for(&bk, "_base/img");
    assert!(
        kept.iter().any(|d| d == b"ORIGINAL"),
        "the quarantined original keeps its bytes: {kept:?}"
    );
    assert!(
        kept.iter().all(|d| d.as_slice() != b"NEW"),
        "nothing was written into the quarantine: {kept:?}"
    );
}

#[test]
fn an_open_descriptor_never_changes_a_file_another_node_quarantined() {
    let (_t, bk) = scratch();
    let a = Mount::new(&bk, &[]);
    let b = Mount::new(&bk, &[]);
    fs::write(bk.join("_base/img"), b"ORIGINAL-CONTENTS").unwrap();
    // Node A holds the file open for writing; node B deletes it; node A
    // then truncates and writes through its descriptor.
    let script = r#"
import os, sys, errno
a, b = sys.argv[1], sys.argv[2]
fd = os.open(a, os.O_RDWR)
os.unlink(b)
res = []
for what, fn in (("ftruncate", lambda: os.ftruncate(fd, 0)),
                 ("pwrite", lambda: os.pwrite(fd, b"XXXX", 0))):
    try:
        fn()
        res.append(what + "=ok")
    except OSError as e:
        res.append(what + "=" + errno.errorcode[e.errno])
print(" ".join(res))
"#;
    let (ok, out) = py(script, &[&a.path("_base/img"), &b.path("_base/img")]);
    assert!(ok, "{out}");
    let kept = held_for(&bk, "_base/img");
    assert!(!kept.is_empty(), "the deletion was quarantined");
    for d in &kept {
        assert_eq!(
            d.as_slice(),
            b"ORIGINAL-CONTENTS",
            "every held copy keeps the original bytes ({out})"
        );
    }
    assert!(
        out.contains("ftruncate=ESTALE"),
        "a stale descriptor is refused as NFS would: {out}"
    );
}

/// A file open for writing on this node when it gets a protected name (a
/// rename or a link into `_base`): its writes may bypass the daemon (kernel
/// passthrough), so what it holds then is copied at once; an overwrite
/// through the old descriptor afterwards loses nothing.
#[test]
fn a_file_open_for_writing_when_it_becomes_protected_is_copied_then() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    let script = r#"
import os, sys
inst, base = sys.argv[1], sys.argv[2]
fd = os.open(inst + "/f", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"ORIGDATA")
os.fsync(fd)
os.rename(inst + "/f", base + "/f")
os.pwrite(fd, b"XXXXXXXX", 0)
os.close(fd)
fd = os.open(inst + "/g", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"GDATA")
os.link(inst + "/g", base + "/g")
os.ftruncate(fd, 0)
os.close(fd)
# Opened read-only: nothing to copy.
with open(inst + "/r", "wb") as w:
    w.write(b"R")
fd = os.open(inst + "/r", os.O_RDONLY)
os.rename(inst + "/r", base + "/r")
os.close(fd)
"#;
    let (ok, out) = py(script, &[&m.path("inst"), &m.path("_base")]);
    assert!(ok, "{out}");
    assert_eq!(fs::read(m.path("_base/f")).unwrap(), b"XXXXXXXX");
    assert_eq!(held_for(&bk, "_base/f"), vec![b"ORIGDATA".to_vec()]);
    assert_eq!(held_for(&bk, "_base/g"), vec![b"GDATA".to_vec()]);
    assert!(held_for(&bk, "_base/r").is_empty());
}

// ---- 2. rename-over races ---------------------------------------------------

#[test]
fn two_nodes_renaming_over_one_name_lose_no_version() {
    rename_race(&[]);
}

/// The same without RENAME_EXCHANGE or RENAME_NOREPLACE, as over NFS: the
/// nodes serialize through the lock in the shared quarantine.
#[test]
fn two_nodes_renaming_over_one_name_lose_no_version_without_exchange() {
    rename_race(&["--emulate-nfs"]);
}

fn rename_race(args: &[&str]) {
    let (_t, bk) = scratch();
    let a = Mount::new(&bk, args);
    let b = Mount::new(&bk, args);
    fs::write(bk.join("_base/img"), b"version-initial").unwrap();
    const N: usize = 150;
    let script = r#"
import os, sys, errno
base, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
errs = []
for i in range(n):
    part = os.path.join(base, "img.%s.%d.part" % (tag, i))
    with open(part, "wb") as f:
        f.write(("version-%s-%d" % (tag, i)).encode())
    try:
        os.rename(part, os.path.join(base, "img"))
    except OSError as e:
        errs.append(errno.errorcode[e.errno])
print("errors:", len(errs), sorted(set(errs)))
"#;
    let spawn = |m: &Mount, tag: &str| {
        Command::new(PY)
            .arg("-c")
            .arg(script)
            .arg(m.path("_base"))
            .arg(tag)
            .arg(N.to_string())
            .output()
            .unwrap()
    };
    let (oa, ob) = std::thread::scope(|s| {
        let ha = s.spawn(|| spawn(&a, "A"));
        let hb = s.spawn(|| spawn(&b, "B"));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    for o in [&oa, &ob] {
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("errors: 0"),
            "a rename returned what a native rename would not: {out} {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut seen: BTreeSet<Vec<u8>> = held_for(&bk, "_base/img").into_iter().collect();
    seen.insert(fs::read(bk.join("_base/img")).unwrap());
    let mut missing = Vec::new();
    for v in std::iter::once("version-initial".to_string())
        .chain((0..N).map(|i| format!("version-A-{i}")))
        .chain((0..N).map(|i| format!("version-B-{i}")))
    {
        if !seen.contains(v.as_bytes()) {
            missing.push(v);
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} versions were lost: {:?}",
        missing.len(),
        2 * N + 1,
        &missing[..missing.len().min(10)]
    );
    // No stray temporaries: every .part was renamed.
    let left: Vec<_> = fs::read_dir(bk.join("_base"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".part"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

// ---- 4. hard links ----------------------------------------------------------

#[test]
fn a_hard_link_elsewhere_does_not_switch_the_guard_off() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    fs::write(bk.join("_base/hl"), b"X-CONTENTS").unwrap();
    fs::hard_link(bk.join("_base/hl"), bk.join("inst/hl")).unwrap();
    let (ok, out) = sh(&format!("truncate -s0 '{}'", m.path("_base/hl").display()));
    assert!(ok, "{out}");
    assert_eq!(held_for(&bk, "_base/hl"), vec![b"X-CONTENTS".to_vec()]);

    // Through the other, unprotected name of a linked file: the guard
    // cannot see every name, so it keeps a copy rather than guess.
    fs::write(bk.join("_base/hl2"), b"Y-CONTENTS").unwrap();
    fs::hard_link(bk.join("_base/hl2"), bk.join("inst/hl2")).unwrap();
    let (ok, out) = sh(&format!("truncate -s0 '{}'", m.path("inst/hl2").display()));
    assert!(ok, "{out}");
    let all: Vec<Vec<u8>> = held(&bk).into_iter().map(|h| h.3).collect();
    assert!(all.contains(&b"Y-CONTENTS".to_vec()), "{all:?}");
}

/// A file linked at a protected and an unprotected name, seen through both
/// on node B, whose protected name node A then quarantines: the file lives
/// on at the other name, sharing its bytes with the quarantined version.
/// Truncating it there through B is a legitimate operation (no `ESTALE` for
/// a name that is still there), and the quarantined bytes survive it.
#[test]
fn a_linked_file_whose_protected_name_another_node_removed_is_copied_not_stale() {
    let (_t, bk) = scratch();
    let a = Mount::new(&bk, &[]);
    let b = Mount::new(&bk, &[]);
    fs::write(a.path("_base/h2"), b"H2DATA").unwrap();
    fs::hard_link(b.path("_base/h2"), b.path("inst/h2")).unwrap();
    fs::remove_file(a.path("_base/h2")).unwrap();
    let (ok, out) = sh(&format!(": > '{}'", b.path("inst/h2").display()));
    assert!(ok, "truncating the live name: {out}");
    assert_eq!(fs::read(b.path("inst/h2")).unwrap(), b"");
    let all: Vec<Vec<u8>> = held(&bk).into_iter().map(|h| h.3).collect();
    assert!(all.contains(&b"H2DATA".to_vec()), "{all:?}");
}

// ---- 5. moved and over-long backing paths -----------------------------------

#[test]
fn the_guard_holds_when_the_backing_path_moves() {
    let t = tempfile::tempdir().unwrap();
    let bk = t.path().join("bk");
    fs::create_dir_all(bk.join("_base")).unwrap();
    let mp = t.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let m = Mount::at(&bk, &mp, &[]);
    fs::write(m.path("_base/one"), b"ONE").unwrap();
    fs::write(m.path("_base/two"), b"TWO").unwrap();
    fs::remove_file(m.path("_base/one")).unwrap();
    let moved = t.path().join("bk.renamed");
    fs::rename(&bk, &moved).unwrap();
    fs::remove_file(m.path("_base/two")).unwrap();
    assert_eq!(held_for(&moved, "_base/one"), vec![b"ONE".to_vec()]);
    assert_eq!(held_for(&moved, "_base/two"), vec![b"TWO".to_vec()]);
    drop(m);
}

#[test]
fn the_guard_holds_below_paths_longer_than_path_max() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    // 20 levels of 250-byte names: about 5,000 bytes below _base.
    let script = r#"
import os, sys
os.chdir(sys.argv[1])
for i in range(20):
    name = ("d%02d" % i) + "x" * 247
    os.mkdir(name)
    os.chdir(name)
with open("deep", "wb") as f:
    f.write(b"DEEP-CONTENTS")
os.unlink("deep")
print(len(os.getcwd()))
"#;
    let (ok, out) = py(script, &[&m.path("_base")]);
    assert!(ok, "{out}");
    let deep: Vec<_> = held(&bk)
        .into_iter()
        .filter(|h| h.1.ends_with("/deep"))
        .collect();
    assert_eq!(deep.len(), 1, "the deep deletion was quarantined");
    assert!(deep[0].1.starts_with("_base/d00"), "{}", deep[0].1);
    assert!(deep[0].1.len() > 4300, "recorded with its full path");
    assert_eq!(deep[0].3, b"DEEP-CONTENTS");
}

// ---- 6. other ways to destroy the bytes --------------------------------------

#[test]
fn punching_zeroing_and_overwriting_in_place_copy_first() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    let orig: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8 + 1).collect();
    for name in ["punch", "zero", "dd", "py"] {
        fs::write(bk.join("_base").join(name), &orig).unwrap();
    }
    let p = |n: &str| m.path(&format!("_base/{n}")).display().to_string();
    for cmd in [
        format!("fallocate -p -o 4096 -l 65536 '{}'", p("punch")),
        format!("fallocate -z -o 4096 -l 65536 '{}'", p("zero")),
        format!(
            "dd if=/dev/zero of='{}' bs=4096 count=2 conv=notrunc status=none",
            p("dd")
        ),
    ] {
        let (ok, out) = sh(&cmd);
        assert!(ok, "{cmd}: {out}");
    }
    let (ok, out) = py(
        "import os,sys\nfd=os.open(sys.argv[1], os.O_WRONLY)\nos.pwrite(fd, b'Z'*100, 10)\nos.close(fd)",
        &[Path::new(&p("py"))],
    );
    assert!(ok, "{out}");
    for name in ["punch", "zero", "dd", "py"] {
        let now = fs::read(bk.join("_base").join(name)).unwrap();
        assert_ne!(now, orig, "{name} was changed as asked");
        assert!(
            held_for(&bk, &format!("_base/{name}")).contains(&orig),
            "{name}: the original bytes are held"
        );
    }
}

#[test]
fn renaming_out_of_base_and_deleting_there_keeps_the_file() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    fs::write(bk.join("_base/moved"), b"MOVED").unwrap();
    fs::rename(m.path("_base/moved"), m.path("inst/moved")).unwrap();
    fs::remove_file(m.path("inst/moved")).unwrap();
    assert!(
        held(&bk).iter().any(|h| h.3 == b"MOVED"),
        "the file that left _base is held"
    );

    // A directory of protected files cannot leave as a whole: mv(1) falls
    // back to copying and deleting, and every deletion is guarded.
    fs::create_dir(bk.join("_base/sub")).unwrap();
    fs::write(bk.join("_base/sub/a"), b"SUB-A").unwrap();
    let e = fs::rename(m.path("_base/sub"), m.path("inst/sub")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
    let (ok, out) = sh(&format!(
        "mv '{}' '{}' && rm -r '{}'",
        m.path("_base/sub").display(),
        m.path("inst/sub").display(),
        m.path("inst/sub").display()
    ));
    assert!(ok, "{out}");
    assert_eq!(held_for(&bk, "_base/sub/a"), vec![b"SUB-A".to_vec()]);

    // Within _base, renames stay cheap: no copy.
    let before = held(&bk).len();
    fs::write(bk.join("_base/x"), b"X").unwrap();
    fs::rename(m.path("_base/x"), m.path("_base/y")).unwrap();
    assert_eq!(held(&bk).len(), before);
}

#[test]
fn novas_download_flow_quarantines_nothing_new() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    // Download to .part, convert to .converted, rename over the final name
    // (absent), remove the .part: nothing is held.
    let base = m.path("_base");
    fs::write(base.join("abc.part"), vec![7u8; 100_000]).unwrap();
    fs::copy(base.join("abc.part"), base.join("abc.converted")).unwrap();
    fs::rename(base.join("abc.converted"), base.join("abc")).unwrap();
    fs::remove_file(base.join("abc.part")).unwrap();
    // libvirt relabels, Nova touches in-use images.
    let (ok, out) = sh(&format!(
        "chmod 0644 '{p}' && touch '{p}' && cat '{p}' >/dev/null",
        p = base.join("abc").display()
    ));
    assert!(ok, "{out}");
    let kept: Vec<_> = held(&bk).into_iter().map(|h| (h.1, h.2)).collect();
    assert!(kept.is_empty(), "{kept:?}");
    assert_eq!(fs::metadata(bk.join("_base/abc")).unwrap().size(), 100_000);
    let counts: BTreeMap<String, u64> =
        serde_json::from_value(m.stats()["ops"].clone()).unwrap_or_default();
    assert_eq!(counts.get("quarantined").copied().unwrap_or(0), 0);
}

// ---- a protected name that is a symlink to a directory -----------------------

/// `_base` as a symlink to another directory of the same share (relative, or
/// absolute through the mountpoint): the kernel follows
/// it and asks for the target directory's entries, never naming `_base`, so
/// the guard must protect the directory the protected name leads to, from
/// the first request on (even one that never went through `_base`).
#[test]
fn a_protected_name_that_is_a_symlink_protects_the_directory_it_leads_to() {
    let t = tempfile::tempdir().unwrap();
    let bk = t.path().join("bk");
    let mp = t.path().join("mnt");
    fs::create_dir_all(bk.join("cache")).unwrap();
    fs::create_dir_all(bk.join("abs")).unwrap();
    fs::create_dir(&mp).unwrap();
    std::os::unix::fs::symlink("cache", bk.join("_base")).unwrap();
    fs::write(bk.join("cache/direct"), b"DIRECT").unwrap();
    let m = Mount::at(&bk, &mp, &[]);
    // Straight through the target's own name, before anything looked at `_base`.
    fs::remove_file(m.path("cache/direct")).unwrap();
    assert_eq!(held_for(&bk, "cache/direct"), vec![b"DIRECT".to_vec()]);
    // Through the symlink.
    fs::write(m.path("_base/img"), b"IMG").unwrap();
    fs::remove_file(m.path("_base/img")).unwrap();
    assert_eq!(held_for(&bk, "cache/img"), vec![b"IMG".to_vec()]);
    let (ok, out) = sh(&format!(
        "printf OLD > '{0}' && truncate -s0 '{0}'",
        m.path("_base/u").display()
    ));
    assert!(ok, "{out}");
    assert_eq!(held_for(&bk, "cache/u"), vec![b"OLD".to_vec()]);
    // The symlink made through the mount, absolute through the mountpoint,
    // after `_base` is gone.
    fs::remove_file(m.path("_base")).unwrap();
    std::os::unix::fs::symlink(mp.join("abs"), m.path("_base")).unwrap();
    fs::write(m.path("_base/a1"), b"A1").unwrap();
    fs::remove_file(m.path("_base/a1")).unwrap();
    assert_eq!(held_for(&bk, "abs/a1"), vec![b"A1".to_vec()]);
    // Relative, through another directory and `..`.
    fs::create_dir_all(bk.join("inst")).unwrap();
    fs::create_dir_all(bk.join("c2")).unwrap();
    fs::remove_file(m.path("_base")).unwrap();
    std::os::unix::fs::symlink("inst/../c2", m.path("_base")).unwrap();
    fs::write(m.path("_base/b1"), b"B1").unwrap();
    fs::remove_file(m.path("_base/b1")).unwrap();
    assert_eq!(held_for(&bk, "c2/b1"), vec![b"B1".to_vec()]);
    // A symlink renamed onto the name (the kernel keeps its entry: no lookup).
    fs::create_dir_all(bk.join("c3")).unwrap();
    fs::remove_file(m.path("_base")).unwrap();
    std::os::unix::fs::symlink("c3", m.path("tmp")).unwrap();
    fs::rename(m.path("tmp"), m.path("_base")).unwrap();
    fs::write(m.path("_base/r1"), b"R1").unwrap();
    fs::remove_file(m.path("_base/r1")).unwrap();
    assert_eq!(held_for(&bk, "c3/r1"), vec![b"R1".to_vec()]);
    // A directory of protected files may not leave the target whole (EXDEV:
    // mv copies, then deletes file by file, each deletion guarded).
    fs::create_dir(m.path("_base/sub")).unwrap();
    fs::write(m.path("_base/sub/s"), b"S").unwrap();
    let e = fs::rename(m.path("c3/sub"), m.path("inst/sub")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{e}");
    // What is not below a protected name stays unprotected.
    fs::write(m.path("inst_file"), b"I").unwrap();
    fs::remove_file(m.path("inst_file")).unwrap();
    assert!(held_for(&bk, "inst_file").is_empty());
    drop(m);
}

/// Node A replaces `_base` with a symlink after node B started: B, asked
/// straight for the target's files (never naming `_base`), must still know.
#[test]
fn a_protected_name_made_a_symlink_on_another_node_protects_its_target_there_too() {
    let (_t, bk) = scratch();
    let a = Mount::new(&bk, &[]);
    let b = Mount::new(&bk, &[]);
    // B is serving, and has seen `_base` as a directory.
    assert!(fs::metadata(b.path("_base")).unwrap().is_dir());
    symlinked_on_a_deleted_on_b(&bk, &a, &b, "");
}

/// On node A, make `{dir}_base` a symlink to a new `{dir}cache`; then on
/// node B, which never looks the symlink up, write `{dir}cache/x` and delete
/// it through the target's own name: it must be kept.
fn symlinked_on_a_deleted_on_b(bk: &Path, a: &Mount, b: &Mount, dir: &str) {
    fs::create_dir(a.path(&format!("{dir}cache"))).unwrap();
    fs::remove_dir(a.path(&format!("{dir}_base"))).unwrap();
    std::os::unix::fs::symlink("cache", a.path(&format!("{dir}_base"))).unwrap();
    let x = format!("{dir}cache/x");
    fs::write(b.path(&x), b"X").unwrap();
    fs::remove_file(b.path(&x)).unwrap();
    assert_eq!(held_for(bk, &x), vec![b"X".to_vec()]);
}

/// The symlink stays, the directory it names is made anew (`rm -rf cache;
/// mkdir cache`): the new directory is the one protected.
#[test]
fn a_symlinked_base_whose_target_is_made_anew_protects_the_new_directory() {
    let (_t, bk) = scratch();
    fs::create_dir(bk.join("cache")).unwrap();
    fs::remove_dir(bk.join("_base")).unwrap();
    std::os::unix::fs::symlink("cache", bk.join("_base")).unwrap();
    let m = Mount::new(&bk, &[]);
    fs::remove_dir(m.path("cache")).unwrap();
    fs::create_dir(m.path("cache")).unwrap();
    fs::write(m.path("cache/x"), b"X").unwrap();
    fs::remove_file(m.path("cache/x")).unwrap();
    assert_eq!(held_for(&bk, "cache/x"), vec![b"X".to_vec()]);
}

/// The root's names are looked at again during whoever's request comes
/// first after a change: an unprivileged caller, who may not search the way
/// to the target, must not leave the symlink unfollowed for good.
#[test]
fn a_symlinked_base_first_seen_during_an_unprivileged_request_is_still_followed() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    fs::write(m.path("inst/seen"), b"S").unwrap();
    // Made on the raw backing directory, as another node would.
    fs::create_dir_all(bk.join("priv/cache")).unwrap();
    fs::set_permissions(
        bk.join("priv"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    fs::remove_dir(bk.join("_base")).unwrap();
    std::os::unix::fs::symlink("priv/cache", bk.join("_base")).unwrap();
    fs::write(bk.join("priv/cache/x"), b"X").unwrap();
    // Past the 2 s in which a change of the root is never taken as settled.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let (ok, out) = sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups -- stat '{}' >/dev/null",
        m.path("inst/seen").display()
    ));
    assert!(ok, "{out}");
    fs::remove_file(m.path("priv/cache/x")).unwrap();
    assert_eq!(held_for(&bk, "priv/cache/x"), vec![b"X".to_vec()]);
}

/// A protect glob that spells out a deeper directory (`nova/_base/**`) whose
/// last name is a symlink: followed from the first request too, before
/// anything looked the symlink up (as after a restart, when the kernel still
/// holds its entry).
#[test]
fn a_deeper_protected_name_that_is_a_symlink_is_followed_from_the_start() {
    let t = tempfile::tempdir().unwrap();
    let bk = t.path().join("bk");
    fs::create_dir_all(bk.join("nova/cache")).unwrap();
    std::os::unix::fs::symlink("cache", bk.join("nova/_base")).unwrap();
    fs::write(bk.join("nova/cache/deep"), b"DEEP").unwrap();
    let m = Mount::new(&bk, &["-o", "protect=nova/_base/**"]);
    fs::remove_file(m.path("nova/cache/deep")).unwrap();
    assert_eq!(held_for(&bk, "nova/cache/deep"), vec![b"DEEP".to_vec()]);
}

/// The same for a deeper name made a symlink on node A after node B started:
/// B, asked straight for the target's files, must know.
#[test]
fn a_deeper_protected_name_made_a_symlink_on_another_node_protects_its_target_there_too() {
    let (_t, bk) = scratch();
    fs::create_dir_all(bk.join("nova/_base")).unwrap();
    let args = ["-o", "protect=nova/_base/**"];
    let a = Mount::new(&bk, &args);
    let b = Mount::new(&bk, &args);
    // The root's last change (the quarantine made at mount) settled (2 s),
    // and B took note of it: from here on only `nova` changes.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(fs::metadata(b.path("nova/_base")).unwrap().is_dir());
    assert!(fs::metadata(b.path("inst")).unwrap().is_dir());
    symlinked_on_a_deleted_on_b(&bk, &a, &b, "nova/");
}

/// A symlink dropped *into* the protected directory is a protected file; it
/// does not make the directory it points to protected (or any user could
/// turn every instance disk's deletion into a quarantined copy).
#[test]
fn a_symlink_inside_the_protected_directory_protects_only_itself() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    fs::write(m.path("inst/z"), b"Z").unwrap();
    std::os::unix::fs::symlink("../inst", m.path("_base/evil")).unwrap();
    assert_eq!(fs::read(m.path("_base/evil/z")).unwrap(), b"Z");
    fs::remove_file(m.path("inst/z")).unwrap();
    assert!(held_for(&bk, "inst/z").is_empty(), "{:?}", held(&bk));
}

// ---- 12. descriptors --------------------------------------------------------

#[test]
fn one_user_opening_thousands_of_files_does_not_starve_the_daemon() {
    let (t, bk) = scratch();
    let log = t.path().join("daemon.log");
    let mp = t.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    // A daemon that may not raise its hard limit (no CAP_SYS_RESOURCE).
    let m = Mount::wrapped(
        &[
            "prlimit",
            "--nofile=4096:4096",
            "--",
            "setpriv",
            "--bounding-set=-sys_resource",
            "--",
        ],
        &bk,
        &mp,
        &["--log-file", log.to_str().unwrap()],
    );
    let dir = m.path("many");
    fs::create_dir(&dir).unwrap();
    for i in 0..3800 {
        fs::write(dir.join(format!("f{i}")), b"x").unwrap();
    }
    // Hold 3,800 files open through the mount, then ask for more as root.
    let script = r#"
import os, sys
d = sys.argv[1]
fds = [os.open(os.path.join(d, "f%d" % i), os.O_RDONLY) for i in range(3800)]
with open(os.path.join(d, "late"), "w") as f:
    f.write("late")
print(open(os.path.join(d, "late")).read(), os.stat(os.path.join(d, "f0")).st_size)
"#;
    let o = Command::new("prlimit")
        .args(["--nofile=10000:10000", "--", PY, "-c", script])
        .arg(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.trim() == "late 1",
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let logged = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("near its open-file limit"),
        "the daemon says it is near its limit"
    );
}

// ---- a directory reached through a file handle --------------------------------

#[test]
fn a_directory_decoded_from_a_file_handle_is_still_guarded() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    fs::create_dir(bk.join("_base/sub")).unwrap();
    fs::write(bk.join("_base/sub/f"), b"SUB-F").unwrap();
    fs::create_dir(bk.join("inst/plain")).unwrap();
    fs::write(bk.join("inst/plain/g"), b"G").unwrap();
    // Handles of both directories, the kernel's caches dropped, then
    // deletions through descriptors decoded from the handles: the kernel
    // knows no names for them.
    let script = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class FH(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("h", ctypes.c_ubyte * 128)]
def handle(p):
    fh = FH(); fh.bytes = 128; mnt = ctypes.c_int()
    assert libc.name_to_handle_at(-100, p.encode(), ctypes.byref(fh), ctypes.byref(mnt), 0) == 0
    return fh
root = sys.argv[1]
hs, hp = handle(root + "/_base/sub"), handle(root + "/inst/plain")
mfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
with open("/proc/sys/vm/drop_caches", "w") as f:
    f.write("3")
for h, name in ((hs, "f"), (hp, "g")):
    fd = libc.open_by_handle_at(mfd, ctypes.byref(h), os.O_RDONLY | os.O_DIRECTORY)
    assert fd >= 0, ctypes.get_errno()
    os.unlink(name, dir_fd=fd)
print("ok")
"#;
    let (ok, out) = py(script, &[&m.mountpoint]);
    assert!(ok, "{out}");
    assert_eq!(held_for(&bk, "_base/sub/f"), vec![b"SUB-F".to_vec()]);
    assert!(!bk.join("inst/plain/g").exists());
    assert!(
        held(&bk).iter().all(|h| h.1 != "inst/plain/g"),
        "unprotected: deleted"
    );
}

#[test]
fn an_overwrite_while_the_writer_that_made_the_file_still_has_it_open_copies_first() {
    let (_t, bk) = scratch();
    let m = Mount::new(&bk, &[]);
    // The download is still open for writing (or its release is still on
    // its way) when it is renamed into place; another process then writes
    // over its bytes: the placed version must be kept.
    let script = r#"
import os, sys
base = sys.argv[1]
part = os.path.join(base, "img.part")
w = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
os.write(w, b"PLACED-VERSION")
os.rename(part, os.path.join(base, "img"))
fd = os.open(os.path.join(base, "img"), os.O_RDWR)
os.pwrite(fd, b"OVERWRITTEN", 0)
os.close(fd)
os.close(w)
"#;
    let (ok, out) = py(script, &[&m.path("_base")]);
    assert!(ok, "{out}");
    assert_eq!(fs::read(bk.join("_base/img")).unwrap(), b"OVERWRITTENION");
    // Copied when it got its protected name with a writer still open, and
    // again before the overwrite (the open writer may have written since).
    let kept = held_for(&bk, "_base/img");
    assert!(!kept.is_empty(), "the placed version is kept");
    assert!(
        kept.iter().all(|k| k.as_slice() == b"PLACED-VERSION"),
        "{kept:?}"
    );
}
