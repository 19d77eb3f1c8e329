//! The programs themselves (BPF target only).
//!
//! - [`sock_lb`]: cgroup `connect`, `sendmsg`, `recvmsg` and `getpeername` hooks: Service
//!   translation at the socket, nothing per packet afterwards;
//! - [`pod_path`]: TC/TCX on each pod's host veth: per-packet translation with connection
//!   tracking, for whatever socket LB did not translate;
//! - [`external`]: TC/TCX on the node's uplinks: NodePorts, with SNAT to other nodes' backends;
//! - [`bypass`]: per-packet flows to other nodes' pods past the node's stack, both ways;
//! - [`terminate`]: socket iterators that destroy the sockets of removed backends;
//! - [`packet`]: parsing and rewriting packets, for the TC programs; [`family`]: what differs
//!   between their IPv4 and IPv6 paths;
//! - [`services`]: the service lookup and backend selection both paths share;
//! - [`maps`], [`stats`]: the maps, and per-CPU counters.
mod bypass;
mod external;
mod family;
mod maps;
mod packet;
mod pod_path;
mod services;
mod sock_lb;
mod stats;
mod terminate;

/// The object's licence, as the kernel reads it: GPL-compatible, which the helpers and kfuncs
/// the datapath uses require. It matches the crate's `MIT OR GPL-2.0`.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
