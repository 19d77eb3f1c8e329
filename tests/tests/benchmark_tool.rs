//! The benchmark tool keeps working. This runs it with tiny sample counts and checks the report's
//! shape; it asserts no timing (speed is measured by running the benchmarks, see README).
use std::process::Command;

use ferrynet_tests::{binary, require_root};

fn bench(args: &[&str]) -> String {
    require_root();
    let out = Command::new(binary("ferrynet-bench"))
        .args(args)
        .output()
        .expect("run ferrynet-bench");
    assert!(
        out.status.success(),
        "ferrynet-bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn cni_benchmark_reports_both_contenders_in_both_modes() {
    let report = bench(&["cni", "--ops", "4", "--concurrency", "2"]);
    for row in [
        "| sequential (1 at a time) | ferrynet | 4 |",
        "| sequential (1 at a time) | bridge+host-local | 4 |",
        "| concurrent (2 at a time) | ferrynet | 4 |",
        "| concurrent (2 at a time) | bridge+host-local | 4 |",
    ] {
        assert!(report.contains(row), "missing {row:?} in:\n{report}");
    }
    assert!(report.contains("Target (ADD p50"), "{report}");
}

#[test]
fn ipam_benchmark_reports_every_fill_level() {
    let report = bench(&["ipam", "--samples", "2", "--prefix", "22"]);
    let rows = report
        .lines()
        .filter(|l| l.starts_with("| ") && l.chars().nth(2).is_some_and(|c| c.is_ascii_digit()))
        .count();
    assert_eq!(rows, 3, "{report}");
}

#[test]
fn net_benchmark_reports_all_three_paths() {
    let report = bench(&["net", "--seconds", "1", "--rounds", "1", "--requests", "100"]);
    for path in [
        "| same node |",
        "| across nodes, native routing |",
        "| across nodes, VXLAN |",
    ] {
        assert!(report.contains(path), "missing {path:?} in:\n{report}");
    }
}

/// The modes the services benchmark reports, as it labels them.
const MODES: [&str; 5] = [
    "ferrynet, socket LB",
    "ferrynet, per-packet only",
    "kube-proxy iptables (legacy)",
    "kube-proxy iptables (nft backend)",
    "kube-proxy nftables",
];

#[test]
fn services_benchmark_reports_every_mode_node_ports_and_the_control_plane() {
    let chart = tempfile::NamedTempFile::new().unwrap();
    let nodeport_chart = tempfile::NamedTempFile::new().unwrap();
    let report = bench(&[
        "services",
        "--scales",
        "3,6",
        "--connections",
        "20",
        "--rounds",
        "1",
        "--changes",
        "3",
        "--chart",
        chart.path().to_str().unwrap(),
        "--nodeport-chart",
        nodeport_chart.path().to_str().unwrap(),
        // Clients and servers pinned: each started with its CPU, or the run fails.
        "--pin-cpus",
        "true",
    ]);
    assert!(report.contains("(`--pin-cpus true`)"), "{report}");
    for mode in MODES {
        // A ratio row for the mode, and a measurement at each scale.
        assert!(report.contains(&format!("| {mode} | ")), "no row for {mode}:\n{report}");
        for scale in ["3", "6"] {
            assert!(
                report.contains(&format!("| {scale} | {mode} | ")),
                "no measurement of {mode} at {scale}:\n{report}"
            );
        }
    }
    assert!(report.contains("## Control plane at 6 Services"), "{report}");
    assert!(report.contains("single endpoint change"), "{report}");
    let svg = std::fs::read_to_string(chart.path()).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 5, "{svg}");
    // NodePorts from the external client: every mode's node, to a backend on another node and
    // on the entry node, at each scale; a line for each in their chart.
    assert!(report.contains("## NodePort from the external client"), "{report}");
    for mode in MODES {
        for backend in ["remote", "local"] {
            assert!(
                report.contains(&format!("| {mode} | {backend} |")),
                "no NodePort ratio row for {mode}, {backend}:\n{report}"
            );
            for scale in ["3", "6"] {
                assert!(
                    report.contains(&format!("| {scale} (")) && report.contains(&format!(" | {mode} | {backend} | ")),
                    "no NodePort measurement of {mode}, {backend} at {scale}:\n{report}"
                );
            }
        }
    }
    let svg = std::fs::read_to_string(nodeport_chart.path()).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 10, "{svg}");
}
