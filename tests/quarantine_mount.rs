//! End to end: real `baseguard mount`s, deletions through them, and the
//! quarantine CLI pointed at the mountpoint (resolved to the backing
//! directory through mountinfo), including a mount over its own backing
//! directory (reached through a private mount namespace).

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn bg(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn list_json(dir: &Path) -> Vec<serde_json::Value> {
    let o = bg(&["list", "--json", "--dir", dir.to_str().unwrap()]);
    let s = ok(&o);
    serde_json::from_str::<serde_json::Value>(&s).unwrap()["entries"]
        .as_array()
        .unwrap()
        .clone()
}

fn backing() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let b = t.path().join("instances");
    fs::create_dir_all(b.join("_base")).unwrap();
    (t, b)
}

#[test]
fn delete_through_mount_then_list_and_restore_via_mountpoint() {
    let (_t, b) = backing();
    let m = Mount::new(&b, &[]);
    let mp = m.mountpoint.clone();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.path("_base/0123abcd"), &data).unwrap();
    fs::write(m.path("_base/0123abcd.part"), b"temp").unwrap();

    let rm = Command::new("rm")
        .arg(m.path("_base/0123abcd"))
        .arg(m.path("_base/0123abcd.part"))
        .output()
        .unwrap();
    assert!(rm.status.success());
    assert!(!m.path("_base/0123abcd").exists());
    assert!(!b.join("_base/0123abcd").exists());
    // The quarantine is on the backing side, hidden from the mount.
    assert!(b.join(".baseguard/entries").is_dir());
    let names: Vec<_> = fs::read_dir(&mp)
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert!(!names.iter().any(|n| n == ".baseguard"), "{names:?}");
    // ... unreachable, and it cannot be replaced or shadowed through the mount.
    let q = mp.join(".baseguard");
    assert_eq!(
        fs::metadata(&q).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert!(fs::create_dir(&q).is_err());
    assert!(fs::write(&q, "x").is_err());
    fs::create_dir(mp.join("zz")).unwrap();
    assert!(fs::rename(mp.join("zz"), &q).is_err());
    assert!(b.join(".baseguard/entries").is_dir());

    // The CLI pointed at the mountpoint finds the backing directory.
    let l = list_json(&mp);
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0]["path"], "_base/0123abcd");
    assert_eq!(l[0]["why"], "unlink");
    assert_eq!(l[0]["who"]["comm"], "rm");
    let id = l[0]["id"].as_str().unwrap().to_string();

    let s = ok(&bg(&["status", "--dir", mp.to_str().unwrap()]));
    assert!(s.contains(mp.to_str().unwrap()), "{s}");
    assert!(s.contains("entries:     1"), "{s}");

    let s = ok(&bg(&["show", "--dir", mp.to_str().unwrap(), &id]));
    assert!(s.contains("rm "), "{s}");

    // Restore by absolute path under the mountpoint.
    let target = m.path("_base/0123abcd");
    ok(&bg(&[
        "restore",
        "--dir",
        mp.to_str().unwrap(),
        target.to_str().unwrap(),
    ]));
    assert_eq!(fs::read(&target).unwrap(), data);
    assert!(list_json(&mp).is_empty());
    drop(m);
}

#[test]
fn mounted_over_its_own_backing_directory() {
    let (_t, b) = backing();
    let m = Mount::at(&b, &b, &[]);
    fs::write(b.join("_base/cafe"), b"base image").unwrap();
    fs::remove_file(b.join("_base/cafe")).unwrap();
    assert!(!b.join("_base/cafe").exists());

    // `--dir` is both the mountpoint and the backing directory: the CLI
    // detaches the mount in a private namespace to see the quarantine.
    let l = list_json(&b);
    assert_eq!(l.len(), 1, "{l:?}");
    let id = l[0]["id"].as_str().unwrap().to_string();
    // The mount is still there for everyone else.
    assert!(is_mounted(&b));

    // Restore onto an existing file is refused, through the namespace too.
    fs::write(b.join("_base/cafe"), b"newer").unwrap();
    let o = bg(&["restore", "--dir", b.to_str().unwrap(), &id]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    fs::remove_file(b.join("_base/cafe")).unwrap();
    // That deletion was quarantined too; restore the original by id.
    ok(&bg(&["restore", "--dir", b.to_str().unwrap(), &id]));
    assert!(is_mounted(&b));
    assert_eq!(fs::read(b.join("_base/cafe")).unwrap(), b"base image");
    let l = list_json(&b);
    assert_eq!(l.len(), 1);
    assert_eq!(fs::read(b.join("_base/cafe")).unwrap(), b"base image");
    let s = ok(&bg(&["status", "--dir", b.to_str().unwrap()]));
    let line = format!("{} (backing {})", b.display(), b.display());
    assert!(s.contains(&line), "{s}");
    assert!(s.contains("entries:     1"), "{s}");
    m.unmount();
    // After unmounting, the same commands work on the plain directory.
    let l = list_json(&b);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["path"], "_base/cafe");
}

#[test]
fn rename_over_a_protected_file_keeps_the_old_one() {
    let (_t, b) = backing();
    let m = Mount::new(&b, &[]);
    fs::write(m.path("_base/img"), b"old").unwrap();
    fs::write(m.path("_base/img.tmp"), b"new").unwrap();
    fs::rename(m.path("_base/img.tmp"), m.path("_base/img")).unwrap();
    assert_eq!(fs::read(m.path("_base/img")).unwrap(), b"new");
    let mp = m.mountpoint.clone();
    let l = list_json(&mp);
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0]["why"], "rename-over");
    let id = l[0]["id"].as_str().unwrap().to_string();
    ok(&bg(&[
        "restore",
        "--dir",
        mp.to_str().unwrap(),
        &id,
        "--to",
        "_base/img.old",
    ]));
    assert_eq!(fs::read(m.path("_base/img.old")).unwrap(), b"old");
}
