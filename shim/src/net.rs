//! The instance's end of an isolated build network (`--build-network
//! isolated`): one veth pair from the agent's network namespace into the
//! daemon's, with a /30 of the build subnet on it.
//!
//! Who does it: the shim, in the parent, during the uid_map handshake. The
//! daemon's network namespace exists only after clone, and the child waits
//! on the handshake byte until the shim has written its maps; configuring
//! the link in the same window costs no extra round trip to the agent, and
//! the daemon never runs without its network. The namespace is created by
//! clone together with the user namespace, so it is owned by the instance's
//! user namespace: the build's root may bind ports below 1024 and set its
//! own firewall inside, without any power over the node.
//!
//! How: netlink through `rtnetlink` (the crate under most Rust network
//! tools) on a current-thread tokio runtime, which starts no thread. The
//! veth is created in the agent's namespace with its peer placed straight
//! into the child's (`IFLA_NET_NS_PID`); the peer's address and default
//! route are set over a second netlink socket opened inside the child's
//! namespace (setns of this thread only, and back at once).
//!
//! The firewall element: with the veth, the shim adds `inner address . host
//! veth` to the `builds` set of berth's table (see [`nft`]); the rules
//! accept a build's packets only from that pair. Added before the child is
//! released, so the daemon never sends a packet the set does not know.
//!
//! Release: the host side vanishes by itself when the instance's namespace
//! dies (its peer is destroyed with it), but the teardown and `delete`
//! still remove it by name, then the set element, then the subnet lease:
//! the lease goes last, so a subnet is never handed out while a link or an
//! element of it may still exist.
#![forbid(unsafe_code)]

pub mod nft;

use crate::spec::NetSpec;
use crate::steps::Steps;
use futures_util::TryStreamExt;
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// The daemon's side of the veth, inside its namespace.
pub const INNER_IF: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("setns into {path}: {errno}")]
    Setns { path: PathBuf, errno: Errno },
    #[error("no link named {0} after creating it")]
    NoLink(String),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
}

impl NetError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            NetError::Netlink { .. } => "netlink",
            NetError::Io { .. } => "io",
            NetError::Setns { .. } => "setns",
            NetError::NoLink(_) => "no_link",
            NetError::Nft(e) => e.metric_label(),
        }
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// A current-thread runtime: the shim stays a single-threaded process.
fn runtime() -> Result<tokio::runtime::Runtime, NetError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| NetError::Io { what: "tokio runtime".into(), source })
}

/// A netlink handle in the calling thread's current network namespace; the
/// connection runs as a task of the current runtime.
pub fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetError::Io { what: "netlink socket".into(), source })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink handle whose socket lives in the network namespace of `pid`.
/// A socket stays in the namespace it was created in, so this thread only
/// visits that namespace for the `socket(2)` call.
fn connect_in(proc_root: &Path, pid: i32) -> Result<Handle, NetError> {
    let own_path = proc_root.join("thread-self/ns/net");
    let theirs_path = proc_root.join(pid.to_string()).join("ns/net");
    let open = |p: &Path| File::open(p).map_err(|source| NetError::Io { what: p.display().to_string(), source });
    let (own, theirs) = (open(&own_path)?, open(&theirs_path)?);
    setns(&theirs, CloneFlags::CLONE_NEWNET).map_err(|errno| NetError::Setns { path: theirs_path, errno })?;
    let handle = connect();
    // Without the way back this thread would run the rest of the teardown
    // in the instance's namespace: that must not happen silently.
    setns(&own, CloneFlags::CLONE_NEWNET).expect("setns back into the shim's own network namespace");
    handle
}

/// The index of the link `name`, None when there is none.
pub async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.to_io().raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("look up link {name}"))(e)),
    }
}

/// Names of the links of the current namespace that start with `prefix`
/// (the sweep's and the leak scan's view of host-side veths).
pub async fn links_with_prefix(handle: &Handle, prefix: &str) -> Result<Vec<String>, NetError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut out = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(nl("list links"))? {
        for a in msg.attributes {
            if let LinkAttribute::IfName(n) = a {
                if n.starts_with(prefix) {
                    out.push(n);
                }
            }
        }
    }
    Ok(out)
}

/// Deletes the link `name`; Ok(false) when it was already gone.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, NetError> {
    let msg = LinkUnspec::new_with_name(name).build();
    match handle.link().del_with_message(msg).execute().await {
        Ok(()) => Ok(true),
        Err(rtnetlink::Error::NetlinkError(e)) if e.to_io().raw_os_error() == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl(format!("delete link {name}"))(e)),
    }
}

/// Creates the veth pair for the child `pid` and configures both ends.
/// Returns the time of each step.
pub fn setup(net: &NetSpec, pid: i32, proc_root: &Path) -> Result<Steps, NetError> {
    let mut steps = Steps::new();
    let rt = runtime()?;
    steps.mark("runtime");
    rt.block_on(async {
        let host = connect()?;
        let peer = LinkUnspec::new_with_name(INNER_IF).setns_by_pid(pid as u32).build();
        let veth =
            LinkVeth::new(&net.host_if, INNER_IF).set_info_data(InfoData::Veth(InfoVeth::Peer(peer))).up().build();
        host.link().add(veth).execute().await.map_err(nl(format!("create veth {}", net.host_if)))?;
        steps.mark("veth");
        let idx = index_of(&host, &net.host_if).await?.ok_or_else(|| NetError::NoLink(net.host_if.clone()))?;
        host.address()
            .add(idx, IpAddr::V4(net.host_addr), net.prefix_len)
            .execute()
            .await
            .map_err(nl(format!("address {}/{} on {}", net.host_addr, net.prefix_len, net.host_if)))?;
        steps.mark("host_addr");

        let inner = connect_in(proc_root, pid)?;
        steps.mark("setns");
        let i = index_of(&inner, INNER_IF).await?.ok_or_else(|| NetError::NoLink(INNER_IF.into()))?;
        inner
            .address()
            .add(i, IpAddr::V4(net.inner_addr), net.prefix_len)
            .execute()
            .await
            .map_err(nl(format!("address {}/{} on the instance's {INNER_IF}", net.inner_addr, net.prefix_len)))?;
        inner.link().set(LinkUnspec::new_with_index(i).up().build()).execute().await.map_err(nl("set eth0 up"))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(net.host_addr).output_interface(i).build();
        inner.route().add(route).execute().await.map_err(nl(format!("default route via {}", net.host_addr)))?;
        steps.mark("inner");
        if !net.nft_table.is_empty() {
            nft::add_build(&net.nft_table, net.inner_addr, &net.host_if)?;
            steps.mark("nft");
        }
        Ok::<(), NetError>(())
    })?;
    Ok(steps)
}

/// Undoes [`setup`] and releases the subnet: removes the host-side link
/// (gone already when the namespace died), then the lease. Returns the
/// leftovers, one line each naming the link or path.
pub fn release(net: &NetSpec) -> Vec<String> {
    let mut left = Vec::new();
    let gone = runtime().and_then(|rt| rt.block_on(async { delete_link(&connect()?, &net.host_if).await }));
    if let Err(e) = gone {
        left.push(format!("link {}: {e}", net.host_if));
        // The lease stays: the subnet is not free while its link may exist.
        return left;
    }
    if !net.nft_table.is_empty() {
        if let Err(e) = nft::remove_build(&net.nft_table, net.inner_addr, &net.host_if) {
            left.push(format!("nftables element {} . {}: {e}", net.inner_addr, net.host_if));
            return left;
        }
    }
    match fs::remove_file(&net.lease) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => left.push(format!("{}: {e}", net.lease.display())),
    }
    left
}
