//! The service proxy's metrics, in Prometheus' text format: kube-proxy's names where the meaning
//! is the same, `ferrynet_*` for the rest. Counters and histograms are atomics, updated by the
//! controller and read by the HTTP endpoint.
use std::{
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// kube-proxy's buckets for its latency histograms (seconds).
const LATENCY_BUCKETS: [f64; 17] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192, 16.384, 32.768,
    65.536,
];

/// A histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    /// Sum in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(value.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// A gauge or counter.
#[derive(Debug, Default)]
pub struct Value(AtomicU64);

impl Value {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything the service proxy measures.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// EndpointSlice change (its last-change-trigger-time) to map write.
    pub network_programming: Histogram,
    /// One batch of map updates.
    pub sync_duration: Histogram,
    pub syncs: Value,
    pub last_sync_unix: Value,
    pub services: Value,
    pub frontends: Value,
    pub backends: Value,
    pub map_writes: Value,
    pub sockets_terminated_runs: Value,
    pub conntrack_purged: Value,
    pub conntrack_expired: Value,
    pub errors: Value,
    /// Datapath counters and map fill, read from the kernel when scraped.
    pub datapath: Mutex<DatapathCounters>,
}

/// What the kernel programs counted, and how full the maps are.
#[derive(Debug, Default, Clone)]
pub struct DatapathCounters {
    pub stats: Vec<(&'static str, u64)>,
    /// (map, entries, capacity).
    pub fill: Vec<(&'static str, u64, u64)>,
}

/// The maps that make room for a new entry by evicting the least recently used one.
const LRU_MAPS: [&str; 7] = [
    ferrynet_common::CT4_MAP,
    ferrynet_common::CT6_MAP,
    ferrynet_common::AFFINITY4_MAP,
    ferrynet_common::AFFINITY6_MAP,
    ferrynet_common::SOCK_CONNECTED_MAP,
    ferrynet_common::SOCK_REVNAT4_MAP,
    ferrynet_common::SOCK_REVNAT6_MAP,
];

/// Whether a map is full: at its capacity, or, for an LRU map, within what the kernel's per-CPU
/// free lists hold back. Each possible CPU keeps up to 128 free elements (the kernel's
/// `LOCAL_FREE_TARGET`) while the map already evicts, so an LRU map that evicts never shows its
/// whole capacity (measured here, 2 CPUs: a 4,096-entry conntrack table turned over by a SYN
/// flood holds 3,876 to 4,004 entries).
fn is_full(map: &str, entries: u64, capacity: u64) -> bool {
    is_full_on(map, entries, capacity, possible_cpus())
}

fn is_full_on(map: &str, entries: u64, capacity: u64, cpus: u64) -> bool {
    if LRU_MAPS.contains(&map) {
        let held_back = cpus.saturating_mul(128).min(capacity / 2);
        entries.saturating_add(held_back) >= capacity
    } else {
        entries >= capacity
    }
}

/// The machine's possible CPUs (what the kernel sizes per-CPU lists by), read once.
fn possible_cpus() -> u64 {
    static CPUS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| aya::util::nr_cpus().map_or(1, |n| n as u64))
}

impl ServiceMetrics {
    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.network_programming.render(
            &mut out,
            "kubeproxy_network_programming_duration_seconds",
            "In-cluster network programming latency: from an EndpointSlice change to the datapath's maps written",
        );
        self.sync_duration.render(
            &mut out,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long one batch of datapath updates took",
        );
        let mut gauge = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the datapath was last updated",
            "gauge",
            self.last_sync_unix.get(),
        );
        gauge(
            "ferrynet_services",
            "Services translated on this node",
            "gauge",
            self.services.get(),
        );
        gauge(
            "ferrynet_frontends",
            "Service frontends (address, port, protocol) in the datapath",
            "gauge",
            self.frontends.get(),
        );
        gauge(
            "ferrynet_backends",
            "Backends in the datapath",
            "gauge",
            self.backends.get(),
        );
        gauge(
            "ferrynet_syncs_total",
            "Batches of datapath updates",
            "counter",
            self.syncs.get(),
        );
        gauge(
            "ferrynet_map_writes_total",
            "Map entries written or deleted",
            "counter",
            self.map_writes.get(),
        );
        gauge(
            "ferrynet_conntrack_purged_total",
            "Conntrack and affinity entries removed with their backend or service",
            "counter",
            self.conntrack_purged.get(),
        );
        gauge(
            "ferrynet_conntrack_expired_removed_total",
            "Conntrack entries of flows that ended or idled out, removed by the agent's sweep",
            "counter",
            self.conntrack_expired.get(),
        );
        gauge(
            "ferrynet_socket_termination_runs_total",
            "Runs of the socket terminators (sockets of removed backends)",
            "counter",
            self.sockets_terminated_runs.get(),
        );
        gauge(
            "ferrynet_errors_total",
            "Failed datapath updates",
            "counter",
            self.errors.get(),
        );
        let datapath = self.datapath.lock().map(|d| d.clone()).unwrap_or_default();
        if !datapath.stats.is_empty() {
            let _ = writeln!(
                out,
                "# HELP ferrynet_datapath_events_total What the kernel programs counted\n# TYPE ferrynet_datapath_events_total counter"
            );
            for (name, value) in &datapath.stats {
                let _ = writeln!(out, "ferrynet_datapath_events_total{{event=\"{name}\"}} {value}");
            }
        }
        if !datapath.fill.is_empty() {
            let _ = writeln!(
                out,
                "# HELP ferrynet_map_entries Entries in each datapath map\n# TYPE ferrynet_map_entries gauge"
            );
            for (map, entries, _) in &datapath.fill {
                let _ = writeln!(out, "ferrynet_map_entries{{map=\"{map}\"}} {entries}");
            }
            let _ = writeln!(
                out,
                "# HELP ferrynet_map_capacity Capacity of each datapath map\n# TYPE ferrynet_map_capacity gauge"
            );
            for (map, _, capacity) in &datapath.fill {
                let _ = writeln!(out, "ferrynet_map_capacity{{map=\"{map}\"}} {capacity}");
            }
            let _ = writeln!(
                out,
                "# HELP ferrynet_map_full Whether a datapath map is full (1) or not (0); an LRU map (conntrack, affinity, sockets) is full once it evicts\n# TYPE ferrynet_map_full gauge"
            );
            for (map, entries, capacity) in &datapath.fill {
                let _ = writeln!(
                    out,
                    "ferrynet_map_full{{map=\"{map}\"}} {}",
                    u8::from(is_full(map, *entries, *capacity))
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_kube_proxys_names_and_cumulative_buckets() {
        let m = ServiceMetrics::default();
        m.network_programming.observe(Duration::from_millis(3));
        m.network_programming.observe(Duration::from_millis(50));
        m.backends.set(7);
        *m.datapath.lock().unwrap() = DatapathCounters {
            stats: vec![("sock_translated", 5)],
            fill: vec![("CT4", 4_000, 4_096), ("CT6", 1_000, 4_096), ("BACKENDS", 99, 100)],
        };
        let text = m.render();
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.002\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.004\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.064\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("ferrynet_backends 7"), "{text}");
        assert!(
            text.contains("ferrynet_datapath_events_total{event=\"sock_translated\"} 5"),
            "{text}"
        );
        // An LRU map evicts from just below its capacity; others are full at it.
        assert!(text.contains("ferrynet_map_full{map=\"CT4\"} 1"), "{text}");
        assert!(text.contains("ferrynet_map_full{map=\"CT6\"} 0"), "{text}");
        assert!(text.contains("ferrynet_map_full{map=\"BACKENDS\"} 0"), "{text}");
    }

    #[test]
    fn an_lru_map_is_full_within_what_the_cpus_free_lists_hold_back() {
        let ct = ferrynet_common::CT4_MAP;
        // 2 CPUs hold back up to 256 of 4,096: the flood test's 3,876 is full, 3,800 is not.
        assert!(is_full_on(ct, 3_876, 4_096, 2));
        assert!(!is_full_on(ct, 3_800, 4_096, 2));
        // Many CPUs never make a half-empty map full.
        assert!(!is_full_on(ct, 2_000, 4_096, 256));
        assert!(is_full_on(ct, 2_048, 4_096, 256));
        // Other maps are full at their capacity only.
        assert!(!is_full_on("BACKENDS", 99, 100, 2));
        assert!(is_full_on("BACKENDS", 100, 100, 2));
    }
}
