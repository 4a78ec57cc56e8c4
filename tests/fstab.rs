//! Deployment through mount(8): an fstab line with `fuse.baseguard`, the
//! `mount.fuse.baseguard` helper, detaching with start-up errors reported.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const HELPER: &str = "/sbin/mount.fuse.baseguard";

/// Puts the repository's helper where mount(8) looks for it, for the test's
/// duration (unless one is installed already), and takes it away after.
/// The tests of this file run one at a time (they share the helper).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Helper {
    installed_here: bool,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Helper {
    fn install() -> Helper {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        if Path::new(HELPER).exists() {
            return Helper {
                installed_here: false,
                _serial: serial,
            };
        }
        let src = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/mount-helpers/mount.fuse.baseguard"
        );
        std::os::unix::fs::symlink(src, HELPER).expect("install the mount helper in /sbin");
        Helper {
            installed_here: true,
            _serial: serial,
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.installed_here {
            let _ = std::fs::remove_file(HELPER);
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

fn mount(args: &[&str]) -> Output {
    run(Command::new("mount")
        .args(args)
        .env("BASEGUARD_BIN", BIN)
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
        _t: t,
        backing,
        mp,
        fstab,
    }
}

#[test]
fn an_fstab_line_mounts_detached_and_umount_ends_it() {
    let _h = Helper::install();
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
    let _h = Helper::install();
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
    let _h = Helper::install();
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
