//! A small synchronous rtnetlink client: exactly the link, address, route and neighbour
//! operations ferrynet needs, one request and its acknowledgement at a time. Synchronous on
//! purpose: the CNI plugin is a short-lived process, and an async runtime would only add start-up
//! cost to the pod start path.
use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, BorrowedFd},
};

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope},
    link::{InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
    },
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::netns;

/// A failed netlink request: which operation, and the kernel's errno.
#[derive(Debug, thiserror::Error)]
#[error("netlink {op}: {source}")]
pub struct NetlinkError {
    pub op: String,
    #[source]
    pub source: io::Error,
}

impl NetlinkError {
    fn new(op: impl Into<String>, source: io::Error) -> Self {
        Self { op: op.into(), source }
    }

    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The object already exists (EEXIST).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// The object (or the device it names) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ESRCH)
        )
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// The most changes [`Netlink::apply_each`] sends in one datagram.
pub const MAX_BATCH: usize = 64;

/// Names a batch of operations for an error message: the first few and a count, so that a
/// failure of a large batch never turns into a huge message.
fn summarize_ops(ops: &[String]) -> String {
    const SHOWN: usize = 3;
    let head = ops.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    match ops.len().saturating_sub(SHOWN) {
        0 => head,
        more => format!("{head} and {more} more"),
    }
}

/// What a host-side veth and its pod-side peer look like at creation.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    pub host_name: &'a str,
    pub host_mac: [u8; 6],
    pub peer_name: &'a str,
    pub peer_mac: [u8; 6],
    /// The peer is created directly in this namespace, already named `peer_name`.
    pub peer_netns: BorrowedFd<'a>,
    pub mtu: u32,
}

/// A VXLAN device (kernel driver, one VNI, no learning: forwarding entries are programmed).
#[derive(Debug, Clone)]
pub struct VxlanSpec<'a> {
    pub name: &'a str,
    pub vni: u32,
    /// Underlay address packets leave from.
    pub local: IpAddr,
    /// The underlay device (ifindex).
    pub underlay: u32,
    pub port: u16,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A route to add or replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
    pub protocol: RouteProtocol,
    pub table: u32,
    /// The gateway is reachable on `oif` without a covering connected route.
    pub onlink: bool,
    /// Unicast, or `Unreachable` (ICMP unreachable at once, for addresses nothing holds).
    pub kind: RouteType,
}

impl RouteSpec {
    /// A route in the main table with the given protocol, universe scope, no gateway.
    pub fn new(dst: IpNet, protocol: RouteProtocol) -> Self {
        Self {
            dst,
            gateway: None,
            oif: None,
            scope: RouteScope::Universe,
            protocol,
            table: u32::from(RouteHeader::RT_TABLE_MAIN),
            onlink: false,
            kind: RouteType::Unicast,
        }
    }
}

/// A policy routing rule: packets whose mark matches `fwmark` under `fwmask` look up `table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleSpec {
    pub ipv4: bool,
    pub priority: u32,
    pub fwmark: u32,
    pub fwmask: u32,
    pub table: u32,
    /// Who made it (`ip rule show proto N`), as for routes.
    pub protocol: RouteProtocol,
}

pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn current() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Ask for extended acks, so errors carry the kernel's message where it has one.
        let _ = socket.set_ext_ack(true);
        Ok(Self {
            socket,
            sequence: 0,
            buffer: vec![0; 64 * 1024],
        })
    }

    /// A socket in the namespace `ns` (netavark's pattern, see `netns`).
    pub fn in_netns(ns: BorrowedFd<'_>) -> io::Result<Self> {
        netns::run_in(ns, Self::current)
    }

    /// Sends one request and collects the replies until the kernel's ack or end of dump.
    fn request(&mut self, op: &str, message: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(|e| NetlinkError::new(op, e))?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let len = self
                .socket
                .recv(&mut &mut self.buffer[..], 0)
                .map_err(|e| NetlinkError::new(op, e))?;
            let mut offset = 0;
            while offset < len {
                let bytes = &self.buffer[offset..len];
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| NetlinkError::new(op, io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
                let size = reply.header.length as usize;
                if size == 0 {
                    return Err(NetlinkError::new(
                        op,
                        io::Error::new(io::ErrorKind::InvalidData, "zero-length netlink message"),
                    ));
                }
                offset += size;
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => Err(NetlinkError::new(op, io::Error::from_raw_os_error(-code.get()))),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, op: &str, message: RouteNetlinkMessage, flags: u16) -> Result<()> {
        self.request(op, message, flags | NLM_F_ACK).map(|_| ())
    }

    /// Makes one change and waits for the kernel's acknowledgement.
    pub fn apply(&mut self, change: NetlinkRequest) -> Result<()> {
        self.ack(&change.op, change.message, change.flags)
    }

    /// Makes several changes in one round trip: the kernel processes the messages of one datagram
    /// in order and acknowledges each. Every change is attempted; the first failure is returned.
    pub fn apply_all(&mut self, changes: Vec<NetlinkRequest>) -> Result<()> {
        self.apply_each(changes)?
            .into_iter()
            .collect::<Result<Vec<()>>>()
            .map(|_| ())
    }

    /// Like [`Netlink::apply_all`], but returns every change's own result (the outer error is a
    /// failure of the socket itself).
    ///
    /// Changes go in datagrams of at most [`MAX_BATCH`] messages: every acknowledgement occupies
    /// the socket's receive buffer until it is read, and a few hundred at once overflow it
    /// (ENOBUFS), losing acknowledgements.
    pub fn apply_each(&mut self, changes: Vec<NetlinkRequest>) -> Result<Vec<Result<()>>> {
        let mut results = Vec::with_capacity(changes.len());
        let mut changes = changes.into_iter().peekable();
        while changes.peek().is_some() {
            let batch: Vec<NetlinkRequest> = changes.by_ref().take(MAX_BATCH).collect();
            results.extend(self.apply_batch(batch)?);
        }
        Ok(results)
    }

    /// One datagram of changes, and their acknowledgements.
    fn apply_batch(&mut self, changes: Vec<NetlinkRequest>) -> Result<Vec<Result<()>>> {
        let first_sequence = self.sequence.wrapping_add(1);
        let mut ops = Vec::with_capacity(changes.len());
        let mut out = Vec::new();
        for change in changes {
            self.sequence = self.sequence.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | change.flags;
            header.sequence_number = self.sequence;
            let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(change.message));
            packet.finalize();
            let at = out.len();
            out.resize(at + packet.buffer_len(), 0);
            packet.serialize(&mut out[at..]);
            ops.push(change.op);
        }
        let batch_op = || summarize_ops(&ops);
        self.socket
            .send(&out, 0)
            .map_err(|e| NetlinkError::new(batch_op(), e))?;

        let mut results: Vec<Option<Result<()>>> = ops.iter().map(|_| None).collect();
        while results.iter().any(Option::is_none) {
            let len = self
                .socket
                .recv(&mut &mut self.buffer[..], 0)
                .map_err(|e| NetlinkError::new(batch_op(), e))?;
            let mut offset = 0;
            while offset < len {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buffer[offset..len]).map_err(|e| {
                        NetlinkError::new(batch_op(), io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
                    })?;
                let size = reply.header.length as usize;
                if size == 0 {
                    return Err(NetlinkError::new(
                        batch_op(),
                        io::Error::new(io::ErrorKind::InvalidData, "zero-length netlink message"),
                    ));
                }
                offset += size;
                let index = reply.header.sequence_number.wrapping_sub(first_sequence) as usize;
                if let (Some(slot), NetlinkPayload::Error(e)) = (results.get_mut(index), reply.payload) {
                    *slot = Some(match e.code {
                        None => Ok(()),
                        Some(code) => Err(NetlinkError::new(
                            ops[index].clone(),
                            io::Error::from_raw_os_error(-code.get()),
                        )),
                    });
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every change was acknowledged"))
            .collect())
    }

    // ---- links ----

    /// The link called `name`, if it exists.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<LinkMessage>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(&format!("get link {name}"), RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link in the namespace.
    pub fn links(&mut self) -> Result<Vec<LinkMessage>> {
        let replies = self.request(
            "dump links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// Creates a veth pair whose peer is born inside another namespace with its final name and
    /// MAC, and returns the ifindexes of (host side, peer). Both come from the kernel's echo of
    /// the new link, whose IFLA_LINK names the peer: no lookups on the pod start path.
    pub fn create_veth(&mut self, spec: &VethSpec<'_>) -> Result<(u32, u32)> {
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(spec.peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Address(spec.peer_mac.to_vec()));
        peer.attributes
            .push(LinkAttribute::NetNsFd(spec.peer_netns.as_raw_fd()));
        peer.attributes.push(LinkAttribute::Mtu(spec.mtu));

        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(spec.host_name.to_string()));
        msg.attributes.push(LinkAttribute::Address(spec.host_mac.to_vec()));
        msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        let op = format!("create veth {}", spec.host_name);
        let flags = NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK | NLM_F_ECHO;
        let replies = self.request(&op, RouteNetlinkMessage::NewLink(msg), flags)?;
        let echoed = replies.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) if inspect::link_name(&l) == Some(spec.host_name) => Some(l),
            _ => None,
        });
        // Kernels before 6.3 do not echo new links: look it up.
        let link = match echoed {
            Some(link) => link,
            None => self
                .link_by_name(spec.host_name)?
                .ok_or_else(|| NetlinkError::new(op.clone(), io::Error::from_raw_os_error(libc::ENODEV)))?,
        };
        let peer = inspect::link_peer_index(&link)
            .ok_or_else(|| NetlinkError::new(op, io::Error::new(io::ErrorKind::InvalidData, "no peer index")))?;
        Ok((link.header.index, peer))
    }

    /// Deletes a link by index.
    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.ack(&format!("delete link {index}"), RouteNetlinkMessage::DelLink(msg), 0)
    }

    /// Deletes the link called `name`; `Ok(false)` if there was none.
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.ack(&format!("delete link {name}"), RouteNetlinkMessage::DelLink(msg), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    // ---- addresses ----

    /// The addresses on a link (or on every link, for `None`).
    pub fn addresses(&mut self, index: Option<u32>) -> Result<Vec<(u32, IpNet)>> {
        let replies = self.request(
            "dump addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => {
                    let ip = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })?;
                    Some((a.header.index, IpNet::new(ip, a.header.prefix_len).ok()?))
                }
                _ => None,
            })
            .filter(|(i, _)| index.is_none_or(|want| want == *i))
            .collect())
    }

    // ---- routes ----

    /// Every route of one family in every table.
    pub fn routes(&mut self, ipv4: bool) -> Result<Vec<RouteMessage>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if ipv4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let replies = self.request("dump routes", RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    /// Every policy routing rule of one family.
    pub fn rules(&mut self, ipv4: bool) -> Result<Vec<RuleMessage>> {
        let mut msg = RuleMessage::default();
        msg.header.family = if ipv4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let replies = self.request("dump rules", RouteNetlinkMessage::GetRule(msg), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    // ---- neighbours ----

    /// Forwarding entries (`bridge fdb`) of a device: (MAC, destination) pairs.
    pub fn fdb(&mut self, index: u32) -> Result<Vec<([u8; 6], Option<IpAddr>)>> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        let replies = self.request("dump fdb", RouteNetlinkMessage::GetNeighbour(msg), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == index => {
                    Some((inspect::neighbour_mac(&n)?, inspect::neighbour_ip(&n)))
                }
                _ => None,
            })
            .collect())
    }

    /// Neighbour entries of one family on a link.
    pub fn neighbours(&mut self, index: u32, ipv4: bool) -> Result<Vec<NeighbourMessage>> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = if ipv4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let replies = self.request("dump neighbours", RouteNetlinkMessage::GetNeighbour(msg), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == index => Some(n),
                _ => None,
            })
            .collect())
    }
}

/// One change to the kernel's network state, prepared but not yet sent: run it with
/// [`Netlink::apply`], or together with others in one round trip with [`Netlink::apply_all`].
#[derive(Debug, Clone)]
pub struct NetlinkRequest {
    op: String,
    message: RouteNetlinkMessage,
    flags: u16,
}

impl NetlinkRequest {
    /// Bring a link up.
    pub fn link_up(index: u32) -> Self {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        Self {
            op: format!("set link {index} up"),
            message: RouteNetlinkMessage::SetLink(msg),
            flags: 0,
        }
    }

    /// Set a link's alias and bring it up.
    pub fn alias_and_up(index: u32, alias: &str) -> Self {
        let mut change = Self::link_up(index);
        if let RouteNetlinkMessage::SetLink(msg) = &mut change.message {
            msg.attributes.push(LinkAttribute::IfAlias(alias.to_string()));
        }
        change.op = format!("set alias of link {index}");
        change
    }

    /// Add an address. `no_dad` skips IPv6 duplicate address detection, so the address is usable
    /// at once instead of after a second or so.
    pub fn add_address(index: u32, addr: IpNet, no_dad: bool) -> Self {
        let mut msg = AddressMessage::default();
        msg.header.family = family(addr.addr());
        msg.header.prefix_len = addr.prefix_len();
        msg.header.index = index;
        msg.header.scope = AddressScope::Universe;
        if no_dad {
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        Self {
            op: format!("add address {addr}"),
            message: RouteNetlinkMessage::NewAddress(msg),
            flags: NLM_F_CREATE | NLM_F_EXCL,
        }
    }

    /// Add a route; fails with EEXIST if one exists for the same destination and table.
    pub fn add_route(spec: &RouteSpec) -> Self {
        Self {
            op: format!("add route {}", spec.dst),
            message: RouteNetlinkMessage::NewRoute(route_message(spec)),
            flags: NLM_F_CREATE | NLM_F_EXCL,
        }
    }

    /// Add or replace the route for the spec's destination and table.
    pub fn replace_route(spec: &RouteSpec) -> Self {
        Self {
            op: format!("replace route {}", spec.dst),
            message: RouteNetlinkMessage::NewRoute(route_message(spec)),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        }
    }

    /// Create a VXLAN device.
    pub fn create_vxlan(spec: &VxlanSpec<'_>) -> Self {
        let mut data = vec![
            InfoVxlan::Id(spec.vni),
            InfoVxlan::Link(spec.underlay),
            InfoVxlan::Port(spec.port),
            InfoVxlan::Learning(false),
        ];
        data.push(match spec.local {
            IpAddr::V4(v4) => InfoVxlan::Local(v4),
            IpAddr::V6(v6) => InfoVxlan::Local6(v6),
        });
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(spec.name.to_string()));
        msg.attributes.push(LinkAttribute::Address(spec.mac.to_vec()));
        msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        Self {
            op: format!("create vxlan {}", spec.name),
            message: RouteNetlinkMessage::NewLink(msg),
            flags: NLM_F_CREATE | NLM_F_EXCL,
        }
    }

    /// Set a link's MTU.
    pub fn set_mtu(index: u32, mtu: u32) -> Self {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        Self {
            op: format!("set MTU of link {index}"),
            message: RouteNetlinkMessage::SetLink(msg),
            flags: 0,
        }
    }

    /// Delete a link.
    pub fn delete_link(index: u32) -> Self {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        Self {
            op: format!("delete link {index}"),
            message: RouteNetlinkMessage::DelLink(msg),
            flags: 0,
        }
    }

    /// Remove an address from a link.
    pub fn delete_address(index: u32, addr: IpNet) -> Self {
        let mut change = Self::add_address(index, addr, false);
        if let RouteNetlinkMessage::NewAddress(msg) = change.message {
            change.message = RouteNetlinkMessage::DelAddress(msg);
        }
        change.op = format!("delete address {addr}");
        change.flags = 0;
        change
    }

    /// Delete the route matching the spec's destination, table and protocol.
    pub fn delete_route(spec: &RouteSpec) -> Self {
        let mut msg = route_message(spec);
        msg.attributes
            .retain(|a| matches!(a, RouteAttribute::Destination(_) | RouteAttribute::Table(_)));
        msg.header.scope = RouteScope::NoWhere;
        Self {
            op: format!("delete route {}", spec.dst),
            message: RouteNetlinkMessage::DelRoute(msg),
            flags: 0,
        }
    }

    /// Add a policy routing rule; fails with EEXIST if an identical one exists.
    pub fn add_rule(spec: &RuleSpec) -> Self {
        Self {
            op: format!("add rule {}", rule_text(spec)),
            message: RouteNetlinkMessage::NewRule(rule_message(spec)),
            flags: NLM_F_CREATE | NLM_F_EXCL,
        }
    }

    /// Delete the policy routing rule that matches the spec in every field.
    pub fn delete_rule(spec: &RuleSpec) -> Self {
        Self {
            op: format!("delete rule {}", rule_text(spec)),
            message: RouteNetlinkMessage::DelRule(rule_message(spec)),
            flags: 0,
        }
    }

    /// Add (or replace) a forwarding entry: frames for `mac` go to the VXLAN peer `dst`.
    pub fn fdb_entry(index: u32, mac: [u8; 6], dst: IpAddr) -> Self {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        msg.attributes.push(NeighbourAttribute::Destination(match dst {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        Self {
            op: format!("add fdb entry {} -> {dst}", crate::names::format_mac(&mac)),
            message: RouteNetlinkMessage::NewNeighbour(msg),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        }
    }

    /// Delete a forwarding entry.
    pub fn delete_fdb_entry(index: u32, mac: [u8; 6], dst: Option<IpAddr>) -> Self {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        if let Some(dst) = dst {
            msg.attributes.push(NeighbourAttribute::Destination(match dst {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        }
        Self {
            op: format!("delete fdb entry {}", crate::names::format_mac(&mac)),
            message: RouteNetlinkMessage::DelNeighbour(msg),
            flags: 0,
        }
    }

    /// Delete a neighbour entry.
    pub fn delete_neighbour(index: u32, ip: IpAddr) -> Self {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(ip);
        msg.header.ifindex = index;
        msg.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        Self {
            op: format!("delete neighbour {ip}"),
            message: RouteNetlinkMessage::DelNeighbour(msg),
            flags: 0,
        }
    }

    /// Add (or replace) a permanent neighbour entry `ip -> mac` on a link.
    pub fn permanent_neighbour(index: u32, ip: IpAddr, mac: [u8; 6]) -> Self {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(ip);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = RouteType::Unicast;
        msg.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        Self {
            op: format!("add neighbour {ip}"),
            message: RouteNetlinkMessage::NewNeighbour(msg),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        }
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

fn route_message(spec: &RouteSpec) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(spec.dst.addr());
    msg.header.destination_prefix_length = spec.dst.prefix_len();
    msg.header.protocol = spec.protocol;
    msg.header.scope = spec.scope;
    msg.header.kind = spec.kind;
    if spec.onlink {
        msg.header.flags = RouteFlags::Onlink;
    }
    match u8::try_from(spec.table) {
        Ok(small) => msg.header.table = small,
        Err(_) => msg.header.table = RouteHeader::RT_TABLE_UNSPEC,
    }
    msg.attributes.push(RouteAttribute::Table(spec.table));
    if spec.dst.prefix_len() > 0 || !spec.dst.addr().is_unspecified() {
        msg.attributes
            .push(RouteAttribute::Destination(route_address(spec.dst.addr())));
    }
    if let Some(gw) = spec.gateway {
        msg.attributes.push(RouteAttribute::Gateway(route_address(gw)));
    }
    if let Some(oif) = spec.oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    msg
}

fn rule_text(spec: &RuleSpec) -> String {
    format!(
        "{} pref {} fwmark {:#x}/{:#x} lookup {}",
        if spec.ipv4 { "inet" } else { "inet6" },
        spec.priority,
        spec.fwmark,
        spec.fwmask,
        spec.table
    )
}

fn rule_message(spec: &RuleSpec) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = if spec.ipv4 {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.action = RuleAction::ToTable;
    msg.header.table = u8::try_from(spec.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    msg.attributes.extend([
        RuleAttribute::Priority(spec.priority),
        RuleAttribute::FwMark(spec.fwmark),
        RuleAttribute::FwMask(spec.fwmask),
        RuleAttribute::Table(spec.table),
        RuleAttribute::Protocol(spec.protocol),
    ]);
    msg
}

/// Helpers to read fields out of dumped messages.
pub mod inspect {
    use super::*;

    pub fn link_name(link: &LinkMessage) -> Option<&str> {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.as_str()),
            _ => None,
        })
    }

    pub fn link_alias(link: &LinkMessage) -> Option<&str> {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfAlias(n) => Some(n.as_str()),
            _ => None,
        })
    }

    pub fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
            _ => None,
        })
    }

    /// The link's kind (`veth`, `vxlan`, ...), if it has one.
    pub fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k),
                _ => None,
            }),
            _ => None,
        })
    }

    /// A VXLAN device's VNI, local address and UDP port.
    pub fn vxlan_params(link: &LinkMessage) -> Option<(u32, Option<IpAddr>, Option<u16>)> {
        let data = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
                _ => None,
            }),
            _ => None,
        })?;
        let vni = data.iter().find_map(|d| match d {
            InfoVxlan::Id(id) => Some(*id),
            _ => None,
        })?;
        let local = data.iter().find_map(|d| match d {
            InfoVxlan::Local(v4) if !v4.is_unspecified() => Some(IpAddr::V4(*v4)),
            InfoVxlan::Local6(v6) if !v6.is_unspecified() => Some(IpAddr::V6(*v6)),
            _ => None,
        });
        let port = data.iter().find_map(|d| match d {
            InfoVxlan::Port(p) => Some(*p),
            _ => None,
        });
        Some((vni, local, port))
    }

    pub fn route_protocol(route: &RouteMessage) -> RouteProtocol {
        route.header.protocol
    }

    /// For a veth: the peer's ifindex (in the peer's namespace).
    pub fn link_peer_index(link: &LinkMessage) -> Option<u32> {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        })
    }

    pub fn link_mtu(link: &LinkMessage) -> Option<u32> {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    }

    pub fn link_is_up(link: &LinkMessage) -> bool {
        link.header.flags.contains(LinkFlags::Up)
    }

    pub fn route_dst(route: &RouteMessage) -> Option<IpNet> {
        let addr = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                _ => None,
            })
            .unwrap_or(match route.header.address_family {
                AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            });
        IpNet::new(addr, route.header.destination_prefix_length).ok()
    }

    pub fn route_kind(route: &RouteMessage) -> RouteType {
        route.header.kind
    }

    pub fn route_gateway(route: &RouteMessage) -> Option<IpAddr> {
        route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        })
    }

    pub fn route_oif(route: &RouteMessage) -> Option<u32> {
        route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
    }

    pub fn route_table(route: &RouteMessage) -> u32 {
        route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(route.header.table))
    }

    /// A rule's fields as a [`RuleSpec`] (a missing mark or mask reads as 0).
    pub fn rule_spec(rule: &RuleMessage) -> RuleSpec {
        let mut spec = RuleSpec {
            ipv4: rule.header.family == AddressFamily::Inet,
            priority: 0,
            fwmark: 0,
            fwmask: 0,
            table: u32::from(rule.header.table),
            protocol: RouteProtocol::Unspec,
        };
        for attribute in &rule.attributes {
            match attribute {
                RuleAttribute::Priority(p) => spec.priority = *p,
                RuleAttribute::FwMark(m) => spec.fwmark = *m,
                RuleAttribute::FwMask(m) => spec.fwmask = *m,
                RuleAttribute::Table(t) => spec.table = *t,
                RuleAttribute::Protocol(p) => spec.protocol = *p,
                _ => {}
            }
        }
        spec
    }

    pub fn neighbour_ip(n: &NeighbourMessage) -> Option<IpAddr> {
        n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            // Bridge-family (fdb) entries: the header's family says nothing about the address's,
            // so it arrives raw. Its length tells.
            NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => match raw.len() {
                4 => <[u8; 4]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                _ => None,
            },
            _ => None,
        })
    }

    pub fn neighbour_mac(n: &NeighbourMessage) -> Option<[u8; 6]> {
        n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(m) => m.as_slice().try_into().ok(),
            _ => None,
        })
    }

    pub fn neighbour_is_permanent(n: &NeighbourMessage) -> bool {
        n.header.state == NeighbourState::Permanent
    }

    pub fn neighbour_flags(n: &NeighbourMessage) -> NeighbourFlags {
        n.header.flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_batch_is_named_by_its_first_operations_and_a_count() {
        let ops: Vec<String> = (0..10_000).map(|i| format!("replace route {i}")).collect();
        let summary = summarize_ops(&ops);
        assert_eq!(
            summary,
            "replace route 0, replace route 1, replace route 2 and 9997 more"
        );
        assert_eq!(summarize_ops(&ops[..2]), "replace route 0, replace route 1");
    }
}
