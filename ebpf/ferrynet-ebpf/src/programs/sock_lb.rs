//! Socket-level load balancing: the cgroup `sock_addr` hooks translate a Service address to a
//! backend when a socket connects (or sends an unconnected datagram), so established flows pay
//! nothing per packet, and they show the Service address back to the application in
//! `getpeername` and `recvmsg`.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use ferrynet_common::*;

use super::{
    family::{Family, V4, V6},
    maps::{SOCK_CONNECTED, backend_port, config, count_connected, may_be_connected},
    services::{Destination, lookup, node_port_in_cluster, select},
    stats::bump,
};

/// `connect` and `sendmsg` programs: allow the call (with whatever they rewrote). Also what
/// the release program returns (it cannot refuse anything).
const ALLOW: i32 = 1;
/// `connect` and `sendmsg` programs: refuse the call, with the error set by `bpf_set_retval`.
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Whether socket LB applies to this socket at all.
#[inline(always)]
fn applies(ctx: &SockAddrContext) -> bool {
    let cfg = config();
    if cfg.flags & CONFIG_F_SOCKET_LB == 0 {
        return false;
    }
    // Service meshes want the Service address inside pods: translate only in the node's own
    // network namespace then.
    // SAFETY: a sock_addr context.
    cfg.flags & CONFIG_F_HOST_NETNS_ONLY == 0 || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.host_netns_cookie
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: reading a field of the kernel's context.
    unsafe { read_volatile(addr_of!((*ctx.sock_addr).protocol)) as u8 }
}

#[inline(always)]
fn refuse() -> i32 {
    bump(Stat::SockRefused);
    // SAFETY: allowed in connect and sendmsg programs; the call fails with this error.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REFUSE
}

/// `connect` (`connecting`) or `sendmsg` of family `F`: a Service address becomes a backend's.
#[inline(always)]
fn translate<F: Family>(ctx: &SockAddrContext, connecting: bool) -> i32 {
    if !applies(ctx) {
        return ALLOW;
    }
    let proto = protocol(ctx);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: reading fields of the kernel's context.
    let (addr, port) = unsafe { (F::user_ip(sa), read_volatile(addr_of!((*sa).user_port)) as u16) };
    let svc = match lookup::<F>(addr, port, proto, SCOPE_INTERNAL) {
        // The node and its pods reach NodePorts on the node's addresses too.
        Destination::Other if config().flags & CONFIG_F_EXTERNAL != 0 => {
            match node_port_in_cluster::<F>(addr, port, proto) {
                None => return ALLOW,
                Some(svc) if svc.count == 0 => return refuse(),
                Some(svc) => svc,
            }
        }
        Destination::Other => return ALLOW,
        Destination::Refused => return refuse(),
        Destination::Service(svc) => svc,
    };
    // The client's network namespace matters only to affinity (its key tells pods apart).
    let netns = if svc.flags & SERVICE_F_AFFINITY != 0 {
        // SAFETY: a sock_addr context.
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
    } else {
        0
    };
    let Some((id, backend)) = select::<F>(&svc, F::UNSPECIFIED, netns, 0) else {
        // An update in progress left no backend to pick: as if there were none.
        return refuse();
    };
    let backend_addr = F::narrow(backend.addr);
    // SAFETY: writing the fields the hook lets programs rewrite, in full 4-byte stores.
    unsafe {
        F::set_user_ip(sa, backend_addr);
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(backend.port));
    }
    // SAFETY: a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let recorded = if connecting {
        // A connected socket keeps its backend: one entry, by the socket alone, shows it the
        // Service address and terminates it if the backend goes.
        let value = SockConnectedValue {
            backend_addr: F::widen(backend_addr),
            service_addr: F::widen(addr),
            backend: id,
            service: svc.id,
            backend_port: backend.port,
            service_port: port,
            _pad: 0,
        };
        // Counted for the release program only when new: a socket connecting again (UDP)
        // replaces its entry.
        let added = SOCK_CONNECTED.insert(cookie, value, u64::from(BPF_NOEXIST));
        if added.is_ok() {
            count_connected(cookie, 1);
            added
        } else {
            SOCK_CONNECTED.insert(cookie, value, 0)
        }
    } else {
        // Unconnected datagrams pick a backend each time: their replies are known by the
        // backend they come from.
        let value = SockRevNatValue {
            addr: F::widen(addr),
            port,
            _pad: 0,
            service: svc.id,
        };
        F::sock_revnat().insert(F::sock_revnat_key(cookie, backend_addr, backend.port), value, 0)
    };
    if recorded.is_err() {
        bump(Stat::SockRevNatFull);
    }
    bump(Stat::SockTranslated);
    ALLOW
}

/// Shows the Service address in place of the backend's (`getpeername`, `recvmsg`).
#[inline(always)]
fn reverse<F: Family>(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: reading fields of the kernel's context.
    let (addr, port) = unsafe { (F::user_ip(sa), read_volatile(addr_of!((*sa).user_port)) as u16) };
    // Both maps are keyed by a backend's port: a peer on a port no backend has (most sockets'
    // peers, a UDP server's clients) spares both lookups. A socket whose backend was removed
    // shows that backend's address from then on, until it is terminated.
    if !backend_port(port) {
        return;
    }
    // SAFETY: a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A socket connected to a Service; the peer is checked, since a UDP socket may have been
    // disconnected since and receive from anyone.
    // SAFETY: the value is copied out at once.
    let connected = unsafe { SOCK_CONNECTED.get(cookie) }
        .copied()
        .filter(|c| c.backend_port == port && c.backend_addr == F::widen(addr))
        .map(|c| (c.service_addr, c.service_port));
    // Else a datagram from a backend an unconnected socket sent to (or a socket connected by an
    // agent from before `SOCK_CONNECTED`, which recorded every socket there).
    let service = connected.or_else(|| {
        // SAFETY: the value is copied out at once.
        unsafe { F::sock_revnat().get(F::sock_revnat_key(cookie, addr, port)) }.map(|v| (v.addr, v.port))
    });
    if let Some((service_addr, service_port)) = service {
        // SAFETY: writing the fields the hook lets programs rewrite.
        unsafe {
            F::set_user_ip(sa, F::narrow(service_addr));
            write_volatile(addr_of_mut!((*sa).user_port), u32::from(service_port));
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    translate::<V4>(&ctx, true)
}

#[cgroup_sock_addr(connect6)]
pub fn sock6_connect(ctx: SockAddrContext) -> i32 {
    translate::<V6>(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock4_sendmsg(ctx: SockAddrContext) -> i32 {
    translate::<V4>(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock6_sendmsg(ctx: SockAddrContext) -> i32 {
    translate::<V6>(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock4_recvmsg(ctx: SockAddrContext) -> i32 {
    reverse::<V4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock6_recvmsg(ctx: SockAddrContext) -> i32 {
    reverse::<V6>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    reverse::<V4>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock6_getpeername(ctx: SockAddrContext) -> i32 {
    reverse::<V6>(&ctx);
    ALLOW
}

/// A socket its owner closed (`close`, or its process ending): its [`SOCK_CONNECTED`] entry goes
/// with it. Left to the map's LRU instead, the entries of closed sockets filled it after as many
/// connects as it holds (minutes on a busy node), and every connect then evicted the entry least
/// recently used, which is a long-lived TCP socket's (TCP sockets' entries are read only by
/// `getpeername`): such a socket kept the backend's address from `getpeername`, and was no longer
/// terminated when its backend went. Only a socket whose peer is on some backend's port may have
/// an entry: the port gate spares the others the lookup, and so does a slot of the entries'
/// counts that holds none (see [`SOCK_CONNECTED_HINTS_MAP`]).
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: reading a field of the kernel's context, which every cgroup socket hook may read.
    let port = unsafe { read_volatile(addr_of!((*ctx.sock).dst_port)) };
    if backend_port(port) {
        // SAFETY: a cgroup socket context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if may_be_connected(cookie) && SOCK_CONNECTED.remove(cookie).is_ok() {
            count_connected(cookie, u64::MAX);
        }
    }
    ALLOW
}
