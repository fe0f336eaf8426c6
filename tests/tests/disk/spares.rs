//! Spare disk images: made, bound and mounted ahead by the agent, taken by
//! one instance each, gone with a SIGKILLed agent; and the start's own
//! mount where the new mount API is refused.

use super::*;

/// Whether the filesystem mounted at `at` has `nobarrier` among its super
/// options (the shim library's mountinfo parser).
fn nobarrier(at: &Path) -> bool {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let fs = berth_shim::mountinfo::parse_fs(&table).into_iter().find(|e| e.mount_point == at);
    let fs = fs.unwrap_or_else(|| panic!("nothing mounted at {}:\n{table}", at.display()));
    fs.super_options.iter().any(|o| o == "nobarrier")
}

/// The start steps of the instance in `dir`, from its `instance ready` line.
fn ready_steps(logs: &[serde_json::Value], dir: &Path) -> String {
    let id = dir.file_name().unwrap().to_string_lossy().to_string();
    let ready = logs
        .iter()
        .find(|v| v["message"] == "instance ready" && v["span"]["instance"] == id.as_str())
        .unwrap_or_else(|| panic!("no ready line for {id}"));
    ready["steps"].as_str().unwrap_or_default().to_string()
}

/// Files directly below `dir`'s subdirs (the spare images of each agent).
fn spare_files(state: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(state.join(disk::spare::DIR)) else { return Vec::new() };
    rd.flatten().filter_map(|e| fs::read_dir(e.path()).ok()).flat_map(|rd| rd.flatten().map(|e| e.path())).collect()
}

/// Loop devices bound to spare images below `state`: `(device, file)`.
fn bound_spares(state: &Path) -> Vec<(PathBuf, String)> {
    disk::bound_loops(Path::new("/sys"), &format!("{}/{}/", state.display(), disk::spare::DIR))
}

/// Spare images (copied, bound and mounted detached ahead, so that a start
/// only renames and attaches one): two instances get two of them, each its
/// own fresh filesystem, never one the other wrote to, attached and not
/// mounted at the start, with `nobarrier`. When the agent is SIGKILLed the
/// kernel unmounts and unbinds its spares (only its fds held them) and the
/// next agent's sweep removes their files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_images_are_never_shared_and_are_swept_after_agent_sigkill() {
    let agent = Agent::builder("disk-spares")
        .args(["--build-disk", "64Mi", "--max-builds", "2", "--idle-timeout", "30s", "--socket-mode", "0666"])
        .args(["--drain-timeout", "1s"])
        .start_async()
        .await;
    let state = agent.state_dir().to_path_buf();
    let want = berth_agent::disk::spares::WANT;
    let ready = |state: &Path| spare_files(state).len() == want && bound_spares(state).len() == want;
    let deadline = std::time::Instant::now() + WAIT;
    while !ready(&state) {
        assert!(
            std::time::Instant::now() < deadline,
            "spares: {:?} bound {:?}",
            spare_files(&state),
            bound_spares(&state)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spare_devs: Vec<String> = bound_spares(&state).into_iter().map(|(d, _)| d.display().to_string()).collect();
    assert!(agent.leak_scan().is_empty(), "a live agent's spares are not leaks: {:?}", agent.leak_scan());

    // Two clients at once: two instances, each writing its own dir.
    let sock = agent.socket().to_path_buf();
    let a = std::thread::spawn(move || run_fakeclient(&sock, &["write-files", "2", "1Mi", "a"]));
    let b = as_uid(&agent, 40125, &["write-files", "2", "1Mi", "b"]);
    assert!(b.ok(), "{b:?}");
    assert!(a.join().unwrap().ok());
    let dirs = instance_dirs(&agent);
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    use std::os::unix::fs::MetadataExt;
    let ino = |d: &PathBuf| fs::metadata(d.join(disk::IMAGE_FILE)).unwrap().ino();
    let dev = |d: &PathBuf| fs::read_to_string(d.join(disk::LOOP_FILE)).unwrap().trim().to_string();
    assert_ne!(ino(&dirs[0]), ino(&dirs[1]), "two instances, one image file");
    assert_ne!(dev(&dirs[0]), dev(&dirs[1]), "two instances, one loop device");
    // Made from a spare: one bound before the clients came, or one the pool
    // refilled while the first instance started (its ready line's disk steps
    // say which path the start took).
    let logs = agent.logs();
    for d in &dirs {
        let steps = ready_steps(&logs, d);
        assert!(
            steps.contains("disk.spare="),
            "{} was not made from a spare (spares at the start {:?}; steps {steps})",
            dev(d),
            spare_devs
        );
        // Mounted ahead: the start only attached it.
        assert!(steps.contains("disk.attach=") && !steps.contains("disk.mount="), "{}: {steps}", d.display());
        assert!(nobarrier(&d.join(berth_shim::spec::ROOT_DIR)), "{}", d.display());
    }
    // Each filesystem holds its own build's files and nothing of the other.
    let has = |d: &PathBuf, sub: &str| d.join(berth_shim::spec::ROOT_DIR).join(sub).is_dir();
    let with_a: Vec<_> = dirs.iter().filter(|d| has(d, "a")).collect();
    let with_b: Vec<_> = dirs.iter().filter(|d| has(d, "b")).collect();
    assert_eq!((with_a.len(), with_b.len()), (1, 1), "{dirs:?}");
    assert_ne!(with_a[0], with_b[0], "one filesystem holds both builds' files");

    // The pool refills; then the agent is SIGKILLed (its shims end their
    // instances when the lifeline closes).
    let deadline = std::time::Instant::now() + WAIT;
    while !ready(&state) {
        assert!(std::time::Instant::now() < deadline, "no refill: {:?}", spare_files(&state));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old = spare_files(&state);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    assert!(agent.wait_exit_async(WAIT).await.is_some());
    let deadline = std::time::Instant::now() + WAIT;
    while !bound_spares(&state).is_empty() {
        assert!(std::time::Instant::now() < deadline, "still bound after SIGKILL: {:?}", bound_spares(&state));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(old.iter().all(|f| f.is_file()), "nothing removed them yet: {old:?}");
    let mark = agent.log_mark();
    agent.restart_async().await;
    let swept = agent
        .wait_log_async(mark, |v| v["message"] == "start-up sweep done", WAIT)
        .await
        .unwrap_or_else(|| panic!("no sweep:\n{}", agent.log_tail(30)));
    assert_eq!(swept["spares"], want as u64, "{swept}");
    assert!(old.iter().all(|f| !f.exists()), "a dead agent's spares are swept: {old:?}");
    let leaks = agent.wait_clean_async(WAIT).await;
    assert!(leaks.is_empty(), "after agent SIGKILL + restart: {leaks:?}");
    assert!(run_fakeclient(agent.socket(), &["ping"]).ok(), "the restarted agent serves");
    drop_agent(agent).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !(spare_files(&state).is_empty() && bound_spares(&state).is_empty()) {
        assert!(std::time::Instant::now() < deadline, "spares left after a drain: {:?}", spare_files(&state));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the kernel or a seccomp profile refuses the new mount API
/// (`fsopen`), spares are only bound: the agent says so once, each start
/// mounts its filesystem itself (with the same options), and builds run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_new_mount_api_a_start_mounts_its_spare() {
    let (nr, enosys) = (libc::SYS_fsopen.to_string(), libc::ENOSYS.to_string());
    let agent = Agent::builder("disk-spares-nofsopen")
        .args(["--build-disk", "64Mi", "--max-builds", "2", "--idle-timeout", "30s", "--socket-mode", "0666"])
        .args(["--drain-timeout", "1s"])
        .wrapper([berth_tests::harness::bin_path("refuse-syscall").display().to_string(), nr, enosys, "--".into()])
        .start_async()
        .await;
    let refused = |v: &serde_json::Value| {
        v["message"].as_str().is_some_and(|m| m.starts_with("disk spares are bound but not mounted ahead"))
    };
    let told = agent
        .wait_log_async(0, refused, WAIT)
        .await
        .unwrap_or_else(|| panic!("no word of the refused mount API:\n{}", agent.log_tail(30)));
    assert!(told["error"].as_str().is_some_and(|e| e.contains("fsopen") && e.contains("ENOSYS")), "{told}");
    agent.wait_log_async(0, |v| v["message"] == "disk spares ready", WAIT).await.expect("disk spares made");

    let run = run_fakeclient(agent.socket(), &["write-files", "2", "1Mi", "a"]);
    assert!(run.ok(), "{run:?}");
    let dirs = instance_dirs(&agent);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let root = dirs[0].join(berth_shim::spec::ROOT_DIR);
    assert!(root.join("a").is_dir(), "the build wrote to its own filesystem");
    assert!(nobarrier(&root), "the start's own mount has the same options");
    let steps = ready_steps(&agent.logs(), &dirs[0]);
    assert!(
        steps.contains("disk.spare=") && steps.contains("disk.mount=") && !steps.contains("disk.attach="),
        "{steps}"
    );
    drop_agent(agent).await;
}
