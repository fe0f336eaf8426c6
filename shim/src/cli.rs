//! Command line of `berth-shim`, kept by hand: three subcommands and one
//! option do not need a parser crate, and the exit codes are part of the
//! contract with the agent (0 clean, 1 something left or failed, 2 usage).

use crate::spec::Outcome;
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

pub const USAGE: &str = "\
usage: berth-shim run <instance-dir> [--proc-root <dir>]
       berth-shim delete <instance-dir> [--proc-root <dir>]
       berth-shim probe-userns [<overlay-test-dir>] [--proc-root <dir>]

  run           start the daemon of <instance-dir>/spec.json in its own namespaces and
                cgroup, supervise it (stdin is the agent's lifeline), tear it all down
                at the end and print the outcome as one JSON line on stdout
  delete        kill and clean an instance from its files alone; prints the outcome
  probe-userns  check that user, mount and pid namespaces work as `run` needs

  --proc-root   procfs to read pids and mounts from (default /proc)

exit: 0 done and nothing left, 1 something left or failed, 2 usage error
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run { dir: PathBuf, proc_root: PathBuf },
    Delete { dir: PathBuf, proc_root: PathBuf },
    Probe { proc_root: PathBuf, overlay: Option<PathBuf> },
    Help,
}

/// Parses the arguments after argv[0].
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let sub = args.next().ok_or("missing subcommand")?;
    let sub = sub.to_str().ok_or("subcommand is not UTF-8")?.to_string();
    if sub == "-h" || sub == "--help" || sub == "help" {
        return Ok(Command::Help);
    }
    let mut proc_root = PathBuf::from("/proc");
    let mut positional = Vec::new();
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("-h" | "--help") => return Ok(Command::Help),
            Some("--proc-root") => proc_root = args.next().ok_or("--proc-root needs a value")?.into(),
            Some(s) if s.starts_with("--proc-root=") => proc_root = s["--proc-root=".len()..].into(),
            Some(s) if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option {s}")),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    if proc_root.as_os_str().is_empty() {
        return Err("--proc-root is empty".into());
    }
    let one_dir = |positional: Vec<PathBuf>| -> Result<PathBuf, String> {
        match <[PathBuf; 1]>::try_from(positional) {
            Ok([d]) if !d.as_os_str().is_empty() => {
                std::path::absolute(&d).map_err(|e| format!("{}: {e}", d.display()))
            }
            Ok(_) => Err("the instance dir is empty".into()),
            Err(v) if v.is_empty() => Err(format!("{sub} needs an instance dir")),
            Err(v) => Err(format!("{sub} takes one instance dir, got {}", v.len())),
        }
    };
    match sub.as_str() {
        "run" => Ok(Command::Run { dir: one_dir(positional)?, proc_root }),
        "delete" => Ok(Command::Delete { dir: one_dir(positional)?, proc_root }),
        "probe-userns" if positional.len() <= 1 => {
            Ok(Command::Probe { proc_root, overlay: positional.into_iter().next() })
        }
        "probe-userns" => Err("probe-userns takes at most one dir (for the overlayfs test)".into()),
        other => Err(format!("unknown subcommand {other:?}")),
    }
}

/// Prints the outcome as one JSON line. Errors are ignored: the agent may
/// be gone (EPIPE), and the outcome is also in the shim's log.
fn emit(out: &Outcome) {
    let line = serde_json::to_string(out).expect("outcome serializes");
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn exit_code(out: &Outcome) -> i32 {
    i32::from(!out.leftovers.is_empty())
}

/// The whole program; returns the exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cmd = match parse(args.into_iter().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprint!("berth-shim: {e}\n{USAGE}");
            return 2;
        }
    };
    match cmd {
        Command::Help => {
            print!("{USAGE}");
            0
        }
        Command::Run { dir, proc_root } => {
            let (out, doomed) = crate::run::run(&dir, &proc_root);
            // The outcome first: the agent frees the slot on it, while the
            // bytes in the trash are removed here (the shim exits after).
            emit(&out);
            let started = std::time::Instant::now();
            let left = crate::teardown::empty_trash(doomed);
            for l in &left {
                crate::log!(out.id, "left in the trash: {l}");
            }
            crate::log!(out.id, "trash emptied in {} ms", started.elapsed().as_millis());
            if left.is_empty() {
                exit_code(&out)
            } else {
                1
            }
        }
        Command::Delete { dir, proc_root } => {
            let out = crate::delete::delete(&dir, &proc_root);
            emit(&out);
            exit_code(&out)
        }
        Command::Probe { proc_root, overlay } => match crate::probe::probe(&proc_root, overlay.as_deref()) {
            Ok(()) => {
                eprintln!("berth-shim: probe-userns: ok");
                0
            }
            Err(e) => {
                eprintln!("berth-shim: probe-userns: {e}");
                1
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn parses_subcommands_and_proc_root() {
        assert_eq!(
            p(&["run", "/s/i1", "--proc-root", "/p"]),
            Ok(Command::Run { dir: "/s/i1".into(), proc_root: "/p".into() })
        );
        assert_eq!(
            p(&["delete", "--proc-root=/q", "/s/i1"]),
            Ok(Command::Delete { dir: "/s/i1".into(), proc_root: "/q".into() })
        );
        assert_eq!(p(&["probe-userns"]), Ok(Command::Probe { proc_root: "/proc".into(), overlay: None }));
        assert_eq!(
            p(&["probe-userns", "/x"]),
            Ok(Command::Probe { proc_root: "/proc".into(), overlay: Some("/x".into()) })
        );
        let Ok(Command::Run { dir, .. }) = p(&["run", "rel"]) else { panic!() };
        assert!(dir.is_absolute() && dir.ends_with("rel"));
    }

    #[test]
    fn rejects_bad_usage_with_a_reason() {
        for (args, want) in [
            (&[][..], "missing subcommand"),
            (&["frobnicate"][..], "unknown subcommand"),
            (&["run"][..], "needs an instance dir"),
            (&["run", "a", "b"][..], "takes one instance dir"),
            (&["delete", "a", "--force"][..], "unknown option --force"),
            (&["run", "a", "--proc-root"][..], "needs a value"),
            (&["probe-userns", "x", "y"][..], "at most one dir"),
        ] {
            let err = p(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }
}
