//! Packet parsing and rewriting shared by the TC programs: a packet's tuple, address and port
//! rewrites with their checksums, and sending a packet on without the stack.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, TC_ACT_SHOT, bpf_fib_lookup as FibParams, bpf_redir_neigh},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use ferrynet_common::*;

use super::stats::bump;

/// TCX: go on to the next program on the hook, then the stack.
pub const NEXT: i32 = -1;
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// A packet's addresses, ports and where its checksums are.
#[derive(Clone, Copy)]
pub struct Tuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header.
    pub l4: usize,
    /// Offset of the L4 checksum.
    pub csum: usize,
    /// TCP's flags byte (0 for UDP).
    pub tcp_flags: u8,
}

/// What a packet's L4 header says: its ports, where its checksum is, and TCP's flags.
#[derive(Clone, Copy)]
pub struct L4Fields {
    pub sport: u16,
    pub dport: u16,
    pub csum: usize,
    pub tcp_flags: u8,
}

impl<A> Tuple<A> {
    #[inline(always)]
    pub fn new(saddr: A, daddr: A, proto: u8, l4: usize, fields: L4Fields) -> Self {
        Tuple {
            saddr,
            daddr,
            sport: fields.sport,
            dport: fields.dport,
            proto,
            l4,
            csum: fields.csum,
            tcp_flags: fields.tcp_flags,
        }
    }
}

/// Reads a `T` at `offset`: straight from the packet when it is in the linear part (as the
/// headers of nearly every packet are), else through the load helper. The helper call costs
/// more than a bounds check, and a packet's tuple takes a dozen reads.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bounds are checked against `data_end` just above, as the verifier requires.
        return Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load::<T>(offset).ok()
}

#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Option<u16> {
    read::<u16>(ctx, 12).map(u16::from_be)
}

/// The ports, checksum offset and TCP flags of an L4 header at the constant offset `L4`, read
/// straight from the packet. (The verifier cannot bound a direct read at a variable offset the
/// way the compiler writes the check, so only constant offsets are read directly.)
#[inline(always)]
pub fn l4_fields<const L4: usize>(ctx: &TcContext, proto: u8) -> Option<L4Fields> {
    let (csum, tcp_flags) = match proto {
        PROTO_TCP => (L4 + 16, read::<u8>(ctx, L4 + 13)?),
        PROTO_UDP => (L4 + 6, 0),
        _ => return None,
    };
    Some(L4Fields {
        sport: read::<u16>(ctx, L4)?,
        dport: read::<u16>(ctx, L4 + 2)?,
        csum,
        tcp_flags,
    })
}

/// [`l4_fields`] at a variable offset (after IPv4 options, which are rare), through the load
/// helper.
#[inline(always)]
pub fn l4_fields_loaded(ctx: &TcContext, l4: usize, proto: u8) -> Option<L4Fields> {
    let (csum, tcp_flags) = match proto {
        PROTO_TCP => (l4 + 16, ctx.load::<u8>(l4 + 13).ok()?),
        PROTO_UDP => (l4 + 6, 0),
        _ => return None,
    };
    Some(L4Fields {
        sport: ctx.load::<u16>(l4).ok()?,
        dport: ctx.load::<u16>(l4 + 2).ok()?,
        csum,
        tcp_flags,
    })
}

/// Flags of an L4 checksum update: UDP's zero checksum means "none" and must stay zero.
#[inline(always)]
pub fn l4_flags(proto: u8) -> u64 {
    if proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Rewrites the port at `offset` from the L4 header (0 source, 2 destination).
#[inline(always)]
pub fn rewrite_port<A>(ctx: &mut TcContext, t: &Tuple<A>, offset: usize, from: u16, to: u16) -> Option<()> {
    ctx.l4_csum_replace(t.csum, u64::from(from), u64::from(to), l4_flags(t.proto) | 2)
        .ok()?;
    ctx.store(t.l4 + offset, &to, 0).ok()
}

#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` points at the kernel's __sk_buff for this invocation.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Sends a packet back out to the pod it came from: the Ethernet addresses swap (the pod sent
/// it to the host veth's MAC; it must come back to its own, or the pod drops it as another
/// host's), then the packet goes to the egress of the veth it came in on.
#[inline(always)]
pub fn bounce_to_pod(ctx: &mut TcContext) -> Option<i32> {
    let dst = ctx.load::<[u8; 6]>(0).ok()?;
    let src = ctx.load::<[u8; 6]>(6).ok()?;
    ctx.store(0, &src, 0).ok()?;
    ctx.store(6, &dst, 0).ok()?;
    // SAFETY: redirecting to the egress of the veth the packet came in on.
    Some(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}

/// Marks a packet for the firewall table to reject, and lets it go on.
#[inline(always)]
pub fn refuse(ctx: &TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's __sk_buff for this invocation.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark((mark & !MARK_MASK) | MARK_REJECT);
    bump(Stat::PacketsRefused);
    NEXT
}

/// Whether a TCP segment resets its connection.
#[inline(always)]
pub fn is_tcp_rst<A>(t: &Tuple<A>) -> bool {
    t.proto == PROTO_TCP && t.tcp_flags & TCP_RST != 0
}

/// Whether a TCP segment ends its sender's half of the connection.
#[inline(always)]
pub fn is_tcp_fin<A>(t: &Tuple<A>) -> bool {
    t.proto == PROTO_TCP && t.tcp_flags & TCP_FIN != 0
}

/// Whether a TCP segment opens a connection (SYN without ACK).
#[inline(always)]
pub fn is_tcp_syn<A>(t: &Tuple<A>) -> bool {
    t.proto == PROTO_TCP && t.tcp_flags & 0x12 == 0x02
}

/// Whether a TCP segment accepts a connection (SYN and ACK).
#[inline(always)]
pub fn is_tcp_syn_ack<A>(t: &Tuple<A>) -> bool {
    t.proto == PROTO_TCP && t.tcp_flags & 0x12 == 0x12
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;

/// Sends a rewritten packet straight to its next hop, as the kernel's FIB says, without the
/// stack: the packet's source may be one of the node's own addresses, which the stack would
/// drop as a martian on a forwarded packet. A next hop whose neighbour is not resolved yet is
/// resolved by the kernel (`bpf_redirect_neigh`). No route: dropped.
#[inline(always)]
pub fn fib_redirect(ctx: &mut TcContext, params: &mut FibParams) -> i32 {
    params.ifindex = ifindex(ctx);
    // SAFETY: `params` is a valid, initialised lookup on the stack.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            params as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if ret == FIB_SUCCESS {
        if ctx.store(0, &params.dmac, 0).is_err() || ctx.store(6, &params.smac, 0).is_err() {
            return TC_ACT_SHOT;
        }
        // SAFETY: the interface the FIB chose.
        return unsafe { bpf_redirect(params.ifindex, 0) } as i32;
    }
    if ret == FIB_NO_NEIGH {
        return redirect_neigh(params);
    }
    bump(Stat::FibFailed);
    TC_ACT_SHOT
}

/// The packet to the FIB's next hop `params` names, whose neighbour the FIB does not know yet:
/// the kernel resolves it (`bpf_redirect_neigh`) instead of the packet going through the stack.
#[inline(always)]
pub fn redirect_neigh(params: &FibParams) -> i32 {
    // SAFETY: both union members were written by the lookup (the next hop's address).
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    if params.family == AF_INET {
        nh.nh_family = u32::from(AF_INET);
        nh.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
    } else {
        nh.nh_family = u32::from(AF_INET6);
        nh.__bindgen_anon_1.ipv6_nh = unsafe { params.__bindgen_anon_4.ipv6_dst };
    }
    // SAFETY: `nh` lives on the stack for the call.
    let ret = unsafe {
        bpf_redirect_neigh(
            params.ifindex,
            &mut nh as *mut bpf_redir_neigh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    ret as i32
}
