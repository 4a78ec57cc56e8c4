//! Logging setup: `tracing` to stderr, to a log file, or to syslog through `/dev/log`.
//!
//! Every target keeps structured fields in `key=value` form, so an event such as
//! `info!(action = "quarantine", path = %p, pid, comm, uid, "moved to quarantine")` reads
//! `... moved to quarantine action="quarantine" path=_base/x pid=123 comm="python3" uid=0`
//! wherever it lands. Records from the `log` crate (fuser logs through it) are bridged into
//! `tracing` with `tracing_log::LogTracer`.
//!
//! The filter is an `EnvFilter`: an explicit level/directive string (`--log-level`) wins,
//! then `RUST_LOG`, then `info`.
//!
//! Syslog lines are sent as single datagrams to a unix socket (normally `/dev/log`, owned by
//! journald or rsyslog) with facility `daemon` and ident `baseguard`:
//! - RFC 3164 (default): `<30>baseguard[4242]: INFO baseguard::guard: msg k=v`. The timestamp
//!   field is left out, as the local receivers (journald, rsyslog's imuxsock, syslog-ng) stamp
//!   local messages on receipt and computing local time would need libc's `localtime_r`.
//! - RFC 5424: `<30>1 2026-11-23T21:29:00.123456Z host baseguard 4242 - - INFO ... msg k=v`
//!   with a UTC timestamp, for receivers configured to parse it.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Dispatch, Level, Metadata};
use tracing_log::AsLog;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

/// The default syslog socket.
pub const DEV_LOG: &str = "/dev/log";

/// The syslog ident (program name).
pub const IDENT: &str = "baseguard";

/// syslog facility `daemon` (3).
const FACILITY_DAEMON: u8 = 3;

/// Which syslog wire format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyslogFormat {
    /// `<PRI>ident[pid]: msg` (BSD syslog without the timestamp field).
    Rfc3164,
    /// `<PRI>1 TIMESTAMP HOST ident pid - - msg` with a UTC timestamp.
    Rfc5424,
    /// journald's native protocol (`PRIORITY=`, `SYSLOG_IDENTIFIER=`,
    /// `MESSAGE=` lines), for its socket when there is no `/dev/log`.
    Journald,
}

/// journald's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Where a detached daemon logs when neither syslog nor journald listens.
pub const FALLBACK_LOG: &str = "/var/log/baseguard.log";

/// The target for a detached daemon without `log_file=`: syslog on
/// `/dev/log` if something listens there, else journald's native socket,
/// else [`FALLBACK_LOG`], else stderr; never nowhere without saying so.
/// `BASEGUARD_SYSLOG_SOCKET`, `BASEGUARD_JOURNAL_SOCKET` and
/// `BASEGUARD_FALLBACK_LOG` replace the three paths (for containers and tests).
pub fn detached_target() -> LogTarget {
    let env = |k: &str, d: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(d), PathBuf::from)
    };
    let listens = |p: &Path| UnixDatagram::unbound().and_then(|s| s.connect(p)).is_ok();
    let syslog = env("BASEGUARD_SYSLOG_SOCKET", DEV_LOG);
    if listens(&syslog) {
        return LogTarget::Syslog {
            socket: syslog,
            format: SyslogFormat::Rfc3164,
        };
    }
    let journal = env("BASEGUARD_JOURNAL_SOCKET", JOURNAL_SOCKET);
    if listens(&journal) {
        return LogTarget::Syslog {
            socket: journal,
            format: SyslogFormat::Journald,
        };
    }
    let file = env("BASEGUARD_FALLBACK_LOG", FALLBACK_LOG);
    if OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .is_ok()
    {
        return LogTarget::File(file);
    }
    LogTarget::Stderr
}

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Human-readable lines on stderr (colours only when stderr is a terminal).
    Stderr,
    /// Plain lines appended to this file (created if missing; safe with logrotate's
    /// `copytruncate`, as the file is opened with `O_APPEND`).
    File(PathBuf),
    /// Datagrams to a syslog socket; falls back to [`LogTarget::Stderr`] if it can't connect.
    Syslog {
        /// Usually [`DEV_LOG`].
        socket: PathBuf,
        /// Wire format.
        format: SyslogFormat,
    },
}

impl LogTarget {
    /// Syslog on `/dev/log`, RFC 3164.
    pub fn syslog() -> Self {
        LogTarget::Syslog {
            socket: PathBuf::from(DEV_LOG),
            format: SyslogFormat::Rfc3164,
        }
    }

    /// The usual choice for `baseguard mount`: a log file if one was given, else stderr in
    /// the foreground, else syslog. A re-executed daemon child (`--foreground
    /// --notify-ready`) counts as *not* foreground.
    pub fn choose(foreground: bool, log_file: Option<&Path>) -> Self {
        match (log_file, foreground) {
            (Some(p), _) => LogTarget::File(p.to_path_buf()),
            (None, true) => LogTarget::Stderr,
            (None, false) => LogTarget::syslog(),
        }
    }
}

/// Builds the filter: `level` (e.g. `debug` or `baseguard=debug,fuser=warn`), else
/// `RUST_LOG`, else `info`.
pub fn filter(level: Option<&str>) -> Result<EnvFilter, String> {
    if let Some(l) = level {
        return EnvFilter::try_new(l).map_err(|e| format!("invalid log level `{l}`: {e}"));
    }
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::try_new(&v).map_err(|e| format!("invalid RUST_LOG `{v}`: {e}"))
        }
        _ => Ok(EnvFilter::new("info")),
    }
}

/// Builds a dispatcher for `target` without installing it (tests use it with
/// `tracing::dispatcher::with_default`). Returns it with the target actually in use, which
/// is [`LogTarget::Stderr`] when the syslog socket could not be reached.
pub fn build(target: &LogTarget, level: Option<&str>) -> Result<(Dispatch, LogTarget), String> {
    let filter = filter(level)?;
    let (dispatch, used) = match target {
        LogTarget::Stderr => (stderr_dispatch(filter), LogTarget::Stderr),
        LogTarget::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            let layer = tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(Mutex::new(f));
            (
                Dispatch::new(tracing_subscriber::registry().with(filter).with(layer)),
                target.clone(),
            )
        }
        LogTarget::Syslog { socket, format } => match SyslogWriter::connect(socket, *format) {
            Ok(w) => {
                let layer = tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .without_time()
                    .with_writer(w);
                (
                    Dispatch::new(tracing_subscriber::registry().with(filter).with(layer)),
                    target.clone(),
                )
            }
            Err(_) => (stderr_dispatch(filter), LogTarget::Stderr),
        },
    };
    Ok((dispatch, used))
}

fn stderr_dispatch(filter: EnvFilter) -> Dispatch {
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    Dispatch::new(tracing_subscriber::registry().with(filter).with(layer))
}

/// Installs the global subscriber for `target` and bridges the `log` crate into it.
///
/// Returns the target in use (see [`build`]). Calling it a second time does not panic: it
/// returns an error saying logging is already set up, and the first setup stays.
pub fn init(target: LogTarget, level: Option<&str>) -> Result<LogTarget, String> {
    let (dispatch, used) = build(&target, level)?;
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(|_| "logging is already set up".to_string())?;
    // After the global default is set, so its max level is known; as tracing-subscriber's
    // own try_init does. If some other logger was installed first, keep it.
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(tracing::level_filters::LevelFilter::current().as_log())
        .init();
    Ok(used)
}

/// Shared state of the syslog target.
#[derive(Debug)]
struct SyslogShared {
    path: PathBuf,
    format: SyslogFormat,
    pid: u32,
    host: String,
    sock: Mutex<Option<UnixDatagram>>,
}

/// A `MakeWriter` that sends each event as one syslog datagram.
#[derive(Debug, Clone)]
pub struct SyslogWriter {
    shared: Arc<SyslogShared>,
}

impl SyslogWriter {
    /// Connects to the datagram socket at `path`.
    pub fn connect(path: &Path, format: SyslogFormat) -> io::Result<Self> {
        let sock = UnixDatagram::unbound()?;
        sock.connect(path)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "-".to_string());
        Ok(SyslogWriter {
            shared: Arc::new(SyslogShared {
                path: path.to_path_buf(),
                format,
                pid: std::process::id(),
                host,
                sock: Mutex::new(Some(sock)),
            }),
        })
    }

    /// Formats one syslog datagram for `msg` at `level` (public for tests and reuse).
    pub fn format_line(&self, level: Level, msg: &str) -> String {
        format_line(
            self.shared.format,
            level,
            &self.shared.host,
            self.shared.pid,
            SystemTime::now(),
            msg,
        )
    }
}

/// syslog severity for a tracing level.
fn severity(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Builds one datagram. `msg` has its trailing line break removed and inner ones turned into
/// spaces so that a receiver never splits an event.
pub fn format_line(
    format: SyslogFormat,
    level: Level,
    host: &str,
    pid: u32,
    now: SystemTime,
    msg: &str,
) -> String {
    let pri = FACILITY_DAEMON * 8 + severity(level);
    let msg = msg
        .trim_end_matches(['\n', '\r'])
        .replace(['\n', '\r'], " ");
    match format {
        SyslogFormat::Rfc3164 => format!("<{pri}>{IDENT}[{pid}]: {msg}"),
        SyslogFormat::Rfc5424 => {
            format!(
                "<{pri}>1 {} {host} {IDENT} {pid} - - {msg}",
                rfc3339_utc(now)
            )
        }
        SyslogFormat::Journald => format!(
            "PRIORITY={}\nSYSLOG_FACILITY={FACILITY_DAEMON}\nSYSLOG_IDENTIFIER={IDENT}\nSYSLOG_PID={pid}\nMESSAGE={msg}\n",
            severity(level)
        ),
    }
}

/// `2026-11-23T21:29:00.123456Z` from a `SystemTime`, without a date library.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:06}Z",
        d.subsec_micros()
    )
}

impl SyslogShared {
    fn send(&self, line: &str) {
        let mut guard = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.as_ref()
            && s.send(line.as_bytes()).is_ok()
        {
            return;
        }
        // The receiver may have restarted (journald, rsyslog): reconnect once.
        *guard = UnixDatagram::unbound()
            .and_then(|s| s.connect(&self.path).map(|_| s))
            .ok();
        if let Some(s) = guard.as_ref()
            && s.send(line.as_bytes()).is_ok()
        {
            return;
        }
        let _ = writeln!(io::stderr(), "{line}");
    }
}

/// One event being written; sent on drop.
pub struct SyslogLine {
    shared: Arc<SyslogShared>,
    level: Level,
    buf: Vec<u8>,
}

impl Write for SyslogLine {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        if text.trim().is_empty() {
            return;
        }
        let line = format_line(
            self.shared.format,
            self.level,
            &self.shared.host,
            self.shared.pid,
            SystemTime::now(),
            &text,
        );
        self.shared.send(&line);
    }
}

impl<'a> MakeWriter<'a> for SyslogWriter {
    type Writer = SyslogLine;

    fn make_writer(&'a self) -> SyslogLine {
        SyslogLine {
            shared: Arc::clone(&self.shared),
            level: Level::INFO,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> SyslogLine {
        SyslogLine {
            shared: Arc::clone(&self.shared),
            level: *meta.level(),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn quarantine_event() {
        tracing::info!(
            action = "quarantine",
            path = "_base/x",
            id = 42u64,
            pid = 123u32,
            comm = "python3",
            uid = 0u32,
            "moved to quarantine"
        );
    }

    #[test]
    fn file_target_appends_plain_lines_with_fields() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("baseguard.log");
        std::fs::write(&p, "old line\n").unwrap();
        let (dispatch, used) = build(&LogTarget::File(p.clone()), Some("debug")).unwrap();
        assert_eq!(used, LogTarget::File(p.clone()));
        tracing::dispatcher::with_default(&dispatch, || {
            quarantine_event();
            tracing::trace!("filtered out");
            tracing::warn!(error = "EIO", "heal failed");
        });
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "old line");
        assert!(lines[1].contains(" INFO "), "{text}");
        assert!(
            lines[1].contains(
                r#"moved to quarantine action="quarantine" path="_base/x" id=42 pid=123 comm="python3" uid=0"#
            ),
            "{text}"
        );
        assert!(lines[2].contains(" WARN ") && lines[2].contains(r#"error="EIO""#));
        assert!(!text.contains('\x1b'), "no colours in files");
    }

    #[test]
    fn bad_level_and_unwritable_file_are_errors() {
        let e = build(&LogTarget::Stderr, Some("info,=[")).err().unwrap();
        assert!(e.starts_with("invalid log level"), "{e}");
        let e = build(&LogTarget::File("/nonexistent/dir/x.log".into()), None)
            .err()
            .unwrap();
        assert!(
            e.starts_with("cannot open log file /nonexistent/dir/x.log"),
            "{e}"
        );
    }

    #[test]
    fn syslog_target_sends_one_datagram_per_event() {
        let d = tempfile::tempdir().unwrap();
        let sock_path = d.path().join("log");
        let rx = UnixDatagram::bind(&sock_path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let target = LogTarget::Syslog {
            socket: sock_path.clone(),
            format: SyslogFormat::Rfc3164,
        };
        let (dispatch, used) = build(&target, Some("info")).unwrap();
        assert_eq!(used, target);
        tracing::dispatcher::with_default(&dispatch, || {
            quarantine_event();
            tracing::error!("multi\nline");
        });
        let mut buf = [0u8; 4096];
        let n = rx.recv(&mut buf).unwrap();
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        let pid = std::process::id();
        assert!(
            line.starts_with(&format!("<30>baseguard[{pid}]: ")),
            "{line}"
        );
        assert!(
            line.ends_with(
                r#"moved to quarantine action="quarantine" path="_base/x" id=42 pid=123 comm="python3" uid=0"#
            ),
            "{line}"
        );
        assert!(!line.contains('\n'));
        let n = rx.recv(&mut buf).unwrap();
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            line.starts_with(&format!("<27>baseguard[{pid}]: ")),
            "{line}"
        );
        assert!(line.ends_with("multi line"), "{line}");
    }

    #[test]
    fn syslog_reconnects_after_receiver_restart() {
        let d = tempfile::tempdir().unwrap();
        let sock_path = d.path().join("log");
        let rx = UnixDatagram::bind(&sock_path).unwrap();
        let w = SyslogWriter::connect(&sock_path, SyslogFormat::Rfc3164).unwrap();
        drop(rx);
        std::fs::remove_file(&sock_path).unwrap();
        let rx = UnixDatagram::bind(&sock_path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        w.shared.send("<30>baseguard[1]: again");
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"<30>baseguard[1]: again");
    }

    #[test]
    fn journald_format_and_fallback_chain() {
        let l = format_line(
            SyslogFormat::Journald,
            Level::WARN,
            "h",
            7,
            SystemTime::now(),
            "a\nb\n",
        );
        assert_eq!(
            l,
            "PRIORITY=4\nSYSLOG_FACILITY=3\nSYSLOG_IDENTIFIER=baseguard\nSYSLOG_PID=7\nMESSAGE=a b\n"
        );
    }

    #[test]
    fn rfc5424_format() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_987_740_123_456);
        let line = format_line(
            SyslogFormat::Rfc5424,
            Level::WARN,
            "compute1",
            77,
            t,
            "msg k=v\n",
        );
        assert_eq!(
            line,
            "<28>1 2026-11-29T21:29:00.123456Z compute1 baseguard 77 - - msg k=v"
        );
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn missing_syslog_socket_falls_back_to_stderr() {
        let target = LogTarget::Syslog {
            socket: "/nonexistent/dev-log".into(),
            format: SyslogFormat::Rfc3164,
        };
        let (_, used) = build(&target, None).unwrap();
        assert_eq!(used, LogTarget::Stderr);
    }

    #[test]
    fn choose_target() {
        assert_eq!(LogTarget::choose(true, None), LogTarget::Stderr);
        assert_eq!(LogTarget::choose(false, None), LogTarget::syslog());
        assert_eq!(
            LogTarget::choose(true, Some(Path::new("/l"))),
            LogTarget::File("/l".into())
        );
    }

    #[test]
    fn init_twice_does_not_panic_and_bridges_log() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("global.log");
        let first = init(LogTarget::File(p.clone()), Some("info"));
        let second = init(LogTarget::Stderr, Some("info"));
        assert!(second.unwrap_err().contains("already set up"));
        if first.is_ok() {
            tracing_log::log::warn!(target: "fuser::session", "from the log crate");
            tracing_log::log::debug!(target: "fuser::request", "below the level");
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.contains("from the log crate"), "{text}");
            assert!(!text.contains("below the level"), "{text}");
        }
    }
}
