//! The `_base`-only layout: baseguard laid over Nova's `_base` alone (over
//! itself), instance disks in the parent directory, never through FUSE.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nova::*;
use common::*;

const SHA: &str = "7b4783508212f5d242cbf9ff56fb8d33b4ce6166";
const OTHER: &str = "0000000000000000000000000000000000000000";
const UUID: &str = "6f1c2a8e-3b9d-4c4e-9a52-0c1d2e3f4a5b";

/// What Nova's image cache manager sees in `_base`.
fn nova_listdir(path: &Path) -> Vec<String> {
    let out = ok(Command::new("python3")
        .args([
            "-c",
            "import os, sys; print('\\n'.join(sorted(os.listdir(sys.argv[1]))))",
        ])
        .arg(path));
    out.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn bg(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = run(Command::new(BIN).args(args).arg("--dir").arg(dir));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn listed(dir: &Path) -> Vec<String> {
    let (code, list, err) = bg(&["list", "--json"], dir);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let mut p: Vec<String> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    p.sort();
    p
}

fn fs_type(p: &Path) -> String {
    ok(Command::new("stat").args(["-f", "-c", "%T"]).arg(p))
        .trim()
        .to_string()
}

/// A private bind mount: another compute node's view of the shared
/// instances directory. Detached on drop.
struct View(PathBuf);

impl View {
    fn of(shared: &Path, at: &Path) -> View {
        std::fs::create_dir_all(at).unwrap();
        ok(Command::new("mount").arg("--bind").arg(shared).arg(at));
        let v = View(at.to_path_buf());
        ok(Command::new("mount").arg("--make-private").arg(at));
        v
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn the_seed_incident_with_two_nodes_over_their_own_base_heals_itself() {
    let t = scratch();
    let shared = t.path().join("nfs");
    std::fs::create_dir_all(shared.join("_base")).unwrap();
    // Node B sees the shared directory at its own path; each node lays
    // baseguard over its own `_base`, over itself.
    let node_b = View::of(&shared, &t.path().join("node-b"));
    let b_base = node_b.0.join("_base");
    let a_base = shared.join("_base");
    let b = Mount::at(&b_base, &b_base, &[]);
    let a = Mount::at(&a_base, &a_base, &[]);

    // Node B downloads the image and boots an instance on it.
    make_base(&b_base.join(SHA), "0x42");
    make_base(&b_base.join(OTHER), "0x11");
    std::fs::create_dir(node_b.0.join(UUID)).unwrap();
    let disk = node_b.0.join(UUID).join("disk");
    overlay(b_base.join(SHA), "raw", &disk);
    // Instance disks are on the backing filesystem, not FUSE.
    assert!(!fs_type(&disk).contains("fuse"), "{}", fs_type(&disk));
    assert!(fs_type(&b_base.join(SHA)).contains("fuse"));
    // Nova's download temporaries are let through.
    std::fs::write(a_base.join(format!("{SHA}.part")), "tmp").unwrap();
    nova_remove(&a_base.join(format!("{SHA}.part")));

    // Node A's image cache manager deletes both images.
    let seen = nova_listdir(&a_base);
    assert_eq!(seen, vec![OTHER.to_string(), SHA.to_string()]);
    nova_remove(&a_base.join(SHA));
    nova_remove(&a_base.join(OTHER));
    assert_eq!(listed(&a_base), vec![OTHER.to_string(), SHA.to_string()]);
    // The quarantine (in _base itself) is hidden from what Nova lists.
    assert!(
        nova_listdir(&b_base).is_empty(),
        "{:?}",
        nova_listdir(&b_base)
    );

    // Node B's kernel caches names for 1 s, as NFS caches attributes.
    std::thread::sleep(Duration::from_millis(1200));
    // qemu on node B opens the instance disk: the base file comes back.
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-t", "none", "-c", "read -P 0x42 0 1M"])
        .arg(&disk));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(b.stats()["healed"].as_u64().unwrap() >= 1);
    assert_eq!(listed(&b_base), vec![OTHER.to_string()]);
    assert_eq!(nova_listdir(&a_base), vec![SHA.to_string()]);
    // The unreferenced one stays deleted, on both nodes.
    for base in [&a_base, &b_base] {
        for _ in 0..3 {
            let e = std::fs::metadata(base.join(OTHER)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        }
    }
    // The CLI takes the _base mountpoint or the instances directory.
    assert_eq!(listed(&node_b.0), vec![OTHER.to_string()]);
    let (code, out, err) = bg(&["check"], &b_base);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every link present"), "{out}");
    let (code, out, err) = bg(&["status", "--json"], &node_b.0);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["alive"], true, "{out}");
    assert_eq!(v["referenced_base_files"], 1, "{out}");
    drop(a);
    drop(b);
}

#[test]
fn check_expiry_and_status_work_over_base_alone() {
    let t = scratch();
    let instances = t.path().join("instances");
    let base = instances.join("_base");
    std::fs::create_dir_all(&base).unwrap();
    let m = Mount::at(&base, &base, &["--retain", "2s", "--no-heal"]);
    make_base(&base.join(SHA), "0x42");
    // base (raw) <- resized copy (qcow2, relative name) <- instance disk.
    overlay(Path::new(SHA), "raw", &base.join(format!("{SHA}_10")));
    std::fs::write(base.join("unreferenced"), "u").unwrap();
    std::fs::create_dir(instances.join(UUID)).unwrap();
    overlay(
        base.join(format!("{SHA}_10")),
        "qcow2",
        &instances.join(UUID).join("disk"),
    );
    let (code, out, err) = bg(&["check"], &instances);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every link present"), "{out}");

    nova_remove(&base.join(SHA));
    nova_remove(&base.join("unreferenced"));
    let (code, out, _) = bg(&["check"], &base);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("QUARANTINED, restorable"), "{out}");
    // Past the retention: the unreferenced file is purged, the one the
    // chain needs is kept.
    let start = Instant::now();
    while listed(&base).len() > 1 {
        assert!(start.elapsed() < Duration::from_secs(15), "nothing purged");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(listed(&base), vec![SHA.to_string()]);
    // A near miss asks for attention (exit 1).
    let (code, out, _) = bg(&["status"], &base);
    assert_eq!(code, 1);
    assert!(out.starts_with(&format!("NEAR MISS:   {SHA}")), "{out}");
    // Both levels quarantined: check --restore brings the chain back.
    nova_remove(&base.join(format!("{SHA}_10")));
    // restore takes the path relative to the instances directory too.
    let (code, out, err) = bg(&["restore", &format!("_base/{SHA}_10")], &instances);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(listed(&base), vec![SHA.to_string()]);
    // check --restore brings the chain back, and qemu reads it.
    let (code, out, err) = bg(&["check", "--restore"], &base);
    assert_eq!(code, 0, "{out}{err}");
    assert!(listed(&base).is_empty());
    std::thread::sleep(Duration::from_millis(1200));
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x42 0 1M"])
        .arg(instances.join(UUID).join("disk")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    std::fs::write(base.join("late"), "l").unwrap();
    nova_remove(&base.join("late"));
    drop(m);
    // Unmounted (a node without the daemon): the instances directory still
    // finds the quarantine in _base.
    assert_eq!(listed(&instances), vec!["late".to_string()]);
    let (code, out, err) = bg(&["check"], &instances);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn the_mount_helper_passes_instances_and_mounts_base_alone() {
    let t = scratch();
    let instances = t.path().join("instances");
    let base = t.path().join("cache");
    std::fs::create_dir_all(&instances).unwrap();
    std::fs::create_dir_all(&base).unwrap();
    let helper = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/mount-helpers/mount.fuse.baseguard"
    );
    let out = run(Command::new("sh")
        .arg(helper)
        .arg(&base)
        .arg(&base)
        .arg("-o")
        .arg(format!("_netdev,instances={}", instances.display()))
        .env("BASEGUARD_BIN", BIN));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if is_mounted(&self.0) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
    }
    let _u = Unmount(base.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not named _base, but instances= says so: everything is protected.
    std::fs::write(base.join("anything"), "x").unwrap();
    std::fs::remove_file(base.join("anything")).unwrap();
    std::fs::write(base.join("y.part"), "x").unwrap();
    std::fs::remove_file(base.join("y.part")).unwrap();
    let (code, out, err) = bg(
        &["list", "--json", "--instances", instances.to_str().unwrap()],
        &base,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"anything\""), "{out}");
    assert!(!out.contains("y.part"), "{out}");
}

#[test]
fn the_shipped_examples_cover_the_base_layout() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/mount-helpers");
    let fstab = std::fs::read_to_string(format!("{dir}/fstab.example")).unwrap();
    let line = fstab
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 6 && f[2] == "fuse.baseguard")
        .expect("a commented _base-only line");
    assert_eq!(line[0], "/var/lib/nova/instances/_base");
    assert_eq!(line[1], line[0]);
    baseguard::mountopts::FstabOptions::parse(line[3]).unwrap();
    for unit in ["nova-compute", "libvirtd"] {
        let text =
            std::fs::read_to_string(format!("{dir}/systemd/{unit}.service.d/baseguard.conf"))
                .unwrap();
        assert!(
            text.contains("\nRequiresMountsFor=/var/lib/nova/instances/_base\n"),
            "{unit}"
        );
    }
}

#[test]
fn a_dead_daemon_over_base_leaves_instance_disks_alone() {
    use std::os::unix::fs::FileExt;
    let t = scratch();
    let instances = t.path().join("instances");
    let base = instances.join("_base");
    std::fs::create_dir_all(&base).unwrap();
    let mut m = Mount::at(&base, &base, &[]);
    make_base(&base.join(SHA), "0x42");
    std::fs::create_dir(instances.join(UUID)).unwrap();
    let disk = instances.join(UUID).join("disk");
    overlay(base.join(SHA), "raw", &disk);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    // A running VM: qemu-io holding the disk (and through it the base
    // image, opened through the mount) with O_DIRECT.
    let mut vm = Command::new("qemu-io")
        .args(["-f", "qcow2", "-t", "none"])
        .arg(&disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = vm.stdin.take().unwrap();
    use std::io::Write;
    writeln!(stdin, "read -P 0x42 0 64k").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    m.kill9();
    for cmd in [
        "read -P 0x42 64k 512k",
        "write -P 0x55 4M 64k",
        "flush",
        "read -P 0x55 4M 64k",
        "quit",
    ] {
        writeln!(stdin, "{cmd}").unwrap();
    }
    drop(stdin);
    let out = vm.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("failed") && !text.contains("error") && !text.contains("Error"),
        "{text}"
    );
    assert_eq!(text.matches("read ").count(), 3, "{text}");
    // The instance disk is not on the mount: a running VM keeps working.
    f.metadata().unwrap();
    f.write_at(b"x", 1 << 20).unwrap();
    f.sync_all().unwrap();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    // Base images are unreachable until the mount is replaced.
    let e = std::fs::metadata(base.join(SHA)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    let (code, _, err) = bg(&["status"], &instances);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "the baseguard daemon for {} is not running",
            base.display()
        )),
        "{err}"
    );
    let out =
        run(Command::new(BIN).args(["mount", base.to_str().unwrap(), base.to_str().unwrap()]));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            if is_mounted(&self.0) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
    }
    let _u = Unmount(base.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x42 0 1M"])
        .arg(&disk));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    drop(f);
}

#[test]
fn the_reference_index_reads_base_from_its_own_descriptor() {
    use baseguard::heal::{BaseLayout, References};
    use baseguard::refs::{LinkState, RefIndex};
    use std::os::fd::AsFd;
    let t = scratch();
    let instances = t.path().join("instances");
    // `instances/_base` stands for the mountpoint (empty here); the images
    // are reached through another path, as the daemon reaches them through
    // its backing descriptor.
    std::fs::create_dir_all(instances.join("_base")).unwrap();
    let real = t.path().join("real-base");
    std::fs::create_dir_all(&real).unwrap();
    std::fs::write(real.join(SHA), vec![0u8; 4096]).unwrap();
    std::fs::create_dir(instances.join(UUID)).unwrap();
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(format!("/var/lib/nova/instances/_base/{SHA}"))
        .arg(instances.join(UUID).join("disk"))
        .arg("1G"));

    let mut plain = RefIndex::new(vec![]);
    let s = plain.scan(&instances).unwrap();
    assert_eq!(s.disks[0].chain[0].state, LinkState::Missing);
    let mut mapped = RefIndex::new(vec![]);
    mapped.map_dir(PathBuf::from("_base"), real.clone());
    let s = mapped.scan(&instances).unwrap();
    assert_eq!(s.disks[0].chain[0].state, LinkState::Present);
    assert_eq!(
        s.disks[0].chain[0].path,
        PathBuf::from(format!("_base/{SHA}"))
    );

    // The daemon's view: paths relative to the guarded `_base`.
    let fd = std::fs::File::open(&real).unwrap();
    let layout = BaseLayout::detect(&real, Some(&instances)).unwrap();
    assert!(layout.is_some());
    let refs = References::for_layout(fd.as_fd(), layout, vec![]);
    assert_eq!(
        refs.disks_using(Path::new(SHA)),
        vec![PathBuf::from(format!("{UUID}/disk"))]
    );
    assert!(refs.referenced().contains(Path::new(SHA)));
    assert!(refs.keep_reason(Path::new(SHA)).is_some());
    // A directory not named _base, without --instances: the usual layout.
    assert!(BaseLayout::detect(&real, None).unwrap().is_none());
}

#[test]
fn expiry_keeps_the_base_of_a_quarantined_overlay() {
    // A stopped instance on a resized copy: Nova removes the copy and the
    // original; the chain stops at the quarantined copy, whose own header
    // still needs the original.
    let t = scratch();
    let instances = t.path().join("instances");
    let base = instances.join("_base");
    std::fs::create_dir_all(&base).unwrap();
    let m = Mount::at(&base, &base, &["--retain", "1s", "--no-heal"]);
    make_base(&base.join(SHA), "0x42");
    overlay(Path::new(SHA), "raw", &base.join(format!("{SHA}_10")));
    std::fs::create_dir(instances.join(UUID)).unwrap();
    overlay(
        base.join(format!("{SHA}_10")),
        "qcow2",
        &instances.join(UUID).join("disk"),
    );
    std::fs::write(base.join("unreferenced"), "u").unwrap();
    nova_remove(&base.join(format!("{SHA}_10")));
    nova_remove(&base.join(SHA));
    nova_remove(&base.join("unreferenced"));
    let start = Instant::now();
    while listed(&base).len() > 2 {
        assert!(start.elapsed() < Duration::from_secs(15), "nothing purged");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Several sweeps later, both links of the chain are still there.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(listed(&base), vec![SHA.to_string(), format!("{SHA}_10")]);
    // A manual purge keeps them too.
    let (_, _, err) = bg(&["purge", "--expired", "--retain", "1s", "--yes"], &base);
    assert_eq!(
        listed(&base),
        vec![SHA.to_string(), format!("{SHA}_10")],
        "{err}"
    );
    let (code, out, err) = bg(&["check", "--restore"], &instances);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(1200));
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x42 0 1M"])
        .arg(instances.join(UUID).join("disk")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    drop(m);
}

#[test]
fn restore_on_access_brings_back_a_two_level_chain_at_once() {
    let t = scratch();
    let instances = t.path().join("instances");
    let base = instances.join("_base");
    std::fs::create_dir_all(&base).unwrap();
    let m = Mount::at(&base, &base, &[]);
    make_base(&base.join(SHA), "0x42");
    overlay(Path::new(SHA), "raw", &base.join(format!("{SHA}_10")));
    std::fs::create_dir(instances.join(UUID)).unwrap();
    overlay(
        base.join(format!("{SHA}_10")),
        "qcow2",
        &instances.join(UUID).join("disk"),
    );
    nova_remove(&base.join(format!("{SHA}_10")));
    nova_remove(&base.join(SHA));
    std::thread::sleep(Duration::from_millis(1200));
    let out = ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x42 0 1M"])
        .arg(instances.join(UUID).join("disk")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(listed(&base).is_empty());
    assert!(m.stats()["healed"].as_u64().unwrap() >= 2);
}
