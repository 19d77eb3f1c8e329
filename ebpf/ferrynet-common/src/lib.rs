//! Types shared by ferrynet's kernel programs (`ferrynet-ebpf`) and userspace (`ferrynet-agent`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel and userspace read the same bytes out of
//! the same BPF maps, so the layouts must match exactly and must not contain padding holes the
//! verifier would reject.
#![no_std]

/// Name of the map that counts what each pod sends, keyed by the host-side veth's ifindex.
pub const FROM_POD_STATS_MAP: &str = "FROM_POD_STATS";
/// Name of the TC/TCX program attached at ingress of every pod's host-side veth.
pub const FROM_POD_PROGRAM: &str = "from_pod";
/// Capacity of the per-pod maps. A node runs a few hundred pods at most; this leaves room.
pub const MAX_PODS: u32 = 4096;

/// Packets and bytes seen by a program, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: TrafficCounters is repr(C), made only of u64s, so every bit pattern is valid and there
// is no padding.
unsafe impl aya::Pod for TrafficCounters {}
