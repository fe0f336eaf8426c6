//! Command line and configuration: flags, their `BERTH_*` environment
//! equivalents (clap), and an optional TOML file whose keys are flag names.
//!
//! Precedence: command line, then the config file, then the environment,
//! then defaults. Every bad value exits with a message that names the flag.

pub mod file;
pub mod quantity;
pub mod resource;

pub use file::expand_config;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

pub use berth_shim::cgroup::Limits;

#[derive(Debug, Parser)]
#[command(
    name = "berth-agent",
    version,
    about = "One fresh, rootless, limited buildkitd per build client",
    args_override_self = true
)]
pub struct Cli {
    /// TOML file of settings, keys named like the long flags (`build-memory = "4Gi"`).
    #[arg(long, global = true, env = "BERTH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve build clients on the node sockets.
    Run(Box<RunArgs>),
    /// Preflight: can this node run berth? Exits non-zero with a fix per missing piece.
    Check(CheckArgs),
    /// Build slots of this node or of a given node shape, and pool sizing.
    Capacity(CapacityCmd),
}

/// How many builds run at once: `auto` (from node size, reserves and
/// per-build limits) or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxBuilds {
    Auto,
    Fixed(u64),
}

fn parse_max_builds(s: &str) -> Result<MaxBuilds, String> {
    if s == "auto" {
        return Ok(MaxBuilds::Auto);
    }
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(MaxBuilds::Fixed(n)),
        _ => Err(format!("{s:?}: use auto or a whole number of at least 1")),
    }
}

/// Slots and reserves, shared by `run` and `capacity`.
#[derive(Debug, Clone, Args)]
pub struct CapacityArgs {
    /// Concurrent builds on this node: auto or a number.
    #[arg(long, env = "BERTH_MAX_BUILDS", default_value = "auto", value_parser = parse_max_builds)]
    pub max_builds: MaxBuilds,
    /// Memory kept back for the node itself (kubelet, system daemons).
    #[arg(long, env = "BERTH_RESERVE_MEMORY", default_value = "1Gi", value_parser = quantity::parse_bytes)]
    pub reserve_memory: u64,
    /// CPU kept back for the node itself.
    #[arg(long, env = "BERTH_RESERVE_CPUS", default_value = "500m", value_parser = quantity::parse_millicpus_or_zero)]
    pub reserve_cpus: u64,
    /// Free space kept on the state dir's filesystem (a size, or a percent of
    /// the filesystem): `auto` slots leave it out, and while free space is
    /// below it new builds are refused. The default matches kubelet's
    /// nodefs.available<10% eviction threshold.
    #[arg(long, env = "BERTH_RESERVE_DISK", default_value = "10%", value_parser = quantity::parse_share)]
    pub reserve_disk: quantity::Share,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct CapacityCmd {
    #[command(flatten)]
    pub host: HostArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// Plan for a node of this memory instead of this node.
    #[arg(long, value_parser = quantity::parse_bytes)]
    pub node_memory: Option<u64>,
    /// Plan for a node of this many CPUs instead of this node.
    #[arg(long, value_parser = quantity::parse_millicpus)]
    pub node_cpus: Option<u64>,
    /// Plan for a state dir filesystem of this size instead of this node's.
    #[arg(long, value_parser = quantity::parse_bytes)]
    pub node_disk: Option<u64>,
    /// Concurrent builds the pool must carry: prints the nodes needed.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub target_concurrency: Option<u64>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Slots and builds in use of every Node, read from the Kubernetes API (kubeconfig or in-cluster).
    #[arg(long)]
    pub cluster: bool,
    /// Extended resource `--cluster` reads.
    #[arg(long, env = "BERTH_EXTENDED_RESOURCE_NAME", default_value = resource::DEFAULT_RESOURCE, value_parser = resource::parse_resource_name)]
    pub extended_resource_name: String,
}

/// Where berth looks at and writes to the host. Configurable so that unit
/// tests run on temp trees and privileged tests on the real host.
#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    /// State dir: instance dirs, id-range leases.
    #[arg(long, env = "BERTH_STATE_DIR", default_value = "/var/lib/berth")]
    pub state_dir: PathBuf,
    /// Root of the cgroup filesystem.
    #[arg(long, env = "BERTH_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Root of procfs.
    #[arg(long, env = "BERTH_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Cgroup (relative to each hierarchy) that instance cgroups nest under;
    /// default: the agent's own cgroup.
    #[arg(long, env = "BERTH_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// First host id of the pool that instance uid/gid ranges come from.
    #[arg(long, env = "BERTH_IDMAP_BASE", default_value_t = 1 << 20)]
    pub idmap_base: u32,
    /// Ids in the pool; a multiple of 65536 (one range per concurrent instance).
    #[arg(long, env = "BERTH_IDMAP_COUNT", default_value_t = 256 * 65536)]
    pub idmap_count: u32,
    /// The build daemon to run in each instance.
    #[arg(long, env = "BERTH_DAEMON", default_value = "buildkitd")]
    pub daemon: PathBuf,
    /// Root of the host's /etc (passwd, group, subuid), for the id-pool checks.
    #[arg(long, env = "BERTH_ETC_ROOT", default_value = "/etc")]
    pub etc_root: PathBuf,
    /// The berth-shim binary; default: beside berth-agent, else on PATH.
    #[arg(long, env = "BERTH_SHIM")]
    pub shim: Option<PathBuf>,
}

fn parse_build_disk(s: &str) -> Result<u64, String> {
    match quantity::parse_bytes(s)? {
        0 => Ok(0),
        n if n < berth_shim::disk::MIN_SIZE => Err(format!("{s:?}: use 0 (unlimited) or at least 16Mi")),
        n => Ok(n),
    }
}

/// Per-build limits, shared by `run` and `capacity`.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Memory limit of one build (Kubernetes quantity: 512Mi, 4Gi).
    #[arg(long, env = "BERTH_BUILD_MEMORY", default_value = "2Gi", value_parser = quantity::parse_bytes)]
    pub build_memory: u64,
    /// CPU limit of one build (2, 0.5 or 500m).
    #[arg(long, env = "BERTH_BUILD_CPUS", default_value = "1", value_parser = quantity::parse_millicpus)]
    pub build_cpus: u64,
    /// Hard disk limit of one build (everything under its state dir: cache,
    /// snapshots, RUN step writes); a write past it fails with ENOSPC. 0 means
    /// unlimited and must be given explicitly on a node without loop devices.
    #[arg(long, env = "BERTH_BUILD_DISK", default_value = "20Gi", value_parser = parse_build_disk)]
    pub build_disk: u64,
    /// Most processes and threads in one build.
    #[arg(long, env = "BERTH_BUILD_PIDS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(8..))]
    pub build_pids: u64,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits { memory_bytes: self.build_memory, cpu_millis: self.build_cpus, pids: self.build_pids }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scope {
    /// Connections from the same peer (uid + cgroup) share one instance.
    Client,
    /// Every connection gets its own instance.
    Connection,
}

/// How far a warm instance is started ahead (`--warm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WarmStage {
    /// The daemon runs and answers: a claim serves at once.
    Daemon,
    /// Everything but the daemon (namespaces, cgroup, network, disk), its
    /// child held before exec: a claim execs a fresh daemon, no daemon
    /// memory is held while the instance waits.
    Sandbox,
}

/// How a CSI pod's socket reaches its daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodSockets {
    /// The agent admits, then hands the listening socket to the daemon
    /// (`--addr fd://`): the pod's bytes never cross the agent.
    Handoff,
    /// Every connection through the agent's proxy, as on the node socket.
    Proxy,
}

/// The network build steps see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BuildNetwork {
    /// A network namespace of the instance's own, joined to the agent's by a
    /// veth, egress by NAT; metadata, link-local, the agent's own addresses
    /// and other builds refused (see the README's network section).
    Isolated,
    /// The node's network (rootless buildkit's default): builds can fetch
    /// packages, and can also reach anything the node can.
    Host,
    /// A network namespace of the instance's own with only loopback:
    /// offline builds, nothing of the node reachable.
    None,
}

/// The build network's settings, shared by `run` and `check`.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// The network of build steps: isolated (own namespace, NAT egress, the node refused),
    /// host (the node's) or none (loopback only).
    #[arg(long, env = "BERTH_BUILD_NETWORK", value_enum, default_value_t = BuildNetwork::Isolated)]
    pub build_network: BuildNetwork,
    /// Pool of build addresses (isolated): one /30 per instance.
    #[arg(long, env = "BERTH_BUILD_SUBNET", default_value = "10.213.0.0/16", value_parser = parse_subnet)]
    pub build_subnet: ipnet::Ipv4Net,
    /// A range builds may not reach (repeatable or comma-separated), e.g. the pod and service CIDRs.
    #[arg(long = "build-egress-deny", env = "BERTH_BUILD_EGRESS_DENY", value_delimiter = ',', value_parser = parse_cidr)]
    pub build_egress_deny: Vec<ipnet::Ipv4Net>,
    /// A range builds may reach even inside a denied one (repeatable), e.g. an in-cluster registry.
    #[arg(long = "build-egress-allow", env = "BERTH_BUILD_EGRESS_ALLOW", value_delimiter = ',', value_parser = parse_cidr)]
    pub build_egress_allow: Vec<ipnet::Ipv4Net>,
    /// The resolv.conf whose resolvers builds use (port 53 only; loopback ones are dropped).
    #[arg(long, env = "BERTH_BUILD_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub build_resolv_conf: PathBuf,
    /// The nftables table (family inet) of berth's rules; agents sharing a state dir share it.
    #[arg(long, env = "BERTH_BUILD_NFT_TABLE", default_value = "berth", value_parser = parse_table)]
    pub build_nft_table: String,
}

fn parse_cidr(s: &str) -> Result<ipnet::Ipv4Net, String> {
    let net: ipnet::Ipv4Net = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 range like 10.96.0.0/12 (IPv6 is not supported)"))?;
    Ok(net.trunc())
}

fn parse_subnet(s: &str) -> Result<ipnet::Ipv4Net, String> {
    let net = parse_cidr(s)?;
    if net.prefix_len() > 30 {
        return Err(format!("{s:?} is smaller than one instance's /30; use a /24 or larger"));
    }
    Ok(net)
}

fn parse_table(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 32 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then(|| s.to_string()).ok_or_else(|| format!("{s:?} is not an nftables table name (letters, digits, _)"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub host: HostArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// Fresh instances kept started ahead for new clients (counted in the slots).
    #[arg(long, env = "BERTH_WARM", default_value_t = 0)]
    pub warm: usize,
    /// How far warm instances are started: a running daemon, or a sandbox whose daemon execs at the claim.
    #[arg(long, env = "BERTH_WARM_STAGE", value_enum, default_value_t = WarmStage::Daemon)]
    pub warm_stage: WarmStage,
    /// Clients beyond the slots wait in a FIFO queue of at most this many; 0: no queue.
    #[arg(long, env = "BERTH_QUEUE_SIZE", default_value_t = 16)]
    pub queue_size: usize,
    /// Connections one client may hold open at once (1-256); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "BERTH_MAX_CLIENT_CONNECTIONS", default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub max_client_connections: usize,
    /// Connections the clients waiting in the queue may hold together.
    #[arg(long, env = "BERTH_MAX_QUEUED_CONNECTIONS", default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_queued_connections: usize,
    /// The longest a client waits in the queue.
    #[arg(long, env = "BERTH_QUEUE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub queue_timeout: Duration,
    /// Socket to serve build clients on (repeatable).
    #[arg(long = "listen", env = "BERTH_LISTEN", value_delimiter = ',', default_value = "unix:///run/berth/buildkitd.sock", value_parser = parse_unix_url)]
    pub listen: Vec<PathBuf>,
    /// Mode of the listening sockets (octal).
    #[arg(long, env = "BERTH_SOCKET_MODE", default_value = "0660", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// A buildkitd.toml fragment (BuildKit's own format) merged into every instance's config:
    /// registry mirrors, CAs, plain-HTTP registries, GC; reloaded on SIGHUP or change.
    #[arg(long, env = "BERTH_BUILDKITD_CONFIG", value_name = "FILE")]
    pub buildkitd_config: Option<PathBuf>,
    /// Extra argument for the daemon (repeatable); use `--daemon-arg=--flag`.
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    pub daemon_args: Vec<String>,
    /// Most bytes of one daemon's output kept in its daemon.log (Kubernetes quantity);
    /// the rest is dropped, its last 4 KiB still reach the instance's end report.
    #[arg(long, env = "BERTH_DAEMON_LOG_CAP", default_value = "16Mi", value_parser = quantity::parse_bytes)]
    pub daemon_log_cap: u64,
    /// How long a new instance may take to be ready: READY=1 on its
    /// NOTIFY_SOCKET, or a gRPC answer on its socket, whichever comes first.
    #[arg(long, env = "BERTH_START_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,
    /// After a client's instance fails to start, its new connections get the
    /// same error at once for this long instead of a new start (0: off).
    #[arg(long, env = "BERTH_START_FAILURE_BACKOFF", default_value = "10s", value_parser = humantime::parse_duration)]
    pub start_failure_backoff: Duration,
    /// An instance with no connection for this long is reaped and wiped.
    #[arg(long, env = "BERTH_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long running builds may go on before they are ended.
    #[arg(long, env = "BERTH_DRAIN_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Grace between SIGTERM and SIGKILL of a daemon.
    #[arg(long, env = "BERTH_STOP_GRACE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub stop_grace: Duration,
    #[command(flatten)]
    pub net: NetArgs,
    /// What shares an instance.
    #[arg(long, env = "BERTH_SCOPE", value_enum, default_value_t = Scope::Client)]
    pub scope: Scope,
    /// How a CSI pod's socket reaches its daemon (issue 15): `handoff` (the
    /// daemon accepts the pod's connections itself) or `proxy` (through the agent).
    #[arg(long, env = "BERTH_POD_SOCKETS", value_enum, default_value_t = PodSockets::Handoff)]
    pub pod_sockets: PodSockets,
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve the CSI Identity and Node services here (kubelet's plugin dir).
    #[arg(long, env = "BERTH_CSI_ENDPOINT", value_parser = parse_unix_url)]
    pub csi_endpoint: Option<PathBuf>,
    /// The CSI driver name pods put in `csi: {driver: ...}`.
    #[arg(long, env = "BERTH_CSI_DRIVER_NAME", default_value = "berth.dev")]
    pub csi_driver_name: String,
    /// kubelet's root dir: CSI target paths must lie under `<dir>/pods/`.
    #[arg(long, env = "BERTH_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// Register the CSI driver with kubelet by serving kubelet's plugin registration API on
    /// `<dir>/<driver>-reg.sock` (kubelet's plugins_registry, usually
    /// `/var/lib/kubelet/plugins_registry`); needs --csi-endpoint. Unset: no registration
    /// (a node-driver-registrar, or nothing, registers the driver).
    #[arg(long, env = "BERTH_REGISTRATION_DIR")]
    pub registration_dir: Option<PathBuf>,
    /// Host dir for per-pod socket dirs (`<dir>/pods/<volume>/buildkitd.sock`).
    #[arg(long, env = "BERTH_RUN_DIR", default_value = "/run/berth")]
    pub run_dir: PathBuf,
    /// Namespaces whose pods may publish a berth volume (comma-separated); empty: all.
    #[arg(long, env = "BERTH_CSI_ALLOWED_NAMESPACES", value_delimiter = ',')]
    pub csi_allowed_namespaces: Vec<String>,
    /// Most berth volumes one namespace may hold on this node; 0: no limit.
    #[arg(long, env = "BERTH_CSI_MAX_PER_NAMESPACE", default_value_t = 0)]
    pub csi_max_per_namespace: usize,
    /// Address of /healthz, /readyz and /metrics; `off` disables them.
    #[arg(long, env = "BERTH_HTTP_ADDR", default_value = "0.0.0.0:9411", value_parser = parse_http_addr)]
    pub http_addr: HttpAddr,
    /// This Node's name in the Kubernetes API (default: env NODE_NAME, which the chart
    /// sets from the downward API); without one, capacity is not published.
    #[arg(long, env = "BERTH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Publish the slots as a Node extended resource, plus berth.dev/* labels and
    /// annotations (default: on when the node name is known); `--publish-capacity=false` turns it off.
    #[arg(long, env = "BERTH_PUBLISH_CAPACITY", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub publish_capacity: Option<bool>,
    /// Extended resource the slots are published as (what build pods request).
    #[arg(long, env = "BERTH_EXTENDED_RESOURCE_NAME", default_value = resource::DEFAULT_RESOURCE, value_parser = resource::parse_resource_name)]
    pub extended_resource_name: String,
}

/// `--http-addr`: a socket address or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpAddr(pub Option<std::net::SocketAddr>);

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s == "off" {
        return Ok(HttpAddr(None));
    }
    s.parse().map(|a| HttpAddr(Some(a))).map_err(|_| format!("{s:?} is not an address like 0.0.0.0:9411 (or off)"))
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub host: HostArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub net: NetArgs,
    /// The buildkitd.toml fragment `run` would merge (validated as `run` does).
    #[arg(long, env = "BERTH_BUILDKITD_CONFIG", value_name = "FILE")]
    pub buildkitd_config: Option<PathBuf>,
}

fn parse_unix_url(s: &str) -> Result<PathBuf, String> {
    let path = s.strip_prefix("unix://").unwrap_or(s);
    if !path.starts_with('/') {
        return Err(format!("{s:?} is not a unix socket address: use unix:///absolute/path.sock"));
    }
    // sun_path holds 108 bytes including the NUL.
    if path.len() > 107 {
        return Err(format!("{path:?} is {} bytes; a unix socket path holds at most 107", path.len()));
    }
    Ok(PathBuf::from(path))
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode like 0660"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_and_overrides() {
        let cli = parse(&["berth-agent", "run"]).unwrap();
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.listen, vec![PathBuf::from("/run/berth/buildkitd.sock")]);
        assert_eq!(r.limits.build_memory, 2 << 30);
        assert_eq!(r.idle_timeout, Duration::from_secs(30));
        assert_eq!(r.scope, Scope::Client);
        let cli = parse(&[
            "berth-agent",
            "run",
            "--build-memory",
            "1Gi",
            "--build-memory=512Mi",
            "--listen",
            "unix:///a.sock",
            "--listen",
            "/b.sock",
            "--daemon-arg=--debug",
            "--build-cpus",
            "500m",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.limits.build_memory, 512 << 20);
        assert_eq!(r.limits.build_cpus, 500);
        assert_eq!(r.listen, vec![PathBuf::from("/a.sock"), PathBuf::from("/b.sock")]);
        assert_eq!(r.daemon_args, vec!["--debug".to_string()]);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = parse(&["berth-agent", "run", "--build-memory", "4GB"]).unwrap_err().to_string();
        assert!(err.contains("--build-memory") && err.contains("unknown size suffix"), "{err}");
        let err = parse(&["berth-agent", "run", "--listen", "tcp://0.0.0.0:1"]).unwrap_err().to_string();
        assert!(err.contains("--listen"), "{err}");
        let err = parse(&["berth-agent", "run", "--idle-timeout", "soon"]).unwrap_err().to_string();
        assert!(err.contains("--idle-timeout"), "{err}");
        let err = parse(&["berth-agent", "run", "--scope", "pod"]).unwrap_err().to_string();
        assert!(err.contains("--scope"), "{err}");
    }

    #[test]
    fn config_file_sits_between_env_and_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("berth.toml");
        std::fs::write(&f, "build-memory = \"3Gi\"\nbuild-pids = 100\nlisten = [\"/x.sock\", \"/y.sock\"]\n").unwrap();
        let argv: Vec<OsString> = ["berth-agent", "run", "--config", f.to_str().unwrap(), "--build-pids", "200"]
            .iter()
            .map(OsString::from)
            .collect();
        let cli = Cli::try_parse_from(expand_config(argv).unwrap()).unwrap();
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.limits.build_memory, 3 << 30);
        assert_eq!(r.limits.build_pids, 200);
        assert_eq!(r.listen.len(), 2);
        std::fs::write(&f, "build-memory = [").unwrap();
        let argv: Vec<OsString> =
            ["berth-agent", "run", "--config", f.to_str().unwrap()].iter().map(OsString::from).collect();
        assert!(expand_config(argv).unwrap_err().contains("berth.toml"));
    }
}
