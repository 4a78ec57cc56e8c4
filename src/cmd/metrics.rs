//! `baseguard metrics`: Prometheus text format on stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use crate::cmd::quarantine::{
    Location, baseguard_mounts, init_logging, open_quarantine, resolve_location,
};
use crate::cmd::text::exit;
use crate::heal::References;
use crate::metrics::{self, RunFile};
use crate::policy;

/// `baseguard metrics`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Print metrics in Prometheus text format",
    long_about = "Print metrics in Prometheus text format (# HELP and # TYPE lines): baseguard_up per \
mount, the quarantine's entries, bytes and near misses, the restored/purged/quarantined totals from \
the shared audit trail, and each daemon's own counters (healed, errors). For node_exporter, mount \
with metrics_file=/var/lib/prometheus/node-exporter/baseguard.prom instead.",
    after_help = "Examples:\n  baseguard metrics\n  baseguard metrics --dir /srv/nova-backing | grep near_misses\n\nExit status: 0 printed; 3 could not read the quarantine (the baseguard_up lines are still printed)."
)]
pub struct MetricsArgs {
    #[command(flatten)]
    pub loc: Location,
}

/// Does the mount at `mp` answer within 2 s? (A dead daemon: ENOTCONN; a
/// hung one: no answer.)
fn answers(mp: &std::path::Path) -> bool {
    let (tx, rx) = mpsc::channel();
    let p = mp.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            let _ = tx.send(std::fs::metadata(&p).is_ok());
        });
    spawned.is_ok() && rx.recv_timeout(Duration::from_secs(2)).unwrap_or(false)
}

impl MetricsArgs {
    pub fn run(&self) -> ExitCode {
        init_logging();
        let mounts: Vec<(PathBuf, String, bool)> = baseguard_mounts()
            .into_iter()
            .map(|m| {
                let ok = answers(&m.mountpoint);
                (m.mountpoint, m.source, ok)
            })
            .collect();
        let runs = RunFile::all();
        let mut fams = metrics::daemon_families(&mounts, &runs);
        let mut code = ExitCode::SUCCESS;
        let r = resolve_location(&self.loc)
            .and_then(|b| open_quarantine(&b, &self.loc).map(|q| (b, q)));
        match r {
            Ok((b, Some(q))) => {
                let refs = References::for_backing(
                    std::os::fd::AsFd::as_fd(&b.fd),
                    vec![b.dir.clone(), b.path.clone()],
                );
                let referenced = refs.referenced();
                let here = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&b.fd));
                let near = q
                    .list()
                    .unwrap_or_default()
                    .iter()
                    .filter(|e| referenced.contains(&e.orig_path()))
                    .filter(|e| {
                        std::fs::symlink_metadata(std::path::Path::new(&here).join(e.orig_path()))
                            .is_err()
                    })
                    .count();
                let retain = policy::retain_for_cli(Some(&q), None);
                fams.extend(metrics::quarantine_families(&q, near, retain.as_secs()));
                // Per daemon of this backing directory: the options the
                // shared policy does not apply (alert on > 0).
                if let Ok(Some(p)) = policy::Policy::read(&q) {
                    let mut f = metrics::Family::new(
                        "baseguard_policy_conflicts",
                        "gauge",
                        "Options of this daemon the shared policy does not apply (see 'baseguard status')",
                    );
                    let ours = |r: &&RunFile| {
                        mounts.iter().any(|(mp, source, _)| {
                            *mp == r.mountpoint && std::path::Path::new(source) == b.path
                        })
                    };
                    for r in runs.iter().filter(ours) {
                        f.samples.push((
                            vec![("mountpoint", r.mountpoint.display().to_string())],
                            policy::conflicts_of(&r.options, &p).len() as f64,
                        ));
                    }
                    fams.push(f);
                }
            }
            Ok((_, None)) => {}
            Err(e) => {
                eprintln!("baseguard: {e}");
                code = ExitCode::from(exit::CANNOT);
            }
        }
        print!("{}", metrics::render(&fams));
        code
    }
}
