//! Types shared by ferrynet's kernel programs (`ferrynet-ebpf`) and userspace (`ferrynet-agent`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding: the kernel and userspace read
//! the same bytes out of the same BPF maps, so the layouts must match exactly and contain no
//! implicit padding (hash keys are compared byte for byte, and the verifier rejects reads of
//! uninitialised stack bytes).
//!
//! Byte order: addresses and ports are kept exactly as they travel on the wire and as the kernel
//! hands them to programs (network order), in `u32`s and `u16`s read as memory. Userspace builds
//! them with [`addr4`], [`addr6`] and [`port`].
//!
//! The maps, and how one service update touches only that service's entries:
//! - [`SERVICES4_MAP`] / [`SERVICES6_MAP`]: (VIP, port, protocol, scope) → [`ServiceValue`]
//!   (service id, backend count, flags, affinity timeout);
//! - [`SERVICE_SLOTS_MAP`]: (service id, slot) → backend id, slots `0..count`;
//! - [`BACKENDS_MAP`]: backend id → [`BackendValue`] (address, port, state);
//! - [`REV_NAT_MAP`]: service id → [`RevNatValue`] (the VIP and port replies come from);
//! - [`CT4_MAP`] / [`CT6_MAP`]: per-packet connection tracking (LRU);
//! - [`AFFINITY4_MAP`] / [`AFFINITY6_MAP`]: sessionAffinity (LRU);
//! - [`SOCK_CONNECTED_MAP`]: socket cookie → [`SockConnectedValue`] (the backend a socket
//!   connected to in place of a Service, and that Service's address), one entry a connect: for
//!   `recvmsg` and `getpeername`, and for terminating the sockets of removed backends; removed
//!   when the socket is closed (cgroup `sock_release`), so it holds the live sockets alone;
//! - [`SOCK_CONNECTED_HINTS_MAP`]: how many of those entries each slot of socket cookies holds,
//!   so that the release of a socket that has none skips the large map;
//! - [`SOCK_REVNAT4_MAP`] / [`SOCK_REVNAT6_MAP`]: (socket cookie, backend address, port) → VIP, for
//!   the `recvmsg` of datagrams sent unconnected;
//! - [`DOOMED_BACKENDS_MAP`]: backends whose sockets are being terminated;
//! - [`SERVICE_CIDRS4_MAP`] / [`SERVICE_CIDRS6_MAP`]: the cluster's Service CIDRs, where an
//!   address no Service holds is refused;
//! - [`NODE_ADDRS4_MAP`] / [`NODE_ADDRS6_MAP`]: the node's addresses NodePorts answer on;
//! - [`MAGLEV_MAP`]: (frontend id, chunk) → a chunk of the frontend's Maglev lookup table
//!   (backend ids), for frontends that balance external flows by consistent hashing;
//! - [`DATAPATH_CONFIG_MAP`]: [`DatapathConfig`], set at load;
//! - [`DATAPATH_STATS_MAP`]: per-CPU counters, indexed by [`Stat`].
#![no_std]

/// The schema version of the pinned layout: pins live under `<bpf-pin-path>/v<SCHEMA>/`, so that a
/// future layout can migrate from this one.
pub const SCHEMA_VERSION: u32 = 1;

pub const SERVICES4_MAP: &str = "SERVICES4";
pub const SERVICES6_MAP: &str = "SERVICES6";
pub const SERVICE_SLOTS_MAP: &str = "SERVICE_SLOTS";
pub const BACKENDS_MAP: &str = "BACKENDS";
pub const REV_NAT_MAP: &str = "REV_NAT";
pub const CT4_MAP: &str = "CT4";
pub const CT6_MAP: &str = "CT6";
pub const AFFINITY4_MAP: &str = "AFFINITY4";
pub const AFFINITY6_MAP: &str = "AFFINITY6";
pub const SOCK_CONNECTED_MAP: &str = "SOCK_CONNECTED";
pub const SOCK_REVNAT4_MAP: &str = "SOCK_REVNAT4";
pub const SOCK_REVNAT6_MAP: &str = "SOCK_REVNAT6";
pub const DOOMED_BACKENDS_MAP: &str = "DOOMED_BACKENDS";
pub const SERVICE_CIDRS4_MAP: &str = "SERVICE_CIDRS4";
pub const SERVICE_CIDRS6_MAP: &str = "SERVICE_CIDRS6";
pub const DATAPATH_CONFIG_MAP: &str = "DATAPATH_CONFIG";
pub const DATAPATH_STATS_MAP: &str = "DATAPATH_STATS";
pub const NODE_ADDRS4_MAP: &str = "NODE_ADDRS4";
pub const NODE_ADDRS6_MAP: &str = "NODE_ADDRS6";
/// The node's InternalIPs, as [`NodeAddress`]es (index 0 IPv4, 1 IPv6): where flows to an
/// externalIP or load balancer IP are SNATed to when their backend is on another node.
pub const SNAT_ADDRS_MAP: &str = "SNAT_ADDRS";
/// `loadBalancerSourceRanges`: (frontend id, source prefix) → 1, LPM tries keyed by
/// [`SourceRangeKey4`] / [`SourceRangeKey6`].
pub const SOURCE_RANGES4_MAP: &str = "SOURCE_RANGES4";
pub const SOURCE_RANGES6_MAP: &str = "SOURCE_RANGES6";
/// Maglev lookup tables, in chunks of [`MAGLEV_CHUNK`] backend ids keyed by [`MaglevKey`].
pub const MAGLEV_MAP: &str = "MAGLEV";
/// Port gates: arrays of [`PORT_GATE_WORDS`] `u64`s, a bit per port (port `p` is bit `p % 64`
/// of word `p / 64`), set when no frontend (no backend) has that port. A packet to a port no
/// frontend has skips the service map's lookup, and one from a port no backend has skips the
/// conntrack lookups of replies: an array read, inlined by the verifier, instead of hash
/// lookups that miss. A clear bit promises nothing, so a map never written (all zeros: a fresh
/// one, or one an agent has not settled yet) gates nothing.
pub const PORTS_WITHOUT_FRONTENDS_MAP: &str = "PORTS_WITHOUT_FRONTENDS";
pub const PORTS_WITHOUT_BACKENDS_MAP: &str = "PORTS_WITHOUT_BACKENDS";
pub const PORT_GATE_WORDS: u32 = 1024;
/// How many [`SOCK_CONNECTED_MAP`] entries live in each slot of socket cookies (a cookie's slot
/// is `cookie % SOCK_CONNECTED_HINT_SLOTS`): an array of `u64` counts, which the connect program
/// counts up for each entry it adds and the release and terminate programs down for each they
/// remove. A closed socket whose slot counts none (most sockets were never translated) skips the
/// lookup in the large map, whose buckets are cold: about 0.4 µs a socket. A count can only be
/// too high (an entry the map evicted, one an agent before the counts added, or one whose socket
/// closed once no backend had its port, which the port gate then skips), which costs that lookup
/// again and nothing else.
pub const SOCK_CONNECTED_HINTS_MAP: &str = "SOCK_CONNECTED_HINTS";
pub const SOCK_CONNECTED_HINT_SLOTS: u32 = 4096;
/// Other nodes' PodCIDRs that this node routes natively (through an uplink, without VXLAN), LPM
/// tries of [`ServiceCidr4`] / [`ServiceCidr6`] prefixes → 1: a per-packet flow to a backend in
/// one of them may go past the node's stack ([`CONFIG_F_STACK_BYPASS`]), since the stack would
/// neither masquerade it nor route it anywhere but to the uplink.
pub const PEER_PODS4_MAP: &str = "PEER_PODS4";
pub const PEER_PODS6_MAP: &str = "PEER_PODS6";
/// The interfaces that carry the uplink program (ifindex → 1): the replies of a flow sent out
/// through one of them past the stack come back through it, where the program takes them past
/// the stack too.
pub const UPLINKS_MAP: &str = "UPLINKS";
pub const MAX_PEER_POD_CIDRS: u32 = 16384;
pub const MAX_UPLINKS: u32 = 64;

/// Every map the datapath pins, in the order the agent reports them.
pub const PINNED_MAPS: [&str; 29] = [
    SERVICES4_MAP,
    SERVICES6_MAP,
    SERVICE_SLOTS_MAP,
    BACKENDS_MAP,
    REV_NAT_MAP,
    CT4_MAP,
    CT6_MAP,
    AFFINITY4_MAP,
    AFFINITY6_MAP,
    SOCK_CONNECTED_MAP,
    SOCK_REVNAT4_MAP,
    SOCK_REVNAT6_MAP,
    DOOMED_BACKENDS_MAP,
    SERVICE_CIDRS4_MAP,
    SERVICE_CIDRS6_MAP,
    DATAPATH_CONFIG_MAP,
    DATAPATH_STATS_MAP,
    NODE_ADDRS4_MAP,
    NODE_ADDRS6_MAP,
    SNAT_ADDRS_MAP,
    SOURCE_RANGES4_MAP,
    SOURCE_RANGES6_MAP,
    MAGLEV_MAP,
    PORTS_WITHOUT_FRONTENDS_MAP,
    PORTS_WITHOUT_BACKENDS_MAP,
    SOCK_CONNECTED_HINTS_MAP,
    PEER_PODS4_MAP,
    PEER_PODS6_MAP,
    UPLINKS_MAP,
];

/// Program names (the functions' names in the object).
pub const CONNECT4_PROGRAM: &str = "sock4_connect";
pub const CONNECT6_PROGRAM: &str = "sock6_connect";
pub const SENDMSG4_PROGRAM: &str = "sock4_sendmsg";
pub const SENDMSG6_PROGRAM: &str = "sock6_sendmsg";
pub const RECVMSG4_PROGRAM: &str = "sock4_recvmsg";
pub const RECVMSG6_PROGRAM: &str = "sock6_recvmsg";
pub const GETPEERNAME4_PROGRAM: &str = "sock4_getpeername";
pub const GETPEERNAME6_PROGRAM: &str = "sock6_getpeername";
/// Cgroup `sock_release`: a closed socket's [`SOCK_CONNECTED_MAP`] entry goes.
pub const SOCK_RELEASE_PROGRAM: &str = "sock_release";
/// TC/TCX at ingress of a pod's host veth: everything the pod sends.
pub const FROM_POD_PROGRAM: &str = "from_pod";
/// TC/TCX at egress of a pod's host veth: everything sent to the pod.
pub const TO_POD_PROGRAM: &str = "to_pod";
/// TC/TCX at ingress of the node's uplinks: NodePort traffic from outside, and the replies of
/// flows sent to other nodes' backends.
pub const FROM_UPLINK_PROGRAM: &str = "from_uplink";
/// Socket iterators that terminate sockets connected to removed backends.
pub const TERMINATE_UDP_PROGRAM: &str = "terminate_udp";
pub const TERMINATE_TCP_PROGRAM: &str = "terminate_tcp";
/// The kfunc the socket iterators call.
pub const SOCK_DESTROY_KFUNC: &str = "bpf_sock_destroy";

/// Default capacities (each is a setting of the agent).
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
pub const DEFAULT_MAX_SLOTS: u32 = 262_144;
pub const DEFAULT_MAX_CONNTRACK: u32 = 262_144;
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
pub const DEFAULT_MAX_SOCKETS: u32 = 262_144;
pub const MAX_SERVICE_CIDRS: u32 = 64;
/// Capacity of the node address maps.
pub const MAX_NODE_ADDRS: u32 = 1024;
/// Capacity of each source range trie.
pub const MAX_SOURCE_RANGES: u32 = 16_384;
/// The most backends one service port can have.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 65_535;
/// How many frontends may balance by Maglev at once, by default (each table takes
/// `ceil(size / MAGLEV_CHUNK)` entries of the Maglev map, allocated only when written).
pub const DEFAULT_MAX_MAGLEV_SERVICES: u32 = 8192;
/// Backend ids per entry of the Maglev map: a table of any size is a handful of entries, and a
/// lookup is one of them. 4,000-byte values, so that a value with the hash table's element header
/// still fits the kernel's 4 KiB allocations (4,096-byte values would take 8 KiB each).
pub const MAGLEV_CHUNK: u32 = 1000;
/// Maglev's default table size, as Cilium's: a prime well above 100 × the backends of a
/// large Service, so that every backend gets its share within a percent.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;
/// The bounds of a Maglev table's size (a prime).
pub const MIN_MAGLEV_TABLE_SIZE: u32 = 251;
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 131_071;

pub const PROTO_TCP: u8 = 6;
/// TCP's flags byte: FIN and RST.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;
pub const PROTO_UDP: u8 = 17;

/// Which traffic a service entry is for: in-cluster traffic (pods and the node's own processes,
/// `internalTrafficPolicy`) or traffic from outside the cluster (`externalTrafficPolicy`).
pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// The service has `sessionAffinity: ClientIP`.
pub const SERVICE_F_AFFINITY: u16 = 1 << 0;

/// A backend in use.
pub const BACKEND_ACTIVE: u8 = 0;
/// A backend that is terminating: used only when no ready one exists.
pub const BACKEND_TERMINATING: u8 = 1;
/// `BackendValue::flags`: the backend runs on this node (no SNAT for external traffic to it).
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

/// `ServiceValue::flags`: without backends, drop instead of refusing (`externalTrafficPolicy:
/// Local` on a node without local endpoints, so that a load balancer's health check steers away).
pub const SERVICE_F_DROP_EMPTY: u16 = 1 << 1;
/// `ServiceValue::flags`: only sources in the frontend's entries of the source range tries may
/// open flows (`loadBalancerSourceRanges`); others are dropped.
pub const SERVICE_F_SOURCE_RANGES: u16 = 1 << 2;

/// The hash of an external flow that picks its entry of a Maglev table: the client's address and
/// port, the frontend's port and the protocol. The frontend's address is left out on purpose:
/// a NodePort flow must pick the same backend whichever node address it arrives at, and nodes
/// behind one load balancer IP see the same one anyway. The same on every node (no seed), so
/// that nodes sharing a flow through ECMP agree on its backend.
#[inline(always)]
pub fn flow_hash(saddr: &[u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x9e37_79b9u32 ^ u32::from(proto);
    h = mix(h, saddr[0]);
    h = mix(h, saddr[1]);
    h = mix(h, saddr[2]);
    h = mix(h, saddr[3]);
    h = mix(h, (u32::from(sport) << 16) | u32::from(dport));
    // MurmurHash3's finalizer: every input bit reaches every output bit.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// One MurmurHash3 round.
#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// `DatapathConfig::flags`: socket LB translates only in the host's network namespace.
pub const CONFIG_F_HOST_NETNS_ONLY: u16 = 1 << 0;
/// `DatapathConfig::flags`: the per-packet path translates (off when socket LB covers pods).
pub const CONFIG_F_PER_PACKET: u16 = 1 << 1;
/// `DatapathConfig::flags`: socket LB translates at all.
pub const CONFIG_F_SOCKET_LB: u16 = 1 << 2;
/// `DatapathConfig::flags`: external frontends (NodePorts) exist, so pods' replies may belong to
/// external flows (without any, a pod's packet pays no lookup for them).
pub const CONFIG_F_EXTERNAL: u16 = 1 << 3;
/// `DatapathConfig::flags`, the agent's alone (no program reads it): the removal generation
/// started again at 1, and the stamps of earlier generations are still to be taken off the
/// conntrack entries. Kept in the settings so that an agent restarted meanwhile finishes it.
pub const CONFIG_F_STAMPS_DUE: u16 = 1 << 4;
/// `DatapathConfig::flags`, the agent's alone (no program reads it): the Service CIDRs in the
/// tries are the API's, as an agent last read them. An agent that reads them from the API starts
/// with an earlier run's only then: without it (given by `--service-cidrs`, or written by an
/// agent that did not say) nothing is refused for being in them until the API is read.
pub const CONFIG_F_CIDRS_FROM_API: u16 = 1 << 5;
/// `DatapathConfig::flags`: per-packet flows to pods on other nodes that are routed natively go
/// past the node's stack both ways: a pod's translated packet straight to the uplink, and the
/// backend's reply, translated back at the uplink, straight to the pod's veth (see the programs'
/// `bypass` module). The node's routing and netfilter then see neither direction of such flows.
pub const CONFIG_F_STACK_BYPASS: u16 = 1 << 6;

/// [`DatapathConfig::service_cidrs4`] of an earlier agent, which did not write it: every address
/// may be in a Service CIDR.
pub const CIDR_COVER_UNKNOWN: u32 = 0;
/// [`DatapathConfig::service_cidrs4`] when the cluster has no IPv4 Service CIDR.
pub const CIDR_COVER_NONE: u32 = 0xff;
/// Covers of longer prefixes are cut to this length, so that the length fits beside the prefix.
const CIDR_COVER_MAX_LEN: u32 = 24;

/// The [`DatapathConfig::service_cidrs4`] of the IPv4 Service CIDRs `cidrs` (network address in
/// host order, prefix length): the longest prefix, of at most 24 bits, that covers them all, in
/// the top 24 bits, and its length plus one in the low byte. The cover only spares lookups: an
/// address inside it is still looked up in the trie, which holds the CIDRs themselves.
pub fn service_cidr_cover4(cidrs: &[(u32, u8)]) -> u32 {
    let Some((first, _)) = cidrs.first() else {
        return CIDR_COVER_NONE;
    };
    let len = cidrs.iter().fold(CIDR_COVER_MAX_LEN, |len, (network, prefix)| {
        len.min(u32::from(*prefix)).min((first ^ network).leading_zeros())
    });
    (first & cover_mask(len)) | (len + 1)
}

/// The mask of a prefix of `len` bits (at most 32).
#[inline(always)]
fn cover_mask(len: u32) -> u32 {
    u32::MAX.checked_shl(32 - len).unwrap_or(0)
}

/// Whether the IPv4 address `addr` (host order) may be in a Service CIDR, by `cover` (see
/// [`service_cidr_cover4`]): false means it is in none, true that the trie must say.
#[inline(always)]
pub fn may_be_in_service_cidrs4(cover: u32, addr: u32) -> bool {
    match cover & 0xff {
        CIDR_COVER_UNKNOWN => true,
        CIDR_COVER_NONE => false,
        code => {
            let mask = cover_mask((code - 1).min(CIDR_COVER_MAX_LEN));
            addr & mask == cover & mask
        }
    }
}

/// Whether `addr` (host order) is inside the cover `cover` (a [`service_cidr_cover4`]) when it is
/// known: false for [`CIDR_COVER_UNKNOWN`] and [`CIDR_COVER_NONE`], unlike
/// [`may_be_in_service_cidrs4`], for a shortcut that only an address surely inside may take.
#[inline(always)]
pub fn within_service_cidr_cover4(cover: u32, addr: u32) -> bool {
    cover & 0xff != CIDR_COVER_UNKNOWN && may_be_in_service_cidrs4(cover, addr)
}

/// Whether `port` (network order), a reply's destination port at the uplink, may be an SNAT port
/// ([`SNAT_PORT_MIN`] and up): only then may the reply be one of an SNATed flow.
#[inline(always)]
pub fn may_be_snat_port(port: u16) -> bool {
    u16::from_be(port) >= SNAT_PORT_MIN
}

/// The source ports a flow to another node's backend is SNATed to: above Linux's default
/// ephemeral range (32768-60999), so they never collide with the node's own connections.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
// [`may_be_snat_port`] looks at the lower bound only.
const _: () = assert!(SNAT_PORT_MAX == u16::MAX);
/// A closed TCP flow's entries stay this long (for the last ACK and retransmitted FINs), then
/// its SNAT port is free again: long enough for a backend that closed first, whose TIME_WAIT
/// holds the tuple, to take a new SYN on it (see [`CT_PASSIVE_CLOSE_NS`] for the other order).
pub const CT_CLOSED_NS: u64 = 10 * 1_000_000_000;
/// A flow whose client closed first and whose backend answered with its own FIN (a passive
/// close: the backend goes through LAST_ACK to nothing, and keeps no TIME_WAIT) frees its SNAT
/// port this long after its last packet. The wait covers the backend's retransmitted FINs should
/// the client's last ACK be lost (Linux retransmits after 200, 400 and 800 ms, each refreshing
/// the entry). Held for [`CT_CLOSED_NS`] instead, 4,536 ports per backend capped a node at about
/// 450 new connections a second to it from clients that close first (most HTTP clients do).
pub const CT_PASSIVE_CLOSE_NS: u64 = 1_000_000_000;
/// A reset flow's SNAT port is free again this long after its last packet, for a new flow to
/// the same backend: a reset leaves neither end holding the tuple (no TIME_WAIT), so the port
/// waits only for packets still in flight. Held for [`CT_CLOSED_NS`], 4,536 ports
/// per backend would cap a node at about 450 new connections a second to it from clients that
/// reset (as many load generators and proxies do). The entry itself stays for
/// [`CT_CLOSED_NS`], until a new flow takes its port.
pub const CT_RESET_NS: u64 = 100_000_000;

/// The packet mark (in [`MARK_MASK`]) that asks the agent's firewall table to reject a packet
/// with an ICMP error or a TCP reset: a Service port without endpoints, or an address in the
/// Service CIDRs that no Service holds.
pub const MARK_REJECT: u32 = 0x0f00_0000;
pub const MARK_MASK: u32 = 0x0f00_0000;

/// The source a pod sees when it reaches itself through its own Service (hairpin), so that its
/// reply comes back through the host veth instead of staying inside the pod: an address no
/// pod, node or Service has.
pub const HAIRPIN_V4: [u8; 4] = [169, 254, 7, 1];
/// IPv6's hairpin source, in the discard-only prefix (RFC 6666), routed by a pod's default route.
pub const HAIRPIN_V6: [u8; 16] = [0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07, 0x01];

/// Conntrack idle timeouts: a flow idle this long is new again (and may pick another backend).
pub const CT_TCP_IDLE_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_UDP_IDLE_NS: u64 = 120 * 1_000_000_000;
/// How stale a per-packet flow's `last_seen_ns` may get: a packet of a flow seen more recently
/// writes nothing, so an established flow's packets cost one conntrack lookup, not two lookups
/// and two writes. Far below the idle timeouts, so no live flow expires for it.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// An Internet checksum (RFC 1071) updated for a 32-bit field of the data it covers changing
/// from `from` to `to` (RFC 1624, eqn. 3), as the kernel's `csum_replace4` does. Every value is
/// as the packet holds it, read in the machine's order: one's complement sums do not depend on
/// byte order, so none is swapped.
#[inline(always)]
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let mut sum = u32::from(!check)
        + u32::from(!(from as u16))
        + u32::from(!((from >> 16) as u16))
        + u32::from(to as u16)
        + u32::from((to >> 16) as u16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// An IPv4 address as the datapath keeps it (network order, read as memory).
pub fn addr4(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// An IPv6 address as the datapath keeps it.
pub fn addr6(octets: [u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, word) in out.iter_mut().enumerate() {
        *word = u32::from_ne_bytes([octets[4 * i], octets[4 * i + 1], octets[4 * i + 2], octets[4 * i + 3]]);
    }
    out
}

/// The octets of an IPv6 address kept by the datapath.
pub fn octets6(addr: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, word) in addr.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    out
}

/// A port as the datapath keeps it (network order, read as memory).
pub fn port(host_order: u16) -> u16 {
    host_order.to_be()
}

/// Key of [`SERVICES4_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey4 {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// Key of [`SERVICES6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// Value of the service maps: one service port's entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// The service port's id: keys its slots, its reverse NAT and its affinity.
    pub id: u32,
    /// Slots `0..count` hold its backends; 0 means the port is refused.
    pub count: u16,
    pub flags: u16,
    /// `sessionAffinity: ClientIP`'s `timeoutSeconds`.
    pub affinity_timeout_s: u32,
    /// The size of its Maglev table in [`MAGLEV_MAP`]; 0: backends are picked at random.
    pub maglev_size: u32,
}

/// Key of [`SERVICE_SLOTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service: u32,
    pub slot: u32,
}

/// Value of [`BACKENDS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    /// IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// [`BACKEND_ACTIVE`] or [`BACKEND_TERMINATING`].
    pub state: u8,
    /// [`BACKEND_F_LOCAL`].
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Value of [`REV_NAT_MAP`]: the service address replies must come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// Direction of a conntrack entry.
pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
/// A packet arriving at the node's uplink: an external client's (client → node address:NodePort,
/// translated to a backend), or a reply of a flow SNATed to another node's backend (backend →
/// node address:SNAT port, translated back to the client).
pub const CT_EXT_IN: u8 = 2;
/// A local backend's reply to an external client, at its pod's veth: the source becomes the
/// node address and NodePort the client sent to.
pub const CT_EXT_OUT: u8 = 3;

/// Key of [`CT4_MAP`]: a packet's tuple as seen at the pod's veth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`CT_FORWARD`] (client → service) or [`CT_REPLY`] (backend → client).
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// Key of [`CT6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// The entry was made for a pod reaching itself through its Service: the client's address was
/// replaced with the hairpin address, and the reply must get it back.
pub const CT_F_HAIRPIN: u32 = 1 << 0;
/// A [`CT_EXT_IN`] entry for a reply from another node's backend: `client_addr`/`client_port`
/// are the external client's, and the source becomes the node address and NodePort.
pub const CT_F_SNAT_REPLY: u32 = 1 << 1;
/// A TCP flow that saw a FIN or RST: its entries expire after [`CT_CLOSED_NS`].
pub const CT_F_CLOSED: u32 = 1 << 2;
/// A TCP flow that saw a RST (with [`CT_F_CLOSED`]): its SNAT port is free after
/// [`CT_RESET_NS`].
pub const CT_F_RESET: u32 = 1 << 4;
/// A flow whose client sent a FIN (an external flow's, or a per-packet forward entry's).
pub const CT_F_CLIENT_FIN: u32 = 1 << 5;
/// A flow whose backend sent a FIN (an external flow's, or a per-packet reply entry's).
pub const CT_F_BACKEND_FIN: u32 = 1 << 6;
/// An external flow whose backend's first FIN came after the client's: the backend closed
/// passively and holds no TIME_WAIT, so its SNAT port is free after [`CT_PASSIVE_CLOSE_NS`].
pub const CT_F_PASSIVE_CLOSE: u32 = 1 << 7;
/// A per-packet [`CT_REPLY`] entry whose `client_addr`/`client_port` are the frontend the client
/// sent to (where replies come from). Entries written by agents before this flag hold the
/// client's own address there, and their replies come from the service's [`REV_NAT_MAP`] entry.
pub const CT_F_FRONTEND: u32 = 1 << 3;
/// A per-packet [`CT_FORWARD`] entry whose `client_addr`/`client_port` are its backend's address
/// and port, so that a packet of the flow is translated from the entry alone while its
/// `generation` is the settings' `removal_generation`. Entries written by agents before this flag
/// hold the client's own address there (which nothing read), and are looked up as before.
pub const CT_F_BACKEND: u32 = 1 << 8;

/// Value of the conntrack maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub backend: u32,
    pub service: u32,
    /// Last packet (`bpf_ktime_get_ns`).
    pub last_seen_ns: u64,
    pub flags: u32,
    /// For reply entries: the client's original address and port (hairpin, SNAT replies). For
    /// [`CT_EXT_IN`] client entries: the SNAT address and port (port 0: not SNATed). For
    /// [`CT_EXT_OUT`] entries: the address the client sent to, in `client_addr`. For per-packet
    /// [`CT_FORWARD`] entries with [`CT_F_BACKEND`]: the backend's address and port.
    pub client_port: u16,
    /// For per-packet [`CT_FORWARD`] entries with [`CT_F_BACKEND`]: the
    /// [`DatapathConfig::removal_generation`] at which the flow's frontend and backend were last
    /// found in the maps. 0 elsewhere (what was padding).
    pub generation: u16,
    pub client_addr: [u32; 4],
}

/// How long a flow of `proto` may idle before it is new again.
#[inline(always)]
pub fn ct_idle_limit(proto: u8) -> u64 {
    if proto == PROTO_TCP {
        CT_TCP_IDLE_NS
    } else {
        CT_UDP_IDLE_NS
    }
}

impl CtValue {
    /// Whether the entry has expired: idle past its protocol's limit, or closed (TCP FIN or RST
    /// seen) for longer than [`CT_CLOSED_NS`].
    #[inline(always)]
    pub fn expired(&self, now: u64, proto: u8) -> bool {
        let limit = if self.flags & CT_F_CLOSED != 0 {
            CT_CLOSED_NS
        } else {
            ct_idle_limit(proto)
        };
        now.saturating_sub(self.last_seen_ns) >= limit
    }

    /// Whether an SNAT reply entry's port may be given to a new flow: its flow expired, was
    /// reset [`CT_RESET_NS`] ago, or closed passively by its backend [`CT_PASSIVE_CLOSE_NS`] ago
    /// (see there). A flow whose backend closed first keeps its port until it expires.
    #[inline(always)]
    pub fn snat_port_free(&self, now: u64, proto: u8) -> bool {
        let quiet = now.saturating_sub(self.last_seen_ns);
        self.expired(now, proto)
            || (self.flags & CT_F_RESET != 0 && quiet >= CT_RESET_NS)
            || (self.flags & CT_F_PASSIVE_CLOSE != 0 && quiet >= CT_PASSIVE_CLOSE_NS)
    }
}

/// Which end of a flow sent a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEnd {
    /// The client outside the cluster.
    Client,
    /// The Service's backend.
    Backend,
}

/// The flags a segment of `proto` with TCP flags `tcp_flags`, sent by `end`, sets on its
/// external flow's entries, which hold `held`: a FIN or RST closes the flow; a RST frees its
/// SNAT port soon ([`CT_F_RESET`]); the backend's first FIN, when the client's came before it,
/// marks a passive close ([`CT_F_PASSIVE_CLOSE`]). A backend's FIN sent again (its first was
/// not acknowledged) changes nothing: the first one tells who closed first.
#[inline(always)]
pub fn ct_end_flags(proto: u8, tcp_flags: u8, end: FlowEnd, held: u32) -> u32 {
    if proto != PROTO_TCP {
        return 0;
    }
    if tcp_flags & TCP_RST != 0 {
        return CT_F_CLOSED | CT_F_RESET;
    }
    if tcp_flags & TCP_FIN == 0 {
        return 0;
    }
    match end {
        FlowEnd::Client => CT_F_CLOSED | CT_F_CLIENT_FIN,
        FlowEnd::Backend if held & CT_F_BACKEND_FIN != 0 => CT_F_CLOSED,
        FlowEnd::Backend if held & CT_F_CLIENT_FIN != 0 => CT_F_CLOSED | CT_F_BACKEND_FIN | CT_F_PASSIVE_CLOSE,
        FlowEnd::Backend => CT_F_CLOSED | CT_F_BACKEND_FIN,
    }
}

/// The flags a FIN sent by `end` sets on a per-packet flow's two entries: (on the entry of its
/// own direction, on the other's), given the flags `other` holds. The end's FIN is noted
/// ([`CT_F_CLIENT_FIN`] on the forward entry, [`CT_F_BACKEND_FIN`] on the reply entry), and once
/// both ends sent one, both entries are closed ([`CT_F_CLOSED`]): the agent's sweep removes them
/// after [`CT_CLOSED_NS`] instead of leaving them to idle out (hours) or to be evicted, which in
/// a full map takes entries of live flows with them. A FIN alone only half-closes: the other end
/// may send for a long while yet, so a half-closed flow stays a live one.
#[inline(always)]
pub fn per_packet_fin_flags(end: FlowEnd, other: u32) -> (u32, u32) {
    let (own, others) = match end {
        FlowEnd::Client => (CT_F_CLIENT_FIN, CT_F_BACKEND_FIN),
        FlowEnd::Backend => (CT_F_BACKEND_FIN, CT_F_CLIENT_FIN),
    };
    if other & others != 0 {
        (own | CT_F_CLOSED, CT_F_CLOSED)
    } else {
        (own, 0)
    }
}

/// The flags of a per-packet flow's entries that say how it ended: a new connection on the tuple
/// (a SYN on a known one) starts its entries without them.
pub const CT_F_ENDED: u32 = CT_F_CLIENT_FIN | CT_F_BACKEND_FIN | CT_F_CLOSED;

/// Key of [`AFFINITY4_MAP`]: the service and the client (its address for per-packet traffic, its
/// network namespace cookie's low bits for socket LB).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey4 {
    pub service: u32,
    pub client: u32,
    /// The network namespace cookie for socket LB; 0 for per-packet traffic.
    pub netns_cookie: u64,
}

/// Key of [`AFFINITY6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey6 {
    pub service: u32,
    pub client: [u32; 4],
    pub _pad: u32,
    pub netns_cookie: u64,
}

/// Value of the affinity maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// Key of [`SOCK_REVNAT4_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey4 {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Key of [`SOCK_REVNAT6_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey6 {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of the socket reverse NAT maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    pub service: u32,
}

/// Value of [`SOCK_CONNECTED_MAP`]: a socket connected to a Service's address, as the connect
/// program translated it. One entry serves both what a connected socket needs later (the Service
/// address back, the backend to terminate it by), so that a connect pays one map insert.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockConnectedValue {
    /// The backend's address (IPv4 in `[0]`) and port: the socket's peer, as the kernel has it.
    pub backend_addr: [u32; 4],
    /// The Service's address (IPv4 in `[0]`) and port: the peer the application asked for.
    pub service_addr: [u32; 4],
    pub backend: u32,
    pub service: u32,
    pub backend_port: u16,
    pub service_port: u16,
    pub _pad: u32,
}

/// Key of [`MAGLEV_MAP`]: entry `i` of a frontend's table is in chunk `i / MAGLEV_CHUNK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub service: u32,
    pub chunk: u32,
}

/// Value of [`MAGLEV_MAP`]: backend ids (0: none).
pub type MaglevChunk = [u32; MAGLEV_CHUNK as usize];

/// Value of [`SNAT_ADDRS_MAP`]: an address (IPv4 in `addr[0]`); all zero: none.
pub type NodeAddress = [u32; 4];

/// The data of a [`SOURCE_RANGES4_MAP`] key: its prefix length is 32 (the frontend id, matched
/// whole) plus the source prefix's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey4 {
    pub service: u32,
    pub addr: u32,
}

/// The data of a [`SOURCE_RANGES6_MAP`] key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey6 {
    pub service: u32,
    pub addr: [u32; 4],
}

/// Key of the Service CIDR tries (an LPM trie's data part).
pub type ServiceCidr4 = u32;
pub type ServiceCidr6 = [u32; 4];

/// The datapath's settings, index 0 of [`DATAPATH_CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    pub flags: u16,
    /// Moves on each time the agent removes a frontend or a backend, or takes a frontend's last
    /// endpoint: a per-packet flow checked against the maps at this generation
    /// ([`CtValue::generation`]) needs no service or backend lookup until it moves. Never 0 once an
    /// agent of this kind wrote it; after its last value it starts again at 1, and the agent then
    /// takes every stamp off the conntrack entries, so that no value vouches for a flow twice. It takes what
    /// was the top half of a 32-bit `flags` (little-endian), whose bits no agent used, so earlier
    /// agents and programs read the layout as theirs.
    pub removal_generation: u16,
    /// A prefix covering every IPv4 Service CIDR ([`service_cidr_cover4`]): an address outside
    /// it skips the Service CIDR trie. 0 (an earlier agent's padding) asks the trie always.
    pub service_cidrs4: u32,
    /// The node's own network namespace (`SO_NETNS_COOKIE`), for [`CONFIG_F_HOST_NETNS_ONLY`].
    pub host_netns_cookie: u64,
    /// The identity of the programs attached (the agent's digest of its kernel object): an agent
    /// that carries other programs swaps its own into the pinned links.
    pub programs: u64,
}

/// Counters in [`DATAPATH_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Connections (and unconnected datagrams) translated at the socket.
    SockTranslated = 0,
    /// Socket calls refused: a port without endpoints, or a Service CIDR address nobody holds.
    SockRefused = 1,
    /// New flows translated per packet.
    PacketFlowsTranslated = 2,
    /// Packets translated per packet (both directions).
    PacketsTranslated = 3,
    /// Packets marked for rejection.
    PacketsRefused = 4,
    /// A conntrack entry could not be written (the map is full of entries that may not go).
    ConntrackFull = 5,
    /// A connected socket's entry (`SOCK_CONNECTED`) or an unconnected datagram's reverse NAT
    /// entry (`SOCK_REVNAT4/6`) could not be written.
    SockRevNatFull = 6,
    /// Sockets terminated because their backend was removed.
    SocketsTerminated = 7,
    /// A service's slot or backend was missing (an update in progress).
    BackendMissing = 8,
    /// An affinity entry could not be written.
    AffinityFull = 9,
    /// A translated packet had no route to send it on (dropped).
    FibFailed = 10,
    /// No free SNAT port for a flow to another node's backend (dropped).
    SnatPortsExhausted = 11,
    /// External flows translated (NodePort).
    ExternalFlowsTranslated = 12,
    /// External packets dropped: `externalTrafficPolicy: Local` without a local endpoint, or a
    /// source outside `loadBalancerSourceRanges`.
    ExternalDropped = 13,
    /// Packets of per-packet flows sent past the node's stack (both directions; see
    /// [`CONFIG_F_STACK_BYPASS`]).
    PacketsPastStack = 14,
}

pub const STAT_COUNT: u32 = 15;

#[cfg(feature = "user")]
mod user {
    use super::*;

    macro_rules! pod {
        ($($t:ty),*) => {
            // SAFETY: each type is repr(C), made only of integers and integer arrays with
            // explicit padding fields, so every bit pattern is valid and there are no holes.
            $(unsafe impl aya::Pod for $t {})*
        };
    }

    pod!(
        ServiceKey4,
        ServiceKey6,
        ServiceValue,
        SlotKey,
        BackendValue,
        RevNatValue,
        CtKey4,
        CtKey6,
        CtValue,
        AffinityKey4,
        AffinityKey6,
        AffinityValue,
        SockRevNatKey4,
        SockRevNatKey6,
        SockRevNatValue,
        SockConnectedValue,
        DatapathConfig,
        SourceRangeKey4,
        SourceRangeKey6,
        MaglevKey
    );
}

/// Layouts the kernel and userspace both rely on.
const _: () = {
    assert!(core::mem::size_of::<ServiceKey4>() == 8);
    assert!(core::mem::size_of::<ServiceKey6>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 16);
    assert!(core::mem::size_of::<SlotKey>() == 8);
    assert!(core::mem::size_of::<BackendValue>() == 24);
    assert!(core::mem::size_of::<RevNatValue>() == 20);
    assert!(core::mem::size_of::<CtKey4>() == 16);
    assert!(core::mem::size_of::<CtKey6>() == 40);
    assert!(core::mem::size_of::<CtValue>() == 40);
    assert!(core::mem::size_of::<AffinityKey4>() == 16);
    assert!(core::mem::size_of::<AffinityKey6>() == 32);
    assert!(core::mem::size_of::<AffinityValue>() == 16);
    assert!(core::mem::size_of::<SockRevNatKey4>() == 16);
    assert!(core::mem::size_of::<SockRevNatKey6>() == 32);
    assert!(core::mem::size_of::<SockRevNatValue>() == 24);
    assert!(core::mem::size_of::<SockConnectedValue>() == 48);
    assert!(core::mem::size_of::<DatapathConfig>() == 24);
    assert!(core::mem::size_of::<SourceRangeKey4>() == 8);
    assert!(core::mem::size_of::<SourceRangeKey6>() == 20);
    assert!(core::mem::size_of::<MaglevKey>() == 8);
    assert!(core::mem::size_of::<MaglevChunk>() == 4000);
};

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_be_bytes([a, b, c, d])
    }

    #[test]
    fn an_address_outside_every_service_cidr_is_outside_their_cover() {
        // One CIDR: the cover is the CIDR itself.
        let one = service_cidr_cover4(&[(v4(10, 96, 0, 0), 12)]);
        assert!(may_be_in_service_cidrs4(one, v4(10, 96, 0, 1)));
        assert!(may_be_in_service_cidrs4(one, v4(10, 111, 255, 255)));
        assert!(!may_be_in_service_cidrs4(one, v4(10, 112, 0, 0)));
        assert!(!may_be_in_service_cidrs4(one, v4(10, 244, 1, 2)));
        assert!(!may_be_in_service_cidrs4(one, v4(10, 95, 255, 255)));
        // Two: the longest prefix covering both (10.96.0.0/12 and 10.100.0.0/16: 10.96.0.0/12).
        let two = service_cidr_cover4(&[(v4(10, 96, 0, 0), 12), (v4(10, 100, 0, 0), 16)]);
        assert_eq!(two, service_cidr_cover4(&[(v4(10, 96, 0, 0), 12)]));
        let apart = service_cidr_cover4(&[(v4(10, 96, 0, 0), 16), (v4(172, 20, 0, 0), 16)]);
        for inside in [v4(10, 96, 3, 4), v4(172, 20, 9, 9)] {
            assert!(may_be_in_service_cidrs4(apart, inside));
        }
        // Apart in the first bit: the cover is everything, and the trie decides.
        assert!(may_be_in_service_cidrs4(apart, v4(1, 2, 3, 4)));
        // Longer than 24 bits: cut to 24, still covering.
        let narrow = service_cidr_cover4(&[(v4(192, 168, 7, 128), 25)]);
        assert!(may_be_in_service_cidrs4(narrow, v4(192, 168, 7, 129)));
        assert!(may_be_in_service_cidrs4(narrow, v4(192, 168, 7, 1)));
        assert!(!may_be_in_service_cidrs4(narrow, v4(192, 168, 8, 1)));
        // A /0 covers everything.
        let all = service_cidr_cover4(&[(0, 0)]);
        assert!(may_be_in_service_cidrs4(all, v4(255, 255, 255, 255)));
        assert!(may_be_in_service_cidrs4(all, 0));
    }

    #[test]
    fn without_service_cidrs_nothing_is_in_them_and_an_earlier_agents_config_asks_the_trie() {
        let none = service_cidr_cover4(&[]);
        assert_eq!(none, CIDR_COVER_NONE);
        assert!(!may_be_in_service_cidrs4(none, v4(10, 96, 0, 1)));
        assert!(!may_be_in_service_cidrs4(none, 0));
        assert!(may_be_in_service_cidrs4(CIDR_COVER_UNKNOWN, v4(10, 96, 0, 1)));
        assert!(may_be_in_service_cidrs4(CIDR_COVER_UNKNOWN, v4(1, 1, 1, 1)));
    }

    #[test]
    fn only_an_address_inside_a_known_cover_is_surely_within_it() {
        let one = service_cidr_cover4(&[(v4(10, 96, 0, 0), 16)]);
        assert!(within_service_cidr_cover4(one, v4(10, 96, 0, 10)));
        assert!(!within_service_cidr_cover4(one, v4(10, 244, 1, 2)));
        // No Service CIDRs, or an earlier agent's settings: no address is.
        for cover in [service_cidr_cover4(&[]), CIDR_COVER_UNKNOWN] {
            assert!(!within_service_cidr_cover4(cover, v4(10, 96, 0, 10)));
            assert!(!within_service_cidr_cover4(cover, v4(10, 244, 1, 2)));
        }
        // A /0 covers everything (its code is 1, not the unknown 0).
        assert!(within_service_cidr_cover4(
            service_cidr_cover4(&[(0, 0)]),
            v4(1, 2, 3, 4)
        ));
    }

    #[test]
    fn the_removal_generation_sits_where_earlier_agents_had_the_top_of_their_32_bit_flags() {
        let cfg = DatapathConfig {
            flags: CONFIG_F_PER_PACKET | CONFIG_F_EXTERNAL,
            removal_generation: 0xbeef,
            ..DatapathConfig::default()
        };
        // SAFETY: DatapathConfig is repr(C), 24 bytes, without padding.
        let bytes: [u8; 24] = unsafe { core::mem::transmute(cfg) };
        let earlier_flags = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        assert_eq!(earlier_flags & 0xffff, u32::from(cfg.flags));
        assert_eq!(earlier_flags >> 16, 0xbeef);
    }

    #[test]
    fn only_ports_of_the_snat_range_may_be_snat_ports() {
        assert!(may_be_snat_port(port(SNAT_PORT_MIN)));
        assert!(may_be_snat_port(port(65_535)));
        assert!(!may_be_snat_port(port(SNAT_PORT_MIN - 1)));
        assert!(!may_be_snat_port(port(32_768)));
        assert!(!may_be_snat_port(port(9000)));
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN_ACK: u8 = TCP_FIN | ACK;
    const RST: u8 = TCP_RST;

    /// An SNATed flow's reply entry after `segments` (who sent each, its TCP flags), each
    /// setting its flags as the uplink program does, the last one at time 0.
    fn flow_after(segments: &[(FlowEnd, u8)]) -> CtValue {
        let mut entry = CtValue {
            flags: CT_F_SNAT_REPLY,
            ..CtValue::default()
        };
        for (end, tcp_flags) in segments {
            entry.flags |= ct_end_flags(PROTO_TCP, *tcp_flags, *end, entry.flags);
        }
        entry
    }

    /// The first moment (in steps of 10 ms, from the last segment) at which the flow's SNAT
    /// port is free.
    fn port_free_after(entry: &CtValue) -> u64 {
        (0..=CT_CLOSED_NS / 10_000_000)
            .map(|step| step * 10_000_000)
            .find(|now| entry.snat_port_free(*now, PROTO_TCP))
            .expect("an expired flow's port is free")
    }

    #[test]
    fn a_backend_that_closes_after_its_client_frees_the_snat_port_after_the_passive_close_wait() {
        use FlowEnd::*;
        let entry = flow_after(&[
            (Client, SYN),
            (Backend, SYN | ACK),
            (Client, FIN_ACK),
            (Backend, FIN_ACK),
            (Client, ACK),
        ]);
        assert_ne!(entry.flags & CT_F_PASSIVE_CLOSE, 0);
        assert_eq!(port_free_after(&entry), CT_PASSIVE_CLOSE_NS);
        // The entry itself stays for late packets until the closed-flow time.
        assert!(!entry.expired(CT_PASSIVE_CLOSE_NS, PROTO_TCP));
        // A half-closed flow (the client's FIN, the backend still sending) keeps its port.
        let half_closed = flow_after(&[(Client, SYN), (Backend, SYN | ACK), (Client, FIN_ACK), (Backend, ACK)]);
        assert_eq!(half_closed.flags & CT_F_PASSIVE_CLOSE, 0);
        assert_eq!(port_free_after(&half_closed), CT_CLOSED_NS);
    }

    /// A per-packet flow's (forward, reply) entries' flags after the FINs of `ends`, in order,
    /// each setting its flags as the pod's programs do.
    fn per_packet_flow_after(ends: &[FlowEnd]) -> (u32, u32) {
        let (mut forward, mut reply) = (CT_F_BACKEND, CT_F_FRONTEND);
        for end in ends {
            let (own, other) = match end {
                FlowEnd::Client => (&mut forward, &mut reply),
                FlowEnd::Backend => (&mut reply, &mut forward),
            };
            let (set_own, set_other) = per_packet_fin_flags(*end, *other);
            *own |= set_own;
            *other |= set_other;
        }
        (forward, reply)
    }

    #[test]
    fn a_per_packet_flow_closes_once_both_ends_sent_a_fin_whichever_first() {
        use FlowEnd::*;
        for ends in [[Client, Backend], [Backend, Client]] {
            let (forward, reply) = per_packet_flow_after(&ends);
            assert_ne!(forward & CT_F_CLOSED, 0, "{ends:?}");
            assert_ne!(reply & CT_F_CLOSED, 0, "{ends:?}");
            let entry = CtValue {
                flags: forward,
                ..CtValue::default()
            };
            assert!(entry.expired(CT_CLOSED_NS, PROTO_TCP));
        }
        // A half-closed flow (either end's FIN, sent again or not) stays live on both entries.
        for ends in [&[Client][..], &[Client, Client], &[Backend], &[Backend, Backend]] {
            let (forward, reply) = per_packet_flow_after(ends);
            assert_eq!((forward | reply) & CT_F_CLOSED, 0, "{ends:?}");
            let entry = CtValue {
                flags: forward,
                ..CtValue::default()
            };
            assert!(!entry.expired(CT_CLOSED_NS, PROTO_TCP));
        }
    }

    #[test]
    fn a_backend_that_closes_first_keeps_the_snat_port_for_the_closed_flow_time() {
        use FlowEnd::*;
        // The backend's TIME_WAIT holds the tuple: the port waits until the flow expires.
        let entry = flow_after(&[(Backend, FIN_ACK), (Client, FIN_ACK), (Backend, ACK)]);
        assert_eq!(entry.flags & CT_F_PASSIVE_CLOSE, 0);
        assert_eq!(port_free_after(&entry), CT_CLOSED_NS);
        // Its FIN sent again after the client's (the client's ACK of it was lost) does not make
        // it a passive close.
        let again = flow_after(&[(Backend, FIN_ACK), (Client, FIN_ACK), (Backend, FIN_ACK)]);
        assert_eq!(again.flags & CT_F_PASSIVE_CLOSE, 0);
        assert_eq!(port_free_after(&again), CT_CLOSED_NS);
    }

    #[test]
    fn a_reset_frees_the_snat_port_soonest_and_udp_never_closes() {
        use FlowEnd::*;
        for segments in [
            &[(Client, RST)][..],
            &[(Backend, RST)],
            &[(Backend, FIN_ACK), (Client, RST)],
        ] {
            assert_eq!(port_free_after(&flow_after(segments)), CT_RESET_NS, "{segments:?}");
        }
        assert_eq!(ct_end_flags(PROTO_UDP, TCP_FIN, Client, 0), 0);
        let open = CtValue::default();
        assert!(!open.snat_port_free(CT_CLOSED_NS, PROTO_TCP));
        assert!(open.snat_port_free(CT_TCP_IDLE_NS, PROTO_TCP));
        assert!(open.snat_port_free(CT_UDP_IDLE_NS, PROTO_UDP));
    }

    /// The checksum of `words` from scratch, as a sender computes it.
    fn checksum(words: &[u16]) -> u16 {
        let mut sum: u32 = words.iter().map(|w| u32::from(*w)).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn an_updated_checksum_is_the_one_computed_from_scratch() {
        // A sum that carries out of its first fold: one fold alone gives 0xfffe.
        assert_eq!(csum_replace4(0xa59f, 0x7dde_399a, 0xa94b_b3ce), 0xfffd);
        // IPv4 headers (10 words, the checksum the sixth) whose destination address changes,
        // the edge cases of one's complement arithmetic first: all-zero and all-one words, and a
        // change to the same address.
        let mut seed = 0x2545_f491_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let edges = [(0u32, 0xffff_ffffu32), (0xffff_ffff, 0), (0x0a60_0002, 0x0a60_0002)];
        for i in 0..10_000 {
            let (from, to) = edges.get(i).copied().unwrap_or_else(|| (next(), next()));
            let mut header = [0x4500, 0x0028, 0x0001, 0x4000, 0x4006, 0, 0x0af4, 0x0102, 0, 0];
            for word in header.iter_mut().take(5) {
                *word ^= next() as u16 & 0x00ff;
            }
            header[8] = from as u16;
            header[9] = (from >> 16) as u16;
            header[5] = checksum(&header);
            let updated = csum_replace4(header[5], from, to);
            header[8] = to as u16;
            header[9] = (to >> 16) as u16;
            header[5] = 0;
            let fresh = checksum(&header);
            // 0x0000 and 0xffff are the same one's complement number: a receiver accepts both.
            assert!(
                updated == fresh || matches!((updated, fresh), (0, 0xffff) | (0xffff, 0)),
                "{from:#x} -> {to:#x}: updated {updated:#06x}, from scratch {fresh:#06x}"
            );
            header[5] = updated;
            assert!(matches!(checksum(&header), 0 | 0xffff), "a receiver would drop it");
        }
    }

    #[test]
    fn the_flow_hash_is_fixed_and_spreads_ports() {
        // Fixed across builds and machines: nodes running different versions must agree.
        let client = addr6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(flow_hash(&client, 40000, 80, PROTO_TCP), 964_660_571);
        assert_ne!(
            flow_hash(&client, 40000, 80, PROTO_TCP),
            flow_hash(&client, 40000, 80, PROTO_UDP)
        );
        assert_ne!(
            flow_hash(&client, 40000, 80, PROTO_TCP),
            flow_hash(&client, 40001, 80, PROTO_TCP)
        );
        // Consecutive source ports land evenly on a small table.
        let mut buckets = [0u32; 4];
        for sport in 40_000..44_000u16 {
            buckets[(flow_hash(&client, sport, 80, PROTO_TCP) % 4) as usize] += 1;
        }
        assert!(buckets.iter().all(|n| (900..1100).contains(n)), "{buckets:?}");
    }
}
