//! fakekitd's command line: buildkitd's own flags where fakekitd uses them
//! (`--addr`, `--root`, `--version`), its test knobs, and every other token
//! ignored, since the agent passes buildkitd flags fakekitd does not know.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Args {
    /// `--addr`, repeatable (buildkitd serves on every one).
    pub addrs: Vec<String>,
    /// `--root`; the last one wins.
    pub root: Option<PathBuf>,
    /// `--version`: print the version line and exit 0.
    pub version: bool,
    /// `--fail-start=<msg>`: print msg to stderr and exit 1 before serving.
    pub fail_start: Option<String>,
    /// `--start-delay=<ms>`: sleep this long before binding (or, with
    /// `--socket-early`, between binding and serving).
    pub start_delay: Duration,
    /// `--no-health`: do not serve grpc.health.v1.
    pub no_health: bool,
    /// `--socket-early`: bind the socket before the start delay.
    pub socket_early: bool,
    /// `--require-runc`: as buildkitd, look up buildkit-runc then runc on
    /// PATH, run it, and fail with "failed to find runc binary" without one.
    pub require_runc: bool,
    /// `--no-notify`: ignore NOTIFY_SOCKET, as buildkitd before sd_notify.
    pub no_notify: bool,
    /// `--health-delay=<ms>`: grpc.health.v1 answers NOT_SERVING for this
    /// long after serving starts (READY=1 is still sent at once), so a
    /// test can tell which readiness path won by order.
    pub health_delay: Duration,
    /// Tokens that were not understood and skipped.
    pub ignored: Vec<String>,
}

enum Kind {
    Value,
    Bool,
}

fn kind_of(name: &str) -> Option<Kind> {
    Some(match name {
        "addr" | "root" | "fail-start" | "start-delay" | "health-delay" => Kind::Value,
        "version" | "no-health" | "socket-early" | "require-runc" | "no-notify" => Kind::Bool,
        _ => return None,
    })
}

/// Parses a duration: plain milliseconds (`250`), or with a unit (`250ms`, `2s`).
pub fn parse_millis(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        (s, 1)
    };
    num.trim()
        .parse::<u64>()
        .map(|n| Duration::from_millis(n * mult))
        .map_err(|_| format!("invalid duration {s:?} (milliseconds, or with ms/s)"))
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "t" | "TRUE" | "True" => Ok(true),
        "false" | "0" | "f" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean {v:?} for --{name}")),
    }
}

/// Parses argv after argv[0]. Flags take `--flag value`, `--flag=value`, and
/// the single-dash forms Go's flag parsing (urfave/cli) also accepts. Unknown
/// tokens, including the values of unknown flags, are skipped.
pub fn parse<I, S>(argv: I) -> Result<Args, String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut out = Args::default();
    let mut it = argv.into_iter().map(Into::into);
    while let Some(tok) = it.next() {
        let body = match tok.strip_prefix("--").or_else(|| tok.strip_prefix('-')) {
            Some(b) if !b.is_empty() && !b.starts_with('-') => b,
            _ => {
                out.ignored.push(tok);
                continue;
            }
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let Some(kind) = kind_of(name) else {
            out.ignored.push(tok);
            continue;
        };
        match kind {
            Kind::Bool => {
                let v = match inline {
                    Some(v) => parse_bool(name, &v)?,
                    None => true,
                };
                match name {
                    "version" => out.version = v,
                    "no-health" => out.no_health = v,
                    "socket-early" => out.socket_early = v,
                    "require-runc" => out.require_runc = v,
                    "no-notify" => out.no_notify = v,
                    _ => unreachable!(),
                }
            }
            Kind::Value => {
                let v = match inline {
                    Some(v) => v,
                    None => it.next().ok_or_else(|| format!("flag needs an argument: --{name}"))?,
                };
                match name {
                    "addr" => out.addrs.push(v),
                    "root" => out.root = Some(PathBuf::from(v)),
                    "fail-start" => out.fail_start = Some(v),
                    "start-delay" => out.start_delay = parse_millis(&v)?,
                    "health-delay" => out.health_delay = parse_millis(&v)?,
                    _ => unreachable!(),
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Args {
        parse(args.iter().copied()).unwrap()
    }

    #[test]
    fn both_forms_of_value_flags() {
        let a = p(&["--addr", "unix:///a.sock", "--root=/r1", "--addr=unix:///b.sock", "--root", "/r2"]);
        assert_eq!(a.addrs, vec!["unix:///a.sock", "unix:///b.sock"]);
        assert_eq!(a.root, Some(PathBuf::from("/r2")));
        assert!(a.ignored.is_empty(), "{:?}", a.ignored);
    }

    #[test]
    fn single_dash_forms_are_accepted() {
        let a = p(&["-addr", "unix:///a.sock", "-root=/r"]);
        assert_eq!(a.addrs, vec!["unix:///a.sock"]);
        assert_eq!(a.root, Some(PathBuf::from("/r")));
    }

    #[test]
    fn unknown_flags_and_their_values_are_skipped() {
        let a = p(&[
            "--rootless",
            "--oci-worker-snapshotter",
            "native",
            "--addr",
            "unix:///x.sock",
            "--oci-worker-no-process-sandbox",
            "--debug=true",
            "stray",
            "--root",
            "/var/lib/x",
            "--",
            "-",
        ]);
        assert_eq!(a.addrs, vec!["unix:///x.sock"]);
        assert_eq!(a.root, Some(PathBuf::from("/var/lib/x")));
        assert_eq!(
            a.ignored,
            vec![
                "--rootless",
                "--oci-worker-snapshotter",
                "native",
                "--oci-worker-no-process-sandbox",
                "--debug=true",
                "stray",
                "--",
                "-"
            ]
        );
        assert!(!a.version && !a.no_health && !a.socket_early);
    }

    #[test]
    fn own_knobs() {
        let a = p(&["--fail-start=boom: no", "--start-delay=1500", "--no-health", "--socket-early"]);
        assert_eq!(a.fail_start.as_deref(), Some("boom: no"));
        assert_eq!(a.start_delay, Duration::from_millis(1500));
        assert!(a.no_health && a.socket_early);
        let b = p(&["--fail-start", "x=y", "--start-delay", "2s", "--no-health=false", "--version"]);
        assert_eq!(b.fail_start.as_deref(), Some("x=y"));
        assert_eq!(b.start_delay, Duration::from_secs(2));
        assert!(!b.no_health && b.version);
        assert_eq!(p(&["--start-delay=250ms"]).start_delay, Duration::from_millis(250));
        let c = p(&["--no-notify", "--health-delay=3s"]);
        assert!(c.no_notify && c.health_delay == Duration::from_secs(3));
    }

    #[test]
    fn missing_or_bad_values_are_errors() {
        assert!(parse(["--addr"]).unwrap_err().contains("--addr"));
        assert!(parse(["--start-delay=soon"]).is_err());
        assert!(parse(["--no-health=maybe"]).is_err());
    }

    #[test]
    fn nothing_given_is_all_defaults() {
        assert_eq!(p(&[]), Args::default());
    }
}
