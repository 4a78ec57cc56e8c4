//! Integration tests for fstab option parsing and its translation to `baseguard mount` flags.

use std::path::PathBuf;
use std::time::Duration;

use baseguard::mountopts::{FstabOptions, parse_duration};

fn args(s: &str) -> Vec<String> {
    FstabOptions::parse(s).unwrap().to_mount_args()
}

fn error(s: &str) -> String {
    FstabOptions::parse(s).unwrap_err().to_string()
}

#[test]
fn recommended_fstab_line_translates() {
    let o = FstabOptions::parse(
        "_netdev,x-systemd.requires-mounts-for=/srv/nova-nfs,nofail,allow_other,noatime,\
         retain=14d,quarantine=/srv/nova-nfs/.baseguard-quarantine,protect=_base/*,\
         protect=snapshots/*,ignore=locks/*,threads=8,log_file=/var/log/baseguard.log",
    )
    .unwrap();
    assert_eq!(o.retain, Some(Duration::from_secs(14 * 86_400)));
    assert_eq!(
        o.quarantine,
        Some(PathBuf::from("/srv/nova-nfs/.baseguard-quarantine"))
    );
    assert_eq!(o.protect, ["_base/*", "snapshots/*"]);
    assert_eq!(o.ignore, ["locks/*"]);
    assert_eq!(o.threads, Some(8));
    assert!(o.allow_other);
    assert_eq!(o.kernel, ["noatime"]);
    assert_eq!(
        o.dropped,
        [
            "_netdev",
            "x-systemd.requires-mounts-for=/srv/nova-nfs",
            "nofail"
        ]
    );
    assert_eq!(
        o.to_mount_args(),
        [
            "--threads=8",
            "--allow-other",
            "--retain=2w",
            "--quarantine=/srv/nova-nfs/.baseguard-quarantine",
            "--protect=_base/*",
            "--protect=snapshots/*",
            "--ignore=locks/*",
            "--log-file=/var/log/baseguard.log",
            "-o",
            "noatime",
        ]
    );
}

#[test]
fn every_mapped_key() {
    assert_eq!(args("heal=off"), ["--no-heal"]);
    assert_eq!(args("heal=on"), Vec::<String>::new());
    assert_eq!(args("passthrough=off"), ["--no-passthrough"]);
    assert_eq!(args("passthrough=no,passthrough=yes"), Vec::<String>::new());
    assert_eq!(args("transport=uring"), ["--transport=uring"]);
    assert_eq!(args("transport=uring,transport=dev"), ["--transport=dev"]);
    assert_eq!(args("transport=auto"), ["--transport=auto"]);
    assert!(error("transport=rdma").contains("`transport=rdma`"));
    assert!(error("transport").contains("needs a value"));
    assert_eq!(args("log-file=/l"), ["--log-file=/l"]);
    assert_eq!(args("stats_file=/s"), ["--stats-file=/s"]);
    assert_eq!(args("stats-file=/s"), ["--stats-file=/s"]);
    assert_eq!(args("ro"), ["--ro"]);
    assert_eq!(args("rw"), Vec::<String>::new());
    assert_eq!(args("retain=90m"), ["--retain=90m"]);
    assert_eq!(args("retain=30s,retain=12h"), ["--retain=12h"]);
    assert_eq!(
        args("nosuid,nodev,noexec,dirsync,sync,nodiratime,relatime,default_permissions"),
        [
            "-o",
            "nosuid,nodev,noexec,dirsync,sync,nodiratime,relatime,default_permissions"
        ]
    );
}

#[test]
fn helper_only_options_are_dropped() {
    let o = FstabOptions::parse(
        "defaults,auto,noauto,_netdev,nofail,user,user=nova,nouser,users,owner,group,\
         x-systemd.automount,x-systemd.mount-timeout=90,X-mount.mkdir,comment=systemd.automount,\
         loop,offset=0,sizelimit=1,shared,rprivate",
    )
    .unwrap();
    assert_eq!(
        o,
        FstabOptions {
            dropped: o.dropped.clone(),
            ..Default::default()
        }
    );
    assert_eq!(o.dropped.len(), 20);
    assert!(o.to_mount_args().is_empty());
}

#[test]
fn globs_keep_colons_spaces_and_leading_dashes() {
    let o = FstabOptions::parse("protect=a:b/*,protect=with space/*,ignore=-tmp*").unwrap();
    assert_eq!(o.protect, ["a:b/*", "with space/*"]);
    assert_eq!(
        o.to_mount_args(),
        [
            "--protect=a:b/*",
            "--protect=with space/*",
            "--ignore=-tmp*"
        ]
    );
}

#[test]
fn empty_items_are_skipped() {
    assert_eq!(FstabOptions::parse("").unwrap(), FstabOptions::default());
    assert_eq!(args(",noatime,,"), ["-o", "noatime"]);
}

#[test]
fn kernel_args_parse_back_to_the_same_options() {
    let o = FstabOptions::parse("noexec,allow_other,atime,noatime,nodev").unwrap();
    let a = o.to_mount_args();
    let dash_o = a.iter().position(|x| x == "-o").unwrap();
    let again = FstabOptions::parse(&a[dash_o + 1]).unwrap();
    assert_eq!(again.kernel, o.kernel);
}

#[test]
fn errors_are_one_sentence_naming_the_option() {
    let cases = [
        ("threads=abc", "`threads=abc`"),
        ("threads=0", "`threads=0`"),
        ("threads=100000", "`threads=100000`"),
        ("retain=5x", "`retain=5x`"),
        ("retain=14", "`retain=14`"),
        ("heal=maybe", "`heal=maybe`"),
        ("passthrough=2", "`passthrough=2`"),
        ("frobnicate", "`frobnicate`"),
        ("noatime=1", "`noatime=1`"),
        ("allow_other=yes", "`allow_other=yes`"),
        ("retain", "`retain`"),
        ("quarantine=", "`quarantine=`"),
        ("protect=", "`protect=`"),
        ("fsname=x", "`fsname=x`"),
    ];
    for (input, named) in cases {
        let msg = error(&format!("noatime,{input},nosuid"));
        assert!(msg.contains(named), "{input}: {msg}");
        assert!(msg.ends_with('.'), "{input}: {msg}");
        assert_eq!(msg.matches(". ").count(), 0, "{input}: one sentence: {msg}");
        assert!(!msg.contains('\n'), "{input}: {msg}");
        let e = FstabOptions::parse(input).unwrap_err();
        assert_eq!(e.option, input);
    }
    assert!(error("heal=maybe").contains("`on` or `off`"));
    assert!(error("retain=5x").contains("unknown unit `x`"));
    assert!(error("threads=abc").contains("1 to 1024"));
    assert!(error("frobnicate").starts_with("Unknown mount option"));
}

#[test]
fn parse_duration_is_public() {
    assert_eq!(parse_duration("14d"), Ok(Duration::from_secs(1_209_600)));
    assert!(parse_duration("5x").is_err());
}

// ---- mount-helpers/mount.fuse.baseguard, driven with a stand-in `baseguard` ----

mod helper {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    use baseguard::mountopts::FstabOptions;

    fn helper_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers/mount.fuse.baseguard")
    }

    /// A fake `baseguard` that records its arguments one per line in `$ARGS_OUT` and
    /// exits with `$FAKE_RC` (default 0).
    fn fake_baseguard(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(
            &p,
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > \"$ARGS_OUT\"\nexit \"${FAKE_RC:-0}\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Runs the helper with `BASEGUARD_BIN=bin`, or with no `BASEGUARD_BIN`, an empty
    /// PATH and no fallback directories, so that what is installed on this machine
    /// (`/usr/local/bin/baseguard`, `/usr/bin/baseguard`) never plays a part.
    fn run(helper: &Path, args: &[&str], bin: Option<&Path>, out: &Path, rc: i32) -> Output {
        run_with(helper, args, bin, "", out, rc)
    }

    fn run_with(
        helper: &Path,
        args: &[&str],
        bin: Option<&Path>,
        fallback_path: &str,
        out: &Path,
        rc: i32,
    ) -> Output {
        let mut c = Command::new("/bin/sh");
        c.arg(helper)
            .args(args)
            .env("ARGS_OUT", out)
            .env("FAKE_RC", rc.to_string())
            .env("BASEGUARD_FALLBACK_PATH", fallback_path);
        match bin {
            Some(b) => c.env("BASEGUARD_BIN", b),
            None => c.env_remove("BASEGUARD_BIN").env("PATH", "/nonexistent"),
        };
        c.output().unwrap()
    }

    fn recorded(out: &Path) -> Vec<String> {
        std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn passes_mount8_argv_through_with_spaces() {
        let d = tempfile::tempdir().unwrap();
        let bin = fake_baseguard(d.path(), "fake");
        let out = d.path().join("args");
        let o = run(
            &helper_path(),
            &[
                "/srv/nova nfs",
                "/var/lib/nova/my instances",
                "-n",
                "-o",
                "rw,retain=14d,protect=_base/*,_netdev",
                "-t",
                "fuse.baseguard",
            ],
            Some(&bin),
            &out,
            0,
        );
        assert!(o.status.success(), "{o:?}");
        assert_eq!(
            recorded(&out),
            [
                "mount",
                "-o",
                "rw,retain=14d,protect=_base/*,_netdev",
                "--",
                "/srv/nova nfs",
                "/var/lib/nova/my instances"
            ]
        );
        // ...and what it passes on is something baseguard's parser accepts.
        FstabOptions::parse(&recorded(&out)[2]).unwrap();
    }

    #[test]
    fn combined_flags_attached_values_and_no_options() {
        let d = tempfile::tempdir().unwrap();
        let bin = fake_baseguard(d.path(), "fake");
        let out = d.path().join("args");
        let o = run(
            &helper_path(),
            &["-svo", "ro", "-onoatime", "a", "b"],
            Some(&bin),
            &out,
            0,
        );
        assert!(o.status.success(), "{o:?}");
        assert_eq!(
            recorded(&out),
            ["mount", "-o", "ro,noatime", "--", "a", "b"]
        );
        assert!(String::from_utf8_lossy(&o.stderr).contains("running:"));

        let o = run(&helper_path(), &["a", "-b"], Some(&bin), &out, 0);
        assert_eq!(o.status.code(), Some(1), "-b is not a flag mount(8) sends");
        let o = run(&helper_path(), &["--", "-a", "b"], Some(&bin), &out, 0);
        assert!(o.status.success(), "{o:?}");
        assert_eq!(recorded(&out), ["mount", "--", "-a", "b"]);
    }

    #[test]
    fn fake_mode_runs_nothing() {
        let d = tempfile::tempdir().unwrap();
        let bin = fake_baseguard(d.path(), "fake");
        let out = d.path().join("args");
        let o = run(
            &helper_path(),
            &["a", "b", "-f", "-o", "ro"],
            Some(&bin),
            &out,
            0,
        );
        assert!(o.status.success(), "{o:?}");
        assert!(!out.exists());
    }

    #[test]
    fn exit_statuses_follow_mount8() {
        let d = tempfile::tempdir().unwrap();
        let bin = fake_baseguard(d.path(), "fake");
        let out = d.path().join("args");
        assert_eq!(
            run(&helper_path(), &["a", "b"], Some(&bin), &out, 1)
                .status
                .code(),
            Some(32)
        );
        assert_eq!(
            run(&helper_path(), &["only-one"], Some(&bin), &out, 0)
                .status
                .code(),
            Some(1)
        );
        assert_eq!(
            run(&helper_path(), &["a", "b", "-o"], Some(&bin), &out, 0)
                .status
                .code(),
            Some(1)
        );
        let o = run(&helper_path(), &["a", "b"], None, &out, 0);
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("cannot find the baseguard binary"));
        // A BASEGUARD_BIN that is not there is "not found" (2), not a failed mount (32).
        let missing = d.path().join("no such baseguard");
        let o = run(&helper_path(), &["a", "b"], Some(&missing), &out, 0);
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("BASEGUARD_BIN="));
    }

    /// The last resort is the directories of BASEGUARD_FALLBACK_PATH (by default
    /// /usr/local/bin:/usr/bin), in order, skipping those without an executable baseguard.
    #[test]
    fn falls_back_to_the_fallback_directories_in_order() {
        let d = tempfile::tempdir().unwrap();
        let (empty, first, second) = (d.path().join("e"), d.path().join("1"), d.path().join("2"));
        for p in [&empty, &first, &second] {
            std::fs::create_dir(p).unwrap();
        }
        std::fs::write(empty.join("baseguard"), "not executable").unwrap();
        fake_baseguard(&first, "baseguard");
        std::fs::write(
            second.join("baseguard"),
            "#!/bin/sh\necho second > \"$ARGS_OUT\"\n",
        )
        .unwrap();
        std::fs::set_permissions(
            second.join("baseguard"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let out = d.path().join("args");
        let path = format!(
            "/nonexistent:{}:{}:{}",
            empty.display(),
            first.display(),
            second.display()
        );
        let o = run_with(&helper_path(), &["a", "b"], None, &path, &out, 0);
        assert!(o.status.success(), "{o:?}");
        assert_eq!(recorded(&out), ["mount", "--", "a", "b"]);
        std::fs::remove_file(first.join("baseguard")).unwrap();
        let o = run_with(&helper_path(), &["a", "b"], None, &path, &out, 0);
        assert!(o.status.success(), "{o:?}");
        assert_eq!(recorded(&out), ["second"]);
    }

    #[test]
    fn finds_baseguard_next_to_itself() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("dir with space");
        std::fs::create_dir(&dir).unwrap();
        let helper = dir.join("mount.fuse.baseguard");
        std::fs::copy(helper_path(), &helper).unwrap();
        fake_baseguard(&dir, "baseguard");
        let out = d.path().join("args");
        let o = run(&helper, &["a", "b"], None, &out, 0);
        assert!(o.status.success(), "{o:?}");
        assert_eq!(recorded(&out), ["mount", "--", "a", "b"]);
    }

    /// The real thing: util-linux mount(8) reading an fstab line runs the helper. Needs root
    /// and unshare(1); the helper is bind-mounted over /usr/sbin inside a private mount
    /// namespace, so nothing outside the test sees it. Skipped where that is not possible.
    #[test]
    fn real_mount8_runs_the_helper_from_fstab() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let sbin = root.join("sbin");
        std::fs::create_dir(&sbin).unwrap();
        std::fs::copy(helper_path(), sbin.join("mount.fuse.baseguard")).unwrap();
        let bin = fake_baseguard(root, "fake");
        let out = root.join("args");
        let mnt = root.join("mnt point");
        std::fs::create_dir(&mnt).unwrap();
        let fstab = root.join("fstab");
        std::fs::write(
            &fstab,
            format!(
                "/srv/nova\\040nfs {} fuse.baseguard _netdev,x-systemd.requires-mounts-for=/srv/nova-nfs,comment=x,allow_other,retain=14d,protect=_base/*,protect=snapshots/* 0 0\n",
                mnt.display().to_string().replace(' ', "\\040")
            ),
        )
        .unwrap();
        let script =
            r#"mount --make-rprivate / && mount --bind "$SBIN" /usr/sbin && exec mount "$MNT""#;
        let o = Command::new("unshare")
            .args(["-m", "sh", "-c", script])
            .env("SBIN", &sbin)
            .env("MNT", &mnt)
            .env("LIBMOUNT_FSTAB", &fstab)
            .env("BASEGUARD_BIN", &bin)
            .env("ARGS_OUT", &out)
            .output();
        let Ok(o) = o else {
            eprintln!("skipped: unshare(1) not available");
            return;
        };
        if !out.exists() {
            eprintln!("skipped: could not run mount(8) in a private namespace: {o:?}");
            return;
        }
        assert!(o.status.success(), "{o:?}");
        let args = recorded(&out);
        assert_eq!(args[0], "mount");
        assert_eq!(args[1], "-o");
        assert_eq!(
            &args[3..],
            ["--", "/srv/nova nfs", &mnt.display().to_string()]
        );
        let opts = FstabOptions::parse(&args[2]).unwrap();
        assert!(opts.allow_other);
        assert_eq!(opts.protect, ["_base/*", "snapshots/*"]);
        assert!(opts.dropped.contains(&"_netdev".to_string()), "{opts:?}");
    }
}

// ---- the shipped examples stay consistent with the parser ----

#[test]
fn fstab_example_baseguard_line_parses() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/mount-helpers/fstab.example"
    ))
    .unwrap();
    let fields: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"fuse.baseguard"))
        .expect("a fuse.baseguard line")
        .into_iter()
        .collect();
    assert_eq!(fields[0], "/srv/nova-nfs");
    assert_eq!(fields[1], "/var/lib/nova/instances");
    assert!(!fields[3].split(',').any(|o| o == "nofail"));
    let o = FstabOptions::parse(fields[3]).unwrap();
    assert_eq!(o.retain, Some(std::time::Duration::from_secs(14 * 86400)));
    assert!(o.kernel.is_empty());
    assert!(
        o.dropped
            .contains(&"x-systemd.requires-mounts-for=/srv/nova-nfs".to_string())
    );
}

#[test]
fn systemd_dropins_require_the_mount() {
    for unit in [
        "nova-compute",
        "openstack-nova-compute",
        "libvirtd",
        "virtqemud",
    ] {
        let text = std::fs::read_to_string(format!(
            "{}/mount-helpers/systemd/{unit}.service.d/baseguard.conf",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        assert!(text.contains("\n[Unit]\n"), "{unit}");
        assert!(
            text.contains("\nRequiresMountsFor=/var/lib/nova/instances\n"),
            "{unit}"
        );
        assert!(
            text.contains("\nAfter=var-lib-nova-instances.mount remote-fs.target\n"),
            "{unit}"
        );
    }
}

/// CI runs exactly the README's test command, which reports every failing test binary
/// (`--no-fail-fast`), not only the first.
#[test]
fn ci_runs_the_readmes_test_command() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let cmd = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.trim_start().starts_with("cargo test"))
            .map(|l| l.split('#').next().unwrap().trim().to_string())
            .collect()
    };
    let ci = cmd(&ci);
    assert_eq!(ci.len(), 1, "{ci:?}");
    assert!(ci[0].contains("--no-fail-fast"), "{}", ci[0]);
    assert_eq!(
        cmd(&readme),
        ci,
        "the README's test command differs from .ci/run's"
    );
}
