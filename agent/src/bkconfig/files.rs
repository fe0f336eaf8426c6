//! The files the fragment points to: `registry."<host>".ca`, `.keypair`
//! (`key` and `cert`) and `.tlsconfigdir` (BuildKit reads `*.crt`, `*.cert`
//! and `*.key` from each dir). Read once at load (an instance's mapped uids
//! cannot read the operator's files where they sit, and a file that changes
//! later must not change a config already validated), checked to be PEM,
//! and copied into each instance's `certs/` dir at spawn: dirs 0500 and
//! files 0400, owned by that instance's mapped root, so no other instance
//! can open them. The instance dir is wiped as a whole, copies included.

use super::rules::{Ctx, Seg};
use super::{BkConfigError, CERTS_DIR};
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// Larger files are refused: a CA bundle or key is a few KiB.
pub const MAX_FILE: u64 = 1 << 20;

/// One file to copy into every instance.
#[derive(Debug, Clone)]
pub struct Copy {
    /// The key that named it, as written (`registry."r.example".ca[0]`).
    pub key: String,
    /// The operator's file.
    pub source: PathBuf,
    /// Where the copy goes, relative to the instance dir (`certs/...`).
    pub rel: PathBuf,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Copy)]
pub enum Kind {
    Cert,
    Key,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Cert => "certificate (-----BEGIN CERTIFICATE-----)",
            Kind::Key => "private key (-----BEGIN ... PRIVATE KEY-----)",
        }
    }
}

/// Reads every file the fragment's registries name and rewrites their paths
/// in `table` to the copies' paths relative to the instance dir. Relative
/// paths in the fragment are taken from `base` (the fragment's dir).
pub fn resolve(ctx: &Ctx, table: &mut Table, base: &Path) -> Result<Vec<Copy>, BkConfigError> {
    let mut out = Vec::new();
    let Some(registries) = table.get_mut("registry") else { return Ok(out) };
    let Value::Table(registries) = registries else {
        return Err(ctx.invalid(&[key("registry")], "must be a table of registries ([registry.\"docker.io\"])"));
    };
    for (n, (host, reg)) in registries.iter_mut().enumerate() {
        let at = vec![key("registry"), key(host)];
        let Value::Table(reg) = reg else {
            return Err(ctx.invalid(&at, "must be a table (mirrors, http, insecure, ca, keypair, tlsconfigdir)"));
        };
        let dir = Path::new(CERTS_DIR).join(format!("{n}-{}", slug(host)));
        if let Some(v) = reg.get_mut("ca") {
            let path = [at.clone(), vec![key("ca")]].concat();
            for (j, item) in strings(ctx, &path, v)?.into_iter().enumerate() {
                let rel = dir.join(format!("ca-{j}.crt"));
                out.push(read(ctx, &[path.clone(), vec![Seg::Index(j)]].concat(), item, base, &rel, Kind::Cert)?);
                *item = Value::String(rel.display().to_string());
            }
        }
        if let Some(v) = reg.get_mut("keypair") {
            let path = [at.clone(), vec![key("keypair")]].concat();
            let Value::Array(pairs) = v else {
                return Err(ctx.invalid(&path, "must be an array of {key = \"...\", cert = \"...\"}"));
            };
            for (j, pair) in pairs.iter_mut().enumerate() {
                let here = [path.clone(), vec![Seg::Index(j)]].concat();
                let Value::Table(pair) = pair else {
                    return Err(ctx.invalid(&here, "must be a table {key = \"...\", cert = \"...\"}"));
                };
                for (field, kind, name) in [("key", Kind::Key, "key"), ("cert", Kind::Cert, "cert")] {
                    let fp = [here.clone(), vec![key(field)]].concat();
                    let Some(item) = pair.get_mut(field) else {
                        return Err(
                            ctx.invalid(&here, format!("a key pair needs both key and cert; {field} is missing"))
                        );
                    };
                    let rel = dir.join(format!("client-{j}.{name}"));
                    out.push(read(ctx, &fp, item, base, &rel, kind)?);
                    *item = Value::String(rel.display().to_string());
                }
            }
        }
        if let Some(v) = reg.get_mut("tlsconfigdir") {
            let path = [at.clone(), vec![key("tlsconfigdir")]].concat();
            for (j, item) in strings(ctx, &path, v)?.into_iter().enumerate() {
                let here = [path.clone(), vec![Seg::Index(j)]].concat();
                let rel = dir.join(format!("tlsconfigdir-{j}"));
                out.extend(read_dir(ctx, &here, item, base, &rel)?);
                *item = Value::String(rel.display().to_string());
            }
        }
    }
    Ok(out)
}

/// Makes the copies' paths absolute under the instance dir `dir`.
pub fn anchor(table: &mut Table, dir: &Path) {
    let Some(Value::Table(registries)) = table.get_mut("registry") else { return };
    let fix = |v: &mut Value| {
        if let Value::String(s) = v {
            if s.starts_with(CERTS_DIR) {
                *s = dir.join(&*s).display().to_string();
            }
        }
    };
    for reg in registries.iter_mut().filter_map(|(_, v)| v.as_table_mut()) {
        for list in ["ca", "tlsconfigdir"] {
            if let Some(Value::Array(items)) = reg.get_mut(list) {
                items.iter_mut().for_each(fix);
            }
        }
        if let Some(Value::Array(pairs)) = reg.get_mut("keypair") {
            for pair in pairs.iter_mut().filter_map(Value::as_table_mut) {
                pair.iter_mut().for_each(|(_, v)| fix(v));
            }
        }
    }
}

/// Writes the copies into the instance dir `dir`: `certs/` and its sub dirs
/// 0500, files 0400, all owned by `uid` (the instance's mapped root).
pub fn install(dir: &Path, uid: u32, files: &[Copy]) -> Result<(), (PathBuf, io::Error)> {
    if files.is_empty() {
        return Ok(());
    }
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let certs = dir.join(CERTS_DIR);
    // Every dir from certs/ down to each file's, parents first (sorted).
    let mut dirs = BTreeSet::new();
    for f in files {
        let dest = dir.join(&f.rel);
        dirs.extend(dest.ancestors().skip(1).filter(|p| p.starts_with(&certs)).map(Path::to_path_buf));
    }
    for d in &dirs {
        fs::DirBuilder::new().mode(0o700).create(d).map_err(at(d))?;
    }
    for f in files {
        let dest = dir.join(&f.rel);
        // Fresh dirs: create_new, so nothing planted is followed.
        let mut file =
            fs::OpenOptions::new().write(true).create_new(true).mode(0o400).open(&dest).map_err(at(&dest))?;
        file.write_all(&f.bytes).map_err(at(&dest))?;
        crate::sys::chown_path(&dest, uid, uid).map_err(at(&dest))?;
        crate::sys::chmod(&dest, 0o400).map_err(at(&dest))?;
    }
    for d in dirs.iter().rev() {
        crate::sys::chown_path(d, uid, uid).map_err(at(d))?;
        crate::sys::chmod(d, 0o500).map_err(at(d))?;
    }
    Ok(())
}

fn key(k: &str) -> Seg {
    Seg::Key(k.into())
}

/// A host name as a dir name: letters, digits, `.`, `-`; the rest `_`.
fn slug(host: &str) -> String {
    host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).take(64).collect()
}

fn strings<'v>(ctx: &Ctx, path: &[Seg], v: &'v mut Value) -> Result<Vec<&'v mut Value>, BkConfigError> {
    let Value::Array(items) = v else {
        return Err(ctx.invalid(path, "must be an array of paths, such as [\"/etc/berth/buildkitd-certs/ca.crt\"]"));
    };
    if items.iter().any(|i| !i.is_str()) {
        return Err(ctx.invalid(path, "must be an array of paths (strings)"));
    }
    Ok(items.iter_mut().collect())
}

fn read(ctx: &Ctx, path: &[Seg], item: &Value, base: &Path, rel: &Path, kind: Kind) -> Result<Copy, BkConfigError> {
    let Value::String(name) = item else { return Err(ctx.invalid(path, "must be a path (a string)")) };
    let source = base.join(name);
    let keyname = super::rules::show(path);
    let file_err = |source_err: io::Error| BkConfigError::File {
        path: ctx.path.into(),
        key: keyname.clone(),
        file: source.clone(),
        source: source_err,
    };
    let meta = fs::metadata(&source).map_err(file_err)?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        let why = if meta.is_file() { "larger than 1 MiB" } else { "not a regular file" };
        return Err(file_err(io::Error::new(io::ErrorKind::InvalidInput, why)));
    }
    let bytes = fs::read(&source).map_err(file_err)?;
    check_pem(&bytes, kind).map_err(|detail| BkConfigError::NotPem {
        path: ctx.path.into(),
        key: keyname.clone(),
        file: source.clone(),
        expected: kind.expected(),
        detail,
    })?;
    Ok(Copy { key: keyname, source, rel: rel.into(), bytes })
}

/// BuildKit reads `*.crt` (CAs), `*.cert` and `*.key` (client pairs) from a
/// tlsconfigdir; the rest (including Secret mounts' `..data` dirs) is skipped.
fn read_dir(ctx: &Ctx, path: &[Seg], item: &Value, base: &Path, rel: &Path) -> Result<Vec<Copy>, BkConfigError> {
    let Value::String(name) = item else { return Err(ctx.invalid(path, "must be a path (a string)")) };
    let dir = base.join(name);
    let err = |e: io::Error| BkConfigError::File {
        path: ctx.path.into(),
        key: super::rules::show(path),
        file: dir.clone(),
        source: e,
    };
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map_err(err)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let kind = if n.ends_with(".crt") || n.ends_with(".cert") {
            Kind::Cert
        } else if n.ends_with(".key") {
            Kind::Key
        } else {
            continue;
        };
        if !dir.join(&n).is_file() {
            continue;
        }
        let file = Value::String(dir.join(&n).display().to_string());
        out.push(read(ctx, path, &file, base, &rel.join(&n), kind)?);
    }
    Ok(out)
}

/// The bytes hold at least one PEM block of the kind, and nothing else but
/// other PEM blocks and whitespace.
pub fn check_pem(bytes: &[u8], kind: Kind) -> Result<(), String> {
    let der_hint = "it looks like DER (binary); convert it with `openssl x509 -inform der -in FILE -out FILE.pem`";
    let Ok(text) = std::str::from_utf8(bytes) else { return Err(der_hint.into()) };
    let blocks = pem::parse_many(text).map_err(|e| e.to_string())?;
    let wanted = |tag: &str| match kind {
        Kind::Cert => tag == "CERTIFICATE" || tag == "TRUSTED CERTIFICATE",
        Kind::Key => tag.ends_with("PRIVATE KEY"),
    };
    if blocks.iter().any(|b| wanted(b.tag())) {
        return Ok(());
    }
    match blocks.first() {
        Some(b) => Err(format!("it holds a {:?} block", b.tag())),
        None => Err("no PEM block found".into()),
    }
}
