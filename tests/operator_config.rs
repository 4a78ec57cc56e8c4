//! Issue 13: the node-local configuration file (read by the daemon and the
//! commands alike), JSON style, and the options in effect, through real
//! mounts. Every test names its own file with `--config` or
//! `BASEGUARD_CONFIG`: none reads /etc.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::nova::nfs_scratch;
use common::*;
use serde_json::Value;

/// The CLI with no configuration file at all unless `cfg` names one.
fn cli(args: &[&str], cfg: Option<&Path>) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("RUST_LOG")
        .env("BASEGUARD_CONFIG", "");
    if let Some(f) = cfg {
        c.env("BASEGUARD_CONFIG", f);
    }
    run(&mut c)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", out(o), err(o)));
    assert_eq!(v["version"], 1);
    v
}

/// The options `status --json` shows for the mount at `mp` (waits for the
/// daemon's first run file).
fn options_of(mp: &Path) -> Vec<String> {
    let start = Instant::now();
    loop {
        let s = json(&cli(
            &["status", "--json", "--dir", mp.to_str().unwrap()],
            None,
        ));
        if let Some(m) = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountpoint"] == mp.to_str().unwrap())
            && let Some(o) = m["options"].as_array()
        {
            return o.iter().map(|v| v.as_str().unwrap().to_string()).collect();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn has(opts: &[String], o: &str) -> bool {
    opts.iter().any(|x| x == o)
}

#[test]
fn the_config_file_gives_defaults_and_options_win() {
    let (t, b) = nfs_scratch();
    let prom = t.path().join("node.prom");
    let log = t.path().join("from-config.log");
    let mp = t.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cfg = t.path().join("baseguard.toml");
    std::fs::write(
        &cfg,
        format!(
            "# node defaults\n[mount]\nthreads = 3\nheal = false\nlog_level = \"warn\"\n\
             log_file = \"{}\"\nmetrics_file = \"{}\"\n\n[commands]\ndir = \"{}\"\n",
            log.display(),
            prom.display(),
            mp.display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let m = Mount::at(&b, &mp, &["--config", c]);
    let opts = options_of(&mp);
    for o in ["threads=3", "heal=off", "log_level=warn", "passthrough=on"] {
        assert!(has(&opts, o), "{o} missing from {opts:?}");
    }
    assert!(has(&opts, &format!("config={c}")), "{opts:?}");
    assert!(has(&opts, &format!("metrics_file={}", prom.display())));
    // The file's metrics_file and log_file are used.
    let start = Instant::now();
    while !prom.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no metrics file");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(log.exists(), "the configured log file was not opened");
    // The commands take their --dir from the file (no --dir given).
    std::fs::write(m.path("_base/img"), b"img").unwrap();
    std::fs::remove_file(m.path("_base/img")).unwrap();
    let l = json(&cli(&["list", "--json"], Some(&cfg)));
    assert_eq!(l["entries"][0]["path"], "_base/img", "{l}");
    // ... and --config names the file as well as the environment does.
    let l = json(&cli(&["list", "--json", "--config", c], None));
    assert_eq!(l["entries"].as_array().unwrap().len(), 1, "{l}");
    drop(m);

    // A mount option wins over the file, a flag over both.
    let m = Mount::at(&b, &mp, &["--config", c, "-o", "threads=5,heal=on"]);
    let opts = options_of(&mp);
    assert!(has(&opts, "threads=5") && has(&opts, "heal=on"), "{opts:?}");
    drop(m);
    let m = Mount::at(
        &b,
        &mp,
        &["--config", c, "-o", "threads=5", "--threads", "7"],
    );
    let opts = options_of(&mp);
    assert!(has(&opts, "threads=7"), "{opts:?}");
    drop(m);
}

#[test]
fn a_bad_config_file_is_one_sentence_with_file_line_and_key() {
    let (t, b) = nfs_scratch();
    let mp = t.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let cfg = t.path().join("bad.toml");
    std::fs::write(&cfg, "[mount]\nthreads = 4\nretian = \"14d\"\n").unwrap();
    let c = cfg.to_str().unwrap();
    let o = cli(
        &[
            "mount",
            "--config",
            c,
            b.to_str().unwrap(),
            mp.to_str().unwrap(),
        ],
        None,
    );
    let _g = Detached { mp: mp.clone() };
    assert!(!is_mounted(&mp), "mounted with a bad configuration file");
    assert_eq!(o.status.code(), Some(1), "mount(8)'s failure: {}", err(&o));
    let e = err(&o);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(
        e.contains(&format!("{c}, line 3, key `mount.retian`: unknown key")),
        "{e}"
    );
    // The commands refuse it the same way (a usage error, 64).
    let o = cli(&["list", "--dir", b.to_str().unwrap()], Some(&cfg));
    assert_eq!(o.status.code(), Some(64), "{}", err(&o));
    assert!(
        err(&o).contains("line 3, key `mount.retian`"),
        "{}",
        err(&o)
    );
    // A bad value names its key and says what is wrong.
    std::fs::write(&cfg, "[commands]\ndir = \"relative/dir\"\n").unwrap();
    let o = cli(&["list"], Some(&cfg));
    assert_eq!(o.status.code(), Some(64));
    assert!(
        err(&o).contains("line 2, key `commands.dir`: `relative/dir` is not an absolute path"),
        "{}",
        err(&o)
    );
    std::fs::write(&cfg, "[mount]\nlog_level = \"loud\"\n").unwrap();
    let o = cli(
        &[
            "mount",
            "--config",
            c,
            b.to_str().unwrap(),
            mp.to_str().unwrap(),
        ],
        None,
    );
    assert!(!is_mounted(&mp));
    assert!(err(&o).contains("key `mount.log_level`"), "{}", err(&o));
    // A file named explicitly must exist; the default may be missing.
    let gone = t.path().join("gone.toml");
    for o in [
        cli(&["list", "--dir", b.to_str().unwrap()], Some(&gone)),
        cli(
            &[
                "list",
                "--config",
                gone.to_str().unwrap(),
                "--dir",
                b.to_str().unwrap(),
            ],
            None,
        ),
    ] {
        assert_eq!(o.status.code(), Some(64), "{}", err(&o));
        assert!(
            err(&o).contains(&format!(
                "cannot read the configuration file {}",
                gone.display()
            )),
            "{}",
            err(&o)
        );
    }
}

#[test]
fn node_local_files_must_be_absolute_and_other_paths_follow_the_backing_dir() {
    let (t, b) = nfs_scratch();
    let mp = t.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    for opt in [
        "log_file=rel.log",
        "metrics_file=rel.prom",
        "stats_file=rel.json",
    ] {
        let o = run(Command::new(BIN)
            .current_dir(t.path())
            .env("BASEGUARD_CONFIG", "")
            .args(["mount", "-o", opt])
            .arg(&b)
            .arg(&mp));
        let _g = Detached { mp: mp.clone() };
        assert!(!is_mounted(&mp), "{opt} mounted");
        assert_eq!(o.status.code(), Some(1));
        let e = err(&o);
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(e.contains("is not an absolute path"), "{opt}: {e}");
    }
    // The _base layout's instances= is relative to the backing directory
    // (here `..`), not to the working directory of `mount`.
    let inst = t.path().join("inst");
    let base = inst.join("_base");
    std::fs::create_dir_all(&base).unwrap();
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let o = run(Command::new(BIN)
        .current_dir(&elsewhere)
        .env("BASEGUARD_CONFIG", "")
        .args(["mount", "-o", "instances=.."])
        .arg(&base)
        .arg(&mp));
    let _g = Detached { mp: mp.clone() };
    assert!(o.status.success(), "{}", err(&o));
    let opts = options_of(&mp);
    assert!(
        has(&opts, &format!("instances={}/..", base.display())),
        "{opts:?}"
    );
}

/// Every key of `v` (and of the objects in it, one level down, and of
/// lists of objects) is named in the README's JSON section.
fn undocumented(v: &Value, what: &[&str]) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("### JSON").unwrap();
    let end = start + readme[start..].find("### Metrics").unwrap();
    let doc = &readme[start..end];
    let mut missing = Vec::new();
    let mut check = |o: &serde_json::Map<String, Value>| {
        for k in o.keys() {
            // Times have an `_rfc3339` twin, documented once for all.
            let base = k.strip_suffix("_rfc3339").unwrap_or(k);
            if !doc.contains(&format!("`{base}`")) {
                missing.push(k.clone());
            }
        }
    };
    let top = v.as_object().unwrap();
    check(top);
    for val in top.values() {
        match val {
            Value::Object(o) => check(o),
            Value::Array(a) => {
                for o in a.iter().filter_map(Value::as_object) {
                    check(o);
                }
            }
            _ => {}
        }
    }
    assert!(
        missing.is_empty(),
        "{what:?}: undocumented keys {missing:?}"
    );
}

#[test]
fn json_is_pretty_by_default_and_compact_on_request() {
    let (t, b) = nfs_scratch();
    let m = Mount::new(&b, &[]);
    std::fs::write(m.path("_base/img"), b"img").unwrap();
    std::fs::remove_file(m.path("_base/img")).unwrap();
    let d = m.mountpoint.to_str().unwrap();
    // Something in the history too (a restore).
    std::fs::write(m.path("_base/back"), b"back").unwrap();
    std::fs::remove_file(m.path("_base/back")).unwrap();
    assert!(
        cli(&["restore", "_base/back", "--dir", d], None)
            .status
            .success()
    );
    let lines = |o: &Output| out(o).trim_end().lines().count();
    for args in [
        vec!["list", "--json"],
        vec!["list", "--history", "--json"],
        vec!["status", "--json"],
        vec!["check", "--json"],
        vec!["policy", "--json"],
        vec!["show", "_base/img", "--json"],
        vec!["purge", "--expired", "--dry-run", "--json"],
        vec!["purge", "--older-than", "0s", "--dry-run", "--json"],
    ] {
        let mut a = args.clone();
        a.extend(["--dir", d]);
        let o = cli(&a, None);
        undocumented(&json(&o), &args);
        assert!(lines(&o) > 1, "{args:?} is not pretty: {}", out(&o));
        a.push("--compact");
        let o = cli(&a, None);
        let v = json(&o);
        assert_eq!(lines(&o), 1, "{args:?} --compact: {}", out(&o));
        assert!(out(&o).starts_with("{\"version\":1,"), "{}", out(&o));
        assert!(v.is_object());
    }
    // The node's configuration file may make compact the default.
    let cfg = t.path().join("c.toml");
    std::fs::write(&cfg, "[commands]\njson = \"compact\"\n").unwrap();
    let o = cli(&["list", "--json", "--dir", d], Some(&cfg));
    assert_eq!(lines(&o), 1, "{}", out(&o));
    // --compact means nothing without --json: a usage error.
    let o = cli(&["list", "--compact", "--dir", d], None);
    assert_eq!(o.status.code(), Some(64), "{}", err(&o));
}

/// The kernel's line for the mount at `mp` in /proc/self/mounts:
/// (source, type, options).
fn proc_mounts(mp: &Path) -> (String, String, Vec<String>) {
    let t = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let l = t
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(mp.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} not in /proc/self/mounts", mp.display()));
    let f: Vec<&str> = l.split(' ').collect();
    (
        f[0].to_string(),
        f[2].to_string(),
        f[3].split(',').map(str::to_string).collect(),
    )
}

#[test]
fn every_option_in_effect_is_shown_and_the_kernel_shows_its_own() {
    let (t, b) = nfs_scratch();
    let log = t.path().join("l.log");
    let prom = t.path().join("m.prom");
    let opts = format!(
        "retain=1d,min_free=5%,threads=3,heal=off,passthrough=off,quarantine=qq,\
         protect=_base/**,protect=snap/*,ignore=_base/*.part,log_level=info,\
         log_file={},metrics_file={},noatime,noexec,dirsync,ro",
        log.display(),
        prom.display()
    );
    let m = Mount::new(&b, &["-o", &opts]);
    let mp = m.mountpoint.clone();
    let shown = options_of(&mp);
    for o in [
        "retain=1d",
        "min_free=5%",
        "threads=3",
        "heal=off",
        "passthrough=off",
        &format!("quarantine={}/qq", b.display()),
        "protect=_base/**",
        "protect=snap/*",
        "ignore=_base/*.part",
        "log_level=info",
        &format!("log_file={}", log.display()),
        &format!("metrics_file={}", prom.display()),
        "ro",
        "allow_other",
        "noatime",
        "noexec",
        "dirsync",
    ] {
        assert!(has(&shown, o), "{o} missing from status: {shown:?}");
    }
    // The kernel shows its own flags and FUSE's parameters, and the
    // backing directory as the source (df, findmnt); baseguard's own
    // options it cannot show (FUSE refuses unknown mount parameters).
    let (source, fstype, kopts) = proc_mounts(&mp);
    assert_eq!(source, b.to_str().unwrap());
    assert_eq!(fstype, "fuse.baseguard");
    for o in [
        "ro",
        "noexec",
        "noatime",
        "dirsync",
        "allow_other",
        "nosuid",
        "nodev",
    ] {
        assert!(kopts.iter().any(|k| k == o), "{o} not in {kopts:?}");
    }
    drop(m);
}

#[test]
fn commands_on_a_mount_use_its_own_quarantine_without_repeating_it() {
    let (_t, b) = nfs_scratch();
    let m = Mount::new(&b, &["-o", "quarantine=elsewhere-q"]);
    std::fs::write(m.path("_base/img"), b"img").unwrap();
    std::fs::remove_file(m.path("_base/img")).unwrap();
    let d = m.mountpoint.to_str().unwrap();
    // The daemon's run file is written at start: wait for status to see it.
    options_of(&m.mountpoint);
    let l = json(&cli(&["list", "--json", "--dir", d], None));
    assert_eq!(l["entries"][0]["path"], "_base/img", "{l}");
    let s = json(&cli(&["status", "--json", "--dir", d], None));
    assert_eq!(
        s["quarantine"],
        b.join("elsewhere-q").to_str().unwrap(),
        "{s}"
    );
    let id = l["entries"][0]["id"].as_str().unwrap().to_string();
    let o = cli(&["restore", &id, "--dir", d], None);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(std::fs::read(m.path("_base/img")).unwrap(), b"img");
    // On the backing directory (no mount there), --quarantine is still needed.
    let o = cli(&["list", "--dir", b.to_str().unwrap()], None);
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
}

#[test]
fn a_mount_made_with_relative_paths_shows_its_options() {
    let (t, _b) = nfs_scratch();
    std::fs::create_dir(t.path().join("mnt")).unwrap();
    let mp = t.path().join("mnt");
    let o = run(Command::new(BIN)
        .current_dir(t.path())
        .env("BASEGUARD_CONFIG", "")
        .args(["mount", "-o", "threads=2", "nfs", "mnt"]));
    let _g = Detached { mp: mp.clone() };
    assert!(o.status.success(), "{}", err(&o));
    // The run file names the absolute mountpoint, so status finds it.
    let opts = options_of(&mp);
    assert!(has(&opts, "threads=2"), "{opts:?}");
}
