//! pjdfstest (the Rust port, crates.io 0.2.x) through fresh baseguard
//! mounts: zero failures, run after run. `.ci/run` installs it and names it
//! in `BG_PJDFSTEST`; `BG_PJDFSTEST_RUNS` sets the number of fresh-mount
//! runs (default 20). Without `BG_PJDFSTEST` the test says it did not run.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/pjdfstest/pjdfstest.toml"
);

#[test]
fn pjdfstest_passes_in_fresh_mounts() {
    let Some(bin) = std::env::var_os("BG_PJDFSTEST") else {
        eprintln!(
            "pjdfstest_passes_in_fresh_mounts: NOT RUN: set BG_PJDFSTEST to a pjdfstest 0.2.x \
             binary (`cargo install pjdfstest --version 0.2.2 --root DIR`; .ci/run does)"
        );
        return;
    };
    assert!(
        Path::new(&bin).is_file(),
        "BG_PJDFSTEST={} is not a file",
        Path::new(&bin).display()
    );
    let runs: usize = std::env::var("BG_PJDFSTEST_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    for run in 0..runs {
        let backing = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            backing.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let m = Mount::new(backing.path(), &[]);
        std::fs::set_permissions(
            m.mountpoint.parent().unwrap(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let o = Command::new(&bin)
            .arg("-c")
            .arg(CONFIG)
            // From inside the mount, as the reproduction does.
            .arg("-p")
            .arg("/proc/self/cwd")
            .current_dir(&m.mountpoint)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let failed: Vec<&str> = out.lines().filter(|l| l.contains("FAILED")).collect();
        let summary = out
            .lines()
            .find(|l| l.starts_with("Summary:"))
            .unwrap_or("no summary");
        assert!(
            o.status.success() && failed.is_empty(),
            "run {run}: {summary}\n{}\n{}",
            failed.join("\n"),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(summary.contains(" 0 failed"), "run {run}: {summary}");
        drop(m);
    }
}
