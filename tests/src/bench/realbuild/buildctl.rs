//! The real `buildctl` as figure 12 runs it, and what the figure reads from
//! its plain progress output. A subprocess rather than a Rust client of
//! BuildKit's API: the figure is about what a user's client sees, and
//! buildctl is that client (its context sync, its session, its export).

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// No single buildctl call of the figure may take longer (a real build of
/// the 256 MiB context takes seconds; a hung one fails the figure).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The upstream tools the figure needs (`--buildkitd`, `--buildctl`,
/// `--base-layout`).
#[derive(Debug, Clone)]
pub struct Tools {
    pub buildkitd: PathBuf,
    pub buildctl: PathBuf,
    /// An OCI image layout that stands in for `FROM busybox` (no network).
    pub base_layout: PathBuf,
    /// Its manifest digest (`sha256:...`), from its index.json.
    pub base_digest: String,
}

impl Tools {
    /// Checks the paths and reads the layout's digest: a clear error names
    /// the flag and the path.
    pub fn new(buildkitd: PathBuf, buildctl: PathBuf, base_layout: PathBuf) -> Result<Tools> {
        for (flag, p) in [("--buildkitd", &buildkitd), ("--buildctl", &buildctl)] {
            if !p.is_file() {
                bail!("{flag} {}: no such file", p.display());
            }
        }
        let index = base_layout.join("index.json");
        let raw = std::fs::read(&index).with_context(|| format!("--base-layout: read {}", index.display()))?;
        let base_digest = layout_digest(&raw).with_context(|| format!("--base-layout: {}", index.display()))?;
        Ok(Tools { buildkitd, buildctl, base_layout, base_digest })
    }
}

/// The digest of the first manifest of an OCI layout's index.json.
pub fn layout_digest(index_json: &[u8]) -> Result<String> {
    let v: serde_json::Value = serde_json::from_slice(index_json).context("not JSON")?;
    let d = v["manifests"][0]["digest"].as_str().ok_or_else(|| anyhow!("no manifests[0].digest"))?;
    if !d.starts_with("sha256:") || d.len() != 71 {
        bail!("manifests[0].digest {d:?} is not a sha256 digest");
    }
    Ok(d.to_string())
}

/// What one buildctl call did.
#[derive(Debug)]
pub struct Run {
    pub secs: f64,
    /// stdout and stderr (progress), for the checks and the error text.
    pub output: String,
}

/// Runs buildctl with `args` against `addr` (a socket path), timed from
/// just before the spawn to its exit; fails with the output's tail unless
/// it exits 0.
pub async fn call(tools: &Tools, socket: &Path, args: &[String]) -> Result<Run> {
    let mut cmd = tokio::process::Command::new(&tools.buildctl);
    cmd.arg("--addr")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let t0 = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawn {}", tools.buildctl.display()))?;
    let out = tokio::time::timeout(CALL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("buildctl {} did not end within {CALL_TIMEOUT:?}", args.join(" ")))??;
    let secs = t0.elapsed().as_secs_f64();
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!(
            "buildctl --addr unix://{} {} exited with {}:\n{}",
            socket.display(),
            args.first().map(String::as_str).unwrap_or(""),
            out.status,
            tail(&output, 25)
        );
    }
    Ok(Run { secs, output })
}

/// `buildctl debug workers -v`: connect, ListWorkers answered (`-v` prints
/// the worker's labels, among them its hostname: `berth-<id>` in berth).
pub async fn workers(tools: &Tools, socket: &Path) -> Result<Run> {
    call(tools, socket, &["debug".into(), "workers".into(), "-v".into()]).await
}

/// `buildctl prune --all`: the daemon's whole cache, so that the next build
/// sends its context and runs every step again.
pub async fn prune(tools: &Tools, socket: &Path) -> Result<Run> {
    call(tools, socket, &["prune".into(), "--all".into()]).await
}

/// The args of the figure's build: the Dockerfile frontend, `context` and
/// `dockerfile` as local dirs, `FROM busybox` from the base layout; with
/// `export` the result is sent back to the client into that dir.
pub fn build_args(tools: &Tools, context: &Path, dockerfile: &Path, export: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = ["build", "--progress", "plain", "--frontend", "dockerfile.v0"].map(String::from).to_vec();
    a.push("--local".into());
    a.push(format!("context={}", context.display()));
    a.push("--local".into());
    a.push(format!("dockerfile={}", dockerfile.display()));
    a.push("--oci-layout".into());
    a.push(format!("busybox={}", tools.base_layout.display()));
    a.push("--opt".into());
    a.push(format!("context:busybox=oci-layout://busybox@{}", tools.base_digest));
    if let Some(dest) = export {
        a.push("--output".into());
        a.push(format!("type=local,dest={}", dest.display()));
    }
    a
}

/// The figure's Dockerfile: the context copied in, then a RUN step that
/// reads every byte of it and prints the count (checked by [`read_count`]).
pub const DOCKERFILE: &str = "FROM busybox\nCOPY . /ctx/\nRUN cat /ctx/* | wc -c\n";

/// Bytes of the largest `transferring context: <size>` line of a plain
/// progress output (buildkit prints go-units' decimal sizes: `268.4MB`).
pub fn context_sent(output: &str) -> Option<u64> {
    output
        .lines()
        .filter_map(|l| l.split_once("transferring context:").map(|(_, r)| r))
        .filter_map(|r| r.split_whitespace().next().and_then(parse_size))
        .max()
}

/// `268.4MB` -> 268400000 (decimal units, as go-units' HumanSize).
pub fn parse_size(s: &str) -> Option<u64> {
    let i = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(i);
    let mult = match unit {
        "B" => 1e0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        _ => return None,
    };
    let v: f64 = num.parse().ok()?;
    Some((v * mult) as u64)
}

/// Whether the RUN step printed `want` as its count (a progress line
/// `#7 0.512 268435456`): the step ran and read every byte.
pub fn read_count(output: &str, want: u64) -> bool {
    let w = want.to_string();
    output.lines().any(|l| l.starts_with('#') && l.split_whitespace().last() == Some(w.as_str()))
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_size_is_read_from_plain_progress() {
        let out = "#1 [internal] load build definition from Dockerfile\n\
                   #4 [internal] load build context\n\
                   #4 transferring context: 33.55MB 1.0s\n\
                   #4 transferring context: 268.44MB 2.3s done\n\
                   #4 DONE 2.4s\n";
        assert_eq!(context_sent(out), Some(268_440_000));
        assert_eq!(context_sent("#4 transferring context: 2B done\n"), Some(2));
        assert_eq!(context_sent("#4 transferring dockerfile: 88B done\n"), None);
        assert_eq!(parse_size("1.5kB"), Some(1500));
        assert_eq!(parse_size("12MiB"), None);
        assert_eq!(parse_size("MB"), None);
    }

    #[test]
    fn the_run_steps_count_must_match() {
        let out = "#7 [3/3] RUN cat /ctx/* | wc -c\n#7 0.512 268435456\n#7 DONE 0.9s\n";
        assert!(read_count(out, 268435456));
        assert!(!read_count(out, 268435455));
        assert!(!read_count("#7 DONE 0.9s\n", 268435456));
    }

    #[test]
    fn layout_digest_takes_the_first_manifest() {
        let d = format!("sha256:{}", "a".repeat(64));
        let idx = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{d}","size":1}}]}}"#);
        assert_eq!(layout_digest(idx.as_bytes()).unwrap(), d);
        assert!(layout_digest(br#"{"manifests":[]}"#).is_err());
        assert!(layout_digest(br#"{"manifests":[{"digest":"md5:x"}]}"#).is_err());
        assert!(layout_digest(b"nope").is_err());
    }
}
