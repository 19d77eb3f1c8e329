//! The agent's routes: one per peer PodCIDR (via the peer's address, or through the VXLAN
//! device) and an `unreachable` route covering each local PodCIDR, so that a packet for an
//! address no pod holds gets ICMP unreachable at once instead of following the default route
//! back out to the underlay.
//!
//! Read back from the kernel ([`observe`]), diffed against the desired state ([`diff`], pure),
//! applied ([`apply`]). Ownership is explicit: the agent's routes carry route protocol
//! [`ROUTE_PROTOCOL_AGENT`] in the main table, so after a restart the agent finds its own, adopts
//! what is right and removes what is stale, and never touches anyone else's routes.
use std::net::IpAddr;

use ferrynet_kernel::{
    ids::{MAIN_TABLE, ROUTE_PROTOCOL_AGENT},
    netlink::{Netlink, NetlinkError, NetlinkRequest, RouteSpec, inspect},
};
use ipnet::IpNet;
use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};
use serde::{Deserialize, Serialize};

use crate::{
    node::topology::{RoutingPlan, Via},
    warning::{ErrorList, Warning, WarningKind},
};

/// Where an agent route sends traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum RouteTarget {
    /// Via a peer's address on the shared segment (native routing).
    Gateway { gateway: IpAddr },
    /// Via a peer's inner address on the VXLAN device, on-link.
    Vxlan { inner: IpAddr, device: u32 },
    /// Nothing: `unreachable`, for the local PodCIDR's unallocated addresses.
    Unreachable,
}

/// One route the agent wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AgentRoute {
    pub dst: IpNet,
    pub target: RouteTarget,
}

/// One of the agent's routes as the kernel has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObservedRoute {
    pub dst: IpNet,
    pub unreachable: bool,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

impl ObservedRoute {
    /// Whether the kernel's route already does what `want` asks.
    fn satisfies(&self, want: &AgentRoute) -> bool {
        match want.target {
            RouteTarget::Unreachable => self.unreachable,
            RouteTarget::Gateway { gateway } => !self.unreachable && self.gateway == Some(gateway),
            RouteTarget::Vxlan { inner, device } => {
                !self.unreachable && self.gateway == Some(inner) && self.oif == Some(device)
            }
        }
    }
}

/// One change to the agent's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOp {
    /// A destination the agent does not route yet: added exclusively, so that someone else's
    /// route to it is never overwritten.
    Add(AgentRoute),
    /// One of the agent's routes that goes to the wrong place.
    Replace(AgentRoute),
    /// One of the agent's routes that is no longer wanted.
    Delete(ObservedRoute),
}

/// The routes `plan` asks for, plus an `unreachable` route for each local PodCIDR. VXLAN routes
/// need the device's index: without a device there are none.
pub fn desired(plan: &RoutingPlan, local_pod_cidrs: &[IpNet], vxlan_device: Option<u32>) -> Vec<AgentRoute> {
    let mut routes: Vec<AgentRoute> = local_pod_cidrs
        .iter()
        .map(|cidr| AgentRoute {
            dst: *cidr,
            target: RouteTarget::Unreachable,
        })
        .collect();
    for route in plan.routes() {
        let target = match route.via {
            Via::Native { gateway } => RouteTarget::Gateway { gateway },
            Via::Vxlan { inner, .. } => match vxlan_device {
                Some(device) => RouteTarget::Vxlan { inner, device },
                None => continue,
            },
        };
        routes.push(AgentRoute {
            dst: route.cidr,
            target,
        });
    }
    routes.sort();
    routes
}

/// The changes that make `observed` into `desired` (pure). Routes to `retained` destinations
/// (peers that are momentarily incomplete) are left as they are.
pub fn diff(observed: &[ObservedRoute], desired: &[AgentRoute], retained: &[IpNet]) -> Vec<RouteOp> {
    let mut ops = Vec::new();
    for have in observed {
        if !desired.iter().any(|want| want.dst == have.dst) && !retained.contains(&have.dst) {
            ops.push(RouteOp::Delete(*have));
        }
    }
    for want in desired {
        match observed.iter().find(|have| have.dst == want.dst) {
            Some(have) if have.satisfies(want) => {}
            Some(_) => ops.push(RouteOp::Replace(*want)),
            None => ops.push(RouteOp::Add(*want)),
        }
    }
    ops
}

/// The agent's routes now in the kernel (protocol [`ROUTE_PROTOCOL_AGENT`], main table).
pub fn observe(netlink: &mut Netlink) -> Result<Vec<ObservedRoute>, NetlinkError> {
    let mut all = netlink.routes(true)?;
    all.extend(netlink.routes(false)?);
    Ok(all
        .iter()
        .filter(|r| {
            inspect::route_protocol(r) == RouteProtocol::Other(ROUTE_PROTOCOL_AGENT)
                && inspect::route_table(r) == MAIN_TABLE
        })
        .filter_map(|r| {
            Some(ObservedRoute {
                dst: inspect::route_dst(r)?,
                unreachable: inspect::route_kind(r) == RouteType::Unreachable,
                gateway: inspect::route_gateway(r),
                oif: inspect::route_oif(r),
            })
        })
        .collect())
}

/// What applying route changes did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteApplyReport {
    pub applied: usize,
    /// Changes refused for a reason that is the world's, not ours (someone else's route, a peer
    /// not reachable directly): retried at every pass.
    pub warnings: Vec<Warning>,
}

/// Applies `ops` in one netlink batch. Every change is attempted; failures that are not warnings
/// come back as a list.
pub fn apply(netlink: &mut Netlink, ops: &[RouteOp]) -> Result<RouteApplyReport, ErrorList<NetlinkError>> {
    let requests: Vec<NetlinkRequest> = ops
        .iter()
        .map(|op| match op {
            RouteOp::Add(route) => NetlinkRequest::add_route(&spec(route)),
            RouteOp::Replace(route) => NetlinkRequest::replace_route(&spec(route)),
            RouteOp::Delete(have) => NetlinkRequest::delete_route(&RouteSpec {
                kind: if have.unreachable {
                    RouteType::Unreachable
                } else {
                    RouteType::Unicast
                },
                ..RouteSpec::new(have.dst, RouteProtocol::Other(ROUTE_PROTOCOL_AGENT))
            }),
        })
        .collect();
    let mut report = RouteApplyReport::default();
    let mut failures = ErrorList::default();
    let results = netlink.apply_each(requests).map_err(|e| ErrorList(vec![e]))?;
    for result in results {
        match result {
            Ok(()) => report.applied += 1,
            Err(e) if e.is_exists() => report.warnings.push(Warning::new(
                WarningKind::RouteCollision,
                format!("{}: another route has that destination; not touching it", e.op),
            )),
            // One peer this node cannot reach directly (its address is not on this node's
            // segment, say) must not hold up the others: it is reported, and retried.
            Err(e) if matches!(e.errno(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => {
                report.warnings.push(Warning::new(
                    WarningKind::PeerUnreachable,
                    format!(
                        "{e}: the peer's address is not reachable directly from here (native routing needs one L2 segment; use vxlan or auto); retrying"
                    ),
                ))
            }
            Err(e) if e.is_not_found() && e.op.starts_with("delete") => report.applied += 1,
            Err(e) => failures.push(e),
        }
    }
    failures.into_result().map(|()| report)
}

fn spec(route: &AgentRoute) -> RouteSpec {
    let base = RouteSpec {
        scope: RouteScope::Universe,
        ..RouteSpec::new(route.dst, RouteProtocol::Other(ROUTE_PROTOCOL_AGENT))
    };
    match route.target {
        RouteTarget::Gateway { gateway } => RouteSpec {
            gateway: Some(gateway),
            ..base
        },
        RouteTarget::Vxlan { inner, device } => RouteSpec {
            gateway: Some(inner),
            oif: Some(device),
            onlink: true,
            ..base
        },
        RouteTarget::Unreachable => RouteSpec {
            kind: RouteType::Unreachable,
            ..base
        },
    }
}

/// The node's underlay interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// Subnets the uplink is directly attached to (for `auto` mode).
    pub connected: Vec<IpNet>,
}

/// Why the uplink could not be found.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink {0} does not exist")]
    Missing(String),
    #[error("no interface holds this node's InternalIPs {0:?}")]
    NoInterface(Vec<IpAddr>),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Finds the uplink: the named interface, or the one holding one of the node's InternalIPs.
pub fn find_uplink(netlink: &mut Netlink, name: Option<&str>, internal_ips: &[IpAddr]) -> Result<Uplink, UplinkError> {
    let addresses = netlink.addresses(None)?;
    let link = match name {
        Some(name) => netlink
            .link_by_name(name)?
            .ok_or_else(|| UplinkError::Missing(name.to_string()))?,
        None => {
            let index = addresses
                .iter()
                .find(|(_, a)| internal_ips.contains(&a.addr()))
                .map(|(i, _)| *i)
                .ok_or_else(|| UplinkError::NoInterface(internal_ips.to_vec()))?;
            netlink
                .links()?
                .into_iter()
                .find(|l| l.header.index == index)
                .ok_or_else(|| UplinkError::NoInterface(internal_ips.to_vec()))?
        }
    };
    let index = link.header.index;
    let connected = addresses
        .iter()
        .filter(|(i, a)| *i == index && !a.addr().is_loopback() && !is_link_local(a.addr()))
        .map(|(_, a)| a.trunc())
        .collect();
    Ok(Uplink {
        name: inspect::link_name(&link).unwrap_or_default().to_string(),
        index,
        mtu: inspect::link_mtu(&link).unwrap_or(1500),
        connected,
    })
}

pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::topology::PeerRoute;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gateway(dst: &str, gw: &str) -> AgentRoute {
        AgentRoute {
            dst: net(dst),
            target: RouteTarget::Gateway { gateway: ip(gw) },
        }
    }

    fn seen(dst: &str, gateway: Option<&str>, oif: Option<u32>, unreachable: bool) -> ObservedRoute {
        ObservedRoute {
            dst: net(dst),
            unreachable,
            gateway: gateway.map(ip),
            oif,
        }
    }

    #[test]
    fn desired_routes_cover_the_local_pod_cidrs_with_unreachable_and_route_every_peer() {
        let mut plan = RoutingPlan::default();
        plan.peers.insert(
            "n2".into(),
            vec![PeerRoute {
                cidr: net("10.244.2.0/24"),
                via: Via::Native {
                    gateway: ip("10.0.0.2"),
                },
            }],
        );
        plan.peers.insert(
            "n3".into(),
            vec![PeerRoute {
                cidr: net("10.244.3.0/24"),
                via: Via::Vxlan {
                    vtep: ip("10.1.0.3"),
                    inner: ip("10.244.3.0"),
                    mac: [2, 0, 0, 0, 0, 3],
                },
            }],
        );
        let local = [net("10.244.1.0/24"), net("fd00:244:1::/64")];
        let routes = desired(&plan, &local, Some(9));
        assert_eq!(
            routes,
            vec![
                AgentRoute {
                    dst: net("10.244.1.0/24"),
                    target: RouteTarget::Unreachable
                },
                gateway("10.244.2.0/24", "10.0.0.2"),
                AgentRoute {
                    dst: net("10.244.3.0/24"),
                    target: RouteTarget::Vxlan {
                        inner: ip("10.244.3.0"),
                        device: 9
                    }
                },
                AgentRoute {
                    dst: net("fd00:244:1::/64"),
                    target: RouteTarget::Unreachable
                },
            ]
        );
        // Without a VXLAN device there is nothing to route through it (yet).
        assert_eq!(desired(&plan, &local, None).len(), 3);
    }

    #[test]
    fn diff_adds_what_is_missing_replaces_what_is_wrong_and_deletes_what_is_stale() {
        let observed = vec![
            seen("10.244.2.0/24", Some("10.0.0.2"), Some(2), false),
            seen("10.244.3.0/24", Some("10.0.0.99"), Some(2), false),
            seen("10.244.4.0/24", Some("10.0.0.4"), Some(2), false),
            seen("10.244.5.0/24", Some("10.0.0.5"), Some(2), false),
        ];
        let desired = vec![
            AgentRoute {
                dst: net("10.244.1.0/24"),
                target: RouteTarget::Unreachable,
            },
            gateway("10.244.2.0/24", "10.0.0.2"),
            gateway("10.244.3.0/24", "10.0.0.3"),
        ];
        let ops = diff(&observed, &desired, &[net("10.244.5.0/24")]);
        assert_eq!(
            ops,
            vec![
                RouteOp::Delete(observed[2]),
                RouteOp::Add(desired[0]),
                RouteOp::Replace(desired[2]),
            ]
        );
        // Converged: nothing to do.
        let converged = vec![
            seen("10.244.1.0/24", None, None, true),
            seen("10.244.2.0/24", Some("10.0.0.2"), Some(2), false),
            seen("10.244.3.0/24", Some("10.0.0.3"), Some(2), false),
        ];
        assert!(diff(&converged, &desired, &[]).is_empty());
    }

    #[test]
    fn diff_tells_route_kinds_and_devices_apart() {
        // A unicast route where an unreachable one belongs, and the reverse.
        let want = AgentRoute {
            dst: net("10.244.1.0/24"),
            target: RouteTarget::Unreachable,
        };
        let ops = diff(&[seen("10.244.1.0/24", Some("10.0.0.9"), Some(2), false)], &[want], &[]);
        assert_eq!(ops, vec![RouteOp::Replace(want)]);
        let want = gateway("10.244.1.0/24", "10.0.0.9");
        let ops = diff(&[seen("10.244.1.0/24", None, None, true)], &[want], &[]);
        assert_eq!(ops, vec![RouteOp::Replace(want)]);
        // A VXLAN route through a device that was recreated (new index).
        let want = AgentRoute {
            dst: net("10.244.3.0/24"),
            target: RouteTarget::Vxlan {
                inner: ip("10.244.3.0"),
                device: 12,
            },
        };
        let ops = diff(
            &[seen("10.244.3.0/24", Some("10.244.3.0"), Some(11), false)],
            &[want],
            &[],
        );
        assert_eq!(ops, vec![RouteOp::Replace(want)]);
    }
}
