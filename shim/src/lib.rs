//! berth-shim: the per-instance supervisor, after the containerd-shim pattern.
//!
//! The agent is a multi-threaded tokio process, so it never forks into new
//! namespaces itself. It spawns this single-threaded shim, which clones the
//! daemon into new user, mount, pid, ipc and uts namespaces, maps its ids
//! through a parent/child handshake, supervises it, and on the end kills,
//! reaps and wipes. The library half holds the on-disk contract (`spec`) and
//! the cgroup driver, which the agent shares, and the helpers the agent, the
//! shim and the tests all need (`host`, `mountinfo`), kept once.
//!
//! Unsafe policy, stated once: unsafe code is denied crate-wide and allowed
//! in one module, `sys` (with its submodule `sys::loopdev`), where each
//! block carries a `// SAFETY:` comment (`clippy::undocumented_unsafe_blocks`
//! warns otherwise; a unit test below checks both without clippy).
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

/// One line of the shim's own log on stderr, tagged with the instance id.
/// Plain lines are enough: the agent forwards the shim's stderr to its log.
macro_rules! log {
    ($id:expr, $($arg:tt)*) => {
        $crate::log_line(&format!("berth-shim[{}]: {}\n", $id, format_args!($($arg)*)))
    };
}
pub(crate) use log;

/// Writes one whole line to stderr in one write(2). stderr is unbuffered
/// and shared with the agent (and every other shim): `eprintln!` may split
/// a line into several writes, which then interleave with theirs and break
/// the agent's JSON log lines. A write of up to PIPE_BUF bytes is atomic.
pub fn log_line(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub mod cgroup;
pub mod cli;
pub mod delete;
pub mod disk;
pub mod host;
pub mod mountinfo;
pub mod net;
pub mod probe;
pub mod run;
pub mod spec;
pub mod steps;
#[allow(unsafe_code)]
pub mod sys;
pub mod teardown;
pub mod wipe;

#[cfg(test)]
mod policy {
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// Only `sys` (sys.rs and its submodules in sys/) may hold unsafe code
    /// or lift the crate's deny, and each of its unsafe blocks is explained
    /// by a `// SAFETY:` comment above it.
    #[test]
    fn unsafe_code_lives_only_in_sys_and_is_documented() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let is_sys = |f: &Path| f == src.join("sys.rs") || f.starts_with(src.join("sys"));
        let allow = ["#[allow(unsafe", "_code)]"].concat();
        let block = ["unsafe", " {"].concat();
        for f in files.iter().filter(|f| !is_sys(f)) {
            let text = std::fs::read_to_string(f).unwrap();
            let lib = *f == src.join("lib.rs");
            let allowed = if lib { 1 } else { 0 };
            assert_eq!(text.matches(&allow).count(), allowed, "{}: only sys may allow unsafe code", f.display());
            assert!(!text.contains(&block), "{}: unsafe block outside sys", f.display());
        }
        let mut blocks = 0;
        for f in files.iter().filter(|f| is_sys(f)) {
            let lines: Vec<String> = std::fs::read_to_string(f).unwrap().lines().map(String::from).collect();
            for (i, l) in lines.iter().enumerate() {
                if l.contains(&block) && !l.trim_start().starts_with("//") {
                    blocks += 1;
                    let above = &lines[i.saturating_sub(6)..i];
                    assert!(
                        above.iter().any(|a| a.contains("// SAFETY:")),
                        "{}:{}: unsafe block without SAFETY",
                        f.display(),
                        i + 1
                    );
                }
            }
        }
        assert!(blocks > 10, "the scan found sys's unsafe blocks");
    }
}
