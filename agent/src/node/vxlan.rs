//! The VXLAN device (`ferrynet.vxlan`) and its entries: the device itself, its MTU, addresses
//! (the local PodCIDRs' network addresses), and per peer a forwarding entry (peer MAC → peer
//! underlay address) and a permanent neighbour entry (peer inner address → peer MAC).
//!
//! Read back ([`observe`]), diffed in two pure steps ([`diff_device`], then [`diff_entries`] once
//! the device exists), applied ([`apply_device`], [`apply_entries`]).
use std::{collections::BTreeSet, net::IpAddr};

use ferrynet_kernel::netlink::{Netlink, NetlinkError, NetlinkRequest, VxlanSpec, inspect};
use ipnet::IpNet;
use netlink_packet_route::link::InfoKind;

use crate::{
    node::{
        routing::{Uplink, is_link_local},
        topology::{RoutingPlan, Via, vxlan_overhead},
    },
    warning::ErrorList,
};

pub const VXLAN_DEVICE: &str = "ferrynet.vxlan";

/// VNI and UDP port, the same on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanSettings {
    pub vni: u32,
    pub port: u16,
}

/// The device and entries the plan asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVxlan {
    pub vni: u32,
    pub port: u16,
    pub local: IpAddr,
    pub mac: [u8; 6],
    pub underlay: u32,
    pub mtu: u32,
    pub addresses: BTreeSet<IpNet>,
    pub fdb: BTreeSet<([u8; 6], IpAddr)>,
    pub neighbours: BTreeSet<(IpAddr, [u8; 6])>,
    /// Inner addresses of peers that are momentarily incomplete: their entries stay.
    pub retained: BTreeSet<IpAddr>,
}

/// What a VXLAN device cannot change in place: VNI, local address, UDP port and MAC.
pub type VxlanIdentity = (u32, Option<IpAddr>, Option<u16>, Option<[u8; 6]>);

/// The device as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedVxlan {
    pub index: u32,
    /// Kind, VNI, local address, port and MAC as desired (else it must be recreated: the kernel
    /// cannot change them in place).
    pub identity: Option<VxlanIdentity>,
    pub mtu: Option<u32>,
    pub up: bool,
    pub addresses: BTreeSet<IpNet>,
    pub fdb: BTreeSet<([u8; 6], IpAddr)>,
    pub neighbours: BTreeSet<(IpAddr, [u8; 6])>,
}

/// What to do with the device itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceOp {
    Keep,
    Create,
    /// Its identity is wrong: delete it and create it again.
    Recreate {
        index: u32,
    },
    /// No peer needs VXLAN any more (routes through it go with it).
    Delete {
        index: u32,
    },
}

/// One change to the device's settings or entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryOp {
    SetMtu(u32),
    Up,
    AddAddress(IpNet),
    DeleteAddress(IpNet),
    AddFdb { mac: [u8; 6], dst: IpAddr },
    DeleteFdb { mac: [u8; 6], dst: IpAddr },
    AddNeighbour { ip: IpAddr, mac: [u8; 6] },
    DeleteNeighbour { ip: IpAddr },
}

/// What `plan` needs from the VXLAN device, if anything.
pub fn desired(plan: &RoutingPlan, settings: VxlanSettings, uplink: &Uplink) -> Option<DesiredVxlan> {
    let vtep = plan.vxlan.as_ref()?;
    let mut fdb = BTreeSet::new();
    let mut neighbours = BTreeSet::new();
    for route in plan.routes() {
        if let Via::Vxlan { vtep, inner, mac } = route.via {
            fdb.insert((mac, vtep));
            neighbours.insert((inner, mac));
        }
    }
    Some(DesiredVxlan {
        vni: settings.vni,
        port: settings.port,
        local: vtep.local,
        mac: vtep.mac,
        underlay: uplink.index,
        mtu: uplink.mtu.saturating_sub(vxlan_overhead(vtep.local.is_ipv6())),
        addresses: vtep.inner.iter().copied().collect(),
        fdb,
        neighbours,
        retained: plan.retained.iter().map(IpNet::network).collect(),
    })
}

/// Step one (pure): create, recreate, delete or keep the device.
pub fn diff_device(observed: Option<&ObservedVxlan>, desired: Option<&DesiredVxlan>) -> DeviceOp {
    match (observed, desired) {
        (None, None) => DeviceOp::Keep,
        (Some(have), None) => DeviceOp::Delete { index: have.index },
        (None, Some(_)) => DeviceOp::Create,
        (Some(have), Some(want)) => {
            if have.identity == Some((want.vni, Some(want.local), Some(want.port), Some(want.mac))) {
                DeviceOp::Keep
            } else {
                DeviceOp::Recreate { index: have.index }
            }
        }
    }
}

/// Step two (pure): the settings and entries of an existing device. Entries of retained peers
/// stay with their routes.
pub fn diff_entries(have: &ObservedVxlan, want: &DesiredVxlan) -> Vec<EntryOp> {
    let mut ops = Vec::new();
    if have.mtu != Some(want.mtu) {
        ops.push(EntryOp::SetMtu(want.mtu));
    }
    if !have.up {
        ops.push(EntryOp::Up);
    }
    for address in want.addresses.difference(&have.addresses) {
        ops.push(EntryOp::AddAddress(*address));
    }
    for address in have.addresses.difference(&want.addresses) {
        ops.push(EntryOp::DeleteAddress(*address));
    }
    let retained_macs: BTreeSet<[u8; 6]> = have
        .neighbours
        .iter()
        .filter(|(ip, _)| want.retained.contains(ip))
        .map(|(_, mac)| *mac)
        .collect();
    for (mac, dst) in have.fdb.difference(&want.fdb) {
        if !retained_macs.contains(mac) {
            ops.push(EntryOp::DeleteFdb { mac: *mac, dst: *dst });
        }
    }
    for (ip, _) in have.neighbours.difference(&want.neighbours) {
        let rewritten = want.neighbours.iter().any(|(want_ip, _)| want_ip == ip);
        if !rewritten && !want.retained.contains(ip) {
            ops.push(EntryOp::DeleteNeighbour { ip: *ip });
        }
    }
    for (mac, dst) in want.fdb.difference(&have.fdb) {
        ops.push(EntryOp::AddFdb { mac: *mac, dst: *dst });
    }
    for (ip, mac) in want.neighbours.difference(&have.neighbours) {
        ops.push(EntryOp::AddNeighbour { ip: *ip, mac: *mac });
    }
    ops
}

/// The device and its entries as the kernel has them, if the device exists.
pub fn observe(netlink: &mut Netlink) -> Result<Option<ObservedVxlan>, NetlinkError> {
    let Some(link) = netlink.link_by_name(VXLAN_DEVICE)? else {
        return Ok(None);
    };
    let index = link.header.index;
    let identity = (inspect::link_kind(&link) == Some(&InfoKind::Vxlan))
        .then(|| inspect::vxlan_params(&link))
        .flatten()
        .map(|(vni, local, port)| (vni, local, port, inspect::link_mac(&link)));
    let addresses = netlink
        .addresses(Some(index))?
        .into_iter()
        .map(|(_, a)| a)
        .filter(|a| !is_link_local(a.addr()))
        .collect();
    let fdb = netlink
        .fdb(index)?
        .into_iter()
        .filter_map(|(mac, dst)| Some((mac, dst?)))
        .collect();
    let mut neighbours = BTreeSet::new();
    for v4 in [true, false] {
        for n in netlink.neighbours(index, v4)? {
            if let (Some(ip), Some(mac), true) = (
                inspect::neighbour_ip(&n),
                inspect::neighbour_mac(&n),
                inspect::neighbour_is_permanent(&n),
            ) {
                neighbours.insert((ip, mac));
            }
        }
    }
    Ok(Some(ObservedVxlan {
        index,
        identity,
        mtu: inspect::link_mtu(&link),
        up: inspect::link_is_up(&link),
        addresses,
        fdb,
        neighbours,
    }))
}

/// Applies step one. Returns how many changes it made.
pub fn apply_device(netlink: &mut Netlink, op: DeviceOp, want: Option<&DesiredVxlan>) -> Result<usize, NetlinkError> {
    let create = |netlink: &mut Netlink, want: &DesiredVxlan| {
        netlink.apply(NetlinkRequest::create_vxlan(&VxlanSpec {
            name: VXLAN_DEVICE,
            vni: want.vni,
            local: want.local,
            underlay: want.underlay,
            port: want.port,
            mac: want.mac,
            mtu: want.mtu,
        }))
    };
    match (op, want) {
        (DeviceOp::Keep, _) => Ok(0),
        (DeviceOp::Create, Some(want)) => create(netlink, want).map(|()| 1),
        (DeviceOp::Recreate { index }, Some(want)) => {
            netlink.apply(NetlinkRequest::delete_link(index))?;
            create(netlink, want).map(|()| 2)
        }
        (DeviceOp::Delete { index }, _) => netlink.apply(NetlinkRequest::delete_link(index)).map(|()| 1),
        (DeviceOp::Create | DeviceOp::Recreate { .. }, None) => Ok(0),
    }
}

/// Applies step two on device `index`, in one batch; every change is attempted.
pub fn apply_entries(netlink: &mut Netlink, index: u32, ops: &[EntryOp]) -> Result<usize, ErrorList<NetlinkError>> {
    let requests: Vec<NetlinkRequest> = ops
        .iter()
        .map(|op| match *op {
            EntryOp::SetMtu(mtu) => NetlinkRequest::set_mtu(index, mtu),
            EntryOp::Up => NetlinkRequest::link_up(index),
            EntryOp::AddAddress(address) => NetlinkRequest::add_address(index, address, true),
            EntryOp::DeleteAddress(address) => NetlinkRequest::delete_address(index, address),
            EntryOp::AddFdb { mac, dst } => NetlinkRequest::fdb_entry(index, mac, dst),
            EntryOp::DeleteFdb { mac, dst } => NetlinkRequest::delete_fdb_entry(index, mac, Some(dst)),
            EntryOp::AddNeighbour { ip, mac } => NetlinkRequest::permanent_neighbour(index, ip, mac),
            EntryOp::DeleteNeighbour { ip } => NetlinkRequest::delete_neighbour(index, ip),
        })
        .collect();
    let mut failures = ErrorList::default();
    let mut applied = 0;
    for result in netlink.apply_each(requests).map_err(|e| ErrorList(vec![e]))? {
        match result {
            Ok(()) => applied += 1,
            Err(e) => failures.push(e),
        }
    }
    failures.into_result().map(|()| applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn want() -> DesiredVxlan {
        DesiredVxlan {
            vni: 42,
            port: 4789,
            local: ip("10.0.0.1"),
            mac: [2, 0, 0, 0, 0, 1],
            underlay: 2,
            mtu: 1450,
            addresses: ["10.244.1.0/32".parse().unwrap()].into(),
            fdb: [([2, 0, 0, 0, 0, 2], ip("10.1.0.2"))].into(),
            neighbours: [(ip("10.244.2.0"), [2, 0, 0, 0, 0, 2])].into(),
            retained: BTreeSet::new(),
        }
    }

    fn have(want: &DesiredVxlan) -> ObservedVxlan {
        ObservedVxlan {
            index: 7,
            identity: Some((want.vni, Some(want.local), Some(want.port), Some(want.mac))),
            mtu: Some(want.mtu),
            up: true,
            addresses: want.addresses.clone(),
            fdb: want.fdb.clone(),
            neighbours: want.neighbours.clone(),
        }
    }

    #[test]
    fn the_device_is_created_kept_recreated_or_deleted() {
        let want = want();
        assert_eq!(diff_device(None, Some(&want)), DeviceOp::Create);
        assert_eq!(diff_device(Some(&have(&want)), Some(&want)), DeviceOp::Keep);
        let mut other_vni = have(&want);
        other_vni.identity = Some((7, Some(want.local), Some(want.port), Some(want.mac)));
        assert_eq!(
            diff_device(Some(&other_vni), Some(&want)),
            DeviceOp::Recreate { index: 7 }
        );
        let mut not_vxlan = have(&want);
        not_vxlan.identity = None;
        assert_eq!(
            diff_device(Some(&not_vxlan), Some(&want)),
            DeviceOp::Recreate { index: 7 }
        );
        assert_eq!(diff_device(Some(&have(&want)), None), DeviceOp::Delete { index: 7 });
        assert_eq!(diff_device(None, None), DeviceOp::Keep);
    }

    #[test]
    fn entries_follow_the_peers_and_keep_retained_ones() {
        let want = want();
        assert!(diff_entries(&have(&want), &want).is_empty());
        let mut drifted = have(&want);
        drifted.mtu = Some(1500);
        drifted.up = false;
        drifted.addresses.insert("10.9.9.9/32".parse().unwrap());
        drifted.fdb.clear();
        drifted.fdb.insert(([2, 0, 0, 0, 0, 3], ip("10.1.0.3")));
        drifted.neighbours.insert((ip("10.244.3.0"), [2, 0, 0, 0, 0, 3]));
        let ops = diff_entries(&drifted, &want);
        assert_eq!(
            ops,
            vec![
                EntryOp::SetMtu(1450),
                EntryOp::Up,
                EntryOp::DeleteAddress("10.9.9.9/32".parse().unwrap()),
                EntryOp::DeleteFdb {
                    mac: [2, 0, 0, 0, 0, 3],
                    dst: ip("10.1.0.3")
                },
                EntryOp::DeleteNeighbour { ip: ip("10.244.3.0") },
                EntryOp::AddFdb {
                    mac: [2, 0, 0, 0, 0, 2],
                    dst: ip("10.1.0.2")
                },
            ]
        );
        // A retained peer's entries stay.
        let mut keep = want.clone();
        keep.retained.insert(ip("10.244.3.0"));
        let ops = diff_entries(&drifted, &keep);
        assert!(
            !ops.iter()
                .any(|op| matches!(op, EntryOp::DeleteNeighbour { .. } | EntryOp::DeleteFdb { .. }))
        );
    }
}
