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
