use super::*;
use crate::config::{Cli, Command as Cmd};
use clap::Parser;
use std::fs;
use std::os::unix::fs::PermissionsExt;

/// A fake host: proc, cgroup v2 tree, etc, state dir; all healthy.
struct Host {
    t: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let t = tempfile::tempdir().unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let p = t.path();
        fs::create_dir_all(p.join("proc/sys/user")).unwrap();
        fs::create_dir_all(p.join("proc/self")).unwrap();
        fs::write(p.join("proc/sys/user/max_user_namespaces"), "15000\n").unwrap();
        fs::write(p.join("proc/self/mountinfo"), "22 1 0:21 / /proc rw - proc proc rw\n").unwrap();
        fs::write(p.join("proc/self/cgroup"), "0::/agent\n").unwrap();
        fs::create_dir_all(p.join("cg/agent")).unwrap();
        fs::write(p.join("cg/cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(p.join("cg/agent/cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::create_dir_all(p.join("etc")).unwrap();
        fs::write(p.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::create_dir_all(p.join("proc/sys/net/ipv4")).unwrap();
        fs::create_dir_all(p.join("proc/net")).unwrap();
        fs::write(p.join("proc/sys/net/ipv4/ip_forward"), "1\n").unwrap();
        fs::write(p.join("proc/net/route"), "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n").unwrap();
        fs::write(p.join("etc/resolv.conf"), "nameserver 127.0.0.53\nnameserver 10.96.0.10\n").unwrap();
        Host { t }
    }
    fn p(&self, rel: &str) -> String {
        self.t.path().join(rel).display().to_string()
    }
    fn args(&self, extra: &[&str]) -> CheckArgs {
        let mut argv = vec!["berth-agent".to_string(), "check".into()];
        for (k, v) in
            [("--proc-root", "proc"), ("--cgroup-root", "cg"), ("--etc-root", "etc"), ("--state-dir", "state")]
        {
            argv.push(k.into());
            argv.push(self.p(v));
        }
        argv.extend(["--daemon".into(), "true".into(), "--build-resolv-conf".into(), self.p("etc/resolv.conf")]);
        argv.extend(extra.iter().map(|s| s.to_string()));
        match Cli::try_parse_from(argv).unwrap().command {
            Cmd::Check(a) => a,
            _ => unreachable!(),
        }
    }
    fn item(&self, name: &str, extra: &[&str]) -> Item {
        run_checks(&self.args(extra)).into_iter().find(|i| i.name == name).unwrap()
    }
}

#[test]
fn healthy_fake_host_passes_every_file_based_check() {
    let h = Host::new();
    for i in run_checks(&h.args(&[])) {
        if i.name != "runc" {
            assert_eq!(i.level, Level::Ok, "{i}");
        }
    }
}

#[test]
fn isolated_network_needs_forwarding_a_free_subnet_and_a_reachable_resolver() {
    let h = Host::new();
    assert_eq!(h.item("build dns", &[]).level, Level::Ok);
    fs::write(h.p("proc/sys/net/ipv4/ip_forward"), "0\n").unwrap();
    let i = h.item("ip forwarding", &[]);
    assert_eq!(i.level, Level::Warn);
    assert!(i.fix.unwrap().contains("net.ipv4.ip_forward=1"));
    fs::write(h.p("etc/resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
    let i = h.item("build dns", &[]);
    assert_eq!(i.level, Level::Warn, "{i}");
    assert!(i.detail.contains("127.0.0.53"));
    // Host mode has nothing of this to check.
    let all = run_checks(&h.args(&["--build-network", "host"]));
    assert!(all.iter().all(|i| i.name != "ip forwarding" && i.name != "veth"));
}

#[test]
fn userns_disabled_is_a_failure_with_the_sysctl_fix() {
    let h = Host::new();
    fs::write(h.p("proc/sys/user/max_user_namespaces"), "0\n").unwrap();
    let i = h.item("user namespaces", &[]);
    assert_eq!(i.level, Level::Fail);
    assert!(i.fix.unwrap().contains("user.max_user_namespaces"));
}

#[test]
fn masked_proc_is_detected() {
    let h = Host::new();
    fs::write(
        h.p("proc/self/mountinfo"),
        "22 1 0:21 / /proc rw - proc proc rw\n30 22 0:5 /null /proc/kcore rw - devtmpfs udev rw\n",
    )
    .unwrap();
    let i = h.item("/proc unmasked", &[]);
    assert_eq!(i.level, Level::Fail, "{i}");
    assert!(i.detail.contains("/proc/kcore"));
}

#[test]
fn pool_over_host_ids_fails_and_subuid_overlap_warns() {
    let h = Host::new();
    fs::write(h.p("etc/passwd"), "root:x:0:0::/root:/bin/sh\nci:x:1100000:1100000::/:/bin/sh\n").unwrap();
    let i = h.item("id-map pool", &[]);
    assert_eq!(i.level, Level::Fail, "{i}");
    assert!(i.detail.contains("1100000"));
    fs::write(h.p("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(h.p("etc/subuid"), "podman:1048576:65536\n").unwrap();
    let i = h.item("id-map pool", &[]);
    assert_eq!(i.level, Level::Warn, "{i}");
    let i = h.item("id-map pool", &["--idmap-count", "1000"]);
    assert_eq!(i.level, Level::Fail, "{i}");
}

#[test]
fn undelegated_cgroup_controllers_fail() {
    let h = Host::new();
    fs::write(h.p("cg/agent/cgroup.controllers"), "cpu\n").unwrap();
    let i = h.item("cgroups", &[]);
    assert_eq!(i.level, Level::Fail, "{i}");
    assert!(i.detail.contains("memory"));
}

#[test]
fn missing_daemon_fails_and_present_one_reports_its_version() {
    let h = Host::new();
    let i = h.item("daemon", &["--daemon", "/nonexistent/buildkitd"]);
    assert_eq!(i.level, Level::Fail);
    assert!(i.fix.unwrap().contains("--daemon"));
    let i = h.item("daemon", &[]);
    assert_eq!(i.level, Level::Ok, "{i}");
    assert!(i.detail.contains("true"), "{i}");
}

#[test]
fn runc_is_required_for_buildkitd_only() {
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dir = t.path().as_os_str();
    if tools::find_runc(&tools::daemon_path(Path::new(""), Some(dir))).unwrap().is_none() {
        assert_eq!(runc(Path::new("buildkitd"), Some(dir)).level, Level::Fail);
        assert_eq!(runc(Path::new("fakekitd"), Some(dir)).level, Level::Warn);
    } else {
        eprintln!(
            "SKIPPED: the no-runc half of runc_is_required_for_buildkitd_only: a runc is installed in a system dir"
        );
    }
    let fake = t.path().join("runc");
    fs::write(&fake, "#!/bin/sh\necho 'runc version 1.1.5'\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let i = runc(Path::new("buildkitd"), Some(dir));
    assert_eq!(i.level, Level::Ok, "{i}");
    assert!(i.detail.contains("1.1.5") && i.detail.contains(&fake.display().to_string()), "{i}");
}

#[test]
fn runc_or_daemon_out_of_the_mapped_ids_reach_fails() {
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let home = t.path().join("home");
    fs::create_dir_all(home.join("bin")).unwrap();
    for name in ["runc", "fakekitd"] {
        let f = home.join("bin").join(name);
        fs::write(&f, "#!/bin/sh\necho 'x 1.1.5'\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    let bin = home.join("bin");
    let i = runc(Path::new("buildkitd"), Some(bin.as_os_str()));
    if tools::find_runc(&tools::daemon_path(Path::new(""), None)).unwrap().is_none() {
        assert_eq!(i.level, Level::Fail, "{i}");
        assert!(i.detail.contains(&format!("{} has mode 700", home.display())), "{i}");
    } else {
        // The daemon skips the copy it cannot reach and takes the system's,
        // as buildkitd's LookPath does (tests/daemon_path.rs hides it).
        assert_eq!(i.level, Level::Ok, "{i}");
        assert!(!i.detail.starts_with(&home.display().to_string()), "{i}");
    }
    let h = Host::new();
    let d = bin.join("fakekitd").display().to_string();
    let i = h.item("daemon", &["--daemon", &d]);
    assert_eq!(i.level, Level::Fail, "{i}");
    assert!(i.detail.contains("EACCES") && i.detail.contains("mode 700"), "{i}");
}

#[test]
fn untraversable_state_dir_fails() {
    let h = Host::new();
    fs::create_dir_all(h.p("locked/state")).unwrap();
    fs::set_permissions(h.p("locked"), fs::Permissions::from_mode(0o700)).unwrap();
    let state = h.p("locked/state");
    let i = h.item("state dir", &["--state-dir", &state]);
    assert_eq!(i.level, Level::Fail, "{i}");
    assert!(i.fix.unwrap().contains("o+x"));
}

#[test]
fn disk_limit_needs_the_mechanism_and_zero_is_a_warning() {
    let h = Host::new();
    let i = h.item("disk limit", &[]);
    // CI and this machine have loop devices and mkfs.ext4 (.ci/run installs e2fsprogs).
    assert_eq!(i.level, Level::Ok, "{i}");
    assert!(i.detail.contains("mkfs.ext4 and /dev/loop-control found"), "{i}");
    let i = h.item("disk limit", &["--build-disk", "0"]);
    assert_eq!(i.level, Level::Warn, "{i}");
    assert!(i.detail.contains("no disk limit"), "{i}");
    let bad = Cli::try_parse_from(["berth-agent", "check", "--build-disk", "1Mi"]).unwrap_err().to_string();
    assert!(bad.contains("at least 16Mi"), "{bad}");
}

#[test]
fn cgroup_moves_line_says_when_every_start_waits_for_a_grace_period() {
    let h = Host::new();
    let cg = |text: &str| {
        fs::write(h.p("proc/self/mountinfo"), format!("22 1 0:21 / /proc rw - proc proc rw\n{text}")).unwrap();
        h.item("cgroup moves", &[])
    };
    let v1 = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:5 - cgroup cgroup rw,memory\n\
              41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n";
    let favoring = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n";
    fs::create_dir_all(h.p("proc/sys/kernel")).unwrap();
    fs::write(h.p("proc/sys/kernel/osrelease"), "6.18.44-generic\n").unwrap();
    // cgroup v2 and clone3 into a cgroup: no move at all.
    let i = cg(v1);
    assert_eq!(i.level, Level::Ok, "{i}");
    assert!(i.detail.contains("born in their cgroup") && i.detail.contains("kernel 6.18"), "{i}");
    // cgroup v1 (the fake root has no cgroup.controllers): every start moves,
    // and with no favordynmods anywhere it waits. Informational, not a failure.
    fs::remove_file(h.p("cg/cgroup.controllers")).unwrap();
    let i = cg(v1);
    assert_eq!(i.level, Level::Info, "{i}");
    assert!(i.detail.contains("RCU grace period") && i.detail.contains("5-10 ms"), "{i}");
    assert!(i.fix.as_deref().unwrap().contains("favordynmods"), "{i}");
    assert!(i.to_string().starts_with("info  cgroup moves"), "{i}");
    // favordynmods on any hierarchy (the rwsem is global): moves are cheap.
    let i = cg(&format!("{v1}{favoring}"));
    assert_eq!(i.level, Level::Ok, "{i}");
    assert!(i.detail.contains("/sys/fs/cgroup/unified is mounted with favordynmods"), "{i}");
    // Before Linux 6.0 moves never waited.
    fs::write(h.p("proc/sys/kernel/osrelease"), "5.15.0-91-generic\n").unwrap();
    let i = cg(v1);
    assert_eq!(i.level, Level::Ok, "{i}");
    assert!(i.detail.contains("cheap before Linux 6.0"), "{i}");
    // cgroup v2 on a kernel without CLONE_INTO_CGROUP moves too.
    fs::write(h.p("cg/cgroup.controllers"), "cpu memory pids\n").unwrap();
    fs::write(h.p("proc/sys/kernel/osrelease"), "5.4.0\n").unwrap();
    let i = cg(v1);
    assert_eq!(i.level, Level::Ok, "{i}");
    assert!(i.detail.contains("no clone3 CLONE_INTO_CGROUP"), "{i}");
    assert_eq!(berth_shim::cgroup::moves::kernel_version("6.0"), Some((6, 0)));
    assert_eq!(berth_shim::cgroup::moves::kernel_version("4.19.0+"), Some((4, 19)));
    assert_eq!(berth_shim::cgroup::moves::kernel_version("garbage"), None);
}
