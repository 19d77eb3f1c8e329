//! Per-packet translation at a pod's host veth (TC/TCX): for whatever socket LB did not
//! translate (socket LB off, or restricted to the node's own network namespace).
//!
//! - `from_pod` (ingress of the host veth: everything the pod sends): a packet to a Service
//!   address is DNATed to a backend, its flow recorded in the conntrack map; a packet to a
//!   Service port without endpoints (or to a Service CIDR address nobody holds) is marked for the
//!   agent's firewall table to reject. Anything else pays one map lookup and goes on untouched;
//!   a TCP SYN pays one more, to forget a finished Service flow whose translated tuple the new
//!   connection reuses (a pod that reached a backend through its Service, then reaches it
//!   directly from the same port, must not get the Service's address on the replies).
//! - `to_pod` (egress: everything sent to the pod): a backend's reply gets the Service address
//!   back, while its flow is not idle past the conntrack limit.
//! - Hairpin: a pod reaching itself through its Service sees the hairpin address as the source,
//!   so that its reply comes back out through the veth, where it is translated and sent back in.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::classifier,
    programs::TcContext,
};
use ferrynet_common::*;

use super::{
    maps::{CT4, CT6, REV_NAT, config},
    pod_stats,
    services::{Destination, backend, lookup4, lookup6, select4, select6},
    stats::bump,
};

/// TCX: go on to the next program on the hook, then the stack.
const NEXT: i32 = -1;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// A packet's addresses, ports and where its checksums are.
struct Tuple<A> {
    saddr: A,
    daddr: A,
    sport: u16,
    dport: u16,
    proto: u8,
    /// Offset of the L4 header.
    l4: usize,
    /// Offset of the L4 checksum.
    csum: usize,
}

#[inline(always)]
fn ethertype(ctx: &TcContext) -> Option<u16> {
    ctx.load::<u16>(12).ok().map(u16::from_be)
}

#[inline(always)]
fn l4_offsets(ctx: &TcContext, l4: usize, proto: u8) -> Option<(u16, u16, usize)> {
    let csum = match proto {
        PROTO_TCP => l4 + 16,
        PROTO_UDP => l4 + 6,
        _ => return None,
    };
    let sport = ctx.load::<u16>(l4).ok()?;
    let dport = ctx.load::<u16>(l4 + 2).ok()?;
    Some((sport, dport, csum))
}

#[inline(always)]
fn parse4(ctx: &TcContext) -> Option<Tuple<u32>> {
    let ip = ETH_HLEN;
    let vihl = ctx.load::<u8>(ip).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    // Non-first fragments carry no ports: left alone.
    let frag = u16::from_be(ctx.load::<u16>(ip + 6).ok()?);
    if frag & 0x1fff != 0 {
        return None;
    }
    let proto = ctx.load::<u8>(ip + 9).ok()?;
    let saddr = ctx.load::<u32>(ip + 12).ok()?;
    let daddr = ctx.load::<u32>(ip + 16).ok()?;
    let l4 = ip + ihl;
    let (sport, dport, csum) = l4_offsets(ctx, l4, proto)?;
    Some(Tuple {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        l4,
        csum,
    })
}

#[inline(always)]
fn load6(ctx: &TcContext, offset: usize) -> Option<[u32; 4]> {
    Some([
        ctx.load::<u32>(offset).ok()?,
        ctx.load::<u32>(offset + 4).ok()?,
        ctx.load::<u32>(offset + 8).ok()?,
        ctx.load::<u32>(offset + 12).ok()?,
    ])
}

#[inline(always)]
fn parse6(ctx: &TcContext) -> Option<Tuple<[u32; 4]>> {
    let ip = ETH_HLEN;
    // Extension headers are not followed: such packets are left alone.
    let proto = ctx.load::<u8>(ip + 6).ok()?;
    let saddr = load6(ctx, ip + 8)?;
    let daddr = load6(ctx, ip + 24)?;
    let l4 = ip + 40;
    let (sport, dport, csum) = l4_offsets(ctx, l4, proto)?;
    Some(Tuple {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        l4,
        csum,
    })
}

/// Flags of an L4 checksum update: UDP's zero checksum means "none" and must stay zero.
#[inline(always)]
fn l4_flags(proto: u8) -> u64 {
    if proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Rewrites an IPv4 address at `offset` (source 12 or destination 16, from the IP header) and
/// its checksums.
#[inline(always)]
fn rewrite_addr4(ctx: &mut TcContext, t: &Tuple<u32>, offset: usize, from: u32, to: u32) -> Option<()> {
    ctx.l4_csum_replace(
        t.csum,
        u64::from(from),
        u64::from(to),
        u64::from(BPF_F_PSEUDO_HDR) | l4_flags(t.proto) | 4,
    )
    .ok()?;
    ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(from), u64::from(to), 4)
        .ok()?;
    ctx.store(ETH_HLEN + offset, &to, 0).ok()
}

#[inline(always)]
fn rewrite_addr6(ctx: &mut TcContext, t: &Tuple<[u32; 4]>, offset: usize, from: [u32; 4], to: [u32; 4]) -> Option<()> {
    let flags = u64::from(BPF_F_PSEUDO_HDR) | l4_flags(t.proto) | 4;
    ctx.l4_csum_replace(t.csum, u64::from(from[0]), u64::from(to[0]), flags)
        .ok()?;
    ctx.l4_csum_replace(t.csum, u64::from(from[1]), u64::from(to[1]), flags)
        .ok()?;
    ctx.l4_csum_replace(t.csum, u64::from(from[2]), u64::from(to[2]), flags)
        .ok()?;
    ctx.l4_csum_replace(t.csum, u64::from(from[3]), u64::from(to[3]), flags)
        .ok()?;
    ctx.store(ETH_HLEN + offset, &to, 0).ok()
}

/// Rewrites the port at `offset` from the L4 header (0 source, 2 destination).
#[inline(always)]
fn rewrite_port<A>(ctx: &mut TcContext, t: &Tuple<A>, offset: usize, from: u16, to: u16) -> Option<()> {
    ctx.l4_csum_replace(t.csum, u64::from(from), u64::from(to), l4_flags(t.proto) | 2)
        .ok()?;
    ctx.store(t.l4 + offset, &to, 0).ok()
}

#[inline(always)]
fn idle_limit(proto: u8) -> u64 {
    if proto == PROTO_TCP {
        CT_TCP_IDLE_NS
    } else {
        CT_UDP_IDLE_NS
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` points at the kernel's __sk_buff for this invocation.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Sends a packet back out to the pod it came from: the Ethernet addresses swap (the pod sent
/// it to the host veth's MAC; it must come back to its own, or the pod drops it as another
/// host's), then the packet goes to the egress of the veth it came in on.
#[inline(always)]
fn bounce_to_pod(ctx: &mut TcContext) -> Option<i32> {
    let dst = ctx.load::<[u8; 6]>(0).ok()?;
    let src = ctx.load::<[u8; 6]>(6).ok()?;
    ctx.store(0, &src, 0).ok()?;
    ctx.store(6, &dst, 0).ok()?;
    // SAFETY: redirecting to the egress of the veth the packet came in on.
    Some(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}

/// Marks a packet for the firewall table to reject, and lets it go on.
#[inline(always)]
fn refuse(ctx: &TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's __sk_buff for this invocation.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark((mark & !MARK_MASK) | MARK_REJECT);
    bump(Stat::PacketsRefused);
    NEXT
}

/// Whether a TCP segment opens a connection (SYN without ACK).
#[inline(always)]
fn is_tcp_syn<A>(ctx: &TcContext, t: &Tuple<A>) -> bool {
    t.proto == PROTO_TCP && ctx.load::<u8>(t.l4 + 13).is_ok_and(|flags| flags & 0x12 == 0x02)
}

/// A new connection from the pod to a non-Service destination: if an earlier Service flow was
/// translated to exactly this tuple, that flow is over (one tuple, one connection), so its
/// entries go and the replies stay untranslated.
#[inline(always)]
fn forget_reused_tuple4(t: &Tuple<u32>) {
    let reply = CtKey4 {
        saddr: t.daddr,
        daddr: t.saddr,
        sport: t.dport,
        dport: t.sport,
        proto: t.proto,
        direction: CT_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let Some(entry) = (unsafe { CT4.get(reply) }).copied() else {
        return;
    };
    // SAFETY: the value is copied out at once.
    if let Some(vip) = unsafe { REV_NAT.get(entry.service) }.copied() {
        let _ = CT4.remove(CtKey4 {
            saddr: t.saddr,
            daddr: vip.addr[0],
            sport: t.sport,
            dport: vip.port,
            proto: t.proto,
            direction: CT_FORWARD,
            _pad: [0; 2],
        });
    }
    let _ = CT4.remove(reply);
}

#[inline(always)]
fn forget_reused_tuple6(t: &Tuple<[u32; 4]>) {
    let reply = CtKey6 {
        saddr: t.daddr,
        daddr: t.saddr,
        sport: t.dport,
        dport: t.sport,
        proto: t.proto,
        direction: CT_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let Some(entry) = (unsafe { CT6.get(reply) }).copied() else {
        return;
    };
    // SAFETY: the value is copied out at once.
    if let Some(vip) = unsafe { REV_NAT.get(entry.service) }.copied() {
        let _ = CT6.remove(CtKey6 {
            saddr: t.saddr,
            daddr: vip.addr,
            sport: t.sport,
            dport: vip.port,
            proto: t.proto,
            direction: CT_FORWARD,
            _pad: [0; 2],
        });
    }
    let _ = CT6.remove(reply);
}

#[classifier]
pub fn from_pod(mut ctx: TcContext) -> i32 {
    pod_stats::count(&ctx);
    if config().flags & CONFIG_F_PER_PACKET == 0 {
        return NEXT;
    }
    match ethertype(&ctx) {
        Some(ETH_P_IP) => from_pod4(&mut ctx).unwrap_or(NEXT),
        Some(ETH_P_IPV6) => from_pod6(&mut ctx).unwrap_or(NEXT),
        _ => NEXT,
    }
}

#[classifier]
pub fn to_pod(mut ctx: TcContext) -> i32 {
    if config().flags & CONFIG_F_PER_PACKET == 0 {
        return NEXT;
    }
    match ethertype(&ctx) {
        Some(ETH_P_IP) => to_pod4(&mut ctx).unwrap_or(NEXT),
        Some(ETH_P_IPV6) => to_pod6(&mut ctx).unwrap_or(NEXT),
        _ => NEXT,
    }
}

fn from_pod4(ctx: &mut TcContext) -> Option<i32> {
    let t = parse4(ctx)?;
    let hairpin = addr4(HAIRPIN_V4);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if t.daddr == hairpin {
        // A pod's reply to itself through its Service: back to the client's view, and back in.
        let key = CtKey4 {
            saddr: t.saddr,
            daddr: t.daddr,
            sport: t.sport,
            dport: t.dport,
            proto: t.proto,
            direction: CT_REPLY,
            _pad: [0; 2],
        };
        // SAFETY: the value is copied out at once.
        let entry = unsafe { CT4.get(key) }.copied()?;
        // SAFETY: the value is copied out at once.
        let vip = unsafe { REV_NAT.get(entry.service) }.copied()?;
        rewrite_addr4(ctx, &t, 12, t.saddr, vip.addr[0])?;
        rewrite_port(ctx, &t, 0, t.sport, vip.port)?;
        rewrite_addr4(ctx, &t, 16, t.daddr, entry.client_addr[0])?;
        rewrite_port(ctx, &t, 2, t.dport, entry.client_port)?;
        bump(Stat::PacketsTranslated);
        return bounce_to_pod(ctx);
    }
    let svc = match lookup4(t.daddr, t.dport, t.proto, SCOPE_INTERNAL) {
        Destination::Other => {
            if is_tcp_syn(ctx, &t) {
                forget_reused_tuple4(&t);
            }
            return None;
        }
        Destination::Refused => return Some(refuse(ctx)),
        Destination::Service(svc) => svc,
    };
    let key = CtKey4 {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        direction: CT_FORWARD,
        _pad: [0; 2],
    };
    let forward_entry = CT4.get_ptr_mut(key);
    // SAFETY: the value is copied out at once.
    let known = forward_entry
        .map(|entry| unsafe { *entry })
        .filter(|e| now.saturating_sub(e.last_seen_ns) < idle_limit(t.proto) && e.service == svc.id)
        .and_then(|e| Some((e.backend, backend(e.backend)?)));
    let new_flow = known.is_none();
    let (id, b) = match known {
        Some(found) => found,
        None => match select4(&svc, t.saddr, 0) {
            Some(found) => found,
            None => return Some(refuse(ctx)),
        },
    };
    let is_hairpin = b.addr[0] == t.saddr;
    let value = CtValue {
        backend: id,
        service: svc.id,
        last_seen_ns: now,
        flags: 0,
        client_port: t.sport,
        _pad: 0,
        client_addr: [t.saddr, 0, 0, 0],
    };

    // The reply's tuple, as the backend sends it.
    let reply = CtKey4 {
        saddr: b.addr[0],
        daddr: if is_hairpin { hairpin } else { t.saddr },
        sport: b.port,
        dport: t.sport,
        proto: t.proto,
        direction: CT_REPLY,
        _pad: [0; 2],
    };
    let reply_value = CtValue {
        flags: if is_hairpin { CT_F_HAIRPIN } else { 0 },
        ..value
    };
    match (new_flow, forward_entry) {
        // A known flow: both entries are refreshed in place, so that a packet of an established
        // flow allocates nothing (an insert into an LRU map takes a fresh element each time).
        (false, Some(forward)) => {
            // SAFETY: the pointer is to this map's value for `key`, valid during this program.
            unsafe { (*forward).last_seen_ns = now };
            match CT4.get_ptr_mut(reply) {
                // SAFETY: as above, for `reply`.
                Some(entry) => unsafe { (*entry).last_seen_ns = now },
                None => {
                    if CT4.insert(reply, reply_value, 0).is_err() {
                        bump(Stat::ConntrackFull);
                    }
                }
            }
        }
        _ => {
            if CT4.insert(key, value, 0).is_err() {
                bump(Stat::ConntrackFull);
            }
            if CT4.insert(reply, reply_value, 0).is_err() {
                bump(Stat::ConntrackFull);
            }
        }
    }
    rewrite_addr4(ctx, &t, 16, t.daddr, b.addr[0])?;
    rewrite_port(ctx, &t, 2, t.dport, b.port)?;
    if new_flow {
        bump(Stat::PacketFlowsTranslated);
    }
    bump(Stat::PacketsTranslated);
    if is_hairpin {
        rewrite_addr4(ctx, &t, 12, t.saddr, hairpin)?;
        return bounce_to_pod(ctx);
    }
    Some(TC_ACT_OK)
}

fn to_pod4(ctx: &mut TcContext) -> Option<i32> {
    let t = parse4(ctx)?;
    let key = CtKey4 {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        direction: CT_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let entry = unsafe { CT4.get(key) }.copied()?;
    if entry.flags & CT_F_HAIRPIN != 0 {
        return None;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(entry.last_seen_ns) >= idle_limit(t.proto) {
        let _ = CT4.remove(key);
        return None;
    }
    // SAFETY: the value is copied out at once.
    let vip = unsafe { REV_NAT.get(entry.service) }.copied()?;
    rewrite_addr4(ctx, &t, 12, t.saddr, vip.addr[0])?;
    rewrite_port(ctx, &t, 0, t.sport, vip.port)?;
    bump(Stat::PacketsTranslated);
    Some(NEXT)
}

fn from_pod6(ctx: &mut TcContext) -> Option<i32> {
    let t = parse6(ctx)?;
    let hairpin = addr6(HAIRPIN_V6);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if t.daddr == hairpin {
        let key = CtKey6 {
            saddr: t.saddr,
            daddr: t.daddr,
            sport: t.sport,
            dport: t.dport,
            proto: t.proto,
            direction: CT_REPLY,
            _pad: [0; 2],
        };
        // SAFETY: the value is copied out at once.
        let entry = unsafe { CT6.get(key) }.copied()?;
        // SAFETY: the value is copied out at once.
        let vip = unsafe { REV_NAT.get(entry.service) }.copied()?;
        rewrite_addr6(ctx, &t, 8, t.saddr, vip.addr)?;
        rewrite_port(ctx, &t, 0, t.sport, vip.port)?;
        rewrite_addr6(ctx, &t, 24, t.daddr, entry.client_addr)?;
        rewrite_port(ctx, &t, 2, t.dport, entry.client_port)?;
        bump(Stat::PacketsTranslated);
        return bounce_to_pod(ctx);
    }
    let svc = match lookup6(t.daddr, t.dport, t.proto, SCOPE_INTERNAL) {
        Destination::Other => {
            if is_tcp_syn(ctx, &t) {
                forget_reused_tuple6(&t);
            }
            return None;
        }
        Destination::Refused => return Some(refuse(ctx)),
        Destination::Service(svc) => svc,
    };
    let key = CtKey6 {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        direction: CT_FORWARD,
        _pad: [0; 2],
    };
    let forward_entry = CT6.get_ptr_mut(key);
    // SAFETY: the value is copied out at once.
    let known = forward_entry
        .map(|entry| unsafe { *entry })
        .filter(|e| now.saturating_sub(e.last_seen_ns) < idle_limit(t.proto) && e.service == svc.id)
        .and_then(|e| Some((e.backend, backend(e.backend)?)));
    let new_flow = known.is_none();
    let (id, b) = match known {
        Some(found) => found,
        None => match select6(&svc, t.saddr, 0) {
            Some(found) => found,
            None => return Some(refuse(ctx)),
        },
    };
    let is_hairpin = b.addr == t.saddr;
    let value = CtValue {
        backend: id,
        service: svc.id,
        last_seen_ns: now,
        flags: 0,
        client_port: t.sport,
        _pad: 0,
        client_addr: t.saddr,
    };

    let reply = CtKey6 {
        saddr: b.addr,
        daddr: if is_hairpin { hairpin } else { t.saddr },
        sport: b.port,
        dport: t.sport,
        proto: t.proto,
        direction: CT_REPLY,
        _pad: [0; 2],
    };
    let reply_value = CtValue {
        flags: if is_hairpin { CT_F_HAIRPIN } else { 0 },
        ..value
    };
    match (new_flow, forward_entry) {
        // A known flow: both entries are refreshed in place, so that a packet of an established
        // flow allocates nothing (an insert into an LRU map takes a fresh element each time).
        (false, Some(forward)) => {
            // SAFETY: the pointer is to this map's value for `key`, valid during this program.
            unsafe { (*forward).last_seen_ns = now };
            match CT6.get_ptr_mut(reply) {
                // SAFETY: as above, for `reply`.
                Some(entry) => unsafe { (*entry).last_seen_ns = now },
                None => {
                    if CT6.insert(reply, reply_value, 0).is_err() {
                        bump(Stat::ConntrackFull);
                    }
                }
            }
        }
        _ => {
            if CT6.insert(key, value, 0).is_err() {
                bump(Stat::ConntrackFull);
            }
            if CT6.insert(reply, reply_value, 0).is_err() {
                bump(Stat::ConntrackFull);
            }
        }
    }
    rewrite_addr6(ctx, &t, 24, t.daddr, b.addr)?;
    rewrite_port(ctx, &t, 2, t.dport, b.port)?;
    if new_flow {
        bump(Stat::PacketFlowsTranslated);
    }
    bump(Stat::PacketsTranslated);
    if is_hairpin {
        rewrite_addr6(ctx, &t, 8, t.saddr, hairpin)?;
        return bounce_to_pod(ctx);
    }
    Some(TC_ACT_OK)
}

fn to_pod6(ctx: &mut TcContext) -> Option<i32> {
    let t = parse6(ctx)?;
    let key = CtKey6 {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        direction: CT_REPLY,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let entry = unsafe { CT6.get(key) }.copied()?;
    if entry.flags & CT_F_HAIRPIN != 0 {
        return None;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(entry.last_seen_ns) >= idle_limit(t.proto) {
        let _ = CT6.remove(key);
        return None;
    }
    // SAFETY: the value is copied out at once.
    let vip = unsafe { REV_NAT.get(entry.service) }.copied()?;
    rewrite_addr6(ctx, &t, 8, t.saddr, vip.addr)?;
    rewrite_port(ctx, &t, 0, t.sport, vip.port)?;
    bump(Stat::PacketsTranslated);
    Some(NEXT)
}
