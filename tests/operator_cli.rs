//! Issue 13, "a CLI that never misleads": every command through real mounts,
//! pointed at the right and the wrong places, as root and as another user.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::nova::{bg, nfs_scratch, out};
use common::*;
use serde_json::Value;

const SHA: &str = "7b4783508212f5d242cbf9ff56fb8d33b4ce6166";
const UUID: &str = "6f1c2a8e-3b9d-4c4e-9a52-0c1d2e3f4a5b";

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn json(o: &Output) -> Value {
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", out(o), err(o)));
    assert!(v.is_object(), "not an object: {v}");
    assert_eq!(v["version"], 1, "{v}");
    v
}

/// Quarantine `name` (under `_base/`) with `data` through the mount.
fn stash(m: &Mount, name: &OsStr, data: &[u8]) {
    let p = m.mountpoint.join("_base").join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::remove_file(&p).unwrap();
}

/// A raw base image (made as Nova makes one: .part, then renamed) and an
/// instance disk whose backing chain names it through the mount.
fn base_and_disk(m: &Mount) -> PathBuf {
    let base = m.path(&format!("_base/{SHA}"));
    let part = base.with_extension("part");
    std::fs::write(&part, vec![7u8; 65536]).unwrap();
    std::fs::rename(&part, &base).unwrap();
    std::fs::create_dir(m.path(UUID)).unwrap();
    let o = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(m.path(&format!("{UUID}/disk"))));
    assert!(o.status.success(), "{}", err(&o));
    base
}

#[test]
fn list_into_a_closed_pipe_ends_quietly() {
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &[]);
    for i in 0..300 {
        stash(&m, OsStr::new(&format!("f{i:04}")), b"x");
    }
    let script = format!(
        "'{}' list --dir '{}' | head -2 >/dev/null; echo ${{PIPESTATUS[0]}}",
        BIN,
        m.mountpoint.display()
    );
    let o = run(Command::new("bash")
        .args(["-c", &script])
        .env_remove("RUST_LOG"));
    let status: i32 = out(&o).trim().parse().unwrap();
    assert!(
        !err(&o).contains("panicked") && !err(&o).contains("Broken pipe"),
        "{}",
        err(&o)
    );
    // Quiet: ended by SIGPIPE as ls is (141), never a panic (101).
    assert!(status == 0 || status == 141, "exit {status}: {}", err(&o));
}

#[test]
fn a_plain_directory_is_not_called_empty_or_healthy() {
    let (_t, b) = nfs_scratch();
    let plain = tempfile::tempdir().unwrap();
    for cmd in [&["list"][..], &["check"], &["status"], &["list", "--json"]] {
        let o = bg(cmd, plain.path());
        assert_eq!(code(&o), 3, "{cmd:?}: {}{}", out(&o), err(&o));
        assert!(
            err(&o).contains("is not a baseguard mount or backing directory"),
            "{cmd:?}: {}",
            err(&o)
        );
        assert!(!out(&o).contains("empty") && !out(&o).contains("every link present"));
    }
    // A real backing directory with a --quarantine that is not there.
    let m = Mount::new(&b, &[]);
    let o = bg(&["list", "--quarantine", "/nonexistent"], &b);
    assert_eq!(code(&o), 3, "{}{}", out(&o), err(&o));
    assert!(
        err(&o).contains("no quarantine at '/nonexistent'"),
        "{}",
        err(&o)
    );
    let o = bg(&["check", "--quarantine", "/nonexistent"], &m.mountpoint);
    assert_eq!(code(&o), 3, "{}{}", out(&o), err(&o));
}

#[test]
fn another_user_is_told_root_is_needed_never_lost() {
    if !have("qemu-img") {
        eprintln!("skipped: qemu-img missing");
        return;
    }
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &["--no-heal"]);
    base_and_disk(&m);
    std::fs::remove_file(m.path(&format!("_base/{SHA}"))).unwrap();
    // As root: restorable (1), not lost.
    let o = bg(&["check"], &b);
    assert_eq!(code(&o), 1, "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("QUARANTINED, restorable"), "{}", out(&o));
    for cmd in ["check", "list", "status"] {
        let o = as_nobody(&format!("'{BIN}' {cmd} --dir '{}'", b.display()));
        assert_eq!(code(&o), 3, "{cmd}: {}{}", out(&o), err(&o));
        assert!(!out(&o).contains("lost"), "{cmd}: {}", out(&o));
        assert!(!err(&o).contains("<backing>"), "{cmd}: {}", err(&o));
        assert!(
            err(&o).contains("run the command as root"),
            "{cmd}: {}",
            err(&o)
        );
        assert!(err(&o).contains(&b.display().to_string()), "{}", err(&o));
    }
    // A real loss is 2.
    let rec = json(&bg(&["list", "--json"], &b));
    let id = rec["entries"][0]["id"].as_str().unwrap().to_string();
    let o = bg(&["purge", &id, "--yes", "--force"], &b);
    assert_eq!(code(&o), 0, "{}{}", out(&o), err(&o));
    let o = bg(&["check"], &b);
    assert_eq!(code(&o), 2, "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("MISSING (lost)"));
}

#[test]
fn an_unwritable_log_file_fails_the_mount_in_one_sentence() {
    let (t, b) = nfs_scratch();
    let mp = t.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let o = run(Command::new(BIN)
        .args(["mount", "-o", "log_file=/nonexistent/dir/log"])
        .arg(&b)
        .arg(&mp));
    let mounted = is_mounted(&mp);
    if mounted {
        let _ = Command::new("umount").arg(&mp).status();
    }
    assert!(!mounted, "mounted with a log file nobody can write");
    assert_ne!(code(&o), 0);
    let e = err(&o);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(
        e.contains("log file /nonexistent/dir/log cannot be written"),
        "{e}"
    );
}

#[test]
fn names_are_quoted_like_ls_and_odd_bytes_restore_by_path() {
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &[]);
    let evil = "evil\n20990101-000000-fake-1  fake-path \u{1b}[31mred";
    stash(&m, OsStr::new(evil), b"evil");
    let odd = OsStr::from_bytes(b"odd-\xff-name");
    stash(&m, odd, b"odd bytes");
    let o = bg(&["list"], &m.mountpoint);
    assert_eq!(code(&o), 0, "{}", err(&o));
    let s = out(&o);
    assert!(!s.contains('\u{1b}'), "terminal escape printed raw: {s:?}");
    assert!(!s.contains("\n20990101"), "fake row: {s}");
    assert!(s.contains(r"$'\n'") && s.contains(r"$'\033'"), "{s}");
    assert!(s.contains(r"$'\377'"), "{s}");
    // JSON keeps the exact name.
    let v = json(&bg(&["list", "--json"], &m.mountpoint));
    let names: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&format!("_base/{evil}").as_str()),
        "{names:?}"
    );
    // Restore the non-UTF-8 name by its path.
    let mut p = std::ffi::OsString::from("_base/");
    p.push(odd);
    let o = bg(&[OsStr::new("restore"), &p], &m.mountpoint);
    assert_eq!(code(&o), 0, "{}{}", out(&o), err(&o));
    assert_eq!(std::fs::read(m.mountpoint.join(&p)).unwrap(), b"odd bytes");
    // show prints the command line and names on one line each.
    let id = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"].as_str().unwrap().contains("evil"))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = bg(&["show", &id], &m.mountpoint);
    assert!(!out(&o).contains('\u{1b}'), "{}", out(&o));
}

#[test]
fn numbers_neither_wrap_nor_lie() {
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &[]);
    stash(&m, OsStr::new("one"), &vec![1u8; 100_000]);
    // Two hard links to one file, both deleted: one file held.
    let two = m.path("_base/two");
    std::fs::write(&two, vec![2u8; 200_000]).unwrap();
    std::fs::hard_link(&two, m.path("_base/two-link")).unwrap();
    std::fs::remove_file(&two).unwrap();
    std::fs::remove_file(m.path("_base/two-link")).unwrap();
    let v = json(&bg(
        &["list", "--json", "--retain", "18446744073709551615s"],
        &b,
    ));
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3, "{v}");
    for e in entries {
        let at = e["quarantined_at"].as_u64().unwrap();
        let exp = e["expires_at"].as_u64().unwrap();
        assert!(exp >= at, "expires_at {exp} before quarantined_at {at}");
        assert!(e["quarantined_at_rfc3339"].as_str().unwrap().ends_with('Z'));
    }
    // A corrupt record size does not make the quarantine 8192 PiB.
    let id = entries.iter().find(|e| e["path"] == "_base/one").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rec = b.join(format!(".baseguard/entries/{id}.json"));
    let mut r: Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    r["size"] = Value::from(1u64 << 63);
    std::fs::write(&rec, serde_json::to_vec(&r).unwrap()).unwrap();
    let o = bg(&["status"], &b);
    assert!(!out(&o).contains("PiB"), "{}", out(&o));
    let s = json(&bg(&["status", "--json"], &b));
    assert_eq!(s["bytes"], 300_000, "{s}");
    assert!(s["allocated_bytes"].as_u64().unwrap() >= 300_000, "{s}");
    let l = out(&bg(&["list"], &b));
    assert!(!l.contains("PiB"), "{l}");
    assert!(l.contains("3 entries, 293.0 KiB held"), "{l}");
    drop(m);
}

#[test]
fn every_json_output_is_a_versioned_object() {
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &[]);
    stash(&m, OsStr::new("j"), b"json");
    let v = json(&bg(&["list", "--json"], &b));
    let id = v["entries"][0]["id"].as_str().unwrap().to_string();
    json(&bg(&["list", "--json", "--all"], &b));
    json(&bg(&["status", "--json"], &b));
    json(&bg(&["check", "--json"], &b));
    let s = json(&bg(&["show", "--json", &id], &b));
    // show has every key list has, and more.
    for k in v["entries"][0].as_object().unwrap().keys() {
        if k != "age_secs" {
            assert_eq!(s["entry"][k], v["entries"][0][k], "{k}");
        }
    }
    assert!(s["entry"]["referenced_by"].is_array());
    assert!(s["entry"]["next_step"].is_string());
    json(&bg(
        &["purge", "--older-than", "1h", "--dry-run", "--json"],
        &b,
    ));
}

#[test]
fn show_takes_a_unique_prefix_and_says_what_next() {
    if !have("qemu-img") {
        eprintln!("skipped: qemu-img missing");
        return;
    }
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &["--no-heal"]);
    base_and_disk(&m);
    std::fs::remove_file(m.path(&format!("_base/{SHA}"))).unwrap();
    let v = json(&bg(&["list", "--json"], &b));
    let id = v["entries"][0]["id"].as_str().unwrap().to_string();
    let o = bg(&["show", &id[..id.len() - 1]], &b);
    assert_eq!(code(&o), 0, "{}{}", out(&o), err(&o));
    let s = out(&o);
    assert!(s.contains(&format!("id:             {id}")), "{s}");
    assert!(s.contains("expires:"), "{s}");
    assert!(s.contains(&format!("{UUID}/disk")), "{s}");
    assert!(s.contains(&format!("baseguard restore {id}")), "{s}");
    // status: a near miss is attention (1).
    let o = bg(&["status"], &b);
    assert_eq!(code(&o), 1, "{}", out(&o));
    assert!(out(&o).contains("NEAR MISS"));
    // A prefix of nothing, and an ambiguous one, are refused.
    stash(&m, OsStr::new("other"), b"o");
    let o = bg(&["show", "2"], &b);
    assert_eq!(code(&o), 1, "{}{}", out(&o), err(&o));
    assert!(err(&o).contains("several entry ids"), "{}", err(&o));
}

#[test]
fn purge_dry_run_equals_the_real_run() {
    if !have("qemu-img") {
        eprintln!("skipped: qemu-img missing");
        return;
    }
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &["--no-heal"]);
    base_and_disk(&m);
    std::fs::remove_file(m.path(&format!("_base/{SHA}"))).unwrap();
    stash(&m, OsStr::new("unused-1"), b"1");
    stash(&m, OsStr::new("unused-2"), b"22");
    std::thread::sleep(Duration::from_millis(1100));
    let args = ["purge", "--older-than", "1s", "--json"];
    let dry = bg(&[&args[..], &["--dry-run"]].concat(), &b);
    assert_eq!(code(&dry), 0, "{}", err(&dry));
    let real = bg(&[&args[..], &["--yes"]].concat(), &b);
    assert_eq!(code(&real), 0, "{}", err(&real));
    assert_eq!(out(&dry), out(&real));
    let v = json(&real);
    assert_eq!(v["purged"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["kept"].as_array().unwrap().len(), 1, "{v}");
    assert!(
        v["kept"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("referenced by")
    );
    // The preview without --yes names the same plan and exits 1.
    stash(&m, OsStr::new("unused-3"), b"333");
    std::thread::sleep(Duration::from_millis(1100));
    let o = bg(&["purge", "--older-than", "1s"], &b);
    assert_eq!(code(&o), 1);
    assert!(err(&o).contains("would delete 1 entry"), "{}", err(&o));
    assert!(err(&o).contains("kept"), "{}", err(&o));
}

#[test]
fn usage_errors_are_not_mistaken_for_a_loss() {
    let (_t, b) = nfs_scratch();
    let _m = Mount::new(&b, &[]);
    let o = bg(&["list", "--retain", "14"], &b);
    assert_eq!(code(&o), 64, "{}", err(&o));
    let o = bg(&["list", "--help"], &b);
    assert_eq!(code(&o), 0);
    assert!(out(&o).contains("Exit status"), "{}", out(&o));
}
