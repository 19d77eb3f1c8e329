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
