//! Issue 13: the audit trail, metrics, and logs that reach someone, through
//! real mounts.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::nova::{bg, nfs_scratch, out};
use common::*;
use serde_json::Value;

fn json(o: &Output) -> Value {
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", out(o), String::from_utf8_lossy(&o.stderr)));
    assert_eq!(v["version"], 1);
    v
}

fn stash(m: &Mount, name: &str, data: &[u8]) {
    std::fs::write(m.path(name), data).unwrap();
    std::fs::remove_file(m.path(name)).unwrap();
}

fn ids(dir: &Path) -> Vec<(String, String)> {
    json(&bg(&["list", "--json"], dir))["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn restores_and_purges_leave_an_audit_trail() {
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &[]);
    stash(&m, "_base/a", b"a");
    stash(&m, "_base/b", b"bb");
    let l = ids(&b);
    let id_of = |p: &str| l.iter().find(|(x, _)| x == p).unwrap().1.clone();
    let o = bg(&["restore", &id_of("_base/a"), "--to", "_base/a.back"], &b);
    assert!(o.status.success(), "{o:?}");
    let o = bg(&["purge", &id_of("_base/b"), "--yes"], &b);
    assert!(o.status.success(), "{o:?}");
    let h = json(&bg(&["list", "--history", "--json"], &b));
    let ev = h["history"].as_array().unwrap();
    assert_eq!(ev.len(), 2, "{h}");
    assert_eq!(ev[0]["action"], "restored");
    assert_eq!(ev[0]["id"], id_of("_base/a").as_str());
    assert_eq!(ev[0]["dest"], "_base/a.back");
    assert_eq!(ev[0]["who"]["uid"], 0);
    assert!(ev[0]["at_rfc3339"].as_str().unwrap().ends_with('Z'));
    assert_eq!(ev[1]["action"], "purged");
    assert_eq!(ev[1]["path"], "_base/b");
    let t = out(&bg(&["list", "--history"], &b));
    assert!(
        t.contains("WHEN") && t.contains("restored") && t.contains("purged"),
        "{t}"
    );
    assert!(t.contains("_base/a -> _base/a.back"), "{t}");
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_in_prometheus_text_format() {
    let (t, b) = nfs_scratch();
    let prom = t.path().join("baseguard.prom");
    let m = Mount::new(&b, &["-o", &format!("metrics_file={}", prom.display())]);
    stash(&m, "_base/x", &[1u8; 5000]);
    stash(&m, "_base/y", b"y");
    let id = ids(&b).into_iter().find(|(p, _)| p == "_base/y").unwrap().1;
    assert!(bg(&["purge", &id, "--yes"], &b).status.success());
    let mp = m.mountpoint.display().to_string();
    // The daemon publishes its own counters every 2 s.
    let mine = format!("baseguard_daemon_quarantined_total{{mountpoint=\"{mp}\"}} 2");
    let start = Instant::now();
    let s = loop {
        let o = bg(&["metrics"], &m.mountpoint);
        assert!(o.status.success(), "{o:?}");
        let s = out(&o);
        if s.contains(&mine) || start.elapsed() > Duration::from_secs(10) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for name in [
        "baseguard_up",
        "baseguard_quarantine_entries",
        "baseguard_quarantine_bytes",
        "baseguard_quarantined_total",
        "baseguard_restored_total",
        "baseguard_healed_total",
        "baseguard_purged_total",
        "baseguard_near_misses",
        "baseguard_errors_total",
    ] {
        assert!(s.contains(&format!("# HELP {name} ")), "{name}: {s}");
        assert!(s.contains(&format!("# TYPE {name} ")), "{name}: {s}");
    }
    assert!(
        s.contains(&format!(
            "baseguard_up{{mountpoint=\"{mp}\",backing=\"{}\"}} 1",
            b.display()
        )),
        "{s}"
    );
    assert_eq!(
        metric(&s, "baseguard_quarantine_entries "),
        Some(1.0),
        "{s}"
    );
    assert_eq!(
        metric(&s, "baseguard_quarantine_bytes "),
        Some(5000.0),
        "{s}"
    );
    assert_eq!(metric(&s, "baseguard_purged_total "), Some(1.0), "{s}");
    assert_eq!(metric(&s, "baseguard_quarantined_total "), Some(2.0), "{s}");
    assert_eq!(metric(&s, "baseguard_near_misses "), Some(0.0), "{s}");
    assert!(s.contains(&mine), "{s}");
    // The daemon writes the textfile for node_exporter.
    let start = Instant::now();
    while !prom.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no metrics file");
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = std::fs::read_to_string(&prom).unwrap();
    assert!(f.contains("# TYPE baseguard_up gauge"), "{f}");
}

#[test]
fn a_detached_daemon_without_dev_log_logs_where_status_says() {
    let (t, b) = nfs_scratch();
    let mp = t.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let fallback = t.path().join("fallback.log");
    let o = run(Command::new(BIN)
        .args(["mount", "-o", "log_level=info"])
        .arg(&b)
        .arg(&mp)
        .env_remove("RUST_LOG")
        .env("BASEGUARD_SYSLOG_SOCKET", t.path().join("no-dev-log"))
        .env("BASEGUARD_JOURNAL_SOCKET", t.path().join("no-journal"))
        .env("BASEGUARD_FALLBACK_LOG", &fallback));
    assert!(o.status.success(), "{o:?}");
    let _guard = Detached { mp: mp.clone() };
    std::fs::write(mp.join("_base/img"), b"img").unwrap();
    std::fs::remove_file(mp.join("_base/img")).unwrap();
    // status names the destination (the run file is written at start).
    let start = Instant::now();
    let log = loop {
        let s = json(&bg(&["status", "--json"], &mp));
        let m = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountpoint"] == mp.to_str().unwrap())
            .cloned()
            .unwrap();
        if let Some(l) = m["log"].as_str() {
            // The options in effect are visible too.
            let opts = m["options"].as_array().unwrap();
            assert!(opts.iter().any(|o| o == "log_level=info"), "{m}");
            assert!(opts.iter().any(|o| o == "heal=on"), "{m}");
            break l.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(log, fallback.display().to_string());
    let text = std::fs::read_to_string(&fallback).unwrap();
    assert!(
        text.contains("quarantined") && text.contains("_base/img"),
        "{text}"
    );
}

#[test]
fn log_level_from_fstab_options() {
    let (t, b) = nfs_scratch();
    let log = t.path().join("warn.log");
    let m = Mount::new(
        &b,
        &["-o", &format!("log_level=warn,log_file={}", log.display())],
    );
    stash(&m, "_base/quiet", b"q");
    drop(m);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("quarantined"), "{text}");
    let (t2, b2) = nfs_scratch();
    let mp = t2.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let o = run(Command::new(BIN)
        .args(["mount", "-o", "log_level=loud"])
        .arg(&b2)
        .arg(&mp));
    let _guard = Detached { mp: mp.clone() };
    assert!(!o.status.success());
    assert!(!is_mounted(&mp));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("log_level=loud"),
        "{o:?}"
    );
}
