//! The services benchmark: a new TCP connection per request to the last Service created, at
//! several numbers of Services, through ferrynet's socket LB, its per-packet path, and
//! kube-proxy's iptables (legacy and nft backends) and nftables modes reproduced as kube-proxy
//! writes them; against the same client going straight to a backend pod's IP. Then the
//! control plane at the largest number: programming everything from scratch, single endpoint
//! changes from the API write to the map write, and the agent's memory. And NodePorts from the
//! external client, through each mode's node: to the last Service's NodePort (its endpoints on
//! another node) and to a Service whose one endpoint runs on the entry node itself, against the
//! client going straight to the same pods' IPs.
//!
//! Everything runs in one lab: a node per mode, each with a client pod, and a node with three
//! backend pods running this tool's request server. Services are selectorless, with EndpointSlices this tool writes
//! (three ready endpoints each), so the API holds exactly what a cluster's would. The client is
//! a process inside the client pod's namespace and cgroup, as a pod's process is. Every Service is
//! of type NodePort while the NodePort range lasts (see [`has_node_port`]).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use ferrynet_common::{PROTO_TCP, SCOPE_INTERNAL, SERVICES4_MAP, ServiceKey4, ServiceValue, addr4, port};
use ferrynet_tests::{
    bench::{Summary, ms},
    binary,
    lab::{Lab, LabGuard, agent_unconverged},
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use kube::{
    Api,
    api::{ListParams, ObjectMeta, PostParams},
};

use super::{
    chart::{Chart, Series},
    kube_proxy::{self, ClusterIpService, IPTABLES_EMPTY, NFT_TABLE},
};

/// The node the backends run on; each mode has a node of its own (see [`Mode::node`]).
const BACKEND_NODE: &str = "n7";
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
/// The node whose agent the control plane is measured on (the socket LB node).
const CONTROL_PLANE_NODE: &str = "n2";
/// The port the backends' request servers listen on (the Services' target port).
const BACKEND_PORT: u16 = 9000;
/// A second request server in each entry node's backend pod, for the direct anchor of the local
/// NodePort measurement. ferrynet keeps the client's address on a NodePort connection to a local
/// backend, so a direct connection from the same client to the same pod and port, on a source
/// port an earlier NodePort connection used, has the same addresses and ports as that
/// connection's translated flow; in this lab such a connection timed out (one in several
/// thousand). Another port keeps the anchor apart from the flows it anchors.
const ANCHOR_PORT: u16 = 9001;
const SERVICE_PORT: u16 = 80;
/// The lab's pod CIDRs (kube-proxy's `--cluster-cidr`).
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Request and response size.
const MESSAGE: usize = 64;
const LABEL: &str = "ferrynet-bench";
const NAMESPACE: &str = "default";
/// The NodePorts the API hands out: Kubernetes' default `--service-node-port-range`
/// (30000-32767), which the lab's API stand-in uses too.
const NODE_PORTS: usize = 32767 - 30000 + 1;
/// Where the external client runs (the lab's part name).
const EXTERNAL_CLIENT: &str = "client";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No service proxy at all: the physical limit, and the clean node.
    Direct,
    SocketLb,
    PerPacket,
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Mode {
    const ALL: [Mode; 6] = [
        Mode::Direct,
        Mode::SocketLb,
        Mode::PerPacket,
        Mode::IptablesLegacy,
        Mode::IptablesNft,
        Mode::Nftables,
    ];

    /// The lab node this mode runs on: every mode is set up once, on a node of its own, so the
    /// measurements can alternate between modes every few hundred connections.
    fn node(self) -> String {
        let index = Mode::ALL.iter().position(|m| *m == self).expect("every mode is listed") + 1;
        format!("n{index}")
    }

    /// Its client pod.
    fn client(self) -> String {
        format!("client-{}", self.node())
    }

    /// The backend pod on its node, for NodePorts with a local endpoint; also the name of the
    /// Service whose one endpoint it is.
    fn local_backend(self) -> String {
        format!("local-{}", self.node())
    }

    /// The mode named `name` (`socket-lb`, `per-packet`, `iptables-legacy`, `iptables-nft`,
    /// `nftables`).
    pub fn named(name: &str) -> Result<Mode> {
        Ok(match name {
            "socket-lb" => Mode::SocketLb,
            "per-packet" => Mode::PerPacket,
            "iptables-legacy" => Mode::IptablesLegacy,
            "iptables-nft" => Mode::IptablesNft,
            "nftables" => Mode::Nftables,
            _ => bail!("unknown mode {name:?}: socket-lb, per-packet, iptables-legacy, iptables-nft or nftables"),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct to the pod IP",
            Mode::SocketLb => "ferrynet, socket LB",
            Mode::PerPacket => "ferrynet, per-packet only",
            Mode::IptablesLegacy => "kube-proxy iptables (legacy)",
            Mode::IptablesNft => "kube-proxy iptables (nft backend)",
            Mode::Nftables => "kube-proxy nftables",
        }
    }

    /// One of ferrynet's own modes.
    fn is_ferrynet(self) -> bool {
        matches!(self, Mode::SocketLb | Mode::PerPacket)
    }

    fn color(self) -> &'static str {
        match self {
            Mode::Direct => "#000000",
            Mode::SocketLb => "#1f77b4",
            Mode::PerPacket => "#2ca02c",
            Mode::IptablesLegacy => "#d62728",
            Mode::IptablesNft => "#ff7f0e",
            Mode::Nftables => "#9467bd",
        }
    }

    /// The agent flags for this mode: ferrynet translates only in its own modes.
    fn agent_flags(self) -> &'static [&'static str] {
        match self {
            // The lab's Service CIDRs, as the DaemonSet's ConfigMap sets the cluster's.
            Mode::SocketLb => &["--service-cidrs", "10.96.0.0/16,fd00:96::/108"],
            Mode::PerPacket => &["--socket-lb", "false", "--service-cidrs", "10.96.0.0/16,fd00:96::/108"],
            _ => &["--service-proxy", "false"],
        }
    }
}

pub struct Options {
    pub scales: Vec<usize>,
    /// Only these modes (and the direct anchor); all when `None`.
    pub modes: Option<Vec<Mode>>,
    pub connections: usize,
    pub rounds: usize,
    pub changes: usize,
    /// Every client on the first CPU, every server on the last.
    pub pin_cpus: bool,
    pub chart: Option<PathBuf>,
    /// The NodePort section's chart.
    pub nodeport_chart: Option<PathBuf>,
}

/// Connections made in one mode: their latencies and the time they took together.
#[derive(Default, Clone)]
struct Sample {
    latencies: Vec<Duration>,
    seconds: f64,
    /// Each round's connections per second, in round order: to compare with another sample
    /// round by round (see `paired_ratio`).
    round_rates: Vec<f64>,
}

impl Sample {
    /// One round's connections.
    fn round(latencies: Vec<Duration>, seconds: f64) -> Sample {
        let round_rates = vec![latencies.len() as f64 / seconds];
        Sample {
            latencies,
            seconds,
            round_rates,
        }
    }

    fn add(&mut self, other: Sample) {
        self.latencies.extend(other.latencies);
        self.seconds += other.seconds;
        self.round_rates.extend(other.round_rates);
    }

    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }
}

/// What one mode measured at one scale.
#[derive(Default, Clone)]
struct ModeResult {
    /// To the last Service's ClusterIP (none for the direct mode).
    service: Sample,
    /// Straight to a backend's pod IP, with this mode's Services programmed.
    pod_ip: Sample,
    /// How long it took to program all Services in this mode, from nothing, each time.
    programming: Vec<Duration>,
}

/// What one mode measured from the external client at one scale, entering through its node.
#[derive(Default, Clone)]
struct NodePortResult {
    /// To the last Service's NodePort: its endpoints are on the backend node.
    remote: Sample,
    /// To the NodePort of the Service whose one endpoint runs on this mode's node.
    local: Sample,
    /// Straight to that local endpoint's pod IP: the local measurement's anchor.
    direct_local: Sample,
}

/// The NodePort measurements at one scale.
#[derive(Default, Clone)]
struct NodePortScale {
    /// Services of type NodePort in the API.
    node_ports: usize,
    /// Straight to the backend node's pod IPs: the remote measurements' anchor.
    direct_remote: Sample,
    modes: Vec<(Mode, NodePortResult)>,
}

impl NodePortScale {
    fn of(&mut self, mode: Mode) -> &mut NodePortResult {
        &mut self.modes.iter_mut().find(|(m, _)| *m == mode).expect("every mode").1
    }
}

/// One thing the external client connects to, in the NodePort rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodePortTarget {
    DirectRemote,
    Remote(Mode),
    Local(Mode),
    DirectLocal(Mode),
}

struct ControlPlane {
    services: usize,
    /// The NodePort benchmark's single-endpoint Services, programmed alongside.
    local_services: usize,
    node_ports: usize,
    endpoints: usize,
    /// Agent start to every Service in the maps.
    from_start: Duration,
    /// The agent's own sync time for that (kube-proxy's sync metric): total and count.
    sync_seconds: f64,
    syncs: u64,
    /// Single endpoint changes: API write to map write.
    changes: Vec<Duration>,
    rss_kib: u64,
    hwm_kib: u64,
}

// ---------------------------------------------------------------------------------------------
// The request server and client, run inside pods.

/// Keeps this process on CPU `cpu`, when given.
pub fn pin_to_cpu(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

/// Whether this run pins its clients and servers (`--pin-cpus`): set once, at the start of
/// [`run`], and read wherever a client or server is started.
static PIN_CPUS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where the clients and the servers run under `--pin-cpus`: every client on the first CPU,
/// every server on the last, so that each measurement has its two ends on two CPUs, whatever the
/// scheduler would have done. None without it, or on a machine of one CPU.
fn client_and_server_cpus() -> Option<(usize, usize)> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    (PIN_CPUS.load(std::sync::atomic::Ordering::Relaxed) && cpus >= 2).then(|| (0, cpus - 1))
}

/// `crr-server`: answers each connection's one 64-byte request with 64 bytes, then waits for
/// the client to end the connection.
pub fn crr_server(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding port {port}"))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; MESSAGE];
        if stream.read_exact(&mut buf).is_ok() && stream.write_all(&buf).is_ok() {
            // The client's reset (or close) ends it.
            let _ = stream.read(&mut buf);
        }
    }
    Ok(())
}

/// `crr-client`: `connections` sequential connections to `to` (after `warmup` untimed ones),
/// each connect, request, response and close; prints the latencies (µs) and the total time as
/// JSON. Any failure fails the run: a benchmark does not average over errors.
///
/// The client ends each connection with a reset (SO_LINGER 0), so that no side keeps it in
/// TIME_WAIT: tens of thousands of connections a minute from one address to one port would
/// otherwise reuse source ports that the other side still holds in TIME_WAIT, and a SYN that
/// meets one can stall for a second, whichever proxy is under test.
pub fn crr_client(targets: &[SocketAddr], connections: usize, warmup: usize) -> Result<()> {
    if targets.is_empty() {
        bail!("no target");
    }
    // Each connection goes to one of the targets at random, as a Service's does to one of its
    // backends (xorshift: the client's own choice must cost nothing).
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut next_target = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        targets[(state % targets.len() as u64) as usize]
    };
    let mut one = || -> Result<()> {
        let to = next_target();
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [7u8; MESSAGE];
        stream.write_all(&buf)?;
        stream.read_exact(&mut buf)?;
        ferrynet_tests::probe::reset_on_close(&stream)?;
        Ok(())
    };
    let to = targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    for i in 0..warmup {
        one().with_context(|| format!("warm-up connection {i} to {to}"))?;
    }
    let mut latencies = Vec::with_capacity(connections);
    let start = Instant::now();
    for i in 0..connections {
        let t = Instant::now();
        one().with_context(|| format!("connection {i} to {to}"))?;
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({"seconds": seconds, "latencies_us": latencies}));
    Ok(())
}

/// Runs the client in `part` (a client pod, `pod-<name>`, in its namespace and cgroup; or the
/// external client), connecting to `to` (one of them at random each time).
fn connections(lab: &Lab, part: &str, to: &[SocketAddr], n: usize) -> Result<Sample> {
    let to = to.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut argv: Vec<String> = [
        binary("ferrynet-bench").display().to_string(),
        "crr-client".into(),
        "--to".into(),
        to.clone(),
        "--connections".into(),
        n.to_string(),
        "--warmup".into(),
        (n / 20).max(5).to_string(),
    ]
    .into();
    if let Some((client, _)) = client_and_server_cpus() {
        argv.extend(["--cpu".into(), client.to_string()]);
    }
    let out = lab.exec_output(part, &argv)?;
    if !out.status.success() {
        bail!(
            "client in {part} to {to}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("client report")?;
    let latencies = report["latencies_us"]
        .as_array()
        .context("client report: latencies")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .map(|us| Duration::from_secs_f64(us / 1e6))
        .collect();
    Ok(Sample::round(
        latencies,
        report["seconds"].as_f64().context("client report: seconds")?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Services in the API.

fn service_name(i: usize) -> String {
    format!("bench-{i}")
}

/// Whether the benchmark's Service `i` is of type NodePort. Every one is while the NodePort range
/// lasts: it holds 2,768 ports, fewer than the largest scales' Services, as in a real cluster
/// with the default range. The last Service of each scale (the one measured) always is: a port
/// is kept back for each, and for the NodePort benchmark's `local_services`.
fn has_node_port(i: usize, scales: &[usize], local_services: usize) -> bool {
    let for_the_rest = NODE_PORTS.saturating_sub(local_services + scales.len());
    i < for_the_rest || scales.contains(&(i + 1))
}

/// A Service the benchmark writes to the API, selectorless, with one EndpointSlice.
struct NewService {
    name: String,
    node_port: bool,
    endpoints: Vec<Ipv4Addr>,
    /// The node the endpoints run on.
    node: String,
}

fn service_object(new: &NewService) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(new.name.clone()),
            namespace: Some(NAMESPACE.into()),
            labels: Some([(LABEL.to_string(), "services".to_string())].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(if new.node_port { "NodePort" } else { "ClusterIP" }.into()),
            external_traffic_policy: new.node_port.then(|| "Cluster".into()),
            ip_families: Some(vec!["IPv4".into()]),
            ip_family_policy: Some("SingleStack".into()),
            ports: Some(vec![ServicePort {
                port: i32::from(SERVICE_PORT),
                target_port: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                    i32::from(BACKEND_PORT),
                )),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice_object(new: &NewService) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-1", new.name)),
            namespace: Some(NAMESPACE.into()),
            labels: Some(
                [
                    ("kubernetes.io/service-name".to_string(), new.name.clone()),
                    ("endpointslice.kubernetes.io/managed-by".to_string(), LABEL.to_string()),
                    (LABEL.to_string(), "services".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: new
            .endpoints
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(new.node.clone()),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            port: Some(i32::from(BACKEND_PORT)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

/// Creates the Services, each with its EndpointSlice, 16 requests at a time.
fn create_services(lab: &Lab, new: Vec<NewService>) -> Result<()> {
    lab.api()?.call(move |client| async move {
        let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
        let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
        futures::stream::iter(new)
            .map(|new| {
                let (services, slices) = (services.clone(), slices.clone());
                async move {
                    services
                        .create(&PostParams::default(), &service_object(&new))
                        .await
                        .with_context(|| format!("creating service {}", new.name))?;
                    slices
                        .create(&PostParams::default(), &slice_object(&new))
                        .await
                        .with_context(|| format!("creating the slice of {}", new.name))?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    })
}

/// The benchmark's Services as kube-proxy would program them: the numbered ones in creation
/// order, except that the NodePort benchmark's single-endpoint ones (`local_endpoints`, by name)
/// come right before the last, so that every measured Service's rules are at the end of
/// kube-proxy's iptables chains (their worst case) and the last Service's are last.
fn cluster_ip_services(
    lab: &Lab,
    backends: &[Ipv4Addr],
    local_endpoints: &BTreeMap<String, Ipv4Addr>,
) -> Result<Vec<ClusterIpService>> {
    let services: Vec<Service> = lab.api()?.call(|client| async move {
        Ok(Api::<Service>::namespaced(client, NAMESPACE)
            .list(&ListParams::default().labels(&format!("{LABEL}=services")))
            .await?
            .items)
    })?;
    let mut numbered: Vec<(usize, ClusterIpService)> = Vec::new();
    let mut local: Vec<ClusterIpService> = Vec::new();
    for svc in services {
        let (Some(name), Some(spec)) = (svc.metadata.name, svc.spec) else {
            continue;
        };
        let Some(vip) = spec.cluster_ip.and_then(|ip| ip.parse().ok()) else {
            continue;
        };
        let node_port = spec
            .ports
            .iter()
            .flatten()
            .find_map(|p| p.node_port)
            .and_then(|p| u16::try_from(p).ok());
        let service = |endpoints: Vec<(Ipv4Addr, u16)>| ClusterIpService {
            namespace: NAMESPACE.into(),
            name: name.clone(),
            vip,
            port: SERVICE_PORT,
            node_port,
            endpoints,
        };
        if let Some(index) = name.strip_prefix("bench-").and_then(|i| i.parse().ok()) {
            numbered.push((index, service(backends.iter().map(|ip| (*ip, BACKEND_PORT)).collect())));
        } else if let Some(ip) = local_endpoints.get(&name) {
            local.push(service(vec![(*ip, BACKEND_PORT)]));
        }
    }
    numbered.sort_by_key(|(i, _)| *i);
    local.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out: Vec<ClusterIpService> = numbered.into_iter().map(|(_, s)| s).collect();
    let last = out.pop().context("no numbered Service")?;
    out.extend(local);
    out.push(last);
    Ok(out)
}

/// The service ports ferrynet's agent has in its maps for `services` (its status' `frontends`):
/// a ClusterIP each, and for a NodePort its external entry and the one the node and its pods
/// reach it by.
fn ferrynet_frontends(services: &[ClusterIpService]) -> usize {
    services
        .iter()
        .map(|s| 1 + 2 * usize::from(s.node_port.is_some()))
        .sum()
}

/// Waits until `to` answers a request from `part` (see [`connections`]): ferrynet's agents program
/// their maps on their own time, and a benchmark does not average over failures.
fn wait_answering(lab: &Lab, part: &str, to: SocketAddr) -> Result<()> {
    let mut last = String::new();
    ferrynet_tests::wait_for(Duration::from_secs(60), || match connections(lab, part, &[to], 1) {
        Ok(_) => Some(()),
        Err(e) => {
            last = format!("{e:#}");
            None
        }
    })
    .ok_or_else(|| anyhow!("{to} does not answer from {part}: {last}"))
}

fn node_v4(lab: &Lab, node: &str) -> Result<Ipv4Addr> {
    Ok(lab
        .state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .ok_or_else(|| anyhow!("no node {node}"))?
        .v4())
}

fn pod_v4(lab: &Lab, pod: &str) -> Result<Ipv4Addr> {
    match lab.pod(pod)?.ip(true) {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => Err(anyhow!("pod {pod} has no IPv4 address")),
    }
}

// ---------------------------------------------------------------------------------------------
// Switching modes.

/// Restarts the node's agent with `flags`, and waits until it runs them and, when it translates,
/// has `frontends` service ports in its maps. Returns the time from its start to that.
fn restart_agent(lab: &Lab, node: &str, flags: &[&str], frontends: usize) -> Result<Duration> {
    lab.stop_agent(node)?;
    let translating = !flags.contains(&"--service-proxy");
    let pins = lab
        .node_pin_path(node)
        .join(format!("v{}", ferrynet_common::SCHEMA_VERSION));
    let start = Instant::now();
    lab.start_agent_with(node, flags)?;
    let mut last = String::from("no status yet");
    let done = ferrynet_tests::wait_for(Duration::from_secs(180), || {
        let pid = lab.agent_pid(node)?;
        let status = lab.agent_status(node).ok()?;
        let services = &status["services"]["details"];
        last = format!("{services}");
        let ready = status["pid"] == pid
            && services["enabled"] == translating
            && agent_unconverged(&status, lab.state.nodes.len().saturating_sub(1)).is_none()
            && if translating {
                services["frontends"].as_u64().unwrap_or(0) >= frontends as u64
            } else {
                // The datapath an earlier run left is gone.
                !pins.exists()
            };
        ready.then(|| start.elapsed())
    });
    done.ok_or_else(|| anyhow!("the agent on {node} with {flags:?} did not program {frontends} service ports: {last}"))
}

/// Runs `program file` in the node's namespace (a rule loader), failing with what it printed.
fn load_in_node(lab: &Lab, node: &str, program: &str, args: &[&str], rules: &str) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rules");
    std::fs::write(&file, rules)?;
    let mut cmd = Command::new(program);
    cmd.args(args).arg(&file);
    let start = Instant::now();
    let out = lab.node_ns(node)?.command_output(&mut cmd);
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{program} {args:?} in node {node}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

fn nft_tables(lab: &Lab, node: &str) -> Result<String> {
    let out = lab
        .node_ns(node)?
        .command_output(Command::new("nft").args(["list", "tables"]));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Programs `services` on `mode`'s node: loads kube-proxy's rules into emptied tables (the
/// loader's run, timed), or waits until ferrynet's agent has them all in its maps. Returns the
/// loader's time for kube-proxy's modes.
fn program(lab: &Lab, mode: Mode, services: &[ClusterIpService]) -> Result<Option<Duration>> {
    let node = mode.node();
    let node = node.as_str();
    Ok(match mode {
        Mode::Direct => None,
        Mode::SocketLb | Mode::PerPacket => {
            let mut last = String::new();
            ferrynet_tests::wait_for(Duration::from_secs(120), || {
                let status = lab.agent_status(node).ok()?;
                let frontends = status["services"]["details"]["frontends"].as_u64().unwrap_or(0);
                last = format!("{frontends}");
                (frontends >= ferrynet_frontends(services) as u64).then_some(())
            })
            .ok_or_else(|| {
                anyhow!(
                    "{node}'s agent has {last} of {} service ports",
                    ferrynet_frontends(services)
                )
            })?;
            None
        }
        Mode::IptablesLegacy | Mode::IptablesNft | Mode::Nftables => {
            clear(lab, mode)?;
            let (program, args, rules) = match mode {
                Mode::IptablesLegacy => (
                    "iptables-legacy-restore",
                    &[][..],
                    kube_proxy::iptables_rules(services, CLUSTER_CIDR),
                ),
                Mode::IptablesNft => (
                    "iptables-nft-restore",
                    &[][..],
                    kube_proxy::iptables_rules(services, CLUSTER_CIDR),
                ),
                _ => (
                    "nft",
                    &["-f"][..],
                    kube_proxy::nftables_rules(services, CLUSTER_CIDR, &[node_v4(lab, node)?]),
                ),
            };
            Some(load_in_node(lab, node, program, args, &rules)?)
        }
    })
}

/// Empties what [`program`] loaded for a kube-proxy mode.
fn clear(lab: &Lab, mode: Mode) -> Result<()> {
    let node = mode.node();
    let node = node.as_str();
    match mode {
        Mode::IptablesLegacy => {
            load_in_node(lab, node, "iptables-legacy-restore", &[], IPTABLES_EMPTY)?;
        }
        Mode::IptablesNft => {
            load_in_node(lab, node, "iptables-nft-restore", &[], IPTABLES_EMPTY)?;
            // The nft backend leaves its (now empty) tables registered: remove them.
            let tables = nft_tables(lab, node)?;
            for table in ["filter", "nat"] {
                if tables.lines().any(|l| l.trim() == format!("table ip {table}")) {
                    load_in_node(lab, node, "nft", &["-f"], &format!("delete table ip {table}\n"))?;
                }
            }
        }
        Mode::Nftables => {
            if nft_tables(lab, node)?
                .lines()
                .any(|l| l.trim() == format!("table ip {NFT_TABLE}"))
            {
                load_in_node(lab, node, "nft", &["-f"], &format!("delete table ip {NFT_TABLE}\n"))?;
            }
        }
        Mode::Direct | Mode::SocketLb | Mode::PerPacket => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The control plane.

fn metrics(lab: &Lab, node: &str) -> Result<String> {
    let ns = lab.node_ns(node)?;
    ferrynet_kernel::netns::run_in(ns.fd(), || {
        let mut stream =
            TcpStream::connect_timeout(&"127.0.0.1:10249".parse().expect("address"), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
    .context("the agent's metrics")
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The number of backends the maps give a ClusterIP's TCP port (0 when it has no entry).
fn programmed_backends(map: &BpfHashMap<MapData, ServiceKey4, ServiceValue>, vip: Ipv4Addr) -> u16 {
    let key = ServiceKey4 {
        addr: addr4(vip.octets()),
        port: port(SERVICE_PORT),
        proto: PROTO_TCP,
        scope: SCOPE_INTERNAL,
    };
    map.get(&key, 0).map_or(0, |v| v.count)
}

/// Flips the ready condition of one endpoint of the first Service, `changes` times, each time
/// timing the API write to the moment the node's service map shows it.
fn single_changes(lab: &Lab, node: &str, vip: Ipv4Addr, changes: usize) -> Result<Vec<Duration>> {
    let pin = lab
        .node_pin_path(node)
        .join(format!("v{}", ferrynet_common::SCHEMA_VERSION))
        .join("maps")
        .join(SERVICES4_MAP);
    let map = Map::from_map_data(MapData::from_pin(&pin).with_context(|| format!("{}", pin.display()))?)?;
    let map: BpfHashMap<MapData, ServiceKey4, ServiceValue> = BpfHashMap::try_from(map)?;
    lab.api()?.call(move |client| async move {
        let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
        let name = format!("{}-1", service_name(0));
        let mut latencies = Vec::with_capacity(changes);
        for k in 0..changes {
            let mut slice = slices.get(&name).await?;
            let ready = k % 2 == 1;
            if let Some(conditions) = slice.endpoints[0].conditions.as_mut() {
                conditions.ready = Some(ready);
            }
            let want: u16 = if ready { 3 } else { 2 };
            let start = Instant::now();
            slices.replace(&name, &PostParams::default(), &slice).await?;
            loop {
                if programmed_backends(&map, vip) == want {
                    latencies.push(start.elapsed());
                    break;
                }
                if start.elapsed() > Duration::from_secs(5) {
                    bail!("change {k} did not reach the map within 5 s");
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            // Changes are spaced (20 to 40 ms) so that each is measured alone.
            tokio::time::sleep(Duration::from_millis(20 + (k as u64 * 7) % 20)).await;
        }
        Ok(latencies)
    })
}

fn control_plane(
    lab: &Lab,
    services: &[ClusterIpService],
    local_services: usize,
    changes: usize,
) -> Result<ControlPlane> {
    let node = CONTROL_PLANE_NODE;
    // From nothing: the datapath an earlier run left is removed first.
    restart_agent(lab, node, Mode::Direct.agent_flags(), 0)?;
    let from_start = restart_agent(lab, node, Mode::SocketLb.agent_flags(), ferrynet_frontends(services))?;
    let text = metrics(lab, node)?;
    let sync_seconds = metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(f64::NAN);
    let syncs = metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0) as u64;
    let first = services
        .iter()
        .find(|s| s.name == service_name(0))
        .context("no services")?;
    let changes = single_changes(lab, node, first.vip, changes)?;
    let pid = lab.agent_pid(node).context("no agent")?;
    let (rss_kib, hwm_kib) = rss_kib(pid)?;
    Ok(ControlPlane {
        services: services.len() - local_services,
        local_services,
        node_ports: services.iter().filter(|s| s.node_port.is_some()).count(),
        endpoints: services.iter().map(|s| s.endpoints.len()).sum(),
        from_start,
        sync_seconds,
        syncs,
        changes,
        rss_kib,
        hwm_kib,
    })
}

// ---------------------------------------------------------------------------------------------
// The run.

pub fn run(opts: &Options) -> Result<String> {
    PIN_CPUS.store(opts.pin_cpus, std::sync::atomic::Ordering::Relaxed);
    ferrynet_tests::require_root();
    if opts.scales.is_empty() || opts.scales.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--scales must be increasing numbers of Services");
    }
    if opts.changes == 0 || opts.rounds == 0 || opts.connections == 0 {
        bail!("--changes, --rounds and --connections must each be at least 1");
    }
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| *m == Mode::Direct || opts.modes.as_ref().is_none_or(|only| only.contains(m)))
        .collect();
    // A node per mode (n1 to n6) and one for the backends (n7), natively routed.
    let mut lab = LabGuard::up(Mode::ALL.len() as u8 + 1, "native");
    lab.wait_converged(Duration::from_secs(120))?;
    // No node translates until every node's own speed is measured (the baseline below); then
    // ferrynet translates only on its own modes' nodes, and elsewhere the agent runs without.
    for node in Mode::ALL
        .iter()
        .map(|m| m.node())
        .chain(std::iter::once(BACKEND_NODE.to_string()))
    {
        restart_agent(&lab, &node, Mode::Direct.agent_flags(), 0)?;
    }
    for mode in &modes {
        lab.run_pod(&mode.client(), &mode.node(), &Default::default())?;
    }
    for b in BACKENDS {
        lab.run_pod(b, BACKEND_NODE, &Default::default())?;
    }
    // The NodePort benchmark's backends on the entry nodes, one per measured mode.
    let entry_modes: Vec<Mode> = modes.iter().copied().filter(|m| *m != Mode::Direct).collect();
    for mode in &entry_modes {
        lab.run_pod(&mode.local_backend(), &mode.node(), &Default::default())?;
    }
    let backends: Vec<Ipv4Addr> = BACKENDS.iter().map(|b| pod_v4(&lab, b)).collect::<Result<_>>()?;
    let local_backends: BTreeMap<String, Ipv4Addr> = entry_modes
        .iter()
        .map(|m| Ok((m.local_backend(), pod_v4(&lab, &m.local_backend())?)))
        .collect::<Result<_>>()?;
    let servers = BACKENDS.iter().map(|b| (b.to_string(), BACKEND_PORT)).chain(
        local_backends
            .keys()
            .flat_map(|pod| [(pod.clone(), BACKEND_PORT), (pod.clone(), ANCHOR_PORT)]),
    );
    for (pod, port) in servers {
        let mut argv = vec![
            binary("ferrynet-bench").display().to_string(),
            "crr-server".into(),
            "--port".into(),
            port.to_string(),
        ];
        if let Some((_, server)) = client_and_server_cpus() {
            argv.extend(["--cpu".into(), server.to_string()]);
        }
        lab.spawn_in(&format!("pod-{pod}"), &format!("crr-{pod}-{port}"), &argv)?;
    }
    // The external client reaches pod IPs through the nodes that host them, as a network that
    // routes the pod CIDRs would: the NodePort measurements' direct anchor.
    lab.route_from_client(
        &backends.iter().map(|ip| IpAddr::V4(*ip)).collect::<Vec<_>>(),
        &[BACKEND_NODE],
    )?;
    for mode in &entry_modes {
        lab.route_from_client(&[IpAddr::V4(local_backends[&mode.local_backend()])], &[&mode.node()])?;
    }
    // Straight to the backends' pod IPs, one at random per connection: the same servers a
    // Service's connections reach.
    let pod_ips: Vec<SocketAddr> = backends
        .iter()
        .map(|ip| SocketAddr::new(IpAddr::V4(*ip), BACKEND_PORT))
        .collect();
    let client_ns = lab.pod_ns(&Mode::Direct.client())?;
    for to in &pod_ips {
        ferrynet_tests::wait_for(Duration::from_secs(10), || {
            ferrynet_kernel::netns::run_in(client_ns.fd(), || {
                TcpStream::connect_timeout(to, Duration::from_millis(200))
            })
            .ok()
        })
        .with_context(|| format!("the request server on {to} did not start"))?;
    }
    let local_pod_ip = |mode: Mode| SocketAddr::new(IpAddr::V4(local_backends[&mode.local_backend()]), ANCHOR_PORT);
    for mode in &entry_modes {
        wait_answering(&lab, EXTERNAL_CLIENT, local_pod_ip(*mode))?;
    }
    // The baseline (the first of two): each node's speed while no node has any proxy. Nodes of
    // one lab differ by a few percent on this VM whatever runs on them; each ratio to direct is
    // divided by its node's.
    let before = node_baseline(&lab, &modes, &pod_ips, opts, "before")?;
    restart_agent(&lab, &Mode::SocketLb.node(), Mode::SocketLb.agent_flags(), 0)?;
    restart_agent(&lab, &Mode::PerPacket.node(), Mode::PerPacket.agent_flags(), 0)?;
    // The single-endpoint Services, created before the numbered ones so that one of those is
    // the last.
    create_services(
        &lab,
        entry_modes
            .iter()
            .map(|m| NewService {
                name: m.local_backend(),
                node_port: true,
                endpoints: vec![local_backends[&m.local_backend()]],
                node: m.node(),
            })
            .collect(),
    )?;

    let mut results: Vec<Vec<(Mode, ModeResult)>> = Vec::new();
    let mut node_port_results: Vec<NodePortScale> = Vec::new();
    let mut created = 0;
    let mut services = Vec::new();
    for &scale in &opts.scales {
        let start = Instant::now();
        create_services(
            &lab,
            (created..scale)
                .map(|i| NewService {
                    name: service_name(i),
                    node_port: has_node_port(i, &opts.scales, entry_modes.len()),
                    endpoints: backends.clone(),
                    node: BACKEND_NODE.into(),
                })
                .collect(),
        )?;
        created = scale;
        services = cluster_ip_services(&lab, &backends, &local_backends)?;
        if services.len() != scale + entry_modes.len() {
            bail!(
                "{} of {} Services have a ClusterIP",
                services.len(),
                scale + entry_modes.len()
            );
        }
        eprintln!("{scale} Services in the API ({:.1} s)", start.elapsed().as_secs_f64());
        let mut at_scale: Vec<(Mode, ModeResult)> = modes.iter().map(|m| (*m, ModeResult::default())).collect();
        for (mode, result) in &mut at_scale {
            result.programming.extend(program(&lab, *mode, &services)?);
        }
        let last = services.last().expect("at least one");
        let vip = SocketAddr::new(IpAddr::V4(last.vip), SERVICE_PORT);
        for mode in &entry_modes {
            wait_answering(&lab, &format!("pod-{}", mode.client()), vip)?;
        }
        // Rounds of a few hundred connections per mode, each round in an order of its own, so that
        // the machine's drift (large on a shared VM) hits every mode alike ([`round_order`]).
        in_rounds(&modes, opts.rounds, |mode| {
            let result = &mut at_scale.iter_mut().find(|(m, _)| *m == mode).expect("every mode").1;
            let client = format!("pod-{}", mode.client());
            // The Service first in one round, the pod IPs first in the next: in a run that always
            // measured the Service first, the socket-LB node's Service connections ran at 1.07 of
            // its pod-IP ones at 10,000 Services, more than the Service could gain.
            let pod_ip_first = result.pod_ip.round_rates.len() % 2 == 1;
            if pod_ip_first {
                result
                    .pod_ip
                    .add(connections(&lab, &client, &pod_ips, opts.connections)?);
            }
            if mode != Mode::Direct {
                result
                    .service
                    .add(connections(&lab, &client, &[vip], opts.connections)?);
            }
            if !pod_ip_first {
                result
                    .pod_ip
                    .add(connections(&lab, &client, &pod_ips, opts.connections)?);
            }
            Ok(())
        })?;
        for (mode, result) in &at_scale {
            eprintln!(
                "{scale} Services, {}: {:.0} connections/s to the Service, {:.0} to the pod IPs",
                mode.label(),
                if *mode == Mode::Direct {
                    f64::NAN
                } else {
                    result.service.rate()
                },
                result.pod_ip.rate()
            );
        }
        results.push(at_scale);

        // NodePorts from the external client, in rounds of their own, ordered alike.
        let remote_node_port = last.node_port.context("the last Service has no NodePort")?;
        let mut targets = vec![NodePortTarget::DirectRemote];
        for &mode in &entry_modes {
            targets.extend([
                NodePortTarget::Remote(mode),
                NodePortTarget::Local(mode),
                NodePortTarget::DirectLocal(mode),
            ]);
        }
        let addresses = |target: NodePortTarget| -> Result<Vec<SocketAddr>> {
            Ok(match target {
                NodePortTarget::DirectRemote => pod_ips.clone(),
                NodePortTarget::Remote(mode) => vec![SocketAddr::new(
                    IpAddr::V4(node_v4(&lab, &mode.node())?),
                    remote_node_port,
                )],
                NodePortTarget::Local(mode) => {
                    let local = services
                        .iter()
                        .find(|s| s.name == mode.local_backend())
                        .context("no single-endpoint Service")?;
                    vec![SocketAddr::new(
                        IpAddr::V4(node_v4(&lab, &mode.node())?),
                        local
                            .node_port
                            .context("a single-endpoint Service without a NodePort")?,
                    )]
                }
                NodePortTarget::DirectLocal(mode) => vec![local_pod_ip(mode)],
            })
        };
        let targets: Vec<(NodePortTarget, Vec<SocketAddr>)> = targets
            .into_iter()
            .map(|t| Ok((t, addresses(t)?)))
            .collect::<Result<_>>()?;
        for (_, to) in &targets {
            for to in to {
                wait_answering(&lab, EXTERNAL_CLIENT, *to)?;
            }
        }
        let mut node_port = NodePortScale {
            node_ports: services.iter().filter(|s| s.node_port.is_some()).count(),
            modes: entry_modes.iter().map(|m| (*m, NodePortResult::default())).collect(),
            ..Default::default()
        };
        let target_refs: Vec<&(NodePortTarget, Vec<SocketAddr>)> = targets.iter().collect();
        in_rounds(&target_refs, opts.rounds, |(target, to)| {
            let sample = connections(&lab, EXTERNAL_CLIENT, to, opts.connections)?;
            match *target {
                NodePortTarget::DirectRemote => node_port.direct_remote.add(sample),
                NodePortTarget::Remote(mode) => node_port.of(mode).remote.add(sample),
                NodePortTarget::Local(mode) => node_port.of(mode).local.add(sample),
                NodePortTarget::DirectLocal(mode) => node_port.of(mode).direct_local.add(sample),
            }
            Ok(())
        })?;
        for (mode, result) in &node_port.modes {
            eprintln!(
                "{scale} Services, NodePort on {}: {:.0} connections/s to a backend on another node (direct {:.0}), {:.0} on the entry node (direct {:.0})",
                mode.label(),
                result.remote.rate(),
                node_port.direct_remote.rate(),
                result.local.rate(),
                result.direct_local.rate()
            );
        }
        node_port_results.push(node_port);
    }
    let control = if modes.contains(&Mode::SocketLb) {
        Some(control_plane(&lab, &services, entry_modes.len(), opts.changes)?)
    } else {
        None
    };
    // The baseline again, every proxy gone (ferrynet's agents without the service proxy, which
    // removes their datapath; kube-proxy's rules emptied). A node's speed against the direct
    // node's is no constant (from run to run it moved by up to 0.03), so one measurement of it,
    // taken before all the others, may be off by the time they are taken; the mean of two that
    // bracket them is the correction.
    for mode in &modes {
        if mode.is_ferrynet() {
            restart_agent(&lab, &mode.node(), Mode::Direct.agent_flags(), 0)?;
        } else {
            clear(&lab, *mode)?;
        }
    }
    let after = node_baseline(&lab, &modes, &pod_ips, opts, "after")?;
    drop(lab);
    let baseline = Baseline { before, after };
    report(opts, &baseline, &results, &node_port_results, control.as_ref())
}

/// Each mode's node's speed without any proxy, measured twice: before any proxy is set up and
/// after every one is gone.
struct Baseline {
    before: Vec<(Mode, Sample)>,
    after: Vec<(Mode, Sample)>,
}

/// Each mode's client straight to the pod IPs while no node has any proxy, in rounds ordered as
/// the measurements are (`when`: for the log).
fn node_baseline(
    lab: &Lab,
    modes: &[Mode],
    pod_ips: &[SocketAddr],
    opts: &Options,
    when: &str,
) -> Result<Vec<(Mode, Sample)>> {
    let mut baseline: Vec<(Mode, Sample)> = modes.iter().map(|m| (*m, Sample::default())).collect();
    in_rounds(modes, opts.rounds, |mode| {
        let sample = connections(lab, &format!("pod-{}", mode.client()), pod_ips, opts.connections)?;
        baseline
            .iter_mut()
            .find(|(m, _)| *m == mode)
            .expect("every mode")
            .1
            .add(sample);
        Ok(())
    })?;
    for (mode, sample) in &baseline {
        eprintln!(
            "baseline {when}, {}'s node: {:.0} connections/s to the pod IPs",
            mode.label(),
            sample.rate()
        );
    }
    Ok(baseline)
}

// ---------------------------------------------------------------------------------------------
// The report.

fn median(samples: &[Duration]) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied()
}

/// Runs `each` on every item, `rounds` times, each round in the order [`round_order`] gives it:
/// the machine's drift over a run (large on a shared VM) falls on every item alike, and so does
/// whatever a measurement leaves behind for the next one.
fn in_rounds<T: Copy>(items: &[T], rounds: usize, mut each: impl FnMut(T) -> Result<()>) -> Result<()> {
    for round in 0..rounds {
        for k in round_order(items.len(), round) {
            each(items[k])?;
        }
    }
    Ok(())
}

/// The order of round `round` over `n` items: a Williams design (a balanced Latin square). Every
/// item takes every place equally often, and follows every other item equally often: once in
/// every `n` rounds (`2n` when `n` is odd). A rotation of one fixed order put each item always
/// after the same one, and what one measurement leaves behind carries into the next: in a full
/// run of the services benchmark, kube-proxy's nftables mode, always measured after the
/// iptables-nft mode (at 10,000 Services 3.5 times slower), ran its Service connections at 1.03
/// of direct and 1.08 of its own node's pod-IP connections; measured after ferrynet's instead, at
/// 0.92 and 0.97.
fn round_order(n: usize, round: usize) -> Vec<usize> {
    let shift = round % n.max(1);
    // 0, 1, n-1, 2, n-2, ...: the steps between neighbours are all different (mod n), so that
    // shifted round by round, each item meets each other as its predecessor once.
    let mut order: Vec<usize> = (0..n)
        .map(|k| if k % 2 == 1 { k.div_ceil(2) } else { (n - k / 2) % n })
        .map(|item| (item + shift) % n)
        .collect();
    // With an odd number of items, the steps pair up only with the mirrored rounds.
    if n % 2 == 1 && (round / n) % 2 == 1 {
        order.reverse();
    }
    order
}

/// Each mode's node's speed without any proxy in one `baseline`, as a fraction of the direct
/// mode's node; None for a mode without one.
fn node_speed_in(baseline: &[(Mode, Sample)], mode: Mode) -> Option<f64> {
    let of = |mode: Mode| baseline.iter().find(|(m, _)| *m == mode).map(|(_, s)| s);
    match (of(mode), of(Mode::Direct)) {
        (Some(node), Some(direct)) if !node.round_rates.is_empty() => Some(paired_ratio(node, direct)),
        _ => None,
    }
}

/// Each mode's node's speed without any proxy, as a fraction of the direct mode's node: the mean
/// of its speeds before and after the measurements (either alone when the other is missing; 1
/// for a mode with neither).
fn node_speeds(baseline: &Baseline) -> impl Fn(Mode) -> f64 + '_ {
    move |mode: Mode| match (
        node_speed_in(&baseline.before, mode),
        node_speed_in(&baseline.after, mode),
    ) {
        (Some(before), Some(after)) => (before + after) / 2.0,
        (Some(one), None) | (None, Some(one)) => one,
        (None, None) => 1.0,
    }
}

/// `a`'s rate as a fraction of `b`'s: the median over the rounds of the ratio of the two
/// measured in the same round. Those were measured seconds apart, so the machine's drift between
/// rounds cancels, and a round in which one of them stalled counts for no more than any
/// other. Samples of different numbers of rounds cannot be paired: their aggregate rates then.
fn paired_ratio(a: &Sample, b: &Sample) -> f64 {
    if a.round_rates.is_empty() || a.round_rates.len() != b.round_rates.len() {
        return a.rate() / b.rate();
    }
    let mut ratios: Vec<f64> = a.round_rates.iter().zip(&b.round_rates).map(|(a, b)| a / b).collect();
    ratios.sort_by(f64::total_cmp);
    let middle = ratios.len() / 2;
    if ratios.len().is_multiple_of(2) {
        (ratios[middle - 1] + ratios[middle]) / 2.0
    } else {
        ratios[middle]
    }
}

/// Two modes measured head to head: `a`'s rate against `b`'s, round by round.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HeadToHead {
    /// The median over the rounds of `a`'s rate over `b`'s (see `paired_ratio`).
    ratio: f64,
    /// The rounds in which `a` was the faster.
    ahead: usize,
    rounds: usize,
}

/// `a` against `b`, measured in the same rounds, each rate first divided by its node's speed
/// (`a_node`, `b_node`: see `node_speeds`), so that a faster node does not count as a faster
/// mode. The rounds `a` wins say how far the median can be trusted: a mode truly ahead wins most
/// of them, while two modes the noise cannot tell apart each win about half. `None` when the
/// two were not measured in the same rounds.
fn head_to_head(a: &Sample, a_node: f64, b: &Sample, b_node: f64) -> Option<HeadToHead> {
    if a.round_rates.is_empty() || a.round_rates.len() != b.round_rates.len() {
        return None;
    }
    let correction = b_node / a_node;
    let ahead = a
        .round_rates
        .iter()
        .zip(&b.round_rates)
        .filter(|(a, b)| *a / *b * correction > 1.0)
        .count();
    Some(HeadToHead {
        ratio: paired_ratio(a, b) * correction,
        ahead,
        rounds: a.round_rates.len(),
    })
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// ferrynet's modes against kube-proxy's, each pair compared round by round (see
/// `head_to_head`): the comparison the targets ask for, without the detour through direct.
fn head_to_head_section<'a>(
    md: &mut String,
    scales: &[usize],
    modes: &[Mode],
    get: &impl Fn(usize, Mode) -> &'a ModeResult,
    node_speed: &impl Fn(Mode) -> f64,
) -> Result<()> {
    let ours: Vec<Mode> = modes.iter().copied().filter(|m| m.is_ferrynet()).collect();
    let theirs: Vec<Mode> = modes.iter().copied().filter(|m| !m.is_ferrynet()).collect();
    if ours.is_empty() || theirs.is_empty() {
        return Ok(());
    }
    writeln!(md, "## ferrynet against kube-proxy, head to head\n")?;
    writeln!(
        md,
        "Each ferrynet mode's connection rate to the last Service as a fraction of a kube-proxy mode's, the median over the rounds of the two measured in the same round (each divided by its node's speed, as above), and the rounds in which ferrynet was the faster: a mode truly ahead wins most rounds, while two that the noise cannot tell apart each win about half.\n"
    )?;
    write!(md, "| ferrynet | against |")?;
    for s in scales {
        write!(md, " {} Services |", thousands(*s))?;
    }
    writeln!(md)?;
    writeln!(md, "|---|---|{}", "---|".repeat(scales.len()))?;
    for &a in &ours {
        for &b in &theirs {
            write!(md, "| {} | {} |", a.label(), b.label())?;
            for i in 0..scales.len() {
                match head_to_head(&get(i, a).service, node_speed(a), &get(i, b).service, node_speed(b)) {
                    Some(h) => write!(md, " {:.2} (ahead in {} of {} rounds) |", h.ratio, h.ahead, h.rounds)?,
                    None => write!(md, " |")?,
                }
            }
            writeln!(md)?;
        }
    }
    writeln!(md)?;
    Ok(())
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn report(
    opts: &Options,
    baseline: &Baseline,
    results: &[Vec<(Mode, ModeResult)>],
    node_ports: &[NodePortScale],
    cp: Option<&ControlPlane>,
) -> Result<String> {
    let get = |scale: usize, mode: Mode| -> &ModeResult {
        &results[scale]
            .iter()
            .find(|(m, _)| *m == mode)
            .expect("every mode ran")
            .1
    };
    let direct_rate = |scale: usize| get(scale, Mode::Direct).pod_ip.rate();
    let node_speed = node_speeds(baseline);
    // To the last Service, as a fraction of direct to the pod IP, for the mode's node.
    let vs_direct = |scale: usize, mode: Mode| {
        paired_ratio(&get(scale, mode).service, &get(scale, Mode::Direct).pod_ip) / node_speed(mode)
    };
    // The modes that ran (all, unless --modes chose some).
    let service_modes: Vec<Mode> = results[0]
        .iter()
        .map(|(m, _)| *m)
        .filter(|m| *m != Mode::Direct)
        .collect();
    let scales: Vec<String> = opts.scales.iter().map(|s| thousands(*s)).collect();
    let largest = opts.scales.len() - 1;
    let mut md = String::new();
    writeln!(md, "# Service translation: ferrynet against kube-proxy's modes\n")?;
    writeln!(
        md,
        "Measured by `ferrynet-bench services --scales {} --connections {} --rounds {} --changes {}{}` on {}.\n",
        opts.scales
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        opts.connections,
        opts.rounds,
        opts.changes,
        if opts.pin_cpus { " --pin-cpus true" } else { "" },
        super::machine()
    )?;
    writeln!(
        md,
        "A 7-node lab (see the README's section on the lab), natively routed: each mode has a node of its own (n1 direct, n2 ferrynet socket LB, n3 ferrynet per-packet only, n4 to n6 kube-proxy's iptables-legacy, iptables-nft and nftables modes) with a client pod on it, and the three backend pods run on n7, so every connection crosses the underlay as it does to a backend on another node. Every pod is set up by the real `ferrynet` CNI and every node runs the real `ferrynet-agent` (translating only on n2 and n3: `--service-proxy=false` elsewhere, `--socket-lb=false` on n3; both with the lab's Service CIDRs in `--service-cidrs`, as the DaemonSet's ConfigMap sets the cluster's). Each backend runs a request server; the client, a process in its pod's namespace and cgroup, makes a new TCP connection per request (connect, 64-byte request, 64-byte response, close; like netperf's TCP_CRR), one at a time{}. Every Service has a ClusterIP and 3 ready endpoints (the three backends), written to the API with its EndpointSlice (and is of type NodePort while the NodePort range lasts: see the NodePort section; a ClusterIP connection meets none of the NodePort rules, and pod-IP traffic only kube-proxy's NodePort lookup, which it writes whether or not a Service has a NodePort); the clients connect to the **last Service created**, and the direct anchor to the backends' pod IPs (one at random per connection, as the Service picks). kube-proxy's modes are reproduced as kube-proxy writes its rules (see `tests/src/bin/ferrynet-bench/kube_proxy.rs`) and loaded into their nodes' namespaces with `iptables-legacy-restore`, `iptables-nft-restore` and `nft -f`; in iptables mode the last Service's rule is the last of `KUBE-SERVICES`, the worst case of kube-proxy's unordered chain. Since every mode is set up at once, the measurements alternate between them: {} rounds of {} connections per mode and target, in each round in an order of its own (a balanced Latin square: over the rounds every mode is measured in every place, and right after every other mode, equally often), so that the machine's drift (large on a shared VM) hits every mode alike, and so does whatever a measurement leaves behind for the next one. Every ratio is the median over the rounds of the ratio of the two measurements taken within each round (paired, so that drift between rounds cancels), while the connections/s columns are over all rounds. Each connection ends with the client's reset (SO_LINGER 0), so that no side holds it in TIME_WAIT: at these rates source ports come round again within seconds, and a SYN meeting a TIME_WAIT socket can stall a second whatever the proxy.\n",
        if opts.pin_cpus {
            "; every client runs pinned to the first CPU and every server to the last (`--pin-cpus true`), so that each connection's two ends are on two CPUs"
        } else {
            ""
        },
        opts.rounds,
        opts.connections
    )?;
    writeln!(
        md,
        "Nodes of one lab may differ in speed on a shared VM, whatever runs on them (the baseline below says by how much in this run): before any proxy is set up, and again after the last measurement once every proxy is gone (ferrynet's agents restarted without the service proxy, which removes their datapath; kube-proxy's rules emptied), every mode's client makes the same rounds of connections straight to the pod IPs, and every ratio to direct (and to a clean node) is divided by the mean of the mode's node's two speeds, so that it measures the mode and not the node (a node's speed may drift over a run: the two bracket the measurements). The uncorrected ratio is in the table of every measurement.\n"
    )?;
    writeln!(
        md,
        "## Each node's own speed, before any proxy and after every one is gone\n"
    )?;
    writeln!(
        md,
        "| the node of | connections/s to the pod IPs, before | after | vs the direct mode's node, before | after | mean (the correction) |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let speed_cell = |one: &[(Mode, Sample)], mode: Mode| {
        node_speed_in(one, mode).map_or_else(|| "-".to_string(), |s| format!("{s:.2}"))
    };
    let rate_cell = |one: &[(Mode, Sample)], mode: Mode| {
        one.iter()
            .find(|(m, _)| *m == mode)
            .map_or_else(|| "-".to_string(), |(_, s)| format!("{:.0}", s.rate()))
    };
    for (mode, _) in &baseline.before {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} |",
            mode.label(),
            rate_cell(&baseline.before, *mode),
            rate_cell(&baseline.after, *mode),
            speed_cell(&baseline.before, *mode),
            speed_cell(&baseline.after, *mode),
            node_speed(*mode)
        )?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "## Connection rate to the last Service, as a fraction of direct to the pod IP\n"
    )?;
    write!(md, "| mode |")?;
    for s in &scales {
        write!(md, " {s} Services |")?;
    }
    writeln!(md)?;
    writeln!(md, "|---|{}", "---|".repeat(scales.len()))?;
    for &mode in &service_modes {
        write!(md, "| {} |", mode.label())?;
        for i in 0..opts.scales.len() {
            write!(md, " {:.2} |", vs_direct(i, mode))?;
        }
        writeln!(md)?;
    }
    writeln!(
        md,
        "\n![connection rate against the number of Services](services.svg)\n"
    )?;
    writeln!(md, "## Every measurement\n")?;
    writeln!(
        md,
        "| Services | mode | connections/s | vs direct | vs direct, uncorrected | vs this mode's pod-IP traffic | p50 (µs) | p99 (µs) | slowest (ms) | over 100 ms | programming all Services (s) |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (i, s) in scales.iter().enumerate() {
        let direct = Summary::of(&get(i, Mode::Direct).pod_ip.latencies);
        writeln!(
            md,
            "| {s} | {} | {:.0} | 1.00 | 1.00 | | {} | {} | {} | {} | |",
            Mode::Direct.label(),
            direct_rate(i),
            us(direct.p50),
            us(direct.p99),
            ms(direct.max),
            direct.stalls
        )?;
        for &mode in &service_modes {
            let r = get(i, mode);
            let summary = Summary::of(&r.service.latencies);
            writeln!(
                md,
                "| {s} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
                mode.label(),
                r.service.rate(),
                vs_direct(i, mode),
                paired_ratio(&r.service, &get(i, Mode::Direct).pod_ip),
                paired_ratio(&r.service, &r.pod_ip),
                us(summary.p50),
                us(summary.p99),
                ms(summary.max),
                summary.stalls,
                median(&r.programming).map_or(String::new(), |d| format!("{:.2}", d.as_secs_f64()))
            )?;
        }
    }
    writeln!(
        md,
        "\n\"vs this mode's pod-IP traffic\" pairs each Service measurement with the pod-IP one taken in the same turn of the same mode (the Service first in one round, the pod IPs first in the next): it isolates the translation's own cost from the drift between the modes' time slots. Programming time is the run of kube-proxy's rule loader alone, into emptied tables (no API, no rule computation); ferrynet's from scratch is in the control plane section. \"slowest\" is the slowest of the mode's {} connections and \"over 100 ms\" counts the stalls (a dropped SYN is sent again after a second), which a p99 hides while they weigh on the connections/s column.\n",
        thousands(opts.rounds * opts.connections)
    )?;
    head_to_head_section(&mut md, &opts.scales, &service_modes, &get, &node_speed)?;
    writeln!(
        md,
        "## Pod-IP traffic (no Service) with {} Services programmed\n",
        scales[largest]
    )?;
    writeln!(md, "| mode | connections/s | vs a clean node | p50 (µs) | p99 (µs) |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    // Pod-IP traffic under a mode, as a fraction of the same on the clean node, for the mode's
    // node.
    let vs_clean =
        |mode: Mode| paired_ratio(&get(largest, mode).pod_ip, &get(largest, Mode::Direct).pod_ip) / node_speed(mode);
    for mode in std::iter::once(Mode::Direct).chain(service_modes.iter().copied()) {
        let r = get(largest, mode);
        let summary = Summary::of(&r.pod_ip.latencies);
        let label = if mode == Mode::Direct {
            "clean node (no service proxy)"
        } else {
            mode.label()
        };
        writeln!(
            md,
            "| {label} | {:.0} | {:.2} | {} | {} |",
            r.pod_ip.rate(),
            vs_clean(mode),
            us(summary.p50),
            us(summary.p99)
        )?;
    }
    node_port_section(&mut md, opts, node_ports)?;
    if let Some(cp) = cp {
        control_plane_section(&mut md, cp)?;
    }
    writeln!(md, "## Targets\n")?;
    let mut check = |ok: bool, what: String| writeln!(md, "- {} {what}", if ok { "met:" } else { "**not met:**" });
    for mode in [Mode::SocketLb, Mode::PerPacket]
        .into_iter()
        .filter(|m| service_modes.contains(m))
    {
        let ratios: Vec<f64> = (0..opts.scales.len()).map(|i| vs_direct(i, mode)).collect();
        let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        check(
            worst >= 0.95,
            format!(
                "{} at ≥ 0.95 of direct at every scale (lowest {worst:.2})",
                mode.label()
            ),
        )?;
        let beats = (0..opts.scales.len()).all(|i| {
            [Mode::IptablesLegacy, Mode::IptablesNft, Mode::Nftables]
                .iter()
                .filter(|k| service_modes.contains(k))
                .all(|k| {
                    paired_ratio(&get(i, mode).service, &get(i, *k).service) * node_speed(*k) / node_speed(mode) > 1.0
                })
        });
        check(
            beats,
            format!("{} beats every kube-proxy mode at every scale", mode.label()),
        )?;
    }
    for mode in [Mode::SocketLb, Mode::PerPacket]
        .into_iter()
        .filter(|m| service_modes.contains(m))
    {
        let r = vs_clean(mode);
        check(
            r >= 0.98,
            format!(
                "pod-IP traffic with {} Services under {} at ≥ 0.98 of a clean node ({r:.2})",
                scales[largest],
                mode.label()
            ),
        )?;
    }
    for (mode, backend) in [Mode::SocketLb, Mode::PerPacket]
        .into_iter()
        .filter(|m| service_modes.contains(m))
        .flat_map(|m| [(m, NodePortBackend::Remote), (m, NodePortBackend::Local)])
    {
        let ratios: Vec<f64> = node_ports.iter().map(|np| backend.ratio(np, mode)).collect();
        if service_modes.contains(&Mode::Nftables) {
            let behind: Vec<String> = node_ports
                .iter()
                .zip(&scales)
                .map(|(np, s)| (backend.vs_nftables(np, mode), s))
                .filter(|(r, _)| *r < 1.0)
                .map(|(r, s)| format!("{s}: {r:.2} of nftables' rate"))
                .collect();
            check(
                behind.is_empty(),
                format!(
                    "NodePort, {}, {}: at least kube-proxy nftables' rate at every scale{}",
                    backend.label(),
                    mode.label(),
                    if behind.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", behind.join("; "))
                    }
                ),
            )?;
        }
        let (low, high) = ratios
            .iter()
            .fold((f64::INFINITY, 0.0_f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        check(
            low >= FLAT * high,
            format!(
                "NodePort, {}, {}: flat across scales, the lowest ratio to direct at least {FLAT} of the highest ({low:.2} to {high:.2})",
                backend.label(),
                mode.label()
            ),
        )?;
    }
    if let Some(cp) = cp {
        let changes = Summary::of(&cp.changes);
        check(
            cp.from_start < Duration::from_secs(1),
            format!(
                "{} Services from scratch in under 1 s ({:.2} s from the agent's start; its syncs {:.3} s)",
                thousands(cp.services),
                cp.from_start.as_secs_f64(),
                cp.sync_seconds
            ),
        )?;
        check(
            changes.p99 < Duration::from_millis(20),
            format!(
                "single-change p99 under 20 ms ({:.2} ms)",
                changes.p99.as_secs_f64() * 1e3
            ),
        )?;
        check(
            cp.rss_kib < 100 * 1024,
            format!(
                "RSS under 100 MiB ({:.1} MiB; peak {:.1} MiB)",
                cp.rss_kib as f64 / 1024.0,
                cp.hwm_kib as f64 / 1024.0
            ),
        )?;
    }
    if let Some(path) = &opts.chart {
        let chart = Chart {
            title: "New TCP connections per second to the last Service, vs direct to the pod IP",
            x_title: "Services (3 endpoints each)",
            y_title: "connection rate / direct",
            x_labels: scales.clone(),
            y_max: 1.2,
            references: vec![(1.0, "direct to the pod IP"), (0.95, "target 0.95")],
            series: service_modes
                .iter()
                .map(|&mode| Series {
                    label: mode.label(),
                    color: mode.color(),
                    values: (0..opts.scales.len()).map(|i| Some(vs_direct(i, mode))).collect(),
                    dashed: false,
                })
                .collect(),
        };
        write_file(path, &chart.svg())?;
    }
    if let Some(path) = &opts.nodeport_chart {
        let labels: Vec<(Mode, NodePortBackend, String)> = node_ports[0]
            .modes
            .iter()
            .flat_map(|(m, _)| [NodePortBackend::Remote, NodePortBackend::Local].map(|b| (*m, b)))
            .map(|(m, b)| (m, b, format!("{}, {}", m.label(), b.short_label())))
            .collect();
        let chart = Chart {
            title: "New TCP connections per second to a NodePort, vs direct to the pod IP",
            x_title: "Services (the last one's NodePort; solid: backend on another node, dashed: on the entry node)",
            y_title: "connection rate / direct",
            x_labels: scales.clone(),
            y_max: 1.2,
            references: vec![(1.0, "direct to the pod IP")],
            series: labels
                .iter()
                .map(|(mode, backend, label)| Series {
                    label,
                    color: mode.color(),
                    values: node_ports.iter().map(|np| Some(backend.ratio(np, *mode))).collect(),
                    dashed: *backend == NodePortBackend::Local,
                })
                .collect(),
        };
        write_file(path, &chart.svg())?;
    }
    Ok(md)
}

/// The NodePort section's targets: ferrynet's ratio to direct at its lowest scale at least this
/// fraction of its highest.
const FLAT: f64 = 0.9;

/// Where a NodePort's endpoint runs, seen from the entry node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodePortBackend {
    Remote,
    Local,
}

impl NodePortBackend {
    fn label(self) -> &'static str {
        match self {
            NodePortBackend::Remote => "backend on another node",
            NodePortBackend::Local => "backend on the entry node",
        }
    }

    fn short_label(self) -> &'static str {
        match self {
            NodePortBackend::Remote => "remote",
            NodePortBackend::Local => "local",
        }
    }

    fn result(np: &NodePortScale, mode: Mode) -> &NodePortResult {
        &np.modes.iter().find(|(m, _)| *m == mode).expect("every mode ran").1
    }

    /// The measurement through `mode`'s node.
    fn sample(self, np: &NodePortScale, mode: Mode) -> &Sample {
        match self {
            NodePortBackend::Remote => &Self::result(np, mode).remote,
            NodePortBackend::Local => &Self::result(np, mode).local,
        }
    }

    /// The client straight to the same pod(s).
    fn direct(self, np: &NodePortScale, mode: Mode) -> &Sample {
        match self {
            NodePortBackend::Remote => &np.direct_remote,
            NodePortBackend::Local => &Self::result(np, mode).direct_local,
        }
    }

    /// The measurement through `mode`'s node as a fraction of direct.
    fn ratio(self, np: &NodePortScale, mode: Mode) -> f64 {
        paired_ratio(self.sample(np, mode), self.direct(np, mode))
    }

    /// The measurement through `mode`'s node as a fraction of the same through kube-proxy
    /// nftables' node.
    fn vs_nftables(self, np: &NodePortScale, mode: Mode) -> f64 {
        paired_ratio(self.sample(np, mode), self.sample(np, Mode::Nftables))
    }
}

fn node_port_section(md: &mut String, opts: &Options, node_ports: &[NodePortScale]) -> Result<()> {
    let scales: Vec<String> = opts.scales.iter().map(|s| thousands(*s)).collect();
    let modes: Vec<Mode> = node_ports[0].modes.iter().map(|(m, _)| *m).collect();
    let backends = [NodePortBackend::Remote, NodePortBackend::Local];
    writeln!(*md, "\n## NodePort from the external client\n")?;
    writeln!(
        *md,
        "The same lab, the same run: the lab's external client (a namespace on the nodes' L2 segment, outside the cluster) makes the same connections to a NodePort on each mode's node, the entry node. Two kinds of Service are measured: the **last Service created** (its 3 endpoints on n7, so the connection is forwarded to another node), and one Service per entry node whose one endpoint is a pod on that node (`local-n2` to `local-n6`, created before the numbered Services). Both are `externalTrafficPolicy: Cluster`, so kube-proxy masquerades both (the backend sees the entry node's address); ferrynet keeps the client's address for a local backend and SNATs for a remote one. The anchor is the same client straight to the same pod IPs (routed through the node that hosts them): a remote NodePort against the three n7 pods, a local one against its node's pod (a second request server there, on another port: see `ANCHOR_PORT` in the code for why). Every Service is of type NodePort while the API's NodePort range (30000-32767, Kubernetes' default) lasts; past it, the rest are ClusterIP only, except the last Service of each scale, measured, for which ports are kept back. kube-proxy's NodePort rules are reproduced as it writes them: in iptables mode, the last rule of `KUBE-SERVICES` jumps to `KUBE-NODEPORTS` for local destinations (after every ClusterIP rule), one rule per NodePort there, the measured ones last, then `KUBE-EXT-*` (masquerade mark) and `KUBE-SVC-*`; in nftables mode, the `services` chain looks the node's primary address (the `nodeport-ips` set) and the port up in the `service-nodeports` verdict map, then `external-*` (masquerade mark) and `service-*`. ferrynet translates NodePorts in a TCX program on the node's uplink; that program does not depend on the socket LB, so n2 and n3 measure the same datapath twice (their spread is a measure of the noise). {} rounds of {} connections per target, the {} targets ordered as the in-cluster rounds are, after the in-cluster rounds of each scale.\n",
        opts.rounds,
        opts.connections,
        1 + 3 * modes.len()
    )?;
    writeln!(
        *md,
        "### Connection rate to a NodePort, as a fraction of direct to the same pod IPs\n"
    )?;
    write!(*md, "| entry node's mode | backend |")?;
    for s in &scales {
        write!(*md, " {s} Services |")?;
    }
    writeln!(*md)?;
    writeln!(*md, "|---|---|{}", "---|".repeat(scales.len()))?;
    for backend in backends {
        for &mode in &modes {
            write!(*md, "| {} | {} |", mode.label(), backend.short_label())?;
            for np in node_ports {
                write!(*md, " {:.2} |", backend.ratio(np, mode))?;
            }
            writeln!(*md)?;
        }
    }
    writeln!(
        *md,
        "\n![NodePort connection rate against the number of Services](nodeport.svg)\n"
    )?;
    writeln!(*md, "### Every NodePort measurement\n")?;
    writeln!(
        *md,
        "| Services (NodePorts) | entry node's mode | backend | connections/s | vs direct | vs kube-proxy nftables | p50 (µs) | p99 (µs) | slowest (ms) | over 100 ms |"
    )?;
    writeln!(*md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for (np, s) in node_ports.iter().zip(&scales) {
        let at = format!("{s} ({})", thousands(np.node_ports));
        let direct = Summary::of(&np.direct_remote.latencies);
        writeln!(
            *md,
            "| {at} | direct to the pod IPs (n7) | remote | {:.0} | 1.00 | | {} | {} | {} | {} |",
            np.direct_remote.rate(),
            us(direct.p50),
            us(direct.p99),
            ms(direct.max),
            direct.stalls
        )?;
        for backend in backends {
            for &mode in &modes {
                let sample = backend.sample(np, mode);
                let summary = Summary::of(&sample.latencies);
                let vs_nftables = if modes.contains(&Mode::Nftables) {
                    format!("{:.2}", backend.vs_nftables(np, mode))
                } else {
                    String::new()
                };
                writeln!(
                    *md,
                    "| {at} | {} | {} | {:.0} | {:.2} | {vs_nftables} | {} | {} | {} | {} |",
                    mode.label(),
                    backend.short_label(),
                    sample.rate(),
                    backend.ratio(np, mode),
                    us(summary.p50),
                    us(summary.p99),
                    ms(summary.max),
                    summary.stalls
                )?;
            }
        }
        for &mode in &modes {
            let direct = NodePortBackend::Local.direct(np, mode);
            let summary = Summary::of(&direct.latencies);
            writeln!(
                *md,
                "| {at} | direct to the pod IP on {} | local | {:.0} | 1.00 | | {} | {} | {} | {} |",
                mode.node(),
                direct.rate(),
                us(summary.p50),
                us(summary.p99),
                ms(summary.max),
                summary.stalls
            )?;
        }
    }
    writeln!(
        *md,
        "\nA local measurement's \"vs direct\" is against the client straight to the pod on that entry node (its own row at the end of each scale). On kube-proxy's iptables nodes that anchor itself crosses every `KUBE-SERVICES` rule, as all traffic into the node does, so their local rows compare better by rate, or against nftables.\n"
    )?;
    Ok(())
}

fn control_plane_section(md: &mut String, cp: &ControlPlane) -> Result<()> {
    let changes = Summary::of(&cp.changes);
    writeln!(*md, "\n## Control plane at {} Services\n", thousands(cp.services))?;
    writeln!(*md, "| measure | ferrynet |")?;
    writeln!(*md, "|---|---|")?;
    writeln!(
        *md,
        "| agent start to {} Services ({} of them NodePorts, plus the {} single-endpoint NodePort Services; {} endpoints) in the maps, from nothing | {:.2} s |",
        thousands(cp.services),
        thousands(cp.node_ports - cp.local_services),
        cp.local_services,
        thousands(cp.endpoints),
        cp.from_start.as_secs_f64()
    )?;
    writeln!(
        *md,
        "| of which the agent's syncs (`kubeproxy_sync_proxy_rules_duration_seconds`, {} syncs) | {:.3} s |",
        cp.syncs, cp.sync_seconds
    )?;
    writeln!(
        *md,
        "| single endpoint change, EndpointSlice written to the API → map written: p50 / p99 ({} changes) | {:.2} ms / {:.2} ms |",
        cp.changes.len(),
        changes.p50.as_secs_f64() * 1e3,
        changes.p99.as_secs_f64() * 1e3
    )?;
    writeln!(
        *md,
        "| the slowest changes (change number: ms) | {} |",
        slowest(&cp.changes, 5)
            .iter()
            .map(|(k, took)| format!("{k}: {:.2}", took.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        *md,
        "| agent RSS (peak) | {:.1} MiB ({:.1} MiB) |",
        cp.rss_kib as f64 / 1024.0,
        cp.hwm_kib as f64 / 1024.0
    )?;
    writeln!(
        *md,
        "\nA change is one endpoint's `ready` condition flipped in the first Service's EndpointSlice, written with a replace; the benchmark then polls the node's pinned service map until the Service's backend count shows it. Changes are 20 to 40 ms apart.\n"
    )?;
    Ok(())
}

/// The `n` slowest of `changes`, slowest first, each with its number in the run (from 0): when
/// a p99 is off, whether its changes came together (a stall) or apart.
fn slowest(changes: &[Duration], n: usize) -> Vec<(usize, Duration)> {
    let mut numbered: Vec<(usize, Duration)> = changes.iter().copied().enumerate().collect();
    numbered.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    numbered.truncate(n);
    numbered
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample of `connections` per round at these rates.
    fn sample(connections: usize, round_rates: &[f64]) -> Sample {
        let mut sample = Sample::default();
        for rate in round_rates {
            sample.add(Sample::round(
                vec![Duration::from_micros(100); connections],
                connections as f64 / rate,
            ));
        }
        sample
    }

    fn assert_near(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-9, "{got} is not {want}");
    }

    #[test]
    fn the_slowest_changes_come_slowest_first_with_their_numbers() {
        let ms = Duration::from_millis;
        let changes = [ms(4), ms(30), ms(5), ms(30), ms(12)];
        assert_eq!(slowest(&changes, 3), vec![(1, ms(30)), (3, ms(30)), (4, ms(12))]);
        assert_eq!(slowest(&changes[..1], 3), vec![(0, ms(4))]);
    }

    #[test]
    fn rounds_measure_each_item_once_and_stop_at_the_first_error() {
        let mut seen = Vec::new();
        in_rounds(&['a', 'b', 'c', 'd'], 4, |x| {
            seen.push(x);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.iter().collect::<String>(), "abdcbcadcdbadacb");
        let mut calls = 0;
        let failed = in_rounds(&[1, 2], 3, |x| {
            calls += 1;
            if x == 2 { anyhow::bail!("broke") } else { Ok(()) }
        });
        assert!(failed.is_err());
        assert_eq!(calls, 2);
    }

    #[test]
    fn every_item_follows_every_other_equally_often_and_takes_every_place() {
        for n in 1..=17 {
            let rounds = if n % 2 == 0 { n } else { 2 * n };
            let mut follows = vec![vec![0; n]; n];
            let mut places = vec![vec![0; n]; n];
            for round in 0..rounds {
                let order = round_order(n, round);
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(
                    sorted,
                    (0..n).collect::<Vec<_>>(),
                    "{n} items, round {round}: {order:?}"
                );
                for (place, item) in order.iter().enumerate() {
                    places[*item][place] += 1;
                }
                for pair in order.windows(2) {
                    follows[pair[1]][pair[0]] += 1;
                }
            }
            let per_place = rounds / n;
            assert!(
                places.iter().flatten().all(|c| *c == per_place),
                "{n} items: {places:?}"
            );
            let per_pair = if n % 2 == 0 { 1 } else { 2 };
            for (after, before) in follows.iter().enumerate() {
                for (first, count) in before.iter().enumerate() {
                    let want = if first == after { 0 } else { per_pair };
                    assert_eq!(*count, want, "{n} items: {after} after {first}");
                }
            }
        }
    }

    #[test]
    fn a_nodes_speed_is_its_baseline_against_the_direct_nodes_and_one_without_a_baseline() {
        let baseline = vec![
            (Mode::Direct, sample(200, &[10_000.0, 20_000.0, 10_000.0])),
            (Mode::SocketLb, sample(200, &[9_500.0, 19_000.0, 9_500.0])),
            (Mode::Nftables, Sample::default()),
        ];
        let baseline = Baseline {
            before: baseline,
            after: Vec::new(),
        };
        let speed = node_speeds(&baseline);
        assert_near(speed(Mode::Direct), 1.0);
        assert_near(speed(Mode::SocketLb), 0.95);
        assert_near(speed(Mode::Nftables), 1.0);
        assert_near(speed(Mode::PerPacket), 1.0);
    }

    #[test]
    fn a_nodes_speed_is_the_mean_of_its_speeds_before_and_after_or_the_one_it_has() {
        let baseline = Baseline {
            before: vec![
                (Mode::Direct, sample(200, &[10_000.0, 20_000.0, 10_000.0])),
                (Mode::SocketLb, sample(200, &[10_200.0, 20_400.0, 10_200.0])),
                (Mode::PerPacket, Sample::default()),
            ],
            after: vec![
                (Mode::Direct, sample(200, &[8_000.0, 8_000.0, 16_000.0])),
                (Mode::SocketLb, sample(200, &[7_840.0, 7_840.0, 15_680.0])),
                (Mode::PerPacket, sample(200, &[8_400.0, 8_400.0, 16_800.0])),
            ],
        };
        let speed = node_speeds(&baseline);
        // 1.02 before, 0.98 after: the drift between them averaged out.
        assert_near(speed(Mode::SocketLb), 1.0);
        assert_near(speed(Mode::PerPacket), 1.05);
        assert_near(speed(Mode::Direct), 1.0);
        assert_near(speed(Mode::Nftables), 1.0);
    }

    #[test]
    fn a_sample_keeps_its_rounds_rates_in_order() {
        let s = sample(400, &[10_000.0, 5_000.0, 8_000.0]);
        assert_eq!(s.round_rates.len(), 3);
        for (got, want) in s.round_rates.iter().zip([10_000.0, 5_000.0, 8_000.0]) {
            assert_near(*got, want);
        }
        assert_eq!(s.latencies.len(), 1200);
    }

    #[test]
    fn drift_between_rounds_cancels() {
        // The machine twice as fast in half the rounds, for both. The aggregate weighs each
        // round by its seconds, so it cancels that only while every round has as many
        // connections: here direct's fast rounds are shorter.
        let mut direct = sample(400, &[10_000.0, 10_000.0]);
        direct.add(sample(100, &[20_000.0, 20_000.0]));
        let mode = sample(400, &[9_000.0, 9_000.0, 18_000.0, 18_000.0]);
        assert_near(paired_ratio(&mode, &direct), 0.9);
        assert!(mode.rate() / direct.rate() > 1.0);
    }

    #[test]
    fn a_stalled_round_counts_for_no_more_than_another() {
        // Direct stalls to 30% in its slot of the third round; the aggregate follows it.
        let direct = sample(400, &[10_000.0, 10_000.0, 3_000.0, 10_000.0, 10_000.0]);
        let mode = sample(400, &[9_000.0; 5]);
        assert_near(paired_ratio(&mode, &direct), 0.9);
        assert!(mode.rate() / direct.rate() > 1.0);
    }

    #[test]
    fn the_median_of_an_odd_and_an_even_number_of_rounds() {
        let direct = sample(400, &[10_000.0; 5]);
        let odd = sample(400, &[12_000.0, 8_000.0, 9_000.0, 10_000.0, 9_500.0]);
        assert_near(paired_ratio(&odd, &direct), 0.95);
        let direct = sample(400, &[10_000.0; 4]);
        let even = sample(400, &[12_000.0, 8_000.0, 9_000.0, 10_000.0]);
        assert_near(paired_ratio(&even, &direct), 0.95);
    }

    #[test]
    fn head_to_head_counts_the_rounds_each_won_on_equal_nodes() {
        let ours = sample(400, &[10_000.0, 9_000.0, 11_000.0, 10_500.0]);
        let theirs = sample(400, &[9_500.0, 9_500.0, 10_000.0, 10_000.0]);
        let h = head_to_head(&ours, 1.0, &theirs, 1.0).expect("same rounds");
        assert_eq!((h.ahead, h.rounds), (3, 4));
        assert_near(h.ratio, paired_ratio(&ours, &theirs));
    }

    #[test]
    fn head_to_head_does_not_credit_a_mode_with_its_faster_node() {
        // Ours runs on a node 10% faster than theirs: 5% ahead in raw rates is 5% behind.
        let ours = sample(400, &[10_500.0; 5]);
        let theirs = sample(400, &[10_000.0; 5]);
        let h = head_to_head(&ours, 1.10, &theirs, 1.0).expect("same rounds");
        assert_eq!(h.ahead, 0);
        assert_near(h.ratio, 1.05 / 1.10);
        let h = head_to_head(&theirs, 1.0, &ours, 1.10).expect("same rounds");
        assert_eq!(h.ahead, 5);
    }

    #[test]
    fn head_to_head_needs_the_same_rounds() {
        let ours = sample(400, &[10_000.0, 9_000.0]);
        let theirs = sample(400, &[9_500.0, 9_500.0, 9_000.0]);
        assert_eq!(head_to_head(&ours, 1.0, &theirs, 1.0), None);
        assert_eq!(head_to_head(&Sample::default(), 1.0, &Sample::default(), 1.0), None);
    }

    #[test]
    fn unequal_rounds_fall_back_to_the_aggregate() {
        let direct = sample(400, &[10_000.0, 20_000.0, 10_000.0]);
        let mode = sample(400, &[9_000.0, 18_000.0]);
        assert_near(paired_ratio(&mode, &direct), mode.rate() / direct.rate());
        let unmeasured = Sample::default();
        assert!(paired_ratio(&unmeasured, &direct).is_nan());
    }
}
