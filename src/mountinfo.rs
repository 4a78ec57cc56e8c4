//! `/proc/self/mountinfo` (proc(5)): the one parser of the crate.

use std::io;
use std::path::{Path, PathBuf};

/// One mount, the parts baseguard uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount id (first field; `mnt_id:` in `/proc/PID/fdinfo/FD`).
    pub id: u64,
    /// Mount point, unescaped.
    pub mountpoint: PathBuf,
    /// Filesystem type, e.g. `fuse.baseguard`.
    pub fstype: String,
    /// The source field: for baseguard, the backing directory.
    pub source: String,
}

/// Decode mountinfo's octal escapes (`\040` is a space).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse mountinfo text, in order (later lines are mounted on top).
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let id = left.split(' ').next()?.parse().ok()?;
            let mountpoint = PathBuf::from(unescape(left.split(' ').nth(4)?));
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let source = unescape(r.next()?);
            Some(MountInfo {
                id,
                mountpoint,
                fstype,
                source,
            })
        })
        .collect()
}

/// The mounts of this process's namespace.
pub fn read() -> io::Result<Vec<MountInfo>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at exactly `path` in `mounts`.
pub fn topmost<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    mounts.iter().rev().find(|m| m.mountpoint == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_escapes_optional_fields_and_stacking() {
        let t = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                 40 22 0:50 / /mnt/with\\040space rw,nosuid - fuse.baseguard /srv/nova\\040nfs rw,user_id=0\n\
                 41 40 0:51 / /mnt/with\\040space rw master:3 shared:7 - fuse.baseguard /other rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[1].source, "/srv/nova nfs");
        assert_eq!(m[1].id, 40);
        let top = topmost(&m, Path::new("/mnt/with space")).unwrap();
        assert_eq!(top.source, "/other");
        assert_eq!(topmost(&m, Path::new("/")).unwrap().fstype, "ext4");
        assert!(topmost(&m, Path::new("/nope")).is_none());
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }
}
