//! The programs themselves (BPF target only).
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::LruPerCpuHashMap,
    programs::TcContext,
};
use ferrynet_common::{MAX_PODS, TrafficCounters};

/// The object's licence, as the kernel reads it: GPL-compatible, which the helpers the datapath
/// uses require. It matches the crate's `MIT OR GPL-2.0`.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// What each pod sends, keyed by the ifindex of its host-side veth. An LRU map: a veth that goes
/// away leaves its entry behind, and the least recently used entries make room for new pods
/// instead of new pods going uncounted once the map is full.
#[map]
static FROM_POD_STATS: LruPerCpuHashMap<u32, TrafficCounters> = LruPerCpuHashMap::with_max_entries(MAX_PODS, 0);

/// Runs at ingress of a pod's host-side veth, that is on every packet the pod sends.
///
/// It returns `TC_ACT_UNSPEC`, which TCX reads as "next": the packet continues through any other
/// program on the hook and then the normal stack, so this program never changes where traffic
/// goes.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    // SAFETY: `skb` points at the kernel's __sk_buff for this invocation.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    // SAFETY: per-CPU value, so no other CPU writes it concurrently.
    match FROM_POD_STATS.get_ptr_mut(ifindex) {
        Some(counters) => unsafe {
            (*counters).packets += 1;
            (*counters).bytes += u64::from(len);
        },
        None => {
            let first = TrafficCounters {
                packets: 1,
                bytes: u64::from(len),
            };
            // A full map only loses accounting, never traffic.
            let _ = FROM_POD_STATS.insert(ifindex, first, 0);
        }
    }
    TC_ACT_UNSPEC
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
