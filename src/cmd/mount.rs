//! `baseguard mount`: serve BACKING at MOUNTPOINT until unmounted or signalled.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use fuser::{MountOption, SessionACL};

use crate::cmd::health;
use crate::daemon;
use crate::fs::{FsOptions, Passthrough, Protection};
use crate::guard::{DEFAULT_IGNORE, DEFAULT_PROTECT, Guard, LiveGuard};
use crate::heal::{BaseLayout, References};
use crate::logging::{self, LogTarget};
use crate::metrics::RunFile;
use crate::mountopts::{FstabOptions, parse_duration};
use crate::policy::{self, MinFree, Note, Policy};
use crate::quarantine::Quarantine;
use crate::session::{server, supervisor};
use crate::sys;

/// Options of `baseguard mount`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  baseguard mount /srv/nova-nfs /var/lib/nova/instances
  baseguard mount /var/lib/nova/instances /var/lib/nova/instances   # over the same path
  baseguard mount --threads 16 --stats-file /run/baseguard.stats /srv/nfs /mnt/guarded

  baseguard mount /var/lib/nova/instances/_base /var/lib/nova/instances/_base   # _base alone

Stop it with `umount MOUNTPOINT`, `baseguard umount MOUNTPOINT`, Ctrl-C or SIGTERM: it
unmounts and exits 0. While files are open through the mount it refuses (EBUSY, logging
who holds them) and keeps serving; `baseguard umount --lazy MOUNTPOINT` detaches anyway.
A dead baseguard mount at MOUNTPOINT (its daemon killed) is detached and replaced.
SIGUSR1 writes the request counters to --stats-file.

When BACKING is named `_base` (or --instances is given), baseguard serves Nova's image
cache alone: everything in it is protected (`**`, except `*.part` and `*.converted`),
and instance disks, found in the parent directory (or --instances), never pass through
FUSE.

Exit status: 0 mounted (detached) or unmounted cleanly (foreground); 1 could not mount (the reason in one sentence) or a usage error; mount.fuse.baseguard maps these to mount(8)'s codes.")]
pub struct MountArgs {
    /// The real directory (e.g. the NFS-shared instances directory).
    pub backing: PathBuf,
    /// Where to show it. May be the same path as BACKING: the backing
    /// directory is opened before mounting and reached through that descriptor.
    pub mountpoint: PathBuf,
    /// Options in fstab style, e.g. `-o retain=14d,protect=_base/**,threads=8,noatime`
    /// (see mount.fuse.baseguard(8)); explicit flags win over them.
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Stay in the foreground (for systemd services and debugging). Without
    /// it, baseguard detaches once the filesystem answers, and reports any
    /// start-up error before returning.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Internal: tell the detaching parent when the mount is ready.
    #[arg(long, hide = true)]
    pub notify_ready: bool,
    /// Internal: this process serves a session its supervisor hands it on stdin.
    #[arg(long, hide = true)]
    pub session_server: bool,
    /// Internal: the serving process of a detached mount (logs as a detached daemon).
    #[arg(long, hide = true)]
    pub log_target_detached: bool,
    /// Internal: the configuration file as the mounting process read it (JSON),
    /// so the processes it starts apply exactly that.
    #[arg(long, hide = true, value_name = "JSON")]
    pub config_json: Option<String>,
    /// Benchmarking only: do not hand handles to the supervisor (a killed server then loses
    /// open files and locks), to measure what the hand-over costs.
    #[arg(long, hide = true)]
    pub no_handover: bool,
    /// Worker threads serving requests, so a slow NFS call or a blocked lock
    /// does not hold up the rest [default: 8].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// Serve file data through the daemon instead of kernel FUSE passthrough
    /// (much slower; for kernels without CONFIG_FUSE_PASSTHROUGH or debugging).
    #[arg(long)]
    pub no_passthrough: bool,
    /// How requests reach the daemon: `dev` (/dev/fuse), `uring` (FUSE-over-io_uring when
    /// the kernel allows it, else /dev/fuse; a request held by a serving process that is
    /// killed or upgraded can be lost) or `auto` (today /dev/fuse) [default: auto].
    #[arg(long, value_enum)]
    pub transport: Option<crate::session::ring::Choice>,
    /// Mount read-only.
    #[arg(long)]
    pub ro: bool,
    /// Let only root use the mount (by default every user may, as Nova,
    /// libvirt and qemu run as different users).
    #[arg(long, conflicts_with = "allow_other")]
    pub root_only: bool,
    /// Let every user use the mount (the default; accepted for fstab's
    /// `allow_other`).
    #[arg(long)]
    pub allow_other: bool,
    /// Log to this file instead of stderr (foreground) or syslog (detached).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Write request counters as JSON here on SIGUSR1 and at exit.
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,
    /// Quarantine directory; must be on the same filesystem as BACKING
    /// (default: BACKING/.baseguard, hidden from the mount).
    #[arg(long, value_name = "DIR")]
    pub quarantine: Option<PathBuf>,
    /// The instances directory, when BACKING is Nova's `_base` alone (the
    /// `_base`-only layout; default: BACKING's parent when BACKING is named
    /// `_base`). Read for restore on access and expiry through a descriptor
    /// opened before mounting, never through the mount.
    #[arg(long, value_name = "DIR")]
    pub instances: Option<PathBuf>,
    /// Protect paths matching GLOB (relative to the mount root; `*` within a
    /// name, `**` across directories). Repeatable; replaces the default
    /// `_base/**`.
    #[arg(long, value_name = "GLOB")]
    pub protect: Vec<String>,
    /// Let deletions of paths matching GLOB through. Repeatable; replaces the
    /// default `_base/*.part` and `_base/*.converted` (Nova's download
    /// temporaries).
    #[arg(long, value_name = "GLOB")]
    pub ignore: Vec<String>,
    /// Keep quarantined files at least this long before the daemon purges
    /// them (files an instance disk references are kept regardless): e.g.
    /// 30m, 12h, 14d [default: 14d].
    #[arg(long, value_name = "AGE", value_parser = parse_duration)]
    pub retain: Option<Duration>,
    /// Free-space floor: when the backing filesystem has less available
    /// space than this (`10%`, `20G`), the oldest quarantined files no
    /// instance disk references are purged until it is back above. Stored in
    /// the shared policy.
    #[arg(long, value_name = "N%|SIZE")]
    pub min_free: Option<String>,
    /// Log level (`warn`, `info`, `debug`, or a tracing directive such as
    /// `baseguard=debug`) [default: RUST_LOG, else info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Write metrics in Prometheus text format to this file every 15 s (for
    /// node_exporter's textfile collector: a `*.prom` file in its directory).
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Do not restore quarantined base files that an instance disk still
    /// references when they are looked up (restore on access is on by default).
    #[arg(long)]
    pub no_heal: bool,
    /// Turn the guard off: deletions under _base/ really delete. For
    /// benchmarking the bare passthrough only.
    #[arg(long, hide = true)]
    pub unguarded: bool,
    /// Behave as over NFS: no RENAME_EXCHANGE, no RENAME_NOREPLACE (tests
    /// cover the serialized fallbacks with it).
    #[arg(long, hide = true)]
    pub emulate_nfs: bool,
    /// The kernel flags given with `-o` (for `status`).
    #[arg(skip)]
    pub kernel_flags: Vec<String>,
}

/// Errors before the filesystem is up, each one sentence for the operator.
fn preflight(a: &MountArgs) -> Result<(OwnedFd, PathBuf, PathBuf), String> {
    if sys::geteuid() != 0 {
        return Err(
            "baseguard mount must run as root (it switches to each caller's \
                    uid/gid per request and uses kernel FUSE passthrough)."
                .into(),
        );
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse does not exist: load the fuse module (modprobe fuse) \
                    or give the container the device."
                .into(),
        );
    }
    let backing = std::fs::canonicalize(&a.backing).map_err(|e| {
        format!(
            "backing directory {} cannot be opened: {}",
            a.backing.display(),
            e
        )
    })?;
    let mountpoint = std::fs::canonicalize(&a.mountpoint).map_err(|e| {
        format!(
            "mountpoint {} cannot be used: {}",
            a.mountpoint.display(),
            e
        )
    })?;
    if !mountpoint.is_dir() {
        return Err(format!(
            "mountpoint {} is not a directory.",
            mountpoint.display()
        ));
    }
    if let Some(m) = mounted_at(&mountpoint) {
        if m == "fuse.baseguard" {
            return Err(format!(
                "mountpoint {} is busy: baseguard is already mounted there.",
                mountpoint.display()
            ));
        }
    }
    let fd = sys::open_path(&backing, libc::O_PATH | libc::O_DIRECTORY).map_err(|e| {
        format!(
            "backing directory {} cannot be opened: {}",
            backing.display(),
            e
        )
    })?;
    Ok((fd, backing, mountpoint))
}

/// The filesystem type mounted exactly at `path`, if any (topmost).
fn mounted_at(path: &Path) -> Option<String> {
    let mounts = crate::mountinfo::read().ok()?;
    crate::mountinfo::topmost(&mounts, path).map(|m| m.fstype.clone())
}

fn write_stats(path: &Path, fs: &Passthrough) {
    let (inodes, fds) = fs.inode_counts();
    let mut v = fs.stats.to_json();
    if let Some(o) = v.as_object_mut() {
        o.insert("inodes".into(), inodes.into());
        o.insert("descriptors".into(), fds.into());
    }
    let tmp = path.with_extension("tmp");
    let r = std::fs::write(&tmp, v.to_string()).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), error = %e, "cannot write stats file");
    }
}

/// Kernel mount flags from fstab-style names (already validated by
/// [`FstabOptions`]); the ones fuser cannot express are the kernel defaults.
fn kernel_option(name: &str) -> Option<MountOption> {
    Some(match name {
        "noatime" => MountOption::NoAtime,
        "atime" => MountOption::Atime,
        "nosuid" => MountOption::NoSuid,
        "suid" => MountOption::Suid,
        "nodev" => MountOption::NoDev,
        "dev" => MountOption::Dev,
        "noexec" => MountOption::NoExec,
        "exec" => MountOption::Exec,
        "sync" => MountOption::Sync,
        "async" => MountOption::Async,
        "dirsync" => MountOption::DirSync,
        "default_permissions" => MountOption::DefaultPermissions,
        _ => return None,
    })
}

/// The protect and ignore globs of the `_base`-only layout (relative to
/// the mount root, which is `_base` itself).
pub const BASE_LAYOUT_PROTECT: &[&str] = &["**"];
/// Nova's download temporaries, let through in the `_base`-only layout.
pub const BASE_LAYOUT_IGNORE: &[&str] = &["*.part", "*.converted"];

impl MountArgs {
    /// The guard: `--protect`/`--ignore` if given, else the layout's defaults.
    fn guard(&self, base_layout: bool) -> Result<Guard, String> {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (dp, di) = if base_layout {
            (own(BASE_LAYOUT_PROTECT), own(BASE_LAYOUT_IGNORE))
        } else {
            (own(DEFAULT_PROTECT), own(DEFAULT_IGNORE))
        };
        Guard::from_options(
            Some(if self.protect.is_empty() {
                &dp
            } else {
                &self.protect
            }),
            Some(if self.ignore.is_empty() {
                &di
            } else {
                &self.ignore
            }),
        )
    }

    /// Fold `-o` options, then the configuration file's `[mount]` table, into
    /// the flags: a flag wins over a mount option, which wins over the file.
    fn apply_options(&mut self) -> Result<Vec<MountOption>, String> {
        let o = if self.options.is_empty() {
            FstabOptions::default()
        } else {
            FstabOptions::parse(&self.options.join(",")).map_err(|e| e.to_string())?
        };
        self.check_absolute()?;
        let c = crate::config::get().mount.clone();
        let from_file = |v: &Option<String>| v.as_deref().map(parse_duration).transpose();
        self.retain = self.retain.or(o.retain).or(from_file(&c.retain)?);
        if !self.no_heal {
            self.no_heal = !o.heal.or(c.heal).unwrap_or(true);
        }
        if !self.no_passthrough {
            self.no_passthrough = !o.passthrough.or(c.passthrough).unwrap_or(true);
        }
        let kernel = self.apply_fstab(o);
        self.quarantine = self.quarantine.take().or(c.quarantine);
        self.instances = self.instances.take().or(c.instances);
        if self.protect.is_empty() {
            self.protect = c.protect;
        }
        if self.ignore.is_empty() {
            self.ignore = c.ignore;
        }
        self.threads = self.threads.or(c.threads);
        self.transport = self.transport.or(c
            .transport
            .as_deref()
            .and_then(crate::session::ring::Choice::parse));
        self.log_file = self.log_file.take().or(c.log_file);
        self.stats_file = self.stats_file.take().or(c.stats_file);
        self.min_free = self.min_free.take().or(c.min_free);
        self.log_level = self.log_level.take().or(c.log_level);
        self.metrics_file = self.metrics_file.take().or(c.metrics_file);
        Ok(kernel)
    }

    /// Node-local files (log, metrics, stats) given as flags must be absolute
    /// too: the daemon detaches, and fstab has no working directory.
    fn check_absolute(&self) -> Result<(), String> {
        for (flag, p) in [
            ("--log-file", &self.log_file),
            ("--stats-file", &self.stats_file),
            ("--metrics-file", &self.metrics_file),
        ] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                return Err(format!(
                    "{flag} {} is not an absolute path (write it from /).",
                    p.display()
                ));
            }
        }
        Ok(())
    }

    /// The `-o` options' part of [`Self::apply_options`].
    fn apply_fstab(&mut self, o: FstabOptions) -> Vec<MountOption> {
        self.retain = self.retain.or(o.retain);
        self.quarantine = self.quarantine.take().or(o.quarantine);
        self.instances = self.instances.take().or(o.instances);
        if self.protect.is_empty() {
            self.protect = o.protect;
        }
        if self.ignore.is_empty() {
            self.ignore = o.ignore;
        }
        self.threads = self.threads.or(o.threads.map(|t| t as u32));
        self.transport = self.transport.or(o
            .transport
            .as_deref()
            .and_then(crate::session::ring::Choice::parse));
        self.log_file = self.log_file.take().or(o.log_file);
        self.stats_file = self.stats_file.take().or(o.stats_file);
        self.min_free = self.min_free.take().or(o.min_free);
        self.log_level = self.log_level.take().or(o.log_level);
        self.metrics_file = self.metrics_file.take().or(o.metrics_file);
        self.ro |= o.read_only == Some(true);
        self.kernel_flags = o.kernel.clone();
        o.kernel.iter().filter_map(|k| kernel_option(k)).collect()
    }

    /// `args` with the configuration this process applies handed on (before a
    /// `--`), unless they carry it already.
    fn with_config(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
        if args
            .iter()
            .any(|a| a.to_string_lossy().starts_with("--config-json"))
        {
            return args;
        }
        let mut args = args;
        let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
        args.insert(
            at,
            format!("--config-json={}", crate::config::get().to_json()).into(),
        );
        args
    }

    pub fn run(mut self) -> ExitCode {
        if self.session_server {
            return self.serve();
        }
        daemon::set_notify(self.notify_ready);
        let kernel = match self.apply_options() {
            Ok(k) => k,
            Err(msg) => return fail(&msg),
        };
        // A dead baseguard mount (its daemon killed) would make the
        // mountpoint unusable: detach it here, in the caller's sight.
        match health::clear_dead_mount(&self.mountpoint) {
            Ok(Some(done)) => eprintln!("baseguard: {done}"),
            Ok(None) => {}
            Err(msg) => return fail(&msg),
        }
        if let Err(why) = self.min_free.as_deref().map(MinFree::parse).transpose() {
            return fail(&format!("--min-free is invalid: {why}."));
        }
        if let Some(l) = &self.log_level
            && let Err(why) = logging::filter(Some(l))
        {
            return fail(&why);
        }
        // A log file that cannot be written would leave a detached daemon
        // logging nowhere: refuse before mounting.
        if let Some(p) = &self.log_file
            && let Err(e) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
        {
            return fail(&format!(
                "log file {} cannot be written: {}.",
                p.display(),
                crate::cmd::text::io_reason(&e)
            ));
        }
        if !self.foreground {
            // Detach: run ourselves again in the foreground and return once
            // it says the filesystem answers (or why it could not start).
            let args = Self::with_config(std::env::args_os().skip(1).collect());
            return match daemon::spawn_detached(&args, daemon::DEFAULT_READY_TIMEOUT) {
                Ok(_) => ExitCode::SUCCESS,
                Err(msg) => fail(&msg),
            };
        }
        let mut target = LogTarget::choose(!self.notify_ready, self.log_file.as_deref());
        if matches!(target, LogTarget::Syslog { .. }) {
            // Detached: syslog, else journald, else a file; never nowhere.
            target = logging::detached_target();
        }
        let used = match logging::init(target, self.log_level.as_deref()) {
            Ok(u) => u,
            Err(e) => return fail(&e),
        };
        match self.mount(kernel, log_destination(&used)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                tracing::error!("{msg}");
                fail(&msg)
            }
        }
    }

    /// The supervisor: mount, and keep a serving process answering until unmounted.
    fn mount(&self, kernel: Vec<MountOption>, log: String) -> Result<(), String> {
        tracing::info!(log = %log, mountpoint = %self.mountpoint.display(), "logging to {log}");
        let (root, backing, mountpoint) = preflight(self)?;
        let (flags, options) = mount_data(&kernel, self.ro, !self.root_only);
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the running baseguard binary: {e}"))?;
        // The server gets the same arguments, minus the READY handshake (the supervisor
        // answers the parent), plus the flag that makes it a server.
        let mut server_args: Vec<std::ffi::OsString> = Self::with_config(
            std::env::args_os()
                .skip(1)
                .filter(|a| a != daemon::NOTIFY_FLAG)
                .collect(),
        );
        let at = server_args
            .iter()
            .position(|a| a == "--")
            .unwrap_or(server_args.len());
        server_args.insert(at, supervisor::SERVER_FLAG.into());
        if self.notify_ready {
            server_args.insert(at, "--log-target-detached".into());
        }
        supervisor::run(supervisor::Plan {
            mountpoint,
            backing,
            root,
            flags,
            options,
            exe,
            server_args,
            notify_ready: self.notify_ready,
        })
    }

    /// A serving process: take the session from the supervisor and answer it.
    fn serve(mut self) -> ExitCode {
        // A panic must not leave a half-working server: die, and the supervisor starts
        // another at once.
        std::panic::set_hook(Box::new(|info| {
            tracing::error!("serving process panicked: {info}");
            eprintln!("baseguard: serving process panicked: {info}");
            std::process::abort();
        }));
        // The options first: they carry log_level= and log_file= from fstab.
        let applied = self.apply_options();
        let detached = self.log_target_detached;
        let mut target = LogTarget::choose(!detached, self.log_file.as_deref());
        if matches!(target, LogTarget::Syslog { .. }) {
            // Detached: syslog, else journald, else a file; never nowhere.
            target = logging::detached_target();
        }
        let log = match logging::init(target, self.log_level.as_deref()) {
            Ok(used) => log_destination(&used),
            Err(e) => {
                eprintln!("baseguard: {e}");
                "stderr".to_string()
            }
        };
        let att = match server::attach() {
            Ok(a) => a,
            Err(msg) => {
                eprintln!("baseguard: {msg}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(msg) = applied.and_then(|_| self.serve_on(att, log)) {
            tracing::error!("{msg}");
            return ExitCode::FAILURE;
        }
        ExitCode::SUCCESS
    }

    fn serve_on(&self, att: server::Attached, log: String) -> Result<(), String> {
        let r = self.build(&att);
        let Built {
            fs,
            quarantine,
            refs,
            qdir,
            min_free,
            policy: shared,
            guard,
        } = match r {
            Ok(x) => x,
            Err(msg) => {
                att.failed(&msg);
                return Err(msg);
            }
        };
        let (backing, mountpoint) = (att.backing.clone(), att.mountpoint.clone());
        // SIGUSR1 (forwarded by the supervisor) writes the stats; SIGINT is the
        // supervisor's (a terminal's Ctrl-C reaches the whole process group).
        let sigs = [libc::SIGUSR1, libc::SIGINT, libc::SIGHUP];
        sys::block_signals(&sigs).map_err(|e| format!("cannot set up signals: {e}"))?;
        let stats_path = self.stats_file.clone();
        let fs_sig = Arc::clone(&fs);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                while let Ok(sig) = sys::wait_signal(&sigs) {
                    if sig == libc::SIGUSR1 {
                        if let Some(p) = &stats_path {
                            write_stats(p, &fs_sig);
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
        let threads = self.threads.unwrap_or(8) as usize;
        let acl = if self.root_only {
            SessionACL::Owner
        } else {
            SessionACL::All
        };
        let generation = att.generation();
        let detached = self.log_target_detached;
        let handover = !self.no_handover;
        let transport = self.transport.unwrap_or_default();
        let r = att.serve(
            Arc::clone(&fs),
            !self.no_passthrough,
            acl,
            threads,
            handover,
            transport,
            || {
                tracing::info!(
                    backing = %backing.display(),
                    mountpoint = %mountpoint.display(),
                    threads,
                    generation,
                    pid = std::process::id(),
                    "serving"
                );
                // Without kernel passthrough, base images reach the daemon
                // in ~1 MiB read requests rather than 128 KiB ones.
                match crate::bdi::raise_readahead(&mountpoint, crate::bdi::READ_KIB) {
                    Ok(kib) => tracing::debug!(kib, "readahead window"),
                    Err(e) => tracing::debug!(error = %e, "readahead window left as it is"),
                }
                if detached {
                    if let Err(e) = sys::redirect_stdio_to_devnull() {
                        tracing::warn!(error = %e, "cannot detach from the starting terminal");
                    }
                }
                if let Some(q) = quarantine {
                    if let Err(e) = self.housekeeping(
                        q,
                        &fs,
                        refs,
                        &log,
                        qdir,
                        min_free,
                        shared,
                        guard,
                        (&backing, &mountpoint),
                    ) {
                        tracing::error!("{e}");
                    }
                }
            },
        );
        REPORTER_STOP.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(RunFile::path(std::process::id()));
        if let Some(p) = &self.stats_file {
            write_stats(p, &fs);
        }
        r?;
        tracing::info!(mountpoint = %mountpoint.display(), "unmounted");
        Ok(())
    }

    /// The serving process's housekeeping: its counters and metrics
    /// (reporter), expiry under the shared policy and the free-space floor
    /// (sweeper).
    #[allow(clippy::too_many_arguments)]
    fn housekeeping(
        &self,
        q: Arc<Quarantine>,
        fs: &Arc<Passthrough>,
        refs: Arc<References>,
        log: &str,
        qdir: Option<PathBuf>,
        min_free: Option<MinFree>,
        shared: Option<Policy>,
        guard: Arc<LiveGuard>,
        // The backing directory and mountpoint as the supervisor resolved
        // them (absolute: the arguments may be relative).
        (backing, mountpoint): (&Path, &Path),
    ) -> Result<(), String> {
        let purged = Arc::new(AtomicU64::new(0));
        let backing_fd = fs
            .root_fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot start the expiry thread: {e}"))?;
        let threads = self.threads.unwrap_or(8);
        spawn_reporter(Reporter {
            q: Arc::clone(&q),
            fs: Arc::clone(fs),
            refs: Arc::clone(&refs),
            run: RunFile {
                pid: std::process::id(),
                mountpoint: mountpoint.to_path_buf(),
                backing: backing.to_path_buf(),
                log: log.to_string(),
                options: self.options_in_effect(&qdir, threads, guard.node(), backing),
                ..Default::default()
            },
            metrics_file: self.metrics_file.clone(),
            purged: Arc::clone(&purged),
        })?;
        let q2 = Arc::clone(&q);
        let start_policy = shared.clone().unwrap_or_else(|| {
            Policy::new(self.retain.unwrap_or(DEFAULT_RETAIN), min_free, "mount")
        });
        spawn_sweeper(Sweeper {
            q,
            purged,
            own_retain: self.retain,
            own_min_free: min_free,
            policy: shared.unwrap_or_else(|| {
                Policy::new(self.retain.unwrap_or(DEFAULT_RETAIN), min_free, "mount")
            }),
            refs,
            backing: backing_fd,
        })?;
        spawn_glob_watch(q2, guard, start_policy)
    }

    /// The filesystem over the backing directory the supervisor handed over.
    fn build(&self, att: &server::Attached) -> Result<Built, String> {
        let root = att
            .root
            .try_clone()
            .map_err(|e| format!("cannot duplicate the backing directory's descriptor: {e}"))?;
        let (backing, mountpoint) = (&att.backing, &att.mountpoint);
        let limit = sys::raise_nofile_limit().unwrap_or(1024);
        // Half of the descriptors for cached inodes, the rest for open files.
        let fd_cache = (limit.saturating_sub(512) / 2).clamp(64, 1 << 16) as usize;
        // Relative paths in options are relative to the backing directory,
        // never to wherever `mount -a` happened to run.
        let instances = self.instances.as_ref().map(|p| backing.join(p));
        let layout = BaseLayout::detect(backing, instances.as_deref())?;
        let guard = self.guard(layout.is_some())?;
        if let Some(l) = &layout {
            tracing::info!(
                instances = %l.instances_path.display(),
                "_base-only layout: everything in the mount is protected; instance disks are read from the instances directory, not through the mount"
            );
        }
        // A relative quarantine= is relative to the backing directory, never
        // to wherever `mount -a` happened to run.
        let qdir = self.quarantine.as_ref().map(|p| backing.join(p));
        let quarantine = if self.unguarded {
            None
        } else {
            let q = Quarantine::open(root.as_fd(), qdir.as_deref()).map_err(|e| e.to_string())?;
            if self.emulate_nfs {
                q.force_link_fallback();
            }
            Some(Arc::new(q))
        };
        let min_free = self
            .min_free
            .as_deref()
            .map(MinFree::parse)
            .transpose()
            .map_err(|why| format!("--min-free is invalid: {why}."))?;
        let guard = Arc::new(LiveGuard::new(guard));
        let shared = quarantine.as_ref().map(|q| {
            let mut r = policy::reconcile_stored(q, self.retain, min_free);
            apply_shared_globs(&guard, &r.policy);
            r.notes.extend(policy::ignore_conflict(
                &guard.node().ignore_globs(),
                &r.policy,
            ));
            log_policy_notes(&r.notes, &r.policy);
            r.policy
        });
        let mut fs = Passthrough::new(
            root,
            FsOptions {
                fd_cache,
                nofile: limit,
                no_exchange: self.emulate_nfs,
            },
        )
        .map_err(|e| format!("cannot serve {}: {e}", backing.display()))?;
        let refs = Arc::new(References::for_layout(
            fs.root_fd().as_fd(),
            layout,
            vec![mountpoint.clone(), backing.clone()],
        ));
        if let Some(q) = &quarantine {
            fs.protect(Protection {
                guard: Arc::clone(&guard),
                quarantine: Arc::clone(q),
                heal: (!self.no_heal).then(|| Arc::clone(&refs)),
                quarantined: Default::default(),
                mountpoint: mountpoint.clone(),
            });
        }
        Ok(Built {
            fs: Arc::new(fs),
            quarantine,
            refs,
            qdir,
            min_free,
            policy: shared,
            guard,
        })
    }
}

/// Put the shared policy's globs in force on this node. Globs that do not
/// compile (a hand-edited policy.json) leave the ones in force as they are.
fn apply_shared_globs(guard: &LiveGuard, p: &Policy) {
    match p.shared_guard() {
        Ok(g) => guard.set_shared(g),
        Err(e) => tracing::error!("{e}; the globs in force stay as they were"),
    }
}

/// What a serving process builds over the backing directory.
struct Built {
    fs: Arc<Passthrough>,
    quarantine: Option<Arc<Quarantine>>,
    refs: Arc<References>,
    /// The quarantine directory (`quarantine=`, resolved against the backing one).
    qdir: Option<PathBuf>,
    min_free: Option<MinFree>,
    /// The shared policy as this node found (and proposed) it.
    policy: Option<Policy>,
    /// This node's globs and the shared ones.
    guard: Arc<LiveGuard>,
}

/// `MS_*` flags and the option string for mount(2) (after `fd=,rootmode=,user_id=,
/// group_id=`): nosuid and nodev unless asked otherwise, as fuser does.
fn mount_data(kernel: &[MountOption], ro: bool, allow_other: bool) -> (u64, String) {
    let mut flags = 0u64;
    if !kernel.contains(&MountOption::Dev) {
        flags |= libc::MS_NODEV;
    }
    if !kernel.contains(&MountOption::Suid) {
        flags |= libc::MS_NOSUID;
    }
    if ro {
        flags |= libc::MS_RDONLY;
    }
    let mut opts: Vec<&str> = Vec::new();
    for k in kernel {
        flags |= match k {
            MountOption::NoDev => libc::MS_NODEV,
            MountOption::NoSuid => libc::MS_NOSUID,
            MountOption::RO => libc::MS_RDONLY,
            MountOption::NoExec => libc::MS_NOEXEC,
            MountOption::NoAtime => libc::MS_NOATIME,
            MountOption::Sync => libc::MS_SYNCHRONOUS,
            MountOption::DirSync => libc::MS_DIRSYNC,
            MountOption::DefaultPermissions => {
                opts.push("default_permissions");
                0
            }
            _ => 0,
        };
    }
    if allow_other {
        opts.push("allow_other");
    }
    (flags, opts.join(","))
}

/// Log what reconciling this node's options with the shared policy found:
/// conflicts loudly (warn), changes as info.
fn log_policy_notes(notes: &[Note], p: &Policy) {
    for n in notes {
        match n {
            Note::Conflict { .. }
            | Note::FloorConflict { .. }
            | Note::WriteFailed(_)
            | Note::IgnoreConflict { .. } => {
                tracing::warn!(retain_secs = p.retain_secs, "{n}")
            }
            _ => tracing::info!(retain_secs = p.retain_secs, "{n}"),
        }
    }
}

/// The daemon's housekeeping thread and what it needs.
struct Sweeper {
    q: Arc<Quarantine>,
    /// Entries this daemon's sweeps purged (for the metrics).
    purged: Arc<AtomicU64>,
    /// This node's `retain=`/`min_free=` (proposals to the shared policy).
    own_retain: Option<Duration>,
    own_min_free: Option<MinFree>,
    /// The policy in force (re-read before each sweep).
    policy: Policy,
    refs: Arc<References>,
    backing: OwnedFd,
}

/// How often the shared globs are re-read (by their own thread: a sweep may
/// take long, scanning many instance disks, and more protection must not
/// wait for it).
const GLOBS_EVERY: Duration = Duration::from_secs(2);

/// Keep the guard's shared layer equal to the shared policy's globs: more
/// protection from the next request on, less logged loudly.
fn spawn_glob_watch(
    q: Arc<Quarantine>,
    guard: Arc<LiveGuard>,
    mut last: Policy,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("policy-globs".into())
        .spawn(move || {
            loop {
                std::thread::sleep(GLOBS_EVERY);
                if REPORTER_STOP.load(Ordering::SeqCst) {
                    return;
                }
                // A missing or unreadable file changes nothing here (the
                // sweeper writes a lost one back).
                let Ok(Some(p)) = Policy::read(&q) else {
                    continue;
                };
                if let Some((reduced, what)) = p.glob_change(&last) {
                    apply_shared_globs(&guard, &p);
                    let by = format!("{} at {}", p.set_by, crate::quarantine::fmt_utc(p.set_at));
                    if reduced {
                        tracing::warn!(
                            set_by = %p.set_by,
                            "PROTECTION REDUCED by the shared policy ({what}), set by {by}; files this node already reached through a protected name stay protected until the kernel forgets them"
                        );
                    } else {
                        tracing::info!(set_by = %p.set_by, "protection changed by the shared policy ({what}), set by {by}; in force now");
                    }
                    if let Some(n) = policy::ignore_conflict(&guard.node().ignore_globs(), &p) {
                        log_policy_notes(&[n], &p);
                    }
                }
                last = p;
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the policy thread: {e}"))
}

/// How often the free-space floor is checked (one statvfs).
const FLOOR_TICK: Duration = Duration::from_secs(1);
/// The shared policy is re-read every this many ticks.
const POLICY_TICKS: u64 = 2;

impl MountArgs {
    /// The options this daemon runs with, as `key=value` (node-local ones;
    /// retention and min_free as this node proposed them: the shared policy
    /// may differ, see `baseguard policy`).
    fn options_in_effect(
        &self,
        qdir: &Option<PathBuf>,
        threads: u32,
        node: &Guard,
        backing: &Path,
    ) -> Vec<String> {
        let mut o = vec![
            format!("threads={threads}"),
            format!("transport={}", self.transport.unwrap_or_default().name()),
            format!("heal={}", if self.no_heal { "off" } else { "on" }),
            format!(
                "passthrough={}",
                if self.no_passthrough { "off" } else { "on" }
            ),
        ];
        if let Some(r) = self.retain {
            o.push(format!("retain={}", crate::mountopts::format_duration(r)));
        }
        if let Some(m) = &self.min_free {
            o.push(format!("min_free={m}"));
        }
        if let Some(q) = qdir {
            o.push(format!("quarantine={}", q.display()));
        }
        if let Some(i) = &self.instances {
            o.push(format!("instances={}", backing.join(i).display()));
        }
        // This node's globs as in force (the layout's defaults included);
        // the shared ones are the policy's (`status` shows both).
        o.extend(node.protect_globs().iter().map(|g| format!("protect={g}")));
        o.extend(node.ignore_globs().iter().map(|g| format!("ignore={g}")));
        if let Some(l) = &self.log_level {
            o.push(format!("log_level={l}"));
        }
        if let Some(p) = &self.log_file {
            o.push(format!("log_file={}", p.display()));
        }
        if let Some(p) = &self.metrics_file {
            o.push(format!("metrics_file={}", p.display()));
        }
        if let Some(p) = &self.stats_file {
            o.push(format!("stats_file={}", p.display()));
        }
        o.push(if self.ro { "ro" } else { "rw" }.into());
        o.push(
            if self.root_only {
                "root_only"
            } else {
                "allow_other"
            }
            .into(),
        );
        o.extend(self.kernel_flags.iter().cloned());
        if let Some(f) = &crate::config::get().file {
            o.push(format!("config={}", f.display()));
        }
        o
    }
}

/// Purge expired quarantine entries now and then (often enough that an entry
/// outlives the retention by at most a tenth of it, 1 s to 1 h), applying
/// the shared policy as it is when each sweep starts; and check the
/// free-space floor every second. Entries that an instance disk still
/// references are kept (and logged).
fn spawn_sweeper(mut s: Sweeper) -> Result<(), String> {
    std::thread::Builder::new()
        .name("expiry".into())
        .spawn(move || {
            let mut next_sweep = std::time::Instant::now();
            let mut ticks: u64 = 0;
            loop {
                // Another node or `policy set` may change the policy: look
                // every few seconds, and sweep at once when it changed.
                if ticks % POLICY_TICKS == 0 && s.refresh_policy() {
                    next_sweep = std::time::Instant::now();
                }
                ticks += 1;
                if std::time::Instant::now() >= next_sweep {
                    let retain = s.policy.retain();
                    // Computed once per sweep, from a scan made now.
                    let needed = s.refs.keeper(&s.q);
                    let n = s
                        .q
                        .purge_expired(retain, &|e| s.expiry_keep(e, &needed))
                        .iter()
                        .filter(|o| matches!(o, crate::quarantine::PurgeOutcome::Purged(_)))
                        .count();
                    s.purged.fetch_add(n as u64, Ordering::Relaxed);
                    crate::audit::trim(&s.q);
                    let every =
                        (retain / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
                    next_sweep = std::time::Instant::now() + every;
                }
                if let Some(floor) = s.policy.min_free {
                    // What disks need, from a scan made now (only when the
                    // floor is crossed: enforce asks only then).
                    type Keep = Box<dyn Fn(&crate::quarantine::Entry) -> Option<String>>;
                    let needed: std::cell::OnceCell<Keep> = std::cell::OnceCell::new();
                    let run = crate::floor::enforce(&s.q, s.backing.as_fd(), floor, &|e| {
                        needed.get_or_init(|| Box::new(s.refs.keeper(&s.q)))(e)
                    });
                    s.purged
                        .fetch_add(run.purged.len() as u64, Ordering::Relaxed);
                    if run.still_below && !run.purged.is_empty() {
                        tracing::warn!(
                            min_free = %floor,
                            "still below the free-space floor: every remaining quarantined file is referenced by an instance disk"
                        );
                    }
                }
                std::thread::sleep(FLOOR_TICK);
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the expiry thread: {e}"))
}

impl Sweeper {
    /// Why an expired entry must stay: an instance disk references its path
    /// and the path is empty (restoring it may be needed). A displaced copy
    /// whose path holds a file again (rename-over, truncation of an image in
    /// use) is not kept past the retention.
    /// `needed`: what instance disks need, through quarantined links of
    /// their chains too ([`References::keeper`]).
    fn expiry_keep(
        &self,
        e: &crate::quarantine::Entry,
        needed: &dyn Fn(&crate::quarantine::Entry) -> Option<String>,
    ) -> Option<String> {
        let root = PathBuf::from(format!("/proc/self/fd/{}", self.backing.as_raw_fd()));
        if std::fs::symlink_metadata(root.join(e.orig_path())).is_ok() {
            return None;
        }
        needed(e)
    }

    /// Re-read the shared policy; re-apply this node's options to it the way
    /// mounting does (a longer retain raises it, a conflict is logged once).
    /// Returns whether the policy in force changed.
    fn refresh_policy(&mut self) -> bool {
        match Policy::read(&self.q) {
            Ok(Some(p)) if p == self.policy => false,
            Ok(None) => {
                // A lost file must not drop the retention or the shared
                // globs to this node's own options: write back the last one.
                tracing::warn!(
                    "the shared policy file is gone; writing back the policy in force (retention, floor and globs are never dropped by a lost file)"
                );
                if let Err(e) = self.policy.write(&self.q) {
                    tracing::warn!(error = %e, "cannot write the shared policy back");
                }
                false
            }
            Ok(Some(_)) => {
                let r = policy::reconcile_stored(&self.q, self.own_retain, self.own_min_free);
                if r.policy.retain_secs != self.policy.retain_secs
                    || r.policy.min_free != self.policy.min_free
                {
                    tracing::warn!(
                        from_secs = self.policy.retain_secs,
                        to_secs = r.policy.retain_secs,
                        min_free = %r.policy.min_free.map(|m| m.to_string()).unwrap_or_else(|| "none".into()),
                        "the shared policy changed"
                    );
                    log_policy_notes(&r.notes, &r.policy);
                }
                let changed = r.policy != self.policy;
                self.policy = r.policy;
                changed
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shared policy; keeping the last one");
                false
            }
        }
    }
}

/// Where the log goes, for people: a path, `syslog` or `stderr`.
fn log_destination(t: &LogTarget) -> String {
    match t {
        LogTarget::Stderr => "stderr".into(),
        LogTarget::File(p) => p.display().to_string(),
        LogTarget::Syslog {
            socket,
            format: logging::SyslogFormat::Journald,
        } => format!("journald ({})", socket.display()),
        LogTarget::Syslog { socket, .. } => format!("syslog ({})", socket.display()),
    }
}

/// The daemon's publishing thread and what it needs.
struct Reporter {
    q: Arc<Quarantine>,
    fs: Arc<Passthrough>,
    refs: Arc<References>,
    run: RunFile,
    metrics_file: Option<PathBuf>,
    purged: Arc<AtomicU64>,
}

/// Set once the session ended, so the run file is not written again after
/// it is removed.
static REPORTER_STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How often the run file (tmpfs, a few hundred bytes) is rewritten.
const RUN_FILE_EVERY: Duration = Duration::from_secs(2);
/// How often (in run-file periods) the metrics file is rewritten (~15 s:
/// it lists the quarantine).
const METRICS_EVERY: u32 = 7;

/// Publish this daemon's counters (run file, for `baseguard metrics` and
/// `status`) every [`RUN_FILE_EVERY`] and, with `metrics_file=`, the
/// Prometheus textfile about every 15 s; both at once at start.
fn spawn_reporter(mut r: Reporter) -> Result<(), String> {
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let mut warned = false;
            let mut n: u32 = 0;
            loop {
                if REPORTER_STOP.load(Ordering::SeqCst) {
                    return;
                }
                r.run.counters = r.fs.stats.to_json();
                r.run.transport = crate::session::ring::current().to_string();
                r.run.purged = r.purged.load(Ordering::Relaxed);
                if let Err(e) = r.run.write()
                    && !warned
                {
                    warned = true;
                    tracing::warn!(error = %e, dir = crate::metrics::RUN_DIR, "cannot publish this daemon's counters");
                }
                if let Some(p) = &r.metrics_file
                    && n % METRICS_EVERY == 0
                {
                    let text = r.metrics_text();
                    let tmp = p.with_extension("prom.tmp");
                    let w = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, p));
                    if let Err(e) = w {
                        tracing::warn!(path = %p.display(), error = %e, "cannot write the metrics file");
                    }
                }
                n = n.wrapping_add(1);
                std::thread::sleep(RUN_FILE_EVERY);
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the metrics thread: {e}"))
}

impl Reporter {
    fn metrics_text(&self) -> String {
        let mp = (
            self.run.mountpoint.clone(),
            self.run.backing.display().to_string(),
            true,
        );
        let mut fams = crate::metrics::daemon_families(&[mp], std::slice::from_ref(&self.run));
        let root = PathBuf::from(format!("/proc/self/fd/{}", self.fs.root_fd().as_raw_fd()));
        let referenced = self.refs.referenced();
        let near = self
            .q
            .list()
            .unwrap_or_default()
            .iter()
            .filter(|e| referenced.contains(&e.orig_path()))
            .filter(|e| std::fs::symlink_metadata(root.join(e.orig_path())).is_err())
            .count();
        let retain = Policy::read(&self.q)
            .ok()
            .flatten()
            .map_or(DEFAULT_RETAIN, |p| p.retain());
        fams.extend(crate::metrics::quarantine_families(
            &self.q,
            near,
            retain.as_secs(),
        ));
        crate::metrics::render(&fams)
    }
}

/// Report a start-up failure: to the detaching parent if there is one, and
/// on stderr.
fn fail(msg: &str) -> ExitCode {
    if daemon::notify_pending() {
        daemon::notify_error(msg);
    } else {
        eprintln!("baseguard: {msg}");
    }
    ExitCode::FAILURE
}

/// How long quarantined files are kept by default.
pub const DEFAULT_RETAIN: Duration = policy::DEFAULT_RETAIN;
