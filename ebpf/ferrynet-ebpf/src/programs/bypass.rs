//! Per-packet flows past the node's stack ([`CONFIG_F_STACK_BYPASS`]): a pod's translated packet
//! to a backend on another node goes from its veth straight out of the uplink, and the backend's
//! reply, translated back where it arrives, straight to the pod's veth. The node's routing and
//! netfilter (conntrack among them) see neither direction, which is most of what a connection
//! costs the node beyond the translation itself.
//!
//! Only what the stack would have done the same way goes past it:
//! - the backend is in another node's PodCIDR that this node routes natively
//!   ([`PEER_PODS4_MAP`]): the stack would not masquerade it (the firewall masquerades only what
//!   leaves the cluster's PodCIDRs) and routes it to an uplink, whose program sees the replies
//!   ([`UPLINKS_MAP`]); a flow through VXLAN, to this node's own pods or out of the cluster
//!   stays with the stack, both ways;
//! - the pod's source address routes back through the veth it came in on, as the firewall's
//!   source check requires of what the stack forwards (a pod cannot spoof another's address);
//! - the FIB answers with a route (a next hop whose neighbour it does not know yet is resolved
//!   by `bpf_redirect_neigh`), the packet fits the outgoing interface's MTU, and its TTL outlives
//!   the hop (taken one off, as the stack does). Anything else (a packet too big, a TTL running
//!   out, a link-local source) goes to the stack, which fragments, answers with ICMP or drops as
//!   it always does.
//!
//! The two directions are decided by the same maps, so a flow goes past the stack both ways or
//! neither: conntrack does not see one direction of a flow without the other, which would make
//! it drop packets as invalid or clashing. Packet by packet it still may, for what the FIB or the
//! TTL turns down (a lone packet, which conntrack forgets), and for a flow whose replies come in
//! through an interface without the uplink program (asymmetric routing across several NICs),
//! which the decision per packet cannot see: the flow's entries do not remember it.
use aya_ebpf::{
    bindings::{BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup as FibParams},
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use ferrynet_common::*;

use super::{
    family::Family,
    maps::{UPLINKS, backend_port},
    packet::{Tuple, ifindex, redirect_neigh},
    pod_path::reverse_nat,
    stats::bump,
};

const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;

/// The FIB lookups' parameters: per CPU, off the programs' stacks (`from_pod`'s is full).
#[map]
static FIB_SCRATCH: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);

/// A route the FIB found: its parameters as the lookup filled them in (the interface, and the
/// next hop's address), and whether it knew the next hop's neighbour (then its addresses are in
/// them too).
struct Route {
    params: &'static FibParams,
    neighbour: bool,
}

/// Looks up the route from `saddr` to `daddr` for a packet that came in on `ingress`, with the
/// lookup's `flags`. None: no route the packet may take (no route, forwarding off, the packet
/// too big for it, ...).
#[inline(always)]
fn route<F: Family>(
    ctx: &TcContext,
    saddr: F::Addr,
    daddr: F::Addr,
    proto: u8,
    ingress: u32,
    flags: u32,
) -> Option<Route> {
    let params = FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, which nothing else uses while this program runs.
    let p = unsafe { &mut *params };
    // SAFETY: an all-zero lookup is valid; the fields it needs are set below.
    *p = unsafe { core::mem::zeroed() };
    F::set_fib_addrs(p, saddr, daddr);
    p.l4_protocol = proto;
    p.ifindex = ingress;
    // SAFETY: `p` is a valid, initialised lookup of the helper's size.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            params,
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    };
    match ret {
        FIB_SUCCESS => Some(Route {
            params: p,
            neighbour: flags & BPF_FIB_LOOKUP_SKIP_NEIGH == 0,
        }),
        FIB_NO_NEIGH => Some(Route {
            params: p,
            neighbour: false,
        }),
        _ => None,
    }
}

/// Whether the interface `ifindex` carries the uplink program.
#[inline(always)]
fn is_uplink(ifindex: u32) -> bool {
    // SAFETY: only presence matters.
    unsafe { UPLINKS.get(ifindex) }.is_some()
}

/// The packet, its TTL taken one off, to `route`'s next hop, without the stack. A next hop
/// whose neighbour the FIB does not know yet is resolved by the kernel (`bpf_redirect_neigh`),
/// so that the flow does not go through the stack for it.
#[inline(always)]
fn send<F: Family>(ctx: &mut TcContext, route: Route, ttl: u8) -> Option<i32> {
    let params = route.params;
    F::decrement_ttl(ctx, ttl)?;
    bump(Stat::PacketsPastStack);
    if route.neighbour {
        ctx.store(0, &params.dmac, 0).ok()?;
        ctx.store(6, &params.smac, 0).ok()?;
        // SAFETY: the interface the FIB chose.
        return Some(unsafe { bpf_redirect(params.ifindex, 0) } as i32);
    }
    Some(redirect_neigh(params))
}

/// A pod's packet `t` translated to `backend` (at the pod veth's ingress): straight out of the
/// uplink, when it may go past the stack (see the module's comment). None: to the stack.
#[inline(always)]
pub fn forward_past_stack<F: Family>(ctx: &mut TcContext, t: &Tuple<F::Addr>, backend: F::Addr) -> Option<i32> {
    // A link-local source is never forwarded (the firewall's source check leaves it to the
    // stack, which drops it), and its reverse lookup could name any veth.
    if !F::in_peer_pods(backend) || F::is_link_local(t.saddr) {
        return None;
    }
    let ttl = F::ttl(ctx).filter(|ttl| *ttl > 1)?;
    let ingress = ifindex(ctx);
    // The source check: the pod's address routes back through this veth.
    let back = route::<F>(ctx, backend, t.saddr, t.proto, ingress, BPF_FIB_LOOKUP_SKIP_NEIGH)?;
    if back.params.ifindex != ingress {
        return None;
    }
    let out = route::<F>(ctx, t.saddr, backend, t.proto, ingress, 0)?;
    if !is_uplink(out.params.ifindex) {
        return None;
    }
    send::<F>(ctx, out, ttl)
}

/// A packet `t` arriving on an uplink: when it is the reply of a per-packet flow that goes past
/// the stack (see the module's comment), translated back and sent straight to the pod's veth.
/// None: not such a reply, or one the stack takes (translated at the pod veth's egress).
#[inline(always)]
pub fn reply_past_stack<F: Family>(ctx: &mut TcContext, t: &Tuple<F::Addr>) -> Option<i32> {
    if !backend_port(t.sport) {
        return None;
    }
    let key = F::ct_key(t, CT_REPLY);
    // SAFETY: the value is copied out at once.
    let entry = unsafe { F::conntrack().get(key) }.copied()?;
    // After the entry, not before: most of what comes from a backend's port is pod-IP traffic
    // from other nodes' pods, which has no entry and so pays one lookup instead of two.
    if !F::in_peer_pods(t.saddr) {
        return None;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // An idle flow's reply is left to `to_pod`, which forgets the flow.
    if entry.flags & CT_F_HAIRPIN != 0 || now.saturating_sub(entry.last_seen_ns) >= ct_idle_limit(t.proto) {
        return None;
    }
    let ttl = F::ttl(ctx).filter(|ttl| *ttl > 1)?;
    let ingress = ifindex(ctx);
    let out = route::<F>(ctx, t.saddr, t.daddr, t.proto, ingress, 0)?;
    // To a pod's veth: never back out of an uplink.
    if out.params.ifindex == ingress || is_uplink(out.params.ifindex) {
        return None;
    }
    reverse_nat::<F>(ctx, t, key, &entry, now)?;
    send::<F>(ctx, out, ttl)
}
