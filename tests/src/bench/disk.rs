//! Figure 7: the disk limit's cost. Two agents in the same run, alike but
//! for `--build-disk`: 0 (no limit: `--root` is a plain dir, the path before
//! issue 13) and 20Gi (the default: a sparse ext4 image on a loop device).
//! Samples alternate between them (`--scope connection`): connect -> first
//! byte (start), and connection close -> "instance ended" in the agent's log
//! (teardown up to the outcome, which frees the slot), with nothing written.
//! The image's bytes on the node right after start are read from its
//! allocated blocks.
//!
//! The mechanism's own steps and the candidate it was picked over are timed
//! in-process on the same filesystem: `berth_shim::disk::acquire` (sparse
//! copy of the size's template + loop device + mount) against `mkfs.ext4` of
//! a fresh sparse file per instance (without even binding or mounting it),
//! and the release (unmount, image unlink) against `rmdir` of a plain dir. Project quotas could not be timed: this
//! machine's kernel has no quota support (see docs/benchmarks.md).

use crate::bench::env::{self, is_instance_end, temp_dir, timed_ping, BenchAgent};
use crate::bench::report::{p50, p99, summary, Row};
use crate::bench::{Ctx, Figure};
use anyhow::{anyhow, bail, Result};
use berth_shim::disk::{self, DiskSpec};
use serde_json::json;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// (start ms, teardown ms, image bytes on the node at start).
async fn sample(agent: &BenchAgent) -> Result<(f64, f64, Option<u64>)> {
    let mark = agent.logs.mark();
    let t0 = Instant::now();
    let (s, reply, conn) = timed_ping(&agent.socket, t0).await?;
    let id = env::instance_id_of(&reply).ok_or_else(|| anyhow!("no instance id in {reply:?}"))?;
    let image = agent.state_dir.join("instances").join(&id).join(disk::IMAGE_FILE);
    let bytes = fs::metadata(&image).ok().map(|m| m.blocks() * 512);
    let closed = Instant::now();
    conn.close();
    let ended = agent
        .logs
        .wait(mark, |v| is_instance_end(v) && env::instance_of(v) == Some(id.as_str()), Duration::from_secs(30))
        .await;
    let Some((at, _)) = ended else { bail!("instance {id} did not end within 30 s:\n{}", agent.logs.tail(20)) };
    Ok((s.first_byte_ms, at.duration_since(closed).as_secs_f64() * 1e3, bytes))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// In-process: acquire/release of the mechanism, template sparse copy, and
/// the plain-dir baseline. Returns (acquire, copy, release, rmdir) ms lists.
fn steps(dir: &Path, n: usize) -> Result<[Vec<f64>; 4]> {
    let size = 20u64 << 30;
    // The template is made once, off the clock, as an agent's first start does.
    disk::template::ensure(&dir.join("templates"), size).map_err(|e| anyhow!("{e}"))?;
    let mut r: [Vec<f64>; 4] = Default::default();
    for i in 0..n {
        env::park_if_shutting_down();
        let inst = dir.join(format!("i{i}"));
        fs::create_dir(&inst)?;
        let root = inst.join("root");
        fs::create_dir(&root)?;
        let spec = DiskSpec::new(&inst, root.clone(), size);
        let t = Instant::now();
        disk::acquire(&spec, 1 << 20, &dir.join("templates")).map_err(|e| anyhow!("{e}"))?;
        r[0].push(ms(t));
        // The alternative: mkfs.ext4 of a fresh sparse file per instance.
        let own = inst.join("own.img");
        let t = Instant::now();
        fs::File::create(&own)?.set_len(size)?;
        let mkfs = std::process::Command::new(disk::MKFS)
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard"])
            .arg(&own)
            .output()?;
        r[1].push(ms(t));
        if !mkfs.status.success() {
            bail!("mkfs.ext4: {}", String::from_utf8_lossy(&mkfs.stderr));
        }
        let t = Instant::now();
        let left = berth_shim::teardown::mounts::unmount_below(Path::new("/proc"), &inst);
        fs::remove_file(&spec.image)?;
        r[2].push(ms(t));
        if !left.is_empty() {
            bail!("unmount: {left:?}");
        }
        let left = disk::settle(&disk::image_needle(&spec));
        if !left.is_empty() {
            bail!("loop devices left: {left:?}");
        }
        let plain = inst.join("plain");
        fs::create_dir(&plain)?;
        let t = Instant::now();
        fs::remove_dir(&plain)?;
        r[3].push(ms(t));
        fs::remove_dir_all(&inst)?;
    }
    Ok(r)
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    let n = if plan.quick { 4 } else { 100 };
    let warmup = if plan.quick { 1 } else { 5 };
    let common = ["--scope", "connection", "--max-builds", "4", "--idle-timeout", "30s", "--stop-grace", "2s"];
    let plain = BenchAgent::start(&ctx.bins, "disk-off", 8, &[&common[..], &["--build-disk", "0"]].concat()).await?;
    let limited =
        BenchAgent::start(&ctx.bins, "disk-20g", 8, &[&common[..], &["--build-disk", "20Gi"]].concat()).await?;
    let (mut ps, mut pt, mut ls, mut lt, mut bytes) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..warmup + n {
        for which in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let (s, t, b) = sample(if which == 0 { &plain } else { &limited }).await?;
            if i < warmup {
                continue;
            }
            if which == 0 {
                ps.push(s);
                pt.push(t);
            } else {
                ls.push(s);
                lt.push(t);
                bytes.extend(b.map(|b| b as f64 / (1u64 << 20) as f64));
            }
        }
    }
    for a in [plain, limited] {
        let leaks = a.stop().await?;
        if !leaks.is_empty() {
            bail!("leaks after the disk figure: {leaks:?}");
        }
    }
    let (tmp, _g) = temp_dir("berth-bench-disk-")?;
    let k = if plan.quick { 3 } else { 50 };
    let [acq, copy, rel, rmdir] =
        tokio::task::spawn_blocking(move || steps(&tmp, k)).await.map_err(|e| anyhow!("disk steps: {e}"))??;
    let base = "--build-disk 0 (plain dir), same run";
    let rows = vec![
        Row::new("7 disk", format!("start connect->first byte p50, 20Gi limit (n={})", ls.len()), "ms", p50(&ls))
            .baseline(p50(&ps), base),
        Row::new("7 disk", "start connect->first byte p99, 20Gi limit", "ms", p99(&ls)).baseline(p99(&ps), base),
        Row::new("7 disk", "teardown close->instance ended p50 (slot free)", "ms", p50(&lt)).baseline(p50(&pt), base),
        Row::new("7 disk", "teardown close->instance ended p99", "ms", p99(&lt)).baseline(p99(&pt), base),
        Row::new("7 disk", "image on the node after start p50 (20Gi image)", "MiB", p50(&bytes)),
        Row::new("7 disk", format!("  acquire: template copy+loop+mount p50 (n={k})"), "ms", p50(&acq))
            .baseline(p50(&copy), "alternative: mkfs.ext4 per instance (no loop, no mount)"),
        Row::new("7 disk", "  release: unmount+unlink p50", "ms", p50(&rel))
            .baseline(p50(&rmdir), "rmdir of a plain dir"),
    ];
    let details = json!({
        "samples": ls.len(),
        "limited_start_ms": summary(&ls),
        "plain_start_ms": summary(&ps),
        "limited_teardown_ms": summary(&lt),
        "plain_teardown_ms": summary(&pt),
        "image_mib_at_start": summary(&bytes),
        "acquire_ms": summary(&acq),
        "mkfs_ms": summary(&copy),
        "release_ms": summary(&rel),
        "rmdir_ms": summary(&rmdir),
    });
    Ok(Figure { rows, details })
}
