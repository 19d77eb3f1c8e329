//! Traffic from outside the cluster: NodePorts, externalIPs and load balancer IPs, at the ingress
//! of the node's uplinks (TCX).
//!
//! - A client's packet to one of the node's addresses (those in the node address maps) on a
//!   NodePort, or to an externalIP or load balancer IP on a Service port, picks a backend. A
//!   backend on this node gets the packet DNATed and handed to the stack; the client's address is
//!   kept, and the backend's replies are translated back at its veth ([`reply_to_external`],
//!   called by `from_pod`). A backend on another node gets it DNATed and SNATed to this node's
//!   address and a port of the SNAT range, so that its replies come back here; the port is
//!   allocated against the conntrack map, never reused while its flow lives.
//! - A reply of an SNATed flow arriving back gets the client's view back and goes straight out.
//! - Rewritten packets whose source is one of the node's addresses are sent on to their next hop
//!   through the FIB ([`Family::fib_redirect`]): the stack would drop them as martians.
//! - A NodePort without backends is refused (TCP reset or ICMP, through the refusal mark), or
//!   dropped under `externalTrafficPolicy: Local`, so that a load balancer's health check steers
//!   around the node.
//! - Flows live in the conntrack maps with their own directions ([`CT_EXT_IN`], [`CT_EXT_OUT`]);
//!   a TCP FIN or RST closes both directions of an SNATed flow, which frees its port after
//!   [`CT_CLOSED_NS`], or sooner when neither end holds the tuple in TIME_WAIT: after a reset
//!   ([`CT_RESET_NS`]), or a backend's FIN answering its client's ([`CT_PASSIVE_CLOSE_NS`]).
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use ferrynet_common::*;

use super::{
    bypass::reply_past_stack,
    family::{End, Family, V4, V6},
    maps::{REV_NAT, SNAT_ADDRS, backend_port, config, frontend_port},
    packet::*,
    services::{backend, node_port, select},
    stats::bump,
};

/// How many SNAT ports a new flow tries before it is dropped.
const SNAT_TRIES: u32 = 32;

#[classifier]
pub fn from_uplink(mut ctx: TcContext) -> i32 {
    let flags = config().flags;
    if flags & (CONFIG_F_EXTERNAL | CONFIG_F_STACK_BYPASS) == 0 {
        return NEXT;
    }
    match ethertype(&ctx) {
        Some(ETH_P_IP) => from_uplink_in::<V4>(&mut ctx, flags).unwrap_or(NEXT),
        Some(ETH_P_IPV6) => from_uplink_in::<V6>(&mut ctx, flags).unwrap_or(NEXT),
        _ => NEXT,
    }
}

/// The flags a segment from `end` sets on its flow's entries, which hold `held` (see
/// [`ct_end_flags`]).
#[inline(always)]
fn end_flags<A>(t: &Tuple<A>, end: FlowEnd, held: u32) -> u32 {
    ct_end_flags(t.proto, t.tcp_flags, end, held)
}

/// Refreshes an entry for a packet of its flow, setting `ended` (see [`end_flags`]).
#[inline(always)]
fn touch(entry: *mut CtValue, now: u64, ended: u32) {
    // SAFETY: `entry` points at a conntrack value, valid while this program runs.
    unsafe {
        (*entry).last_seen_ns = now;
        (*entry).flags |= ended;
    }
}

/// Sets `ended` on the flow's entry `key` (its other direction).
#[inline(always)]
fn close<F: Family>(key: F::CtKey, ended: u32) {
    if let Some(other) = F::conntrack().get_ptr_mut(key) {
        // SAFETY: as in `touch`.
        unsafe { (*other).flags |= ended };
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
fn external_ip<F: Family>(addr: F::Addr, port: u16, proto: u8) -> Option<ServiceValue> {
    if !frontend_port(port) {
        return None;
    }
    F::service(addr, port, proto, SCOPE_EXTERNAL)
}

/// Whether `addr` may open a flow to frontend `service` (`loadBalancerSourceRanges`).
#[inline(always)]
fn source_allowed<F: Family>(svc: &ServiceValue, addr: F::Addr) -> bool {
    svc.flags & SERVICE_F_SOURCE_RANGES == 0 || F::in_source_ranges(svc, addr)
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

/// A free port of the SNAT range, tried at random, for the flow `node`:port → `b`; its reply
/// entry is written at once, so no other flow can take it. Each try is a port of its own: tried
/// one after another from a random start instead, taken ports clump into runs, and a new flow
/// that lands at the head of a long run finds none free with half the range free (simulated at
/// 2,000 new flows a second, each holding its port 1.1 s: one flow in about 26,000 found no
/// port tried in a row, none in 180,000 tried at random).
#[inline(always)]
fn allocate_snat<F: Family>(node: F::Addr, b: &BackendValue, proto: u8, reply: CtValue, now: u64) -> Option<u16> {
    let ct = F::conntrack();
    let span = u32::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1;
    for _ in 0..SNAT_TRIES {
        // SAFETY: no preconditions.
        let port = (SNAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % span) as u16).to_be();
        let key = F::ct_key_of(F::narrow(b.addr), node, b.port, port, proto, CT_EXT_IN);
        // SAFETY: the value is copied out at once.
        let flags = match unsafe { ct.get(key) } {
            Some(e) if !e.snat_port_free(now, proto) => continue,
            // An expired, reset or passively closed flow's port is free: overwritten.
            Some(_) => 0,
            None => u64::from(BPF_NOEXIST),
        };
        if ct.insert(key, reply, flags).is_ok() {
            return Some(port);
        }
    }
    None
}

/// `from_uplink` for a packet of family `F`, with the settings' `flags`.
fn from_uplink_in<F: Family>(ctx: &mut TcContext, flags: u16) -> Option<i32> {
    let t = F::parse(ctx)?;
    if flags & CONFIG_F_STACK_BYPASS != 0
        && let Some(verdict) = reply_past_stack::<F>(ctx, &t)
    {
        return Some(verdict);
    }
    if flags & CONFIG_F_EXTERNAL == 0 {
        return None;
    }
    let ct = F::conntrack();
    let key = F::ct_key(&t, CT_EXT_IN);
    // A known flow's packet is a client's, to a frontend's port, or a backend's reply, from a
    // backend's port to an SNAT port: anything else (most of what crosses the uplink, among it
    // the replies to this node's pods, whose ports are below the SNAT range) skips the lookup.
    let known = if frontend_port(t.dport) || (may_be_snat_port(t.dport) && backend_port(t.sport)) {
        ct.get_ptr_mut(key)
    } else {
        None
    };
    if let Some(entry) = known {
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: copied out at once.
        let e = unsafe { *entry };
        if !e.expired(now, t.proto) && !reopens(&t, &e) {
            let snat_reply = e.flags & CT_F_SNAT_REPLY != 0;
            let from = if snat_reply { FlowEnd::Backend } else { FlowEnd::Client };
            let ended = end_flags(&t, from, e.flags);
            let closing = ended != 0;
            touch(entry, now, ended);
            if snat_reply {
                // Another node's backend answering: back to the client's view, and out.
                // SAFETY: copied out at once.
                let frontend = unsafe { REV_NAT.get(e.service) }.copied()?;
                let client = F::narrow(e.client_addr);
                // A NodePort's (wildcard) replies come from the node address the flow was SNATed
                // to, which is the one the client sent to; an externalIP's from that IP.
                let frontend_addr = F::narrow(frontend.addr);
                let source = if frontend_addr == F::UNSPECIFIED {
                    t.daddr
                } else {
                    frontend_addr
                };
                if closing {
                    close::<F>(
                        F::ct_key_of(client, source, e.client_port, frontend.port, t.proto, CT_EXT_IN),
                        ended,
                    );
                }
                F::rewrite_end(ctx, &t, End::Source, (t.saddr, t.sport), (source, frontend.port))?;
                F::rewrite_end(ctx, &t, End::Destination, (t.daddr, t.dport), (client, e.client_port))?;
                bump(Stat::PacketsTranslated);
                return Some(F::fib_redirect(ctx, source, client, &t));
            }
            // A client's packet of a known flow.
            let b = backend(e.backend)?;
            let backend_addr = F::narrow(b.addr);
            if is_tcp_syn(&t) {
                restore_reply_entry::<F>(&t, &e, backend_addr, b.port, now);
            }
            F::rewrite_end(ctx, &t, End::Destination, (t.daddr, t.dport), (backend_addr, b.port))?;
            bump(Stat::PacketsTranslated);
            if e.client_port == 0 {
                if closing && is_tcp_rst(&t) {
                    // A client's reset ends the flow at once: the local backend's reply entry
                    // closes too (see `reply_to_external`). A FIN only half-closes: the backend
                    // may answer for a long while yet, and its own FIN closes the entry.
                    close::<F>(
                        F::ct_key_of(backend_addr, t.saddr, b.port, t.sport, t.proto, CT_EXT_OUT),
                        ended,
                    );
                }
                return Some(NEXT);
            }
            // SNATed: to the address and port the flow was given.
            let snat_addr = F::narrow(e.client_addr);
            if closing {
                close::<F>(
                    F::ct_key_of(backend_addr, snat_addr, b.port, e.client_port, t.proto, CT_EXT_IN),
                    ended,
                );
            }
            F::rewrite_end(ctx, &t, End::Source, (t.saddr, t.sport), (snat_addr, e.client_port))?;
            return Some(F::fib_redirect(ctx, snat_addr, backend_addr, &t));
        }
    }
    // A new flow, if it is for a NodePort on one of the node's addresses.
    let (svc, node_port) = match node_port::<F>(t.daddr, t.dport, t.proto, SCOPE_EXTERNAL) {
        Some(svc) => (svc, true),
        None => (external_ip::<F>(t.daddr, t.dport, t.proto)?, false),
    };
    if !source_allowed::<F>(&svc, t.saddr) {
        bump(Stat::ExternalDropped);
        return Some(TC_ACT_SHOT);
    }
    if svc.count == 0 {
        return Some(no_backends(ctx, &svc));
    }
    // Read here, not for every packet: most of what crosses the uplink is no flow of ours.
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = flow_hash(&F::widen(t.saddr), t.sport, t.dport, t.proto);
    let Some((id, b)) = select::<F>(&svc, t.saddr, 0, flow) else {
        return Some(no_backends(ctx, &svc));
    };
    let backend_addr = F::narrow(b.addr);
    let mut value = CtValue {
        backend: id,
        service: svc.id,
        last_seen_ns: now,
        flags: 0,
        client_port: 0,
        generation: 0,
        client_addr: [0; 4],
    };
    if b.flags & BACKEND_F_LOCAL != 0 {
        // The client's address stays; the backend's replies are translated at its veth.
        let out = F::ct_key_of(backend_addr, t.saddr, b.port, t.sport, t.proto, CT_EXT_OUT);
        let out_value = CtValue {
            client_addr: F::widen(t.daddr),
            ..value
        };
        if ct.insert(key, value, 0).is_err() || ct.insert(out, out_value, 0).is_err() {
            bump(Stat::ConntrackFull);
        }
        F::rewrite_end(ctx, &t, End::Destination, (t.daddr, t.dport), (backend_addr, b.port))?;
        bump(Stat::ExternalFlowsTranslated);
        bump(Stat::PacketsTranslated);
        return Some(NEXT);
    }
    let reply = CtValue {
        flags: CT_F_SNAT_REPLY,
        client_port: t.sport,
        client_addr: F::widen(t.saddr),
        ..value
    };
    // SNATed to the address the client sent to for a NodePort (one of the node's), to the
    // node's InternalIP for an externalIP or load balancer IP (which may not route back here).
    let snat_addr = if node_port {
        t.daddr
    } else {
        match SNAT_ADDRS.get(F::SNAT_ADDR_INDEX).map(|a| F::narrow(*a)) {
            Some(a) if a != F::UNSPECIFIED => a,
            _ => {
                bump(Stat::FibFailed);
                return Some(TC_ACT_SHOT);
            }
        }
    };
    let Some(snat_port) = allocate_snat::<F>(snat_addr, &b, t.proto, reply, now) else {
        bump(Stat::SnatPortsExhausted);
        return Some(TC_ACT_SHOT);
    };
    value.client_port = snat_port;
    value.client_addr = F::widen(snat_addr);
    if ct.insert(key, value, 0).is_err() {
        bump(Stat::ConntrackFull);
    }
    F::rewrite_end(ctx, &t, End::Destination, (t.daddr, t.dport), (backend_addr, b.port))?;
    F::rewrite_end(ctx, &t, End::Source, (t.saddr, t.sport), (snat_addr, snat_port))?;
    bump(Stat::ExternalFlowsTranslated);
    bump(Stat::PacketsTranslated);
    Some(F::fib_redirect(ctx, snat_addr, backend_addr, &t))
}

/// A client's SYN on a live flow (a retransmission, or a SYN whose SYN-ACK was lost): the entry
/// for the flow's replies is written again if it went. A full LRU map evicts even a fresh entry
/// (another CPU's, not yet looked up), and without it every reply of the flow would go out
/// untranslated for as long as the client's entry lives: each SYN the client sends again would
/// meet the same fate. An entry that is there (the SNAT port given to another flow meanwhile)
/// stays.
#[inline(always)]
fn restore_reply_entry<F: Family>(t: &Tuple<F::Addr>, e: &CtValue, backend_addr: F::Addr, backend_port: u16, now: u64) {
    // As the flow's first packet wrote it.
    let local = CtValue {
        backend: e.backend,
        service: e.service,
        last_seen_ns: now,
        flags: 0,
        client_port: 0,
        generation: 0,
        client_addr: F::widen(t.daddr),
    };
    let (key, value) = if e.client_port == 0 {
        // A local backend's replies, translated at its veth.
        let key = F::ct_key_of(backend_addr, t.saddr, backend_port, t.sport, t.proto, CT_EXT_OUT);
        (key, local)
    } else {
        // Another node's backend's replies, to the flow's SNAT address and port.
        let snat_addr = F::narrow(e.client_addr);
        let key = F::ct_key_of(backend_addr, snat_addr, backend_port, e.client_port, t.proto, CT_EXT_IN);
        let snat_reply = CtValue {
            flags: CT_F_SNAT_REPLY,
            client_port: t.sport,
            client_addr: F::widen(t.saddr),
            ..local
        };
        (key, snat_reply)
    };
    let _ = F::conntrack().insert(key, value, u64::from(BPF_NOEXIST));
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
pub fn reply_to_external<F: Family>(ctx: &mut TcContext, t: &Tuple<F::Addr>) -> Option<i32> {
    // Only a backend's packet may answer an external flow.
    if !backend_port(t.sport) {
        return None;
    }
    let ct = F::conntrack();
    let key = F::ct_key(t, CT_EXT_OUT);
    let entry = ct.get_ptr_mut(key)?;
    // SAFETY: copied out at once.
    let e = unsafe { *entry };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if e.expired(now, t.proto) || answers_new_connection(t, &e) {
        let _ = ct.remove(key);
        return None;
    }
    touch(entry, now, end_flags(t, FlowEnd::Backend, e.flags));
    // SAFETY: copied out at once.
    let frontend = unsafe { REV_NAT.get(e.service) }.copied()?;
    let node = F::narrow(e.client_addr);
    F::rewrite_end(ctx, t, End::Source, (t.saddr, t.sport), (node, frontend.port))?;
    bump(Stat::PacketsTranslated);
    Some(F::fib_redirect(ctx, node, t.daddr, t))
}
