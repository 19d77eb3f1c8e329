//! What the agent reports about itself: one section per controller, held in one shared value
//! that controllers update and one writer task persists to a file in the state directory
//! whenever it changes. `ferrynet-agent status` reads the file (and `status --ready` is the
//! readiness probe). A file, not a port: the agent listens on nothing for this.
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    node::{routing::Uplink, topology::LocalVtep, topology::PeerRoute, topology::RoutingMode},
    warning::Warning,
};

/// How one controller (or watch) is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Section<T> {
    /// Its task is running (the supervisor restarts it with backoff when it ends or panics).
    pub running: bool,
    /// How often the supervisor restarted it.
    pub restarts: u32,
    /// The controller's own judgement: it has done what the node needs from it.
    pub ready: bool,
    /// The last pass's error, if it failed.
    pub last_error: Option<String>,
    /// When the last pass changed something in the kernel or on disk (unix seconds).
    pub last_change_unix: Option<u64>,
    pub warnings: Vec<Warning>,
    pub details: T,
}

impl<T> Section<T> {
    /// Running, ready and without an error.
    pub fn healthy(&self) -> bool {
        self.running && self.ready && self.last_error.is_none()
    }
}

/// The Kubernetes watches: each reflector's initial list arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchDetails {
    pub kinds: Vec<String>,
}

/// Node networking: routes to peers, VXLAN, the firewall table, IP forwarding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkingDetails {
    pub mode: Option<RoutingMode>,
    pub pod_cidrs: Vec<IpNet>,
    pub uplink: Option<Uplink>,
    /// Routes to other nodes' pods, by node.
    pub peers: std::collections::BTreeMap<String, Vec<PeerRoute>>,
    pub vxlan: Option<LocalVtep>,
    /// The cluster CIDRs masqueraded on egress, when masquerade is on.
    pub masquerade: Option<Vec<IpNet>>,
    /// Claims refused because another node held what they claim (see `topology::Dispute`).
    /// With `peers`, what the next pass decides conflicts by, also after a restart.
    #[serde(default)]
    pub disputes: Vec<crate::node::topology::Dispute>,
    /// Changes the last pass that changed anything made, by kind.
    pub last_changes: NodeNetworkingCounts,
}

/// How many kernel objects one node networking pass changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkingCounts {
    pub routes: usize,
    pub vxlan_device: usize,
    pub vxlan_entries: usize,
    pub firewall: usize,
    pub sysctls: usize,
}

impl NodeNetworkingCounts {
    pub fn total(&self) -> usize {
        self.routes + self.vxlan_device + self.vxlan_entries + self.firewall + self.sysctls
    }
}

/// The CNI configuration: binaries and conflist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniConfigDetails {
    pub conflist: PathBuf,
    pub pod_cidrs: Vec<IpNet>,
    pub pod_mtu: Option<u32>,
}

/// The agent's IPAM garbage collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamGcDetails {
    /// Attachments released by the last collection that released any.
    pub last_released: Vec<String>,
}

/// Service translation (the kube-proxy replacement).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicesDetails {
    /// Whether the agent translates Services (`--service-proxy`).
    pub enabled: bool,
    /// The datapath's bpffs pin directory, once it is usable.
    pub bpf_pin_path: Option<PathBuf>,
    /// The cgroup v2 directory the socket programs attach to, once checked.
    pub cgroup_path: Option<PathBuf>,
    pub socket_lb: bool,
    pub host_netns_only: bool,
    pub per_packet: bool,
    /// The Service CIDRs unheld addresses are refused in, once known (`--service-cidrs`, or
    /// the API's ServiceCIDR objects); empty with `--service-cidrs none`.
    #[serde(default)]
    pub service_cidrs: Option<Vec<IpNet>>,
    /// The API's Service CIDRs left out for holding a node's InternalIP or PodCIDR, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_cidrs_left_out: Vec<String>,
    /// Services, frontends and backends in the datapath.
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
}

/// Everything the agent reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    /// The agent process, so that the readiness probe can tell a live agent's status from a
    /// dead one's: the pid and its start time (clock ticks since boot, from `/proc/<pid>/stat`).
    pub pid: u32,
    pub process_start: u64,
    pub watches: Section<WatchDetails>,
    pub node_networking: Section<NodeNetworkingDetails>,
    pub cni_config: Section<CniConfigDetails>,
    pub ipam_gc: Section<IpamGcDetails>,
    pub services: Section<ServicesDetails>,
}

/// The sections, by the name the supervisor knows them by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionName {
    Watches,
    NodeNetworking,
    CniConfig,
    IpamGc,
    Services,
}

impl SectionName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Watches => "watches",
            Self::NodeNetworking => "node-networking",
            Self::CniConfig => "cni-config",
            Self::IpamGc => "ipam-gc",
            Self::Services => "services",
        }
    }

    /// Whether the node is ready for pods only when this section is healthy.
    pub fn gates_readiness(self, status: &AgentStatus) -> bool {
        match self {
            Self::Watches | Self::NodeNetworking | Self::CniConfig => true,
            Self::IpamGc => false,
            Self::Services => status.services.details.enabled,
        }
    }

    pub const ALL: [SectionName; 5] = [
        Self::Watches,
        Self::NodeNetworking,
        Self::CniConfig,
        Self::IpamGc,
        Self::Services,
    ];
}

impl AgentStatus {
    /// The supervisor's view of one section: running, restarts and last error.
    pub fn supervision_mut(&mut self, name: SectionName) -> (&mut bool, &mut u32, &mut Option<String>) {
        macro_rules! parts {
            ($s:expr) => {
                (&mut $s.running, &mut $s.restarts, &mut $s.last_error)
            };
        }
        match name {
            SectionName::Watches => parts!(self.watches),
            SectionName::NodeNetworking => parts!(self.node_networking),
            SectionName::CniConfig => parts!(self.cni_config),
            SectionName::IpamGc => parts!(self.ipam_gc),
            SectionName::Services => parts!(self.services),
        }
    }

    fn healthy(&self, name: SectionName) -> bool {
        match name {
            SectionName::Watches => self.watches.healthy(),
            SectionName::NodeNetworking => self.node_networking.healthy(),
            SectionName::CniConfig => self.cni_config.healthy(),
            SectionName::IpamGc => self.ipam_gc.healthy(),
            SectionName::Services => self.services.healthy(),
        }
    }

    /// The sections that keep the node from being ready, with why.
    pub fn not_ready(&self) -> Vec<&'static str> {
        SectionName::ALL
            .into_iter()
            .filter(|n| n.gates_readiness(self) && !self.healthy(*n))
            .map(SectionName::as_str)
            .collect()
    }

    /// Ready: every gating section is healthy, and the agent that wrote this is still alive.
    pub fn ready(&self) -> bool {
        self.not_ready().is_empty() && process_alive(self.pid, self.process_start)
    }
}

/// The shared status: controllers update it, one writer persists it.
#[derive(Clone)]
pub struct StatusHandle {
    tx: watch::Sender<AgentStatus>,
}

impl StatusHandle {
    pub fn new(node: &str) -> Self {
        let pid = std::process::id();
        let status = AgentStatus {
            node: node.to_string(),
            pid,
            process_start: process_start(pid).unwrap_or_default(),
            ..Default::default()
        };
        Self {
            tx: watch::Sender::new(status),
        }
    }

    /// Changes the status; the writer persists it only if this changed something.
    pub fn update(&self, change: impl FnOnce(&mut AgentStatus)) {
        self.tx.send_if_modified(|status| {
            let before = status.clone();
            change(status);
            *status != before
        });
    }

    pub fn snapshot(&self) -> AgentStatus {
        self.tx.borrow().clone()
    }

    /// Writes the status to `state_dir` now and after every change, until the handle's last
    /// sender is gone. Changes that come in a burst are written once.
    pub async fn write_changes(self, state_dir: PathBuf) {
        let mut rx = self.tx.subscribe();
        drop(self);
        loop {
            let status = rx.borrow_and_update().clone();
            if let Err(e) = write(&state_dir, &status) {
                tracing::warn!("writing status: {e}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A process's start time, in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: count from after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn process_alive(pid: u32, start: u64) -> bool {
    pid != 0 && process_start(pid) == Some(start)
}

/// Why the status could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("reading {path} (is the agent running?): {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-status.json")
}

pub fn write(state_dir: &Path, status: &AgentStatus) -> Result<(), StatusError> {
    let mut text = serde_json::to_vec_pretty(status).expect("status serialises");
    text.push(b'\n');
    let p = path(state_dir);
    crate::cni_config::write_if_changed(&p, &text, 0o644)
        .map(|_| ())
        .map_err(|source| StatusError::Write { path: p, source })
}

pub fn read(state_dir: &Path) -> Result<AgentStatus, StatusError> {
    let p = path(state_dir);
    let bytes = std::fs::read(&p).map_err(|source| StatusError::Read {
        path: p.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| StatusError::Parse { path: p, source })
}

/// Human-readable summary.
pub fn render(s: &AgentStatus) -> String {
    let mut out = String::new();
    let list = |nets: &[IpNet]| {
        if nets.is_empty() {
            "(none yet)".to_string()
        } else {
            nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        }
    };
    let health = |running: bool, ready: bool, error: &Option<String>| match (running, ready, error) {
        (false, _, _) => "DOWN (restarting)".to_string(),
        (_, _, Some(e)) => format!("FAILING: {e}"),
        (_, false, _) => "not ready".to_string(),
        _ => "ok".to_string(),
    };
    out += &format!("node:       {}\n", s.node);
    out += &format!(
        "ready:      {}\n",
        if s.ready() {
            "yes".to_string()
        } else {
            let mut why = s.not_ready();
            if !process_alive(s.pid, s.process_start) {
                why.insert(0, "agent process not running");
            }
            format!("NO ({})", why.join(", "))
        }
    );
    let w = &s.watches;
    out += &format!(
        "watches:    {} ({})\n",
        health(w.running, w.ready, &w.last_error),
        w.details.kinds.join(", ")
    );
    let c = &s.cni_config;
    out += &format!(
        "CNI:        {} ({}), podCIDRs {}, pod mtu {}\n",
        health(c.running, c.ready, &c.last_error),
        c.details.conflist.display(),
        list(&c.details.pod_cidrs),
        c.details.pod_mtu.map_or("-".to_string(), |m| m.to_string())
    );
    let n = &s.node_networking;
    out += &format!("routing:    {}", health(n.running, n.ready, &n.last_error));
    if let Some(mode) = n.details.mode {
        out += &format!(", {mode:?}").to_lowercase();
    }
    out += "\n";
    if let Some(u) = &n.details.uplink {
        out += &format!("uplink:     {} (mtu {})\n", u.name, u.mtu);
    }
    if let Some(v) = &n.details.vxlan {
        out += &format!("vxlan:      local {}\n", v.local);
    }
    out += &format!("peers:      {}\n", n.details.peers.len());
    for (node, routes) in &n.details.peers {
        for r in routes {
            let via = match r.via {
                crate::node::topology::Via::Native { gateway } => format!("via {gateway}"),
                crate::node::topology::Via::Vxlan { vtep, inner, .. } => format!("via {inner} over VXLAN to {vtep}"),
            };
            out += &format!("  {node:<16} {:<22} {via}\n", r.cidr.to_string());
        }
    }
    if let Some(m) = &n.details.masquerade {
        out += &format!("masquerade: egress from {}\n", list(m));
    }
    let g = &s.ipam_gc;
    out += &format!("ipam gc:    {}\n", health(g.running, true, &g.last_error));
    let sv = &s.services;
    if sv.details.enabled {
        out += &format!(
            "services:   {}, {} services, {} frontends, {} backends (socket LB {}{}, per-packet {})\n",
            health(sv.running, sv.ready, &sv.last_error),
            sv.details.services,
            sv.details.frontends,
            sv.details.backends,
            if sv.details.socket_lb { "on" } else { "off" },
            if sv.details.host_netns_only {
                " in the node's namespace only"
            } else {
                ""
            },
            if sv.details.per_packet { "on" } else { "off" },
        );
    } else {
        out += "services:   off (--service-proxy=false)\n";
    }
    let show = |p: &Option<PathBuf>| {
        p.as_ref()
            .map_or("unavailable (see warnings)".to_string(), |p| p.display().to_string())
    };
    out += &format!("bpf pins:   {}\n", show(&sv.details.bpf_pin_path));
    out += &format!("cgroup:     {}\n", show(&sv.details.cgroup_path));
    for w in w
        .warnings
        .iter()
        .chain(&c.warnings)
        .chain(&n.warnings)
        .chain(&g.warnings)
        .chain(&sv.warnings)
    {
        out += &format!("warning:    {w}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy<T: Default>() -> Section<T> {
        Section {
            running: true,
            ready: true,
            ..Default::default()
        }
    }

    #[test]
    fn readiness_is_the_conjunction_of_the_gating_sections_and_a_live_agent() {
        let handle = StatusHandle::new("n1");
        handle.update(|s| {
            s.watches = healthy();
            s.node_networking = healthy();
            s.cni_config = healthy();
        });
        let status = handle.snapshot();
        assert!(status.ready(), "{:?}", status.not_ready());
        // IPAM GC does not gate; services gate only when on.
        let mut s = status.clone();
        s.ipam_gc.running = false;
        assert!(s.ready());
        s.services.details.enabled = true;
        assert_eq!(s.not_ready(), ["services"]);
        // A controller that is down, failing or not done yet keeps the node from being ready.
        for broken in [
            SectionName::NodeNetworking,
            SectionName::CniConfig,
            SectionName::Watches,
        ] {
            let mut s = status.clone();
            *s.supervision_mut(broken).0 = false;
            assert_eq!(s.not_ready(), [broken.as_str()]);
            let mut s = status.clone();
            *s.supervision_mut(broken).2 = Some("boom".into());
            assert!(!s.ready());
        }
        let mut s = status.clone();
        s.cni_config.ready = false;
        assert_eq!(s.not_ready(), ["cni-config"]);
        // The same status, written by a process that is gone, is not ready.
        let mut dead = status;
        dead.process_start += 1;
        assert!(!dead.ready());
    }

    #[test]
    fn updates_that_change_nothing_do_not_wake_the_writer() {
        let handle = StatusHandle::new("n1");
        let mut rx = handle.tx.subscribe();
        rx.borrow_and_update();
        handle.update(|s| s.cni_config.ready = false);
        assert!(!rx.has_changed().unwrap());
        handle.update(|s| s.cni_config.ready = true);
        assert!(rx.has_changed().unwrap());
    }
}
