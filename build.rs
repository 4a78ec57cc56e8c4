//! Records the commit the binary is built from, for `baseguard --version`.
//! (No rerun-if-changed: cargo then reruns this when any package file changes,
//! which is when the commit can have changed.)
fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=10", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown commit".into());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| o.status.success() && !o.stdout.is_empty());
    println!(
        "cargo:rustc-env=BASEGUARD_COMMIT={commit}{}",
        if dirty { ", modified" } else { "" }
    );
}
