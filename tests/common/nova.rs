//! What the tests do the way Nova (and an operator) would: scratch
//! directories, base images made as `.part` and renamed in, qcow2 overlays,
//! deletions from Python.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{BIN, run};

/// A temporary directory every user may enter (the tests also run as 65534).
pub fn scratch() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A scratch directory (as [`scratch`]) with `nfs/_base` in it: the backing
/// directory the operator tests mount, laid out as Nova's.
pub fn nfs_scratch() -> (tempfile::TempDir, PathBuf) {
    let d = scratch();
    let b = d.path().join("nfs");
    std::fs::create_dir_all(b.join("_base")).unwrap();
    (d, b)
}

/// Run `cmd`, insist it succeeds, return its standard output.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A raw base image with `pattern` in its first MiB, made the way Nova makes
/// one: written as `<name>.part`, then renamed into place (writing into a
/// protected file in place would, by design, keep a copy of what it
/// overwrites).
pub fn make_base(path: &Path, pattern: &str) {
    let part = path.with_extension("part");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&part)
        .arg("16M"));
    ok(Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 1M")])
        .arg(&part));
    std::fs::rename(&part, path).unwrap();
}

/// A qcow2 overlay of `base` (format `fmt`), made as `.part` and renamed in,
/// as Nova does in `_base`.
pub fn overlay(base: impl AsRef<OsStr>, fmt: &str, disk: &Path) {
    let part = disk.with_extension("part");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
        .arg(base)
        .arg(&part));
    std::fs::rename(&part, disk).unwrap();
}

/// Delete the way Nova's image cache manager does: `os.remove` from Python.
pub fn nova_remove(path: &Path) {
    ok(Command::new("python3")
        .args(["-c", "import os, sys; os.remove(sys.argv[1])"])
        .arg(path));
}

/// A `baseguard` command pointed at `dir` (`--dir`), without the test's log
/// settings.
pub fn bg<S: AsRef<OsStr>>(args: &[S], dir: &Path) -> Output {
    run(Command::new(BIN)
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env_remove("RUST_LOG"))
}

/// A command's standard output as text.
pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
