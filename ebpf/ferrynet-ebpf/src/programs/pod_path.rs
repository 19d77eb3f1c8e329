//! Per-packet translation at a pod's host veth (TC/TCX): for whatever socket LB did not
//! translate (socket LB off, or restricted to the node's own network namespace).
//!
//! - `from_pod` (ingress of the host veth: everything the pod sends): a packet to a Service
//!   address is DNATed to a backend, its flow recorded in the conntrack map; a packet to a
//!   Service port without endpoints (or to a Service CIDR address nobody holds) is marked for the
//!   agent's firewall table to reject. What is not for a Service costs one array read when its
//!   destination port is one no frontend has (the port gates: `PORTS_WITHOUT_FRONTENDS_MAP`),
//!   else the service map's lookup (and the Service CIDR trie's, when `--service-cidrs` is set)
//!   and, while NodePorts are translated, the node address map's. Only a packet from a port some
//!   backend has pays the conntrack lookup for a local backend's reply to an external client, and
//!   only a TCP SYN to such a port one more, to forget a finished Service flow whose translated
//!   tuple the new connection reuses (a pod that reached a backend through its Service, then
//!   reaches it directly from the same port, must not get the Service's address on the replies).
//! - A TCP reset, from the pod or the backend, ends its flow: both entries go at once, so the
//!   map holds live flows rather than waiting for eviction.
//! - `to_pod` (egress: everything sent to the pod): a backend's reply gets the Service address
//!   back, while its flow is not idle past the conntrack limit. Only a packet from a port some
//!   backend has is looked up.
//! - Hairpin: a pod reaching itself through its Service sees the hairpin address as the source,
//!   so that its reply comes back out through the veth, where it is translated and sent back in.
//! - NodePorts: a pod's packet to one of the node's addresses on a NodePort is translated as a
//!   ClusterIP's is (the NodePort's in-cluster entry: every endpoint).
//! - A reply entry keeps the address and port the client sent to (`client_addr`,
//!   `client_port`, [`CT_F_FRONTEND`]): the reply's source becomes exactly that, a ClusterIP or
//!   the node address a NodePort was reached on, with no other lookup. At `to_pod`, entries an
//!   earlier agent wrote (without the flag) get it from the service's reverse NAT entry, so an
//!   upgrade keeps established flows. (Hairpin flows and reused tuples of such entries, rare
//!   across an upgrade, are not worth the stack `from_pod` has left.)
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext};
use ferrynet_common::*;

use super::{
    external::reply_to_external,
    family::{End, Family, V4, V6},
    maps::{REV_NAT, backend_port, config},
    packet::*,
    services::{Destination, backend, lookup, node_port_in_cluster, select},
    stats::bump,
};

/// A new connection from the pod to a non-Service destination: if an earlier Service flow was
/// translated to exactly this tuple, that flow is over (one tuple, one connection), so its
/// entries go and the replies stay untranslated.
#[inline(always)]
fn forget_reused_tuple<F: Family>(t: &Tuple<F::Addr>) {
    // Only a tuple to a backend's port can be one a Service flow was translated to.
    if !backend_port(t.dport) {
        return;
    }
    let ct = F::conntrack();
    let reply = F::ct_key_of(t.daddr, t.saddr, t.dport, t.sport, t.proto, CT_REPLY);
    // SAFETY: the value is copied out at once.
    let Some(entry) = (unsafe { ct.get(reply) }).copied() else {
        return;
    };
    let _ = ct.remove(F::ct_key_of(
        t.saddr,
        F::narrow(entry.client_addr),
        t.sport,
        entry.client_port,
        t.proto,
        CT_FORWARD,
    ));
    let _ = ct.remove(reply);
}

/// Where a reply entry's replies come from: the frontend the client sent to.
#[inline(always)]
fn reply_source<F: Family>(entry: &CtValue) -> Option<(F::Addr, u16)> {
    if entry.flags & CT_F_FRONTEND != 0 {
        return Some((F::narrow(entry.client_addr), entry.client_port));
    }
    // SAFETY: the value is copied out at once.
    let vip = unsafe { REV_NAT.get(entry.service) }.copied()?;
    Some((F::narrow(vip.addr), vip.port))
}

#[classifier]
pub fn from_pod(mut ctx: TcContext) -> i32 {
    let flags = config().flags;
    if flags & (CONFIG_F_PER_PACKET | CONFIG_F_EXTERNAL) == 0 {
        return NEXT;
    }
    match ethertype(&ctx) {
        Some(ETH_P_IP) => from_pod_in::<V4>(&mut ctx, flags).unwrap_or(NEXT),
        Some(ETH_P_IPV6) => from_pod_in::<V6>(&mut ctx, flags).unwrap_or(NEXT),
        _ => NEXT,
    }
}

#[classifier]
pub fn to_pod(mut ctx: TcContext) -> i32 {
    if config().flags & CONFIG_F_PER_PACKET == 0 {
        return NEXT;
    }
    match ethertype(&ctx) {
        Some(ETH_P_IP) => to_pod_in::<V4>(&mut ctx).unwrap_or(NEXT),
        Some(ETH_P_IPV6) => to_pod_in::<V6>(&mut ctx).unwrap_or(NEXT),
        _ => NEXT,
    }
}

/// `from_pod` for a packet of family `F`.
fn from_pod_in<F: Family>(ctx: &mut TcContext, flags: u32) -> Option<i32> {
    let t = F::parse(ctx)?;
    if flags & CONFIG_F_PER_PACKET == 0 {
        // Socket LB translates this pod's Service traffic: only external flows' replies here.
        return reply_to_external::<F>(ctx, &t);
    }
    if t.daddr == F::hairpin() {
        // A pod's reply to itself through its Service: back to the client's view, and back in.
        // SAFETY: the value is copied out at once.
        let entry = unsafe { F::conntrack().get(F::ct_key(&t, CT_REPLY)) }.copied()?;
        // From the address the pod sent to, to the pod itself (the client is the backend).
        F::rewrite_end(
            ctx,
            &t,
            End::Source,
            (t.saddr, t.sport),
            (F::narrow(entry.client_addr), entry.client_port),
        )?;
        F::rewrite_addr(ctx, &t, F::DADDR, t.daddr, t.saddr)?;
        bump(Stat::PacketsTranslated);
        return bounce_to_pod(ctx);
    }
    // The frontend, and whether this packet may open a flow to it.
    let (svc, may_open) = match lookup::<F>(t.daddr, t.dport, t.proto, SCOPE_INTERNAL) {
        Destination::Other => {
            if flags & CONFIG_F_EXTERNAL != 0
                && let Some(verdict) = reply_to_external::<F>(ctx, &t)
            {
                return Some(verdict);
            }
            let node_port = if flags & CONFIG_F_EXTERNAL != 0 {
                node_port_in_cluster::<F>(t.daddr, t.dport, t.proto)
            } else {
                None
            };
            match node_port {
                // Only a SYN opens a TCP flow to a NodePort: any other segment to a node address
                // on a port of the NodePort range is the pod answering a connection the node
                // opened from that port.
                Some(svc) => (svc, t.proto != PROTO_TCP || is_tcp_syn(&t)),
                _ => {
                    if is_tcp_syn(&t) {
                        forget_reused_tuple::<F>(&t);
                    }
                    return None;
                }
            }
        }
        Destination::Refused => return Some(refuse(ctx)),
        Destination::Service(svc) => (svc, true),
    };
    // One call site: the translation is inlined once.
    translate::<F>(ctx, &t, svc, may_open)
}

/// A pod's packet to frontend `svc` (at `t.daddr`:`t.dport`): to a backend, its flow recorded.
/// Unless `may_open`, only a packet of a known flow is translated (None: left alone).
#[inline(always)]
fn translate<F: Family>(ctx: &mut TcContext, t: &Tuple<F::Addr>, svc: ServiceValue, may_open: bool) -> Option<i32> {
    if svc.count == 0 {
        return may_open.then(|| refuse(ctx));
    }
    let t = *t;
    let ct = F::conntrack();
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let hairpin = F::hairpin();
    let key = F::ct_key(&t, CT_FORWARD);
    let forward_entry = ct.get_ptr_mut(key);
    // SAFETY: the value is copied out at once.
    let known = forward_entry
        .map(|entry| unsafe { *entry })
        .filter(|e| now.saturating_sub(e.last_seen_ns) < ct_idle_limit(t.proto) && e.service == svc.id)
        .and_then(|e| Some((e.backend, backend(e.backend)?)));
    // A reset opens nothing: it ends a flow, or answers none.
    if known.is_none() && (!may_open || is_tcp_rst(&t)) {
        return None;
    }
    let new_flow = known.is_none();
    let (id, b) = match known {
        Some(found) => found,
        None => match select::<F>(&svc, t.saddr, 0, 0) {
            Some(found) => found,
            None => return Some(refuse(ctx)),
        },
    };
    let backend_addr = F::narrow(b.addr);
    let is_hairpin = backend_addr == t.saddr;
    let value = CtValue {
        backend: id,
        service: svc.id,
        last_seen_ns: now,
        flags: 0,
        client_port: t.sport,
        _pad: 0,
        client_addr: F::widen(t.saddr),
    };

    // The reply's tuple, as the backend sends it.
    let reply = F::ct_key_of(
        backend_addr,
        if is_hairpin { hairpin } else { t.saddr },
        b.port,
        t.sport,
        t.proto,
        CT_REPLY,
    );
    let reply_value = CtValue {
        flags: CT_F_FRONTEND | if is_hairpin { CT_F_HAIRPIN } else { 0 },
        client_port: t.dport,
        client_addr: F::widen(t.daddr),
        ..value
    };
    match (new_flow, forward_entry) {
        // A known flow: both entries are refreshed in place (an insert into an LRU map would take
        // a fresh element each time), and only once per refresh interval.
        (false, Some(forward)) => {
            // SAFETY: the pointer is to this map's value for `key`, valid during this program.
            if now.saturating_sub(unsafe { (*forward).last_seen_ns }) < CT_REFRESH_NS {
                // Seen within the refresh interval: nothing to write, and no lookup of the reply
                // entry (which `to_pod`'s lookups keep from eviction meanwhile).
            } else {
                // SAFETY: as above.
                unsafe { (*forward).last_seen_ns = now };
                match ct.get_ptr_mut(reply) {
                    // SAFETY: as above, for `reply`.
                    Some(entry) => unsafe { (*entry).last_seen_ns = now },
                    None => {
                        if ct.insert(reply, reply_value, 0).is_err() {
                            bump(Stat::ConntrackFull);
                        }
                    }
                }
            }
        }
        _ => {
            if ct.insert(key, value, 0).is_err() {
                bump(Stat::ConntrackFull);
            }
            if ct.insert(reply, reply_value, 0).is_err() {
                bump(Stat::ConntrackFull);
            }
        }
    }
    if is_tcp_rst(&t) {
        // The pod reset the connection: its flow is over, and its entries go now rather than
        // when the map runs out of room (a map of live flows keeps every lookup short).
        let _ = ct.remove(key);
        let _ = ct.remove(reply);
    }
    F::rewrite_end(ctx, &t, End::Destination, (t.daddr, t.dport), (backend_addr, b.port))?;
    if new_flow {
        bump(Stat::PacketFlowsTranslated);
    }
    bump(Stat::PacketsTranslated);
    if is_hairpin {
        F::rewrite_addr(ctx, &t, F::SADDR, t.saddr, hairpin)?;
        return bounce_to_pod(ctx);
    }
    Some(TC_ACT_OK)
}

/// `to_pod` for a packet of family `F`.
fn to_pod_in<F: Family>(ctx: &mut TcContext) -> Option<i32> {
    let t = F::parse(ctx)?;
    // Replies of translated flows come from a backend's port.
    if !backend_port(t.sport) {
        return None;
    }
    let ct = F::conntrack();
    let key = F::ct_key(&t, CT_REPLY);
    // SAFETY: the value is copied out at once.
    let entry = unsafe { ct.get(key) }.copied()?;
    if entry.flags & CT_F_HAIRPIN != 0 {
        return None;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(entry.last_seen_ns) >= ct_idle_limit(t.proto) {
        let _ = ct.remove(key);
        return None;
    }
    let (frontend, frontend_port) = reply_source::<F>(&entry)?;
    F::rewrite_end(ctx, &t, End::Source, (t.saddr, t.sport), (frontend, frontend_port))?;
    if is_tcp_rst(&t) {
        // The backend reset the connection: both of its entries go (see `translate`).
        let _ = ct.remove(key);
        let _ = ct.remove(F::ct_key_of(
            t.daddr,
            frontend,
            t.dport,
            frontend_port,
            t.proto,
            CT_FORWARD,
        ));
    }
    bump(Stat::PacketsTranslated);
    Some(NEXT)
}
