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
//! - A packet of a known flow to a ClusterIP (an address inside the Service CIDRs' cover in the
//!   settings) is translated from its forward entry alone, which holds the backend's address and
//!   port ([`CT_F_BACKEND`]) and the removal generation at which its frontend and backend were
//!   last found in the maps: while the settings' generation is the same, nothing was removed and
//!   both lookups are spared. Once it moves (the agent removed a frontend or a backend, or took a
//!   frontend's last endpoint), the flow's next packet looks both up again, as every packet did
//!   before, and a flow whose frontend or backend went is balanced afresh or refused at once.
//! - A TCP reset, from the pod or the backend, ends its flow: both entries go at once, so the
//!   map holds live flows rather than waiting for eviction. A flow both ends closed with a FIN
//!   has both entries closed, for the agent's sweep to remove after the closed-flow time; a SYN
//!   on a known tuple starts both entries afresh.
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
use core::ptr::NonNull;

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext};
use ferrynet_common::*;

use super::{
    bypass::forward_past_stack,
    external::reply_to_external,
    family::{End, Family, V4, V6},
    maps::{REV_NAT, backend_port, config_flags, config_ref, frontend_port},
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

/// `from_pod_in`'s verdict for a packet translated to a backend: on to it, past the node's stack
/// when the settings and the backend allow ([`to_backend`]), else through the stack. Never a TC
/// verdict (those are small).
const TRANSLATED: i32 = i32::MIN;

// `from_pod_in` and `to_backend` are functions of their own (BPF subprograms), each with its own
// stack: `from_pod_in`'s is full to the limit a program may have, and the verifier counts the
// stacks of a chain of calls together, so this function keeps none (it passes the context by
// value and reads the settings' flags into a register).
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // The EtherType as the veth set it, a field of the context: read into a register, where a
    // read of the packet would take stack.
    // SAFETY: `skb` points at the kernel's __sk_buff for this invocation.
    let protocol = u16::from_be(unsafe { (*skb).protocol } as u16);
    match protocol {
        ETH_P_IP => match from_pod_in::<V4>(TcContext::new(skb)) {
            TRANSLATED => to_backend::<V4>(TcContext::new(skb)),
            verdict => verdict,
        },
        ETH_P_IPV6 => match from_pod_in::<V6>(TcContext::new(skb)) {
            TRANSLATED => to_backend::<V6>(TcContext::new(skb)),
            verdict => verdict,
        },
        _ => NEXT,
    }
}

/// A pod's packet translated to its backend (its destination now): past the node's stack when
/// the settings and the backend allow, else to the stack.
#[inline(never)]
fn to_backend<F: Family>(mut ctx: TcContext) -> i32 {
    if config_flags() & CONFIG_F_STACK_BYPASS != 0
        && let Some(t) = F::parse(&ctx)
        && let Some(verdict) = forward_past_stack::<F>(&mut ctx, &t, t.daddr)
    {
        return verdict;
    }
    TC_ACT_OK
}

#[classifier]
pub fn to_pod(mut ctx: TcContext) -> i32 {
    if config_flags() & CONFIG_F_PER_PACKET == 0 {
        return NEXT;
    }
    match ethertype(&ctx) {
        Some(ETH_P_IP) => to_pod_in::<V4>(&mut ctx).unwrap_or(NEXT),
        Some(ETH_P_IPV6) => to_pod_in::<V6>(&mut ctx).unwrap_or(NEXT),
        _ => NEXT,
    }
}

/// A flow a pod's packet belongs to, and where it goes.
struct Flow<F: Family> {
    now: u64,
    /// The flow's forward entry; None for a new flow. Non-null, so that None is a null pointer:
    /// with a discriminant of its own, None's pointer is undefined, and the compiler spills it
    /// where the paths meet, which the verifier refuses (a read of an unset register).
    entry: Option<NonNull<CtValue>>,
    /// Whether that entry already holds the backend, checked at the current removal generation.
    current: bool,
    service: u32,
    backend: u32,
    addr: F::Addr,
    port: u16,
}

/// `from_pod` for a packet of family `F`: its verdict (a plain `i32`, returned in a register:
/// an `Option` would be returned through the stack).
#[inline(never)]
fn from_pod_in<F: Family>(mut ctx: TcContext) -> i32 {
    from_pod_verdict::<F>(&mut ctx).unwrap_or(NEXT)
}

/// [`from_pod_in`]'s verdict, None for [`NEXT`].
#[inline(always)]
fn from_pod_verdict<F: Family>(ctx: &mut TcContext) -> Option<i32> {
    // Read in place, not copied: this function's stack is full to the limit.
    let cfg = config_ref()?;
    if cfg.flags & (CONFIG_F_PER_PACKET | CONFIG_F_EXTERNAL) == 0 {
        return None;
    }
    let t = F::parse(ctx)?;
    if cfg.flags & CONFIG_F_PER_PACKET == 0 {
        // Socket LB translates this pod's Service traffic: only external flows' replies here.
        return reply_to_external::<F>(ctx, &t);
    }
    if t.daddr == F::hairpin() {
        // A pod's reply to itself through its Service: back to the client's view, and back in.
        let key = F::ct_key(&t, CT_REPLY);
        // SAFETY: the value is copied out at once.
        let entry = unsafe { F::conntrack().get(key) }.copied()?;
        if is_tcp_fin(&t) {
            // The pod's FIN as its own backend: noted as a backend's is at `to_pod`, on the
            // flow's forward entry (the pod's own, to the frontend it sent to).
            let forward = F::ct_key_of(
                t.saddr,
                F::narrow(entry.client_addr),
                t.dport,
                entry.client_port,
                t.proto,
                CT_FORWARD,
            );
            // SAFETY: no preconditions.
            note_fin::<F>(FlowEnd::Backend, &key, &forward, unsafe { bpf_ktime_get_ns() });
        }
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
    // A ClusterIP flow's packet after its first goes by its conntrack entry alone, without the
    // service and backend lookups, while nothing was removed since it was last checked. Only an
    // address inside the Service CIDRs' cover tries it: anything else would pay a conntrack miss
    // before the service lookup.
    let known = if F::within_service_cidr_cover(cfg, t.daddr) && frontend_port(t.dport) {
        known_flow::<F>(&t, cfg.removal_generation)
    } else {
        None
    };
    let flow = match known {
        Some(flow) => flow,
        None => match resolve::<F>(ctx, &t, cfg.flags) {
            Ok(flow) => flow,
            Err(verdict) => return verdict,
        },
    };
    // One call site: the translation is inlined once.
    forward::<F>(ctx, &t, flow, cfg.removal_generation)
}

/// The flow of `t` from its forward entry alone: one that holds its backend, checked at
/// `generation` (the settings' removal generation: since then no frontend or backend went, so
/// both are still in the maps), and not idle. None: looked up in the maps instead.
#[inline(always)]
fn known_flow<F: Family>(t: &Tuple<F::Addr>, generation: u16) -> Option<Flow<F>> {
    let entry = F::conntrack().get_ptr_mut(F::ct_key(t, CT_FORWARD))?;
    // SAFETY: the value is copied out at once.
    let e = unsafe { *entry };
    if e.flags & CT_F_BACKEND == 0 || e.generation != generation {
        return None;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(e.last_seen_ns) >= ct_idle_limit(t.proto) {
        return None;
    }
    Some(Flow {
        now,
        entry: NonNull::new(entry),
        current: true,
        service: e.service,
        backend: e.backend,
        addr: F::narrow(e.client_addr),
        port: e.client_port,
    })
}

/// The flow of a pod's packet `t`, by the maps: the frontend it is sent to, then its conntrack
/// entry and backend. Err: what becomes of a packet that is no flow to translate (None: left
/// alone).
#[inline(always)]
fn resolve<F: Family>(ctx: &mut TcContext, t: &Tuple<F::Addr>, flags: u16) -> Result<Flow<F>, Option<i32>> {
    // The frontend, and whether this packet may open a flow to it.
    let (svc, may_open) = match lookup::<F>(t.daddr, t.dport, t.proto, SCOPE_INTERNAL) {
        Destination::Other => {
            if flags & CONFIG_F_EXTERNAL != 0
                && let Some(verdict) = reply_to_external::<F>(ctx, t)
            {
                return Err(Some(verdict));
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
                Some(svc) => (svc, t.proto != PROTO_TCP || is_tcp_syn(t)),
                _ => {
                    if is_tcp_syn(t) {
                        forget_reused_tuple::<F>(t);
                    }
                    return Err(None);
                }
            }
        }
        Destination::Refused => return Err(Some(refuse(ctx))),
        Destination::Service(svc) => (svc, true),
    };
    if svc.count == 0 {
        return Err(may_open.then(|| refuse(ctx)));
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let forward_entry = F::conntrack().get_ptr_mut(F::ct_key(t, CT_FORWARD));
    // SAFETY: the value is copied out at once.
    let known = forward_entry
        .map(|entry| unsafe { *entry })
        .filter(|e| now.saturating_sub(e.last_seen_ns) < ct_idle_limit(t.proto) && e.service == svc.id)
        .and_then(|e| Some((e, backend(e.backend)?)));
    if let (Some((e, b)), Some(entry)) = (known, forward_entry) {
        return Ok(Flow {
            now,
            entry: NonNull::new(entry),
            // Rewritten with the current generation (once per generation) by `forward`.
            current: false,
            service: svc.id,
            backend: e.backend,
            addr: F::narrow(b.addr),
            port: b.port,
        });
    }
    // A reset opens nothing: it ends a flow, or answers none.
    if !may_open || is_tcp_rst(t) {
        return Err(None);
    }
    match select::<F>(&svc, t.saddr, 0, 0) {
        Some((id, b)) => Ok(Flow {
            now,
            entry: None,
            current: false,
            service: svc.id,
            backend: id,
            addr: F::narrow(b.addr),
            port: b.port,
        }),
        None => Err(Some(refuse(ctx))),
    }
}

/// A pod's packet of `flow` (to a frontend at `t.daddr`:`t.dport`): to its backend, the flow
/// recorded (a new one) or refreshed (a known one) at removal generation `generation`.
/// [`TRANSLATED`]: on to the backend, by the stack or past it (see [`from_pod`]).
#[inline(always)]
fn forward<F: Family>(ctx: &mut TcContext, t: &Tuple<F::Addr>, flow: Flow<F>, generation: u16) -> Option<i32> {
    let ct = F::conntrack();
    let now = flow.now;
    let hairpin = F::hairpin();
    let key = F::ct_key(t, CT_FORWARD);
    let backend_addr = flow.addr;
    let is_hairpin = backend_addr == t.saddr;
    let value = CtValue {
        backend: flow.backend,
        service: flow.service,
        last_seen_ns: now,
        flags: CT_F_BACKEND,
        client_port: flow.port,
        generation,
        client_addr: F::widen(backend_addr),
    };

    // The reply's tuple, as the backend sends it.
    let reply = F::ct_key_of(
        backend_addr,
        if is_hairpin { hairpin } else { t.saddr },
        flow.port,
        t.sport,
        t.proto,
        CT_REPLY,
    );
    let reply_value = CtValue {
        flags: CT_F_FRONTEND | if is_hairpin { CT_F_HAIRPIN } else { 0 },
        client_port: t.dport,
        generation: 0,
        client_addr: F::widen(t.daddr),
        ..value
    };
    match flow.entry {
        // A known flow: both entries are refreshed in place (an insert into an LRU map would take
        // a fresh element each time), and only once per refresh interval.
        Some(forward) => {
            let forward = forward.as_ptr();
            // SAFETY: the pointer is to this map's value for `key`, valid during this program.
            let old = unsafe { *forward };
            // A SYN on a known tuple: a new connection on the tuple of one that ended (the pod
            // reuses its port), or a SYN sent again. Both entries start afresh, without what an
            // earlier connection's FINs left on either (a SYN of a known flow is rare: one
            // insert each costs nothing).
            let reopened = is_tcp_syn(t);
            let refresh = reopened || now.saturating_sub(old.last_seen_ns) >= CT_REFRESH_NS;
            if old.flags & CT_F_BACKEND == 0 || reopened {
                // An earlier agent's entry holds the client's address where this one holds the
                // backend's: replaced whole (an LRU map's update swaps in a new element), so that
                // no packet on another CPU reads the flag beside the client's address.
                // (Only a new connection drops the ending: a live flow's FIN noted before the
                // agent took the stamps off stays.)
                let kept = if reopened { old.flags & !CT_F_ENDED } else { old.flags };
                let stamped = CtValue {
                    flags: kept | CT_F_BACKEND,
                    ..value
                };
                if ct.insert(key, stamped, 0).is_err() {
                    bump(Stat::ConntrackFull);
                }
            } else {
                // The same backend (the same id): only the generation it was checked at moves.
                // SAFETY: as above.
                unsafe {
                    if !flow.current {
                        (*forward).generation = generation;
                    }
                    if refresh {
                        (*forward).last_seen_ns = now;
                    }
                }
            }
            // Both entries are refreshed only once per refresh interval. Within it nothing is
            // written, and the reply entry is not looked up (`to_pod`'s lookups keep it from
            // eviction meanwhile).
            if refresh {
                match ct.get_ptr_mut(reply) {
                    // SAFETY: as above, for `reply`.
                    Some(entry) if !reopened => unsafe { (*entry).last_seen_ns = now },
                    _ => {
                        if ct.insert(reply, reply_value, 0).is_err() {
                            bump(Stat::ConntrackFull);
                        }
                    }
                }
            }
        }
        None => {
            if ct.insert(key, value, 0).is_err() {
                bump(Stat::ConntrackFull);
            }
            if ct.insert(reply, reply_value, 0).is_err() {
                bump(Stat::ConntrackFull);
            }
        }
    }
    if is_tcp_rst(t) {
        // The pod reset the connection: its flow is over, and its entries go now rather than
        // when the map runs out of room (a map of live flows keeps every lookup short).
        let _ = ct.remove(key);
        let _ = ct.remove(reply);
    } else if is_tcp_fin(t) {
        note_fin::<F>(FlowEnd::Client, &key, &reply, now);
    }
    F::rewrite_end(ctx, t, End::Destination, (t.daddr, t.dport), (backend_addr, flow.port))?;
    if flow.entry.is_none() {
        bump(Stat::PacketFlowsTranslated);
    }
    bump(Stat::PacketsTranslated);
    if is_hairpin {
        F::rewrite_addr(ctx, t, F::SADDR, t.saddr, hairpin)?;
        return bounce_to_pod(ctx);
    }
    Some(TRANSLATED)
}

/// A FIN sent by `end` of a per-packet flow at `now`, whose entry for that direction is `own` and
/// for the other `other`: noted, and once both ends sent one, both entries are closed for the
/// agent's sweep (see [`per_packet_fin_flags`]), seen now: the closed-flow time runs from the
/// close, not from the last refresh (a half-closed flow's may be long past, and its last ACK must
/// still find the entries). Once per FIN: every other segment pays only its flag test.
#[inline(always)]
fn note_fin<F: Family>(end: FlowEnd, own: &F::CtKey, other: &F::CtKey, now: u64) {
    let ct = F::conntrack();
    let (Some(own), Some(other)) = (ct.get_ptr_mut(own), ct.get_ptr_mut(other)) else {
        return;
    };
    // SAFETY: both point at this map's values, valid while this program runs.
    unsafe {
        let (set_own, set_other) = per_packet_fin_flags(end, (*other).flags);
        (*own).flags |= set_own;
        (*other).flags |= set_other;
        if set_other & CT_F_CLOSED != 0 {
            (*own).last_seen_ns = now;
            (*other).last_seen_ns = now;
        }
    }
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
    reverse_nat::<F>(ctx, &t, key, &entry, now)?;
    Some(NEXT)
}

/// A backend's reply `t` of the per-packet flow whose reply entry `key` holds `entry`, seen at
/// `now`: its source becomes the frontend the client sent to; a reset ends the flow, a FIN is
/// noted (see `forward`). At `to_pod`, or at the uplink for a flow past the stack.
#[inline(always)]
pub fn reverse_nat<F: Family>(
    ctx: &mut TcContext,
    t: &Tuple<F::Addr>,
    key: F::CtKey,
    entry: &CtValue,
    now: u64,
) -> Option<()> {
    let ct = F::conntrack();
    let (frontend, frontend_port) = reply_source::<F>(entry)?;
    F::rewrite_end(ctx, t, End::Source, (t.saddr, t.sport), (frontend, frontend_port))?;
    if is_tcp_rst(t) || is_tcp_fin(t) {
        let forward = F::ct_key_of(t.daddr, frontend, t.dport, frontend_port, t.proto, CT_FORWARD);
        if is_tcp_rst(t) {
            // The backend reset the connection: both of its entries go (see `forward`).
            let _ = ct.remove(key);
            let _ = ct.remove(forward);
        } else {
            note_fin::<F>(FlowEnd::Backend, &key, &forward, now);
        }
    }
    bump(Stat::PacketsTranslated);
    Some(())
}
