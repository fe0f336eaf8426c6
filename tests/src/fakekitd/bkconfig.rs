//! bkconfig (issue 16): what fakekitd tells of the buildkitd.toml it was
//! given, and whether it can open a file (one instance's copied CA or key
//! must not open from another).

use crate::proto::fake::{ConfigReply, OpenReply};
use std::io::Read;

/// The `--config` value from the daemon's argv (either form; the last wins,
/// as with buildkitd's flags).
pub fn config_path(args: &[String]) -> Option<String> {
    let mut found = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            found = it.next().cloned();
        } else if let Some(v) = a.strip_prefix("--config=") {
            found = Some(v.to_string());
        }
    }
    found
}

pub fn config(args: &[String]) -> ConfigReply {
    let Some(path) = config_path(args) else { return ConfigReply::default() };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let parse_error = toml::from_str::<toml::Table>(&text).err().map(|e| e.to_string()).unwrap_or_default();
            ConfigReply { path, text, error: String::new(), parse_error }
        }
        Err(e) => ConfigReply { path, error: e.to_string(), ..Default::default() },
    }
}

pub fn open(path: &str) -> OpenReply {
    match std::fs::File::open(path) {
        Ok(f) => {
            let mut buf = Vec::new();
            match f.take(65536).read_to_end(&mut buf) {
                Ok(n) => OpenReply { ok: true, size: n as u64, ..Default::default() },
                Err(e) => {
                    OpenReply { errno: e.raw_os_error().unwrap_or(0), error: e.to_string(), ..Default::default() }
                }
            }
        }
        Err(e) => OpenReply { errno: e.raw_os_error().unwrap_or(0), error: e.to_string(), ..Default::default() },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_path_takes_either_form_and_the_last() {
        let a = |v: &[&str]| super::config_path(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(a(&["--root", "/r", "--config", "/a.toml"]), Some("/a.toml".into()));
        assert_eq!(a(&["--config=/a.toml", "--config", "/b.toml"]), Some("/b.toml".into()));
        assert_eq!(a(&["--root", "/r"]), None);
    }
}
