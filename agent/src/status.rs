//! What the agent reports about itself: written after every reconcile to a file in its state
//! directory, read by `ferrynet-agent status` (and the readiness probe). A file, not a port: the
//! agent listens on nothing.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    routing::{Changes, Uplink},
    topology::{LocalVtep, PeerRoute, RoutingMode},
};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node: String,
    pub pod_cidrs: Vec<IpNet>,
    pub mode: Option<RoutingMode>,
    pub uplink: Option<Uplink>,
    pub pod_mtu: Option<u32>,
    /// Routes to other nodes' pods, by node.
    pub peers: BTreeMap<String, Vec<PeerRoute>>,
    pub vxlan: Option<LocalVtep>,
    /// The conflist exists: pods can be created on this node.
    pub cni_ready: bool,
    pub conflist: PathBuf,
    /// The cluster CIDRs masqueraded on egress, when masquerade is on.
    pub masquerade: Option<Vec<IpNet>>,
    /// The datapath's bpffs pin directory, once it is there (a warning says why not).
    pub bpf_pin_path: Option<PathBuf>,
    /// The datapath's cgroup v2 directory, once checked (a warning says why not).
    pub cgroup_path: Option<PathBuf>,
    pub last_changes: Changes,
    pub last_sync_unix: u64,
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-status.json")
}

pub fn write(state_dir: &Path, status: &AgentStatus) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(status).expect("status serialises");
    text.push(b'\n');
    crate::cniconf::write_if_changed(&path(state_dir), &text, 0o644).map(|_| ())
}

pub fn read(state_dir: &Path) -> Result<AgentStatus> {
    let p = path(state_dir);
    let bytes = std::fs::read(&p).with_context(|| format!("reading {} (is the agent running?)", p.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))
}

/// Human-readable summary.
pub fn render(s: &AgentStatus) -> String {
    let mut out = String::new();
    let cidrs: Vec<String> = s.pod_cidrs.iter().map(ToString::to_string).collect();
    out += &format!("node:       {}\n", s.node);
    out += &format!(
        "podCIDRs:   {}\n",
        if cidrs.is_empty() {
            "(none yet)".to_string()
        } else {
            cidrs.join(", ")
        }
    );
    out += &format!(
        "CNI:        {} ({})\n",
        if s.cni_ready { "ready" } else { "NOT READY" },
        s.conflist.display()
    );
    if let Some(mode) = s.mode {
        out += &format!("routing:    {mode:?}\n").to_lowercase();
    }
    if let Some(u) = &s.uplink {
        out += &format!(
            "uplink:     {} (mtu {}), pod mtu {}\n",
            u.name,
            u.mtu,
            s.pod_mtu.unwrap_or_default()
        );
    }
    if let Some(v) = &s.vxlan {
        out += &format!("vxlan:      local {}\n", v.local);
    }
    out += &format!("peers:      {}\n", s.peers.len());
    for (node, routes) in &s.peers {
        for r in routes {
            let via = match r.via {
                crate::topology::Via::Native { gateway } => format!("via {gateway}"),
                crate::topology::Via::Vxlan { vtep, inner, .. } => format!("via {inner} over VXLAN to {vtep}"),
            };
            out += &format!("  {node:<16} {:<22} {via}\n", r.cidr.to_string());
        }
    }
    if let Some(m) = &s.masquerade {
        let m: Vec<String> = m.iter().map(ToString::to_string).collect();
        out += &format!("masquerade: egress from {}\n", m.join(", "));
    }
    let show = |p: &Option<PathBuf>| {
        p.as_ref()
            .map_or("unavailable (see warnings)".to_string(), |p| p.display().to_string())
    };
    out += &format!("bpf pins:   {}\n", show(&s.bpf_pin_path));
    out += &format!("cgroup:     {}\n", show(&s.cgroup_path));
    out += &format!("last sync:  {}s ago\n", now_unix().saturating_sub(s.last_sync_unix));
    if let Some(e) = &s.last_error {
        out += &format!("last error: {e}\n");
    }
    for w in &s.warnings {
        out += &format!("warning:    {w}\n");
    }
    out
}
