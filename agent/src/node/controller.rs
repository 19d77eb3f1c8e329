//! The node networking controller: one pass whenever the nodes' projection changes (never on
//! kubelet heartbeats alone), and every `resync` to repair drift (a flushed ruleset, a deleted
//! route). Each pass reads the kernel back, so what it repairs is what the kernel has, not what
//! the agent remembers.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ferrynet_kernel::netlink::{Netlink, NetlinkError};
use ipnet::IpNet;
use tokio::sync::watch;
use tracing::info;

use crate::{
    node::{
        nftables::{self, FirewallOp, FirewallSpec, NftError},
        refusal,
        routing::{self, UplinkError},
        topology::{self, RoutingMode},
        vxlan::{self, DeviceOp, VxlanSettings},
    },
    status::{NodeNetworkingCounts, NodeNetworkingDetails, StatusHandle, now_unix},
    warning::{ErrorList, Warning, WarningKind},
    watch::NodesView,
};

/// What the node networking controller is configured with.
#[derive(Debug, Clone)]
pub struct NodeNetworkingConfig {
    pub node_name: String,
    pub mode: RoutingMode,
    /// The underlay interface (default: the one holding the node's InternalIP).
    pub uplink: Option<String>,
    pub vxlan: VxlanSettings,
    pub masquerade: bool,
    /// What counts as "inside" for masquerade (default: every node's PodCIDRs).
    pub cluster_cidrs: Vec<IpNet>,
    /// The node's writable `/proc/sys/net`.
    pub proc_sys_net: PathBuf,
    pub resync: Duration,
}

/// One failure of a pass. A pass keeps going past each and reports them all.
#[derive(Debug, thiserror::Error)]
pub enum NodeNetworkingError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{0}")]
    Netlinks(ErrorList<NetlinkError>),
    #[error("uplink: {0}")]
    Uplink(#[from] UplinkError),
    #[error("firewall table: {0}")]
    Firewall(#[from] NftError),
    #[error("enabling {path} (turn IP forwarding on for the node): {source}")]
    Forwarding { path: PathBuf, source: std::io::Error },
    #[error("the pass was lost: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the nodes' view is gone")]
    ViewClosed,
}

/// What one pass found and did.
#[derive(Debug, Default)]
struct PassOutcome {
    /// The plan this pass made, for the next one (`RoutingInputs::previous`).
    plan: Option<topology::RoutingPlan>,
    ready: bool,
    details: NodeNetworkingDetails,
    warnings: Vec<Warning>,
    errors: ErrorList<NodeNetworkingError>,
}

/// Runs until its input is gone (or the task is aborted).
pub async fn run(
    cfg: Arc<NodeNetworkingConfig>,
    mut nodes: watch::Receiver<Arc<NodesView>>,
    status: StatusHandle,
) -> Result<(), NodeNetworkingError> {
    let mut resync = tokio::time::interval(cfg.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Who held which PodCIDR and address in the last pass: conflicts are decided by it. A
    // restarted controller (or agent: `agent::run` seeds the status from the file the last run
    // wrote) starts from what the last pass recorded.
    let recorded = status.snapshot().node_networking.details;
    let mut previous = Arc::new(topology::RoutingPlan {
        peers: recorded.peers,
        disputes: recorded.disputes,
        ..Default::default()
    });
    loop {
        let view = nodes.borrow_and_update().clone();
        if view.synced {
            let pass_cfg = cfg.clone();
            let last = previous.clone();
            let mut outcome = tokio::task::spawn_blocking(move || pass(&pass_cfg, &view, &last)).await?;
            if let Some(plan) = outcome.plan.take() {
                previous = Arc::new(plan);
            }
            let changed = outcome.details.last_changes.total() > 0;
            if changed {
                info!("node networking: applied {:?}", outcome.details.last_changes);
            }
            status.update(|s| {
                let section = &mut s.node_networking;
                let last_changes = section.details.last_changes;
                section.ready = outcome.ready;
                section.warnings = outcome.warnings;
                section.last_error = (!outcome.errors.is_empty()).then(|| outcome.errors.to_string());
                section.details = outcome.details;
                if changed {
                    section.last_change_unix = Some(now_unix());
                } else {
                    section.details.last_changes = last_changes;
                }
            });
        }
        tokio::select! {
            changed = nodes.changed() => changed.map_err(|_| NodeNetworkingError::ViewClosed)?,
            _ = resync.tick() => {}
        }
    }
}

/// One pass, blocking (netlink and nft). Never panics on what the API server says.
fn pass(cfg: &NodeNetworkingConfig, view: &NodesView, previous: &topology::RoutingPlan) -> PassOutcome {
    let mut out = PassOutcome {
        details: NodeNetworkingDetails {
            mode: Some(cfg.mode),
            ..Default::default()
        },
        warnings: view.warnings.clone(),
        ..Default::default()
    };
    // Without knowing itself, the node cannot place itself: change nothing.
    let Some(local) = view.get(&cfg.node_name).filter(|l| !l.internal_ips.is_empty()) else {
        out.warnings.push(Warning::new(
            WarningKind::LocalNodeIncomplete,
            format!(
                "node {} is not in the API yet, or has no InternalIP: keeping the current state",
                cfg.node_name
            ),
        ));
        return out;
    };
    out.details.pod_cidrs = local.pod_cidrs.clone();
    let mut netlink = match Netlink::current() {
        Ok(n) => n,
        Err(e) => {
            out.errors.push(NodeNetworkingError::Socket(e));
            return out;
        }
    };
    let uplink = match routing::find_uplink(&mut netlink, cfg.uplink.as_deref(), &local.internal_ips) {
        Ok(u) => u,
        Err(e) => {
            out.errors.push(e);
            return out;
        }
    };
    let mut counts = NodeNetworkingCounts::default();
    let ipv6 = local.pod_cidrs.iter().any(|c| c.addr().is_ipv6());
    match enable_forwarding(&cfg.proc_sys_net, ipv6) {
        Ok(written) => counts.sysctls = written,
        Err(e) => out
            .warnings
            .push(Warning::new(WarningKind::ForwardingOff, e.to_string())),
    }

    let local_addresses: Vec<IpAddr> = match netlink.addresses(None) {
        Ok(addresses) => addresses.into_iter().map(|(_, a)| a.addr()).collect(),
        Err(e) => {
            // Without them a peer could be routed through this node's own address: change nothing.
            out.errors.push(e);
            return out;
        }
    };
    let plan = topology::plan_routes(
        local,
        &view.nodes,
        topology::RoutingInputs {
            mode: cfg.mode,
            connected: &uplink.connected,
            local_addresses: &local_addresses,
            cluster_cidrs: &cfg.cluster_cidrs,
            previous,
        },
    );
    out.warnings.extend(plan.warnings.iter().cloned());

    // The VXLAN device first: routes through it need its index.
    let desired_vxlan = vxlan::desired(&plan, cfg.vxlan, &uplink);
    let mut vxlan_index = None;
    match vxlan::observe(&mut netlink) {
        Ok(observed) => {
            let op = vxlan::diff_device(observed.as_ref(), desired_vxlan.as_ref());
            match vxlan::apply_device(&mut netlink, op, desired_vxlan.as_ref()) {
                Ok(n) => counts.vxlan_device += n,
                Err(e) => out.errors.push(e),
            }
            let current = if op == DeviceOp::Keep {
                Ok(observed)
            } else {
                vxlan::observe(&mut netlink)
            };
            match (current, &desired_vxlan) {
                (Ok(Some(have)), Some(want)) => {
                    vxlan_index = Some(have.index);
                    let ops = vxlan::diff_entries(&have, want);
                    match vxlan::apply_entries(&mut netlink, have.index, &ops) {
                        Ok(n) => counts.vxlan_entries += n,
                        Err(e) => out.errors.push(NodeNetworkingError::Netlinks(e)),
                    }
                }
                (Ok(_), _) => {}
                (Err(e), _) => out.errors.push(e),
            }
        }
        Err(e) => out.errors.push(e),
    }

    let wanted = routing::desired(&plan, &local.pod_cidrs, vxlan_index);
    match routing::observe(&mut netlink) {
        Ok(observed) => {
            let ops = routing::diff(&observed, &wanted, &plan.retained);
            match routing::apply(&mut netlink, &ops) {
                Ok(report) => {
                    counts.routes += report.applied;
                    out.warnings.extend(report.warnings);
                }
                Err(e) => out.errors.push(NodeNetworkingError::Netlinks(e)),
            }
        }
        Err(e) => out.errors.push(e),
    }

    let masquerade = cfg
        .masquerade
        .then(|| topology::cluster_cidrs(&cfg.cluster_cidrs, local, &plan));
    let firewall = FirewallSpec {
        masquerade: masquerade.clone(),
        vxlan_port: cfg.vxlan.port,
        vxlan_peers: vxlan_peers(view, &cfg.node_name),
    };
    let firewall_errors = out.errors.0.len();
    match nftables::observe() {
        Ok(observed) => {
            let op = nftables::diff(observed.as_ref(), &firewall);
            if op != FirewallOp::Keep {
                match nftables::apply(&op) {
                    Ok(()) => counts.firewall += 1,
                    Err(e) => out.errors.push(e),
                }
            }
        }
        Err(e) => out.errors.push(e),
    }
    // Only with the firewall in place: the rule delivers marked packets locally, and only the
    // firewall's reject keeps them from the node's own sockets.
    if out.errors.0.len() == firewall_errors {
        match refusal::converge(&mut netlink, ipv6) {
            Ok(n) => counts.routes += n,
            Err(e) => out.errors.push(NodeNetworkingError::Netlinks(e)),
        }
    }

    out.ready = out.errors.is_empty();
    out.details.uplink = Some(uplink);
    out.details.peers = plan.peers.clone();
    out.details.disputes = plan.disputes.clone();
    out.details.vxlan = plan.vxlan.clone();
    out.details.masquerade = masquerade;
    out.details.last_changes = counts;
    out.plan = Some(plan);
    out
}

/// Every other node's underlay addresses: the only sources the VXLAN port accepts.
fn vxlan_peers(view: &NodesView, local: &str) -> BTreeSet<IpAddr> {
    view.nodes
        .iter()
        .filter(|n| n.name != local)
        .flat_map(|n| n.internal_ips.iter().copied())
        .collect()
}

/// Turns on IP forwarding in the node's namespace, through its writable `/proc/sys/net`: pods are
/// routed, so the node must forward. IPv6 forwarding only with IPv6 PodCIDRs, because it also
/// makes the kernel ignore router advertisements. Settings already on are not written (in a
/// non-privileged container `/proc/sys` is read-only, and most nodes have forwarding on already).
/// Returns how many it wrote.
pub fn enable_forwarding(proc_sys_net: &Path, ipv6: bool) -> Result<usize, NodeNetworkingError> {
    let mut settings = vec![proc_sys_net.join("ipv4/ip_forward")];
    if ipv6 {
        settings.push(proc_sys_net.join("ipv6/conf/all/forwarding"));
    }
    let mut written = 0;
    for path in settings {
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(&path, "1").map_err(|source| NodeNetworkingError::Forwarding { path, source })?;
        written += 1;
    }
    Ok(written)
}

/// Removes everything node networking owns in the kernel: the VXLAN device, the agent's routes,
/// the refusal rule and table, and its firewall table. Keeps going past failures and reports them all.
pub fn teardown() -> Result<(), ErrorList<NodeNetworkingError>> {
    let mut errors = ErrorList::default();
    match Netlink::current() {
        Ok(mut netlink) => {
            match vxlan::observe(&mut netlink) {
                Ok(observed) => {
                    if let Err(e) = vxlan::apply_device(&mut netlink, vxlan::diff_device(observed.as_ref(), None), None)
                    {
                        errors.push(e);
                    }
                }
                Err(e) => errors.push(e),
            }
            for ipv4 in [true, false] {
                match refusal::observe(&mut netlink, ipv4) {
                    Ok(observed) => {
                        if let Err(e) = refusal::apply(&mut netlink, &refusal::diff(&observed, ipv4, false)) {
                            errors.push(NodeNetworkingError::Netlinks(e));
                        }
                    }
                    Err(e) if !ipv4 && e.errno() == Some(libc::EAFNOSUPPORT) => {}
                    Err(e) => errors.push(NodeNetworkingError::Netlink(e)),
                }
            }
            match routing::observe(&mut netlink) {
                Ok(observed) => {
                    if let Err(e) = routing::apply(&mut netlink, &routing::diff(&observed, &[], &[])) {
                        errors.push(NodeNetworkingError::Netlinks(e));
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        Err(e) => errors.push(NodeNetworkingError::Socket(e)),
    }
    if let Err(e) = nftables::remove() {
        errors.push(e);
    }
    errors.into_result()
}
