//! The lab: a whole multi-node cluster on one Linux machine, inside network namespaces it
//! creates, so that everything can run without a cluster.
//!
//! ```text
//!   fl-<lab>-sw      the underlay: one bridge br<s> per L2 segment s (one segment by default,
//!                    with no address); with several segments it is also the router between
//!                    them, at 10.200.s.1 and fd00:200:s::1, and knows nothing of pod CIDRs
//!   fl-<lab>-cp      control plane, on segment 0: the API stand-in on 10.200.0.2:6443
//!   fl-<lab>-client  an external client on segment 0: 10.200.0.250, fd00:200::250
//!   fl-<lab>-n<i>    node i, on segment (i-1) mod segments: eth0 10.200.s.(10+i), fd00:200:s::(10+i);
//!                    PodCIDRs 10.244.i.0/24, fd00:244:i::/64;
//!                    its own ferrynet-agent, CNI dirs, IPAM store, state dir, BPF pin path
//!                    (in the lab's own bpffs) and cgroup (`<cgroup2>/ferrynet-lab/<lab>/<node>`)
//!   fl-<lab>-pod-<p> pod p: set up by its node's real `ferrynet` binary, run exactly as a runtime
//!                    runs it; runs a small server answering with the pod's name and address, in a
//!                    cgroup of its own under its node's (as kubelet puts pods under the root)
//! ```
//!
//! The lab plays the parts of a cluster it has no binaries for: it registers Nodes (with
//! PodCIDRs and addresses), creates Pods through the CNI, and is the EndpointSlice controller.
//! Its state is in `/run/ferrynet-lab/<lab>/`. It never touches the machine's own namespace,
//! routes, firewall or root cgroup, and `down` (also run first by `up`) removes everything: every
//! process in the lab's namespaces and cgroups, the namespaces, the cgroups, the bpffs mount and
//! the state directory, even after a crash.
//!
//! - [`topology`]: namespace names and the underlay;
//! - [`daemons`]: starting and stopping the lab's processes;
//! - [`kernel_fs`]: cgroups and the lab's bpffs;
//! - [`api`]: the lab's calls to the API stand-in (kube-rs, typed objects);
//! - [`endpoints`]: the EndpointSlice controller;
//! - [`pod_server`]: what each pod runs;
//! - [`controllers`]: the control plane's controllers and the kubelets, as one daemon, so that
//!   `kubectl run`, `create deployment`, `scale` and `expose` work;
//! - [`kubelet`]: pods users create, run through the node's CNI, with real programs
//!   ([`images`]);
//! - [`dns`]: the cluster DNS (dnsmasq behind a ClusterIP);
//! - [`guard`]: a lab per test, taken down when dropped;
//! - [`demo`]: `ferrynet-lab demo`, the four myths about kube-proxy and the CNI.
pub mod api;
pub mod controllers;
pub mod daemons;
pub mod demo;
pub mod dns;
pub mod endpoints;
pub mod guard;
pub mod images;
pub mod kernel_fs;
pub mod kubelet;
pub mod pod_server;
pub mod topology;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
pub use api::LabApi;
pub use daemons::PausedThread;
pub use guard::{LabGuard, eventually};
use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, ContainerState, ContainerStatus, Node, NodeAddress, NodeCondition, NodeSpec,
        NodeStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service, ServicePort as K8sServicePort, ServiceSpec,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
pub use kernel_fs::cgroup2_root;
use kube::api::ObjectMeta;
pub use pod_server::pod_server;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::{
    daemons::DaemonExit,
    kernel_fs::{cgroup_pids, is_mount_point, join_cgroup, lab_bpffs, lab_cgroup, mount_bpffs, remove_cgroup, unmount},
    topology::{in_lab, lab_namespaces, lab_netns_inodes, ns_name, run_ip, valid_name},
};
use crate::{binary, cni_bin_dir, netns::Netns};

pub const STATE_ROOT: &str = "/run/ferrynet-lab";
pub const API_ADDR: &str = "10.200.0.2:6443";
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 250);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x250);
/// The port every pod's server listens on.
pub const POD_PORT: u16 = 8080;
/// The highest node index: node i's address is 10.200.s.(10+i) and its PodCIDR 10.244.i.0/24.
pub const MAX_NODE_INDEX: u8 = 200;
const CONFLIST: &str = "05-ferrynet.conflist";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabOptions {
    pub name: String,
    pub nodes: u8,
    /// The agents' routing mode: native, vxlan or auto.
    pub mode: String,
    /// How many L2 segments the underlay has (routed between each other); nodes are dealt out
    /// over them in turn.
    pub segments: u8,
    /// Whether the lab runs the cluster DNS (a `kube-dns` pod and Service in `kube-system`).
    #[serde(default)]
    pub dns: bool,
}

fn one_segment() -> u8 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabNode {
    pub name: String,
    pub index: u8,
    /// The underlay L2 segment the node is on.
    #[serde(default)]
    pub segment: u8,
}

impl LabNode {
    /// Node `index` of a lab with `segments` underlay segments. Refused past
    /// [`MAX_NODE_INDEX`], where its address (10.200.s.(10+i)) and PodCIDR (10.244.i.0/24) would
    /// not exist.
    pub fn at(index: u8, segments: u8) -> Result<Self> {
        if !(1..=MAX_NODE_INDEX).contains(&index) {
            bail!(
                "node index {index} is outside the lab's address plan (1 to {MAX_NODE_INDEX} nodes over a lab's lifetime)"
            );
        }
        Ok(Self {
            name: format!("n{index}"),
            index,
            segment: (index - 1) % segments.max(1),
        })
    }

    pub fn v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.segment, 10 + self.index)
    }
    pub fn v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x200,
            u16::from(self.segment),
            0,
            0,
            0,
            0,
            0x10 + u16::from(self.index),
        )
    }
    pub fn pod_cidrs(&self) -> [String; 2] {
        [
            format!("10.244.{}.0/24", self.index),
            format!("fd00:244:{:x}::/64", self.index),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabPod {
    pub name: String,
    pub node: String,
    pub container_id: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// The CNI result, cached for DEL as a runtime caches it.
    pub result: Value,
    /// The network configuration ADD ran with, for DEL.
    #[serde(default)]
    pub conflist: Value,
}

impl LabPod {
    pub fn ip(&self, v4: bool) -> IpAddr {
        *self
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == v4)
            .expect("the lab is dual stack")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub mode: String,
    #[serde(default = "one_segment")]
    pub segments: u8,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    pub next_node: u8,
    /// Whether the lab runs the cluster DNS (pods then resolve through it).
    #[serde(default)]
    pub dns: bool,
}

/// A lab, opened from its state directory.
pub struct Lab {
    pub state: LabState,
    dir: PathBuf,
}

/// Why an agent's status says it is not converged yet, if it does: every section that gates
/// readiness healthy, and a route set for `peers` other nodes.
pub fn agent_unconverged(status: &Value, peers: usize) -> Option<String> {
    let mut why = Vec::new();
    // The service section counts when the agent translates Services: a lab is up when a
    // Service created next works, not only when pods can be set up.
    let services_on = status["services"]["details"]["enabled"] == true;
    let sections = ["watches", "nodeNetworking", "cniConfig"]
        .into_iter()
        .chain(services_on.then_some("services"));
    for section in sections {
        let s = &status[section];
        if s["running"] != true || s["ready"] != true || !s["lastError"].is_null() {
            why.push(format!(
                "{section}: running={} ready={} error={}",
                s["running"], s["ready"], s["lastError"]
            ));
        }
    }
    let routed = status["nodeNetworking"]["details"]["peers"]
        .as_object()
        .map_or(0, |p| p.len());
    if routed != peers {
        why.push(format!("{routed} of {peers} peers routed"));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

impl Lab {
    /// The lab's state directory. Lab names are letters and digits only, so that neither a path
    /// (`/`, `..`) nor another lab's namespaces (`fl-<name>-` is a prefix) can be reached.
    pub fn dir_of(name: &str) -> Result<PathBuf> {
        let ok = (1..=16).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name.starts_with(|c: char| c.is_ascii_lowercase());
        if !ok {
            bail!("lab name {name:?}: use 1 to 16 lowercase letters and digits, starting with a letter");
        }
        Ok(Path::new(STATE_ROOT).join(name))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }

    /// Where `node`'s agent pins its maps: a directory of its own in the lab's bpffs.
    pub fn node_pin_path(&self, node: &str) -> PathBuf {
        lab_bpffs(&self.dir).join(node)
    }

    /// The cgroup `node`'s agent and the commands run on the node live in.
    pub fn node_cgroup(&self, node: &str) -> Result<PathBuf> {
        Ok(lab_cgroup(&self.state.name)?.join(node))
    }

    /// The cgroup `pod`'s processes live in: one of its own, under its node's.
    pub fn pod_cgroup(&self, pod: &LabPod) -> Result<PathBuf> {
        Ok(self.node_cgroup(&pod.node)?.join(format!("pod-{}", pod.name)))
    }

    /// The pid of `node`'s agent, while it runs.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        self.daemon_pid(&format!("agent-{node}"))
    }

    pub fn ns(&self, part: &str) -> Result<Netns> {
        let name = ns_name(&self.state.name, part);
        Netns::attach(&name).with_context(|| format!("namespace {name}"))
    }

    pub fn node_ns(&self, node: &str) -> Result<Netns> {
        self.ns(node)
    }

    pub fn pod_ns(&self, pod: &str) -> Result<Netns> {
        self.ns(&format!("pod-{pod}"))
    }

    /// The lab's API stand-in, through kube-rs.
    pub fn api(&self) -> Result<LabApi> {
        LabApi::new(self)
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_vec_pretty(&self.state)?;
        std::fs::write(self.dir.join("state.json"), text).context("saving lab state")
    }

    /// Opens a running lab.
    pub fn open(name: &str) -> Result<Self> {
        let dir = Self::dir_of(name)?;
        let state: LabState = serde_json::from_slice(
            &std::fs::read(dir.join("state.json")).with_context(|| format!("lab {name} is not up"))?,
        )?;
        Ok(Self { state, dir })
    }

    /// Removes everything of lab `name`, whatever state it was left in. Keeps going past
    /// failures and reports them all at the end.
    pub fn down(name: &str) -> Result<()> {
        let dir = Self::dir_of(name)?;
        // The controllers go first: they make pod namespaces, and one made after the list below
        // would be missed.
        if let Some(pid) = std::fs::read_to_string(dir.join("controllers.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            && std::fs::canonicalize(crate::target_dir().join("ferrynet-lab"))
                .is_ok_and(|ours| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == ours))
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            crate::wait_for(Duration::from_secs(5), || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                (stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'))).then_some(())
            });
        }
        let namespaces = lab_namespaces(name);
        // Every process living in one of the lab's namespaces: agents, the API stand-in, pod
        // servers, and anything a user started there.
        let inodes = lab_netns_inodes(name);
        let kill = |pid: i32| {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        };
        for _ in 0..2 {
            for entry in std::fs::read_dir("/proc")?.flatten() {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>()
                    && in_lab(pid, &inodes)
                {
                    kill(pid);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Processes whose namespace was already deleted are no longer found that way (a pod
        // torn down behind the lab's back, say): the lab's pid files name them. A recorded pid is
        // signalled only if it still runs one of the lab's own programs.
        let ours: Vec<PathBuf> = ["ferrynet-lab", "ferrynet-agent"]
            .iter()
            .filter_map(|b| std::fs::canonicalize(crate::target_dir().join(b)).ok())
            .collect();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "pid")
                && let Some(pid) = std::fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok())
                && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| ours.contains(&exe))
            {
                kill(pid);
            }
        }
        for ns in &namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let mut errors = Vec::new();
        // The lab's cgroups: whatever still runs in them goes, then the cgroups (a cgroup can be
        // removed only once its last process has been reaped).
        if let Ok(lab_cgroup) = lab_cgroup(name)
            && lab_cgroup.exists()
        {
            for pid in cgroup_pids(&lab_cgroup) {
                kill(pid);
            }
            if let Err(e) = remove_cgroup(&lab_cgroup) {
                errors.push(e.to_string());
            }
            // The parent goes too once no lab is left in it.
            let _ = std::fs::remove_dir(lab_cgroup.parent().expect("has a parent"));
        }
        let bpffs = lab_bpffs(&dir);
        if is_mount_point(&bpffs)
            && let Err(e) = unmount(&bpffs)
        {
            errors.push(format!("{e:#}"));
        }
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
        // The root goes too once no lab is left in it.
        let _ = std::fs::remove_dir(STATE_ROOT);
        if !errors.is_empty() {
            bail!("lab {name} is not entirely gone: {}", errors.join("; "));
        }
        Ok(())
    }

    /// Brings a lab up (cleaning up whatever an earlier one of the same name left).
    pub fn up(opts: &LabOptions) -> Result<Self> {
        Self::dir_of(&opts.name)?;
        if !(1..=MAX_NODE_INDEX).contains(&opts.nodes) {
            bail!("a lab has 1 to {MAX_NODE_INDEX} nodes");
        }
        if !matches!(opts.mode.as_str(), "native" | "vxlan" | "auto") {
            bail!("mode must be native, vxlan or auto");
        }
        if !(1..=8).contains(&opts.segments) {
            bail!("a lab has 1 to 8 underlay segments");
        }
        Self::down(&opts.name)?;
        let dir = Self::dir_of(&opts.name)?;
        // Another lab's `down` may remove the (empty) state root between our steps: retry.
        let create = || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join("logs"))
        };
        let mut created = create();
        for _ in 0..5 {
            if created.is_ok() {
                break;
            }
            created = create();
        }
        created.with_context(|| format!("creating {}", dir.display()))?;
        let bpffs = lab_bpffs(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&bpffs)?;
        if let Err(e) = mount_bpffs(&bpffs) {
            let _ = Self::down(&opts.name);
            return Err(e);
        }
        let mut lab = Self {
            state: LabState {
                name: opts.name.clone(),
                mode: opts.mode.clone(),
                segments: opts.segments,
                nodes: Vec::new(),
                pods: Vec::new(),
                next_node: 1,
                dns: opts.dns,
            },
            dir,
        };
        let result = (|| {
            let sw = Netns::create_named(&ns_name(&opts.name, "sw"))?;
            for segment in 0..opts.segments {
                let bridge = format!("br{segment}");
                sw.ip(&["link", "add", &bridge, "type", "bridge"]);
                if opts.segments > 1 {
                    sw.ip(&["addr", "add", &format!("10.200.{segment}.1/24"), "dev", &bridge]);
                    let v6 = format!("fd00:200:{segment:x}::1/64");
                    sw.ip(&["addr", "add", &v6, "dev", &bridge, "nodad"]);
                }
                sw.ip(&["link", "set", &bridge, "up"]);
            }
            if opts.segments > 1 {
                sw.sysctl("net.ipv4.ip_forward", "1");
                sw.sysctl("net.ipv6.conf.all.forwarding", "1");
            }
            lab.attach_to_switch("cp", "cp", 0, &["10.200.0.2/24", "fd00:200::2/64"])?;
            lab.attach_to_switch(
                "client",
                "client",
                0,
                &[&format!("{CLIENT_V4}/24"), &format!("{CLIENT_V6}/64")],
            )?;
            std::fs::write(
                lab.kubeconfig(),
                crate::apiserver::kubeconfig(API_ADDR.parse().expect("valid")),
            )?;
            lab.start_apiserver()?;
            lab.save()?;
            lab.start_controllers()?;
            for _ in 0..opts.nodes {
                lab.add_node()?;
            }
            lab.wait_converged(Duration::from_secs(60))?;
            if opts.dns {
                lab.start_dns(Duration::from_secs(30))?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = Self::down(&opts.name);
            return Err(e);
        }
        Ok(lab)
    }

    /// A namespace on underlay segment `segment` with `eth0` holding `addrs`, and routes to the
    /// other segments through the router.
    fn attach_to_switch(&self, part: &str, port: &str, segment: u8, addrs: &[&str]) -> Result<Netns> {
        let ns = Netns::create_named(&ns_name(&self.state.name, part))?;
        let sw = ns_name(&self.state.name, "sw");
        run_ip(
            &sw,
            &[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ],
        )?;
        run_ip(&sw, &["link", "set", port, "master", &format!("br{segment}")])?;
        run_ip(&sw, &["link", "set", port, "up"])?;
        for addr in addrs {
            let mut args = vec!["addr", "add", addr, "dev", "eth0"];
            if addr.contains(':') {
                args.push("nodad");
            }
            run_ip(&ns.name, &args)?;
        }
        // No duplicate address detection on the underlay: like the nodad addresses above, the
        // link-local address is usable at once, so that no neighbour discovery (and no ICMP
        // error a node sends) waits a second for it on a freshly made lab.
        ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0");
        run_ip(&ns.name, &["link", "set", "eth0", "up"])?;
        if self.state.segments > 1 {
            run_ip(
                &ns.name,
                &["route", "add", "10.200.0.0/16", "via", &format!("10.200.{segment}.1")],
            )?;
            let router = format!("fd00:200:{segment:x}::1");
            run_ip(&ns.name, &["route", "add", "fd00:200::/48", "via", &router])?;
        }
        Ok(ns)
    }

    pub fn start_apiserver(&self) -> Result<()> {
        let cp = self.ns("cp")?;
        let args = vec![
            "apiserver".into(),
            "--listen".into(),
            API_ADDR.into(),
            "--data".into(),
            self.dir.join("apiserver.json").display().to_string(),
        ];
        self.spawn_daemon(&cp, "apiserver", &binary("ferrynet-lab"), &args, None)?;
        let addr: SocketAddr = API_ADDR.parse().expect("valid");
        crate::wait_for(Duration::from_secs(10), || {
            ferrynet_kernel::netns::run_in(cp.fd(), || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            })
            .ok()
            .map(|_| ())
        })
        .context("the API stand-in did not come up")
    }

    pub fn stop_apiserver(&self) -> Result<()> {
        self.stop_daemon("apiserver").map(|_| ())
    }

    /// Starts the controllers daemon (see [`controllers`]) in the control-plane namespace.
    pub fn start_controllers(&self) -> Result<()> {
        let cp = self.ns("cp")?;
        let args = vec!["--name".into(), self.state.name.clone(), "controllers".into()];
        self.spawn_daemon(&cp, "controllers", &binary("ferrynet-lab"), &args, None)?;
        Ok(())
    }

    /// Creates the cluster DNS (its Service and its pod, which the scheduler and a kubelet run)
    /// and waits until it answers.
    pub fn start_dns(&self, timeout: Duration) -> Result<()> {
        let (service, pod) = (dns::dns_service(), dns::dns_pod());
        self.api()?.call(move |client| async move {
            use kube::api::PostParams;
            kube::Api::<Service>::namespaced(client.clone(), dns::DNS_NAMESPACE)
                .create(&PostParams::default(), &service)
                .await
                .context("creating the DNS Service")?;
            kube::Api::<Pod>::namespaced(client, dns::DNS_NAMESPACE)
                .create(&PostParams::default(), &pod)
                .await
                .context("creating the DNS pod")?;
            Ok(())
        })?;
        self.wait_pod_ready(dns::DNS_NAMESPACE, dns::DNS_NAME, timeout)
    }

    /// Waits until a pod is Ready, as its kubelet reports it.
    pub fn wait_pod_ready(&self, namespace: &str, name: &str, timeout: Duration) -> Result<()> {
        let mut last = String::from("not created");
        let (namespace, name) = (namespace.to_string(), name.to_string());
        let ok = crate::wait_for(timeout, || {
            let (namespace, name) = (namespace.clone(), name.clone());
            let pod = self
                .api()
                .ok()?
                .call(move |client| async move {
                    Ok(kube::Api::<Pod>::namespaced(client, &namespace).get_opt(&name).await?)
                })
                .ok()
                .flatten()?;
            let status = pod.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            last = serde_json::to_string(&status.container_statuses).unwrap_or_default();
            ready.then_some(())
        });
        ok.ok_or_else(|| anyhow!("pod {namespace}/{name} was not ready within {timeout:?}: {last}"))
    }

    /// The Node object of `node`, as a kubelet registers it.
    fn node_object(&self, node: &LabNode) -> Node {
        let [v4cidr, v6cidr] = node.pod_cidrs();
        Node {
            metadata: ObjectMeta {
                name: Some(node.name.clone()),
                labels: Some(
                    [
                        ("kubernetes.io/hostname".to_string(), node.name.clone()),
                        ("ferrynet.dev/lab".to_string(), self.state.name.clone()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(v4cidr.clone()),
                pod_cidrs: Some(vec![v4cidr, v6cidr]),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: node.v4().to_string(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: node.v6().to_string(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: node.name.clone(),
                    },
                ]),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    /// Adds a node: namespace on the switch, Node object, and its agent.
    pub fn add_node(&mut self) -> Result<String> {
        let index = self.state.next_node;
        let node = LabNode::at(index, self.state.segments)?;
        self.state.next_node = index.saturating_add(1);
        let ns = self.attach_to_switch(
            &node.name,
            &node.name,
            node.segment,
            &[&format!("{}/24", node.v4()), &format!("{}/64", node.v6())],
        )?;
        drop(ns);
        for sub in ["cni-bin", "cni-conf", "ipam", "agent"] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(self.node_dir(&node.name).join(sub))?;
        }
        let cgroup = self.node_cgroup(&node.name)?;
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        self.api()?.create(&self.node_object(&node))?;
        self.state.nodes.push(node.clone());
        self.save()?;
        self.start_agent(&node.name)?;
        Ok(node.name)
    }

    /// Removes a node: its Node object (so the other agents drop their routes), its pods and its
    /// namespace.
    pub fn delete_node(&mut self, name: &str) -> Result<()> {
        if !self.state.nodes.iter().any(|n| n.name == name) {
            bail!("no node {name}");
        }
        for pod in self
            .state
            .pods
            .iter()
            .filter(|p| p.node == name)
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
        {
            self.delete_pod(&pod)?;
        }
        self.stop_agent(name)?;
        // Once the Node is gone nothing is scheduled there any more, and the controllers collect
        // the pods users created there (their kubelet tears each down, CNI DEL included). Only
        // what they have not finished in time is torn down here, so the two never race.
        self.api()?.delete::<Node>(name)?;
        let node_records = |lab: &Self| lab.kubelet_records().into_iter().filter(|r| r.node == name).count();
        crate::wait_for(Duration::from_secs(30), || (node_records(self) == 0).then_some(()));
        for record in self.kubelet_records().into_iter().filter(|r| r.node == name) {
            self.kubelet_teardown(&record)?;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &ns_name(&self.state.name, name)])
            .output();
        let _ = Command::new("ip")
            .args(["-n", &ns_name(&self.state.name, "sw"), "link", "del", name])
            .output();
        // Its cgroup (empty once its agent is gone) and its pins.
        remove_cgroup(&self.node_cgroup(name)?)?;
        let pins = self.node_pin_path(name);
        if pins.exists() {
            std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
        }
        self.state.nodes.retain(|n| n.name != name);
        self.save()
    }

    /// The flags a node's agent runs with (its own dirs, the lab's kubeconfig), before the
    /// subcommand.
    pub fn agent_args(&self, node: &str) -> Vec<String> {
        let dir = self.node_dir(node);
        let arg = |p: &str| dir.join(p).display().to_string();
        vec![
            "--node-name".into(),
            node.into(),
            "--kubeconfig".into(),
            self.kubeconfig().display().to_string(),
            "--cni-bin-dir".into(),
            arg("cni-bin"),
            "--cni-conf-dir".into(),
            arg("cni-conf"),
            "--cni-source-dir".into(),
            cni_bin_dir().display().to_string(),
            "--ipam-data-dir".into(),
            arg("ipam"),
            "--state-dir".into(),
            arg("agent"),
            "--routing-mode".into(),
            self.state.mode.clone(),
            "--bpf-pin-path".into(),
            self.node_pin_path(node).display().to_string(),
            "--cgroup-path".into(),
            self.node_cgroup(node)
                .map(|c| c.display().to_string())
                .unwrap_or_default(),
            "--resync-seconds".into(),
            "5".into(),
            "--ipam-gc-seconds".into(),
            "2".into(),
            "--ipam-gc-grace-seconds".into(),
            "3".into(),
        ]
    }

    pub fn start_agent(&self, node: &str) -> Result<()> {
        self.start_agent_with(node, &[])
    }

    /// Starts `node`'s agent with `extra` flags after the lab's own (replacing any the lab sets).
    pub fn start_agent_with(&self, node: &str, extra: &[&str]) -> Result<()> {
        let ns = self.node_ns(node)?;
        // The lab's flags come in pairs; a flag in `extra` replaces the lab's.
        let mut args = Vec::new();
        for pair in self.agent_args(node).chunks(2) {
            if !extra.contains(&pair[0].as_str()) {
                args.extend_from_slice(pair);
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push("run".into());
        let cgroup = self.node_cgroup(node)?;
        self.spawn_daemon(
            &ns,
            &format!("agent-{node}"),
            &binary("ferrynet-agent"),
            &args,
            Some(&cgroup),
        )?;
        Ok(())
    }

    /// The addresses `node`'s IPAM store holds for pods (its network is `ferrynet`), read as
    /// the IPAM itself reads them: what CNI DEL must give back.
    pub fn node_ipam_addresses(&self, node: &str) -> Result<Vec<IpAddr>> {
        let store = ferrynet_ipam::Store::open(&self.node_dir(node).join("ipam"), "ferrynet")?;
        let attachments = store.lock()?.attachments()?;
        Ok(attachments
            .into_iter()
            .flat_map(|a| a.ips)
            .map(|net| net.addr())
            .collect())
    }

    /// Takes the CNI configuration away from `node`'s runtime while its agent (and with it the
    /// service proxy) keeps running: the agent is restarted writing its conflist to a directory
    /// the runtime does not read, and the runtime's copy is removed, as on a node where the CNI
    /// was never installed. [`Lab::restore_cni_config`] undoes it.
    pub fn hide_cni_config(&self, node: &str) -> Result<()> {
        let elsewhere = self.node_dir(node).join("cni-conf-unused");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&elsewhere)?;
        self.stop_agent(node)?;
        let conflist = self.node_dir(node).join("cni-conf").join(CONFLIST);
        if let Err(e) = std::fs::remove_file(&conflist)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(e).with_context(|| format!("removing {}", conflist.display()));
        }
        self.start_agent_with(node, &["--cni-conf-dir", &elsewhere.display().to_string()])?;
        self.wait_converged(Duration::from_secs(60))
    }

    /// Restarts `node`'s agent as the lab runs it, which installs the CNI configuration again.
    pub fn restore_cni_config(&self, node: &str) -> Result<()> {
        self.stop_agent(node)?;
        self.start_agent(node)?;
        self.wait_converged(Duration::from_secs(60))
    }

    /// Stops `node`'s agent with SIGTERM, as the kubelet does, and fails unless it shut down
    /// cleanly: on its own within 5 s and, where the lab started it, with exit status 0.
    pub fn stop_agent(&self, node: &str) -> Result<()> {
        match self.stop_daemon(&format!("agent-{node}"))? {
            DaemonExit::NotRunning | DaemonExit::Exited(None) => Ok(()),
            DaemonExit::Exited(Some(status)) if status.success() => Ok(()),
            DaemonExit::Exited(Some(status)) => bail!("the agent on {node} ended with {status} on SIGTERM"),
            DaemonExit::Killed => bail!("the agent on {node} ignored SIGTERM for 5 s and was killed"),
        }
    }

    /// The agent's last status on `node` (its status file).
    pub fn agent_status(&self, node: &str) -> Result<Value> {
        let path = self.node_dir(node).join("agent").join("agent-status.json");
        Ok(serde_json::from_slice(&std::fs::read(&path).with_context(|| {
            format!("{} (agent not synced yet?)", path.display())
        })?)?)
    }

    /// Waits until every agent has converged: every section that gates readiness healthy (and the
    /// service section when the agent translates Services), and a
    /// route set for every peer.
    pub fn wait_converged(&self, timeout: Duration) -> Result<()> {
        let peers = self.state.nodes.len().saturating_sub(1);
        let mut last = String::new();
        let ok = crate::wait_for(timeout, || {
            for node in &self.state.nodes {
                match self.agent_status(&node.name) {
                    // Right after a restart, the file is still the stopped agent's.
                    Ok(s) if s["pid"].as_u64() != self.agent_pid(&node.name).map(u64::from) => {
                        last = format!("{}: the status is an earlier agent process's", node.name);
                        return None;
                    }
                    Ok(s) => {
                        if let Some(why) = agent_unconverged(&s, peers) {
                            last = format!("{}: {why}", node.name);
                            return None;
                        }
                    }
                    Err(e) => {
                        last = format!("{e:#}");
                        return None;
                    }
                }
            }
            Some(())
        });
        ok.ok_or_else(|| anyhow!("the agents did not converge within {timeout:?}: {last}"))
    }

    /// The Pod object of a lab pod, as the scheduler and kubelet leave it: bound to its node,
    /// running, ready, with its addresses.
    fn pod_object(&self, pod: &LabPod) -> Pod {
        let host_ip = self
            .state
            .nodes
            .iter()
            .find(|n| n.name == pod.node)
            .map(|n| n.v4().to_string());
        Pod {
            metadata: ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(api::NAMESPACE.into()),
                labels: Some(pod.labels.clone()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(pod.node.clone()),
                containers: vec![Container {
                    name: "server".into(),
                    image: Some("ferrynet-lab/pod-server".into()),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: i32::from(POD_PORT),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                host_ip,
                pod_ip: pod.ips.first().map(ToString::to_string),
                pod_ips: Some(pod.ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                container_statuses: Some(vec![ContainerStatus {
                    name: "server".into(),
                    image: "ferrynet-lab/pod-server".into(),
                    image_id: String::new(),
                    ready: true,
                    started: Some(true),
                    restart_count: 0,
                    state: Some(ContainerState {
                        running: Some(Default::default()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    /// Runs a pod on `node`: a namespace, the node's CNI (as a runtime would run it), a server
    /// answering with the pod's name, and the Pod object.
    pub fn run_pod(&mut self, name: &str, node: &str, labels: &BTreeMap<String, String>) -> Result<LabPod> {
        if !valid_name(name) {
            bail!("pod name {name:?}: use up to 20 lowercase letters, digits and dashes");
        }
        if self.state.pods.iter().any(|p| p.name == name) {
            bail!("pod {name} exists");
        }
        // As a runtime, wait for the node's network to be configured (its agent writes it).
        let conflist_path = self.node_dir(node).join("cni-conf").join(CONFLIST);
        crate::wait_for(Duration::from_secs(30), || {
            std::fs::read(&conflist_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        })
        .with_context(|| format!("node {node} has no conflist (is its agent running?)"))?;
        let container_id = format!("{}-{name}", self.state.name);
        let (conflist, result, ips) = self
            .sandbox_add(node, &format!("pod-{name}"), &container_id, api::NAMESPACE, name)
            .with_context(|| format!("pod {name}"))?;
        let pod_ns = self.pod_ns(name)?;
        let pod = LabPod {
            name: name.into(),
            node: node.into(),
            container_id,
            ips,
            labels: labels.clone(),
            result,
            conflist,
        };
        // The pod's processes live in a cgroup of its own under its node's, as kubelet puts
        // pods under the root of the node's hierarchy.
        let cgroup = self.pod_cgroup(&pod)?;
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let mut args = vec![
            "pod-server".into(),
            "--name".into(),
            name.into(),
            "--node".into(),
            node.into(),
            "--port".into(),
            POD_PORT.to_string(),
        ];
        for ip in &pod.ips {
            args.push("--ip".into());
            args.push(ip.to_string());
        }
        self.spawn_daemon(
            &pod_ns,
            &format!("pod-{name}"),
            &binary("ferrynet-lab"),
            &args,
            Some(&cgroup),
        )?;
        self.api()?.create(&self.pod_object(&pod))?;
        self.state.pods.push(pod.clone());
        self.save()?;
        // Wait until the server answers, so that callers can use the pod at once.
        let pod_handle = self.pod_ns(name)?;
        let local: SocketAddr = (pod.ip(true), POD_PORT).into();
        crate::wait_for(Duration::from_secs(10), || {
            crate::tcp::request(&pod_handle, local, "ready?").ok()
        })
        .with_context(|| format!("pod {name}'s server did not start"))?;
        self.sync_endpoint_slices()?;
        Ok(pod)
    }

    pub fn delete_pod(&mut self, name: &str) -> Result<()> {
        let pod = self
            .state
            .pods
            .iter()
            .find(|p| p.name == name)
            .cloned()
            .ok_or_else(|| anyhow!("no pod {name}"))?;
        self.stop_daemon(&format!("pod-{name}"))?;
        // A pod recorded by an older lab has no configuration of its own: the node's current one.
        let conflist = if pod.conflist.is_null() {
            serde_json::from_slice(&std::fs::read(
                self.node_dir(&pod.node).join("cni-conf").join(CONFLIST),
            )?)?
        } else {
            pod.conflist.clone()
        };
        self.sandbox_del(
            &pod.node,
            &format!("pod-{name}"),
            &pod.container_id,
            &conflist,
            &pod.result,
        )
        .with_context(|| format!("pod {name}"))?;
        let _ = remove_cgroup(&self.pod_cgroup(&pod)?);
        self.api()?.delete::<Pod>(name)?;
        self.state.pods.retain(|p| p.name != name);
        self.save()?;
        self.sync_endpoint_slices()
    }

    pub fn pod(&self, name: &str) -> Result<&LabPod> {
        self.state
            .pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("no pod {name}"))
    }

    /// A TCP request from a pod's namespace.
    pub fn request_from_pod(&self, pod: &str, to: SocketAddr) -> Result<String> {
        Ok(crate::tcp::request(&self.pod_ns(pod)?, to, "hello")?)
    }

    /// Creates a Service (ClusterIP, dual stack, TCP) selecting pods by labels; the API
    /// stand-in allocates its ClusterIPs, as the real API server does.
    pub fn create_service(
        &mut self,
        name: &str,
        selector: &BTreeMap<String, String>,
        ports: &[ServicePort],
        kind: &str,
    ) -> Result<Service> {
        let mut service = service_object(name, selector, ports);
        service.spec.as_mut().expect("has a spec").type_ = Some(kind.into());
        self.create_service_object(&service)
    }

    /// Creates any Service, and writes its EndpointSlices.
    pub fn create_service_object(&mut self, service: &Service) -> Result<Service> {
        let created = self.api()?.create(service)?;
        self.sync_endpoint_slices()?;
        Ok(created)
    }

    /// Plays the cloud's load balancer controller: `service`'s status gets `ips` as its load
    /// balancer's ingress, and the external client routes each of them to `nodes`, one route
    /// through several nodes being ECMP, spread by the flows' ports.
    pub fn expose_load_balancer(&self, service: &str, ips: &[IpAddr], nodes: &[&str]) -> Result<()> {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let api = self.api()?;
        let mut svc: Service = api.get(service)?.ok_or_else(|| anyhow!("no service {service}"))?;
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    ips.iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some(ip.to_string()),
                            ip_mode: Some("VIP".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        });
        api.replace_status(&svc)?;
        self.route_from_client(ips, nodes)
    }

    /// Routes `ips` from the external client's namespace to `nodes` (several: ECMP, spread by
    /// the flows' ports), as the network in front of a cluster routes load balancer IPs and
    /// externalIPs.
    pub fn route_from_client(&self, ips: &[IpAddr], nodes: &[&str]) -> Result<()> {
        let client = self.ns("client")?;
        for ip in ips {
            let mut gateways = Vec::new();
            for name in nodes {
                let node = self
                    .state
                    .nodes
                    .iter()
                    .find(|n| n.name == *name)
                    .ok_or_else(|| anyhow!("no node {name}"))?;
                if node.segment != 0 {
                    bail!("node {name} is not on the external client's segment");
                }
                gateways.push(if ip.is_ipv4() {
                    node.v4().to_string()
                } else {
                    node.v6().to_string()
                });
            }
            let (family, prefix, hash) = if ip.is_ipv4() {
                ("-4", 32, "net.ipv4.fib_multipath_hash_policy")
            } else {
                ("-6", 128, "net.ipv6.fib_multipath_hash_policy")
            };
            // Hash on ports too, so that one client's flows spread over the nodes.
            client.sysctl(hash, "1");
            let dst = format!("{ip}/{prefix}");
            let mut args = vec![family, "route", "replace", dst.as_str()];
            match gateways.as_slice() {
                [] => bail!("no node to route {ip} to"),
                [one] => args.extend(["via", one.as_str()]),
                many => {
                    for gateway in many {
                        args.extend(["nexthop", "via", gateway.as_str()]);
                    }
                }
            }
            let out = client.exec("ip", &args);
            if !out.status.success() {
                bail!("routing {ip}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }

    /// A Service's ClusterIP of one family.
    pub fn cluster_ip(&self, service: &str, v4: bool) -> Result<IpAddr> {
        let svc: Service = self
            .api()?
            .get(service)?
            .ok_or_else(|| anyhow!("no service {service}"))?;
        svc.spec
            .and_then(|s| s.cluster_ips)
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .find(|ip| ip.is_ipv4() == v4)
            .ok_or_else(|| anyhow!("service {service} has no ClusterIP of that family"))
    }

    /// Makes a pod ready or not (its Ready condition, as its kubelet reports it), and updates the
    /// EndpointSlices.
    pub fn set_pod_ready(&self, name: &str, ready: bool) -> Result<()> {
        let api = self.api()?;
        let mut pod: Pod = api.get(name)?.ok_or_else(|| anyhow!("no pod {name}"))?;
        if let Some(conditions) = pod.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            for c in conditions.iter_mut().filter(|c| c.type_ == "Ready") {
                c.status = if ready { "True" } else { "False" }.into();
            }
        }
        for container in pod
            .status
            .iter_mut()
            .flat_map(|s| s.container_statuses.iter_mut().flatten())
        {
            container.ready = ready;
        }
        api.replace_status(&pod)?;
        self.sync_endpoint_slices()
    }

    /// Starts a pod's graceful deletion, as `kubectl delete pod` does: it is terminating (still
    /// serving, no longer ready) until [`Lab::delete_pod`] finishes it.
    pub fn terminate_pod(&self, name: &str) -> Result<()> {
        self.api()?.delete_with_grace::<Pod>(name, 30)?;
        self.sync_endpoint_slices()
    }

    pub fn delete_service(&mut self, name: &str) -> Result<()> {
        self.api()?.delete::<Service>(name)?;
        self.sync_endpoint_slices()
    }

    /// Runs a command in one of the lab's namespaces, inheriting stdio.
    pub fn exec(&self, part: &str, argv: &[String]) -> Result<std::process::ExitStatus> {
        let ns = self.ns(part)?;
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("no command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).env("KUBECONFIG", self.kubeconfig());
        self.join_part_cgroup(&mut cmd, part)?;
        let mut child = ferrynet_kernel::netns::run_in(ns.fd(), || cmd.spawn())
            .with_context(|| format!("running {program} in {part}"))?;
        Ok(child.wait()?)
    }

    /// A command run on a node runs in the node's cgroup, and one run in a pod in the pod's, as
    /// their own processes do, seeing the pod's resolver configuration (the cluster DNS) as
    /// its `/etc/resolv.conf`.
    fn join_part_cgroup(&self, cmd: &mut Command, part: &str) -> Result<()> {
        if self.state.nodes.iter().any(|n| n.name == part) {
            join_cgroup(cmd, &self.node_cgroup(part)?)?;
        } else if let Some(pod) = part
            .strip_prefix("pod-")
            .and_then(|name| self.state.pods.iter().find(|p| p.name == name))
        {
            if self.state.dns {
                kernel_fs::with_resolv_conf(cmd, &self.resolv_conf_path(api::NAMESPACE)?)?;
            }
            join_cgroup(cmd, &self.pod_cgroup(pod)?)?;
        } else if let Some(record) = self.kubelet_pod(part) {
            if self.state.dns {
                kernel_fs::with_resolv_conf(cmd, &self.resolv_conf_path(&record.namespace)?)?;
            }
            join_cgroup(cmd, &self.pod_part_cgroup(&record.node, part)?)?;
        }
        Ok(())
    }

    /// Runs a command in one of the lab's namespaces (and its cgroup) to its end, and returns
    /// how it ended and what it printed.
    pub fn exec_output(&self, part: &str, argv: &[String]) -> Result<std::process::Output> {
        let ns = self.ns(part)?;
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("no command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).env("KUBECONFIG", self.kubeconfig());
        self.join_part_cgroup(&mut cmd, part)?;
        ferrynet_kernel::netns::run_in(ns.fd(), || cmd.output()).with_context(|| format!("running {program} in {part}"))
    }

    /// Runs a command in one of the lab's namespaces and returns what it printed.
    pub fn exec_capture(&self, part: &str, argv: &[String]) -> Result<String> {
        let out = self.exec_output(part, argv)?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// One request from inside `part` (a node, or `pod-<name>`), as a process of its own in that
    /// namespace and cgroup: socket LB sees it as it sees the part's own processes. Returns the
    /// answer (with `peer=<address the socket says it talks to>`), or the error.
    pub fn probe(&self, part: &str, to: SocketAddr, udp: bool) -> Result<String> {
        let ns = self.ns(part)?;
        let mut cmd = Command::new(binary("ferrynet-lab"));
        cmd.args(["probe", "request", &to.to_string(), "--timeout-seconds", "2"]);
        if udp {
            cmd.arg("--udp");
        }
        self.join_part_cgroup(&mut cmd, part)?;
        let out = ns.command_output(&mut cmd);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
        }
    }

    /// One TCP request from each source port of `ports` from `part` (the same flows each call:
    /// every connection is reset at its end, so its tuple is free again at once): the pod that
    /// answered each, by source port. Any failed request fails the call.
    pub fn flows(
        &self,
        part: &str,
        to: SocketAddr,
        ports: std::ops::RangeInclusive<u16>,
    ) -> Result<BTreeMap<u16, String>> {
        let ns = self.ns(part)?;
        let mut cmd = Command::new(binary("ferrynet-lab"));
        cmd.args([
            "probe",
            "flows",
            &to.to_string(),
            "--source-ports",
            &format!("{}-{}", ports.start(), ports.end()),
        ]);
        self.join_part_cgroup(&mut cmd, part)?;
        let out = ns.command_output(&mut cmd);
        if !out.status.success() {
            bail!("flows to {to}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let mut answered = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let (port, answer) = line.split_once(' ').ok_or_else(|| anyhow!("flows: {line:?}"))?;
            let pod = answer
                .split_whitespace()
                .find_map(|w| w.strip_prefix("pod="))
                .ok_or_else(|| anyhow!("flow from port {port} to {to}: {answer}"))?;
            answered.insert(port.parse()?, pod.to_string());
        }
        Ok(answered)
    }

    /// Starts `argv` in the background inside `part` (its namespace and cgroup), as daemon
    /// `what` (stopped by [`Lab::stop`], killed by `down`).
    pub fn spawn_in(&self, part: &str, what: &str, argv: &[String]) -> Result<u32> {
        let ns = self.ns(part)?;
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("no command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.join_part_cgroup(&mut cmd, part)?;
        self.spawn_command(&ns, what, cmd)
    }

    /// Stops a daemon started by [`Lab::spawn_in`] (SIGTERM, then SIGKILL).
    pub fn stop(&self, what: &str) -> Result<()> {
        self.stop_daemon(what).map(|_| ())
    }

    /// Holds the thread named `thread` of `node`'s agent stopped ([`Self::pause_daemon_thread`]).
    pub fn pause_agent_thread(&self, node: &str, thread: &str) -> Result<PausedThread> {
        self.pause_daemon_thread(&format!("agent-{node}"), thread)
    }

    /// Kills `node`'s agent at once (SIGKILL), as a crash or an OOM kill would.
    pub fn kill_agent(&self, node: &str) -> Result<()> {
        self.kill_daemon(&format!("agent-{node}"))
    }

    /// Every sign of kube-proxy in the lab, each as "where: what": a kube-proxy process anywhere
    /// on the machine, and, in each node's namespace, the rules kube-proxy writes in any of its
    /// modes (nftables: its `kube-proxy` table; iptables, nft or legacy backend: the
    /// `KUBE-SERVICES` chain). The rules are what translate; a process name alone would say
    /// nothing about a proxy started under another name, or one that left its rules behind.
    pub fn kube_proxy_traces(&self) -> Result<Vec<String>> {
        let mut traces = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|comm| comm.trim() == "kube-proxy") {
                traces.push(format!(
                    "this machine: kube-proxy process {}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        let run = |node: &str, argv: &[&str]| -> Result<String> {
            let out = self.exec_output(node, &argv.iter().map(|a| a.to_string()).collect::<Vec<_>>())?;
            if !out.status.success() {
                bail!("{} in {node}: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        for node in &self.state.nodes {
            let node = node.name.as_str();
            // Tables of the nft backend, iptables-nft's among them.
            let ruleset = run(node, &["nft", "list", "ruleset"])?;
            if ruleset
                .lines()
                .any(|l| l.starts_with("table") && l.contains(" kube-proxy "))
            {
                traces.push(format!("{node}: nftables table kube-proxy"));
            }
            if ruleset.contains("KUBE-SERVICES") {
                traces.push(format!("{node}: iptables-nft chain KUBE-SERVICES"));
            }
            // Legacy iptables: read only if the namespace has a legacy nat table, since reading
            // one makes it (and hooks it into the node's packet path).
            for (names, save) in [
                ("/proc/net/ip_tables_names", "iptables-legacy-save"),
                ("/proc/net/ip6_tables_names", "ip6tables-legacy-save"),
            ] {
                if run(node, &["cat", names]).is_ok_and(|tables| tables.lines().any(|t| t == "nat"))
                    && run(node, &[save, "-t", "nat"])?.contains(":KUBE-SERVICES")
                {
                    traces.push(format!("{node}: {save} chain KUBE-SERVICES"));
                }
            }
        }
        Ok(traces)
    }

    /// kubectl against the lab's API stand-in (run from the client namespace).
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let ns = self.ns("client")?;
        let home = self.dir.join("kubectl-home");
        std::fs::create_dir_all(&home)?;
        let out = ns.command_output(
            Command::new("kubectl")
                .env("HOME", &home)
                .env("KUBECONFIG", self.kubeconfig())
                .args(args),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("kubectl {}: {text}", args.join(" "));
        }
        Ok(text)
    }

    /// A human summary of the lab.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "lab {} (routing {}, {} underlay segment{}), API stand-in at http://{API_ADDR}, kubeconfig {}\n",
            self.state.name,
            self.state.mode,
            self.state.segments,
            if self.state.segments == 1 { "" } else { "s" },
            self.kubeconfig().display()
        );
        let peers = self.state.nodes.len().saturating_sub(1);
        for node in &self.state.nodes {
            let agent = match self.agent_status(&node.name) {
                Ok(st) => match agent_unconverged(&st, peers) {
                    None => format!("ready, {peers} peers routed"),
                    Some(why) => format!("NOT ready: {why}"),
                },
                Err(e) => format!("no status: {e:#}"),
            };
            out += &format!(
                "  node {:<4} segment {} {:<15} podCIDRs {} | agent: {agent}\n",
                node.name,
                node.segment,
                node.v4().to_string(),
                node.pod_cidrs().join(", "),
            );
        }
        for pod in &self.state.pods {
            let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
            let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out += &format!(
                "  pod  {:<12} on {:<4} {} {}\n",
                pod.name,
                pod.node,
                ips.join(", "),
                labels.join(",")
            );
        }
        out
    }
}

/// A ClusterIP Service (dual stack, TCP) selecting pods by labels; ports are named `p<port>`.
pub fn service_object(name: &str, selector: &BTreeMap<String, String>, ports: &[ServicePort]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(api::NAMESPACE.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector.clone()),
            ports: Some(
                ports
                    .iter()
                    .map(|p| K8sServicePort {
                        name: Some(format!("p{}", p.port)),
                        port: i32::from(p.port),
                        target_port: Some(IntOrString::Int(i32::from(p.target_port))),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
            ip_family_policy: Some("RequireDualStack".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_indexes_past_the_address_plan_are_refused() {
        let last = LabNode::at(MAX_NODE_INDEX, 3).unwrap();
        assert_eq!(last.v4(), Ipv4Addr::new(10, 200, 1, 210));
        assert_eq!(last.pod_cidrs()[0], "10.244.200.0/24");
        for index in [0, MAX_NODE_INDEX + 1, 246, 255] {
            assert!(LabNode::at(index, 1).is_err(), "{index}");
        }
    }
}
