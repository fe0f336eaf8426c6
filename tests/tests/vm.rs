//! The cgroup v2 lane, as part of the suite: `tests/vm/run.sh` boots a
//! Debian VM with cgroup v2 only (image built by debootstrap from the
//! machine's own apt mirror, cached under /var/cache/berth-vm) and runs the
//! suites listed in `tests/vm/suites` there, against the binaries this run
//! built; it fails if any of them fails or anything leaked in the VM.
//!
//! Needs root, qemu-system-x86_64 and debootstrap (`.ci/run` installs them).
//! Without them, or with `BERTH_VM_LANE=skip`, it says SKIPPED and why.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `suite` lines for tests/vm/suites: each test target's binary is the newest
/// `<target>-<hash>` in this binary's deps dir that lists a test for the
/// line's filters (a lib's and a bin's unit tests share a name).
fn plan_from_deps() -> String {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let full = std::env::var("BERTH_VM_FULL").as_deref() == Ok("1");
    let suites = std::fs::read_to_string(work.join("tests/vm/suites")).unwrap();
    let mut out = String::new();
    for line in suites.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if line == "full:" {
            if !full {
                break;
            }
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (name, pkg, target, args) = (f[0], f[1], f[2], &f[3..]);
        let mut filters: Vec<&str> = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match *a {
                "--skip" => {
                    it.next();
                }
                a if a.starts_with("--") => {}
                a => filters.push(a),
            }
        }
        let mut cands: Vec<PathBuf> = std::fs::read_dir(&deps)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.strip_prefix(&format!("{target}-"))
                    .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()))
            })
            .collect();
        cands.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).and_then(|m| m.modified()).ok()));
        let exe = cands
            .into_iter()
            .find(|p| {
                Command::new(p)
                    .arg("--list")
                    .args(&filters)
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(": test"))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no test binary for {pkg}/{target} in {}: build with cargo test --workspace --no-run",
                    deps.display()
                )
            });
        out.push_str(&format!("suite {name} {} {} {}\n", work.join(pkg).display(), exe.display(), args.join(" ")));
    }
    out
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).chain(["/usr/sbin".into(), "/sbin".into()]).any(|d| d.join(tool).is_file())
    })
}

#[test]
fn cgroup_v2_lane() {
    if std::env::var_os("BERTH_IN_VM").is_some() {
        eprintln!("SKIPPED: cgroup v2 lane: already inside the lane's VM");
        return;
    }
    if std::env::var("BERTH_VM_LANE").as_deref() == Ok("skip") {
        eprintln!("SKIPPED: cgroup v2 lane: BERTH_VM_LANE=skip; run it by hand with tests/vm/run.sh");
        return;
    }
    let missing: Vec<&str> =
        ["qemu-system-x86_64", "debootstrap", "mkfs.ext4"].into_iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED: cgroup v2 lane: {missing:?} not installed (apt-get install qemu-system-x86 debootstrap e2fsprogs; .ci/run does)"
        );
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: cgroup v2 lane: needs root (debootstrap, the VM's 9p shares)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/run.sh");
    // cargo holds its build lock while this runs: the plan comes from the
    // test binaries beside this one, not from another cargo call.
    let plan = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(plan.path(), plan_from_deps()).unwrap();
    let st = Command::new("bash").arg(&script).env("BERTH_VM_PLAN", plan.path()).status().expect("bash");
    assert!(st.success(), "the cgroup v2 lane failed ({st}): its output is above; rerun it with {}", script.display());
}
