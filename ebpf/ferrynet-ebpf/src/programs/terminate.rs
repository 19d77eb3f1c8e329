//! Socket iterators that terminate the sockets whose backend was removed.
//!
//! Socket LB rewrites a socket's destination once, at connect: a connected UDP socket (a DNS
//! client, say) would go on sending to a backend that is gone, and a TCP client would wait for
//! its timeouts. The agent marks removed backends in `DOOMED_BACKENDS` and runs these iterators
//! in every network namespace with such sockets. Each socket's backend is known by its cookie
//! (recorded at connect in `SOCK_CONNECTED`), so nothing here reads the kernel's socket structures.
//! The kfunc `bpf_sock_destroy` (Linux 6.5) aborts the socket: its owner gets an error at once and
//! reconnects, to a live backend. No `CONFIG_INET_DIAG_DESTROY` is needed.
use core::ffi::c_void;

use aya_ebpf::helpers::bpf_get_socket_cookie;
use ferrynet_common::Stat;

use super::{
    maps::{DOOMED_BACKENDS, SOCK_CONNECTED, count_connected},
    stats::bump,
};

/// `struct bpf_iter_meta`.
#[repr(C)]
pub struct IterMeta {
    pub seq: *mut c_void,
    pub session_id: u64,
    pub seq_num: u64,
}

/// `struct bpf_iter__udp` (and the first fields of `struct bpf_iter__tcp`): the socket is the
/// second pointer.
#[repr(C)]
pub struct IterSocketContext {
    pub meta: *mut IterMeta,
    pub sk: *mut c_void,
}

unsafe extern "C" {
    /// The kernel's `bpf_sock_destroy` kfunc. The agent's loader turns calls to it into kfunc
    /// calls (see `agent/src/datapath/kfunc.rs`).
    fn bpf_sock_destroy(sk: *mut c_void) -> i32;
}

#[inline(always)]
fn terminate_if_doomed(ctx: *mut IterSocketContext) -> i32 {
    // SAFETY: the kernel passes a valid iterator context.
    let sk = unsafe { (*ctx).sk };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: a socket pointer the iterator hands out, which the helper accepts.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    // SAFETY: the value is copied out at once.
    let Some(backend) = (unsafe { SOCK_CONNECTED.get(cookie) }).map(|connected| connected.backend) else {
        return 0;
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { DOOMED_BACKENDS.get(backend) }.is_some() {
        // SAFETY: the iterator holds the socket's lock, as the kfunc requires.
        if unsafe { bpf_sock_destroy(sk) } == 0 {
            bump(Stat::SocketsTerminated);
        }
        if SOCK_CONNECTED.remove(cookie).is_ok() {
            count_connected(cookie, u64::MAX);
        }
    }
    0
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub fn terminate_udp(ctx: *mut IterSocketContext) -> i32 {
    terminate_if_doomed(ctx)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn terminate_tcp(ctx: *mut IterSocketContext) -> i32 {
    terminate_if_doomed(ctx)
}
