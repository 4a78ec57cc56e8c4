//! Shell completions and man pages generated from the clap command (for `baseguard gen-docs`).
//!
//! Layout written under the output directory, which `mount-helpers/install.sh --docs DIR`
//! installs:
//!
//! ```text
//! DIR/man1/baseguard.1              the top-level page
//! DIR/man1/baseguard-mount.1        one per visible subcommand (nested ones too)
//! DIR/completions/baseguard.bash    bash-completion
//! DIR/completions/_baseguard        zsh
//! DIR/completions/baseguard.fish    fish
//! ```
//!
//! Hidden subcommands and hidden arguments are left out, as clap's help leaves them out.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// The files written by [`write_completions_and_man`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Man pages, top-level first.
    pub man: Vec<PathBuf>,
    /// Completion scripts: bash, zsh, fish.
    pub completions: Vec<PathBuf>,
}

/// The shells completions are generated for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes man pages to `outdir/man1/` and completions to `outdir/completions/`, creating the
/// directories. The binary name is the command's bin name, else its name.
pub fn write_completions_and_man(cmd: Command, outdir: &Path) -> io::Result<Generated> {
    let bin = cmd
        .get_bin_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let mut cmd = cmd.bin_name(&bin).disable_help_subcommand(true);
    cmd.build();

    let man_dir = outdir.join("man1");
    let comp_dir = outdir.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&comp_dir)?;

    let mut out = Generated::default();
    let source = match cmd.get_version() {
        Some(v) => format!("{bin} {v}"),
        None => bin.clone(),
    };
    write_man(&cmd, &bin, &source, &man_dir, &mut out.man)?;
    let mut hidden = Vec::new();
    hidden_longs(&cmd, &mut hidden);
    let subs: Vec<String> = cmd
        .get_subcommands()
        .filter(|c| c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect();
    for shell in SHELLS {
        let path = clap_complete::generate_to(shell, &mut cmd, &bin, &comp_dir)?;
        // clap_complete offers hidden options too: take them out.
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(&path, drop_hidden(&text, &hidden, &subs))?;
        out.completions.push(path);
    }
    Ok(out)
}

/// Writes `cmd`'s page as `page_name.1`, then each visible subcommand's as
/// `page_name-sub.1`, recursively.
fn write_man(
    cmd: &Command,
    page_name: &str,
    source: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let page = cmd.clone().display_name(page_name.to_string());
    let man = clap_mangen::Man::new(page).source(source.to_string());
    let path = dir.join(format!("{page_name}.1"));
    let mut f = std::fs::File::create(&path)?;
    man.render(&mut f)?;
    f.write_all(extra_sections(cmd).as_bytes())?;
    f.flush()?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("{page_name}-{}", sub.get_name());
        write_man(sub, &name, source, dir, written)?;
    }
    Ok(())
}

/// The long names of hidden options anywhere in the command tree.
fn hidden_longs(cmd: &Command, out: &mut Vec<String>) {
    for a in cmd.get_arguments().filter(|a| a.is_hide_set()) {
        if let Some(l) = a.get_long() {
            out.push(l.to_string());
        }
    }
    for sub in cmd.get_subcommands() {
        hidden_longs(sub, out);
    }
}

/// Remove hidden options and subcommands from a generated completion
/// script: bash `opts` words, zsh `'--name[...]'` and `'name:...'` lines,
/// fish `-l name` and `-a "name"` lines.
fn drop_hidden(text: &str, hidden: &[String], subs: &[String]) -> String {
    let words: Vec<String> = hidden
        .iter()
        .map(|h| format!("--{h}"))
        .chain(subs.iter().cloned())
        .collect();
    let mut out = String::with_capacity(text.len());
    // Inside a bash `case` arm of a hidden option that takes a value.
    let mut in_arm = false;
    for line in text.lines() {
        let t = line.trim_start();
        if in_arm {
            in_arm = t != ";;";
            continue;
        }
        if hidden.iter().any(|h| t == format!("--{h})")) {
            in_arm = true;
            continue;
        }
        let drop = hidden.iter().any(|h| {
            t.starts_with(&format!("'--{h}["))
                || t.starts_with(&format!("\"--{h}["))
                || t.starts_with(&format!("'--{h}=["))
                || t.starts_with(&format!("\"--{h}=["))
                || line.contains(&format!(" -l {h} "))
                || line.ends_with(&format!(" -l {h}"))
        }) || subs
            .iter()
            .any(|c| t.starts_with(&format!("'{c}:")) || line.contains(&format!(" -a \"{c}\"")));
        if drop {
            continue;
        }
        let mut l = line.to_string();
        if t.starts_with("opts=\"") {
            for w in &words {
                l = l
                    .replace(&format!(" {w} "), " ")
                    .replace(&format!(" {w}\""), "\"");
            }
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// roff-escape a line of text.
fn roff(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

/// EXIT STATUS (from the command's "Exit status:" help line, else the
/// general one), FILES, ENVIRONMENT, SIGNALS, LOGGING and SEE ALSO.
fn extra_sections(cmd: &Command) -> String {
    let help = cmd
        .get_after_help()
        .map(|h| h.to_string())
        .unwrap_or_default();
    let exit = help
        .lines()
        .find(|l| l.starts_with("Exit status:"))
        .unwrap_or(crate::cmd::text::EXIT_HELP)
        .trim_start_matches("Exit status:")
        .trim();
    let mut out = String::new();
    out.push_str(".SH \"EXIT STATUS\"\n");
    out.push_str(&roff(exit));
    out.push_str("\n.SH FILES\n");
    out.push_str(&roff(
        "BACKING/.baseguard/ is the quarantine (mode 0700): entries/<id>.json (the record: original path, size, mtime, when, who) and entries/<id>.data (the file), policy.json (the shared retention and min_free), history/*.json (the audit trail of restores and purges, 90 days). /run/baseguard/counters-<pid>.json: each daemon's counters and log destination. /var/log/baseguard.log: the log when neither syslog nor journald listens. /etc/baseguard/baseguard.toml: node-local defaults ([mount]: the mount options; [commands]: dir, quarantine, instances, json), read by the daemon and every command; a flag or mount option wins over it; a bad value or unknown key is an error naming the line (an example is in /usr/share/doc/baseguard/examples/).",
    ));
    out.push_str("\n.SH ENVIRONMENT\n");
    out.push_str(&roff(
        "BASEGUARD_CONFIG: the configuration file to read instead of /etc/baseguard/baseguard.toml (it must then exist; empty: read none; --config FILE wins). RUST_LOG: the log level or directives when no log_level= is given. BASEGUARD_SYSLOG_SOCKET, BASEGUARD_JOURNAL_SOCKET, BASEGUARD_FALLBACK_LOG: replace /dev/log, /run/systemd/journal/socket and /var/log/baseguard.log (containers).",
    ));
    out.push_str("\n.SH SIGNALS\n");
    out.push_str(&roff(
        "The daemon unmounts and exits 0 on SIGTERM and SIGINT, ignores SIGHUP (a reload must never unmount the instances directory), and writes its request counters to --stats-file on SIGUSR1. The other commands end quietly on SIGPIPE (baseguard list | head).",
    ));
    out.push_str("\n.SH LOGGING\n");
    out.push_str(&roff(
        "In the foreground to stderr; detached to log_file= if given, else syslog (/dev/log), else journald's native socket, else /var/log/baseguard.log. 'baseguard status' shows each mount's destination. Every quarantine, restore and purge is one line with key=value fields (id, path, size, why, pid, comm, uid, host).",
    ));
    out.push_str("\n.SH \"SEE ALSO\"\n");
    out.push_str(&roff(
        "mount.fuse.baseguard(8), fstab(5), mount(8), journalctl(1); the README in the source repository.",
    ));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn sample() -> Command {
        Command::new("baseguard")
            .version("0.1.0")
            .about("A FUSE guard over Nova's instances directory")
            .subcommand(
                Command::new("mount")
                    .about("Mount BACKING at MOUNTPOINT")
                    .arg(Arg::new("retain").long("retain").value_name("DUR"))
                    .arg(
                        Arg::new("protect")
                            .long("protect")
                            .action(ArgAction::Append),
                    )
                    .arg(
                        Arg::new("notify")
                            .long("notify-ready")
                            .action(ArgAction::SetTrue)
                            .hide(true),
                    )
                    .arg(
                        Arg::new("secret")
                            .long("secret-json")
                            .value_name("JSON")
                            .hide(true),
                    )
                    .arg(Arg::new("backing").required(true))
                    .arg(Arg::new("mountpoint").required(true)),
            )
            .subcommand(Command::new("gen-docs").hide(true).arg(Arg::new("dir")))
    }

    #[test]
    fn writes_pages_and_completions() {
        let d = tempfile::tempdir().unwrap();
        let g = write_completions_and_man(sample(), d.path()).unwrap();
        let names: Vec<String> = g
            .man
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["baseguard.1", "baseguard-mount.1"]);
        let top = std::fs::read_to_string(&g.man[0]).unwrap();
        assert!(top.contains(".TH baseguard 1"), "{top}");
        assert!(top.contains("mount"));
        assert!(
            !top.contains("gen\\-docs"),
            "hidden subcommand listed: {top}"
        );
        let mount = std::fs::read_to_string(&g.man[1]).unwrap();
        assert!(mount.contains("retain"), "{mount}");
        for section in [
            ".SH \"EXIT STATUS\"",
            ".SH FILES",
            ".SH ENVIRONMENT",
            ".SH SIGNALS",
            ".SH LOGGING",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(mount.contains(section), "{section}: {mount}");
        }
        assert!(mount.contains("\"baseguard 0.1.0\""), "{mount}");
        assert!(!mount.contains("notify"), "{mount}");

        let comp: Vec<String> = g
            .completions
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(comp, ["baseguard.bash", "_baseguard", "baseguard.fish"]);
        for p in &g.completions {
            let text = std::fs::read_to_string(p).unwrap();
            assert!(text.contains("retain"), "{}", p.display());
            assert!(!text.contains("notify-ready"), "{}: {text}", p.display());
            assert!(!text.contains("secret-json"), "{}: {text}", p.display());
            assert!(!text.contains("-a \"gen-docs\""), "{text}");
            assert!(!text.contains("'gen-docs:"), "{text}");
            for l in text.lines().filter(|l| l.trim_start().starts_with("opts=")) {
                assert!(!l.contains("gen-docs"), "{l}");
            }
        }
        assert!(d.path().join("man1/baseguard-mount.1").is_file());
    }
}
