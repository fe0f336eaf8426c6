//! The operator's `buildkitd.toml` fragment (`--buildkitd-config FILE`):
//! registry mirrors, private CAs, plain-HTTP registries, GC policies and any
//! other BuildKit setting, merged into every instance's generated config.
//!
//! One load path serves `run` (at start and on each reload) and `check`:
//! 1. parse with `toml` (a syntax error names line and column);
//! 2. `rules`: refuse an unknown top-level table, and every key berth owns
//!    (the socket, `root`, the OTEL socket, the worker settings berth relies
//!    on) with the key and the reason; clamp GC sizes to the disk budget;
//! 3. `files`: read every file the fragment points to (registry CAs, client
//!    key pairs, `tlsconfigdir`s) once, check it is PEM, and keep its bytes;
//!    the paths in the fragment become paths under `<instance dir>/certs/`.
//!
//! At spawn, `merge` lays the fragment over berth's generated table and
//! `files::install` writes the copies, readable only by that instance's
//! mapped root. A running instance keeps the config and copies it started
//! with; `reload` swaps in a new fragment for the next instances.
//!
//! Positions come from `toml_edit` (the `toml` crate drops key spans once
//! parsed); the hash is sha256 of the fragment and of every file it names.

pub mod files;
pub mod reload;
pub mod rules;
#[cfg(test)]
mod tests;

pub use reload::Source;

use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// The sub dir of an instance dir holding the copied files (mode 0500, the
/// instance's mapped root's).
pub const CERTS_DIR: &str = "certs";

#[derive(Debug, thiserror::Error)]
pub enum BkConfigError {
    #[error("--buildkitd-config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("--buildkitd-config {path}:{line}:{column}: not valid TOML: {message}")]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    #[error("--buildkitd-config {path}:{line}:{column}: unknown table or key {key:?}: {known}")]
    Unknown { path: PathBuf, line: usize, column: usize, key: String, known: String },
    #[error("--buildkitd-config {path}:{line}:{column}: key {key} is set by berth and may not be set here: {reason}")]
    Owned { path: PathBuf, line: usize, column: usize, key: String, reason: String },
    #[error("--buildkitd-config {path}:{line}:{column}: key {key}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, key: String, message: String },
    #[error("--buildkitd-config {path}: key {key} names {file}: {source}")]
    File { path: PathBuf, key: String, file: PathBuf, source: std::io::Error },
    #[error("--buildkitd-config {path}: key {key} names {file}, which is not a PEM {expected}: {detail}")]
    NotPem { path: PathBuf, key: String, file: PathBuf, expected: &'static str, detail: String },
}

impl BkConfigError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            BkConfigError::Read { .. } => "read",
            BkConfigError::Syntax { .. } => "syntax",
            BkConfigError::Unknown { .. } => "unknown_key",
            BkConfigError::Owned { .. } => "owned_key",
            BkConfigError::Invalid { .. } => "invalid",
            BkConfigError::File { .. } => "file",
            BkConfigError::NotPem { .. } => "not_pem",
        }
    }
}

/// The fix for an error, in plain words (`check` prints it).
pub fn fix(e: &BkConfigError) -> String {
    match e {
        BkConfigError::Read { .. } => "mount the file (the chart's buildkitd.config ConfigMap) or fix --buildkitd-config".into(),
        BkConfigError::Syntax { .. } => "fix the TOML at that line and column".into(),
        BkConfigError::Unknown { .. } => "use BuildKit's buildkitd.toml tables only (see docs/troubleshooting.md)".into(),
        BkConfigError::Owned { .. } => "remove the key: berth sets it for every instance (see docs/troubleshooting.md)".into(),
        BkConfigError::Invalid { .. } => "give the key the type buildkitd.toml documents".into(),
        BkConfigError::File { .. } => "mount the file where the fragment names it (the chart's buildkitd.certs Secret is mounted at /etc/berth/buildkitd-certs)".into(),
        BkConfigError::NotPem { .. } => "give the file in PEM; convert DER with `openssl x509 -inform der -in FILE -out FILE.pem`".into(),
    }
}

/// A loaded, validated fragment: what every new instance gets.
#[derive(Debug, Clone)]
pub struct Fragment {
    pub path: PathBuf,
    /// The operator's table, GC sizes clamped, file paths relative to the
    /// instance dir (`certs/...`).
    pub table: Table,
    /// The files to copy into each instance.
    pub files: Vec<files::Copy>,
    /// sha256 (hex) of the fragment text and of every file it names.
    pub hash: String,
    /// One line per GC size that was lowered to the disk budget.
    pub clamped: Vec<String>,
}

/// A position in the fragment, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub line: usize,
    pub column: usize,
}

/// Reads, validates and resolves the fragment. `disk_budget` is the GC
/// ceiling in bytes (0: unlimited, nothing clamped).
pub fn load(path: &Path, disk_budget: u64) -> Result<Fragment, BkConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| BkConfigError::Read { path: path.into(), source })?;
    parse(path, &text, disk_budget)
}

/// `load` on text already read (the file's path is for messages and for
/// resolving relative file paths).
pub fn parse(path: &Path, text: &str, disk_budget: u64) -> Result<Fragment, BkConfigError> {
    let mut table: Table = toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| position(text, s.start)).unwrap_or(At { line: 1, column: 1 });
        BkConfigError::Syntax {
            path: path.into(),
            line: at.line,
            column: at.column,
            message: e.message().trim().into(),
        }
    })?;
    // Parsed by `toml` above, so this parse cannot fail.
    let doc = toml_edit::ImDocument::parse(text.to_string()).ok();
    let ctx = rules::Ctx { path, text, doc: doc.as_ref() };
    rules::check(&ctx, &table)?;
    let clamped = rules::clamp_gc(&ctx, &mut table, disk_budget)?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let files = files::resolve(&ctx, &mut table, base)?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(text.as_bytes());
    for f in &files {
        digest.update(f.rel.as_os_str().as_encoded_bytes());
        digest.update(&f.bytes);
    }
    let hash = digest.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Fragment { path: path.into(), table, files, hash, clamped })
}

impl Fragment {
    /// The hash's first 12 hex digits, for log lines.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }
}

/// Lays `fragment` over berth's generated `base` for the instance in `dir`:
/// tables merge key by key, any other value of the fragment replaces
/// berth's (only GC sizes can collide: owned keys were refused at load),
/// and the copied files' paths become absolute under `dir`.
pub fn merge(base: &mut Table, fragment: &Fragment, dir: &Path) {
    let mut over = fragment.table.clone();
    files::anchor(&mut over, dir);
    merge_tables(base, over);
}

fn merge_tables(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn position(text: &str, offset: usize) -> At {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    At { line, column }
}
