//! Minimal, defensive qcow2 header parsing: just enough to learn an image's
//! backing file name (and declared backing format).
//!
//! Only qcow2 versions 2 and 3 are understood. Everything read from the file is
//! untrusted: the parser never panics, never indexes out of bounds and never
//! allocates from a size taken from the file beyond [`MAX_HEADER_READ`] bytes
//! (the backing file name must lie within the first cluster, and clusters are
//! at most 2 MiB, exactly as qemu enforces).
//!
//! Header layout (all big-endian), from qemu's `docs/interop/qcow2.txt`:
//!
//! | bytes   | field                                   |
//! |---------|-----------------------------------------|
//! | 0..4    | magic `QFI\xfb`                         |
//! | 4..8    | version (2 or 3)                        |
//! | 8..16   | backing_file_offset (0: no backing)     |
//! | 16..20  | backing_file_size (≤ 1023)              |
//! | 20..24  | cluster_bits (qemu accepts 9..=21)      |
//! | 100..104| header_length (v3 only; v2 is 72)       |
//!
//! Header extensions follow the header; the one read here is the backing
//! format name (`0xE2792ACA`).
//!
//! Choices, matching qemu where qemu has an opinion:
//! - a backing name is cut at its first NUL byte (qemu stores it as a C
//!   string); an empty name (size 0 or leading NUL) means "no backing file";
//! - a backing name that is not valid UTF-8 is **rejected**
//!   ([`HeaderError::NonUtf8BackingName`]) rather than decoded lossily, so a
//!   lossy decoding can never alias another, real file name;
//! - header extensions are parsed leniently: a malformed extension area only
//!   means the backing format is unknown (`None`), it does not fail the header.

use serde::Serialize;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// The four magic bytes at the start of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// qemu's limit on the length of a backing file name, in bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Smallest cluster size qemu accepts (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size qemu accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// How many bytes [`read_header`] reads first; enough for every image
/// `qemu-img` writes (header, extensions and backing name sit near the start).
pub const INITIAL_READ: usize = 4096;
/// Upper bound on how much [`read_header`] will ever read: one maximal
/// cluster. A valid backing name always ends within the first cluster.
pub const MAX_HEADER_READ: u64 = 1 << MAX_CLUSTER_BITS;

const V2_HEADER_LEN: u32 = 72;
const V3_MIN_HEADER_LEN: u32 = 104;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Longest backing format name accepted from the extension (qemu: < 16).
const MAX_FORMAT_NAME: u32 = 32;

/// What an image's header says about its backing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Backing {
    /// Not a qcow2 image at all (raw, ISO, empty file, ...).
    NotQcow2,
    /// A qcow2 image without a backing file.
    None,
    /// A qcow2 image naming this backing file, exactly as written.
    Named(String),
}

/// The parts of a qcow2 header that matter for backing chains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, in `MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS`.
    pub cluster_bits: u32,
    /// Length of the fixed header (72 for v2, ≥ 104 for v3).
    pub header_length: u32,
    /// The backing file name as written, if any.
    pub backing_file: Option<String>,
    /// The backing format from the header extension (e.g. `raw`, `qcow2`),
    /// if present and well formed.
    pub backing_format: Option<String>,
}

impl Header {
    /// The [`Backing`] view of this header.
    pub fn backing(&self) -> Backing {
        match &self.backing_file {
            Some(name) => Backing::Named(name.clone()),
            None => Backing::None,
        }
    }
}

/// Why a buffer starting with the qcow2 magic is not an acceptable header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum HeaderError {
    /// The buffer ends before the data needed; `needed` is the total number
    /// of bytes from the start of the file that would be required (bounded by
    /// [`MAX_HEADER_READ`] + a little).
    Truncated { needed: u64 },
    /// Version other than 2 or 3.
    UnsupportedVersion { version: u32 },
    /// cluster_bits outside what qemu accepts.
    BadClusterBits { cluster_bits: u32 },
    /// v3 header_length below 104 or beyond the first cluster.
    BadHeaderLength { header_length: u32 },
    /// The backing name would start inside the fixed header.
    BackingOverlapsHeader { offset: u64, header_length: u32 },
    /// backing_file_size above qemu's limit of 1023.
    BackingNameTooLong { size: u32 },
    /// The backing name does not lie within the first cluster.
    BackingOutOfRange {
        offset: u64,
        size: u32,
        cluster_size: u64,
    },
    /// The backing name is not valid UTF-8.
    NonUtf8BackingName,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Truncated { needed } => {
                write!(f, "qcow2 header truncated (need {needed} bytes)")
            }
            HeaderError::UnsupportedVersion { version } => {
                write!(f, "unsupported qcow2 version {version}")
            }
            HeaderError::BadClusterBits { cluster_bits } => {
                write!(f, "invalid qcow2 cluster_bits {cluster_bits}")
            }
            HeaderError::BadHeaderLength { header_length } => {
                write!(f, "invalid qcow2 header_length {header_length}")
            }
            HeaderError::BackingOverlapsHeader {
                offset,
                header_length,
            } => write!(
                f,
                "backing file offset {offset} overlaps the {header_length}-byte header"
            ),
            HeaderError::BackingNameTooLong { size } => {
                write!(
                    f,
                    "backing file name too long ({size} > {MAX_BACKING_NAME})"
                )
            }
            HeaderError::BackingOutOfRange {
                offset,
                size,
                cluster_size,
            } => write!(
                f,
                "backing file name at {offset}+{size} is outside the first cluster ({cluster_size} bytes)"
            ),
            HeaderError::NonUtf8BackingName => write!(f, "backing file name is not UTF-8"),
        }
    }
}

impl std::error::Error for HeaderError {}

fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be_u64(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

/// Parses a qcow2 header from the first bytes of a file.
///
/// Returns `Ok(None)` if `buf` does not start with the qcow2 magic (the image
/// is raw or something else), `Ok(Some(header))` for a valid v2/v3 header,
/// and `Err(HeaderError::Truncated { needed })` if `buf` is too short: the
/// caller may retry with the first `needed` bytes if the file has them.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    if buf.len() < QCOW2_MAGIC.len() || buf[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    let version = match be_u32(buf, 4) {
        Some(v) => v,
        None => {
            return Err(HeaderError::Truncated {
                needed: u64::from(V3_MIN_HEADER_LEN),
            });
        }
    };
    let fixed_len = match version {
        2 => V2_HEADER_LEN,
        3 => V3_MIN_HEADER_LEN,
        _ => return Err(HeaderError::UnsupportedVersion { version }),
    };
    if buf.len() < fixed_len as usize {
        return Err(HeaderError::Truncated {
            needed: u64::from(fixed_len),
        });
    }
    // The length checks above make these reads infallible; stay total anyway.
    let truncated = HeaderError::Truncated {
        needed: u64::from(fixed_len),
    };
    let backing_offset = be_u64(buf, 8).ok_or_else(|| truncated.clone())?;
    let backing_size = be_u32(buf, 16).ok_or_else(|| truncated.clone())?;
    let cluster_bits = be_u32(buf, 20).ok_or_else(|| truncated.clone())?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(HeaderError::BadClusterBits { cluster_bits });
    }
    let cluster_size: u64 = 1 << cluster_bits;
    let header_length = if version == 3 {
        let hl = be_u32(buf, 100).ok_or(truncated)?;
        if hl < V3_MIN_HEADER_LEN || u64::from(hl) > cluster_size {
            return Err(HeaderError::BadHeaderLength { header_length: hl });
        }
        hl
    } else {
        V2_HEADER_LEN
    };

    let mut header = Header {
        version,
        cluster_bits,
        header_length,
        backing_file: None,
        backing_format: None,
    };
    if backing_offset == 0 {
        // qemu: offset 0 means no backing file, whatever the size says.
        header.backing_format = backing_format(buf, header_length, cluster_size);
        return Ok(Some(header));
    }
    if backing_offset < u64::from(header_length) {
        return Err(HeaderError::BackingOverlapsHeader {
            offset: backing_offset,
            header_length,
        });
    }
    if backing_size > MAX_BACKING_NAME {
        return Err(HeaderError::BackingNameTooLong { size: backing_size });
    }
    // backing_offset <= cluster_size <= 2 MiB after this check: no overflow.
    if backing_offset > cluster_size || backing_offset + u64::from(backing_size) > cluster_size {
        return Err(HeaderError::BackingOutOfRange {
            offset: backing_offset,
            size: backing_size,
            cluster_size,
        });
    }
    let end = backing_offset + u64::from(backing_size);
    if (buf.len() as u64) < end {
        return Err(HeaderError::Truncated { needed: end });
    }
    // Both bounds are <= buf.len() now, so they fit in usize.
    let raw = &buf[backing_offset as usize..end as usize];
    let raw = match raw.iter().position(|&b| b == 0) {
        Some(nul) => &raw[..nul],
        None => raw,
    };
    if !raw.is_empty() {
        let name = std::str::from_utf8(raw).map_err(|_| HeaderError::NonUtf8BackingName)?;
        header.backing_file = Some(name.to_owned());
        header.backing_format = backing_format(buf, header_length, backing_offset);
    }
    Ok(Some(header))
}

/// Scans header extensions in `buf[start..end]` for the backing format.
/// Lenient: any inconsistency just yields `None`.
fn backing_format(buf: &[u8], start: u32, end: u64) -> Option<String> {
    let end = usize::try_from(end).ok()?.min(buf.len());
    let mut at = start as usize;
    // Each iteration advances by at least 8 bytes, so this terminates.
    while at.checked_add(8)? <= end {
        let ty = be_u32(buf, at)?;
        let len = be_u32(buf, at + 4)?;
        if ty == EXT_END {
            return None;
        }
        let data = at + 8;
        let data_end = data.checked_add(len as usize)?;
        if data_end > end {
            return None;
        }
        if ty == EXT_BACKING_FORMAT {
            if len == 0 || len > MAX_FORMAT_NAME {
                return None;
            }
            let raw = &buf[data..data_end];
            let raw = match raw.iter().position(|&b| b == 0) {
                Some(nul) => &raw[..nul],
                None => raw,
            };
            return std::str::from_utf8(raw)
                .ok()
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
        }
        // Extension data is padded to a multiple of 8 bytes.
        at = data_end.checked_add(7)? & !7;
    }
    None
}

/// Parses the backing file out of the first bytes of an image; see
/// [`parse_header`] for what `buf` must contain.
pub fn backing_from_header(buf: &[u8]) -> Result<Backing, HeaderError> {
    Ok(match parse_header(buf)? {
        None => Backing::NotQcow2,
        Some(h) => h.backing(),
    })
}

/// Reads and parses the header of the image at `path`, reading
/// [`INITIAL_READ`] bytes first and more only if the backing name lies beyond
/// them (never more than [`MAX_HEADER_READ`] bytes).
///
/// The outer `io::Result` is for I/O failures; the inner one is the verdict on
/// the bytes (`Ok(None)`: not qcow2).
pub fn read_header(path: &Path) -> io::Result<Result<Option<Header>, HeaderError>> {
    read_header_from(File::open(path)?)
}

/// [`read_header`] over any reader positioned at the start of an image.
pub fn read_header_from<R: Read>(mut r: R) -> io::Result<Result<Option<Header>, HeaderError>> {
    let mut buf = Vec::with_capacity(INITIAL_READ);
    (&mut r).take(INITIAL_READ as u64).read_to_end(&mut buf)?;
    let mut at_eof = buf.len() < INITIAL_READ;
    loop {
        match parse_header(&buf) {
            Err(HeaderError::Truncated { needed })
                if !at_eof && needed <= MAX_HEADER_READ && needed > buf.len() as u64 =>
            {
                let want = needed - buf.len() as u64;
                let got = (&mut r).take(want).read_to_end(&mut buf)?;
                at_eof = (got as u64) < want;
            }
            verdict => return Ok(verdict),
        }
    }
}

/// Reads the backing file of the image at `path`; see [`read_header`].
pub fn read_backing(path: &Path) -> io::Result<Result<Backing, HeaderError>> {
    Ok(read_header(path)?.map(|h| match h {
        None => Backing::NotQcow2,
        Some(h) => h.backing(),
    }))
}

/// Builds a minimal qcow2 header (not a usable image: no tables) naming
/// `backing` with optional `format`. `version` is 2 or 3; the result is
/// `len` bytes long (at least large enough for the name). Meant for tests and
/// synthetic fixtures.
pub fn synthetic_header(
    version: u32,
    backing: Option<&str>,
    format: Option<&str>,
    len: usize,
) -> Vec<u8> {
    let header_length: u32 = if version == 2 { 72 } else { 112 };
    let mut buf = vec![0u8; header_length as usize];
    buf[0..4].copy_from_slice(&QCOW2_MAGIC);
    buf[4..8].copy_from_slice(&version.to_be_bytes());
    buf[20..24].copy_from_slice(&16u32.to_be_bytes()); // 64 KiB clusters
    buf[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes()); // virtual size
    if version != 2 {
        buf[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
        buf[100..104].copy_from_slice(&header_length.to_be_bytes());
    }
    if let Some(fmt) = format {
        buf.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        buf.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
        buf.extend_from_slice(fmt.as_bytes());
        while buf.len() % 8 != 0 {
            buf.push(0);
        }
    }
    buf.extend_from_slice(&[0u8; 8]); // end of extensions
    if let Some(name) = backing {
        let offset = buf.len() as u64;
        buf[8..16].copy_from_slice(&offset.to_be_bytes());
        buf[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        buf.extend_from_slice(name.as_bytes());
    }
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_roundtrip() {
        for v in [2, 3] {
            let h = synthetic_header(v, Some("_base/abc"), Some("raw"), 512);
            assert_eq!(h.len(), 512);
            let p = parse_header(&h).unwrap().unwrap();
            assert_eq!(p.version, v);
            assert_eq!(p.backing_file.as_deref(), Some("_base/abc"));
            assert_eq!(p.backing_format.as_deref(), Some("raw"));
            let h = synthetic_header(v, None, None, 0);
            assert_eq!(backing_from_header(&h), Ok(Backing::None));
        }
    }

    #[test]
    fn not_qcow2() {
        assert_eq!(backing_from_header(b""), Ok(Backing::NotQcow2));
        assert_eq!(backing_from_header(b"QFI"), Ok(Backing::NotQcow2));
        assert_eq!(backing_from_header(&[0u8; 512]), Ok(Backing::NotQcow2));
    }

    #[test]
    fn truncation_asks_for_more() {
        let h = synthetic_header(3, Some("/var/lib/nova/instances/_base/x"), None, 0);
        for cut in 4..h.len() {
            match parse_header(&h[..cut]) {
                Err(HeaderError::Truncated { needed }) => assert!(needed as usize > cut),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        assert!(parse_header(&h).is_ok());
    }

    fn set_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn rejects_malformed() {
        let base = synthetic_header(3, Some("name"), None, 4096);
        let mut b = base.clone();
        set_u32(&mut b, 4, 4);
        assert_eq!(
            parse_header(&b),
            Err(HeaderError::UnsupportedVersion { version: 4 })
        );
        let mut b = base.clone();
        set_u32(&mut b, 20, 8);
        assert!(matches!(
            parse_header(&b),
            Err(HeaderError::BadClusterBits { .. })
        ));
        let mut b = base.clone();
        set_u32(&mut b, 100, 72);
        assert!(matches!(
            parse_header(&b),
            Err(HeaderError::BadHeaderLength { .. })
        ));
        let mut b = base.clone();
        set_u64(&mut b, 8, 50);
        assert!(matches!(
            parse_header(&b),
            Err(HeaderError::BackingOverlapsHeader { .. })
        ));
        let mut b = base.clone();
        set_u32(&mut b, 16, 1024);
        assert_eq!(
            parse_header(&b),
            Err(HeaderError::BackingNameTooLong { size: 1024 })
        );
        let mut b = base.clone();
        set_u64(&mut b, 8, 65536 - 2);
        assert!(matches!(
            parse_header(&b),
            Err(HeaderError::BackingOutOfRange { .. })
        ));
        let mut b = base.clone();
        set_u64(&mut b, 8, u64::MAX);
        assert!(matches!(
            parse_header(&b),
            Err(HeaderError::BackingOutOfRange { .. })
        ));
        let mut b = base.clone();
        let off = be_u64(&b, 8).unwrap() as usize;
        b[off] = 0xff;
        assert_eq!(parse_header(&b), Err(HeaderError::NonUtf8BackingName));
    }

    #[test]
    fn nul_and_empty_names() {
        let mut b = synthetic_header(3, Some("abc\0def"), None, 0);
        assert_eq!(backing_from_header(&b), Ok(Backing::Named("abc".into())));
        let off = be_u64(&b, 8).unwrap() as usize;
        b[off] = 0;
        assert_eq!(backing_from_header(&b), Ok(Backing::None));
        let mut b = synthetic_header(2, Some("x"), None, 0);
        set_u32(&mut b, 16, 0);
        assert_eq!(backing_from_header(&b), Ok(Backing::None));
    }

    #[test]
    fn reader_fetches_far_names() {
        // Name placed beyond INITIAL_READ but inside a 64 KiB cluster.
        let mut b = synthetic_header(3, None, None, 10_000);
        set_u64(&mut b, 8, 9_000);
        set_u32(&mut b, 16, 4);
        b[9_000..9_004].copy_from_slice(b"far!");
        let h = read_header_from(&b[..]).unwrap().unwrap().unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("far!"));
        // Same, but the file ends before the name.
        let r = read_header_from(&b[..9_002]).unwrap();
        assert_eq!(r, Err(HeaderError::Truncated { needed: 9_004 }));
    }
}
