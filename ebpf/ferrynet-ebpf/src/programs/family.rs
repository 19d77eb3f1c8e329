//! What differs between the IPv4 and IPv6 paths of a program: the address type, where the
//! addresses sit in the header, the conntrack and socket reverse NAT maps and their keys, the
//! `sock_addr` context's address fields, and the per-family lookups. A
//! program written once over [`Family`] runs for both ([`V4`], [`V6`]); each use is
//! monomorphised and inlined, so the kernel sees the same code as two hand-written copies.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, bpf_fib_lookup as FibParams, bpf_sock_addr},
    maps::{LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use ferrynet_common::*;

use super::{
    maps::{
        AFFINITY4, AFFINITY6, CT4, CT6, NODE_ADDRS4, NODE_ADDRS6, PEER_PODS4, PEER_PODS6, SERVICE_CIDRS4,
        SERVICE_CIDRS6, SERVICES4, SERVICES6, SOCK_REVNAT4, SOCK_REVNAT6, SOURCE_RANGES4, SOURCE_RANGES6, config,
    },
    packet::{
        AF_INET, AF_INET6, ETH_HLEN, Tuple, fib_redirect, l4_fields, l4_fields_loaded, l4_flags, read, rewrite_port,
    },
};

pub trait Family {
    /// An address: `u32`, or `[u32; 4]`.
    type Addr: Copy + PartialEq + 'static;
    type CtKey: Copy + 'static;
    type SockRevNatKey: Copy + 'static;
    type AffinityKey: Copy + 'static;
    /// The unspecified address (a NodePort's wildcard frontend, an unset node address).
    const UNSPECIFIED: Self::Addr;
    /// Offsets of the source and destination addresses in the IP header.
    const SADDR: usize;
    const DADDR: usize;
    /// The family's node address in [`SNAT_ADDRS_MAP`].
    const SNAT_ADDR_INDEX: u32;

    /// The source address a hairpinned flow's packets get (see `pod_path`).
    fn hairpin() -> Self::Addr;
    /// An address as the shared types hold both families (IPv4 in the first word).
    fn widen(addr: Self::Addr) -> [u32; 4];
    /// The address a shared type holds.
    fn narrow(addr: [u32; 4]) -> Self::Addr;
    fn parse(ctx: &TcContext) -> Option<Tuple<Self::Addr>>;
    /// Rewrites the address at `offset` ([`Self::SADDR`], [`Self::DADDR`]) and the checksums.
    fn rewrite_addr(
        ctx: &mut TcContext,
        t: &Tuple<Self::Addr>,
        offset: usize,
        from: Self::Addr,
        to: Self::Addr,
    ) -> Option<()>;
    /// Rewrites one end of the packet, its address and port, and the checksums.
    #[inline(always)]
    fn rewrite_end(
        ctx: &mut TcContext,
        t: &Tuple<Self::Addr>,
        end: End,
        from: (Self::Addr, u16),
        to: (Self::Addr, u16),
    ) -> Option<()> {
        rewrite_end_by_fields::<Self>(ctx, t, end, from, to)
    }
    fn conntrack() -> &'static LruHashMap<Self::CtKey, CtValue>;
    /// The key of `t`'s own tuple in `direction`.
    #[inline(always)]
    fn ct_key(t: &Tuple<Self::Addr>, direction: u8) -> Self::CtKey {
        Self::ct_key_of(t.saddr, t.daddr, t.sport, t.dport, t.proto, direction)
    }
    /// A key from its fields.
    fn ct_key_of(saddr: Self::Addr, daddr: Self::Addr, sport: u16, dport: u16, proto: u8, direction: u8)
    -> Self::CtKey;
    /// The service map's entry for `addr`:`port` in `scope`.
    fn service(addr: Self::Addr, port: u16, proto: u8, scope: u8) -> Option<ServiceValue>;
    /// Whether `addr` is one of the node's addresses NodePorts answer on.
    fn is_node_address(addr: Self::Addr) -> bool;
    /// Whether `addr` is inside one of the cluster's Service CIDRs.
    fn in_service_cidrs(addr: Self::Addr) -> bool;
    /// Whether `addr` is inside the prefix the settings `cfg` say covers the Service CIDRs (false
    /// when they say none or do not know them yet, and for an IPv6 address).
    fn within_service_cidr_cover(cfg: &DatapathConfig, addr: Self::Addr) -> bool;
    /// Whether `addr` is in one of `svc`'s source ranges (present: the Service has them).
    fn in_source_ranges(svc: &ServiceValue, addr: Self::Addr) -> bool;
    fn affinity() -> &'static LruHashMap<Self::AffinityKey, AffinityValue>;
    fn affinity_key(service: u32, client: Self::Addr, netns_cookie: u64) -> Self::AffinityKey;
    /// Whether `addr` is inside another node's PodCIDR that this node routes natively
    /// ([`PEER_PODS4_MAP`]).
    fn in_peer_pods(addr: Self::Addr) -> bool;
    /// Whether `addr` is link-local (IPv6's `fe80::/10`; the firewall's source check leaves such
    /// sources to the stack, which never forwards them).
    fn is_link_local(addr: Self::Addr) -> bool;
    /// Sets a FIB lookup's family and addresses (the rest as the caller zeroed or set it).
    fn set_fib_addrs(params: &mut FibParams, saddr: Self::Addr, daddr: Self::Addr);
    /// The packet's TTL (hop limit), read from the IP header.
    fn ttl(ctx: &TcContext) -> Option<u8>;
    /// Takes one off the packet's TTL (hop limit), `ttl`, with the IPv4 header checksum: what
    /// the stack does to a packet it forwards.
    fn decrement_ttl(ctx: &mut TcContext, ttl: u8) -> Option<()>;
    /// Sends the (rewritten) packet from `saddr` to `daddr` to its next hop.
    fn fib_redirect(ctx: &mut TcContext, saddr: Self::Addr, daddr: Self::Addr, t: &Tuple<Self::Addr>) -> i32;
    /// The address a `sock_addr` hook's caller gave.
    ///
    /// # Safety
    /// `sa` is the hook's context.
    unsafe fn user_ip(sa: *const bpf_sock_addr) -> Self::Addr;
    /// Rewrites the address of a `sock_addr` hook's call (in full 4-byte stores, as the hook
    /// allows).
    ///
    /// # Safety
    /// `sa` is the hook's context.
    unsafe fn set_user_ip(sa: *mut bpf_sock_addr, addr: Self::Addr);
    fn sock_revnat() -> &'static LruHashMap<Self::SockRevNatKey, SockRevNatValue>;
    fn sock_revnat_key(cookie: u64, addr: Self::Addr, port: u16) -> Self::SockRevNatKey;
}

/// Which end of a packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// [`Family::rewrite_end`] field by field: the address, then the port, each with its checksums.
#[inline(always)]
fn rewrite_end_by_fields<F: Family + ?Sized>(
    ctx: &mut TcContext,
    t: &Tuple<F::Addr>,
    end: End,
    from: (F::Addr, u16),
    to: (F::Addr, u16),
) -> Option<()> {
    let (addr, port) = match end {
        End::Source => (F::SADDR, 0),
        End::Destination => (F::DADDR, 2),
    };
    F::rewrite_addr(ctx, t, addr, from.0, to.0)?;
    rewrite_port(ctx, t, port, from.1, to.1)
}

/// Where an IPv4 header without options is read and written from its checksum on, and how many
/// 16-bit words to its ports' end: the checksum, the source and destination addresses, the source
/// and destination ports.
const V4_SPAN: usize = ETH_HLEN + 10;
const V4_SPAN_WORDS: usize = 7;

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    type CtKey = CtKey4;
    type SockRevNatKey = SockRevNatKey4;
    type AffinityKey = AffinityKey4;
    const UNSPECIFIED: u32 = 0;
    const SADDR: usize = 12;
    const DADDR: usize = 16;
    const SNAT_ADDR_INDEX: u32 = 0;

    #[inline(always)]
    fn hairpin() -> u32 {
        addr4(HAIRPIN_V4)
    }
    #[inline(always)]
    fn widen(addr: u32) -> [u32; 4] {
        [addr, 0, 0, 0]
    }
    #[inline(always)]
    fn narrow(addr: [u32; 4]) -> u32 {
        addr[0]
    }
    #[inline(always)]
    fn parse(ctx: &TcContext) -> Option<Tuple<u32>> {
        let ip = ETH_HLEN;
        let vihl = read::<u8>(ctx, ip)?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        // Non-first fragments carry no ports: left alone.
        let frag = u16::from_be(read::<u16>(ctx, ip + 6)?);
        if frag & 0x1fff != 0 {
            return None;
        }
        let proto = read::<u8>(ctx, ip + 9)?;
        let saddr = read::<u32>(ctx, ip + Self::SADDR)?;
        let daddr = read::<u32>(ctx, ip + Self::DADDR)?;
        let l4 = ip + ihl;
        let fields = if ihl == 20 {
            l4_fields::<{ ETH_HLEN + 20 }>(ctx, proto)?
        } else {
            l4_fields_loaded(ctx, l4, proto)?
        };
        Some(Tuple::new(saddr, daddr, proto, l4, fields))
    }
    #[inline(always)]
    fn rewrite_addr(ctx: &mut TcContext, t: &Tuple<u32>, offset: usize, from: u32, to: u32) -> Option<()> {
        ctx.l4_csum_replace(
            t.csum,
            u64::from(from),
            u64::from(to),
            u64::from(BPF_F_PSEUDO_HDR) | l4_flags(t.proto) | 4,
        )
        .ok()?;
        // IPv4's header checksum, at offset 10 of the header.
        ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(from), u64::from(to), 4)
            .ok()?;
        ctx.store(ETH_HLEN + offset, &to, 0).ok()
    }
    /// Without IP options, the header checksum, both addresses and both ports sit together: they
    /// are written in one store, with the header checksum worked out here, so that a translated
    /// end costs three helper calls rather than five (measured in place: `from_pod` takes about
    /// 9% less time a translated packet, `to_pod` 15%; `tests/benchmarks/per-packet-profile.md`).
    #[inline(always)]
    fn rewrite_end(ctx: &mut TcContext, t: &Tuple<u32>, end: End, from: (u32, u16), to: (u32, u16)) -> Option<()> {
        if t.l4 != ETH_HLEN + 20 {
            return rewrite_end_by_fields::<Self>(ctx, t, end, from, to);
        }
        let flags = l4_flags(t.proto);
        ctx.l4_csum_replace(
            t.csum,
            u64::from(from.0),
            u64::from(to.0),
            u64::from(BPF_F_PSEUDO_HDR) | flags | 4,
        )
        .ok()?;
        ctx.l4_csum_replace(t.csum, u64::from(from.1), u64::from(to.1), flags | 2)
            .ok()?;
        let mut span = read::<[u16; V4_SPAN_WORDS]>(ctx, V4_SPAN)?;
        span[0] = csum_replace4(span[0], from.0, to.0);
        // Word indexes in the span of the address (two words) and the port.
        let (addr, port) = match end {
            End::Source => (1, 5),
            End::Destination => (3, 6),
        };
        // The address's bytes as the packet holds them, two to a word, whatever the machine's
        // byte order (the checksum does not depend on it, but the address does).
        let bytes = to.0.to_ne_bytes();
        span[addr] = u16::from_ne_bytes([bytes[0], bytes[1]]);
        span[addr + 1] = u16::from_ne_bytes([bytes[2], bytes[3]]);
        span[port] = to.1;
        ctx.store(V4_SPAN, &span, 0).ok()
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey4, CtValue> {
        &CT4
    }
    #[inline(always)]
    fn ct_key_of(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, direction: u8) -> CtKey4 {
        CtKey4 {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            direction,
            _pad: [0; 2],
        }
    }
    #[inline(always)]
    fn service(addr: u32, port: u16, proto: u8, scope: u8) -> Option<ServiceValue> {
        let key = ServiceKey4 {
            addr,
            port,
            proto,
            scope,
        };
        // SAFETY: the value is copied out at once.
        unsafe { SERVICES4.get(key) }.copied()
    }
    #[inline(always)]
    fn in_source_ranges(svc: &ServiceValue, addr: u32) -> bool {
        SOURCE_RANGES4
            .get(Key::new(64, SourceRangeKey4 { service: svc.id, addr }))
            .is_some()
    }
    #[inline(always)]
    fn is_node_address(addr: u32) -> bool {
        // SAFETY: only presence matters.
        unsafe { NODE_ADDRS4.get(addr) }.is_some()
    }
    #[inline(always)]
    fn in_service_cidrs(addr: u32) -> bool {
        // Most addresses asked about are pods' and the world's: the cover in the settings (a
        // line every program reads anyway) spares them the trie.
        may_be_in_service_cidrs4(config().service_cidrs4, u32::from_be(addr))
            && SERVICE_CIDRS4.get(Key::new(32, addr)).is_some()
    }
    #[inline(always)]
    fn within_service_cidr_cover(cfg: &DatapathConfig, addr: u32) -> bool {
        within_service_cidr_cover4(cfg.service_cidrs4, u32::from_be(addr))
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey4, AffinityValue> {
        &AFFINITY4
    }
    #[inline(always)]
    fn affinity_key(service: u32, client: u32, netns_cookie: u64) -> AffinityKey4 {
        AffinityKey4 {
            service,
            client,
            netns_cookie,
        }
    }
    #[inline(always)]
    fn in_peer_pods(addr: u32) -> bool {
        PEER_PODS4.get(Key::new(32, addr)).is_some()
    }
    #[inline(always)]
    fn is_link_local(_addr: u32) -> bool {
        false
    }
    #[inline(always)]
    fn set_fib_addrs(params: &mut FibParams, saddr: u32, daddr: u32) {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = saddr;
        params.__bindgen_anon_4.ipv4_dst = daddr;
    }
    #[inline(always)]
    fn ttl(ctx: &TcContext) -> Option<u8> {
        read::<u8>(ctx, ETH_HLEN + 8)
    }
    #[inline(always)]
    fn decrement_ttl(ctx: &mut TcContext, ttl: u8) -> Option<()> {
        // The TTL is the first byte of the header's fifth 16-bit word (the protocol the second,
        // unchanged): the checksum changes as that word does, as it lies in memory.
        let word = |ttl: u8| u64::from(u16::from_ne_bytes([ttl, 0]));
        ctx.l3_csum_replace(ETH_HLEN + 10, word(ttl), word(ttl - 1), 2).ok()?;
        ctx.store(ETH_HLEN + 8, &(ttl - 1), 0).ok()
    }
    #[inline(always)]
    fn fib_redirect(ctx: &mut TcContext, saddr: u32, daddr: u32, t: &Tuple<u32>) -> i32 {
        // SAFETY: an all-zero lookup is valid; the fields it needs are set below.
        let mut params: FibParams = unsafe { core::mem::zeroed() };
        params.family = AF_INET;
        params.l4_protocol = t.proto;
        params.__bindgen_anon_3.ipv4_src = saddr;
        params.__bindgen_anon_4.ipv4_dst = daddr;
        fib_redirect(ctx, &mut params)
    }
    #[inline(always)]
    unsafe fn user_ip(sa: *const bpf_sock_addr) -> u32 {
        // SAFETY: the caller's.
        unsafe { read_volatile(addr_of!((*sa).user_ip4)) }
    }
    #[inline(always)]
    unsafe fn set_user_ip(sa: *mut bpf_sock_addr, addr: u32) {
        // SAFETY: the caller's.
        unsafe { write_volatile(addr_of_mut!((*sa).user_ip4), addr) }
    }
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey4, SockRevNatValue> {
        &SOCK_REVNAT4
    }
    #[inline(always)]
    fn sock_revnat_key(cookie: u64, addr: u32, port: u16) -> SockRevNatKey4 {
        SockRevNatKey4 {
            cookie,
            addr,
            port,
            _pad: 0,
        }
    }
}

impl Family for V6 {
    type Addr = [u32; 4];
    type CtKey = CtKey6;
    type SockRevNatKey = SockRevNatKey6;
    type AffinityKey = AffinityKey6;
    const UNSPECIFIED: [u32; 4] = [0; 4];
    const SADDR: usize = 8;
    const DADDR: usize = 24;
    const SNAT_ADDR_INDEX: u32 = 1;

    #[inline(always)]
    fn hairpin() -> [u32; 4] {
        addr6(HAIRPIN_V6)
    }
    #[inline(always)]
    fn widen(addr: [u32; 4]) -> [u32; 4] {
        addr
    }
    #[inline(always)]
    fn narrow(addr: [u32; 4]) -> [u32; 4] {
        addr
    }
    #[inline(always)]
    fn parse(ctx: &TcContext) -> Option<Tuple<[u32; 4]>> {
        let ip = ETH_HLEN;
        // Extension headers are not followed: such packets are left alone.
        let proto = read::<u8>(ctx, ip + 6)?;
        let saddr = read::<[u32; 4]>(ctx, ip + Self::SADDR)?;
        let daddr = read::<[u32; 4]>(ctx, ip + Self::DADDR)?;
        let l4 = ip + 40;
        let fields = l4_fields::<{ ETH_HLEN + 40 }>(ctx, proto)?;
        Some(Tuple::new(saddr, daddr, proto, l4, fields))
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &mut TcContext,
        t: &Tuple<[u32; 4]>,
        offset: usize,
        from: [u32; 4],
        to: [u32; 4],
    ) -> Option<()> {
        // No IP header checksum in IPv6: only the L4 pseudo-header's, a word at a time.
        let flags = u64::from(BPF_F_PSEUDO_HDR) | l4_flags(t.proto) | 4;
        for (from, to) in from.iter().zip(to.iter()) {
            ctx.l4_csum_replace(t.csum, u64::from(*from), u64::from(*to), flags)
                .ok()?;
        }
        ctx.store(ETH_HLEN + offset, &to, 0).ok()
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey6, CtValue> {
        &CT6
    }
    #[inline(always)]
    fn ct_key_of(saddr: [u32; 4], daddr: [u32; 4], sport: u16, dport: u16, proto: u8, direction: u8) -> CtKey6 {
        CtKey6 {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            direction,
            _pad: [0; 2],
        }
    }
    #[inline(always)]
    fn service(addr: [u32; 4], port: u16, proto: u8, scope: u8) -> Option<ServiceValue> {
        let key = ServiceKey6 {
            addr,
            port,
            proto,
            scope,
        };
        // SAFETY: the value is copied out at once.
        unsafe { SERVICES6.get(key) }.copied()
    }
    #[inline(always)]
    fn in_source_ranges(svc: &ServiceValue, addr: [u32; 4]) -> bool {
        SOURCE_RANGES6
            .get(Key::new(160, SourceRangeKey6 { service: svc.id, addr }))
            .is_some()
    }
    #[inline(always)]
    fn is_node_address(addr: [u32; 4]) -> bool {
        // SAFETY: only presence matters.
        unsafe { NODE_ADDRS6.get(addr) }.is_some()
    }
    #[inline(always)]
    fn in_service_cidrs(addr: [u32; 4]) -> bool {
        SERVICE_CIDRS6.get(Key::new(128, addr)).is_some()
    }
    #[inline(always)]
    fn within_service_cidr_cover(_cfg: &DatapathConfig, _addr: [u32; 4]) -> bool {
        // The settings cover IPv4 Service CIDRs only.
        false
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey6, AffinityValue> {
        &AFFINITY6
    }
    #[inline(always)]
    fn affinity_key(service: u32, client: [u32; 4], netns_cookie: u64) -> AffinityKey6 {
        AffinityKey6 {
            service,
            client,
            _pad: 0,
            netns_cookie,
        }
    }
    #[inline(always)]
    fn in_peer_pods(addr: [u32; 4]) -> bool {
        PEER_PODS6.get(Key::new(128, addr)).is_some()
    }
    #[inline(always)]
    fn is_link_local(addr: [u32; 4]) -> bool {
        u32::from_be(addr[0]) & 0xffc0_0000 == 0xfe80_0000
    }
    #[inline(always)]
    fn set_fib_addrs(params: &mut FibParams, saddr: [u32; 4], daddr: [u32; 4]) {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = saddr;
        params.__bindgen_anon_4.ipv6_dst = daddr;
    }
    #[inline(always)]
    fn ttl(ctx: &TcContext) -> Option<u8> {
        read::<u8>(ctx, ETH_HLEN + 7)
    }
    #[inline(always)]
    fn decrement_ttl(ctx: &mut TcContext, ttl: u8) -> Option<()> {
        // No header checksum in IPv6.
        ctx.store(ETH_HLEN + 7, &(ttl - 1), 0).ok()
    }
    #[inline(always)]
    fn fib_redirect(ctx: &mut TcContext, saddr: [u32; 4], daddr: [u32; 4], t: &Tuple<[u32; 4]>) -> i32 {
        // SAFETY: as for IPv4.
        let mut params: FibParams = unsafe { core::mem::zeroed() };
        params.family = AF_INET6;
        params.l4_protocol = t.proto;
        params.__bindgen_anon_3.ipv6_src = saddr;
        params.__bindgen_anon_4.ipv6_dst = daddr;
        fib_redirect(ctx, &mut params)
    }
    #[inline(always)]
    unsafe fn user_ip(sa: *const bpf_sock_addr) -> [u32; 4] {
        // SAFETY: the caller's; one 4-byte word at a time, as the verifier allows.
        unsafe {
            [
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]
        }
    }
    #[inline(always)]
    unsafe fn set_user_ip(sa: *mut bpf_sock_addr, addr: [u32; 4]) {
        // SAFETY: as above.
        unsafe {
            write_volatile(addr_of_mut!((*sa).user_ip6[0]), addr[0]);
            write_volatile(addr_of_mut!((*sa).user_ip6[1]), addr[1]);
            write_volatile(addr_of_mut!((*sa).user_ip6[2]), addr[2]);
            write_volatile(addr_of_mut!((*sa).user_ip6[3]), addr[3]);
        }
    }
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey6, SockRevNatValue> {
        &SOCK_REVNAT6
    }
    #[inline(always)]
    fn sock_revnat_key(cookie: u64, addr: [u32; 4], port: u16) -> SockRevNatKey6 {
        SockRevNatKey6 {
            cookie,
            addr,
            port,
            _pad: [0; 6],
        }
    }
}
