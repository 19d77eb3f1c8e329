//! Every map of the datapath. Capacities here are defaults: the agent sets each from its
//! settings when it creates the maps (and pins them, so that they outlive it).
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use ferrynet_common::*;

#[map]
pub static SERVICES4: HashMap<ServiceKey4, ServiceValue> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
pub static SERVICES6: HashMap<ServiceKey6, ServiceValue> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
pub static SERVICE_SLOTS: HashMap<SlotKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_SLOTS, 0);
#[map]
pub static BACKENDS: HashMap<u32, BackendValue> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map]
pub static REV_NAT: HashMap<u32, RevNatValue> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
pub static CT4: LruHashMap<CtKey4, CtValue> = LruHashMap::with_max_entries(DEFAULT_MAX_CONNTRACK, 0);
#[map]
pub static CT6: LruHashMap<CtKey6, CtValue> = LruHashMap::with_max_entries(DEFAULT_MAX_CONNTRACK, 0);
#[map]
pub static AFFINITY4: LruHashMap<AffinityKey4, AffinityValue> = LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);
#[map]
pub static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue> = LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);
#[map]
pub static SOCK_CONNECTED: LruHashMap<u64, SockConnectedValue> = LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);
#[map]
pub static SOCK_CONNECTED_HINTS: Array<u64> = Array::with_max_entries(SOCK_CONNECTED_HINT_SLOTS, 0);
#[map]
pub static SOCK_REVNAT4: LruHashMap<SockRevNatKey4, SockRevNatValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);
#[map]
pub static SOCK_REVNAT6: LruHashMap<SockRevNatKey6, SockRevNatValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCKETS, 0);
#[map]
pub static DOOMED_BACKENDS: HashMap<u32, u8> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map]
pub static SERVICE_CIDRS4: LpmTrie<ServiceCidr4, u8> = LpmTrie::with_max_entries(MAX_SERVICE_CIDRS, 0);
#[map]
pub static SERVICE_CIDRS6: LpmTrie<ServiceCidr6, u8> = LpmTrie::with_max_entries(MAX_SERVICE_CIDRS, 0);
/// The node's addresses NodePorts answer on (the agent keeps them current).
#[map]
pub static NODE_ADDRS4: HashMap<u32, u8> = HashMap::with_max_entries(MAX_NODE_ADDRS, 0);
#[map]
pub static NODE_ADDRS6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(MAX_NODE_ADDRS, 0);
#[map]
pub static SOURCE_RANGES4: LpmTrie<SourceRangeKey4, u8> = LpmTrie::with_max_entries(MAX_SOURCE_RANGES, 0);
#[map]
pub static SOURCE_RANGES6: LpmTrie<SourceRangeKey6, u8> = LpmTrie::with_max_entries(MAX_SOURCE_RANGES, 0);
/// Maglev tables: allocated as they are written (a chunk at a time), not all up front.
#[map]
pub static MAGLEV: HashMap<MaglevKey, MaglevChunk> = HashMap::with_max_entries(
    DEFAULT_MAX_MAGLEV_SERVICES * DEFAULT_MAGLEV_TABLE_SIZE.div_ceil(MAGLEV_CHUNK),
    BPF_F_NO_PREALLOC,
);
#[map]
pub static PORTS_WITHOUT_FRONTENDS: Array<u64> = Array::with_max_entries(PORT_GATE_WORDS, 0);
#[map]
pub static PORTS_WITHOUT_BACKENDS: Array<u64> = Array::with_max_entries(PORT_GATE_WORDS, 0);
#[map]
pub static SNAT_ADDRS: Array<NodeAddress> = Array::with_max_entries(2, 0);
#[map]
pub static PEER_PODS4: LpmTrie<ServiceCidr4, u8> = LpmTrie::with_max_entries(MAX_PEER_POD_CIDRS, 0);
#[map]
pub static PEER_PODS6: LpmTrie<ServiceCidr6, u8> = LpmTrie::with_max_entries(MAX_PEER_POD_CIDRS, 0);
#[map]
pub static UPLINKS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_UPLINKS, 0);
#[map]
pub static DATAPATH_CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);
#[map]
pub static DATAPATH_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Whether `gate` marks `port` (network order) as used by none: see [`PORTS_WITHOUT_FRONTENDS_MAP`].
#[inline(always)]
fn gated(gate: &Array<u64>, port: u16) -> bool {
    let port = u16::from_be(port);
    gate.get(u32::from(port >> 6))
        .is_some_and(|word| (word >> (port & 63)) & 1 != 0)
}

/// Whether some frontend may have port `port`: false spares the service map's lookup.
#[inline(always)]
pub fn frontend_port(port: u16) -> bool {
    !gated(&PORTS_WITHOUT_FRONTENDS, port)
}

/// Whether some backend may have port `port`: false means no translated flow has a reply from
/// (or a reused tuple to) it, sparing the conntrack lookups.
#[inline(always)]
pub fn backend_port(port: u16) -> bool {
    !gated(&PORTS_WITHOUT_BACKENDS, port)
}

/// The datapath's settings.
#[inline(always)]
pub fn config() -> DatapathConfig {
    DATAPATH_CONFIG.get(0).copied().unwrap_or_default()
}

/// The datapath's settings' flags alone (no copy of the settings on the stack).
#[inline(always)]
pub fn config_flags() -> u16 {
    DATAPATH_CONFIG.get(0).map_or(0, |c| c.flags)
}

/// The datapath's settings, in place in their map (an array's only entry: always there).
#[inline(always)]
pub fn config_ref() -> Option<&'static DatapathConfig> {
    DATAPATH_CONFIG.get(0)
}

/// Counts `delta` (wrapping: `u64::MAX` is -1) in the [`SOCK_CONNECTED_HINTS`] slot of
/// `cookie`, for an entry added to or removed from [`SOCK_CONNECTED`].
#[inline(always)]
pub fn count_connected(cookie: u64, delta: u64) {
    if let Some(slot) = SOCK_CONNECTED_HINTS.get_ptr_mut((cookie % u64::from(SOCK_CONNECTED_HINT_SLOTS)) as u32) {
        // SAFETY: `slot` points at an array value, valid while the program runs and aligned for
        // a u64; other CPUs count the same slots, hence the atomic add.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, delta)
        };
    }
}

/// Whether the [`SOCK_CONNECTED_HINTS`] slot of `cookie` counts any entry: false means the
/// socket has none in [`SOCK_CONNECTED`].
#[inline(always)]
pub fn may_be_connected(cookie: u64) -> bool {
    SOCK_CONNECTED_HINTS
        .get((cookie % u64::from(SOCK_CONNECTED_HINT_SLOTS)) as u32)
        .is_none_or(|count| *count != 0)
}
