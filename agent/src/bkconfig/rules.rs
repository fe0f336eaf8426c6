//! What the fragment may set: BuildKit's own top-level tables (from
//! `cmd/buildkitd/config/config.go`, BuildKit v0.32), minus the keys berth
//! sets for every instance and must enforce; GC sizes lowered to the disk
//! budget.

use super::{At, BkConfigError};
use std::path::Path;
use toml::{Table, Value};

/// Top-level keys of buildkitd.toml. `root`, `grpc` and `otel` are known
/// but owned (see `OWNED`).
pub const TOP_LEVEL: &[&str] = &[
    "debug",
    "trace",
    "root",
    "insecure-entitlements",
    "proxyNetwork",
    "log",
    "grpc",
    "otel",
    "cdi",
    "worker",
    "registry",
    "dns",
    "history",
    "frontend",
    "system",
    "provenanceEnvDir",
    "cache",
];

const SOCKET: &str = "berth serves each instance on its own unix socket inside the instance dir, and clients reach it through berth's sockets (no TCP, no TLS listener of the daemon's own)";
const NETWORK: &str = "berth gives build steps their network (--build-network)";

/// Keys berth sets for every instance, with the reason given when the
/// fragment sets one. A table listed here is owned with everything in it.
pub const OWNED: &[(&str, &str)] = &[
    ("root", "berth puts each instance's state in its own dir, inside its disk limit (--build-disk)"),
    ("grpc", SOCKET),
    ("otel", "berth gives each instance its own OTEL socket inside the instance dir"),
    ("worker.containerd", "berth runs the OCI worker only; the containerd worker stays off"),
    ("worker.oci.enabled", "berth runs the OCI worker, always on"),
    ("worker.oci.rootless", "each daemon runs as root of its own user namespace; berth sets what that needs"),
    (
        "worker.oci.noProcessSandbox",
        "build steps run in their own pid namespace (invariant 2: instances cannot see each other)",
    ),
    (
        "worker.oci.snapshotter",
        "berth relies on kernel overlayfs inside the user namespace, on the instance's disk image",
    ),
    ("worker.oci.binary", "berth runs the runc it found at start (see `berth-agent check`)"),
    ("worker.oci.proxySnapshotterPath", "berth relies on the built-in snapshotter"),
    ("worker.oci.defaultCgroupParent", "berth puts each instance in its own cgroup with its limits"),
    ("worker.oci.userRemapUnsupported", "berth maps each instance's ids itself"),
    ("worker.oci.networkMode", NETWORK),
    ("worker.oci.cniConfigPath", NETWORK),
    ("worker.oci.cniBinaryPath", NETWORK),
    ("worker.oci.cniPoolSize", NETWORK),
    ("worker.oci.bridgeName", NETWORK),
    ("worker.oci.bridgeSubnet", NETWORK),
    ("worker.oci.gc", "berth keeps GC on so that the build cache stays inside --build-disk"),
    ("worker.oci.max-parallelism", "berth sets it from --build-cpus"),
];

/// GC sizes that must not exceed the disk budget (BuildKit's DiskSpace:
/// bytes, a size such as "10GB", or a percentage of the disk).
const GC_SIZES: &[&str] = &["gckeepstorage", "reservedSpace", "maxUsedSpace"];
const POLICY_SIZES: &[&str] = &["keepBytes", "reservedSpace", "maxUsedSpace"];

/// What a rule needs to name a position.
pub struct Ctx<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub doc: Option<&'a toml_edit::ImDocument<String>>,
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone)]
pub enum Seg {
    Key(String),
    Index(usize),
}

pub fn keys(path: &str) -> Vec<Seg> {
    path.split('.').map(|k| Seg::Key(k.to_string())).collect()
}

/// A node of the parsed document while walking a key path.
enum Node<'a> {
    Item(&'a toml_edit::Item),
    Value(&'a toml_edit::Value),
    Table(&'a toml_edit::Table),
}

impl<'a> Node<'a> {
    fn step(&self, seg: &Seg) -> Option<(Node<'a>, Option<std::ops::Range<usize>>)> {
        match (self, seg) {
            (Node::Item(i), Seg::Key(k)) => {
                let (key, next) = i.as_table_like()?.get_key_value(k)?;
                Some((Node::Item(next), key.span().or_else(|| next.span())))
            }
            (Node::Table(t), Seg::Key(k)) => {
                let (key, next) = t.get_key_value(k)?;
                Some((Node::Item(next), key.span().or_else(|| next.span())))
            }
            (Node::Value(v), Seg::Key(k)) => {
                let (key, next) = v.as_inline_table()?.get_key_value(k)?;
                Some((Node::Item(next), key.span().or_else(|| next.span())))
            }
            (Node::Item(i), Seg::Index(n)) => {
                if let Some(aot) = i.as_array_of_tables() {
                    let t = aot.get(*n)?;
                    return Some((Node::Table(t), t.span()));
                }
                let v = i.as_array()?.get(*n)?;
                Some((Node::Value(v), v.span()))
            }
            (Node::Value(v), Seg::Index(n)) => {
                let v = v.as_array()?.get(*n)?;
                Some((Node::Value(v), v.span()))
            }
            (Node::Table(_), Seg::Index(_)) => None,
        }
    }
}

impl Ctx<'_> {
    /// Where the last key of `path` is written (else the nearest parent's).
    pub fn at(&self, path: &[Seg]) -> At {
        let mut best = At { line: 1, column: 1 };
        let Some(doc) = self.doc else { return best };
        let mut node = Node::Item(doc.as_item());
        for seg in path {
            let Some((next, span)) = node.step(seg) else { break };
            if let Some(s) = span {
                best = super::position(self.text, s.start);
            }
            node = next;
        }
        best
    }

    pub fn invalid(&self, path: &[Seg], message: impl Into<String>) -> BkConfigError {
        let at = self.at(path);
        BkConfigError::Invalid {
            path: self.path.into(),
            line: at.line,
            column: at.column,
            key: show(path),
            message: message.into(),
        }
    }
}

/// A key path as written in TOML: `registry."docker.io".ca[0]`.
pub fn show(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Refuses unknown top-level keys, unknown worker kinds and owned keys.
pub fn check(ctx: &Ctx, table: &Table) -> Result<(), BkConfigError> {
    for key in table.keys() {
        if !TOP_LEVEL.contains(&key.as_str()) {
            let at = ctx.at(&keys(key));
            return Err(BkConfigError::Unknown {
                path: ctx.path.into(),
                line: at.line,
                column: at.column,
                key: key.clone(),
                known: format!("buildkitd.toml's top-level tables and keys are {}", TOP_LEVEL.join(", ")),
            });
        }
    }
    if let Some(Value::Table(worker)) = table.get("worker") {
        for key in worker.keys() {
            if key != "oci" && key != "containerd" {
                let at = ctx.at(&keys(&format!("worker.{key}")));
                return Err(BkConfigError::Unknown {
                    path: ctx.path.into(),
                    line: at.line,
                    column: at.column,
                    key: format!("worker.{key}"),
                    known: "BuildKit's workers are worker.oci and worker.containerd".into(),
                });
            }
        }
    }
    for (owned, reason) in OWNED {
        if lookup(table, owned).is_some() {
            let at = ctx.at(&keys(owned));
            return Err(BkConfigError::Owned {
                path: ctx.path.into(),
                line: at.line,
                column: at.column,
                key: (*owned).into(),
                reason: (*reason).into(),
            });
        }
    }
    Ok(())
}

fn lookup<'a>(table: &'a Table, dotted: &str) -> Option<&'a Value> {
    let mut parts = dotted.split('.');
    let mut v = table.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Lowers every GC size above `budget` bytes to `budget` (0: no ceiling).
/// Returns one line per lowered value, for the log.
pub fn clamp_gc(ctx: &Ctx, table: &mut Table, budget: u64) -> Result<Vec<String>, BkConfigError> {
    let mut clamped = Vec::new();
    let Some(Value::Table(oci)) = table.get_mut("worker").and_then(|w| w.as_table_mut()).and_then(|w| w.get_mut("oci"))
    else {
        return Ok(clamped);
    };
    let base = keys("worker.oci");
    for key in GC_SIZES {
        if let Some(v) = oci.get_mut(*key) {
            let mut path = base.clone();
            path.push(Seg::Key((*key).into()));
            clamp_one(ctx, &path, v, budget, &mut clamped)?;
        }
    }
    if let Some(policies) = oci.get_mut("gcpolicy") {
        let Value::Array(list) = policies else {
            return Err(
                ctx.invalid(&keys("worker.oci.gcpolicy"), "must be an array of tables ([[worker.oci.gcpolicy]])")
            );
        };
        for (i, p) in list.iter_mut().enumerate() {
            let mut at = keys("worker.oci.gcpolicy");
            at.push(Seg::Index(i));
            let Value::Table(p) = p else { return Err(ctx.invalid(&at, "each GC policy must be a table")) };
            for key in POLICY_SIZES {
                if let Some(v) = p.get_mut(*key) {
                    let mut path = at.clone();
                    path.push(Seg::Key((*key).into()));
                    clamp_one(ctx, &path, v, budget, &mut clamped)?;
                }
            }
        }
    }
    Ok(clamped)
}

fn clamp_one(ctx: &Ctx, path: &[Seg], v: &mut Value, budget: u64, out: &mut Vec<String>) -> Result<(), BkConfigError> {
    let size = disk_space(v).map_err(|m| ctx.invalid(path, m))?;
    if let DiskSpace::Bytes(b) = size {
        if budget > 0 && b > budget {
            out.push(format!(
                "{} = {b} bytes lowered to the GC budget of {budget} bytes (80% of --build-disk)",
                show(path)
            ));
            *v = Value::String(budget.to_string());
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskSpace {
    Bytes(u64),
    /// Of the instance's disk, hence always inside the budget.
    Percent(u64),
}

/// BuildKit's DiskSpace: an integer of bytes, a string of bytes or a size
/// with a binary unit (docker/go-units RAMInBytes: "512MB" is 512 MiB), or
/// a percentage ("50%").
pub fn disk_space(v: &Value) -> Result<DiskSpace, String> {
    let text = match v {
        Value::Integer(i) if *i >= 0 => return Ok(DiskSpace::Bytes(*i as u64)),
        Value::String(s) => s.trim(),
        other => return Err(format!("{other} is not a disk size (bytes, \"10GB\" or \"50%\")")),
    };
    let bad = || format!("{text:?} is not a disk size (bytes, \"10GB\" or \"50%\")");
    if let Some(p) = text.strip_suffix('%') {
        return p.trim().parse().map(DiskSpace::Percent).map_err(|_| bad());
    }
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let num: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix("ib").or_else(|| unit.strip_suffix('b')).unwrap_or(&unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(bad()),
    };
    Ok(DiskSpace::Bytes((num * mult as f64) as u64))
}
