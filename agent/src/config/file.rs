//! `--config FILE`: a TOML file whose keys are long flag names, turned into
//! flags placed right after the subcommand, so that the command line (later
//! on it) overrides the file, and the file overrides the environment.
//!
//! Every documented form works for `run`, `check` and `capacity`:
//! `--config F` or `--config=F` before or after the subcommand, or
//! `BERTH_CONFIG=F`. One file may serve all three: a key the subcommand does
//! not take (`listen` for `capacity`) is skipped, while a key no subcommand
//! takes is an error naming it (a typo must not pass silently).
//!
//! Hand-written because clap reads no files; the TOML is parsed by `toml`.

use super::Cli;
use clap::CommandFactory;
use std::ffi::OsString;
use std::path::PathBuf;

/// The argv with the config file's settings spliced in after the subcommand.
pub fn expand_config(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let (path, sub_at) = scan(&argv);
    let Some(path) = path.or_else(|| std::env::var_os("BERTH_CONFIG").map(PathBuf::from)) else {
        return Ok(argv);
    };
    let shown = path.display();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("config file {shown}: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("config file {shown}: {e}"))?;
    let Some(at) = sub_at else {
        // No subcommand: let clap print its usage.
        return Ok(argv);
    };
    let sub = argv[at].to_string_lossy().to_string();
    let (takes, known) = flags_of(&sub);
    let mut flags = Vec::new();
    for (key, value) in table {
        if !known.contains(&key) {
            return Err(format!(
                "config file {shown}: unknown key {key:?}: keys are long flag names without the dashes, such as build-memory"
            ));
        }
        if !takes.contains(&key) {
            continue; // another subcommand's setting
        }
        let values = match value {
            toml::Value::Array(items) => items,
            other => vec![other],
        };
        for v in values {
            let rendered = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(true) => {
                    flags.push(OsString::from(format!("--{key}")));
                    continue;
                }
                toml::Value::Boolean(false) => "false".to_string(),
                other => return Err(format!("config file {shown}: key {key:?}: unsupported value {other}")),
            };
            flags.push(OsString::from(format!("--{key}={rendered}")));
        }
    }
    let mut out = argv[..=at].to_vec();
    out.extend(flags);
    out.extend_from_slice(&argv[at + 1..]);
    Ok(out)
}

/// The `--config` value (the last one wins, as clap's does) and the index of
/// the subcommand: the first word that is neither a flag nor `--config`'s value.
fn scan(argv: &[OsString]) -> (Option<PathBuf>, Option<usize>) {
    let mut path = None;
    let mut sub = None;
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            path = argv.get(i + 1).map(PathBuf::from);
            i += 2;
            continue;
        }
        if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        } else if !a.starts_with('-') && sub.is_none() {
            sub = Some(i);
        }
        i += 1;
    }
    (path, sub)
}

/// The long flags `sub` takes, and those any subcommand takes.
fn flags_of(sub: &str) -> (Vec<String>, Vec<String>) {
    let cmd = Cli::command();
    let longs = |c: &clap::Command| -> Vec<String> {
        c.get_arguments().filter_map(|a| a.get_long()).map(str::to_string).collect()
    };
    let takes = cmd.find_subcommand(sub).map(longs).unwrap_or_default();
    let known = cmd.get_subcommands().flat_map(longs).collect();
    (takes, known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Command;
    use clap::Parser;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("berth.toml");
        std::fs::write(&f, text).unwrap();
        (dir, f.display().to_string())
    }

    /// Every documented form, for each subcommand: the file's build-memory
    /// reaches the parsed settings.
    #[test]
    fn every_form_before_or_after_the_subcommand() {
        let (_d, f) = file("build-memory = \"3Gi\"\nlisten = [\"/x.sock\"]\nnode-memory = \"64Gi\"\n");
        let eq = format!("--config={f}");
        for sub in ["run", "check", "capacity"] {
            let forms: Vec<Vec<&str>> = vec![
                vec!["berth-agent", "--config", &f, sub],
                vec!["berth-agent", &eq, sub],
                vec!["berth-agent", sub, "--config", &f],
                vec!["berth-agent", sub, &eq],
            ];
            for form in forms {
                let argv = expand_config(os(&form)).unwrap();
                let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{form:?} -> {argv:?}: {e}"));
                let memory = match cli.command {
                    Command::Run(r) => {
                        assert_eq!(r.listen, vec![PathBuf::from("/x.sock")], "{form:?}");
                        r.limits.build_memory
                    }
                    Command::Check(c) => c.limits.build_memory,
                    Command::Capacity(c) => {
                        assert_eq!(c.node_memory, Some(64 << 30), "{form:?}");
                        c.limits.build_memory
                    }
                };
                assert_eq!(memory, 3 << 30, "{form:?}");
            }
        }
    }

    #[test]
    fn the_command_line_overrides_the_file_in_either_position() {
        let (_d, f) = file("build-pids = 100\n");
        for form in [
            vec!["berth-agent", "--config", &f, "run", "--build-pids", "200"],
            vec!["berth-agent", "run", "--build-pids", "200", "--config", &f],
        ] {
            let cli = Cli::try_parse_from(expand_config(os(&form)).unwrap()).unwrap();
            let Command::Run(r) = cli.command else { panic!() };
            assert_eq!(r.limits.build_pids, 200, "{form:?}");
        }
    }

    #[test]
    fn an_unknown_key_is_named_and_a_bad_file_is_named() {
        let (_d, f) = file("build-memroy = \"3Gi\"\n");
        let e = expand_config(os(&["berth-agent", "--config", &f, "check"])).unwrap_err();
        assert!(e.contains("build-memroy") && e.contains("berth.toml"), "{e}");
        let (_d, f) = file("build-memory = [");
        assert!(expand_config(os(&["berth-agent", "run", "--config", &f])).unwrap_err().contains("berth.toml"));
        let e = expand_config(os(&["berth-agent", "--config", "/nonexistent/b.toml", "run"])).unwrap_err();
        assert!(e.contains("/nonexistent/b.toml"), "{e}");
    }

    #[test]
    fn scan_skips_the_config_value() {
        let argv = os(&["berth-agent", "--config", "capacity", "check"]);
        assert_eq!(scan(&argv), (Some(PathBuf::from("capacity")), Some(3)));
        assert_eq!(scan(&os(&["berth-agent"])), (None, None));
    }
}
