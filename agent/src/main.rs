//! `ferrynet-agent`: runs as a DaemonSet on every node.
//!
//! - `run` (the default): installs the CNI, keeps the conflist in step with the node's PodCIDRs,
//!   routes to every other node's pods, masquerades pod egress, garbage-collects IPAM, and
//!   translates Services in eBPF (the kube-proxy replacement).
//! - `install-cni`: the init container's job: binaries and conflist, then exit.
//! - `uninstall`: removes what the agent installed.
//! - `cleanup`: removes the service datapath (links, programs, maps, pins).
//! - `status`: shows the node, its controllers and readiness (`--ready` as a readiness probe).
//! - `services`, `explain`: how this node translates Services, read from the pinned maps.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand};
use ferrynet_agent::{
    agent::{self, AgentConfig},
    cni_config::{CniConfigConfig, CniPaths},
    datapath::{MapSizes, TranslationModes},
    ipam_gc::IpamGcConfig,
    node::{controller::NodeNetworkingConfig, topology::RoutingMode, vxlan::VxlanSettings},
    services::{cli, controller::ServicesConfig, maglev, service_cidrs::ServiceCidrSource, table::LoadBalancing},
    status,
};
use ipnet::IpNet;

#[derive(Parser)]
#[command(name = "ferrynet-agent", version, about = "ferrynet's node agent")]
struct Cli {
    #[command(flatten)]
    options: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Install the CNI binaries and conflist, then exit (for the DaemonSet's init container).
    InstallCni {
        /// How long to wait for the node's PodCIDR.
        #[arg(long, default_value = "300")]
        wait_seconds: u64,
    },
    /// Remove the conflist, the binaries, the agent's routes, VXLAN device, firewall table and
    /// service datapath.
    Uninstall,
    /// Remove every program, link, map and pin of the service datapath (service translation
    /// stops; pods keep their addresses and routes).
    Cleanup,
    /// List the Service frontends this node translates, from the pinned maps.
    Services,
    /// Say how this node translates a Service address: which Service, which backends in which
    /// state, the policy and affinity in force, and why an endpoint is excluded.
    Explain {
        /// `ADDRESS:PORT` or `[IPv6]:PORT`, with `/tcp` (the default) or `/udp`.
        target: String,
        /// A client address, to say where its next connection goes.
        #[arg(long)]
        from: Option<std::net::IpAddr>,
    },
    /// Show what the agent last did on this node.
    Status {
        #[arg(long)]
        json: bool,
        /// Print nothing; exit 0 only if the agent is running and every controller that gates
        /// readiness is healthy (the readiness probe).
        #[arg(long)]
        ready: bool,
    },
}

#[derive(Args)]
struct Options {
    /// This node's name (the DaemonSet sets it from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// A kubeconfig; without it, the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, env = "FERRYNET_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    #[arg(long, env = "FERRYNET_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where the plugin binaries to install are (default: next to this executable).
    #[arg(long, env = "FERRYNET_CNI_SOURCE_DIR")]
    cni_source_dir: Option<PathBuf>,
    /// The network name in the conflist (and the IPAM store's directory).
    #[arg(long, env = "FERRYNET_NETWORK", default_value = "ferrynet")]
    network: String,
    #[arg(long, env = "FERRYNET_IPAM_DATA_DIR", default_value = "/var/lib/ferrynet/ipam")]
    ipam_data_dir: PathBuf,
    #[arg(long, env = "FERRYNET_STATE_DIR", default_value = "/var/lib/ferrynet/agent")]
    state_dir: PathBuf,
    /// native, vxlan, or auto (native on the same L2 segment, VXLAN elsewhere).
    #[arg(long, env = "FERRYNET_ROUTING_MODE", value_enum, default_value = "auto")]
    routing_mode: RoutingMode,
    /// The underlay interface (default: the one holding the node's InternalIP).
    #[arg(long, env = "FERRYNET_UPLINK")]
    uplink: Option<String>,
    #[arg(long, env = "FERRYNET_VXLAN_VNI", default_value = "4242")]
    vxlan_vni: u32,
    #[arg(long, env = "FERRYNET_VXLAN_PORT", default_value = "4789")]
    vxlan_port: u16,
    /// The node's `/proc/sys/net`, writable (in a container, `/proc/sys` is read-only: the
    /// DaemonSet mounts the host's here). Used to turn IP forwarding on when it is off.
    #[arg(long, env = "FERRYNET_PROC_SYS_NET", default_value = "/proc/sys/net")]
    proc_sys_net: PathBuf,
    /// The bpffs directory the eBPF datapath pins its maps in (created, root only). Each agent
    /// on a machine needs its own.
    #[arg(long, env = "FERRYNET_BPF_PIN_PATH", default_value = "/sys/fs/bpf/ferrynet")]
    bpf_pin_path: PathBuf,
    /// The cgroup v2 directory the datapath's socket programs attach to: the root of the
    /// node's cgroup v2 hierarchy, so that every process on the node is covered.
    #[arg(long, env = "FERRYNET_CGROUP_PATH", default_value = "/sys/fs/cgroup")]
    cgroup_path: PathBuf,
    /// Masquerade pod traffic leaving the cluster's pod CIDRs to the node's address.
    #[arg(long, env = "FERRYNET_MASQUERADE", default_value = "true", action = ArgAction::Set)]
    masquerade: bool,
    /// The cluster's pod CIDRs (default, or empty: the union of all nodes' PodCIDRs).
    #[arg(long = "cluster-cidr", env = "FERRYNET_CLUSTER_CIDRS", value_delimiter = ',', value_parser = optional_cidr)]
    cluster_cidrs: Vec<Option<IpNet>>,
    #[arg(long, env = "FERRYNET_RESYNC_SECONDS", default_value = "30")]
    resync_seconds: u64,
    /// How often the agent releases addresses of pods that vanished without a CNI DEL.
    #[arg(long, env = "FERRYNET_IPAM_GC_SECONDS", default_value = "60")]
    ipam_gc_seconds: u64,
    /// How old an allocation must be before that GC may release it (an ADD in progress has an
    /// allocation but no veth yet).
    #[arg(long, env = "FERRYNET_IPAM_GC_GRACE_SECONDS", default_value = "60")]
    ipam_gc_grace_seconds: u64,
    /// Translate Services (the kube-proxy replacement). Off: no service datapath, and one an
    /// earlier run left is removed.
    #[arg(long, env = "FERRYNET_SERVICE_PROXY", default_value = "true", action = ArgAction::Set)]
    service_proxy: bool,
    /// Translate at the socket (connect, sendmsg) in the cgroup at --cgroup-path.
    #[arg(long, env = "FERRYNET_SOCKET_LB", default_value = "true", action = ArgAction::Set)]
    socket_lb: bool,
    /// Socket LB only in the node's own network namespace: pods keep seeing Service addresses
    /// (as service meshes need), and the per-packet path translates their traffic.
    #[arg(long, env = "FERRYNET_SOCKET_LB_HOST_NETNS_ONLY", default_value = "false", action = ArgAction::Set)]
    socket_lb_host_netns_only: bool,
    /// Translate per packet on pod veths, for whatever socket LB did not: with socket LB off or
    /// restricted to the node's namespace (with socket LB everywhere, nothing is left for it).
    #[arg(long, env = "FERRYNET_PER_PACKET_LB", default_value = "true", action = ArgAction::Set)]
    per_packet_lb: bool,
    /// Per-packet flows to pods on other nodes that are routed natively go past the node's
    /// stack both ways (its routing and netfilter), straight between the pod's veth and the
    /// uplink, when the stack would have done the same (see README: "Past the node's stack").
    #[arg(long, env = "FERRYNET_PER_PACKET_STACK_BYPASS", default_value = "true", action = ArgAction::Set)]
    per_packet_stack_bypass: bool,
    /// Services labelled service.kubernetes.io/service-proxy-name with another value are left
    /// to that proxy.
    #[arg(long, env = "FERRYNET_SERVICE_PROXY_NAME", default_value = "ferrynet")]
    service_proxy_name: String,
    /// The cluster's Service CIDRs: an address there that no Service holds is refused. Empty:
    /// read from the API's ServiceCIDR objects (networking.k8s.io/v1, Kubernetes 1.33 and
    /// later) and followed as they change; `none`: no refusal for being in them.
    #[arg(long = "service-cidrs", env = "FERRYNET_SERVICE_CIDRS", value_delimiter = ',')]
    service_cidrs: Vec<String>,
    /// The node addresses NodePorts answer on, as CIDRs (kube-proxy's flag). Empty: every
    /// address of the node but loopback and link-local ones.
    #[arg(long = "nodeport-addresses", env = "FERRYNET_NODEPORT_ADDRESSES", value_delimiter = ',', value_parser = optional_cidr)]
    nodeport_addresses: Vec<Option<IpNet>>,
    /// The interfaces external traffic (NodePorts) is translated on. Empty: those that hold the
    /// node's InternalIPs.
    #[arg(
        long = "nodeport-interfaces",
        env = "FERRYNET_NODEPORT_INTERFACES",
        value_delimiter = ','
    )]
    nodeport_interfaces: Vec<String>,
    /// How external traffic (NodePorts, load balancer IPs, externalIPs) picks a backend for a
    /// new flow: `random`, or `maglev` (consistent hashing: every node picks the same backend
    /// for a flow, and a backend change moves few flows). A Service's `ferrynet.io/lb-algorithm`
    /// annotation overrides it.
    #[arg(long, env = "FERRYNET_LOAD_BALANCING", default_value = "random", value_parser = ["random", "maglev"])]
    load_balancing: String,
    /// The size of each Maglev table: a prime from 251 to 131071. At least 100 times the
    /// backends of the largest Service keeps every backend's share within a percent.
    #[arg(long, env = "FERRYNET_MAGLEV_TABLE_SIZE", default_value_t = ferrynet_common::DEFAULT_MAGLEV_TABLE_SIZE, value_parser = maglev_table_size)]
    maglev_table_size: u32,
    /// How many frontends may balance by Maglev at once (each table takes 4 KiB per 1000
    /// entries, allocated when it is written).
    #[arg(long, env = "FERRYNET_MAX_MAGLEV_SERVICES", default_value_t = ferrynet_common::DEFAULT_MAX_MAGLEV_SERVICES)]
    max_maglev_services: u32,
    /// How often the metrics' map fill gauges (ferrynet_map_entries, ferrynet_map_full) are
    /// counted: counting the conntrack and socket maps walks them, and the walk removes the
    /// conntrack entries of flows that ended (or idled out), which the programs leave behind.
    #[arg(long, env = "FERRYNET_MAP_FILL_SECONDS", default_value = "60")]
    map_fill_seconds: u64,
    /// Capacities of the datapath's maps (used when they are created).
    #[arg(long, env = "FERRYNET_MAX_SERVICES", default_value_t = ferrynet_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    #[arg(long, env = "FERRYNET_MAX_BACKENDS", default_value_t = ferrynet_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    #[arg(long, env = "FERRYNET_MAX_SERVICE_SLOTS", default_value_t = ferrynet_common::DEFAULT_MAX_SLOTS)]
    max_service_slots: u32,
    #[arg(long, env = "FERRYNET_MAX_CONNTRACK", default_value_t = ferrynet_common::DEFAULT_MAX_CONNTRACK)]
    max_conntrack: u32,
    #[arg(long, env = "FERRYNET_MAX_AFFINITY", default_value_t = ferrynet_common::DEFAULT_MAX_AFFINITY)]
    max_affinity: u32,
    #[arg(long, env = "FERRYNET_MAX_SOCKETS", default_value_t = ferrynet_common::DEFAULT_MAX_SOCKETS)]
    max_sockets: u32,
    /// /healthz's port, on the node's InternalIP (0: off).
    #[arg(long, env = "FERRYNET_HEALTHZ_PORT", default_value = "10256")]
    healthz_port: u16,
    /// Where /metrics listens (empty: off).
    #[arg(long, env = "FERRYNET_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    /// Stands for the datapath programs' version (tests use it to play an upgrade).
    #[arg(long, env = "FERRYNET_DATAPATH_REVISION", default_value = "0", hide = true)]
    datapath_revision: u32,
    /// Log filter (tracing's env-filter syntax).
    #[arg(long, env = "FERRYNET_LOG", default_value = "info")]
    log: String,
}

/// A socket address, or nothing for an empty value.
fn optional_socket(s: &str) -> Result<Option<std::net::SocketAddr>> {
    match s.trim() {
        "" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .with_context(|| format!("--metrics-bind-address {addr:?}")),
    }
}

/// `--maglev-table-size`: a prime within the datapath's bounds.
fn maglev_table_size(s: &str) -> Result<u32, String> {
    let size: u32 = s.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    if maglev::valid_table_size(size) {
        Ok(size)
    } else {
        Err(format!(
            "{size} is not a prime from {} to {}",
            ferrynet_common::MIN_MAGLEV_TABLE_SIZE,
            ferrynet_common::MAX_MAGLEV_TABLE_SIZE
        ))
    }
}

/// A CIDR, or nothing for an empty value (an empty setting means "not set").
fn optional_cidr(s: &str) -> Result<Option<IpNet>, String> {
    match s.trim() {
        "" => Ok(None),
        cidr => cidr.parse().map(Some).map_err(|e| format!("{cidr:?}: {e}")),
    }
}

impl Options {
    /// The configuration of a command that acts for this node (needs its name).
    fn config(&self) -> Result<AgentConfig> {
        let node_name = self
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .context("--node-name (or NODE_NAME) is required")?;
        self.config_for(node_name)
    }

    fn config_for(&self, node_name: String) -> Result<AgentConfig> {
        let source_dir = match &self.cni_source_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("executable has no directory")?
                .to_path_buf(),
        };
        let resync = Duration::from_secs(self.resync_seconds.max(1));
        Ok(AgentConfig {
            kubeconfig: self.kubeconfig.clone(),
            state_dir: self.state_dir.clone(),
            node: NodeNetworkingConfig {
                node_name: node_name.clone(),
                mode: self.routing_mode,
                uplink: self.uplink.clone(),
                vxlan: VxlanSettings {
                    vni: self.vxlan_vni,
                    port: self.vxlan_port,
                },
                masquerade: self.masquerade,
                cluster_cidrs: self.cluster_cidrs.iter().flatten().copied().collect(),
                proc_sys_net: self.proc_sys_net.clone(),
                resync,
            },
            cni: CniConfigConfig {
                node_name: node_name.clone(),
                paths: CniPaths {
                    bin_dir: self.cni_bin_dir.clone(),
                    conf_dir: self.cni_conf_dir.clone(),
                    source_dir,
                },
                network: self.network.clone(),
                ipam_data_dir: self.ipam_data_dir.clone(),
                mode: self.routing_mode,
                uplink: self.uplink.clone(),
                resync,
                datapath_pins: (self.service_proxy && self.per_packet_lb).then(|| self.bpf_pin_path.clone()),
            },
            ipam_gc: IpamGcConfig {
                data_dir: self.ipam_data_dir.clone(),
                network: self.network.clone(),
                interval: Duration::from_secs(self.ipam_gc_seconds.max(1)),
                grace: Duration::from_secs(self.ipam_gc_grace_seconds),
            },
            services: ServicesConfig {
                enabled: self.service_proxy,
                node_name: node_name.clone(),
                bpf_pin_path: self.bpf_pin_path.clone(),
                cgroup_path: self.cgroup_path.clone(),
                modes: TranslationModes {
                    socket_lb: self.socket_lb,
                    host_netns_only: self.socket_lb_host_netns_only,
                    per_packet: self.per_packet_lb,
                    stack_bypass: self.per_packet_stack_bypass,
                },
                proxy_name: self.service_proxy_name.clone(),
                service_cidrs: ServiceCidrSource::from_flag(&self.service_cidrs).map_err(anyhow::Error::msg)?,
                sizes: MapSizes {
                    services: self.max_services,
                    backends: self.max_backends,
                    slots: self.max_service_slots,
                    conntrack: self.max_conntrack,
                    affinity: self.max_affinity,
                    sockets: self.max_sockets,
                    maglev_services: self.max_maglev_services,
                    maglev_table_size: self.maglev_table_size,
                },
                healthz_port: self.healthz_port,
                metrics_addr: optional_socket(&self.metrics_bind_address)?,
                state_dir: self.state_dir.clone(),
                ipam_data_dir: self.ipam_data_dir.clone(),
                network: self.network.clone(),
                resync,
                datapath_revision: self.datapath_revision,
                nodeport_addresses: self.nodeport_addresses.iter().flatten().copied().collect(),
                nodeport_interfaces: self
                    .nodeport_interfaces
                    .iter()
                    .filter(|i| !i.is_empty())
                    .cloned()
                    .collect(),
                load_balancing: LoadBalancing {
                    maglev_by_default: self.load_balancing == "maglev",
                    maglev_table_size: self.maglev_table_size,
                },
                map_fill_period: Duration::from_secs(self.map_fill_seconds.max(1)),
            },
            node_name,
        })
    }
}

/// One malloc arena for the whole process. glibc gives each thread that allocates an arena of its
/// own (up to 8 per CPU), and memory freed in one arena is not reused by the others: the
/// agent's few threads would otherwise each keep the high-water mark of the lists they parsed.
/// Its allocations are not hot enough for one arena's lock to matter.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    one_malloc_arena();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.options.log).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrynet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => runtime.block_on(agent::run(cli.options.config()?))?,
        Command::InstallCni { wait_seconds } => runtime.block_on(agent::install_cni(
            &cli.options.config()?,
            Duration::from_secs(wait_seconds),
        ))?,
        // Uninstall and cleanup act on what is installed here, whoever the node is.
        Command::Uninstall => agent::uninstall(&cli.options.config_for(String::new())?)?,
        Command::Cleanup => agent::cleanup(&cli.options.config_for(String::new())?)?,
        Command::Services => {
            let listed = cli::list(&cli.options.bpf_pin_path, &cli.options.state_dir)?;
            print!("{}", cli::render_list(&listed));
        }
        Command::Explain { target, from } => {
            print!(
                "{}",
                cli::explain(&cli.options.bpf_pin_path, &cli.options.state_dir, &target, from)?
            );
        }
        Command::Status { json, ready } => {
            let st = status::read(&cli.options.state_dir);
            if ready {
                let ready = st.as_ref().is_ok_and(status::AgentStatus::ready);
                return Ok(if ready { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            let st = st?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", status::render(&st));
            }
            if !st.ready() {
                return Ok(ExitCode::from(2));
            }
        }
    }
    // Stop now: a pass still running on a blocking thread finishes in the kernel's time, not ours.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}
