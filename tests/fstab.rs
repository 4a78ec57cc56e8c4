//! Deployment through mount(8): an fstab line with `fuse.baseguard`, the
//! `mount.fuse.baseguard` helper, detaching with start-up errors reported.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// The repository's helper. mount(8) looks for a `fuse.baseguard` helper only in /sbin (and
/// /sbin/fs.d, /sbin/fs), with no way to point it elsewhere, so [`mount`] runs mount(8) in a
/// private mount namespace in which a directory holding this helper is bind-mounted over
/// /sbin: the tests run this repository's helper, never one installed on the machine, and
/// put nothing into /sbin that another user's mount(8) could see.
const HELPER_SRC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/mount-helpers/mount.fuse.baseguard"
);

/// Run by unshare(1) in the new mount namespace (which starts with the same propagation
/// as the test's): the mount holding /sbin turns private, so the bind over /sbin stays in
/// this namespace, while the test's directory stays a shared mount (see [`SharedDir`]), so
/// the FUSE mount that mount(8) makes there shows up in the test's namespace too.
const IN_NAMESPACE: &str = r#"set -e
mount --make-private "$(findmnt -n -o TARGET --target /sbin/)"
mount --bind "$SBIN" /sbin/
exec mount "$@""#;

/// The test's directory bind-mounted on itself as a shared mount with a peer group of its
/// own, so that mounts made under it in [`mount`]'s namespace propagate back; unmounted
/// when dropped.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(dir: &Path) -> SharedDir {
        for args in [&["--bind"][..], &["--make-private"], &["--make-shared"]] {
            let mut c = Command::new("mount");
            c.args(args).arg(dir);
            if args == ["--bind"] {
                c.arg(dir);
            }
            let out = run(&mut c);
            assert!(
                out.status.success(),
                "mount {args:?} {}: {out:?}",
                dir.display()
            );
        }
        SharedDir(dir.to_path_buf())
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.0).status();
        if !matches!(st, Ok(s) if s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Unmounts a path when dropped (tests must not leave mounts behind).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
}

/// mount(8) with `args`, in a mount namespace where /sbin holds only this repository's
/// helper (see [`HELPER_SRC`]); the mount point must be under a [`SharedDir`].
fn mount(args: &[&str]) -> Output {
    mount_with_config(args, "")
}

/// [`mount`] with `BASEGUARD_CONFIG` set to `config` (empty: no file, so
/// these tests never read /etc/baseguard).
fn mount_with_config(args: &[&str], config: &str) -> Output {
    let sbin = tempfile::tempdir().unwrap();
    std::fs::copy(HELPER_SRC, sbin.path().join("mount.fuse.baseguard")).unwrap();
    std::fs::set_permissions(sbin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    run(Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "unchanged",
            "sh",
            "-c",
            IN_NAMESPACE,
            "sh",
        ])
        .args(args)
        .env("SBIN", sbin.path())
        .env("BASEGUARD_BIN", BIN)
        .env("BASEGUARD_CONFIG", config)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
}

fn daemons_for(mp: &Path) -> usize {
    let out =
        run(Command::new("pgrep").args(["-f", &format!("baseguard mount.* {}", mp.display())]));
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn wait_no_daemon(mp: &Path) {
    let start = Instant::now();
    while daemons_for(mp) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "daemon left running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    // Unmounted before the directory is removed.
    _shared: SharedDir,
    _t: tempfile::TempDir,
    backing: PathBuf,
    mp: PathBuf,
    fstab: PathBuf,
}

fn setup(opts: &str) -> Setup {
    let t = tempfile::tempdir().unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let backing = t.path().join("nova nfs");
    let mp = t.path().join("instances");
    std::fs::create_dir_all(backing.join("_base")).unwrap();
    std::fs::create_dir(&mp).unwrap();
    let fstab = t.path().join("fstab");
    let esc = |p: &Path| p.display().to_string().replace(' ', "\\040");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\n{} {} fuse.baseguard {opts} 0 0\n",
            esc(&backing),
            esc(&mp)
        ),
    )
    .unwrap();
    Setup {
        _shared: SharedDir::new(t.path()),
        _t: t,
        backing,
        mp,
        fstab,
    }
}

#[test]
fn an_fstab_line_mounts_detached_and_umount_ends_it() {
    let s = setup("_netdev,x-systemd.requires-mounts-for=/srv,noatime,retain=2h,threads=4");
    let _u = Unmount(s.mp.clone());
    let out = mount(&["-T", s.fstab.to_str().unwrap(), s.mp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // mount(8) returned only once the filesystem answers.
    assert!(is_mounted(&s.mp));
    std::fs::write(s.mp.join("_base/abc"), "base").unwrap();
    assert_eq!(
        std::fs::read_to_string(s.backing.join("_base/abc")).unwrap(),
        "base"
    );
    std::fs::remove_file(s.mp.join("_base/abc")).unwrap();
    assert!(
        s.backing
            .join(".baseguard/entries")
            .read_dir()
            .unwrap()
            .count()
            >= 2
    );
    // Shown as fuse.baseguard with the backing directory as its source.
    let findmnt = run(Command::new("findmnt")
        .args(["-n", "-o", "SOURCE,FSTYPE,OPTIONS"])
        .arg(&s.mp));
    let line = String::from_utf8_lossy(&findmnt.stdout).to_string();
    assert!(line.contains(&s.backing.display().to_string()), "{line}");
    assert!(line.contains("fuse.baseguard"), "{line}");
    assert!(line.contains("noatime"), "{line}");
    let df = run(Command::new("df").arg("--output=source,target").arg(&s.mp));
    assert!(String::from_utf8_lossy(&df.stdout).contains(&s.backing.display().to_string()));
    // One supervisor (owns the connection) and one serving process.
    assert_eq!(daemons_for(&s.mp), 2);
    let st = Command::new("umount").arg(&s.mp).status().unwrap();
    assert!(st.success());
    assert!(!is_mounted(&s.mp));
    wait_no_daemon(&s.mp);
}

#[test]
fn mount_all_from_an_fstab() {
    let s = setup("retain=1d");
    let _u = Unmount(s.mp.clone());
    let out = mount(&[
        "-a",
        "-T",
        s.fstab.to_str().unwrap(),
        "-t",
        "fuse.baseguard",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&s.mp));
    assert!(s.mp.join("_base").is_dir());
    assert!(
        Command::new("umount")
            .arg(&s.mp)
            .status()
            .unwrap()
            .success()
    );
    wait_no_daemon(&s.mp);
}

fn mount_fails(s: &Setup, expect: &str) {
    let _u = Unmount(s.mp.clone());
    let out = mount(&["-T", s.fstab.to_str().unwrap(), s.mp.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "mount should fail");
    assert!(err.contains(expect), "expected {expect:?} in: {err}");
    assert!(!is_mounted(&s.mp), "nothing may stay mounted");
    wait_no_daemon(&s.mp);
}

#[test]
fn bad_options_and_bad_directories_fail_the_mount_with_the_daemons_message() {
    mount_fails(&setup("retain=5x"), "retain=5x");
    mount_fails(&setup("frobnicate"), "frobnicate");
    mount_fails(&setup("threads=abc"), "threads=abc");
    let s = setup("retain=1d");
    std::fs::remove_dir_all(&s.backing).unwrap();
    mount_fails(&s, "backing directory");
    // /dev/shm is tmpfs: another filesystem than the backing directory.
    let q = format!("/dev/shm/bg-test-q-{}", std::process::id());
    mount_fails(&setup(&format!("quarantine={q}")), "different filesystem");
    let created = Path::new(&q).exists();
    let _ = std::fs::remove_dir_all(&q);
    assert!(
        !created,
        "no quarantine directory may be made on the wrong filesystem"
    );
}

#[test]
fn remount_read_only_and_back_through_the_helper() {
    let s = setup("retain=1d");
    let _u = Unmount(s.mp.clone());
    let out = mount(&["-T", s.fstab.to_str().unwrap(), s.mp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mp = s.mp.to_str().unwrap();
    let daemons = daemons_for(&s.mp);
    let out = mount(&["-o", "remount,ro", mp]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = std::fs::write(s.mp.join("_base/ro"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let out = mount(&["-o", "remount,rw", mp]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(s.mp.join("_base/rw"), "x").unwrap();
    assert_eq!(daemons_for(&s.mp), daemons, "a remount starts no daemon");
}

#[test]
fn the_node_configuration_reaches_an_fstab_mount_and_a_bad_one_fails_it() {
    let s = setup("retain=1d");
    let cfg = s.fstab.with_file_name("baseguard.toml");
    // A bad key: mount(8) fails with the daemon's sentence naming the line.
    std::fs::write(&cfg, "[mount]\nthreads = 2\nthreds = 3\n").unwrap();
    {
        let _u = Unmount(s.mp.clone());
        let out = mount_with_config(
            &["-T", s.fstab.to_str().unwrap(), s.mp.to_str().unwrap()],
            cfg.to_str().unwrap(),
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "mounted with a bad configuration file"
        );
        assert!(
            err.contains(&format!("{}, line 3, key `mount.threds`", cfg.display())),
            "{err}"
        );
        assert!(!is_mounted(&s.mp));
        wait_no_daemon(&s.mp);
    }
    // A good one gives the defaults the fstab line does not.
    std::fs::write(&cfg, "[mount]\nthreads = 2\nretain = \"2h\"\n").unwrap();
    let _u = Unmount(s.mp.clone());
    let out = mount_with_config(
        &["-T", s.fstab.to_str().unwrap(), s.mp.to_str().unwrap()],
        cfg.to_str().unwrap(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    let opts = loop {
        let o = run(Command::new(BIN)
            .args(["status", "--json", "--dir"])
            .arg(&s.mp)
            .env("BASEGUARD_CONFIG", ""));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let m = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountpoint"] == s.mp.to_str().unwrap())
            .cloned();
        if let Some(o) = m.and_then(|m| m["options"].as_array().cloned()) {
            break o;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // The fstab line's retain=1d wins over the file's 2h; threads come from the file.
    assert!(opts.iter().any(|o| o == "threads=2"), "{opts:?}");
    assert!(opts.iter().any(|o| o == "retain=1d"), "{opts:?}");
    let st = Command::new("umount").arg(&s.mp).status().unwrap();
    assert!(st.success());
    wait_no_daemon(&s.mp);
}
