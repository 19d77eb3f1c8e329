//! Socket-level load balancing: the cgroup `sock_addr` hooks translate a Service address to a
//! backend when a socket connects (or sends an unconnected datagram), so established flows pay
//! nothing per packet, and they show the Service address back to the application in
//! `getpeername` and `recvmsg`.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use ferrynet_common::*;

use super::{
    family::{Family, V4, V6},
    maps::{SOCK_BACKEND, config},
    services::{Destination, lookup, node_port_in_cluster, select},
    stats::bump,
};

/// `connect` and `sendmsg` programs: allow the call (with whatever they rewrote).
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
    // SAFETY: a sock_addr context.
    let (cookie, netns) = unsafe { (bpf_get_socket_cookie(ctx.as_ptr()), bpf_get_netns_cookie(ctx.as_ptr())) };
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
    // A connected socket keeps its backend: it is terminated if the backend goes. Unconnected
    // datagrams pick a backend each time.
    if connecting {
        let _ = SOCK_BACKEND.insert(cookie, id, 0);
    }
    let key = F::sock_revnat_key(cookie, backend_addr, backend.port);
    let value = SockRevNatValue {
        addr: F::widen(addr),
        port,
        _pad: 0,
        service: svc.id,
    };
    if F::sock_revnat().insert(key, value, 0).is_err() {
        bump(Stat::SockRevNatFull);
    }
    bump(Stat::SockTranslated);
    ALLOW
}

/// Shows the Service address in place of the backend's (`getpeername`, `recvmsg`).
#[inline(always)]
fn reverse<F: Family>(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: a sock_addr context; reading its fields.
    let key = unsafe {
        F::sock_revnat_key(
            bpf_get_socket_cookie(ctx.as_ptr()),
            F::user_ip(sa),
            read_volatile(addr_of!((*sa).user_port)) as u16,
        )
    };
    // SAFETY: the value is copied out at once.
    if let Some(vip) = unsafe { F::sock_revnat().get(key) }.copied() {
        // SAFETY: writing the fields the hook lets programs rewrite.
        unsafe {
            F::set_user_ip(sa, F::narrow(vip.addr));
            write_volatile(addr_of_mut!((*sa).user_port), u32::from(vip.port));
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
