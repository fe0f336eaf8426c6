//! `berth-agent capacity --cluster`: every Node's published build slots,
//! builds in use and architecture, with totals, read from the Kubernetes API.

use super::{ANNOTATION_IN_USE, LABEL_ARCH, LABEL_K8S_ARCH};
use crate::config::{CapacityCmd, OutputFormat};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::Client;
use serde::Serialize;
use std::collections::BTreeMap;

/// One Node as `--cluster` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub node: String,
    /// `kubernetes.io/arch`, else `berth.dev/arch`, else the kubelet's nodeInfo.
    pub arch: Option<String>,
    /// The extended resource's capacity (None: berth has not published on this node).
    pub slots: Option<u64>,
    /// The `berth.dev/builds-in-use` annotation.
    pub in_use: Option<u64>,
}

/// A Quantity holding a whole count ("4"; "1k" is read too, for completeness).
pub fn count(q: &str) -> Option<u64> {
    let q = q.trim();
    if let Ok(n) = q.parse::<u64>() {
        return Some(n);
    }
    let (num, mult) = match q.char_indices().last()? {
        (i, 'k') => (&q[..i], 1_000),
        (i, 'M') => (&q[..i], 1_000_000),
        (i, 'G') => (&q[..i], 1_000_000_000),
        _ => return None,
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

pub fn row(node: &Node, resource: &str) -> NodeRow {
    let meta = &node.metadata;
    let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k)).cloned();
    let status = node.status.as_ref();
    let quantity = |m: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
        m.and_then(|m| m.get(resource)).and_then(|q| count(&q.0))
    };
    NodeRow {
        node: meta.name.clone().unwrap_or_default(),
        arch: label(LABEL_K8S_ARCH)
            .or_else(|| label(LABEL_ARCH))
            .or_else(|| status.and_then(|s| s.node_info.as_ref()).map(|i| i.architecture.clone())),
        slots: quantity(status.and_then(|s| s.capacity.as_ref()))
            .or_else(|| quantity(status.and_then(|s| s.allocatable.as_ref()))),
        in_use: meta.annotations.as_ref().and_then(|a| a.get(ANNOTATION_IN_USE)).and_then(|v| v.trim().parse().ok()),
    }
}

/// Every Node, a page of 500 at a time, sorted by name.
pub async fn rows(client: Client, resource: &str) -> Result<Vec<NodeRow>, kube::Error> {
    let api: Api<Node> = Api::all(client);
    let mut out = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let list = api.list(&lp).await?;
        out.extend(list.items.iter().map(|n| row(n, resource)));
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub nodes: u64,
    /// Nodes that publish the resource.
    pub berth_nodes: u64,
    pub slots: u64,
    pub in_use: u64,
}

impl Totals {
    fn add(&mut self, r: &NodeRow) {
        self.nodes += 1;
        if let Some(s) = r.slots {
            self.berth_nodes += 1;
            self.slots += s;
            self.in_use += r.in_use.unwrap_or(0);
        }
    }
}

/// Totals over all rows and per architecture.
pub fn totals(rows: &[NodeRow]) -> (Totals, BTreeMap<String, Totals>) {
    let mut all = Totals::default();
    let mut by_arch: BTreeMap<String, Totals> = BTreeMap::new();
    for r in rows {
        all.add(r);
        by_arch.entry(r.arch.clone().unwrap_or_else(|| "?".into())).or_default().add(r);
    }
    (all, by_arch)
}

/// The table (text) or the JSON array of rows.
pub fn render(rows: &[NodeRow], resource: &str, format: OutputFormat) -> String {
    if format == OutputFormat::Json {
        return serde_json::to_string_pretty(rows).expect("rows serialize") + "\n";
    }
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let free = |s: Option<u64>, u: Option<u64>| {
        s.map(|s| s.saturating_sub(u.unwrap_or(0)).to_string()).unwrap_or_else(|| "-".into())
    };
    let width = rows.iter().map(|r| r.node.len()).chain([5, 24]).max().unwrap_or(24);
    let line = |name: &str, arch: &str, slots: String, in_use: String, free: String| {
        format!("{name:<width$}  {arch:<7}  {slots:>5}  {in_use:>6}  {free:>5}\n")
    };
    let mut out = line("NODE", "ARCH", "SLOTS".into(), "IN USE".into(), "FREE".into());
    for r in rows {
        out += &line(&r.node, r.arch.as_deref().unwrap_or("?"), opt(r.slots), opt(r.in_use), free(r.slots, r.in_use));
    }
    let (all, by_arch) = totals(rows);
    let nodes = |n: u64| if n == 1 { "1 node".to_string() } else { format!("{n} nodes") };
    let sum = |t: &Totals| (t.slots.to_string(), t.in_use.to_string(), t.slots.saturating_sub(t.in_use).to_string());
    let (s, u, f) = sum(&all);
    out += &line(&format!("TOTAL ({})", nodes(all.berth_nodes)), "", s, u, f);
    if by_arch.len() > 1 {
        for (arch, t) in &by_arch {
            let (s, u, f) = sum(t);
            out += &line(&format!("  {arch} ({})", nodes(t.berth_nodes)), "", s, u, f);
        }
    }
    if all.nodes > all.berth_nodes {
        out +=
            &format!("{} without {resource} (no berth agent publishing there)\n", nodes(all.nodes - all.berth_nodes));
    }
    out
}

/// `capacity --cluster` with a given client.
pub async fn report(client: Client, resource: &str, format: OutputFormat) -> Result<String, kube::Error> {
    Ok(render(&rows(client, resource).await?, resource, format))
}

/// `berth-agent capacity --cluster`: kubeconfig (KUBECONFIG, ~/.kube/config) or in-cluster.
pub fn main(args: &CapacityCmd) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth-agent: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        let client = match super::default_client(std::time::Duration::from_secs(30)).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("berth-agent: no Kubernetes API configuration: {e}; set KUBECONFIG or run in a pod");
                return 1;
            }
        };
        match report(client, &args.extended_resource_name, args.output).await {
            Ok(out) => {
                print!("{out}");
                0
            }
            Err(e) => {
                let hint = match &e {
                    kube::Error::Api(s) if s.code == 403 => {
                        " (listing nodes needs RBAC verb list on nodes)".to_string()
                    }
                    _ => String::new(),
                };
                eprintln!("berth-agent: listing nodes: {e}{hint}");
                1
            }
        }
    })
}
