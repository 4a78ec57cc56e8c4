//! What the commands print, made safe: file names quoted as `ls` quotes them
//! (`--quoting-style=shell-escape`), so a name with a newline or a terminal
//! escape sequence can neither fake table rows nor reach the terminal; the
//! exit statuses every command shares; and the JSON envelope.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

/// Exit statuses, the same for every quarantine command (documented in each
/// command's `--help`, the man pages and the README).
pub mod exit {
    /// All is well / done.
    pub const OK: u8 = 0;
    /// Attention: something an operator should look at (a near miss, a
    /// restorable link, a preview that changed nothing, a refused or failed
    /// request that changed nothing).
    pub const ATTENTION: u8 = 1;
    /// Loss: a file an instance disk needs is neither present nor in the
    /// quarantine.
    pub const LOSS: u8 = 2;
    /// Could not check: the quarantine or the instances directory could not
    /// be read (not root, not a baseguard directory, I/O error).
    pub const CANNOT: u8 = 3;
    /// The command line itself was wrong.
    pub const USAGE: u8 = 64;
}

/// The help text block listing the statuses, for `after_help`.
pub const EXIT_HELP: &str = "Exit status: 0 ok; 1 attention (a near miss, a restorable link, a preview, a refused request: nothing changed); 2 loss (a needed file is gone); 3 could not check (not root, not a baseguard directory, unreadable quarantine); 64 usage error (a wrong option, a bad configuration file).";

/// Print `msg` as `baseguard: msg` on stderr and return `code`.
pub fn fail_with(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("baseguard: {msg}");
    ExitCode::from(code)
}

/// An I/O error's reason without Rust's "(os error N)" suffix.
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// A byte needs no quoting at all in a shell word.
fn plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_./:,+@%=-^".contains(&b)
}

/// Quote a file name (or path) as GNU `ls --quoting-style=shell-escape` does:
/// as is when every character is harmless; in single quotes when it holds
/// spaces or shell syntax; control characters and bytes that are not UTF-8 as
/// `$'\n'`, `$'\033'`, `$'\377'` pieces. The result pasted into a shell names
/// the same file.
pub fn quote(name: &OsStr) -> String {
    let bytes = name.as_bytes();
    if !bytes.is_empty() && bytes.iter().all(|&b| plain_byte(b)) {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    // Split into printable text and the bytes to escape.
    let mut out = String::new();
    let mut text = String::new();
    let flush = |text: &mut String, out: &mut String| {
        if !text.is_empty() {
            out.push('\'');
            out.push_str(&text.replace('\'', "'\\''"));
            out.push('\'');
            text.clear();
        }
    };
    let mut rest = bytes;
    while !rest.is_empty() {
        let (good, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, &[][..]),
            Err(e) => {
                let (g, b) = rest.split_at(e.valid_up_to());
                // valid_up_to() bytes are UTF-8.
                (std::str::from_utf8(g).unwrap_or(""), b)
            }
        };
        for c in good.chars() {
            if c.is_control() {
                flush(&mut text, &mut out);
                out.push_str("$'");
                let mut buf = [0u8; 4];
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    out.push_str(&c_escape(b));
                }
                out.push('\'');
            } else {
                text.push(c);
            }
        }
        if bad.is_empty() {
            break;
        }
        // One invalid byte at a time.
        flush(&mut text, &mut out);
        out.push_str(&format!("$'{}'", c_escape(bad[0])));
        rest = &bad[1..];
    }
    flush(&mut text, &mut out);
    if out.is_empty() { "''".into() } else { out }
}

/// Quote a path given as UTF-8 text (see [`quote`]).
pub fn quote_str(s: &str) -> String {
    quote(OsStr::new(s))
}

/// `\n`, `\t`, `\r`, `\\`, `\'`, or octal `\033`.
fn c_escape(b: u8) -> String {
    match b {
        b'\n' => "\\n".into(),
        b'\t' => "\\t".into(),
        b'\r' => "\\r".into(),
        b'\\' => "\\\\".into(),
        b'\'' => "\\'".into(),
        _ => format!("\\{b:03o}"),
    }
}

/// Free text (a process's command line) for one line of a terminal: control
/// characters become visible escapes (`\n`, `\033`), nothing else changes.
pub fn visible(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            let mut buf = [0u8; 4];
            for &b in c.encode_utf8(&mut buf).as_bytes() {
                out.push_str(&c_escape(b));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The version of every `--json` document's layout.
pub const JSON_VERSION: u32 = 1;

/// `--compact` was given (or the configuration file asks for compact JSON).
static COMPACT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One line per document (`--compact`), else the configuration file's
/// `[commands] json`, else pretty.
pub fn set_json_style(compact_flag: bool) {
    let from_file = crate::config::get().commands.json == Some(crate::config::JsonStyle::Compact);
    COMPACT.store(
        compact_flag || from_file,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The help of every command's `--compact`.
pub const COMPACT_HELP: &str = "With --json: the document on one line (default: pretty-printed, or [commands] json in the configuration file)";

/// A JSON document as printed: an object carrying `"version": 1` first,
/// pretty-printed unless compact was asked for.
pub fn json_text(mut v: serde_json::Value) -> String {
    if let Some(o) = v.as_object_mut() {
        let mut m = serde_json::Map::new();
        m.insert("version".into(), JSON_VERSION.into());
        for (k, val) in std::mem::take(o) {
            if k != "version" {
                m.insert(k, val);
            }
        }
        v = serde_json::Value::Object(m);
    }
    if COMPACT.load(std::sync::atomic::Ordering::Relaxed) {
        serde_json::to_string(&v).unwrap_or_default()
    } else {
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }
}

/// Print a JSON document (see [`json_text`]).
pub fn print_json(v: serde_json::Value) {
    println!("{}", json_text(v));
}

/// RFC 3339 (UTC, seconds) for an epoch-seconds time.
pub fn rfc3339(secs: u64) -> String {
    // RFC 3339 has four-digit years: a saturated "never" is the last second.
    let s = crate::quarantine::fmt_utc(secs.min(253_402_300_799));
    // "YYYY-MM-DD HH:MM:SS UTC" -> "YYYY-MM-DDTHH:MM:SSZ"
    match s.strip_suffix(" UTC") {
        Some(t) => format!("{}Z", t.replacen(' ', "T", 1)),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn quoting_like_ls() {
        assert_eq!(quote_str("_base/abc-1.part"), "_base/abc-1.part");
        assert_eq!(quote_str("a b"), "'a b'");
        assert_eq!(quote_str("it's"), "'it'\\''s'");
        assert_eq!(quote_str("a\nb"), "'a'$'\\n''b'");
        assert_eq!(quote_str("x\x1b[31my"), "'x'$'\\033''[31my'");
        assert_eq!(quote(OsStr::from_bytes(b"a\xffb")), "'a'$'\\377''b'");
        assert_eq!(quote_str(""), "''");
        assert_eq!(visible("qemu -a\nfake row"), "qemu -a\\nfake row");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }
}
