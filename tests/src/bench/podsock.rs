//! Figure 11: throughput on a CSI pod's socket (issue 15, `--pod-sockets
//! handoff`, the default). The bench plays kubelet: it publishes a berth
//! volume for a pod, and Fake.Echo streams N bytes up while the daemon
//! streams them back (N each way at once) through the pod's socket, which
//! the daemon accepts from itself, and over a direct connection to the
//! same daemon's instance socket (`--addr unix://...`, from Ping's
//! `addrs`). Same daemon, same cgroup limits, same client; transfers
//! alternate between the paths, each on a fresh connection; the figure is
//! the median of the repetitions. The agent's CPU during the pod-socket
//! transfers is reported: it should be none, as no byte crosses it.

use crate::bench::env::{self, cpu_time, BenchAgent, Conn};
use crate::bench::report::{p50, Goal, Row};
use crate::bench::throughput::{daemon_pid, echo};
use crate::bench::{Ctx, Figure};
use crate::kubelet::{mount_cap, pod_ctx};
use anyhow::{anyhow, bail, Context, Result};
use berth_agent::proto::csi_v1::node_client::NodeClient;
use berth_agent::proto::csi_v1::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const POD: &str = "p";

pub(crate) async fn node(csi: &Path) -> Result<NodeClient<tonic::transport::Channel>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match crate::try_channel(csi).await {
            Ok(c) => return Ok(NodeClient::new(c)),
            Err(e) if Instant::now() > deadline => bail!("connect {}: {e}", csi.display()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// kubelet's side: a pod and its berth volume (target path, mounted).
pub(crate) struct Pod {
    name: String,
    target: PathBuf,
    _mount: env::UndoGuard,
}

impl Pod {
    pub(crate) async fn publish(csi: &Path, kubelet: &Path, name: &str) -> Result<Pod> {
        let target = kubelet.join(format!("pods/{name}/volumes/kubernetes.io~csi/v/mount"));
        std::fs::create_dir_all(target.parent().unwrap())?;
        let req = NodePublishVolumeRequest {
            volume_id: format!("v-{name}"),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap()),
            volume_context: pod_ctx(name, "ci"),
            ..Default::default()
        };
        node(csi).await?.node_publish_volume(req).await.map_err(|s| anyhow!("NodePublishVolume: {}", s.message()))?;
        let mount = env::register(env::Undo::Mount(target.clone()));
        Ok(Pod { name: name.into(), target, _mount: mount })
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.target.join("buildkitd.sock")
    }

    /// NodeUnpublishVolume (the pod is gone: its instance is reaped).
    pub(crate) async fn unpublish(self, csi: &Path) -> Result<()> {
        let req = NodeUnpublishVolumeRequest {
            volume_id: format!("v-{}", self.name),
            target_path: self.target.display().to_string(),
        };
        node(csi)
            .await?
            .node_unpublish_volume(req)
            .await
            .map_err(|s| anyhow!("NodeUnpublishVolume: {}", s.message()))?;
        Ok(())
    }
}

pub async fn run(ctx: &Ctx) -> Result<Figure> {
    let plan = &ctx.plan;
    let (tmp, _tmp_g) = env::temp_dir("bbp-")?;
    let csi = tmp.join("csi.sock");
    let kubelet = tmp.join("kubelet");
    let run_dir = tmp.join("run");
    let csi_url = format!("unix://{}", csi.display());
    let agent = BenchAgent::start(
        &ctx.bins,
        "podsock",
        2,
        &[
            "--max-builds",
            "1",
            "--idle-timeout",
            "120s",
            "--build-memory",
            "1Gi",
            "--stop-grace",
            "2s",
            "--pod-sockets",
            "handoff",
            "--csi-endpoint",
            &csi_url,
            "--kubelet-dir",
            &kubelet.display().to_string(),
            "--run-dir",
            &run_dir.display().to_string(),
        ],
    )
    .await?;
    // Unmounted on any exit (after the agent's undo, which kills it).
    let pod = Pod::publish(&csi, &kubelet, POD).await?;
    let pod_sock = pod.socket();

    // Held open for the whole figure, so the instance stays.
    let holder = Conn::open(&pod_sock).await?;
    let reply = holder.ping().await?;
    if !reply.addrs.iter().any(|a| a == "fd://") {
        bail!("the pod's daemon was not handed the pod's socket (addrs {:?})", reply.addrs);
    }
    let id = env::instance_id_of(&reply).ok_or_else(|| anyhow!("no instance id in {}", reply.root))?;
    let direct: PathBuf = reply
        .addrs
        .iter()
        .find_map(|a| a.strip_prefix("unix://"))
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("Ping reply has no unix addr: {:?}", reply.addrs))?;
    let dpid = daemon_pid(&agent, &id).context("daemon.pid")?;

    let mut pattern = vec![0u8; plan.tp_chunk];
    crate::pattern::fill(0, &mut pattern);
    let chunk = Arc::new(pattern);
    let paths: [(&str, &Path); 2] = [("direct", &direct), ("pod", &pod_sock)];
    let small = (plan.tp_bytes / 16).max(chunk.len() as u64);
    for (_, p) in &paths {
        echo(p, small, &chunk).await?;
    }
    let reps = plan.tp_reps.max(if plan.quick { 1 } else { 5 });
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut agent_cpu = [0.0; 2];
    let mut daemon_cpu = [0.0; 2];
    for rep in 0..reps {
        for j in 0..2 {
            let i = (j + rep) % 2;
            let a0 = cpu_time(agent.pid).unwrap_or_default();
            let d0 = cpu_time(dpid).unwrap_or_default();
            secs[i].push(echo(paths[i].1, plan.tp_bytes, &chunk).await?);
            agent_cpu[i] += cpu_time(agent.pid).unwrap_or_default().saturating_sub(a0).as_secs_f64();
            daemon_cpu[i] += cpu_time(dpid).unwrap_or_default().saturating_sub(d0).as_secs_f64();
        }
        progress!("podsock: {}/{reps}", rep + 1);
    }
    holder.close();
    pod.unpublish(&csi).await?;
    let leaks = agent.stop().await?;
    if !leaks.is_empty() {
        bail!("leaks after the pod-socket figure: {leaks:?}");
    }
    let mib = plan.tp_bytes as f64 / (1 << 20) as f64;
    let rates: Vec<Vec<f64>> = secs.iter().map(|s| s.iter().map(|x| mib / x).collect()).collect();
    let gib = plan.tp_bytes as f64 * reps as f64 / (1u64 << 30) as f64;
    let size = if plan.tp_bytes >= 1 << 30 {
        format!("{} GiB", plan.tp_bytes >> 30)
    } else {
        format!("{} MiB", plan.tp_bytes >> 20)
    };
    let base_is = "direct connection to the same daemon's instance socket";
    let rows = vec![
        Row::new(
            "11 podsock",
            format!("Echo {size} each way on a pod socket, MiB/s (median of {reps})"),
            "MiB/s",
            p50(&rates[1]),
        )
        .baseline(p50(&rates[0]), base_is)
        .goal(Goal::RatioAtLeast(0.98), ">= 0.98x (pod socket, issue 15)"),
        Row::new("11 podsock", "  agent CPU per GiB each way, pod socket", "CPU-s", agent_cpu[1] / gib.max(1e-9))
            .baseline(agent_cpu[0] / gib.max(1e-9), "agent CPU during the direct transfers (idle)"),
    ];
    let details = json!({
        "bytes_each_way": plan.tp_bytes,
        "message_bytes": plan.tp_chunk,
        "reps": reps,
        "paths": ["direct", "pod"],
        "seconds": secs,
        "mib_s": rates,
        "agent_cpu_s_per_gib": agent_cpu.iter().map(|c| c / gib.max(1e-9)).collect::<Vec<_>>(),
        "daemon_cpu_s_per_gib": daemon_cpu.iter().map(|c| c / gib.max(1e-9)).collect::<Vec<_>>(),
    });
    Ok(Figure { rows, details })
}
