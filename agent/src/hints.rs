//! Plain words for the rootless failure classes a build daemon reports in
//! its own terms. The daemon's stderr tail is matched against known
//! patterns; a match adds a hint to the client's error (start failures, and
//! the GOAWAY note when an instance dies under a client) and to the log.
//! See docs/troubleshooting.md for each class.

const RUNC: &str = "runc is missing: buildkit runs build steps with runc >= 1.1 (crun is not accepted); install runc or use the berth image, which ships buildkit-runc";

struct Hint {
    /// All of these must appear (case-insensitive) in the stderr tail.
    all: &'static [&'static str],
    text: &'static str,
}

const HINTS: &[Hint] = &[
    Hint {
        all: &["failed to find", "runc binary"],
        text: RUNC,
    },
    Hint {
        all: &["runc does not exist"],
        text: RUNC,
    },
    Hint {
        all: &["no worker found"],
        text: "buildkitd found no worker to run builds with, usually because runc is missing; install runc >= 1.1 or use the berth image, which ships buildkit-runc",
    },
    Hint {
        all: &["\"runc\": executable file not found"],
        text: RUNC,
    },
    Hint {
        all: &["security.selinux"],
        text: "a base image layer carries SELinux xattrs that a rootless daemon may not set (moby/buildkit#2407); rebuild that base image without security.selinux xattrs or use another base image",
    },
    Hint {
        all: &["lsetxattr", "operation not supported"],
        text: "a layer carries extended attributes this filesystem or a rootless daemon cannot set (often SELinux labels, moby/buildkit#2407); rebuild that base image without them",
    },
    Hint {
        all: &["bind", "permission denied"],
        text: "a build step tried to listen on a privileged port (< 1024); rootless builds can only bind ports >= 1024, so use a higher port inside the build",
    },
    Hint {
        all: &["no space left on device"],
        text: "the node's state dir is full: give the state dir more disk, or lower --build-disk or --max-builds",
    },
    Hint {
        all: &["rootless mode requires"],
        text: "the daemon did not run as the mapped root of its user namespace; run `berth-agent check` on this node",
    },
    Hint {
        all: &["mount", "proc", "operation not permitted"],
        text: "/proc could not be mounted in the build's namespaces: the agent's /proc is masked; run the agent privileged (the chart does)",
    },
];

/// The first matching hint, formatted to append to a message (`"; hint:
/// ..."`), or an empty string.
pub fn for_stderr(tail: &str) -> String {
    let lower = tail.to_lowercase();
    HINTS
        .iter()
        .find(|h| h.all.iter().all(|needle| lower.contains(needle)))
        .map(|h| format!("; hint: {}", h.text))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_classes_get_plain_words() {
        // Seen from buildkitd v0.32 with a missing worker binary.
        assert!(for_stderr("buildkitd: failed to find /nonexistent/runc binary").contains("runc is missing"));
        assert!(for_stderr("level=warning msg=\"skipping oci worker, as runc does not exist\"\nbuildkitd: no worker found, rebuild the buildkit daemon?").contains("runc"));
        // Every buildkitd start prints these; they are no runc problem.
        let noise = "CDI setup error /etc/cdi: open /etc/cdi: no such file or directory\nfailed check for fsverity support on /x/runc-overlayfs: operation not supported";
        assert_eq!(for_stderr(noise), "");
        let selinux = "failed to copy: lsetxattr /var/lib/x security.selinux: operation not supported";
        assert!(for_stderr(selinux).contains("SELinux"));
        let port = "httpd: bind: Permission denied";
        assert!(for_stderr(port).contains("privileged port"));
        assert!(for_stderr("write /x: no space left on device").contains("state dir is full"));
        assert_eq!(for_stderr("all good"), "");
    }
}
