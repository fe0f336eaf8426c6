//! The binaries under test, found in the target dir, and `fakeclient` runs
//! as separate client processes.

use super::*;

/// The dir holding the workspace's binaries: `$BERTH_BIN_DIR`, or the profile
/// dir of the current executable (`target/debug` for `target/debug/deps/x`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BERTH_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    dir
}

/// Path of the workspace binary `name` (`berth-agent`, `berth-shim`,
/// `fakekitd`, `fakeclient`); panics with what to do when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!(
            "binary {name} not found at {}: run `cargo build --workspace --bins` first \
             (same profile as the tests), or set BERTH_BIN_DIR",
            p.display()
        );
    }
    p
}

// ---------------------------------------------------------------------------
// fakeclient as a separate process

/// A finished fakeclient (or any JSON-printing command) run.
#[derive(Debug, Clone)]
pub struct ClientRun {
    pub status: ExitStatus,
    /// The last stdout line parsed as JSON (`Value::Null` if none parsed).
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl ClientRun {
    /// The gRPC code name of a failed call (`"ResourceExhausted"`), if it failed.
    pub fn error_code(&self) -> Option<&str> {
        self.json.pointer("/error/code").and_then(Value::as_str)
    }
    pub fn error_message(&self) -> Option<&str> {
        self.json.pointer("/error/message").and_then(Value::as_str)
    }
    pub fn ok(&self) -> bool {
        // A failed call prints `{"error": {"code", "message"}}`; a reply may
        // carry its own string `error` field (Fork's), which is no failure.
        self.status.success() && !self.json.get("error").is_some_and(Value::is_object)
    }
}

/// A `fakeclient --socket <socket>` command to add a subcommand to (and, e.g.,
/// `CommandExt::uid` to act as another client).
pub fn fakeclient(socket: &Path) -> Command {
    let mut c = Command::new(bin_path("fakeclient"));
    c.arg("--socket").arg(socket);
    c
}

/// `fakeclient ping` as the client with uid and gid `uid` (a client of
/// its own, in client scope), 20 s timeout; its JSON (Null if unreadable).
pub fn ping_as(socket: &Path, uid: u32) -> Value {
    use std::os::unix::process::CommandExt;
    let mut cmd = fakeclient(socket);
    cmd.args(["--timeout", "20", "ping"]).uid(uid).gid(uid);
    run_json(cmd).json
}

/// Runs `cmd` to completion, capturing stdout/stderr and parsing the last
/// stdout line as JSON.
pub fn run_json(mut cmd: Command) -> ClientRun {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    ClientRun { status: out.status, json, stdout, stderr }
}

/// `fakeclient --socket <socket> <args...>`, run to completion.
pub fn run_fakeclient(socket: &Path, args: &[&str]) -> ClientRun {
    let mut c = fakeclient(socket);
    c.args(args);
    run_json(c)
}
