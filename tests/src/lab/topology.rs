//! The lab's namespaces and its underlay: the names of everything it creates, and the switch
//! that connects nodes, the control plane and the external client.
use std::{os::unix::fs::MetadataExt, process::Command};

use anyhow::{Result, bail};

/// The namespace of one part of lab `lab` (`fl-<lab>-<part>`).
pub fn ns_name(lab: &str, part: &str) -> String {
    format!("fl-{lab}-{part}")
}

/// `ip -n NS ARGS...`.
pub fn run_ip(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(["-n", ns]).args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The lab's namespaces (`fl-<name>-*`; lab names have no dash, so no other lab's match).
pub fn lab_namespaces(name: &str) -> Vec<String> {
    let prefix = format!("fl-{name}-");
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// The inodes of the lab's namespaces, to recognise the processes living in them.
pub fn lab_netns_inodes(name: &str) -> Vec<u64> {
    lab_namespaces(name)
        .iter()
        .filter_map(|n| std::fs::metadata(format!("/run/netns/{n}")).ok())
        .map(|m| m.ino())
        .collect()
}

/// Whether process `pid` lives in one of the lab's namespaces.
pub fn in_lab(pid: i32, inodes: &[u64]) -> bool {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| inodes.contains(&m.ino()))
}

/// Pod and node names: short lowercase DNS labels.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}
