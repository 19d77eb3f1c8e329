//! From Node objects to the routes this node needs: pure functions, no I/O, unit-tested without
//! root. The agent feeds them what the API server says and hands the result to `apply`.
//!
//! Hostile or half-made objects never crash anything: a node without a name, without a usable
//! InternalIP or without a valid PodCIDR is skipped with a warning, and so is a PodCIDR that
//! collides with one already claimed.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time};
use sha2::{Digest, Sha256};

use crate::warning::{Warning, WarningKind};

/// What the agent needs to know about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// When the Node object was created: the older node wins a PodCIDR conflict.
    pub created: Option<Time>,
    /// InternalIP addresses, in the order the node reports them.
    pub internal_ips: Vec<IpAddr>,
    /// At most one per family, as Kubernetes allows.
    pub pod_cidrs: Vec<IpNet>,
    /// Its `topology.kubernetes.io/zone` label (for topology hints).
    pub zone: Option<String>,
}

impl NodeInfo {
    /// The node's underlay address of one family.
    pub fn internal_ip(&self, ipv4: bool) -> Option<IpAddr> {
        self.internal_ips.iter().copied().find(|ip| ip.is_ipv4() == ipv4)
    }
}

/// Reads a Node object, tolerating anything. Returns what could be used, plus warnings.
pub fn node_info(node: &Node) -> (Option<NodeInfo>, Vec<Warning>) {
    let mut warnings = Vec::new();
    let Some(name) = node.metadata.name.clone().filter(|n| !n.is_empty()) else {
        warnings.push(Warning::new(
            WarningKind::NodeWithoutName,
            "a node without a name is ignored",
        ));
        return (None, warnings);
    };
    let spec = node.spec.as_ref();
    let raw_cidrs: Vec<String> = match spec.and_then(|s| s.pod_cidrs.clone()).filter(|c| !c.is_empty()) {
        Some(list) => list,
        None => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
    };
    let mut pod_cidrs: Vec<IpNet> = Vec::new();
    for raw in raw_cidrs {
        match raw.parse::<IpNet>() {
            Ok(cidr) if cidr.trunc() != cidr => {
                warnings.push(Warning::new(
                    WarningKind::InvalidPodCidr,
                    format!("node {name}: podCIDR {raw} has host bits set; using {}", cidr.trunc()),
                ));
                push_per_family(&mut pod_cidrs, cidr.trunc(), &name, &mut warnings);
            }
            Ok(cidr) => push_per_family(&mut pod_cidrs, cidr, &name, &mut warnings),
            Err(_) => warnings.push(Warning::new(
                WarningKind::InvalidPodCidr,
                format!("node {name}: podCIDR {raw:?} is not a CIDR; ignored"),
            )),
        }
    }
    let mut internal_ips = Vec::new();
    for address in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if address.type_ != "InternalIP" {
            continue;
        }
        match address.address.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast() => internal_ips.push(ip),
            _ => warnings.push(Warning::new(
                WarningKind::InvalidInternalIp,
                format!("node {name}: InternalIP {:?} is not usable; ignored", address.address),
            )),
        }
    }
    (
        Some(NodeInfo {
            name,
            created: node.metadata.creation_timestamp.clone(),
            internal_ips,
            pod_cidrs,
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("topology.kubernetes.io/zone"))
                .cloned(),
        }),
        warnings,
    )
}

fn push_per_family(cidrs: &mut Vec<IpNet>, cidr: IpNet, node: &str, warnings: &mut Vec<Warning>) {
    if cidrs.iter().any(|c| c.addr().is_ipv4() == cidr.addr().is_ipv4()) {
        warnings.push(Warning::new(
            WarningKind::ExtraPodCidr,
            format!("node {node}: a second podCIDR of one family ({cidr}) is ignored"),
        ));
    } else {
        cidrs.push(cidr);
    }
}

/// How traffic to other nodes' pods travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// A route to each peer's PodCIDR via the peer's InternalIP: needs a shared L2 segment (or an
    /// underlay that routes pod CIDRs).
    Native,
    /// Encapsulated in VXLAN to the peer's InternalIP: works across any IP underlay.
    Vxlan,
    /// Native to peers on the same L2 segment, VXLAN to the others.
    Auto,
}

/// How one peer PodCIDR is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Via {
    /// `cidr via gateway` (the peer's InternalIP, on the shared segment).
    Native { gateway: IpAddr },
    /// `cidr via inner onlink dev ferrynet.vxlan`, with `inner` resolving to `mac`, and `mac`
    /// forwarded to the peer's `vtep` address.
    Vxlan { vtep: IpAddr, inner: IpAddr, mac: [u8; 6] },
}

/// One route the node needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRoute {
    pub cidr: IpNet,
    pub via: Via,
}

/// Everything the node's routing should look like.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingPlan {
    /// Routes to other nodes' PodCIDRs, by node name.
    pub peers: BTreeMap<String, Vec<PeerRoute>>,
    /// PodCIDRs of nodes that exist but are momentarily incomplete (no usable address): the
    /// routes already installed for them are kept, not torn down for lack of news.
    pub retained: Vec<IpNet>,
    /// This node's VXLAN endpoint, when any peer is reached through VXLAN (or the mode is VXLAN).
    pub vxlan: Option<LocalVtep>,
    /// Claims refused because they took what another node held: carried from pass to pass
    /// (through `RoutingInputs::previous`) for as long as the claim stands.
    pub disputes: Vec<Dispute>,
    pub warnings: Vec<Warning>,
}

/// A node claiming a PodCIDR (or an InternalIP) that another node held when the claim appeared.
/// Kubernetes never gives one CIDR to two nodes, so the later claim is the suspect one: it never
/// wins, not even after the holder is gone for a while (a deleted and re-created Node must get its
/// CIDR back), until the claimant stops making it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dispute {
    pub claimant: String,
    pub claim: DisputedClaim,
    /// Who held it when the dispute began.
    pub holder: String,
}

/// What a dispute is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "value")]
pub enum DisputedClaim {
    PodCidr(IpNet),
    Address(IpAddr),
}

/// Everything besides the Node objects that decides the routes.
#[derive(Debug, Clone, Copy)]
pub struct RoutingInputs<'a> {
    pub mode: RoutingMode,
    /// The subnets of the local uplink: which peers share an L2 segment with us (for `Auto`),
    /// and what a pod CIDR must never cover.
    pub connected: &'a [IpNet],
    /// Every address this node holds, on any interface: never a peer's.
    pub local_addresses: &'a [IpAddr],
    /// The cluster's pod CIDRs, when configured: never a node's underlay address.
    pub cluster_cidrs: &'a [IpNet],
    /// The previous pass's plan: who held what, and the standing disputes.
    pub previous: &'a RoutingPlan,
}

/// This node's side of the overlay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalVtep {
    /// The underlay address VXLAN packets leave from.
    pub local: IpAddr,
    pub mac: [u8; 6],
    /// Addresses on the VXLAN device: the network address of each local PodCIDR (never handed to
    /// a pod), the next hop other nodes route this node's pods through.
    pub inner: Vec<IpNet>,
}

impl RoutingPlan {
    pub fn routes(&self) -> impl Iterator<Item = &PeerRoute> {
        self.peers.values().flatten()
    }
}

/// The VTEP MAC of the node whose underlay address is `ip`: derived, so that no node has to
/// publish it (locally administered, unicast).
pub fn vtep_mac(ip: IpAddr) -> [u8; 6] {
    let digest = Sha256::digest(ip.to_string().as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// Computes the routes `local` needs to reach every other node's pods.
///
/// A peer PodCIDR is refused, with a warning, when it is too broad or special-purpose, covers the
/// underlay or this node's address, or collides with this node's. A peer address is refused when
/// it cannot be a peer's: one of this node's own, inside a PodCIDR or the cluster CIDRs.
///
/// Two peers claiming overlapping PodCIDRs (or one InternalIP) is never right: Kubernetes never
/// assigns them so. While it lasts, the claim stays with the node the previous pass routed it to,
/// the other claim becomes a [`Dispute`] that never wins while it stands, and every pass warns.
/// When no claimant held it before, nobody gets it, and what is installed is kept.
pub fn plan_routes(local: &NodeInfo, nodes: &[NodeInfo], inputs: RoutingInputs<'_>) -> RoutingPlan {
    let RoutingInputs {
        mode,
        connected,
        previous,
        ..
    } = inputs;
    let mut plan = RoutingPlan::default();
    let underlay_v4 = local.internal_ip(true).is_some() || local.internal_ip(false).is_none();
    let local_vtep = local.internal_ip(underlay_v4);
    let mut peers: Vec<&NodeInfo> = nodes.iter().filter(|n| n.name != local.name).collect();
    // Oldest first (nodes without a creation time last), then by name: a stable order for the
    // warnings. Who wins a conflict does not depend on it.
    peers.sort_by(|a, b| (a.created.is_none(), &a.created, &a.name).cmp(&(b.created.is_none(), &b.created, &b.name)));
    let mut uses_vxlan = mode == RoutingMode::Vxlan;
    // The claims that count: a PodCIDR that could never be routed (a /0, one covering the
    // underlay) neither contests another node's nor makes an address "a pod's".
    let claims: BTreeMap<&str, Vec<IpNet>> = nodes
        .iter()
        .map(|n| {
            let valid = n
                .pod_cidrs
                .iter()
                .filter(|c| n.name == local.name || unroutable(c, local, connected).is_none())
                .copied()
                .collect();
            (n.name.as_str(), valid)
        })
        .collect();

    for peer in &peers {
        if peer.pod_cidrs.is_empty() {
            plan.warnings.push(Warning::new(
                WarningKind::PeerWithoutPodCidr,
                format!("node {}: no podCIDR yet; no route", peer.name),
            ));
            continue;
        }
        let addresses = match peer_addresses(peer, &local.name, &claims, &peers, inputs, &mut plan) {
            PeerAddresses::Usable(addresses) => addresses,
            PeerAddresses::Refused => continue,
            PeerAddresses::Contested => {
                // Only CIDRs that could be routed at all: a hostile /0 is never kept.
                plan.retained
                    .extend(claims.get(peer.name.as_str()).into_iter().flatten());
                continue;
            }
        };
        let internal_ip = |v4: bool| addresses.iter().copied().find(|ip| ip.is_ipv4() == v4);
        let mut routes = Vec::new();
        for cidr in &peer.pod_cidrs {
            if let Some(why) = unroutable(cidr, local, connected) {
                plan.warnings.push(Warning::new(
                    WarningKind::UnroutablePodCidr,
                    format!("node {}: podCIDR {cidr} {why}; no route", peer.name),
                ));
                continue;
            }
            if let Some(mine) = local.pod_cidrs.iter().find(|c| overlaps(c, cidr)) {
                plan.warnings.push(Warning::new(
                    WarningKind::PodCidrConflict,
                    format!(
                        "node {}: podCIDR {cidr} overlaps this node's {mine}; no route",
                        peer.name
                    ),
                ));
                continue;
            }
            // A PodCIDR that contains another node's address: the address's claim stands if the
            // previous pass routed through it; the CIDR's if the previous pass routed it; with
            // neither, what is installed is kept.
            if let Some(other) = nodes
                .iter()
                .find(|n| n.name != peer.name && n.internal_ips.iter().any(|ip| cidr.contains(ip)))
            {
                let address = other
                    .internal_ips
                    .iter()
                    .copied()
                    .find(|ip| cidr.contains(ip))
                    .expect("found");
                let address_held = other.name == local.name || held_address(previous, &other.name, address);
                if address_held || !held_cidr(previous, &peer.name, cidr) {
                    plan.warnings.push(Warning::new(
                        WarningKind::UnroutablePodCidr,
                        format!(
                            "node {}: podCIDR {cidr} contains node {}'s address {address}; {}",
                            peer.name,
                            other.name,
                            if address_held {
                                "no route"
                            } else {
                                "keeping what is installed"
                            }
                        ),
                    ));
                    if !address_held {
                        plan.retained.push(*cidr);
                    }
                    continue;
                }
            }
            match contest(peer, *cidr, &peers, &claims, previous) {
                Contest::Uncontested => {}
                Contest::Held { rivals } => plan.warnings.push(Warning::new(
                    WarningKind::PodCidrConflict,
                    format!(
                        "node {}: podCIDR {cidr} is also claimed by {}; it stays routed to {}",
                        peer.name,
                        rivals.join(", "),
                        peer.name
                    ),
                )),
                Contest::Disputed { holder } => {
                    plan.warnings.push(Warning::new(
                        WarningKind::PodCidrConflict,
                        format!(
                            "node {}: podCIDR {cidr} was {holder}'s when {} claimed it too; no route to {} while it does",
                            peer.name, peer.name, peer.name
                        ),
                    ));
                    plan.disputes.push(Dispute {
                        claimant: peer.name.clone(),
                        claim: DisputedClaim::PodCidr(*cidr),
                        holder,
                    });
                    continue;
                }
                Contest::Unheld { rivals } => {
                    plan.warnings.push(Warning::new(
                        WarningKind::PodCidrConflict,
                        format!(
                            "node {}: podCIDR {cidr} is also claimed by {}, and neither held it before; keeping what is installed",
                            peer.name,
                            rivals.join(", ")
                        ),
                    ));
                    plan.retained.push(*cidr);
                    continue;
                }
            }
            // A native route needs an underlay of the CIDR's family at both ends.
            let family = cidr.addr().is_ipv4();
            let native_gateway = internal_ip(family).filter(|_| local.internal_ip(family).is_some());
            let on_link = |ip: IpAddr| connected.iter().any(|net| net.contains(&ip));
            let via = match mode {
                RoutingMode::Native => match native_gateway {
                    Some(gateway) => Via::Native { gateway },
                    None => {
                        plan.warnings.push(Warning::new(
                                WarningKind::PeerWithoutAddress,
                                format!(
                                    "node {}: no InternalIP of {cidr}'s family for a native route; keeping what is installed",
                                    peer.name
                                ),
                            ));
                        plan.retained.push(*cidr);
                        continue;
                    }
                },
                RoutingMode::Auto if native_gateway.is_some_and(on_link) => Via::Native {
                    gateway: native_gateway.expect("checked"),
                },
                RoutingMode::Vxlan | RoutingMode::Auto => {
                    let (Some(_), Some(vtep)) = (local_vtep, internal_ip(underlay_v4)) else {
                        plan.warnings.push(Warning::new(
                            WarningKind::PeerWithoutAddress,
                            format!(
                                "node {}: no InternalIP of the underlay's family for VXLAN; keeping what is installed",
                                peer.name
                            ),
                        ));
                        plan.retained.push(*cidr);
                        // What is installed for it may go through the VXLAN device: keep that.
                        uses_vxlan = true;
                        continue;
                    };
                    uses_vxlan = true;
                    Via::Vxlan {
                        vtep,
                        inner: cidr.network(),
                        mac: vtep_mac(vtep),
                    }
                }
            };
            routes.push(PeerRoute { cidr: *cidr, via });
        }
        if !routes.is_empty() {
            plan.peers.insert(peer.name.clone(), routes);
        }
    }
    // What is kept may go through the VXLAN device: keep the device too.
    if mode != RoutingMode::Native && !plan.retained.is_empty() {
        uses_vxlan = true;
    }
    plan.retained.sort();
    plan.retained.dedup();
    plan.disputes.sort();
    plan.disputes.dedup();
    if uses_vxlan {
        match local_vtep {
            Some(ip) => {
                plan.vxlan = Some(LocalVtep {
                    local: ip,
                    mac: vtep_mac(ip),
                    inner: local
                        .pod_cidrs
                        .iter()
                        .map(|c| IpNet::new(c.network(), c.max_prefix_len()).expect("host prefix"))
                        .collect(),
                })
            }
            None => plan.warnings.push(Warning::new(
                WarningKind::NoVxlanEndpoint,
                format!("node {}: no InternalIP, so no VXLAN endpoint", local.name),
            )),
        }
    }
    plan
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether the previous pass routed a CIDR overlapping `cidr` to node `name`.
fn held_cidr(previous: &RoutingPlan, name: &str, cidr: &IpNet) -> bool {
    previous
        .peers
        .get(name)
        .is_some_and(|routes| routes.iter().any(|r| overlaps(&r.cidr, cidr)))
}

/// Whether the previous pass routed to node `name` through its address `ip`.
fn held_address(previous: &RoutingPlan, name: &str, ip: IpAddr) -> bool {
    previous.peers.get(name).is_some_and(|routes| {
        routes.iter().any(|r| match r.via {
            Via::Native { gateway } => gateway == ip,
            Via::Vxlan { vtep, .. } => vtep == ip,
        })
    })
}

/// Who else claims `cidr`, and who wins.
enum Contest {
    Uncontested,
    /// `peer` held it in the previous pass and keeps it.
    Held {
        rivals: Vec<String>,
    },
    /// Someone else held it (or a standing dispute says so): `peer` does not get it.
    Disputed {
        holder: String,
    },
    /// Nobody among the claimants held it before.
    Unheld {
        rivals: Vec<String>,
    },
}

fn contest(
    peer: &NodeInfo,
    cidr: IpNet,
    peers: &[&NodeInfo],
    claims: &BTreeMap<&str, Vec<IpNet>>,
    previous: &RoutingPlan,
) -> Contest {
    let standing = |name: &str, claim: &IpNet| {
        previous
            .disputes
            .iter()
            .find(|d| d.claimant == name && d.claim == DisputedClaim::PodCidr(*claim))
    };
    if let Some(dispute) = standing(&peer.name, &cidr) {
        return Contest::Disputed {
            holder: dispute.holder.clone(),
        };
    }
    // Rivals with a standing dispute of their own claim do not count: they never win.
    let rivals: Vec<String> = peers
        .iter()
        .filter(|other| other.name != peer.name)
        .filter(|other| {
            claims
                .get(other.name.as_str())
                .into_iter()
                .flatten()
                .any(|c| overlaps(c, &cidr) && standing(&other.name, c).is_none())
        })
        .map(|other| other.name.clone())
        .collect();
    if rivals.is_empty() {
        return Contest::Uncontested;
    }
    let holder = previous
        .peers
        .iter()
        .find(|(_, routes)| routes.iter().any(|r| overlaps(&r.cidr, &cidr)))
        .map(|(name, _)| name.clone());
    match holder {
        Some(holder) if holder == peer.name => Contest::Held { rivals },
        Some(holder) if rivals.contains(&holder) => Contest::Disputed { holder },
        _ => Contest::Unheld { rivals },
    }
}

/// What a peer's InternalIPs allow.
enum PeerAddresses {
    Usable(Vec<IpAddr>),
    /// Every address it has is impossible (or taken): no route, nothing kept.
    Refused,
    /// It shares an address with another node and neither held it: keep what is installed.
    Contested,
}

/// The peer's InternalIPs that can be a peer's: not one of this node's own addresses, not inside
/// a PodCIDR or the cluster CIDRs, and not another node's (unless the previous pass routed
/// through it to this peer).
fn peer_addresses(
    peer: &NodeInfo,
    local_name: &str,
    claims: &BTreeMap<&str, Vec<IpNet>>,
    peers: &[&NodeInfo],
    inputs: RoutingInputs<'_>,
    plan: &mut RoutingPlan,
) -> PeerAddresses {
    let previous = inputs.previous;
    let routed_via = |name: &str, ip: IpAddr| held_address(previous, name, ip);
    let mut usable = Vec::new();
    let mut contested = false;
    for &ip in &peer.internal_ips {
        let refuse = |why: String, plan: &mut RoutingPlan| {
            plan.warnings.push(Warning::new(
                WarningKind::ImpossiblePeerAddress,
                format!("node {}: InternalIP {ip} {why}; not used", peer.name),
            ));
        };
        if inputs.local_addresses.contains(&ip) {
            refuse("is this node's own address".into(), plan);
            continue;
        }
        if let Some(cidr) = inputs.cluster_cidrs.iter().find(|c| c.contains(&ip)) {
            refuse(format!("is inside the cluster CIDR {cidr}"), plan);
            continue;
        }
        // Inside another node's PodCIDR: one of the two claims is wrong. This node's own CIDRs
        // are certain; between peers, the claim the previous pass used stands, and when it used
        // neither, neither is used (the CIDR's side is decided in `plan_routes`).
        let mut inside = claims
            .iter()
            .filter(|(owner, _)| **owner != peer.name)
            .filter_map(|(owner, cidrs)| cidrs.iter().find(|c| c.contains(&ip)).map(|c| (*owner, c)));
        if let Some((owner, cidr)) = inside.next() {
            let cidr_held = owner == local_name || held_cidr(previous, owner, cidr);
            if cidr_held {
                refuse(format!("is inside node {owner}'s podCIDR {cidr}"), plan);
                continue;
            }
            if !routed_via(&peer.name, ip) {
                plan.warnings.push(Warning::new(
                    WarningKind::ImpossiblePeerAddress,
                    format!(
                        "node {}: InternalIP {ip} is inside node {owner}'s podCIDR {cidr}, and neither was routed before; keeping what is installed",
                        peer.name
                    ),
                ));
                contested = true;
                continue;
            }
        }
        // An address dispute lasts while its holder still has the address: a machine that got a
        // dead node's address is not refused forever.
        let holds = |name: &str| peers.iter().any(|n| n.name == name && n.internal_ips.contains(&ip));
        let standing = previous
            .disputes
            .iter()
            .find(|d| d.claimant == peer.name && d.claim == DisputedClaim::Address(ip) && holds(&d.holder));
        let sharers: Vec<&str> = peers
            .iter()
            .filter(|other| other.name != peer.name && other.internal_ips.contains(&ip))
            .filter(|other| {
                !previous
                    .disputes
                    .iter()
                    .any(|d| d.claimant == other.name && d.claim == DisputedClaim::Address(ip) && holds(&d.holder))
            })
            .map(|other| other.name.as_str())
            .collect();
        let holder = match standing {
            Some(dispute) => Some(dispute.holder.clone()),
            None if sharers.is_empty() || routed_via(&peer.name, ip) => None,
            None => sharers.iter().find(|s| routed_via(s, ip)).map(|s| s.to_string()),
        };
        if let Some(holder) = holder {
            refuse(format!("was node {holder}'s address first"), plan);
            plan.disputes.push(Dispute {
                claimant: peer.name.clone(),
                claim: DisputedClaim::Address(ip),
                holder,
            });
            continue;
        }
        if !sharers.is_empty() && !routed_via(&peer.name, ip) {
            plan.warnings.push(Warning::new(
                WarningKind::ImpossiblePeerAddress,
                format!(
                    "node {}: InternalIP {ip} is also node {}'s, and neither was routed through it; keeping what is installed",
                    peer.name,
                    sharers.join(", ")
                ),
            ));
            contested = true;
            continue;
        }
        usable.push(ip);
    }
    if !usable.is_empty() {
        PeerAddresses::Usable(usable)
    } else if contested {
        PeerAddresses::Contested
    } else if peer.internal_ips.is_empty() {
        // Incomplete rather than hostile: the routing below warns and keeps what is installed.
        PeerAddresses::Usable(Vec::new())
    } else {
        PeerAddresses::Refused
    }
}

/// Why a peer PodCIDR must not be routed, if it must not.
fn unroutable(cidr: &IpNet, local: &NodeInfo, connected: &[IpNet]) -> Option<String> {
    let network = cidr.network();
    let special = match network {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_link_local() || v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_multicast() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if cidr.prefix_len() == 0 {
        Some("is a default route".into())
    } else if special {
        Some("is a special-purpose range".into())
    } else if let Some(net) = connected
        .iter()
        .find(|n| n.contains(&network) || cidr.contains(&n.network()))
    {
        Some(format!("overlaps the underlay {net}"))
    } else if local.internal_ips.iter().any(|ip| cidr.contains(ip)) {
        Some("contains this node's address".into())
    } else {
        None
    }
}

/// VXLAN's overhead: outer IP (20 or 40) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub fn vxlan_overhead(underlay_ipv6: bool) -> u32 {
    if underlay_ipv6 { 70 } else { 50 }
}

/// The pod MTU for an uplink MTU. `Auto` reserves the overlay's overhead too: a node that needs
/// VXLAN may join later, and pods cannot have their MTU changed under them.
pub fn pod_mtu(uplink_mtu: u32, mode: RoutingMode, underlay_ipv6: bool) -> u32 {
    match mode {
        RoutingMode::Native => uplink_mtu,
        RoutingMode::Vxlan | RoutingMode::Auto => uplink_mtu.saturating_sub(vxlan_overhead(underlay_ipv6)),
    }
}

/// Every PodCIDR in the cluster (for masquerade): the configured cluster CIDRs if any, else this
/// node's PodCIDRs and the peers' that passed `plan_routes`'s checks (a hostile `0.0.0.0/0` must
/// not switch masquerade off).
pub fn cluster_cidrs(configured: &[IpNet], local: &NodeInfo, plan: &RoutingPlan) -> Vec<IpNet> {
    let mut all: Vec<IpNet> = if configured.is_empty() {
        local
            .pod_cidrs
            .iter()
            .chain(plan.routes().map(|r| &r.cidr))
            .chain(&plan.retained)
            .copied()
            .collect()
    } else {
        configured.to_vec()
    };
    all.sort();
    all.dedup();
    IpNet::aggregate(&all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    fn node(name: &str, ips: &[&str], cidrs: &[&str]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: (!name.is_empty()).then(|| name.to_string()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: (!cidrs.is_empty()).then(|| cidrs.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    ips.iter()
                        .map(|a| NodeAddress {
                            type_: "InternalIP".into(),
                            address: a.to_string(),
                        })
                        .chain([NodeAddress {
                            type_: "Hostname".into(),
                            address: name.into(),
                        }])
                        .collect(),
                ),
                ..Default::default()
            }),
        }
    }

    fn info(name: &str, ips: &[&str], cidrs: &[&str]) -> NodeInfo {
        node_info(&node(name, ips, cidrs)).0.unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A first pass: nothing held before, no other local addresses, no cluster CIDRs.
    fn first_pass(local: &NodeInfo, nodes: &[NodeInfo], mode: RoutingMode, connected: &[IpNet]) -> RoutingPlan {
        plan_routes(
            local,
            nodes,
            RoutingInputs {
                mode,
                connected,
                local_addresses: &local.internal_ips,
                cluster_cidrs: &[],
                previous: &RoutingPlan::default(),
            },
        )
    }

    /// A pass after `previous`, as the controller runs them.
    fn next(local: &NodeInfo, nodes: &[NodeInfo], previous: &RoutingPlan) -> RoutingPlan {
        plan_routes(
            local,
            nodes,
            RoutingInputs {
                mode: RoutingMode::Native,
                connected: &[],
                local_addresses: &local.internal_ips,
                cluster_cidrs: &[],
                previous,
            },
        )
    }

    #[test]
    fn reads_nodes_and_tolerates_hostile_ones() {
        let (n, w) = node_info(&node(
            "a",
            &["10.0.0.1", "fd00::1"],
            &["10.244.1.0/24", "fd00:244:1::/64"],
        ));
        let n = n.unwrap();
        assert_eq!(n.internal_ips, vec![ip("10.0.0.1"), ip("fd00::1")]);
        assert_eq!(n.pod_cidrs, vec![net("10.244.1.0/24"), net("fd00:244:1::/64")]);
        assert!(w.is_empty());

        // No name, garbage CIDRs and addresses, two CIDRs of one family, host bits.
        assert!(node_info(&node("", &["10.0.0.1"], &["10.244.1.0/24"])).0.is_none());
        let (n, w) = node_info(&node(
            "b",
            &["not-an-ip", "0.0.0.0", "10.0.0.2"],
            &["nope", "10.244.2.7/24", "10.244.9.0/24"],
        ));
        let n = n.unwrap();
        assert_eq!(n.pod_cidrs, vec![net("10.244.2.0/24")]);
        assert_eq!(n.internal_ips, vec![ip("10.0.0.2")]);
        let mut kinds: Vec<WarningKind> = w.iter().map(|w| w.kind).collect();
        kinds.sort();
        use WarningKind::*;
        assert_eq!(
            kinds,
            [
                InvalidPodCidr,
                InvalidPodCidr,
                ExtraPodCidr,
                InvalidInternalIp,
                InvalidInternalIp
            ],
            "{w:?}"
        );

        // The legacy singular podCIDR, and a node with no spec or status at all.
        let mut legacy = node("c", &["10.0.0.3"], &[]);
        legacy.spec.as_mut().unwrap().pod_cidr = Some("10.244.3.0/24".into());
        assert_eq!(node_info(&legacy).0.unwrap().pod_cidrs, vec![net("10.244.3.0/24")]);
        let bare = Node {
            metadata: ObjectMeta {
                name: Some("d".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let n = node_info(&bare).0.unwrap();
        assert!(n.pod_cidrs.is_empty() && n.internal_ips.is_empty());
    }

    #[test]
    fn native_routes_each_peer_cidr_via_its_internal_ip() {
        let local = info("n1", &["10.0.0.1"], &["10.244.1.0/24"]);
        let nodes = vec![
            local.clone(),
            info("n2", &["10.0.0.2"], &["10.244.2.0/24"]),
            info("n3", &["10.0.0.3"], &["10.244.3.0/24"]),
        ];
        let plan = first_pass(&local, &nodes, RoutingMode::Native, &[]);
        assert_eq!(
            plan.peers["n2"],
            vec![PeerRoute {
                cidr: net("10.244.2.0/24"),
                via: Via::Native {
                    gateway: ip("10.0.0.2")
                }
            }]
        );
        assert_eq!(plan.peers.len(), 2);
        assert!(plan.vxlan.is_none());
        assert!(plan.warnings.is_empty());
    }

    #[test]
    fn vxlan_routes_through_each_peers_network_address() {
        let local = info("n1", &["10.0.0.1"], &["10.244.1.0/24", "fd00:244:1::/64"]);
        let nodes = vec![
            local.clone(),
            info("n2", &["10.0.0.2"], &["10.244.2.0/24", "fd00:244:2::/64"]),
        ];
        let plan = first_pass(&local, &nodes, RoutingMode::Vxlan, &[]);
        let mac = vtep_mac(ip("10.0.0.2"));
        assert_eq!(
            plan.peers["n2"],
            vec![
                PeerRoute {
                    cidr: net("10.244.2.0/24"),
                    via: Via::Vxlan {
                        vtep: ip("10.0.0.2"),
                        inner: ip("10.244.2.0"),
                        mac
                    }
                },
                PeerRoute {
                    cidr: net("fd00:244:2::/64"),
                    via: Via::Vxlan {
                        vtep: ip("10.0.0.2"),
                        inner: ip("fd00:244:2::"),
                        mac
                    }
                },
            ]
        );
        let vtep = plan.vxlan.unwrap();
        assert_eq!(vtep.local, ip("10.0.0.1"));
        assert_eq!(vtep.inner, vec![net("10.244.1.0/32"), net("fd00:244:1::/128")]);
        assert_eq!(vtep.mac[0] & 3, 2);
    }

    #[test]
    fn auto_picks_native_on_the_same_segment_and_vxlan_elsewhere() {
        let local = info("n1", &["10.0.0.1"], &["10.244.1.0/24"]);
        let nodes = vec![
            local.clone(),
            info("near", &["10.0.0.2"], &["10.244.2.0/24"]),
            info("far", &["192.168.7.9"], &["10.244.3.0/24"]),
        ];
        let plan = first_pass(&local, &nodes, RoutingMode::Auto, &[net("10.0.0.0/24")]);
        assert!(matches!(plan.peers["near"][0].via, Via::Native { .. }));
        assert!(matches!(plan.peers["far"][0].via, Via::Vxlan { .. }));
        assert!(plan.vxlan.is_some());
        // All on one segment: no VXLAN endpoint at all.
        let plan = first_pass(&local, &nodes[..2], RoutingMode::Auto, &[net("10.0.0.0/24")]);
        assert!(plan.vxlan.is_none());
    }

    #[test]
    fn hostile_peers_are_skipped_with_warnings_and_never_crash() {
        let local = info("n1", &["10.0.0.1"], &["10.244.1.0/24"]);
        let nodes = vec![
            local.clone(),
            info("no-cidr", &["10.0.0.2"], &[]),
            info("no-address", &[], &["10.244.4.0/24"]),
            info("steals-mine", &["10.0.0.5"], &["10.244.1.0/25"]),
            info("a-first", &["10.0.0.6"], &["10.244.6.0/24"]),
            info("b-duplicate", &["10.0.0.7"], &["10.244.6.0/24"]),
            info("v6-only", &["fd00::8"], &["fd00:244:8::/64"]),
            info("covers-underlay", &["10.0.0.9"], &["10.0.0.0/16"]),
            info("default-route", &["10.0.0.10"], &["0.0.0.0/0"]),
            info("loopback", &["10.0.0.11"], &["127.0.0.0/8"]),
        ];
        for mode in [RoutingMode::Native, RoutingMode::Vxlan, RoutingMode::Auto] {
            let plan = first_pass(&local, &nodes, mode, &[net("10.0.0.0/24")]);
            // a-first and b-duplicate claim one CIDR and neither held it: neither gets it.
            assert!(plan.peers.is_empty(), "{mode:?}: {plan:?}");
            let mut kinds: Vec<WarningKind> = plan.warnings.iter().map(|w| w.kind).collect();
            kinds.sort();
            use WarningKind::*;
            assert_eq!(
                kinds,
                [
                    PeerWithoutPodCidr,
                    PeerWithoutAddress,
                    PeerWithoutAddress,
                    UnroutablePodCidr,
                    UnroutablePodCidr,
                    UnroutablePodCidr,
                    // steals-mine, and both claimants of 10.244.6.0/24.
                    PodCidrConflict,
                    PodCidrConflict,
                    PodCidrConflict
                ],
                "{mode:?}: {:?}",
                plan.warnings
            );
            // Known but incomplete peers keep what is installed, and so does a contested CIDR
            // nobody held; hostile CIDRs get nothing.
            assert_eq!(
                plan.retained,
                vec![net("10.244.4.0/24"), net("10.244.6.0/24"), net("fd00:244:8::/64")],
                "{mode:?}"
            );
            let masq = cluster_cidrs(&[], &local, &plan);
            assert!(
                !masq.iter().any(|c| c.prefix_len() == 0 || c.contains(&ip("10.0.0.1"))),
                "{masq:?}"
            );
        }
        // An IPv6-only cluster routes natively over IPv6, and VXLAN uses an IPv6 underlay.
        let v6 = info("m1", &["fd00::1"], &["fd00:244:1::/64"]);
        let nodes = vec![v6.clone(), info("m2", &["fd00::2"], &["fd00:244:2::/64"])];
        let plan = first_pass(&v6, &nodes, RoutingMode::Native, &[]);
        assert_eq!(plan.peers["m2"][0].via, Via::Native { gateway: ip("fd00::2") });
        let plan = first_pass(&v6, &nodes, RoutingMode::Vxlan, &[]);
        assert_eq!(plan.vxlan.unwrap().local, ip("fd00::1"));
        // A local node without addresses can still route natively, but gets no VXLAN endpoint.
        let lonely = info("x", &[], &["10.244.9.0/24"]);
        let plan = first_pass(
            &lonely,
            &[lonely.clone(), info("y", &["10.0.0.2"], &["10.244.2.0/24"])],
            RoutingMode::Vxlan,
            &[],
        );
        assert!(plan.peers.is_empty() && plan.vxlan.is_none() && !plan.warnings.is_empty());
    }

    #[test]
    fn a_contested_cidr_stays_with_its_holder_through_delete_and_recreate() {
        let local = info("n1", &["10.200.0.11"], &["10.244.1.0/24"]);
        let at = |secs: i64| Some(Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap()));
        let mut n2 = info("n2", &["10.200.0.12"], &["10.244.2.0/24"]);
        n2.created = at(1_700_000_000);
        let mut h_dup = info("h-dup", &["10.200.0.66"], &["10.244.2.0/24"]);
        h_dup.created = at(1_700_000_100);
        let routed_to = |plan: &RoutingPlan| -> Vec<String> {
            plan.peers
                .iter()
                .filter(|(_, r)| r.iter().any(|r| r.cidr == net("10.244.2.0/24")))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let conflict_warned = |plan: &RoutingPlan| {
            plan.warnings
                .iter()
                .any(|w| w.kind == WarningKind::PodCidrConflict && w.message.contains("h-dup"))
        };
        // n2 holds it; h-dup appears and is refused.
        let p1 = next(&local, &[local.clone(), n2.clone()], &RoutingPlan::default());
        assert_eq!(routed_to(&p1), ["n2"]);
        let p2 = next(&local, &[local.clone(), n2.clone(), h_dup.clone()], &p1);
        assert_eq!(routed_to(&p2), ["n2"]);
        assert!(conflict_warned(&p2), "{:?}", p2.warnings);
        // `kubectl delete node n2`: h-dup is alone, but its claim stays disputed.
        let p3 = next(&local, &[local.clone(), h_dup.clone()], &p2);
        assert!(routed_to(&p3).is_empty(), "{:?}", p3.peers);
        assert!(conflict_warned(&p3));
        // n2 re-created from its JSON, now younger than h-dup: it gets its CIDR back.
        let mut n2_again = n2.clone();
        n2_again.created = at(1_700_000_200);
        let p4 = next(&local, &[local.clone(), h_dup.clone(), n2_again.clone()], &p3);
        assert_eq!(routed_to(&p4), ["n2"]);
        assert!(conflict_warned(&p4));
        // n2's podCIDRs patched to garbage: it keeps nothing new, and h-dup still gets nothing.
        let mut n2_garbage = n2_again.clone();
        n2_garbage.pod_cidrs = vec![];
        let p5 = next(&local, &[local.clone(), h_dup.clone(), n2_garbage], &p4);
        assert!(routed_to(&p5).is_empty());
        assert!(conflict_warned(&p5));
        // The conflict ends when h-dup stops claiming: the warnings stop, n2 is routed again.
        let mut h_fixed = h_dup.clone();
        h_fixed.pod_cidrs = vec![net("10.244.9.0/24")];
        let p6 = next(&local, &[local.clone(), h_fixed, n2_again], &p5);
        assert_eq!(routed_to(&p6), ["n2"]);
        assert!(!conflict_warned(&p6) && p6.disputes.is_empty(), "{:?}", p6.warnings);
        assert_eq!(p6.peers["h-dup"][0].cidr, net("10.244.9.0/24"));
    }

    #[test]
    fn two_claimants_that_never_held_it_both_wait_and_what_is_installed_stays() {
        let local = info("n1", &["10.0.0.1"], &["10.244.1.0/24"]);
        let a = info("a", &["10.0.0.2"], &["10.244.2.0/24"]);
        let b = info("b", &["10.0.0.3"], &["10.244.2.0/25"]);
        let plan = next(&local, &[local.clone(), a, b], &RoutingPlan::default());
        assert!(plan.peers.is_empty());
        assert_eq!(plan.retained, vec![net("10.244.2.0/24"), net("10.244.2.0/25")]);
        assert_eq!(
            plan.warnings
                .iter()
                .filter(|w| w.kind == WarningKind::PodCidrConflict)
                .count(),
            2
        );
    }

    #[test]
    fn peers_with_impossible_addresses_are_refused_with_warnings() {
        let local = info("n1", &["10.200.0.11"], &["10.244.1.0/24"]);
        let nodes = vec![
            local.clone(),
            info("n2", &["10.200.0.12"], &["10.244.2.0/24"]),
            // This node's own address, another of its addresses, a pod's address, an address
            // inside the cluster CIDRs, and n2's address.
            info("mine", &["10.200.0.11"], &["10.244.40.0/24"]),
            info("my-other", &["192.168.50.1"], &["10.244.41.0/24"]),
            info("in-pods", &["10.244.2.17"], &["10.244.42.0/24"]),
            info("in-cluster", &["10.250.0.1"], &["10.244.43.0/24"]),
            info("copies-n2", &["10.200.0.12"], &["10.244.44.0/24"]),
        ];
        let local_addresses = [ip("10.200.0.11"), ip("192.168.50.1")];
        let cluster = [net("10.244.0.0/16"), net("10.250.0.0/16")];
        let empty = RoutingPlan::default();
        for mode in [RoutingMode::Native, RoutingMode::Vxlan] {
            let inputs = RoutingInputs {
                mode,
                connected: &[],
                local_addresses: &local_addresses,
                cluster_cidrs: &cluster,
                previous: &empty,
            };
            let first = plan_routes(&local, &nodes[..2], inputs);
            let plan = plan_routes(
                &local,
                &nodes,
                RoutingInputs {
                    previous: &first,
                    ..inputs
                },
            );
            assert_eq!(plan.peers.keys().collect::<Vec<_>>(), ["n2"], "{mode:?}: {plan:?}");
            assert!(plan.retained.is_empty(), "{mode:?}: {:?}", plan.retained);
            let warned: Vec<&str> = plan
                .warnings
                .iter()
                .filter(|w| w.kind == WarningKind::ImpossiblePeerAddress)
                .map(|w| w.message.as_str())
                .collect();
            assert_eq!(warned.len(), 5, "{mode:?}: {warned:?}");
            for name in ["mine", "my-other", "in-pods", "in-cluster", "copies-n2"] {
                assert!(
                    warned.iter().any(|m| m.starts_with(&format!("node {name}:"))),
                    "{mode:?}: no warning for {name}: {warned:?}"
                );
            }
            assert!(plan.routes().all(|r| match r.via {
                Via::Native { gateway } => gateway == ip("10.200.0.12"),
                Via::Vxlan { vtep, .. } => vtep == ip("10.200.0.12"),
            }));
        }
    }

    #[test]
    fn a_hostile_cidr_over_a_peers_address_never_cuts_the_peer_off() {
        // n2 lives on another subnet (reached through VXLAN); y claims the subnet as its PodCIDR.
        let local = info("n1", &["10.200.0.11"], &["10.244.1.0/24"]);
        let n2 = info("n2", &["10.201.0.12"], &["10.244.2.0/24"]);
        let y = info("y", &["10.200.0.99"], &["10.201.0.0/24"]);
        let vxlan = |previous: &RoutingPlan, nodes: &[NodeInfo]| {
            plan_routes(
                &local,
                nodes,
                RoutingInputs {
                    mode: RoutingMode::Vxlan,
                    connected: &[net("10.200.0.0/24")],
                    local_addresses: &local.internal_ips,
                    cluster_cidrs: &[],
                    previous,
                },
            )
        };
        // n2 was routed first: it stays, y's CIDR is refused, pass after pass.
        let p1 = vxlan(&RoutingPlan::default(), &[local.clone(), n2.clone()]);
        let p2 = vxlan(&p1, &[local.clone(), n2.clone(), y.clone()]);
        let p3 = vxlan(&p2, &[local.clone(), n2.clone(), y.clone()]);
        for plan in [&p2, &p3] {
            assert_eq!(plan.peers.keys().collect::<Vec<_>>(), ["n2"], "{plan:?}");
            assert!(plan.retained.is_empty());
            assert!(
                plan.warnings
                    .iter()
                    .any(|w| w.kind == WarningKind::UnroutablePodCidr && w.message.contains("node y:")),
                "{:?}",
                plan.warnings
            );
        }
        // Neither routed before (a fresh node): neither is used, what is installed stays.
        let fresh = vxlan(&RoutingPlan::default(), &[local.clone(), n2.clone(), y.clone()]);
        assert!(fresh.peers.is_empty(), "{:?}", fresh.peers);
        assert_eq!(fresh.retained, vec![net("10.201.0.0/24"), net("10.244.2.0/24")]);
        let again = vxlan(&fresh, &[local.clone(), n2, y]);
        assert_eq!(again.peers, fresh.peers);
        assert_eq!(again.retained, fresh.retained);
    }

    #[test]
    fn a_contested_peer_keeps_only_cidrs_that_could_be_routed() {
        let local = info("n1", &["10.0.0.1"], &["10.244.1.0/24"]);
        // Two nodes with one address, neither routed before; one also claims a /0.
        let a = info("a", &["10.0.0.2"], &["10.244.2.0/24"]);
        let mut b = info("b", &["10.0.0.2"], &["10.244.3.0/24"]);
        b.pod_cidrs.push(net("::/0"));
        let plan = first_pass(
            &local,
            &[local.clone(), a, b],
            RoutingMode::Native,
            &[net("10.0.0.0/24")],
        );
        assert!(plan.peers.is_empty());
        assert_eq!(plan.retained, vec![net("10.244.2.0/24"), net("10.244.3.0/24")]);
        let masq = cluster_cidrs(&[], &local, &plan);
        assert!(!masq.iter().any(|c| c.prefix_len() == 0), "{masq:?}");
    }

    #[test]
    fn an_address_dispute_ends_when_its_holder_gives_the_address_up() {
        let local = info("n1", &["10.0.0.1"], &["10.244.1.0/24"]);
        let old = info("old", &["10.0.0.7"], &["10.244.7.0/24"]);
        let replacement = info("replacement", &["10.0.0.7"], &["10.244.8.0/24"]);
        let p1 = next(&local, &[local.clone(), old.clone()], &RoutingPlan::default());
        let p2 = next(&local, &[local.clone(), old.clone(), replacement.clone()], &p1);
        assert_eq!(p2.peers.keys().collect::<Vec<_>>(), ["old"]);
        assert_eq!(p2.disputes.len(), 1, "{:?}", p2.disputes);
        // The dead node's object is deleted: the replacement gets routed.
        let p3 = next(&local, &[local.clone(), replacement.clone()], &p2);
        assert_eq!(p3.peers.keys().collect::<Vec<_>>(), ["replacement"]);
        assert!(p3.disputes.is_empty());
    }

    #[test]
    fn mtu_and_cluster_cidrs() {
        assert_eq!(pod_mtu(1500, RoutingMode::Native, false), 1500);
        assert_eq!(pod_mtu(1500, RoutingMode::Vxlan, false), 1450);
        assert_eq!(pod_mtu(1500, RoutingMode::Auto, true), 1430);
        let a = info("a", &["10.0.0.1", "fd01::1"], &["10.244.0.0/24"]);
        let nodes = vec![
            a.clone(),
            info("b", &["10.0.0.2", "fd01::2"], &["10.244.1.0/24", "fd00::/64"]),
            info("evil", &["10.0.0.3"], &["0.0.0.0/0"]),
        ];
        let plan = first_pass(&a, &nodes, RoutingMode::Native, &[]);
        // The hostile /0 does not make it into the masquerade set.
        assert_eq!(
            cluster_cidrs(&[], &a, &plan),
            vec![net("10.244.0.0/23"), net("fd00::/64")]
        );
        assert_eq!(
            cluster_cidrs(&[net("10.244.0.0/16")], &a, &plan),
            vec![net("10.244.0.0/16")]
        );
    }
}
