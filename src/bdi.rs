//! The mount's readahead window, in its backing-device entry in sysfs.
//!
//! The kernel caps a FUSE mount's readahead at its default 128 KiB whatever
//! the filesystem asks for at INIT (`max_readahead` can only lower it), so
//! without kernel passthrough a sequential read reaches the daemon as 128 KiB
//! requests. Root may raise it, as for any block device, in
//! `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`: to [`READ_KIB`], so a base
//! image is read in requests of almost 1 MiB.

use std::io;
use std::path::Path;

/// The largest read request wanted from the kernel, in KiB: 254 pages. A
/// reply is spliced through one pipe holding its header and payload (a page
/// more when the payload starts mid-page), and a pipe may not exceed
/// `/proc/sys/fs/pipe-max-size`, 1 MiB by default, without
/// `CAP_SYS_RESOURCE` (which daemons are often run without). A 1 MiB request
/// would not fit, and would be copied.
pub const READ_KIB: u32 = 1016;

/// Where the readahead window of the filesystem `dev` (`major:minor`) is set.
fn knob(dev: &str) -> std::path::PathBuf {
    Path::new("/sys/class/bdi").join(dev).join("read_ahead_kb")
}

/// Raise the readahead of the FUSE mount at `mountpoint` (found in this
/// process's mountinfo, never by a stat through the mount, which this very
/// process may be the one to answer) to `kib`, unless it is larger already.
/// Returns the window now in force.
pub fn raise_readahead(mountpoint: &Path, kib: u32) -> io::Result<u32> {
    let mounts = crate::mountinfo::read()?;
    let m = crate::mountinfo::topmost(&mounts, mountpoint)
        .filter(|m| m.fstype.starts_with("fuse"))
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let path = knob(&m.dev);
    let now: u32 = std::fs::read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    if now >= kib {
        return Ok(now);
    }
    std::fs::write(&path, kib.to_string())?;
    Ok(kib)
}
