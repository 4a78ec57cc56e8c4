//! Issue 13: one policy for the whole cloud (stored with the shared
//! quarantine) and the free-space floor, through real mounts.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::nova::{bg, nfs_scratch};
use common::*;
use serde_json::Value;

const UUID: &str = "6f1c2a8e-3b9d-4c4e-9a52-0c1d2e3f4a5b";

fn json(o: &Output) -> Value {
    assert!(
        o.status.success() || o.status.code() == Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    v
}

fn entries(dir: &Path) -> Vec<Value> {
    json(&bg(&["list", "--json"], dir))["entries"]
        .as_array()
        .unwrap()
        .clone()
}

fn paths(dir: &Path) -> Vec<String> {
    entries(dir)
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect()
}

fn log_of(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn a_short_retain_on_one_node_never_shortens_the_clouds() {
    let (t, b) = nfs_scratch();
    let (la, lb) = (t.path().join("a.log"), t.path().join("b.log"));
    let a = Mount::new(&b, &["-o", "retain=1h", "--log-file", la.to_str().unwrap()]);
    let node_b = Mount::new(&b, &["-o", "retain=2s", "--log-file", lb.to_str().unwrap()]);
    std::fs::write(node_b.path("_base/img"), b"image").unwrap();
    std::fs::remove_file(node_b.path("_base/img")).unwrap();
    // Past node B's own retain and several of its sweeps.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(paths(&b), vec!["_base/img"], "purged by the shorter retain");
    let log = log_of(&lb);
    assert!(log.contains("POLICY CONFLICT"), "{log}");
    assert!(log.contains("retain=2s"), "{log}");
    // Every command applies the shared policy.
    let s = json(&bg(&["status", "--json"], &b));
    assert_eq!(s["retain_secs"], 3600, "{s}");
    assert_eq!(s["policy"]["retain_secs"], 3600, "{s}");
    // status names the node whose option is not applied, and why.
    let start = Instant::now();
    loop {
        let s = json(&bg(&["status", "--json"], &b));
        let mounts = s["mounts"].as_array().unwrap().clone();
        let of = |mp: &Path| {
            mounts
                .iter()
                .find(|m| m["mountpoint"] == mp.to_str().unwrap())
                .map(|m| m["policy_conflicts"].clone())
        };
        if let Some(c) = of(&node_b.mountpoint)
            && c.as_array().is_some_and(|c| !c.is_empty())
        {
            assert!(
                c[0].as_str().unwrap().contains("retain=2s is not applied"),
                "{c}"
            );
            assert_eq!(of(&a.mountpoint), Some(serde_json::json!([])), "{s}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = String::from_utf8_lossy(&bg(&["status"], &b).stdout).into_owned();
    assert!(
        text.contains("POLICY CONFLICT: retain=2s is not applied"),
        "{text}"
    );
    // ... and so does `metrics`, for an alert.
    let m = String::from_utf8_lossy(&bg(&["metrics"], &b).stdout).into_owned();
    let line = |mp: &Path| {
        format!(
            "baseguard_policy_conflicts{{mountpoint=\"{}\"}} ",
            mp.display()
        )
    };
    assert!(m.contains("# TYPE baseguard_policy_conflicts gauge"), "{m}");
    assert!(m.contains(&(line(&node_b.mountpoint) + "1\n")), "{m}");
    assert!(m.contains(&(line(&a.mountpoint) + "0\n")), "{m}");
    let l = json(&bg(&["list", "--json"], &b));
    assert_eq!(l["retain_secs"], 3600);
    let o = bg(&["purge", "--expired", "--yes", "--json"], &b);
    assert_eq!(json(&o)["purged"].as_array().unwrap().len(), 0);
    drop(node_b);
    drop(a);
}

#[test]
fn a_longer_retain_raises_the_shared_one_for_nodes_already_up() {
    let (t, b) = nfs_scratch();
    let la = t.path().join("a.log");
    let a = Mount::new(&b, &["-o", "retain=2s", "--log-file", la.to_str().unwrap()]);
    let _b2 = Mount::new(&b, &["-o", "retain=1h"]);
    std::fs::write(a.path("_base/img"), b"image").unwrap();
    std::fs::remove_file(a.path("_base/img")).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        paths(&b),
        vec!["_base/img"],
        "node A purged with its own 2s"
    );
    assert!(
        log_of(&la).contains("the shared policy changed"),
        "{}",
        log_of(&la)
    );
    // An explicit `policy set` may shorten it: then node A purges.
    let o = bg(&["policy", "set", "--retain", "1s"], &b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let start = Instant::now();
    while !paths(&b).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "never purged");
        std::thread::sleep(Duration::from_millis(200));
    }
    let p = json(&bg(&["policy", "--json"], &b));
    assert_eq!(p["policy"]["retain_secs"], 1);
    assert_eq!(p["policy"]["explicit"], true);
}

#[test]
fn a_relative_quarantine_is_under_the_backing_directory() {
    let (t, b) = nfs_scratch();
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let name = format!("q-rel-{}", std::process::id());
    let mp = t.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    // Started from another working directory, as `mount -a` may be.
    let o = run(Command::new(BIN)
        .current_dir(&elsewhere)
        .args(["mount", "-o", &format!("quarantine={name}")])
        .arg(&b)
        .arg(&mp));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q_ok = b.join(&name).join("entries").is_dir();
    let q_wrong = elsewhere.join(&name).exists();
    std::fs::write(mp.join("_base/x"), b"x").unwrap();
    std::fs::remove_file(mp.join("_base/x")).unwrap();
    let l = bg(&["list", "--json", "--quarantine", &name], &mp);
    let _ = Command::new("umount").arg(&mp).status();
    assert!(
        q_ok && !q_wrong,
        "quarantine not under the backing directory"
    );
    assert_eq!(json(&l)["entries"].as_array().unwrap().len(), 1);
}

/// A loop-mounted ext4 filesystem, unmounted on drop (even on failure).
struct LoopFs {
    dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(mib: u32) -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("fs");
        std::fs::create_dir(&mnt).unwrap();
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(u64::from(mib) << 20).unwrap();
        let o = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        assert!(o.status.success(), "{o:?}");
        let o = run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        assert!(o.status.success(), "{o:?}");
        LoopFs { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("fs")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // mount -o loop sets autoclear: unmounting frees the loop device.
        let _ = Command::new("umount").arg(self.root()).status();
    }
}

fn available(p: &Path) -> (u64, u64) {
    let o = run(Command::new("stat").args(["-f", "-c", "%S %b %a"]).arg(p));
    let s = String::from_utf8_lossy(&o.stdout);
    let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0] * v[1], v[0] * v[2])
}

#[test]
fn the_free_space_floor_purges_oldest_unreferenced_first() {
    if !have("mkfs.ext4") || !have("qemu-img") {
        eprintln!("skipped: mkfs.ext4 or qemu-img missing");
        return;
    }
    let fs = LoopFs::new(96);
    let b = fs.root().join("nfs");
    std::fs::create_dir_all(b.join("_base")).unwrap();
    let log = fs.dir.path().join("daemon.log");
    let m = Mount::new(
        &b,
        &[
            "-o",
            "min_free=40%",
            "--no-heal",
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    // The oldest entry is one an instance disk needs: never purged for space.
    let base = m.path("_base/referenced");
    std::fs::write(b.join("_base/referenced.part"), vec![1u8; 8 << 20]).unwrap();
    std::fs::rename(m.path("_base/referenced.part"), &base).unwrap();
    std::fs::create_dir(m.path(UUID)).unwrap();
    let o = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(m.path(&format!("{UUID}/disk"))));
    assert!(o.status.success(), "{o:?}");
    std::fs::remove_file(&base).unwrap();
    let (total, _) = available(&b);
    let floor = total * 40 / 100;
    let mut made = Vec::new();
    for i in 0..9 {
        let name = format!("_base/img-{i}");
        let data = vec![i as u8 + 2; 8 << 20];
        std::fs::write(m.path(&name), &data).unwrap();
        std::fs::remove_file(m.path(&name)).unwrap();
        made.push(name);
        // Back above the floor within seconds.
        let start = Instant::now();
        while available(&b).1 < floor {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "still below the floor after 10 s: {:?} < {floor}",
                available(&b)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let left = paths(&b);
    assert!(left.contains(&"_base/referenced".to_string()), "{left:?}");
    // What is left of the unreferenced ones is the newest: a suffix.
    let kept: Vec<String> = left
        .into_iter()
        .filter(|p| p != "_base/referenced")
        .collect();
    assert!(kept.len() < made.len(), "nothing was purged: {kept:?}");
    assert_eq!(kept, made[made.len() - kept.len()..].to_vec());
    let l = log_of(&log);
    assert!(l.contains("purged for space"), "{l}");
    // The audit trail says why.
    let h = json(&bg(&["list", "--history", "--json"], &b));
    let first = &h["history"][0];
    assert_eq!(first["action"], "purged", "{h}");
    assert_eq!(first["path"], "_base/img-0", "{h}");
    assert_eq!(first["reason"], "below min_free", "{h}");
    assert!(l.contains("path=_base/img-0"), "{l}");
    // status shows allocated bytes and the share.
    let s = json(&bg(&["status", "--json"], &b));
    assert!(s["allocated_bytes"].as_u64().unwrap() >= 8 << 20, "{s}");
    assert!(s["share_percent"].as_f64().unwrap() > 0.0, "{s}");
    drop(m);
    drop(fs);
}

#[test]
fn an_expired_displaced_copy_of_an_image_in_use_is_not_kept_forever() {
    if !have("qemu-img") {
        eprintln!("skipped: qemu-img missing");
        return;
    }
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &["-o", "retain=2s", "--no-heal"]);
    let uuid2 = "0d1e2f3a-4b5c-4d6e-8f70-0a1b2c3d4e5f";
    for (name, uuid) in [("gone", UUID), ("rewritten", uuid2)] {
        let base = m.path(&format!("_base/{name}"));
        std::fs::write(m.path(&format!("_base/{name}.part")), vec![3u8; 65536]).unwrap();
        std::fs::rename(m.path(&format!("_base/{name}.part")), &base).unwrap();
        std::fs::create_dir(m.path(uuid)).unwrap();
        let o = run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(m.path(&format!("{uuid}/disk"))));
        assert!(o.status.success(), "{o:?}");
    }
    // One is deleted (its path is empty), the other truncated in place (a
    // copy of the old bytes is quarantined; the path holds a file).
    std::fs::remove_file(m.path("_base/gone")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("_base/rewritten"))
        .unwrap();
    let mut p = paths(&b);
    p.sort();
    assert_eq!(p, vec!["_base/gone", "_base/rewritten"]);
    let start = Instant::now();
    while paths(&b).contains(&"_base/rewritten".to_string()) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the displaced copy is kept past its retention"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(paths(&b), vec!["_base/gone"], "a needed file was purged");
}

/// Delete a fresh file `dir/stemN` through `m` until one lands in the
/// quarantine (`want`) or one really goes (`!want`): the daemons re-read the
/// shared policy every 2 s. Returns how many tries it took.
fn until_quarantined(m: &Mount, b: &Path, dir: &str, stem: &str, want: bool) -> usize {
    let (stem, ext) = stem.split_once('#').unwrap_or((stem, ""));
    std::fs::create_dir_all(m.path(dir)).unwrap();
    let start = Instant::now();
    for n in 0.. {
        let rel = format!("{dir}/{stem}{n}{ext}");
        std::fs::write(m.path(&rel), b"data").unwrap();
        std::fs::remove_file(m.path(&rel)).unwrap();
        let held = paths(b).contains(&rel);
        if held == want {
            return n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{rel}: quarantined={held}, wanted {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    unreachable!()
}

#[test]
fn shared_globs_protect_on_every_node_and_never_shrink_silently() {
    let (t, b) = nfs_scratch();
    let (la, lc) = (t.path().join("a.log"), t.path().join("c.log"));
    let a = Mount::new(&b, &["--log-file", la.to_str().unwrap()]);
    // Node C lets its own snapshots/*.tmp through.
    let c = Mount::new(
        &b,
        &[
            "-o",
            "ignore=snapshots/*.tmp",
            "--log-file",
            lc.to_str().unwrap(),
        ],
    );
    // Nothing protects snapshots/ yet.
    assert_eq!(until_quarantined(&a, &b, "snapshots", "before", false), 0);

    // Protect it for the whole cloud: both nodes apply it.
    let o = bg(&["policy", "set", "--protect", "snapshots/**"], &b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    until_quarantined(&a, &b, "snapshots", "a", true);
    until_quarantined(&c, &b, "snapshots", "c", true);
    // C's own ignore= cannot let through what the shared policy protects,
    // and C says so.
    std::fs::write(c.path("snapshots/x.tmp"), b"tmp").unwrap();
    std::fs::remove_file(c.path("snapshots/x.tmp")).unwrap();
    assert!(paths(&b).contains(&"snapshots/x.tmp".to_string()));
    let start = Instant::now();
    while !log_of(&lc).contains("POLICY CONFLICT: this node ignores snapshots/*.tmp") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", log_of(&lc));
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = json(&bg(&["policy", "--json"], &b));
    assert_eq!(p["policy"]["protect"], serde_json::json!(["snapshots/**"]));
    let s = json(&bg(&["status", "--json"], &b));
    assert_eq!(s["policy"]["protect"], serde_json::json!(["snapshots/**"]));

    // A lost policy file does not drop the shared globs: a daemon writes
    // the policy in force back.
    std::fs::remove_file(b.join(".baseguard/policy.json")).unwrap();
    let start = Instant::now();
    while !b.join(".baseguard/policy.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never written back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = json(&bg(&["policy", "--json"], &b));
    assert_eq!(p["policy"]["protect"], serde_json::json!(["snapshots/**"]));

    // The shared ignore narrows the shared protect: now C's *.tmp go.
    let o = bg(&["policy", "set", "--ignore", "snapshots/*.tmp"], &b);
    assert!(o.status.success());
    until_quarantined(&c, &b, "snapshots", "y#.tmp", false);
    // Less protection is never silent: the command and every daemon say it.
    let o = bg(&["policy", "set", "--clear-protect"], &b);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("PROTECTION REDUCED"),
        "{o:?}"
    );
    until_quarantined(&a, &b, "snapshots", "after", false);
    let start = Instant::now();
    while !log_of(&la).contains("PROTECTION REDUCED") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", log_of(&la));
        std::thread::sleep(Duration::from_millis(100));
    }
    // What each node protects on its own stays protected throughout.
    std::fs::write(a.path("_base/img"), b"img").unwrap();
    std::fs::remove_file(a.path("_base/img")).unwrap();
    assert!(paths(&b).contains(&"_base/img".to_string()));
    // A glob that cannot be one is refused as a usage error.
    let o = bg(&["policy", "set", "--protect", "/abs/**"], &b);
    assert_eq!(o.status.code(), Some(64));
    drop(c);
    drop(a);
}
