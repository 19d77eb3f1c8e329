//! The services benchmark: a new TCP connection per request to the last Service created, at
//! several numbers of Services, through ferrynet's socket LB, its per-packet path, and
//! kube-proxy's iptables (legacy and nft backends) and nftables modes reproduced as kube-proxy
//! writes them; against the same client going straight to a backend pod's IP. Then the
//! control plane at the largest number: programming everything from scratch, single endpoint
//! changes from the API write to the map write, and the agent's memory.
//!
//! Everything runs in one lab: a node per mode, each with a client pod, and a node with three
//! backend pods running this tool's request server. Services are selectorless, with EndpointSlices this tool writes
//! (three ready endpoints each), so the API holds exactly what a cluster's would. The client is
//! a process inside the client pod's namespace and cgroup, as a pod's process is.
use std::{
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
    bench::Summary,
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
const SERVICE_PORT: u16 = 80;
/// The lab's pod CIDRs (kube-proxy's `--cluster-cidr`).
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Request and response size.
const MESSAGE: usize = 64;
const LABEL: &str = "ferrynet-bench";
const NAMESPACE: &str = "default";

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
            Mode::SocketLb => &[],
            Mode::PerPacket => &["--socket-lb", "false"],
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
    pub chart: Option<PathBuf>,
}

/// Connections made in one mode: their latencies and the time they took together.
#[derive(Default, Clone)]
struct Sample {
    latencies: Vec<Duration>,
    seconds: f64,
}

impl Sample {
    fn add(&mut self, other: Sample) {
        self.latencies.extend(other.latencies);
        self.seconds += other.seconds;
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

struct ControlPlane {
    services: usize,
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
        nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )?;
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

/// Runs the client in the client pod (its namespace and cgroup), connecting to `to` (one of
/// them at random each time).
fn connections(lab: &Lab, mode: Mode, to: &[SocketAddr], n: usize) -> Result<Sample> {
    let to = to.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let argv: Vec<String> = [
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
    let out = lab.exec_output(&format!("pod-{}", mode.client()), &argv)?;
    if !out.status.success() {
        bail!("client to {to}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("client report")?;
    let latencies = report["latencies_us"]
        .as_array()
        .context("client report: latencies")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .map(|us| Duration::from_secs_f64(us / 1e6))
        .collect();
    Ok(Sample {
        latencies,
        seconds: report["seconds"].as_f64().context("client report: seconds")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Services in the API.

fn service_name(i: usize) -> String {
    format!("bench-{i}")
}

fn bench_service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(i)),
            namespace: Some(NAMESPACE.into()),
            labels: Some([(LABEL.to_string(), "services".to_string())].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
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

fn bench_slice(i: usize, backends: &[Ipv4Addr]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-1", service_name(i))),
            namespace: Some(NAMESPACE.into()),
            labels: Some(
                [
                    ("kubernetes.io/service-name".to_string(), service_name(i)),
                    ("endpointslice.kubernetes.io/managed-by".to_string(), LABEL.to_string()),
                    (LABEL.to_string(), "services".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: backends
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(BACKEND_NODE.into()),
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

/// Creates Services `from..to`, each with its EndpointSlice, 16 requests at a time.
fn create_services(lab: &Lab, from: usize, to: usize, backends: &[Ipv4Addr]) -> Result<()> {
    let backends = backends.to_vec();
    lab.api()?.call(move |client| async move {
        let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
        let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
        futures::stream::iter(from..to)
            .map(|i| {
                let (services, slices, backends) = (services.clone(), slices.clone(), backends.clone());
                async move {
                    services
                        .create(&PostParams::default(), &bench_service(i))
                        .await
                        .with_context(|| format!("creating service {}", service_name(i)))?;
                    slices
                        .create(&PostParams::default(), &bench_slice(i, &backends))
                        .await
                        .with_context(|| format!("creating the slice of {}", service_name(i)))?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    })
}

/// The benchmark's Services as kube-proxy would program them, in creation order.
fn cluster_ip_services(lab: &Lab, backends: &[Ipv4Addr]) -> Result<Vec<ClusterIpService>> {
    let services: Vec<Service> = lab.api()?.call(|client| async move {
        Ok(Api::<Service>::namespaced(client, NAMESPACE)
            .list(&ListParams::default().labels(&format!("{LABEL}=services")))
            .await?
            .items)
    })?;
    let mut out: Vec<(usize, ClusterIpService)> = services
        .into_iter()
        .filter_map(|svc| {
            let name = svc.metadata.name?;
            let index = name.strip_prefix("bench-")?.parse().ok()?;
            let vip = svc.spec?.cluster_ip?.parse().ok()?;
            Some((
                index,
                ClusterIpService {
                    namespace: NAMESPACE.into(),
                    name,
                    vip,
                    port: SERVICE_PORT,
                    endpoints: backends.iter().map(|ip| (*ip, BACKEND_PORT)).collect(),
                },
            ))
        })
        .collect();
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, s)| s).collect())
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
                (frontends >= services.len() as u64).then_some(())
            })
            .ok_or_else(|| anyhow!("{node}'s agent has {last} of {} service ports", services.len()))?;
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
                _ => ("nft", &["-f"][..], kube_proxy::nftables_rules(services, CLUSTER_CIDR)),
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

fn control_plane(lab: &Lab, services: &[ClusterIpService], changes: usize) -> Result<ControlPlane> {
    let node = CONTROL_PLANE_NODE;
    // From nothing: the datapath an earlier run left is removed first.
    restart_agent(lab, node, Mode::Direct.agent_flags(), 0)?;
    let from_start = restart_agent(lab, node, Mode::SocketLb.agent_flags(), services.len())?;
    let text = metrics(lab, node)?;
    let sync_seconds = metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(f64::NAN);
    let syncs = metric(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0) as u64;
    let first = services.first().context("no services")?;
    let changes = single_changes(lab, node, first.vip, changes)?;
    let pid = lab.agent_pid(node).context("no agent")?;
    let (rss_kib, hwm_kib) = rss_kib(pid)?;
    Ok(ControlPlane {
        services: services.len(),
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
    ferrynet_tests::require_root();
    if opts.scales.is_empty() || opts.scales.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--scales must be increasing numbers of Services");
    }
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| *m == Mode::Direct || opts.modes.as_ref().is_none_or(|only| only.contains(m)))
        .collect();
    // A node per mode (n1 to n6) and one for the backends (n7), natively routed.
    let mut lab = LabGuard::up(Mode::ALL.len() as u8 + 1, "native");
    lab.wait_converged(Duration::from_secs(120))?;
    // ferrynet translates only on its own modes' nodes; elsewhere the agent runs without.
    for node in Mode::ALL
        .iter()
        .filter(|m| !matches!(m, Mode::SocketLb | Mode::PerPacket))
        .map(|m| m.node())
        .chain(std::iter::once(BACKEND_NODE.to_string()))
    {
        restart_agent(&lab, &node, Mode::Direct.agent_flags(), 0)?;
    }
    restart_agent(&lab, &Mode::PerPacket.node(), Mode::PerPacket.agent_flags(), 0)?;
    for mode in &modes {
        lab.run_pod(&mode.client(), &mode.node(), &Default::default())?;
    }
    for b in BACKENDS {
        lab.run_pod(b, BACKEND_NODE, &Default::default())?;
    }
    let backends: Vec<Ipv4Addr> = BACKENDS
        .iter()
        .map(|b| match lab.pod(b)?.ip(true) {
            IpAddr::V4(v4) => Ok(v4),
            IpAddr::V6(_) => Err(anyhow!("pod {b} has no IPv4 address")),
        })
        .collect::<Result<_>>()?;
    for b in BACKENDS {
        lab.spawn_in(
            &format!("pod-{b}"),
            &format!("crr-{b}"),
            &[
                binary("ferrynet-bench").display().to_string(),
                "crr-server".into(),
                "--port".into(),
                BACKEND_PORT.to_string(),
            ],
        )?;
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

    let mut results: Vec<Vec<(Mode, ModeResult)>> = Vec::new();
    let mut created = 0;
    let mut services = Vec::new();
    for &scale in &opts.scales {
        let start = Instant::now();
        create_services(&lab, created, scale, &backends)?;
        created = scale;
        services = cluster_ip_services(&lab, &backends)?;
        if services.len() != scale {
            bail!("{} of {scale} Services have a ClusterIP", services.len());
        }
        eprintln!("{scale} Services in the API ({:.1} s)", start.elapsed().as_secs_f64());
        let mut at_scale: Vec<(Mode, ModeResult)> = modes.iter().map(|m| (*m, ModeResult::default())).collect();
        for (mode, result) in &mut at_scale {
            result.programming.extend(program(&lab, *mode, &services)?);
        }
        let last = services.last().expect("at least one");
        let vip = SocketAddr::new(IpAddr::V4(last.vip), SERVICE_PORT);
        // Rounds of a few hundred connections per mode, the order rotating from round to round,
        // so that the machine's drift (large on a shared VM) hits every mode alike.
        for round in 0..opts.rounds {
            for k in 0..modes.len() {
                let mode = modes[(k + round) % modes.len()];
                let result = &mut at_scale.iter_mut().find(|(m, _)| *m == mode).expect("every mode").1;
                if mode != Mode::Direct {
                    result.service.add(connections(&lab, mode, &[vip], opts.connections)?);
                }
                result.pod_ip.add(connections(&lab, mode, &pod_ips, opts.connections)?);
            }
        }
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
    }
    let control = if modes.contains(&Mode::SocketLb) {
        Some(control_plane(&lab, &services, opts.changes)?)
    } else {
        None
    };
    drop(lab);
    report(opts, &results, control.as_ref())
}

// ---------------------------------------------------------------------------------------------
// The report.

fn median(samples: &[Duration]) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied()
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
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

fn report(opts: &Options, results: &[Vec<(Mode, ModeResult)>], cp: Option<&ControlPlane>) -> Result<String> {
    let get = |scale: usize, mode: Mode| -> &ModeResult {
        &results[scale]
            .iter()
            .find(|(m, _)| *m == mode)
            .expect("every mode ran")
            .1
    };
    let direct_rate = |scale: usize| get(scale, Mode::Direct).pod_ip.rate();
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
        "Measured by `ferrynet-bench services --scales {} --connections {} --rounds {} --changes {}` on {}.\n",
        opts.scales
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        opts.connections,
        opts.rounds,
        opts.changes,
        super::machine()
    )?;
    writeln!(
        md,
        "A 7-node lab (see the README's section on the lab), natively routed: each mode has a node of its own (n1 direct, n2 ferrynet socket LB, n3 ferrynet per-packet only, n4 to n6 kube-proxy's iptables-legacy, iptables-nft and nftables modes) with a client pod on it, and the three backend pods run on n7, so every connection crosses the underlay as it does to a backend on another node. Every pod is set up by the real `ferrynet` CNI and every node runs the real `ferrynet-agent` (translating only on n2 and n3: `--service-proxy=false` elsewhere, `--socket-lb=false` on n3). Each backend runs a request server; the client, a process in its pod's namespace and cgroup, makes a new TCP connection per request (connect, 64-byte request, 64-byte response, close; like netperf's TCP_CRR), one at a time. Every Service is a ClusterIP with 3 ready endpoints (the three backends), written to the API with its EndpointSlice; the clients connect to the **last Service created**, and the direct anchor to the backends' pod IPs (one at random per connection, as the Service picks). kube-proxy's modes are reproduced as kube-proxy writes its rules (see `tests/src/bin/ferrynet-bench/kube_proxy.rs`) and loaded into their nodes' namespaces with `iptables-legacy-restore`, `iptables-nft-restore` and `nft -f`; in iptables mode the last Service's rule is the last of `KUBE-SERVICES`, the worst case of kube-proxy's unordered chain. Since every mode is set up at once, the measurements alternate between them: {} rounds of {} connections per mode and target, the order rotating from round to round, so that the machine's drift (large on a shared VM) hits every mode alike. Each connection ends with the client's reset (SO_LINGER 0), so that no side holds it in TIME_WAIT: at these rates source ports come round again within seconds, and a SYN meeting a TIME_WAIT socket can stall a second whatever the proxy.\n",
        opts.rounds, opts.connections
    )?;
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
            write!(md, " {:.2} |", get(i, mode).service.rate() / direct_rate(i))?;
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
        "| Services | mode | connections/s | vs direct | vs this mode's pod-IP traffic | p50 (µs) | p99 (µs) | programming all Services (s) |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for (i, s) in scales.iter().enumerate() {
        let direct = Summary::of(&get(i, Mode::Direct).pod_ip.latencies);
        writeln!(
            md,
            "| {s} | {} | {:.0} | 1.00 | | {} | {} | |",
            Mode::Direct.label(),
            direct_rate(i),
            us(direct.p50),
            us(direct.p99)
        )?;
        for &mode in &service_modes {
            let r = get(i, mode);
            let summary = Summary::of(&r.service.latencies);
            writeln!(
                md,
                "| {s} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
                mode.label(),
                r.service.rate(),
                r.service.rate() / direct_rate(i),
                r.service.rate() / r.pod_ip.rate(),
                us(summary.p50),
                us(summary.p99),
                median(&r.programming).map_or(String::new(), |d| format!("{:.2}", d.as_secs_f64()))
            )?;
        }
    }
    writeln!(
        md,
        "\n\"vs this mode's pod-IP traffic\" pairs each Service measurement with the pod-IP one taken right after it, in the same mode: it isolates the translation's own cost from the drift between the modes' time slots. Programming time is the run of kube-proxy's rule loader alone, into emptied tables (no API, no rule computation); ferrynet's from scratch is in the control plane section.\n"
    )?;
    writeln!(
        md,
        "## Pod-IP traffic (no Service) with {} Services programmed\n",
        scales[largest]
    )?;
    writeln!(md, "| mode | connections/s | vs a clean node | p50 (µs) | p99 (µs) |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    let clean = direct_rate(largest);
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
            r.pod_ip.rate() / clean,
            us(summary.p50),
            us(summary.p99)
        )?;
    }
    if let Some(cp) = cp {
        control_plane_section(&mut md, cp)?;
    }
    writeln!(md, "## Targets\n")?;
    let mut check = |ok: bool, what: String| writeln!(md, "- {} {what}", if ok { "met:" } else { "**not met:**" });
    for mode in [Mode::SocketLb, Mode::PerPacket]
        .into_iter()
        .filter(|m| service_modes.contains(m))
    {
        let ratios: Vec<f64> = (0..opts.scales.len())
            .map(|i| get(i, mode).service.rate() / direct_rate(i))
            .collect();
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
                .all(|k| get(i, mode).service.rate() > get(i, *k).service.rate())
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
        let r = get(largest, mode).pod_ip.rate() / clean;
        check(
            r >= 0.98,
            format!(
                "pod-IP traffic with {} Services under {} at ≥ 0.98 of a clean node ({r:.2})",
                scales[largest],
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
                    values: (0..opts.scales.len())
                        .map(|i| Some(get(i, mode).service.rate() / direct_rate(i)))
                        .collect(),
                })
                .collect(),
        };
        write_file(path, &chart.svg())?;
    }
    Ok(md)
}

fn control_plane_section(md: &mut String, cp: &ControlPlane) -> Result<()> {
    let changes = Summary::of(&cp.changes);
    writeln!(*md, "\n## Control plane at {} Services\n", thousands(cp.services))?;
    writeln!(*md, "| measure | ferrynet |")?;
    writeln!(*md, "|---|---|")?;
    writeln!(
        *md,
        "| agent start to {} Services ({} endpoints) in the maps, from nothing | {:.2} s |",
        thousands(cp.services),
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

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
