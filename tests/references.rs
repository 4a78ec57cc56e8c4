//! Backing-chain awareness through real mounts: restore on access, `check`,
//! and an expiry that never destroys a referenced image.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::nova::*;
use common::*;

const SHA: &str = "7b4783508212f5d242cbf9ff56fb8d33b4ce6166";
const UUID: &str = "6f1c2a8e-3b9d-4c4e-9a52-0c1d2e3f4a5b";

fn bg(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = run(Command::new(BIN).args(args).arg("--dir").arg(dir));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_incident_heals_itself_without_any_command() {
    let t = scratch();
    let backing = t.path().join("nfs");
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    let a = Mount::new(&backing, &[]);
    let b = Mount::new(&backing, &[]);
    // Node B: image download and instance disk naming B's mountpoint.
    let base_b = b.path(&format!("_base/{SHA}"));
    make_base(&base_b, "0x42");
    std::fs::create_dir(b.path(UUID)).unwrap();
    overlay(
        base_b.to_str().unwrap(),
        "raw",
        &b.path(&format!("{UUID}/disk")),
    );
    // And an unreferenced base file.
    let other = "0000000000000000000000000000000000000000";
    make_base(&b.path(&format!("_base/{other}")), "0x11");
    // Node A's image cache manager deletes both.
    nova_remove(&a.path(&format!("_base/{SHA}")));
    nova_remove(&a.path(&format!("_base/{other}")));
    assert!(!backing.join("_base").join(SHA).exists());
    // Node B's kernel caches names for 1 s, as NFS caches attributes.
    std::thread::sleep(Duration::from_millis(1200));
    // qemu on node B opens the instance disk: the base file comes back.
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-t", "none", "-c", "read -P 0x42 0 1M"])
        .arg(b.path(&format!("{UUID}/disk"))));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(backing.join("_base").join(SHA).exists());
    assert!(b.stats()["healed"].as_u64().unwrap() >= 1);
    // The unreferenced one stays deleted, on both nodes, however often asked.
    for m in [&a, &b] {
        for _ in 0..3 {
            let e = std::fs::metadata(m.path(&format!("_base/{other}"))).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        }
    }
    let (code, list, _) = bg(&["list", "--json"], &a.mountpoint);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let paths: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec![format!("_base/{other}").as_str()]);
}

#[test]
fn check_reports_and_restores_two_level_chains() {
    let t = scratch();
    let backing = t.path().join("nfs");
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    let m = Mount::new(&backing, &["--no-heal"]);
    // base (raw) <- resized copy (qcow2, relative name) <- instance disk
    // (absolute name through the mount).
    make_base(&m.path(&format!("_base/{SHA}")), "0x42");
    overlay(SHA, "raw", &m.path(&format!("_base/{SHA}_10")));
    std::fs::create_dir(m.path(UUID)).unwrap();
    overlay(
        m.path(&format!("_base/{SHA}_10")).to_str().unwrap(),
        "qcow2",
        &m.path(&format!("{UUID}/disk")),
    );
    // Second instance on older Nova naming, relative backing path.
    std::fs::create_dir(m.path("instance-0000000a")).unwrap();
    overlay(
        format!("../_base/{SHA}"),
        "raw",
        &m.path("instance-0000000a/disk.local"),
    );

    let (code, out, err) = bg(&["check"], &m.mountpoint);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every link present"), "{out}");

    nova_remove(&m.path(&format!("_base/{SHA}")));
    let (code, out, _) = bg(&["check"], &m.mountpoint);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("QUARANTINED, restorable"), "{out}");
    let (code, json, _) = bg(&["check", "--json"], &m.mountpoint);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["problems"], 2, "{json}");

    // Both levels quarantined: restore brings the whole chain back.
    nova_remove(&m.path(&format!("_base/{SHA}_10")));
    let (code, out, err) = bg(&["check", "--restore"], &m.mountpoint);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every link present"), "{out}");
    let (code, _, _) = bg(&["check"], &m.mountpoint);
    assert_eq!(code, 0);
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x42 0 1M"])
        .arg(m.path(&format!("{UUID}/disk"))));
    assert!(!out.contains("Pattern verification failed"));

    // A base that is gone for good is reported lost (exit 2).
    std::fs::remove_file(backing.join("_base").join(SHA)).unwrap();
    let (code, out, _) = bg(&["check"], &m.mountpoint);
    assert_eq!(code, 2);
    assert!(out.contains("MISSING (lost)"), "{out}");
}

fn listed(dir: &Path) -> Vec<String> {
    let (code, list, err) = bg(&["list", "--json"], dir);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect()
}

fn listed_ids(dir: &Path) -> Vec<String> {
    let (_, list, _) = bg(&["list", "--json"], dir);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn expiry_never_purges_a_referenced_base() {
    let t = scratch();
    let backing = t.path().join("nfs");
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    let m = Mount::new(&backing, &["--retain", "2s", "--no-heal"]);
    make_base(&m.path(&format!("_base/{SHA}")), "0x42");
    std::fs::write(m.path("_base/unreferenced"), "u").unwrap();
    std::fs::create_dir(m.path(UUID)).unwrap();
    overlay(
        m.path(&format!("_base/{SHA}")).to_str().unwrap(),
        "raw",
        &m.path(&format!("{UUID}/disk")),
    );
    nova_remove(&m.path(&format!("_base/{SHA}")));
    nova_remove(&m.path("_base/unreferenced"));
    let mut paths = listed(&m.mountpoint);
    paths.sort();
    assert_eq!(
        paths,
        vec![format!("_base/{SHA}"), "_base/unreferenced".into()]
    );
    // Well past the retention: the unreferenced one is purged, the
    // referenced one kept.
    let start = Instant::now();
    while listed(&m.mountpoint).len() > 1 {
        assert!(start.elapsed() < Duration::from_secs(15), "nothing purged");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(listed(&m.mountpoint), vec![format!("_base/{SHA}")]);
    // status names it first, as a near miss, and exits 1 (attention).
    let (code, status, _) = bg(&["status"], &m.mountpoint);
    assert_eq!(code, 1);
    assert!(
        status.starts_with(&format!("NEAR MISS:   _base/{SHA}")),
        "{status}"
    );
    let (_, _, err) = bg(
        &["purge", &listed_ids(&m.mountpoint)[0], "--yes"],
        &m.mountpoint,
    );
    assert!(err.contains("--force"), "{err}");
    // A manual purge of it refuses without --force.
    let (code, _, err) = bg(
        &["purge", "--expired", "--retain", "1s", "--yes"],
        &m.mountpoint,
    );
    assert!(
        listed(&m.mountpoint).len() == 1,
        "purge --expired took a referenced file: {err} {code}"
    );
    // The instance is deleted (Nova: rename to _del, rmtree): now it goes.
    std::fs::rename(m.path(UUID), m.path(&format!("{UUID}_del"))).unwrap();
    std::fs::remove_dir_all(m.path(&format!("{UUID}_del"))).unwrap();
    let start = Instant::now();
    while !listed(&m.mountpoint).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "referenced entry never purged"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sleep past the filesystem's timestamp granularity, so that the steps of
/// a scenario get distinct times.
fn tick() {
    std::thread::sleep(Duration::from_millis(30));
}

#[test]
fn heal_restores_the_version_the_disk_was_made_on_not_the_emptied_one() {
    let t = scratch();
    let backing = t.path().join("nfs");
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    let m = Mount::new(&backing, &[]);
    let golden = m.path(&format!("_base/{SHA}"));
    make_base(&golden, "0x42");
    tick();
    std::fs::create_dir(m.path(UUID)).unwrap();
    overlay(
        golden.to_str().unwrap(),
        "raw",
        &m.path(&format!("{UUID}/disk")),
    );
    tick();
    // `: > golden; rm golden`: a truncate copy (the original) and then an
    // unlink entry (the empty file), which is the newest.
    std::fs::File::create(&golden).unwrap();
    tick();
    nova_remove(&golden);
    let mut paths = listed(&m.mountpoint);
    paths.sort();
    assert_eq!(paths.len(), 2, "{paths:?}");
    std::thread::sleep(Duration::from_millis(1200));
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-t", "none", "-c", "read -P 0x42 0 1M"])
        .arg(m.path(&format!("{UUID}/disk"))));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(
        std::fs::metadata(backing.join("_base").join(SHA))
            .unwrap()
            .len(),
        16 << 20
    );
    // The empty one stays in the quarantine.
    assert_eq!(listed(&m.mountpoint).len(), 1);
    // `check --restore` makes the same choice.
    let (code, out, err) = bg(&["check"], &m.mountpoint);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn heal_restores_nothing_when_it_cannot_tell_the_versions_apart() {
    let t = scratch();
    let backing = t.path().join("nfs");
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    let m = Mount::new(&backing, &[]);
    let golden = m.path(&format!("_base/{SHA}"));
    make_base(&golden, "0x42");
    tick();
    std::fs::create_dir(m.path(UUID)).unwrap();
    overlay(
        golden.to_str().unwrap(),
        "raw",
        &m.path(&format!("{UUID}/disk")),
    );
    tick();
    // Another image, dated before the disk, renamed over the base file, then
    // deleted: two different complete versions, both plausibly the one the
    // disk was made on.
    let part = m.path(&format!("_base/{SHA}.part"));
    make_base(&part, "0x17");
    std::fs::File::options()
        .write(true)
        .open(&part)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    std::fs::rename(&part, &golden).unwrap();
    tick();
    nova_remove(&golden);
    assert_eq!(listed(&m.mountpoint).len(), 2);
    std::thread::sleep(Duration::from_millis(1200));
    for _ in 0..2 {
        let e = std::fs::metadata(&golden).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
    assert_eq!(listed(&m.mountpoint).len(), 2, "something was restored");
    let (code, out, _) = bg(&["check"], &m.mountpoint);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("several versions"), "{out}");
    // check --restore does not guess either.
    let (code, out, _) = bg(&["check", "--restore"], &m.mountpoint);
    assert_eq!(code, 1, "{out}");
    assert_eq!(listed(&m.mountpoint).len(), 2);
}

#[test]
fn a_restore_killed_mid_way_does_not_stop_the_heal() {
    use baseguard::quarantine::{ClaimOwner, Quarantine};
    let t = scratch();
    let backing = t.path().join("nfs");
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    let m = Mount::new(&backing, &[]);
    let golden = m.path(&format!("_base/{SHA}"));
    make_base(&golden, "0x42");
    std::fs::create_dir(m.path(UUID)).unwrap();
    overlay(
        golden.to_str().unwrap(),
        "raw",
        &m.path(&format!("{UUID}/disk")),
    );
    nova_remove(&golden);
    let id = listed_ids(&m.mountpoint).pop().unwrap();
    // `baseguard restore` claimed it on this host and was SIGKILLed.
    let mut dead = Command::new("true").spawn().unwrap();
    let mut owner = ClaimOwner::current();
    owner.pid = dead.id();
    dead.wait().unwrap();
    let entries = backing.join(".baseguard/entries");
    std::fs::rename(
        entries.join(format!("{id}.data")),
        entries.join(Quarantine::claim_name_for(&id, &owner)),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-t", "none", "-c", "read -P 0x42 0 1M"])
        .arg(m.path(&format!("{UUID}/disk"))));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(backing.join("_base").join(SHA).exists());
    assert!(listed(&m.mountpoint).is_empty());
}
