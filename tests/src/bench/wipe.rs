//! Figure 3: wipe. A tree of `wipe_bytes` in `wipe_files` files (100 dirs;
//! written by the bench, flushed with syncfs so it is on disk as a
//! finished build's state would be) is removed in several ways, each timed
//! from the trigger to the end:
//! - berth: the tree sits in a live instance's `--root`; the client closes
//!   its connection (`--scope connection`: the instance ends) and the clock
//!   stops when the agent logs "instance ended" (SIGTERM to the daemon,
//!   reap, cgroup kill+remove, unmounts, wipe, lease release, outcome).
//! - berth, empty state: the same with nothing written (the fixed part).
//! - `berth_shim::wipe::remove_tree` alone on the same kind of tree.
//! - `rm -rf` of the same kind of tree on the same filesystem: the baseline.
//! - The alternative where the state is its own mount: a tmpfs (umount),
//!   and a loop-mounted ext4 image on the same filesystem (umount, loop
//!   detach, unlink of the image file).
//! - A rename into a trash dir (the removal then happens off the clock).
//!
//! Variants rotate within each iteration so drift hits all alike.

use crate::bench::env::{self, is_instance_end, loop_detach, register, temp_dir, BenchAgent, Conn, Undo};
use crate::bench::report::{p50, p99, summary, Goal, Row};
use crate::bench::{Ctx, Figure};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The filesystem type and mount options of the mount holding `path`.
pub fn fs_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for l in text.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else { continue };
        let (Some(mp), Some(fstype), Some(src)) = (f.get(4), f.get(dash + 1), f.get(dash + 2)) else {
            continue;
        };
        let sopts = f.get(dash + 3).unwrap_or(&"");
        if path.starts_with(mp) && best.as_ref().is_none_or(|(n, _)| mp.len() >= *n) {
            best = Some((mp.len(), format!("{fstype} on {mp} ({src}, {sopts})")));
        }
    }
    best.map(|(_, s)| s).unwrap_or_else(|| "?".into())
}

/// Writes `files` files totalling `bytes` under `root` in 100 subdirs
/// (fewer when there are fewer files), owned by `owner` if given, then
/// flushes the filesystem.
pub fn write_tree(root: &Path, files: usize, bytes: u64, owner: Option<(u32, u32)>) -> Result<()> {
    let dirs = files.clamp(1, 100);
    let per_file = (bytes / files.max(1) as u64) as usize;
    let mut data = vec![0u8; per_file];
    crate::pattern::fill(0, &mut data);
    // Never recreate parents: after a signal's cleanup removed them, a
    // late writer must fail, not bring the temp dir back.
    env::park_if_shutting_down();
    fs::create_dir(root).with_context(|| format!("mkdir {}", root.display()))?;
    let chown = |p: &Path| -> Result<()> {
        if let Some((u, g)) = owner {
            std::os::unix::fs::chown(p, Some(u), Some(g)).with_context(|| format!("chown {}", p.display()))?;
        }
        Ok(())
    };
    chown(root)?;
    for d in 0..dirs {
        let dir = root.join(format!("d{d:03}"));
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        chown(&dir)?;
        let n = files / dirs + usize::from(d < files % dirs);
        for k in 0..n {
            env::park_if_shutting_down();
            let p = dir.join(format!("f{k:05}"));
            fs::write(&p, &data).with_context(|| format!("write {}", p.display()))?;
            chown(&p)?;
        }
    }
    syncfs(root)
}

pub fn syncfs(path: &Path) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    nix::unistd::syncfs(&f).with_context(|| format!("syncfs {}", path.display()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| anyhow!("blocking task: {e}"))?
}

/// One berth teardown: an instance holding the tree (or nothing), closed
/// by its client; from the close to the agent's "instance ended" line.
async fn berth_once(agent: &BenchAgent, files: usize, bytes: u64) -> Result<f64> {
    let conn = Conn::open(&agent.socket).await?;
    let reply = conn.ping().await?;
    let id = env::instance_id_of(&reply).ok_or_else(|| anyhow!("no instance id in {}", reply.root))?;
    if files > 0 {
        let owner = env::host_base(&reply.uid_map).map(|u| (u, env::host_base(&reply.gid_map).unwrap_or(u)));
        let root = PathBuf::from(&reply.root).join("bench");
        blocking(move || write_tree(&root, files, bytes, owner)).await?;
    }
    let mark = agent.logs.mark();
    let t0 = Instant::now();
    conn.close();
    let Some((t1, v)) = agent
        .logs
        .wait(mark, |v| is_instance_end(v) && env::instance_of(v) == Some(id.as_str()), Duration::from_secs(120))
        .await
    else {
        bail!("instance {id} did not end within 120 s:\n{}", agent.logs.tail(20));
    };
    let dir = agent.state_dir.join("instances").join(&id);
    if dir.exists() {
        bail!("instance dir {} still there after 'instance ended': {v}", dir.display());
    }
    Ok(ms(t1.duration_since(t0)))
}

struct Loop {
    img: PathBuf,
    dev: PathBuf,
    mp: PathBuf,
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn run_tool(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A fresh ext4 image of `size` bytes at `img`, attached and mounted at `mp`.
fn loop_mount(img: &Path, mp: &Path, size: u64, guards: &mut Vec<env::UndoGuard>) -> Result<Loop> {
    let f = fs::File::create(img)?;
    f.set_len(size)?;
    drop(f);
    run_tool(Command::new(tool("mkfs.ext4").unwrap()).args(["-q", "-F"]).arg(img))?;
    let dev = PathBuf::from(run_tool(Command::new(tool("losetup").unwrap()).args(["--find", "--show"]).arg(img))?);
    guards.push(register(Undo::Loop(dev.clone())));
    fs::create_dir(mp)?;
    nix::mount::mount(Some(&dev), mp, Some("ext4"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mount {} on {}", dev.display(), mp.display()))?;
    guards.push(register(Undo::Mount(mp.to_path_buf())));
    Ok(Loop { img: img.to_path_buf(), dev, mp: mp.to_path_buf() })
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    let (files, bytes, iters) = (plan.wipe_files, plan.wipe_bytes, plan.wipe_iters);
    let agent = BenchAgent::start(
        &ctx.bins,
        "wipe",
        4,
        &["--scope", "connection", "--max-builds", "2", "--build-memory", "2Gi", "--stop-grace", "2s"],
    )
    .await?;
    let (base, _g) = temp_dir("berth-bench-wipe-")?;
    let loop_ok = tool("mkfs.ext4").is_some() && tool("losetup").is_some() && Path::new("/dev/loop-control").exists();
    let img_size = (bytes * 2).max(64 << 20);

    let names = ["berth", "berth_empty", "remove_tree", "rm_rf", "tmpfs", "loop_ext4", "trash"];
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let (mut loop_umount, mut loop_detach_ms, mut loop_unlink) = (Vec::new(), Vec::new(), Vec::new());
    let mut tmpfs_umount_only = Vec::new();
    for i in 0..iters {
        for k in 0..names.len() {
            let v = (k + i) % names.len();
            let dir = base.join(format!("{}-{i}", names[v]));
            match names[v] {
                "berth" => t[v].push(berth_once(&agent, files, bytes).await?),
                "berth_empty" => t[v].push(berth_once(&agent, 0, 0).await?),
                "remove_tree" => {
                    let d = dir.clone();
                    blocking(move || write_tree(&d, files, bytes, None)).await?;
                    let took = blocking(move || {
                        let t0 = Instant::now();
                        berth_shim::wipe::remove_tree(&dir).map_err(|e| anyhow!("remove_tree: {e}"))?;
                        Ok(ms(t0.elapsed()))
                    })
                    .await?;
                    t[v].push(took);
                }
                "rm_rf" => {
                    let d = dir.clone();
                    blocking(move || write_tree(&d, files, bytes, None)).await?;
                    let took = blocking(move || {
                        let t0 = Instant::now();
                        let st = Command::new("rm").arg("-rf").arg(&dir).status()?;
                        let took = ms(t0.elapsed());
                        if !st.success() || dir.exists() {
                            bail!("rm -rf {}: {st}", dir.display());
                        }
                        Ok(took)
                    })
                    .await?;
                    t[v].push(took);
                }
                "tmpfs" => {
                    let took = blocking(move || {
                        fs::create_dir(&dir)?;
                        let g = register(Undo::Mount(dir.clone()));
                        let opts = format!("size={},nr_inodes=0,mode=0755", bytes * 2 + (64 << 20));
                        nix::mount::mount(
                            Some("tmpfs"),
                            &dir,
                            Some("tmpfs"),
                            nix::mount::MsFlags::empty(),
                            Some(opts.as_str()),
                        )
                        .with_context(|| format!("mount tmpfs on {}", dir.display()))?;
                        write_tree(&dir.join("state"), files, bytes, None)?;
                        let t0 = Instant::now();
                        nix::mount::umount2(&dir, nix::mount::MntFlags::empty())
                            .with_context(|| format!("umount {}", dir.display()))?;
                        let u = ms(t0.elapsed());
                        fs::remove_dir(&dir)?;
                        let took = ms(t0.elapsed());
                        g.forget();
                        Ok((took, u))
                    })
                    .await?;
                    t[v].push(took.0);
                    tmpfs_umount_only.push(took.1);
                }
                "trash" => {
                    let d = dir.clone();
                    blocking(move || write_tree(&d, files, bytes, None)).await?;
                    let trash = base.join(format!("trash-{i}"));
                    let took = blocking(move || {
                        let t0 = Instant::now();
                        fs::rename(&dir, &trash)?;
                        let took = ms(t0.elapsed());
                        // The removal still happens, off the clock.
                        fs::remove_dir_all(&trash)?;
                        Ok(took)
                    })
                    .await?;
                    t[v].push(took);
                }
                "loop_ext4" if loop_ok => {
                    let img = base.join(format!("img-{i}"));
                    let took = blocking(move || {
                        let mut guards = Vec::new();
                        let l = loop_mount(&img, &dir, img_size, &mut guards)?;
                        write_tree(&l.mp.join("state"), files, bytes, None)?;
                        let t0 = Instant::now();
                        nix::mount::umount2(&l.mp, nix::mount::MntFlags::empty())
                            .with_context(|| format!("umount {}", l.mp.display()))?;
                        let t1 = Instant::now();
                        loop_detach(&l.dev).with_context(|| format!("detach {}", l.dev.display()))?;
                        let t2 = Instant::now();
                        fs::remove_file(&l.img)?;
                        fs::remove_dir(&l.mp)?;
                        let t3 = Instant::now();
                        for g in guards {
                            g.forget();
                        }
                        Ok([t1 - t0, t2 - t1, t3 - t2, t3 - t0].map(ms))
                    })
                    .await?;
                    loop_umount.push(took[0]);
                    loop_detach_ms.push(took[1]);
                    loop_unlink.push(took[2]);
                    t[v].push(took[3]);
                }
                _ => {}
            }
        }
        progress!("wipe: {}/{iters}", i + 1);
    }
    let leaks = agent.stop().await?;
    if !leaks.is_empty() {
        bail!("leaks after the wipe figure: {leaks:?}");
    }

    let size = if bytes >= 1 << 30 { format!("{} GiB", bytes >> 30) } else { format!("{} MiB", bytes >> 20) };
    let tree = format!("{size}/{files} files");
    let rm = &t[3];
    let base_is = "rm -rf of the same tree, same fs";
    let mut rows = vec![
        Row::new("3 wipe", format!("teardown+wipe {tree} p50 (n={iters})"), "ms", p50(&t[0]))
            .baseline(p50(rm), base_is)
            .goal(Goal::Below(100.0), "< 100 ms"),
        Row::new("3 wipe", format!("teardown+wipe {tree} p99"), "ms", p99(&t[0]))
            .baseline(p99(rm), base_is)
            .goal(Goal::Below(100.0), "< 100 ms"),
        Row::new("3 wipe", "teardown+wipe, empty state p50", "ms", p50(&t[1])).baseline(p50(rm), base_is),
        Row::new("3 wipe", format!("wipe::remove_tree alone, {tree} p50"), "ms", p50(&t[2])).baseline(p50(rm), base_is),
        Row::new("3 wipe", format!("alt: tmpfs umount+rmdir, {tree} p50"), "ms", p50(&t[4])).baseline(p50(rm), base_is),
    ];
    rows.push(
        Row::new("3 wipe", "alt: rename into a trash dir (removal off the clock) p50", "ms", p50(&t[6]))
            .baseline(p50(rm), base_is),
    );
    if loop_ok {
        rows.push(
            Row::new("3 wipe", format!("alt: loop ext4 umount+detach+unlink, {tree} p50"), "ms", p50(&t[5]))
                .baseline(p50(rm), base_is),
        );
    }
    let details = json!({
        "files": files,
        "bytes": bytes,
        "iterations": iters,
        "fs": fs_of(&base),
        "berth_ms": summary(&t[0]),
        "berth_empty_ms": summary(&t[1]),
        "remove_tree_ms": summary(&t[2]),
        "rm_rf_ms": summary(&t[3]),
        "tmpfs_umount_rmdir_ms": summary(&t[4]),
        "tmpfs_umount_only_ms": summary(&tmpfs_umount_only),
        "loop_ext4_total_ms": summary(&t[5]),
        "loop_ext4_umount_ms": summary(&loop_umount),
        "loop_ext4_detach_ms": summary(&loop_detach_ms),
        "loop_ext4_unlink_image_ms": summary(&loop_unlink),
        "loop_ext4_image_bytes": img_size,
        "trash_rename_ms": summary(&t[6]),
        "raw": {
            "berth": t[0], "berth_empty": t[1], "remove_tree": t[2], "rm_rf": t[3], "tmpfs": t[4], "loop_ext4": t[5],
            "trash_rename": t[6],
        },
    });
    Ok(Figure { rows, details })
}
