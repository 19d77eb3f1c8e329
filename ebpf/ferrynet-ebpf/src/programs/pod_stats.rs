//! What each pod sends, counted per pod.
use aya_ebpf::programs::TcContext;
use ferrynet_common::TrafficCounters;

use super::maps::FROM_POD_STATS;

/// Counts a packet the pod behind `ctx`'s veth sent.
#[inline(always)]
pub fn count(ctx: &TcContext) {
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
}
