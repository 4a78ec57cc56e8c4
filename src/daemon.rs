//! Detaching `baseguard mount` without `fork(2)`, with startup errors reported to the caller.
//!
//! `fork` in a multi-threaded Rust program needs `unsafe` and is fragile, so the parent
//! re-executes its own binary instead:
//!
//! ```text
//! parent (baseguard mount BACKING DIR)                 child (same args + --foreground --notify-ready)
//!   spawn_detached(args, 30s) ───── spawn ─────────▶    parse args, set up logging (syslog/file)
//!     stdin=/dev/null, stdout=pipe, stderr=pipe,        set_notify(true)
//!     own process group                                 mount, start the FUSE loop
//!   wait for one line on the child's stdout ◀────────   mount done (INIT answered), notify_ready()
//!     "READY"            → exit 0                       ... or notify_error("one sentence") and exit 1
//!     "ERROR <sentence>" → print it, exit 1
//!     EOF / child exit   → report its stderr tail and exit status, exit 1
//!     timeout            → SIGTERM (then SIGKILL) the child, exit 1
//! ```
//!
//! The parent is what mount(8) (and systemd's mount unit) waits on, so `mount -a` returns only
//! once the filesystem answers, and fails with the child's own sentence when it can't start.
//!
//! The child is the session's supervisor ([`crate::session::supervisor`]): it mounts and
//! starts the serving process, and says READY once that one answers.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Hidden flag telling the re-executed child to report READY/ERROR on stdout.
pub const NOTIFY_FLAG: &str = "--notify-ready";

/// Flag that keeps the re-executed child from detaching again.
pub const FOREGROUND_FLAG: &str = "--foreground";

/// How long the parent waits for READY by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The line the child writes once the filesystem answers.
pub const READY_LINE: &str = "READY";

/// Prefix of the line the child writes when it cannot start.
pub const ERROR_PREFIX: &str = "ERROR ";

/// How much of the child's stderr the parent keeps for its failure report.
const STDERR_KEEP: usize = 8 * 1024;

/// How long to wait for a child that reported ERROR, closed its pipe or was sent SIGTERM.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// The child's arguments: `args` (without argv\[0\]) plus [`FOREGROUND_FLAG`] and
/// [`NOTIFY_FLAG`], inserted before a `--` separator if there is one, else appended.
pub fn child_args<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut v: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let at = v.iter().position(|a| a == "--").unwrap_or(v.len());
    v.splice(
        at..at,
        [OsString::from(FOREGROUND_FLAG), OsString::from(NOTIFY_FLAG)],
    );
    v
}

/// Re-executes the running binary (`std::env::current_exe()`) with `args` (as given to this
/// process, without argv\[0\]) plus `--foreground --notify-ready`, and waits up to `timeout`
/// for it to report READY. Returns the daemon's pid, or one sentence saying why it failed.
pub fn spawn_detached(args: &[OsString], timeout: Duration) -> Result<u32, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the running baseguard binary to detach: {e}"))?;
    spawn_and_wait(&exe, &child_args(args.iter().cloned()), timeout)
}

/// The parent side with an explicit program and exact arguments (no flags added): spawns it
/// with stdin `/dev/null`, stdout and stderr piped, in its own process group, and waits for
/// its READY/ERROR line. Used by [`spawn_detached`] and by tests with a shell stand-in.
pub fn spawn_and_wait(program: &Path, args: &[OsString], timeout: Duration) -> Result<u32, String> {
    let name = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let pid = child.id();

    let stderr_tail = Arc::new(Mutex::new(Vec::<u8>::new()));
    let stderr_done = {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let tail = Arc::clone(&stderr_tail);
        let mut err = child.stderr.take().expect("stderr is piped");
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                t.extend_from_slice(&buf[..n]);
                if t.len() > STDERR_KEEP {
                    let cut = t.len() - STDERR_KEEP;
                    t.drain(..cut);
                }
            }
            let _ = done_tx.send(());
        });
        done_rx
    };

    let (tx, rx) = mpsc::channel::<Option<String>>();
    let out = child.stdout.take().expect("stdout is piped");
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let last = line == READY_LINE || line.starts_with(ERROR_PREFIX);
            if tx.send(Some(line)).is_err() || last {
                // Stop reading: the pipe's read end closes with this thread (or with the
                // parent process), so the daemon must not write to stdout after READY.
                return;
            }
        }
        let _ = tx.send(None);
    });

    let deadline = Instant::now() + timeout;
    let mut noise: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(line)) if line == READY_LINE => return Ok(pid),
            Ok(Some(line)) if line.starts_with(ERROR_PREFIX) => {
                let _ = wait_with_timeout(&mut child, EXIT_GRACE);
                let msg = line[ERROR_PREFIX.len()..].trim();
                return Err(if msg.is_empty() {
                    format!("{name} failed to start without saying why")
                } else {
                    msg.to_string()
                });
            }
            Ok(Some(line)) => {
                if noise.len() < 5 {
                    noise.push(line);
                }
            }
            Ok(None) | Err(RecvTimeoutError::Disconnected) => {
                // stdout closed before READY: normally the child died.
                let status = wait_with_timeout(&mut child, EXIT_GRACE);
                let _ = stderr_done.recv_timeout(Duration::from_millis(500));
                let why = match status {
                    Some(st) => format!("{name} {} before it was ready", describe_exit(st)),
                    None => {
                        terminate(&mut child);
                        format!("{name} closed its status pipe before it was ready and was stopped")
                    }
                };
                return Err(with_details(why, &stderr_tail, &noise));
            }
            Err(RecvTimeoutError::Timeout) => {
                terminate(&mut child);
                let _ = stderr_done.recv_timeout(Duration::from_millis(500));
                let why = format!(
                    "{name} did not become ready within {}s and was stopped",
                    timeout.as_secs_f32()
                );
                return Err(with_details(why, &stderr_tail, &noise));
            }
        }
    }
}

/// "exited with status 3" / "was killed by signal 9".
fn describe_exit(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "exited".to_string(),
    }
}

/// Appends the last lines of the child's stderr (and any unexpected stdout lines).
fn with_details(why: String, stderr_tail: &Mutex<Vec<u8>>, noise: &[String]) -> String {
    let t = stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
    let text = String::from_utf8_lossy(&t);
    let mut lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() > 5 {
        lines.drain(..lines.len() - 5);
    }
    let mut msg = why;
    if !lines.is_empty() {
        msg.push_str("; its last output was: ");
        msg.push_str(&lines.join(" | "));
    } else if !noise.is_empty() {
        msg.push_str("; it printed: ");
        msg.push_str(&noise.join(" | "));
    }
    msg
}

/// Polls `child` until it exits or `limit` passes.
fn wait_with_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// SIGTERM (so a half-started FUSE daemon can unmount), then SIGKILL after a grace period.
fn terminate(child: &mut Child) {
    let sent = crate::sys::kill(child.id() as i32, libc::SIGTERM).is_ok();
    if sent && wait_with_timeout(child, EXIT_GRACE).is_some() {
        return;
    }
    let _ = child.kill();
    let _ = wait_with_timeout(child, EXIT_GRACE);
}

/// The child's side of the handshake. Writes at most one line, then goes quiet.
pub struct Notifier<W: Write> {
    out: Option<W>,
}

impl Notifier<io::Stdout> {
    /// A notifier on stdout; `enabled` is whether the hidden [`NOTIFY_FLAG`] was given.
    pub fn stdout(enabled: bool) -> Self {
        Notifier {
            out: enabled.then(io::stdout),
        }
    }
}

impl<W: Write> Notifier<W> {
    /// A notifier writing to `w` (tests).
    pub fn with_writer(w: W) -> Self {
        Notifier { out: Some(w) }
    }

    /// Whether a line will still be written.
    pub fn is_pending(&self) -> bool {
        self.out.is_some()
    }

    /// Writes `READY`. Does nothing if disabled or already notified.
    pub fn ready(&mut self) -> io::Result<()> {
        self.send(READY_LINE)
    }

    /// Writes `ERROR <msg>`, with line breaks in `msg` turned into spaces.
    /// Does nothing if disabled or already notified.
    pub fn error(&mut self, msg: &str) -> io::Result<()> {
        let one_line: String = msg
            .split(['\n', '\r'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        self.send(&format!("{ERROR_PREFIX}{one_line}"))
    }

    fn send(&mut self, line: &str) -> io::Result<()> {
        match self.out.take() {
            Some(mut w) => {
                w.write_all(line.as_bytes())?;
                w.write_all(b"\n")?;
                w.flush()
            }
            None => Ok(()),
        }
    }
}

static GLOBAL: Mutex<Option<Notifier<io::Stdout>>> = Mutex::new(None);

/// Arms the process-wide notifier; call once at startup with "was `--notify-ready` given".
pub fn set_notify(enabled: bool) {
    *GLOBAL.lock().unwrap_or_else(|p| p.into_inner()) = Some(Notifier::stdout(enabled));
}

/// Whether this process is a detached child that still owes its parent a READY/ERROR line.
pub fn notify_pending() -> bool {
    GLOBAL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(Notifier::is_pending)
}

/// Tells the waiting parent that the filesystem answers (no-op unless armed, and only once).
pub fn notify_ready() {
    if let Some(n) = GLOBAL.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        let _ = n.ready();
    }
}

/// Tells the waiting parent why startup failed, in one sentence (no-op unless armed, once).
/// The caller should then exit non-zero.
pub fn notify_error(msg: &str) {
    if let Some(n) = GLOBAL.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        let _ = n.error(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> Result<u32, String> {
        spawn_and_wait(
            Path::new("/bin/sh"),
            &[OsString::from("-c"), OsString::from(script)],
            timeout,
        )
    }

    fn alive(pid: u32) -> bool {
        // A zombie still has /proc/PID; look at its state letter.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                let after = s.rsplit_once(") ").map(|x| x.1).unwrap_or("");
                !after.starts_with('Z')
            })
            .unwrap_or(false)
    }

    fn kill(pid: u32) {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }

    #[test]
    fn child_args_insert_before_separator() {
        let v = child_args(["mount", "-o", "x", "/a", "/b"]);
        assert_eq!(
            v,
            ["mount", "-o", "x", "/a", "/b", FOREGROUND_FLAG, NOTIFY_FLAG]
        );
        let v = child_args(["mount", "--", "-a", "/b"]);
        assert_eq!(v, ["mount", FOREGROUND_FLAG, NOTIFY_FLAG, "--", "-a", "/b"]);
    }

    #[test]
    fn ready_returns_while_child_keeps_running() {
        let t = Instant::now();
        let pid = sh(
            "echo starting >&2; echo READY; exec sleep 30",
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(alive(pid));
        kill(pid);
    }

    #[test]
    fn unexpected_stdout_lines_are_skipped() {
        let pid = sh("echo hello; echo READY", Duration::from_secs(10)).unwrap();
        assert!(pid > 0);
    }

    #[test]
    fn error_line_is_the_message() {
        let e = sh(
            "echo 'ERROR The backing directory /srv/x does not exist.'; exit 1",
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert_eq!(e, "The backing directory /srv/x does not exist.");
    }

    #[test]
    fn early_exit_reports_status_and_stderr() {
        let e = sh(
            "echo 'thread main panicked: boom' >&2; exit 3",
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            e.contains("sh exited with status 3 before it was ready"),
            "{e}"
        );
        assert!(e.contains("panicked: boom"), "{e}");
    }

    #[test]
    fn killed_child_reports_signal() {
        let e = sh("kill -9 $$", Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("killed by signal 9"), "{e}");
    }

    #[test]
    fn closing_stdout_without_exiting_is_a_failure() {
        let t = Instant::now();
        let e = sh("exec >&-; sleep 30", Duration::from_secs(20)).unwrap_err();
        assert!(e.contains("closed its status pipe"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(15));
    }

    #[test]
    fn timeout_stops_the_child() {
        let t = Instant::now();
        let e = sh("echo waiting >&2; sleep 30", Duration::from_millis(300)).unwrap_err();
        assert!(
            e.contains("did not become ready within 0.3s and was stopped"),
            "{e}"
        );
        assert!(e.contains("waiting"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn child_has_null_stdin_and_its_own_process_group() {
        let script = r#"
            if read x; then echo "ERROR stdin is not /dev/null"; exit 1; fi
            pgid=$(cut -d' ' -f5 /proc/$$/stat)
            if [ "$pgid" != "$$" ]; then echo "ERROR pgid $pgid is not $$"; exit 1; fi
            echo READY
        "#;
        sh(script, Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn missing_program_is_reported() {
        let e = spawn_and_wait(
            Path::new("/nonexistent/baseguard"),
            &[],
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.starts_with("cannot start /nonexistent/baseguard"), "{e}");
    }

    #[test]
    fn notifier_writes_one_line_once() {
        let mut buf = Vec::new();
        let mut n = Notifier::with_writer(&mut buf);
        assert!(n.is_pending());
        n.error("cannot mount:\nno such\r\n device").unwrap();
        assert!(!n.is_pending());
        n.ready().unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "ERROR cannot mount: no such device\n"
        );

        let mut buf = Vec::new();
        Notifier::with_writer(&mut buf).ready().unwrap();
        assert_eq!(buf, b"READY\n");
    }

    #[test]
    fn disabled_notifier_is_silent() {
        let mut n = Notifier::stdout(false);
        assert!(!n.is_pending());
        n.ready().unwrap();
    }
}
