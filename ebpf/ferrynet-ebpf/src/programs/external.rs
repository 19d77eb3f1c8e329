//! Traffic from outside the cluster: NodePorts, externalIPs and load balancer IPs, at the ingress
//! of the node's uplinks (TCX).
//!
//! - A client's packet to one of the node's addresses (those in the node address maps) on a
//!   NodePort, or to an externalIP or load balancer IP on a Service port, picks a backend. A
//!   backend on this node gets the packet DNATed and handed to the stack; the client's address is
//!   kept, and the backend's replies are translated back at its veth ([`reply_to_external4`],
//!   called by `from_pod`). A backend on another node gets it DNATed and SNATed to this node's
//!   address and a port of the SNAT range, so that its replies come back here; the port is
//!   allocated against the conntrack map, never reused while its flow lives.
//! - A reply of an SNATed flow arriving back gets the client's view back and goes straight out.
//! - Rewritten packets whose source is one of the node's addresses are sent on to their next hop
//!   through the FIB (`fib_redirect4`/`6`): the stack would drop them as martians.
//! - A NodePort without backends is refused (TCP reset or ICMP, through the refusal mark), or
//!   dropped under `externalTrafficPolicy: Local`, so that a load balancer's health check steers
//!   around the node.
//! - Flows live in the conntrack maps with their own directions ([`CT_EXT_IN`], [`CT_EXT_OUT`]);
//!   a TCP FIN or RST closes both directions of an SNATed flow, which frees its port after
//!   [`CT_CLOSED_NS`].
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use ferrynet_common::*;

use super::{
    maps::{
        CT4, CT6, REV_NAT, SERVICES4, SERVICES6, SNAT_ADDRS, SOURCE_RANGES4, SOURCE_RANGES6, backend_port, config,
        frontend_port,
    },
    packet::*,
    services::{backend, node_port4, node_port6, select4, select6},
    stats::bump,
};

/// How many SNAT ports a new flow tries before it is dropped.
const SNAT_TRIES: u32 = 32;

#[classifier]
pub fn from_uplink(mut ctx: TcContext) -> i32 {
    if config().flags & CONFIG_F_EXTERNAL == 0 {
        return NEXT;
    }
    match ethertype(&ctx) {
        Some(ETH_P_IP) => from_uplink4(&mut ctx).unwrap_or(NEXT),
        Some(ETH_P_IPV6) => from_uplink6(&mut ctx).unwrap_or(NEXT),
        _ => NEXT,
    }
}

/// Refreshes an entry for a packet of its flow; a TCP FIN or RST closes it.
#[inline(always)]
fn touch(entry: *mut CtValue, now: u64, closing: bool) {
    // SAFETY: `entry` points at a conntrack value, valid while this program runs.
    unsafe {
        (*entry).last_seen_ns = now;
        if closing {
            (*entry).flags |= CT_F_CLOSED;
        }
    }
}

#[inline(always)]
fn close4(key: CtKey4) {
    if let Some(other) = CT4.get_ptr_mut(key) {
        // SAFETY: as in `touch`.
        unsafe { (*other).flags |= CT_F_CLOSED };
    }
}

#[inline(always)]
fn close6(key: CtKey6) {
    if let Some(other) = CT6.get_ptr_mut(key) {
        // SAFETY: as in `touch`.
        unsafe { (*other).flags |= CT_F_CLOSED };
    }
}

/// A client's SYN on a flow that closed: a new connection reusing the tuple (a client that
/// reset its last one, or reuses ports quickly), balanced afresh as the stack's conntrack
/// would, instead of pinned to the closed flow's backend (which may have gone since).
#[inline(always)]
fn reopens<A>(t: &Tuple<A>, e: &CtValue) -> bool {
    e.flags & CT_F_CLOSED != 0 && e.flags & CT_F_SNAT_REPLY == 0 && is_tcp_syn(t)
}

/// An externalIP's or load balancer IP's entry for external traffic, when `addr`:`port` is one.
#[inline(always)]
fn external_ip4(addr: u32, port: u16, proto: u8) -> Option<ServiceValue> {
    if !frontend_port(port) {
        return None;
    }
    let key = ServiceKey4 {
        addr,
        port,
        proto,
        scope: SCOPE_EXTERNAL,
    };
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES4.get(key) }.copied()
}

#[inline(always)]
fn external_ip6(addr: [u32; 4], port: u16, proto: u8) -> Option<ServiceValue> {
    if !frontend_port(port) {
        return None;
    }
    let key = ServiceKey6 {
        addr,
        port,
        proto,
        scope: SCOPE_EXTERNAL,
    };
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES6.get(key) }.copied()
}

/// Whether `addr` may open a flow to frontend `service` (`loadBalancerSourceRanges`).
#[inline(always)]
fn source_allowed4(svc: &ServiceValue, addr: u32) -> bool {
    svc.flags & SERVICE_F_SOURCE_RANGES == 0
        || SOURCE_RANGES4
            .get(aya_ebpf::maps::lpm_trie::Key::new(
                64,
                SourceRangeKey4 { service: svc.id, addr },
            ))
            .is_some()
}

#[inline(always)]
fn source_allowed6(svc: &ServiceValue, addr: [u32; 4]) -> bool {
    svc.flags & SERVICE_F_SOURCE_RANGES == 0
        || SOURCE_RANGES6
            .get(aya_ebpf::maps::lpm_trie::Key::new(
                160,
                SourceRangeKey6 { service: svc.id, addr },
            ))
            .is_some()
}

/// A NodePort without backends: dropped under `externalTrafficPolicy: Local`, refused otherwise.
#[inline(always)]
fn no_backends(ctx: &TcContext, svc: &ServiceValue) -> i32 {
    if svc.flags & SERVICE_F_DROP_EMPTY != 0 {
        bump(Stat::ExternalDropped);
        return TC_ACT_SHOT;
    }
    refuse(ctx)
}

/// The first free port of the SNAT range, from a random start, for the flow `node`:port →
/// `b`; its reply entry is written at once, so no other flow can take it.
#[inline(always)]
fn allocate_snat4(node: u32, b: &BackendValue, proto: u8, reply: CtValue, now: u64) -> Option<u16> {
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    // SAFETY: no preconditions.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..SNAT_TRIES {
        let port = (SNAT_PORT_MIN + ((start + i) % span) as u16).to_be();
        let key = CtKey4 {
            saddr: b.addr[0],
            daddr: node,
            sport: b.port,
            dport: port,
            proto,
            direction: CT_EXT_IN,
            _pad: [0; 2],
        };
        // SAFETY: the value is copied out at once.
        let flags = match unsafe { CT4.get(key) } {
            Some(e) if !expired(e, now, proto) => continue,
            // An expired flow's port is free: overwritten.
            Some(_) => 0,
            None => u64::from(BPF_NOEXIST),
        };
        if CT4.insert(key, reply, flags).is_ok() {
            return Some(port);
        }
    }
    None
}

#[inline(always)]
fn allocate_snat6(node: [u32; 4], b: &BackendValue, proto: u8, reply: CtValue, now: u64) -> Option<u16> {
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    // SAFETY: no preconditions.
    let start = unsafe { bpf_get_prandom_u32() } % span;
    for i in 0..SNAT_TRIES {
        let port = (SNAT_PORT_MIN + ((start + i) % span) as u16).to_be();
        let key = CtKey6 {
            saddr: b.addr,
            daddr: node,
            sport: b.port,
            dport: port,
            proto,
            direction: CT_EXT_IN,
            _pad: [0; 2],
        };
        // SAFETY: the value is copied out at once.
        let flags = match unsafe { CT6.get(key) } {
            Some(e) if !expired(e, now, proto) => continue,
            Some(_) => 0,
            None => u64::from(BPF_NOEXIST),
        };
        if CT6.insert(key, reply, flags).is_ok() {
            return Some(port);
        }
    }
    None
}

fn from_uplink4(ctx: &mut TcContext) -> Option<i32> {
    let t = parse4(ctx)?;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = CtKey4 {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        direction: CT_EXT_IN,
        _pad: [0; 2],
    };
    // A known flow's packet is a client's, to a frontend's port, or a backend's reply, from a
    // backend's port: anything else (most of what crosses the uplink) skips the lookup.
    let known = if frontend_port(t.dport) || backend_port(t.sport) {
        CT4.get_ptr_mut(key)
    } else {
        None
    };
    if let Some(entry) = known {
        // SAFETY: copied out at once.
        let e = unsafe { *entry };
        if !expired(&e, now, t.proto) && !reopens(&t, &e) {
            let closing = is_tcp_end(&t);
            touch(entry, now, closing);
            if e.flags & CT_F_SNAT_REPLY != 0 {
                // Another node's backend answering: back to the client's view, and out.
                // SAFETY: copied out at once.
                let frontend = unsafe { REV_NAT.get(e.service) }.copied()?;
                let client = e.client_addr[0];
                // A NodePort's (wildcard) replies come from the node address the flow was SNATed
                // to, which is the one the client sent to; an externalIP's from that IP.
                let source = if frontend.addr[0] == 0 {
                    t.daddr
                } else {
                    frontend.addr[0]
                };
                if closing {
                    close4(CtKey4 {
                        saddr: client,
                        daddr: source,
                        sport: e.client_port,
                        dport: frontend.port,
                        proto: t.proto,
                        direction: CT_EXT_IN,
                        _pad: [0; 2],
                    });
                }
                rewrite_addr4(ctx, &t, 12, t.saddr, source)?;
                rewrite_port(ctx, &t, 0, t.sport, frontend.port)?;
                rewrite_addr4(ctx, &t, 16, t.daddr, client)?;
                rewrite_port(ctx, &t, 2, t.dport, e.client_port)?;
                bump(Stat::PacketsTranslated);
                return Some(fib_redirect4(ctx, source, client, &t));
            }
            // A client's packet of a known flow.
            let b = backend(e.backend)?;
            rewrite_addr4(ctx, &t, 16, t.daddr, b.addr[0])?;
            rewrite_port(ctx, &t, 2, t.dport, b.port)?;
            bump(Stat::PacketsTranslated);
            if e.client_port == 0 {
                if closing && is_tcp_rst(&t) {
                    // A client's reset ends the flow at once: the local backend's reply entry
                    // closes too (see `reply_to_external4`). A FIN only half-closes: the backend
                    // may answer for a long while yet, and its own FIN closes the entry.
                    close4(CtKey4 {
                        saddr: b.addr[0],
                        daddr: t.saddr,
                        sport: b.port,
                        dport: t.sport,
                        proto: t.proto,
                        direction: CT_EXT_OUT,
                        _pad: [0; 2],
                    });
                }
                return Some(NEXT);
            }
            // SNATed: to the address and port the flow was given.
            let snat_addr = e.client_addr[0];
            if closing {
                close4(CtKey4 {
                    saddr: b.addr[0],
                    daddr: snat_addr,
                    sport: b.port,
                    dport: e.client_port,
                    proto: t.proto,
                    direction: CT_EXT_IN,
                    _pad: [0; 2],
                });
            }
            rewrite_addr4(ctx, &t, 12, t.saddr, snat_addr)?;
            rewrite_port(ctx, &t, 0, t.sport, e.client_port)?;
            return Some(fib_redirect4(ctx, snat_addr, b.addr[0], &t));
        }
    }
    // A new flow, if it is for a NodePort on one of the node's addresses.
    let (svc, node_port) = match node_port4(t.daddr, t.dport, t.proto, SCOPE_EXTERNAL) {
        Some(svc) => (svc, true),
        None => (external_ip4(t.daddr, t.dport, t.proto)?, false),
    };
    if !source_allowed4(&svc, t.saddr) {
        bump(Stat::ExternalDropped);
        return Some(TC_ACT_SHOT);
    }
    if svc.count == 0 {
        return Some(no_backends(ctx, &svc));
    }
    let Some((id, b)) = select4(
        &svc,
        t.saddr,
        0,
        flow_hash(&[t.saddr, 0, 0, 0], t.sport, t.dport, t.proto),
    ) else {
        return Some(no_backends(ctx, &svc));
    };
    let mut value = CtValue {
        backend: id,
        service: svc.id,
        last_seen_ns: now,
        flags: 0,
        client_port: 0,
        _pad: 0,
        client_addr: [0; 4],
    };
    if b.flags & BACKEND_F_LOCAL != 0 {
        // The client's address stays; the backend's replies are translated at its veth.
        let out = CtKey4 {
            saddr: b.addr[0],
            daddr: t.saddr,
            sport: b.port,
            dport: t.sport,
            proto: t.proto,
            direction: CT_EXT_OUT,
            _pad: [0; 2],
        };
        let out_value = CtValue {
            client_addr: [t.daddr, 0, 0, 0],
            ..value
        };
        if CT4.insert(key, value, 0).is_err() || CT4.insert(out, out_value, 0).is_err() {
            bump(Stat::ConntrackFull);
        }
        rewrite_addr4(ctx, &t, 16, t.daddr, b.addr[0])?;
        rewrite_port(ctx, &t, 2, t.dport, b.port)?;
        bump(Stat::ExternalFlowsTranslated);
        bump(Stat::PacketsTranslated);
        return Some(NEXT);
    }
    let reply = CtValue {
        flags: CT_F_SNAT_REPLY,
        client_port: t.sport,
        client_addr: [t.saddr, 0, 0, 0],
        ..value
    };
    // SNATed to the address the client sent to for a NodePort (one of the node's), to the
    // node's InternalIP for an externalIP or load balancer IP (which may not route back here).
    let snat_addr = if node_port {
        t.daddr
    } else {
        match SNAT_ADDRS.get(0).map(|a| a[0]) {
            Some(a) if a != 0 => a,
            _ => {
                bump(Stat::FibFailed);
                return Some(TC_ACT_SHOT);
            }
        }
    };
    let Some(snat_port) = allocate_snat4(snat_addr, &b, t.proto, reply, now) else {
        bump(Stat::SnatPortsExhausted);
        return Some(TC_ACT_SHOT);
    };
    value.client_port = snat_port;
    value.client_addr = [snat_addr, 0, 0, 0];
    if CT4.insert(key, value, 0).is_err() {
        bump(Stat::ConntrackFull);
    }
    rewrite_addr4(ctx, &t, 16, t.daddr, b.addr[0])?;
    rewrite_port(ctx, &t, 2, t.dport, b.port)?;
    rewrite_addr4(ctx, &t, 12, t.saddr, snat_addr)?;
    rewrite_port(ctx, &t, 0, t.sport, snat_port)?;
    bump(Stat::ExternalFlowsTranslated);
    bump(Stat::PacketsTranslated);
    Some(fib_redirect4(ctx, snat_addr, b.addr[0], &t))
}

fn from_uplink6(ctx: &mut TcContext) -> Option<i32> {
    let t = parse6(ctx)?;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = CtKey6 {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        direction: CT_EXT_IN,
        _pad: [0; 2],
    };
    // A known flow's packet is a client's, to a frontend's port, or a backend's reply, from a
    // backend's port: anything else (most of what crosses the uplink) skips the lookup.
    let known = if frontend_port(t.dport) || backend_port(t.sport) {
        CT6.get_ptr_mut(key)
    } else {
        None
    };
    if let Some(entry) = known {
        // SAFETY: copied out at once.
        let e = unsafe { *entry };
        if !expired(&e, now, t.proto) && !reopens(&t, &e) {
            let closing = is_tcp_end(&t);
            touch(entry, now, closing);
            if e.flags & CT_F_SNAT_REPLY != 0 {
                // SAFETY: copied out at once.
                let frontend = unsafe { REV_NAT.get(e.service) }.copied()?;
                let client = e.client_addr;
                let source = if frontend.addr == [0; 4] {
                    t.daddr
                } else {
                    frontend.addr
                };
                if closing {
                    close6(CtKey6 {
                        saddr: client,
                        daddr: source,
                        sport: e.client_port,
                        dport: frontend.port,
                        proto: t.proto,
                        direction: CT_EXT_IN,
                        _pad: [0; 2],
                    });
                }
                rewrite_addr6(ctx, &t, 8, t.saddr, source)?;
                rewrite_port(ctx, &t, 0, t.sport, frontend.port)?;
                rewrite_addr6(ctx, &t, 24, t.daddr, client)?;
                rewrite_port(ctx, &t, 2, t.dport, e.client_port)?;
                bump(Stat::PacketsTranslated);
                return Some(fib_redirect6(ctx, source, client, &t));
            }
            let b = backend(e.backend)?;
            rewrite_addr6(ctx, &t, 24, t.daddr, b.addr)?;
            rewrite_port(ctx, &t, 2, t.dport, b.port)?;
            bump(Stat::PacketsTranslated);
            if e.client_port == 0 {
                if closing && is_tcp_rst(&t) {
                    close6(CtKey6 {
                        saddr: b.addr,
                        daddr: t.saddr,
                        sport: b.port,
                        dport: t.sport,
                        proto: t.proto,
                        direction: CT_EXT_OUT,
                        _pad: [0; 2],
                    });
                }
                return Some(NEXT);
            }
            let snat_addr = e.client_addr;
            if closing {
                close6(CtKey6 {
                    saddr: b.addr,
                    daddr: snat_addr,
                    sport: b.port,
                    dport: e.client_port,
                    proto: t.proto,
                    direction: CT_EXT_IN,
                    _pad: [0; 2],
                });
            }
            rewrite_addr6(ctx, &t, 8, t.saddr, snat_addr)?;
            rewrite_port(ctx, &t, 0, t.sport, e.client_port)?;
            return Some(fib_redirect6(ctx, snat_addr, b.addr, &t));
        }
    }
    let (svc, node_port) = match node_port6(t.daddr, t.dport, t.proto, SCOPE_EXTERNAL) {
        Some(svc) => (svc, true),
        None => (external_ip6(t.daddr, t.dport, t.proto)?, false),
    };
    if !source_allowed6(&svc, t.saddr) {
        bump(Stat::ExternalDropped);
        return Some(TC_ACT_SHOT);
    }
    if svc.count == 0 {
        return Some(no_backends(ctx, &svc));
    }
    let Some((id, b)) = select6(&svc, t.saddr, 0, flow_hash(&t.saddr, t.sport, t.dport, t.proto)) else {
        return Some(no_backends(ctx, &svc));
    };
    let mut value = CtValue {
        backend: id,
        service: svc.id,
        last_seen_ns: now,
        flags: 0,
        client_port: 0,
        _pad: 0,
        client_addr: [0; 4],
    };
    if b.flags & BACKEND_F_LOCAL != 0 {
        let out = CtKey6 {
            saddr: b.addr,
            daddr: t.saddr,
            sport: b.port,
            dport: t.sport,
            proto: t.proto,
            direction: CT_EXT_OUT,
            _pad: [0; 2],
        };
        let out_value = CtValue {
            client_addr: t.daddr,
            ..value
        };
        if CT6.insert(key, value, 0).is_err() || CT6.insert(out, out_value, 0).is_err() {
            bump(Stat::ConntrackFull);
        }
        rewrite_addr6(ctx, &t, 24, t.daddr, b.addr)?;
        rewrite_port(ctx, &t, 2, t.dport, b.port)?;
        bump(Stat::ExternalFlowsTranslated);
        bump(Stat::PacketsTranslated);
        return Some(NEXT);
    }
    let reply = CtValue {
        flags: CT_F_SNAT_REPLY,
        client_port: t.sport,
        client_addr: t.saddr,
        ..value
    };
    let snat_addr = if node_port {
        t.daddr
    } else {
        match SNAT_ADDRS.get(1).copied() {
            Some(a) if a != [0; 4] => a,
            _ => {
                bump(Stat::FibFailed);
                return Some(TC_ACT_SHOT);
            }
        }
    };
    let Some(snat_port) = allocate_snat6(snat_addr, &b, t.proto, reply, now) else {
        bump(Stat::SnatPortsExhausted);
        return Some(TC_ACT_SHOT);
    };
    value.client_port = snat_port;
    value.client_addr = snat_addr;
    if CT6.insert(key, value, 0).is_err() {
        bump(Stat::ConntrackFull);
    }
    rewrite_addr6(ctx, &t, 24, t.daddr, b.addr)?;
    rewrite_port(ctx, &t, 2, t.dport, b.port)?;
    rewrite_addr6(ctx, &t, 8, t.saddr, snat_addr)?;
    rewrite_port(ctx, &t, 0, t.sport, snat_port)?;
    bump(Stat::ExternalFlowsTranslated);
    bump(Stat::PacketsTranslated);
    Some(fib_redirect6(ctx, snat_addr, b.addr, &t))
}

/// A SYN-ACK on a closed flow's reply entry answers another connection on the same tuple: the
/// client reached the pod directly from a port its NodePort flow used (a NodePort flow reopened
/// on the tuple would have written a fresh entry). Left untranslated, and the entry goes.
#[inline(always)]
fn answers_new_connection<A>(t: &Tuple<A>, e: &CtValue) -> bool {
    e.flags & CT_F_CLOSED != 0 && is_tcp_syn_ack(t)
}

/// A local backend's reply to an external client (at its veth's ingress): its source becomes the
/// node address and NodePort the client sent to, and it goes straight out. None: not such a reply.
#[inline(always)]
pub fn reply_to_external4(ctx: &mut TcContext, t: &Tuple<u32>) -> Option<i32> {
    // Only a backend's packet may answer an external flow.
    if !backend_port(t.sport) {
        return None;
    }
    let key = CtKey4 {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        direction: CT_EXT_OUT,
        _pad: [0; 2],
    };
    let entry = CT4.get_ptr_mut(key)?;
    // SAFETY: copied out at once.
    let e = unsafe { *entry };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if expired(&e, now, t.proto) || answers_new_connection(t, &e) {
        let _ = CT4.remove(key);
        return None;
    }
    touch(entry, now, is_tcp_end(t));
    // SAFETY: copied out at once.
    let frontend = unsafe { REV_NAT.get(e.service) }.copied()?;
    let node = e.client_addr[0];
    rewrite_addr4(ctx, t, 12, t.saddr, node)?;
    rewrite_port(ctx, t, 0, t.sport, frontend.port)?;
    bump(Stat::PacketsTranslated);
    Some(fib_redirect4(ctx, node, t.daddr, t))
}

#[inline(always)]
pub fn reply_to_external6(ctx: &mut TcContext, t: &Tuple<[u32; 4]>) -> Option<i32> {
    // Only a backend's packet may answer an external flow.
    if !backend_port(t.sport) {
        return None;
    }
    let key = CtKey6 {
        saddr: t.saddr,
        daddr: t.daddr,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        direction: CT_EXT_OUT,
        _pad: [0; 2],
    };
    let entry = CT6.get_ptr_mut(key)?;
    // SAFETY: copied out at once.
    let e = unsafe { *entry };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if expired(&e, now, t.proto) || answers_new_connection(t, &e) {
        let _ = CT6.remove(key);
        return None;
    }
    touch(entry, now, is_tcp_end(t));
    // SAFETY: copied out at once.
    let frontend = unsafe { REV_NAT.get(e.service) }.copied()?;
    let node = e.client_addr;
    rewrite_addr6(ctx, t, 8, t.saddr, node)?;
    rewrite_port(ctx, t, 0, t.sport, frontend.port)?;
    bump(Stat::PacketsTranslated);
    Some(fib_redirect6(ctx, node, t.daddr, t))
}
