//! Applies a [`RoutingPlan`] to the kernel: routes to peers' PodCIDRs, and the VXLAN device with
//! its forwarding and neighbour entries. Only differences are applied.
//!
//! Ownership is explicit: the agent's routes carry route protocol [`ROUTE_PROTOCOL`] and its
//! device is [`VXLAN_DEVICE`]. After a restart the agent finds its own state by these marks,
//! adopts what is right and removes what is stale, and never touches anyone else's routes.
use std::{collections::BTreeSet, net::IpAddr, path::Path};

use anyhow::{Context, Result, bail};
use ferrynet_cni::netlink::{Change, Netlink, RouteSpec, VxlanSpec, inspect};
use ipnet::IpNet;
use netlink_packet_route::{
    link::InfoKind,
    route::{RouteMessage, RouteProtocol, RouteScope},
};

use crate::topology::{RoutingPlan, Via, vxlan_overhead};

/// Route protocol id of the agent's routes (`ip route show proto 114`). The CNI's pod routes use
/// 113.
pub const ROUTE_PROTOCOL: u8 = 114;
pub const VXLAN_DEVICE: &str = "ferrynet.vxlan";
const MAIN_TABLE: u32 = 254;

/// The node's underlay interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// Subnets the uplink is directly attached to (for `auto` mode).
    pub connected: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct VxlanSettings {
    pub vni: u32,
    pub port: u16,
}

/// How many kernel objects an apply changed, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Changes {
    pub routes: usize,
    pub vxlan_device: usize,
    pub vxlan_entries: usize,
}

impl Changes {
    pub fn total(&self) -> usize {
        self.routes + self.vxlan_device + self.vxlan_entries
    }
}

pub struct Router {
    netlink: Netlink,
    vxlan: VxlanSettings,
}

impl Router {
    /// A router for the calling thread's network namespace (the node's).
    pub fn new(vxlan: VxlanSettings) -> Result<Self> {
        Ok(Self {
            netlink: Netlink::current().context("netlink socket")?,
            vxlan,
        })
    }

    /// Finds the uplink: the named interface, or the one holding one of the node's InternalIPs.
    pub fn uplink(&mut self, name: Option<&str>, internal_ips: &[IpAddr]) -> Result<Uplink> {
        let addresses = self.netlink.addresses(None)?;
        let link = match name {
            Some(name) => self
                .netlink
                .link_by_name(name)?
                .with_context(|| format!("uplink {name} does not exist"))?,
            None => {
                let index = addresses
                    .iter()
                    .find(|(_, a)| internal_ips.contains(&a.addr()))
                    .map(|(i, _)| *i)
                    .with_context(|| format!("no interface holds this node's InternalIPs {internal_ips:?}"))?;
                self.netlink
                    .links()?
                    .into_iter()
                    .find(|l| l.header.index == index)
                    .context("uplink vanished")?
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

    /// Makes the kernel match `plan`. Applies only differences; returns what changed, and
    /// warnings about what it refused to do.
    ///
    /// Only the agent's own routes (protocol 114) are ever replaced or deleted. A desired route
    /// whose destination someone else already routes is added exclusively, and the collision is
    /// reported, never overwritten. Routes of retained (momentarily incomplete) peers stay.
    pub fn apply(&mut self, plan: &RoutingPlan, uplink: &Uplink) -> Result<(Changes, Vec<String>)> {
        let mut changes = Changes::default();
        let mut warnings = Vec::new();
        let vxlan_index = self.apply_vxlan(plan, uplink, &mut changes)?;

        let mut desired: Vec<RouteSpec> = Vec::new();
        for route in plan.routes() {
            let spec = match route.via {
                Via::Native { gateway } => RouteSpec {
                    gateway: Some(gateway),
                    ..agent_route(route.cidr)
                },
                Via::Vxlan { inner, .. } => {
                    let Some(index) = vxlan_index else { continue };
                    RouteSpec {
                        gateway: Some(inner),
                        oif: Some(index),
                        onlink: true,
                        ..agent_route(route.cidr)
                    }
                }
            };
            desired.push(spec);
        }
        let current = self.agent_routes()?;
        let mut batch = Vec::new();
        for route in &current {
            let Some(dst) = inspect::route_dst(route) else { continue };
            if !desired.iter().any(|d| d.dst == dst) && !plan.retained.contains(&dst) {
                batch.push(Change::delete_route(&agent_route(dst)));
            }
        }
        for spec in &desired {
            let ours = current.iter().find(|r| inspect::route_dst(r) == Some(spec.dst));
            match ours {
                Some(r)
                    if inspect::route_gateway(r) == spec.gateway
                        && spec.oif.is_none_or(|oif| inspect::route_oif(r) == Some(oif)) => {}
                Some(_) => batch.push(Change::replace_route(spec)),
                None => batch.push(Change::add_route(spec)),
            }
        }
        let results = self.netlink.apply_each(batch).context("routes to peers")?;
        let mut failures = Vec::new();
        for result in results {
            match result {
                Ok(()) => changes.routes += 1,
                Err(e) if e.is_exists() => {
                    warnings.push(format!("{}: another route has that destination; not touching it", e.op))
                }
                // One peer this node cannot reach directly (its address is not on this node's
                // segment, say) must not hold up the others: it is reported, and retried at
                // every pass.
                Err(e) if matches!(e.errno(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => {
                    warnings.push(format!("{e}: the peer's address is not reachable directly from here (native routing needs one L2 segment; use vxlan or auto); retrying"))
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        if !failures.is_empty() {
            bail!("routes to peers: {}", failures.join("; "));
        }
        Ok((changes, warnings))
    }

    /// The agent's routes now in the kernel (protocol 114, main table).
    pub fn agent_routes(&mut self) -> Result<Vec<RouteMessage>> {
        let mut all = self.netlink.routes(true)?;
        all.extend(self.netlink.routes(false)?);
        all.retain(|r| {
            inspect::route_protocol(r) == RouteProtocol::Other(ROUTE_PROTOCOL) && inspect::route_table(r) == MAIN_TABLE
        });
        Ok(all)
    }

    fn apply_vxlan(&mut self, plan: &RoutingPlan, uplink: &Uplink, changes: &mut Changes) -> Result<Option<u32>> {
        let existing = self.netlink.link_by_name(VXLAN_DEVICE)?;
        let Some(vtep) = &plan.vxlan else {
            if let Some(link) = existing {
                // Routes through the device go with it.
                self.netlink.apply(Change::delete_link(link.header.index))?;
                changes.vxlan_device += 1;
            }
            return Ok(None);
        };
        let mtu = uplink.mtu.saturating_sub(vxlan_overhead(vtep.local.is_ipv6()));
        let matches = existing.as_ref().is_some_and(|l| {
            inspect::link_kind(l) == Some(&InfoKind::Vxlan)
                && inspect::vxlan_params(l) == Some((self.vxlan.vni, Some(vtep.local), Some(self.vxlan.port)))
                && inspect::link_mac(l) == Some(vtep.mac)
        });
        let link = match (existing, matches) {
            (Some(link), true) => link,
            (existing, _) => {
                if let Some(old) = existing {
                    self.netlink.apply(Change::delete_link(old.header.index))?;
                }
                self.netlink.apply(Change::create_vxlan(&VxlanSpec {
                    name: VXLAN_DEVICE,
                    vni: self.vxlan.vni,
                    local: vtep.local,
                    underlay: uplink.index,
                    port: self.vxlan.port,
                    mac: vtep.mac,
                    mtu,
                }))?;
                changes.vxlan_device += 1;
                self.netlink
                    .link_by_name(VXLAN_DEVICE)?
                    .context("VXLAN device vanished after creation")?
            }
        };
        let index = link.header.index;
        let mut batch = Vec::new();
        if inspect::link_mtu(&link) != Some(mtu) {
            batch.push(Change::set_mtu(index, mtu));
        }
        if !inspect::link_is_up(&link) {
            batch.push(Change::link_up(index));
        }
        // Global addresses: exactly the local PodCIDRs' network addresses.
        let addrs: Vec<IpNet> = self
            .netlink
            .addresses(Some(index))?
            .into_iter()
            .map(|(_, a)| a)
            .filter(|a| !is_link_local(a.addr()))
            .collect();
        for want in &vtep.inner {
            if !addrs.contains(want) {
                batch.push(Change::add_address(index, *want, true));
            }
        }
        for have in &addrs {
            if !vtep.inner.contains(have) {
                batch.push(Change::delete_address(index, *have));
            }
        }
        changes.vxlan_device += batch.len();
        self.netlink.apply_all(batch).context("VXLAN device")?;

        // Forwarding entries (peer MAC -> peer underlay address) and neighbour entries (peer's
        // inner address -> peer MAC).
        let mut fdb_want = BTreeSet::new();
        let mut neigh_want = BTreeSet::new();
        for route in plan.routes() {
            if let Via::Vxlan { vtep, inner, mac } = route.via {
                fdb_want.insert((mac, vtep));
                neigh_want.insert((inner, mac));
            }
        }
        let fdb_have: BTreeSet<([u8; 6], IpAddr)> = self
            .netlink
            .fdb(index)?
            .into_iter()
            .filter_map(|(mac, dst)| Some((mac, dst?)))
            .collect();
        let mut neigh_have = BTreeSet::new();
        for v4 in [true, false] {
            for n in self.netlink.neighbours(index, v4)? {
                if let (Some(ip), Some(mac), true) = (
                    inspect::neighbour_ip(&n),
                    inspect::neighbour_mac(&n),
                    inspect::neighbour_is_permanent(&n),
                ) {
                    neigh_have.insert((ip, mac));
                }
            }
        }
        // Entries of retained (momentarily incomplete) peers stay with their routes.
        let retained: BTreeSet<IpAddr> = plan.retained.iter().map(IpNet::network).collect();
        let retained_macs: BTreeSet<[u8; 6]> = neigh_have
            .iter()
            .filter(|(ip, _)| retained.contains(ip))
            .map(|(_, mac)| *mac)
            .collect();
        let mut batch = Vec::new();
        for (mac, dst) in fdb_have.difference(&fdb_want) {
            if !retained_macs.contains(mac) {
                batch.push(Change::delete_fdb_entry(index, *mac, Some(*dst)));
            }
        }
        for (ip, _) in neigh_have.difference(&neigh_want) {
            if !neigh_want.iter().any(|(want_ip, _)| want_ip == ip) && !retained.contains(ip) {
                batch.push(Change::delete_neighbour(index, *ip));
            }
        }
        for (mac, dst) in fdb_want.difference(&fdb_have) {
            batch.push(Change::fdb_entry(index, *mac, *dst));
        }
        for (ip, mac) in neigh_want.difference(&neigh_have) {
            batch.push(Change::permanent_neighbour(index, *ip, *mac));
        }
        changes.vxlan_entries = batch.len();
        for change in &batch {
            tracing::debug!("VXLAN: {change:?}");
        }
        self.netlink.apply_all(batch).context("VXLAN forwarding entries")?;
        Ok(Some(index))
    }

    /// Removes everything the agent owns in the kernel: its routes and its VXLAN device.
    pub fn teardown(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(link) = self.netlink.link_by_name(VXLAN_DEVICE)?
            && let Err(e) = self.netlink.apply(Change::delete_link(link.header.index))
        {
            errors.push(e.to_string());
        }
        for route in self.agent_routes()? {
            if let Some(dst) = inspect::route_dst(&route)
                && let Err(e) = self.netlink.apply(Change::delete_route(&agent_route(dst)))
                && !e.is_not_found()
            {
                errors.push(e.to_string());
            }
        }
        if !errors.is_empty() {
            bail!("teardown: {}", errors.join("; "));
        }
        Ok(())
    }
}

fn agent_route(dst: IpNet) -> RouteSpec {
    RouteSpec {
        scope: RouteScope::Universe,
        ..RouteSpec::new(dst, RouteProtocol::Other(ROUTE_PROTOCOL))
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Turns on IP forwarding in the calling thread's namespace (the node's): pods are routed, so
/// the node must forward. IPv6 forwarding only when there are IPv6 PodCIDRs, because it also makes
/// the kernel ignore router advertisements. Settings already on are not written: in a
/// non-privileged container `/proc/sys` is read-only, and Kubernetes nodes usually have
/// forwarding on already (kubeadm checks it). For nodes that do not, the DaemonSet mounts the
/// host's `/proc/sys/net` writable elsewhere and names it in `proc_sys_net` (the files there act
/// on the network namespace of whoever opens them: the node's, with host networking).
pub fn enable_forwarding(proc_sys_net: &Path, ipv6: bool) -> Result<()> {
    let mut settings = vec![proc_sys_net.join("ipv4/ip_forward")];
    if ipv6 {
        settings.push(proc_sys_net.join("ipv6/conf/all/forwarding"));
    }
    for path in settings {
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(&path, "1")
            .with_context(|| format!("enabling {} (turn IP forwarding on for the node)", path.display()))?;
    }
    Ok(())
}
