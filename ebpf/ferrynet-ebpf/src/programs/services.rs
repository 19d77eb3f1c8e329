//! Service lookup and backend selection, shared by the socket and the per-packet paths.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use ferrynet_common::*;

use super::{
    family::Family,
    maps::{BACKENDS, MAGLEV, SERVICE_SLOTS, frontend_port},
    stats::bump,
};

/// What a destination is.
pub enum Destination {
    /// Not a Service: leave it alone.
    Other,
    /// A Service port without endpoints, or a Service CIDR address nobody holds: refuse.
    Refused,
    /// A Service port with endpoints.
    Service(ServiceValue),
}

/// What `addr`:`port` is, for a packet or socket of `scope`: a port no frontend has skips the
/// service map (the port gate), and only the Service CIDRs' trie is asked.
#[inline(always)]
pub fn lookup<F: Family>(addr: F::Addr, port: u16, proto: u8, scope: u8) -> Destination {
    if !frontend_port(port) {
        return if F::in_service_cidrs(addr) {
            Destination::Refused
        } else {
            Destination::Other
        };
    }
    match F::service(addr, port, proto, scope) {
        Some(svc) if svc.count > 0 => Destination::Service(svc),
        Some(_) => Destination::Refused,
        None if F::in_service_cidrs(addr) => Destination::Refused,
        None => Destination::Other,
    }
}

/// The entry of `scope` of NodePort `port`, when `addr` is one of the node's addresses NodePorts
/// answer on (the port gate, then the NodePort lookup: most packets arriving at the node stop
/// there).
#[inline(always)]
pub fn node_port<F: Family>(addr: F::Addr, port: u16, proto: u8, scope: u8) -> Option<ServiceValue> {
    if !frontend_port(port) {
        return None;
    }
    let svc = F::service(F::UNSPECIFIED, port, proto, scope)?;
    F::is_node_address(addr).then_some(svc)
}

/// The in-cluster entry of NodePort `port`, when `addr` is one of the node's addresses: for what
/// pods and the node's own sockets send, seldom to the node's addresses, so the port gate and the
/// small address map come first (a miss there spares a miss in the large service map).
#[inline(always)]
pub fn node_port_in_cluster<F: Family>(addr: F::Addr, port: u16, proto: u8) -> Option<ServiceValue> {
    if !frontend_port(port) || !F::is_node_address(addr) {
        return None;
    }
    F::service(F::UNSPECIFIED, port, proto, SCOPE_INTERNAL)
}

/// A backend by id.
#[inline(always)]
pub fn backend(id: u32) -> Option<BackendValue> {
    // SAFETY: the value is copied out at once.
    unsafe { BACKENDS.get(id) }.copied()
}

/// One of the service's backends: the one its Maglev table gives `flow` (a [`flow_hash`]),
/// when it has one, else one at random.
#[inline(always)]
fn pick(svc: &ServiceValue, flow: u32) -> Option<(u32, BackendValue)> {
    if svc.maglev_size != 0
        && let Some(chosen) = maglev(svc, flow)
    {
        return Some(chosen);
    }
    // SAFETY: no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = random % u32::from(svc.count);
    // SAFETY: the value is copied out at once.
    let id = match unsafe { SERVICE_SLOTS.get(SlotKey { service: svc.id, slot }) } {
        Some(id) => *id,
        None => {
            bump(Stat::BackendMissing);
            return None;
        }
    };
    match backend(id) {
        Some(b) => Some((id, b)),
        None => {
            bump(Stat::BackendMissing);
            None
        }
    }
}

/// The backend `flow` maps to in the frontend's Maglev table: one lookup. None while the table
/// is missing or names a backend that is gone (an update in progress): the caller picks at
/// random, as for any frontend.
#[inline(always)]
fn maglev(svc: &ServiceValue, flow: u32) -> Option<(u32, BackendValue)> {
    let entry = flow % svc.maglev_size;
    let key = MaglevKey {
        service: svc.id,
        chunk: entry / MAGLEV_CHUNK,
    };
    let chunk = MAGLEV.get_ptr(key)?;
    // The compiler knows the remainder is below MAGLEV_CHUNK and would drop the check; the
    // verifier cannot see it through the multiply-subtract it becomes, and needs the check.
    let index = core::hint::black_box(entry % MAGLEV_CHUNK) as usize;
    if index >= MAGLEV_CHUNK as usize {
        return None;
    }
    // SAFETY: `chunk` points at a map value of MAGLEV_CHUNK ids, valid while this program runs,
    // and `index` is within it.
    let id = unsafe { (*chunk)[index] };
    if id == 0 {
        return None;
    }
    Some((id, backend(id)?))
}

#[inline(always)]
fn fresh(svc: &ServiceValue, last_used_ns: u64, now: u64) -> bool {
    now.saturating_sub(last_used_ns) < u64::from(svc.affinity_timeout_s) * 1_000_000_000
}

/// A backend for a new connection of `client` (an address, or the unspecified one with a
/// network namespace cookie for socket LB), honouring `sessionAffinity: ClientIP`; `flow` is its
/// [`flow_hash`] (used by Maglev frontends only, which are external ones).
#[inline(always)]
pub fn select<F: Family>(
    svc: &ServiceValue,
    client: F::Addr,
    netns_cookie: u64,
    flow: u32,
) -> Option<(u32, BackendValue)> {
    if svc.flags & SERVICE_F_AFFINITY == 0 {
        return pick(svc, flow);
    }
    let affinity = F::affinity();
    let key = F::affinity_key(svc.id, client, netns_cookie);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the value is copied out at once.
    if let Some(held) = unsafe { affinity.get(key) }.copied()
        && fresh(svc, held.last_used_ns, now)
        && let Some(b) = backend(held.backend)
    {
        let _ = affinity.insert(
            key,
            AffinityValue {
                last_used_ns: now,
                ..held
            },
            0,
        );
        return Some((held.backend, b));
    }
    let (id, b) = pick(svc, flow)?;
    let value = AffinityValue {
        backend: id,
        _pad: 0,
        last_used_ns: now,
    };
    if affinity.insert(key, value, 0).is_err() {
        bump(Stat::AffinityFull);
    }
    Some((id, b))
}
