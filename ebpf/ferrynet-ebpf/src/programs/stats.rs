//! Per-CPU counters the agent sums into its metrics.
use ferrynet_common::Stat;

use super::maps::DATAPATH_STATS;

#[inline(always)]
pub fn bump(stat: Stat) {
    if let Some(counter) = DATAPATH_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot: no other CPU writes it, and programs do not preempt each other
        // on one CPU.
        unsafe { *counter += 1 };
    }
}
