//! Integration tests for `qcow2` and `refs`: real qemu-img chains, crafted
//! loops, fuzzed headers and a 5,000-instance scale run.

use baseguard::qcow2::{self, Backing, HeaderError};
use baseguard::refs::{ChainEnd, DiskChain, LinkState, MAX_CHAIN_DEPTH, RefIndex, Scan};
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const U1: &str = "11111111-1111-4111-8111-111111111111";
const U2: &str = "22222222-2222-4222-8222-222222222222";
const U3: &str = "33333333-3333-4333-8333-333333333333";
const U4: &str = "44444444-4444-4444-8444-444444444444";
const U5: &str = "55555555-5555-4555-8555-555555555555";
const U6: &str = "66666666-6666-4666-8666-666666666666";
const U7_DEL: &str = "77777777-7777-4777-8777-777777777777_del";
const U8: &str = "88888888-8888-4888-8888-888888888888";
const U9_RESIZE: &str = "99999999-9999-4999-8999-999999999999_resize";
const OLD: &str = "instance-0000000a";
const SHA: &str = "_base/0123456789abcdef0123456789abcdef01234567";

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn p(root: &Path, rel: &str) -> String {
    root.join(rel).to_str().unwrap().to_owned()
}

/// qcow2 overlay at `rel` (under root) over `backing` (as written) of format
/// `fmt`, with extra qemu-img arguments (e.g. `-u`: backing need not exist).
fn overlay(root: &Path, rel: &str, backing: &str, fmt: &str, extra: &[&str]) {
    let path = p(root, rel);
    fs::create_dir_all(Path::new(&path).parent().unwrap()).unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing];
    args.extend_from_slice(extra);
    args.push(&path);
    args.push("1M");
    qemu_img(&args);
}

fn raw(root: &Path, rel: &str) {
    let path = p(root, rel);
    fs::create_dir_all(Path::new(&path).parent().unwrap()).unwrap();
    qemu_img(&["create", "-q", "-f", "raw", &path, "1M"]);
}

/// Replaces `from` by `to` (same length) in the file, i.e. edits the backing
/// name in the header bytes.
fn patch(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut b = fs::read(path).unwrap();
    let at = b
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("pattern in header");
    b[at..at + to.len()].copy_from_slice(to.as_bytes());
    fs::write(path, b).unwrap();
}

/// Builds the mixed fixture tree under `a` using absolute paths under `a`.
fn build_fixture(a: &Path) {
    let a_s = a.to_str().unwrap();
    raw(a, SHA);
    raw(a, "_base/ephemeral_1_0706d66");
    // A qcow2 image in _base over a raw one (relative, same directory).
    overlay(
        a,
        "_base/img.qcow2",
        "0123456789abcdef0123456789abcdef01234567",
        "raw",
        &[],
    );
    // v3, relative backing.
    overlay(a, &format!("{U1}/disk"), &format!("../{SHA}"), "raw", &[]);
    // v2, absolute backing.
    overlay(
        a,
        &format!("{U2}/disk"),
        &p(a, SHA),
        "raw",
        &["-o", "compat=0.10"],
    );
    // Two levels: disk -> _base/img.qcow2 -> _base/<sha>.
    overlay(
        a,
        &format!("{U3}/disk"),
        &p(a, "_base/img.qcow2"),
        "qcow2",
        &[],
    );
    // Raw disk; a qcow2 config drive (not a disk name) is ignored.
    raw(a, &format!("{U4}/disk"));
    overlay(
        a,
        &format!("{U4}/disk.config"),
        "../_base/ignored",
        "raw",
        &["-u"],
    );
    // Missing base.
    overlay(a, &format!("{U5}/disk"), "../_base/gone", "raw", &["-u"]);
    // External base.
    overlay(
        a,
        &format!("{U6}/disk"),
        "/images/external.raw",
        "raw",
        &["-u"],
    );
    // Being deleted: skipped.
    overlay(
        a,
        &format!("{U7_DEL}/disk"),
        "../_base/only_del",
        "raw",
        &["-u"],
    );
    // Loop through qemu-img -u: disk -> la -> lb -> la.
    overlay(a, &format!("{U8}/la"), "lb", "qcow2", &["-u"]);
    overlay(a, &format!("{U8}/lb"), "la", "qcow2", &["-u"]);
    overlay(a, &format!("{U8}/disk"), "la", "qcow2", &["-u"]);
    // Loop by editing header bytes: a rescue disk naming itself.
    overlay(
        a,
        &format!("{U9_RESIZE}/disk.rescue"),
        "XXXXXXXXXXX",
        "qcow2",
        &["-u"],
    );
    patch(
        &a.join(U9_RESIZE).join("disk.rescue"),
        "XXXXXXXXXXX",
        "disk.rescue",
    );
    // Old-style name, ephemeral disk (absolute).
    overlay(
        a,
        &format!("{OLD}/disk.local"),
        &p(a, "_base/ephemeral_1_0706d66"),
        "raw",
        &[],
    );
    // Live-snapshot delta over an instance disk, absolute and not under _base:
    // only resolvable through a known prefix.
    overlay(
        a,
        "snapshots/tmpabc/snap.delta",
        &format!("{a_s}/{U1}/disk"),
        "qcow2",
        &[],
    );
}

fn find<'a>(scan: &'a Scan, disk: &str) -> &'a DiskChain {
    scan.disks
        .iter()
        .find(|d| d.disk == Path::new(disk))
        .unwrap_or_else(|| panic!("{disk} not in scan: {scan:#?}"))
}

fn paths(d: &DiskChain) -> Vec<(String, LinkState)> {
    d.chain
        .iter()
        .map(|l| (l.path.to_str().unwrap().to_owned(), l.state))
        .collect()
}

fn pb(v: &[&str]) -> Vec<PathBuf> {
    v.iter().map(PathBuf::from).collect()
}

/// Checks a scan of the fixture; `prefix_known` tells whether the tree's
/// original mountpoint was passed as a known prefix.
fn check_fixture(scan: &Scan, idx: &RefIndex, prefix_known: bool) {
    use LinkState::*;
    let s = |x: &str| x.to_owned();
    let d = find(scan, &format!("{U1}/disk"));
    assert!(d.qcow2);
    assert_eq!(paths(d), vec![(s(SHA), Present)]);
    assert_eq!(d.chain[0].name, format!("../{SHA}"));
    assert_eq!(d.chain[0].format.as_deref(), Some("raw"));
    assert_eq!(d.end, ChainEnd::Complete);

    let d = find(scan, &format!("{U2}/disk"));
    assert_eq!(paths(d), vec![(s(SHA), Present)]);
    assert!(d.chain[0].name.starts_with('/'));

    let d = find(scan, &format!("{U3}/disk"));
    assert_eq!(
        paths(d),
        vec![(s("_base/img.qcow2"), Present), (s(SHA), Present)]
    );
    assert_eq!(d.end, ChainEnd::Complete);

    let d = find(scan, &format!("{U4}/disk"));
    assert!(!d.qcow2);
    assert!(d.chain.is_empty());
    assert_eq!(d.end, ChainEnd::Complete);

    let d = find(scan, &format!("{U5}/disk"));
    assert_eq!(paths(d), vec![(s("_base/gone"), Missing)]);
    assert_eq!(d.end, ChainEnd::Missing);

    let d = find(scan, &format!("{U6}/disk"));
    assert_eq!(paths(d), vec![(s("/images/external.raw"), External)]);
    assert_eq!(d.end, ChainEnd::External);

    let d = find(scan, &format!("{U8}/disk"));
    assert_eq!(
        paths(d),
        vec![
            (format!("{U8}/la"), Present),
            (format!("{U8}/lb"), Present),
            (format!("{U8}/la"), Present)
        ]
    );
    assert_eq!(d.end, ChainEnd::Loop);

    let d = find(scan, &format!("{U9_RESIZE}/disk.rescue"));
    assert_eq!(
        paths(d),
        vec![(format!("{U9_RESIZE}/disk.rescue"), Present)]
    );
    assert_eq!(d.end, ChainEnd::Loop);

    let d = find(scan, &format!("{OLD}/disk.local"));
    assert_eq!(paths(d), vec![(s("_base/ephemeral_1_0706d66"), Present)]);

    let d = find(scan, "snapshots/tmpabc/snap.delta");
    if prefix_known {
        assert_eq!(
            paths(d),
            vec![(format!("{U1}/disk"), Present), (s(SHA), Present)]
        );
        assert_eq!(d.end, ChainEnd::Complete);
    } else {
        assert_eq!(d.chain.len(), 1);
        assert_eq!(d.chain[0].state, External);
        assert_eq!(d.end, ChainEnd::External);
    }

    // Nothing else was picked up (no _del dir, no disk.config).
    assert_eq!(scan.disks.len(), 10, "{scan:#?}");
    assert!(scan.problems.is_empty());

    let referenced = idx.referenced();
    for r in [
        SHA,
        "_base/img.qcow2",
        "_base/gone",
        "_base/ephemeral_1_0706d66",
    ] {
        assert!(referenced.contains(Path::new(r)), "{r}");
    }
    assert!(!referenced.contains(Path::new("_base/only_del")));
    assert!(!referenced.contains(Path::new("_base/ignored")));
    assert!(!referenced.contains(Path::new("/images/external.raw")));
    let mut want = vec![
        format!("{U1}/disk"),
        format!("{U2}/disk"),
        format!("{U3}/disk"),
    ];
    if prefix_known {
        want.push("snapshots/tmpabc/snap.delta".into());
    }
    assert_eq!(
        idx.references(Path::new(SHA)),
        want.iter().map(PathBuf::from).collect::<Vec<_>>()
    );
    assert_eq!(
        idx.references(Path::new("./_base/img.qcow2")),
        pb(&[&format!("{U3}/disk")])
    );
    assert!(idx.references(Path::new("_base/nothing")).is_empty());
}

#[test]
fn real_chains_across_mountpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("node-a/instances");
    fs::create_dir_all(&a).unwrap();
    build_fixture(&a);

    // The header parser agrees with qemu-img on the written names.
    assert_eq!(
        qcow2::read_backing(&a.join(U1).join("disk")).unwrap(),
        Ok(Backing::Named(format!("../{SHA}")))
    );
    let h2 = qcow2::read_header(&a.join(U2).join("disk"))
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(h2.version, 2);
    assert_eq!(h2.backing_format.as_deref(), Some("raw"));
    let h3 = qcow2::read_header(&a.join(U3).join("disk"))
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(h3.version, 3);
    assert_eq!(
        qcow2::read_backing(&a.join(U4).join("disk")).unwrap(),
        Ok(Backing::NotQcow2)
    );
    assert_eq!(
        qcow2::read_backing(&a.join(SHA)).unwrap(),
        Ok(Backing::NotQcow2)
    );

    // Scanned where it was made, with its mountpoint known.
    let mut idx = RefIndex::new(vec![a.clone()]);
    let scan = idx.scan(&a).unwrap();
    check_fixture(&scan, &idx, true);
    // JSON output works.
    let json = serde_json::to_string(&scan).unwrap();
    assert!(json.contains("\"state\":\"missing\""), "{json}");

    // Another node: a copy mounted elsewhere. Names written with node A's
    // path still resolve via `_base`; the snapshot delta needs the prefix.
    let b = tmp.path().join("node-b/mnt/nova");
    fs::create_dir_all(b.parent().unwrap()).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(&a)
        .arg(&b)
        .status()
        .unwrap();
    assert!(st.success());
    let mut idx_b = RefIndex::new(vec![]);
    let scan_b = idx_b.scan(&b).unwrap();
    check_fixture(&scan_b, &idx_b, false);
    let mut idx_b = RefIndex::new(vec![PathBuf::from("/nowhere"), a.clone()]);
    let scan_b = idx_b.scan(&b).unwrap();
    check_fixture(&scan_b, &idx_b, true);
    // The chain on B really resolves to B's files: remove B's base.
    fs::remove_file(b.join(SHA)).unwrap();
    let scan_b = idx_b.scan(&b).unwrap();
    let d = find(&scan_b, &format!("{U1}/disk"));
    assert_eq!(d.chain[0].state, LinkState::Missing);
    assert!(a.join(SHA).exists());

    // Through a symlink to the tree, and through /proc/self/fd/N.
    let c = tmp.path().join("link");
    std::os::unix::fs::symlink(&a, &c).unwrap();
    let mut idx_c = RefIndex::new(vec![a.clone()]);
    check_fixture(&idx_c.scan(&c).unwrap(), &idx_c, true);
    let dir = fs::File::open(&a).unwrap();
    let fd_root = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let mut idx_fd = RefIndex::new(vec![a.clone()]);
    let scan_fd = idx_fd.scan(&fd_root).unwrap();
    check_fixture(&scan_fd, &idx_fd, true);
    assert_eq!(scan_fd.disks, scan.disks);
}

#[test]
fn cache_rereads_only_changed_headers() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path();
    build_fixture(a);
    let mut idx = RefIndex::new(vec![a.to_path_buf()]);
    let cold = idx.scan(a).unwrap();
    assert!(cold.stats.header_reads >= cold.disks.len());
    let warm = idx.scan(a).unwrap();
    assert_eq!(warm.stats.header_reads, 0);
    assert_eq!(warm.disks, cold.disks);

    // Rebase one disk (header changes): exactly that header is re-read.
    let disk = a.join(U1).join("disk");
    qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "raw",
        "-b",
        "../_base/ephemeral_1_0706d66",
        disk.to_str().unwrap(),
    ]);
    let s = idx.scan(a).unwrap();
    assert_eq!(s.stats.header_reads, 1);
    assert_eq!(
        paths(find(&s, &format!("{U1}/disk"))),
        vec![("_base/ephemeral_1_0706d66".into(), LinkState::Present)]
    );
    assert!(
        !idx.references(Path::new(SHA))
            .contains(&PathBuf::from(format!("{U1}/disk")))
    );

    // Deleting a base is seen without any header read.
    fs::remove_file(a.join("_base/img.qcow2")).unwrap();
    let s = idx.scan(a).unwrap();
    assert_eq!(s.stats.header_reads, 0);
    let d = find(&s, &format!("{U3}/disk"));
    assert_eq!(d.end, ChainEnd::Missing);
    assert!(idx.is_referenced(Path::new("_base/img.qcow2")));

    // A removed instance drops its references and cache entries.
    let before = idx.cached_headers();
    fs::remove_dir_all(a.join(U2)).unwrap();
    idx.scan(a).unwrap();
    assert_eq!(idx.cached_headers(), before - 1);
}

#[test]
fn chain_depth_is_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path();
    fs::create_dir_all(a.join("_base")).unwrap();
    fs::create_dir_all(a.join(U1)).unwrap();
    for i in 0..40 {
        let h = qcow2::synthetic_header(3, Some(&format!("l{}", i + 1)), Some("qcow2"), 512);
        fs::write(a.join(format!("_base/l{i}")), h).unwrap();
    }
    let h = qcow2::synthetic_header(3, Some("../_base/l0"), None, 512);
    fs::write(a.join(U1).join("disk"), h).unwrap();
    let mut idx = RefIndex::new(vec![]);
    let s = idx.scan(a).unwrap();
    let d = find(&s, &format!("{U1}/disk"));
    assert_eq!(d.chain.len(), MAX_CHAIN_DEPTH);
    assert_eq!(d.end, ChainEnd::TooDeep);
}

#[test]
fn bad_headers_end_chains_without_failing_the_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path();
    fs::create_dir_all(a.join("_base")).unwrap();
    fs::create_dir_all(a.join(U1)).unwrap();
    fs::create_dir_all(a.join(U2)).unwrap();
    let mut h = qcow2::synthetic_header(3, Some("x"), None, 512);
    h[16..20].copy_from_slice(&5000u32.to_be_bytes());
    fs::write(a.join(U1).join("disk"), &h).unwrap();
    // Valid disk over a base that is a broken qcow2.
    fs::write(
        a.join(U2).join("disk"),
        qcow2::synthetic_header(2, Some("../_base/broken"), None, 512),
    )
    .unwrap();
    fs::write(a.join("_base/broken"), &h[..50]).unwrap();
    // FIFOs are never opened (that would block): a disk and a base.
    fs::create_dir_all(a.join(U3)).unwrap();
    fs::create_dir_all(a.join(U4)).unwrap();
    let fifo = |p: PathBuf| assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
    fifo(a.join(U3).join("disk"));
    fifo(a.join("_base/fifo"));
    fs::write(
        a.join(U4).join("disk"),
        qcow2::synthetic_header(3, Some("../_base/fifo"), None, 512),
    )
    .unwrap();
    let mut idx = RefIndex::new(vec![]);
    let s = idx.scan(a).unwrap();
    assert!(matches!(
        find(&s, &format!("{U3}/disk")).end,
        ChainEnd::Unreadable { .. }
    ));
    let d = find(&s, &format!("{U4}/disk"));
    assert_eq!(d.chain[0].state, LinkState::Present);
    assert!(matches!(d.end, ChainEnd::Unreadable { .. }));
    assert!(matches!(
        find(&s, &format!("{U1}/disk")).end,
        ChainEnd::BadHeader {
            error: HeaderError::BackingNameTooLong { size: 5000 },
            ..
        }
    ));
    let d = find(&s, &format!("{U2}/disk"));
    assert_eq!(d.chain.len(), 1);
    assert_eq!(
        d.end,
        ChainEnd::BadHeader {
            path: "_base/broken".into(),
            error: HeaderError::Truncated { needed: 104 }
        }
    );
    assert!(idx.is_referenced(Path::new("_base/broken")));
}

/// xorshift64*: deterministic, no crates.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn fuzzed_headers_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    // Seeds: real qemu-img headers (v2, v3) and synthetic ones.
    let a = tmp.path();
    raw(a, "_base/b");
    overlay(a, "v3", &p(a, "_base/b"), "raw", &[]);
    overlay(a, "v2", "_base/b", "raw", &["-o", "compat=0.10"]);
    let mut seeds: Vec<Vec<u8>> = ["v3", "v2"]
        .iter()
        .map(|f| {
            let mut b = fs::read(a.join(f)).unwrap();
            b.truncate(4096);
            b
        })
        .collect();
    for v in [2, 3] {
        seeds.push(qcow2::synthetic_header(
            v,
            Some("/var/lib/nova/instances/_base/abc"),
            Some("raw"),
            0,
        ));
        seeds.push(qcow2::synthetic_header(v, None, None, 256));
    }
    let fields = [4usize, 8, 12, 16, 20, 100, 112, 116];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut err) = (0u32, 0u32);
    for i in 0..200_000u32 {
        let mut b = seeds[rng.below(seeds.len())].clone();
        match rng.below(5) {
            0 => {
                // Bit flips.
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(b.len());
                    b[at] ^= 1 << rng.below(8);
                }
            }
            1 => {
                // Random field values, biased to edge cases.
                for _ in 0..1 + rng.below(3) {
                    let at = fields[rng.below(fields.len())];
                    let v: u32 = match rng.below(4) {
                        0 => 0,
                        1 => u32::MAX,
                        2 => rng.below(2048) as u32,
                        _ => rng.next() as u32,
                    };
                    if at + 4 <= b.len() {
                        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
                    }
                }
            }
            2 => b.truncate(rng.below(b.len() + 1)),
            3 => {
                // Random bytes after the magic.
                let n = rng.below(1024);
                b = qcow2::QCOW2_MAGIC.to_vec();
                b.extend((0..n).map(|_| rng.next() as u8));
            }
            _ => {
                // Everything at once.
                let at = rng.below(b.len());
                b[at] = rng.next() as u8;
                let n = rng.below(b.len() + 1);
                b.truncate(n);
            }
        }
        match qcow2::parse_header(&b) {
            Ok(Some(h)) => {
                ok += 1;
                if let Some(name) = &h.backing_file {
                    assert!(!name.is_empty() && name.len() <= 1023);
                    assert!(!name.contains('\0'));
                }
                assert!(matches!(h.version, 2 | 3));
            }
            Ok(None) => ok += 1,
            Err(HeaderError::Truncated { needed }) => {
                err += 1;
                assert!(needed as usize > b.len());
                assert!(needed <= qcow2::MAX_HEADER_READ);
            }
            Err(_) => err += 1,
        }
        // The reader path too, on a subset (it copies).
        if i % 16 == 0 {
            let _ = qcow2::read_header_from(&b[..]).unwrap();
            let _ = qcow2::backing_from_header(&b);
        }
    }
    eprintln!("fuzz: {ok} accepted, {err} rejected");
    assert!(ok > 1000 && err > 1000, "fuzz should exercise both sides");

    // And a scan over a tree of mutated images does not panic either.
    let root = tmp.path().join("root");
    for i in 0..300 {
        let dir = root.join(format!("{i:08x}-0000-4000-8000-000000000000"));
        fs::create_dir_all(&dir).unwrap();
        let mut b = seeds[rng.below(seeds.len())].clone();
        for _ in 0..rng.below(6) {
            let at = rng.below(b.len());
            b[at] ^= 1 << rng.below(8);
        }
        fs::write(dir.join("disk"), &b).unwrap();
        fs::write(root.join(format!("{i}")), &b).unwrap();
    }
    let mut idx = RefIndex::new(vec![PathBuf::from("/var/lib/nova/instances")]);
    let s = idx.scan(&root).unwrap();
    assert_eq!(s.disks.len(), 300);
}

#[test]
fn scale_5000_instances() {
    const N: usize = 5000;
    const BASES: usize = 100;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fs::create_dir_all(root.join("_base")).unwrap();
    let base = |i: usize| format!("_base/{:040x}", i * 7919 + 1);
    for i in 0..BASES {
        fs::write(root.join(base(i)), [0u8; 512]).unwrap();
    }
    fs::write(root.join("_base/ephemeral_1_0706d66"), [0u8; 512]).unwrap();
    let t = Instant::now();
    for i in 0..N {
        let dir = root.join(format!("{i:08x}-0000-4000-8000-{i:012x}"));
        fs::create_dir(&dir).unwrap();
        let name = format!("/var/lib/nova/instances/{}", base(i % BASES));
        let v = if i % 2 == 0 { 3 } else { 2 };
        fs::write(
            dir.join("disk"),
            qcow2::synthetic_header(v, Some(&name), Some("raw"), 512),
        )
        .unwrap();
        if i % 5 == 0 {
            fs::write(
                dir.join("disk.local"),
                qcow2::synthetic_header(3, Some("../_base/ephemeral_1_0706d66"), None, 512),
            )
            .unwrap();
        }
        fs::write(dir.join("console.log"), b"").unwrap();
    }
    eprintln!("scale: built {N} instance dirs in {:?}", t.elapsed());

    let mut idx = RefIndex::new(vec![PathBuf::from("/var/lib/nova/instances")]);
    let t = Instant::now();
    let cold = idx.scan(root).unwrap();
    let cold_t = t.elapsed();
    let t = Instant::now();
    let warm = idx.scan(root).unwrap();
    let warm_t = t.elapsed();
    let t = Instant::now();
    let warm2 = idx.scan(root).unwrap();
    let warm2_t = t.elapsed();
    eprintln!(
        "scale: {} disks: cold scan {cold_t:?} ({} header reads, {} stats), \
         warm scan {warm_t:?} / {warm2_t:?} ({} header reads)",
        cold.disks.len(),
        cold.stats.header_reads,
        cold.stats.stats,
        warm.stats.header_reads
    );

    let disks = N + N / 5;
    assert_eq!(cold.disks.len(), disks);
    // Every disk, plus the ephemeral base (no declared format: probed like
    // qemu does); the image bases are declared raw and not opened.
    assert_eq!(cold.stats.header_reads, disks + 1);
    assert_eq!(cold.stats.stats, disks + BASES + 1);
    assert_eq!(warm.stats.header_reads, 0);
    assert_eq!(warm2.stats.header_reads, 0);
    assert_eq!(warm.disks, cold.disks);
    assert!(cold.problems.is_empty());
    for d in &cold.disks {
        assert_eq!(d.end, ChainEnd::Complete, "{d:?}");
        assert_eq!(d.chain.len(), 1);
        assert_eq!(d.chain[0].state, LinkState::Present);
    }
    let referenced = idx.referenced();
    assert_eq!(referenced.len(), BASES + 1);
    for i in 0..BASES {
        assert_eq!(idx.references(Path::new(&base(i))).len(), N / BASES);
    }
    assert_eq!(
        idx.references(Path::new("_base/ephemeral_1_0706d66")).len(),
        N / 5
    );
}

/// Opens a FIFO for writing without blocking: frees a reader stuck in open.
fn unblock_fifo(p: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p);
}

#[test]
fn a_disk_swapped_with_a_fifo_never_blocks_the_scan() {
    use baseguard::sys;
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, mpsc};
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("inst");
    raw(&root, SHA);
    overlay(
        &root,
        &format!("{U1}/disk"),
        &format!("../{SHA}"),
        "raw",
        &[],
    );
    let fifo = root.join(U1).join("swap");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // A user with write access to the instance directory exchanges the disk
    // and a FIFO as fast as it can (RENAME_EXCHANGE: both names always exist).
    let stop = Arc::new(AtomicBool::new(false));
    let dir = sys::open_path(&root.join(U1), libc::O_PATH | libc::O_DIRECTORY).unwrap();
    // Two versions of the disk (two inodes) take turns, so that every scan
    // reads its header again, as for a running VM's disk.
    fs::copy(root.join(U1).join("disk"), root.join(U1).join("other")).unwrap();
    let swapper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (a, b, o) = (c"disk", c"swap", c"other");
            let x = |p: &std::ffi::CStr, q: &std::ffi::CStr| {
                sys::renameat2(dir.as_fd(), p, dir.as_fd(), q, libc::RENAME_EXCHANGE).unwrap()
            };
            while !stop.load(Ordering::Relaxed) {
                x(a, b);
                x(a, b);
                x(a, o);
            }
        })
    };
    let (tx, rx) = mpsc::channel();
    let scan_root = root.clone();
    std::thread::spawn(move || {
        let mut idx = RefIndex::new(vec![]);
        let mut seen_disk = 0;
        let mut reads = 0;
        let start = Instant::now();
        while reads < 2000 && start.elapsed().as_secs() < 10 {
            let scan = idx.scan(&scan_root).unwrap();
            if scan.disks.iter().any(|d| d.qcow2) {
                seen_disk += 1;
            }
            reads += scan.stats.header_reads;
        }
        let _ = tx.send(seen_disk);
    });
    let res = rx.recv_timeout(std::time::Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    if res.is_err() {
        for n in ["disk", "swap", "other"] {
            unblock_fifo(&root.join(U1).join(n));
        }
        panic!("a scan blocked opening a FIFO");
    }
    assert!(res.unwrap() > 0, "the disk was never seen as a disk");
}
