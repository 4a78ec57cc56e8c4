//! The crash harness: two nodes (two mounts of one backing directory) write
//! versions of protected files the way Nova does, delete, truncate and
//! overwrite them, and restore and purge with the CLI, while their daemons
//! and CLI processes are killed with SIGKILL at random moments. Afterwards
//! every version whose rename returned success is at a name under `_base/`
//! or in the quarantine, byte for byte, with its extended attribute, unless
//! a purge removed it on purpose; and `list` shows every held file.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const WORKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/crash_worker.py");

/// Every file's content under the given directories (non-recursive), each
/// with the `user.bg` values of the files holding it.
fn contents(dirs: &[&Path]) -> BTreeMap<String, BTreeSet<String>> {
    let script = r#"
import json, os, sys
out = {}
for d in sys.argv[1:]:
    for n in os.listdir(d):
        p = os.path.join(d, n)
        if not os.path.isfile(p) or os.path.islink(p):
            continue
        with open(p, "rb") as f:
            c = f.read().decode(errors="replace")
        try:
            x = os.getxattr(p, "user.bg").decode()
        except OSError:
            x = ""
        out.setdefault(c, []).append(x)
print(json.dumps(out))
"#;
    let o = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args(dirs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn kills_at_random_moments_lose_no_version() {
    let t = tempfile::tempdir().unwrap();
    let bk = t.path().join("bk");
    fs::create_dir_all(bk.join("_base")).unwrap();
    let mut written: BTreeSet<String> = BTreeSet::new();
    let mut optional: BTreeSet<String> = BTreeSet::new();
    let rounds = 8;
    for round in 0..rounds {
        let a = Mount::new(&bk, &[]);
        let b = Mount::new(&bk, &[]);
        let spawn = |m: &Mount, tag: &str| {
            Command::new("/usr/bin/python3")
                .arg(WORKER)
                .arg(&m.mountpoint)
                .arg(&bk)
                .arg(format!("{tag}{round}"))
                .arg("2.5")
                .arg(BIN)
                .arg(format!("{}", round * 2 + tag.len()))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let wa = spawn(&a, "A");
        let wb = spawn(&b, "Bb");
        // Kill one node's daemon at a moment that moves from round to round.
        std::thread::sleep(Duration::from_millis(300 + (round as u64 * 277) % 1900));
        if round % 2 == 0 {
            a.crash()
        } else {
            b.crash()
        }
        for w in [wa, wb] {
            let o = w.wait_with_output().unwrap();
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                match line.split_once(' ') {
                    Some(("V", v)) => {
                        written.insert(v.to_string());
                    }
                    Some(("PURGED" | "MAYBE", v)) => {
                        optional.insert(v.to_string());
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(written.len() > 50, "the workload ran: {}", written.len());

    // Everything at a name under _base/ and everything in the quarantine.
    let entries = bk.join(".baseguard/entries");
    let found = contents(&[&bk.join("_base"), &entries]);
    let mut lost = Vec::new();
    let mut bad_xattr = Vec::new();
    for v in &written {
        match found.get(v) {
            Some(x) => {
                if !x.contains(&v[..v.len().min(200)]) {
                    bad_xattr.push(v[..v.len().min(40)].to_string());
                }
            }
            None if optional.contains(v) => {}
            None => lost.push(v[..v.len().min(40)].to_string()),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} versions lost: {:?}",
        lost.len(),
        written.len(),
        &lost[..lost.len().min(8)]
    );
    assert!(bad_xattr.is_empty(), "xattrs lost: {bad_xattr:?}");

    // `list` shows every held file (held, or claimed by a killed restore).
    let o = Command::new(BIN)
        .args(["list", "--all", "--json", "--dir"])
        .arg(&bk)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&o.stdout).into_owned();
    for e in fs::read_dir(&entries).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        if let Some(id) = name.strip_suffix(".data") {
            assert!(listed.contains(id), "{id} is held but not listed");
        }
    }
}
