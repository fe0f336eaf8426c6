//! `<proc>/self/mountinfo`, parsed in one place for the agent (CSI publish,
//! `check`), the shim (teardown) and the tests (leak scan).
//!
//! Hand-written rather than the `procfs` crate: five fields of one line
//! format do not justify its dependency tree, and the parse must accept a
//! configurable proc root so unit tests run on plain files.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// A line of mountinfo: the device, the root of the mounted tree within its
/// filesystem, and the mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub dev: String,
    pub root: PathBuf,
    pub mount_point: PathBuf,
}

/// Decodes the octal escapes mountinfo uses for space, tab, newline and
/// backslash (`\040`, `\011`, `\012`, `\134`). Works on bytes, so a path
/// with multi-byte UTF-8 (or no valid UTF-8 at all) comes back unchanged.
pub fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if v <= 255 {
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Parses a whole mountinfo table; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_, _, dev, root, mount_point) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            Some(MountEntry { dev: dev.to_string(), root: unescape(root), mount_point: unescape(mount_point) })
        })
        .collect()
}

/// The mounts of this process's mount namespace, from `<proc_root>/self/mountinfo`.
pub fn read(proc_root: &Path) -> io::Result<Vec<MountEntry>> {
    let file = proc_root.join("self/mountinfo");
    let text = fs::read_to_string(&file).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
    Ok(parse(&text))
}

/// A mount's filesystem: its type and super-block options, the fields after
/// the ` - ` separator (`- cgroup2 cgroup2 rw,nsdelegate,favordynmods`).
/// Options a filesystem applies to all its mounts (cgroup's favordynmods)
/// show only there, not among the per-mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub super_options: Vec<String>,
}

/// Parses a whole mountinfo table into [`FsEntry`]s; malformed lines are
/// skipped. The optional fields (`shared:1`) before ` - ` vary in number,
/// so the line is split there; a path's spaces are escaped (`\040`).
pub fn parse_fs(text: &str) -> Vec<FsEntry> {
    text.lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let mount_point = unescape(head.split(' ').nth(4)?);
            let mut t = tail.split(' ');
            let (fs_type, _source, opts) = (t.next()?, t.next()?, t.next()?);
            let super_options = opts.split(',').map(String::from).collect();
            Some(FsEntry { mount_point, fs_type: fs_type.to_string(), super_options })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal_and_keeps_utf8() {
        assert_eq!(unescape(r"/a\040b\011c\012d\134e"), PathBuf::from("/a b\tc\nd\\e"));
        // A byte-as-char decoder turns "ü" (two bytes) into two Latin-1 chars.
        assert_eq!(unescape("/st/über\\040x"), PathBuf::from("/st/über x"));
        // Not an escape: fewer than three octal digits, or a value over 255.
        assert_eq!(unescape(r"/a\04"), PathBuf::from(r"/a\04"));
        assert_eq!(unescape(r"/a\777b"), PathBuf::from(r"/a\777b"));
    }

    #[test]
    fn parses_fields_and_skips_short_lines() {
        let t =
            "22 1 0:21 / /proc rw - proc proc rw\nbad line\n51 50 8:1 /sub /mnt/with\\040space rw - ext4 /dev/x rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1], MountEntry { dev: "8:1".into(), root: "/sub".into(), mount_point: "/mnt/with space".into() });
    }

    #[test]
    fn parses_filesystem_type_and_super_options() {
        let t =
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n\
                 35 31 0:32 / /sys/fs/cgroup/mem\\040ory rw,relatime - cgroup cgroup rw,memory\nno separator here\n";
        let m = parse_fs(t);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m[0].fs_type, "cgroup2");
        assert_eq!(m[0].super_options, ["rw", "nsdelegate", "favordynmods"]);
        assert_eq!(m[1].mount_point, PathBuf::from("/sys/fs/cgroup/mem ory"));
        assert_eq!(m[1].super_options, ["rw", "memory"]);
    }

    #[test]
    fn read_names_the_file_it_could_not_read() {
        let t = tempfile::tempdir().unwrap();
        let e = read(t.path()).unwrap_err();
        assert!(e.to_string().contains("self/mountinfo"), "{e}");
    }
}
