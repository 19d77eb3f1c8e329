//! Egress masquerade: pod traffic leaving the cluster's pod CIDRs takes the node's address. It
//! lives in an nftables table of its own (`inet ferrynet`), replaced as a whole in one atomic
//! transaction and removed at uninstall, so nobody else's rules are ever touched.
use std::{
    io::{Read, Write},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

pub const TABLE: &str = "ferrynet";

/// The complete ruleset for `cluster` (pure). Applying it replaces the table atomically:
/// `nft -f` runs the whole script as one transaction.
pub fn ruleset(cluster: &[IpNet]) -> String {
    let v4: Vec<String> = cluster
        .iter()
        .filter(|c| c.addr().is_ipv4())
        .map(ToString::to_string)
        .collect();
    let v6: Vec<String> = cluster
        .iter()
        .filter(|c| c.addr().is_ipv6())
        .map(ToString::to_string)
        .collect();
    let mut script = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    if !v4.is_empty() {
        script += &format!(
            "  set pods_v4 {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n",
            v4.join(", ")
        );
    }
    if !v6.is_empty() {
        script += &format!(
            "  set pods_v6 {{ type ipv6_addr; flags interval; elements = {{ {} }} }}\n",
            v6.join(", ")
        );
    }
    script += "  chain egress {\n    type nat hook postrouting priority srcnat; policy accept;\n";
    if !v4.is_empty() {
        script += "    ip saddr @pods_v4 ip daddr != @pods_v4 masquerade comment \"pod egress\"\n";
    }
    if !v6.is_empty() {
        script += "    ip6 saddr @pods_v6 ip6 daddr != @pods_v6 masquerade comment \"pod egress\"\n";
    }
    script += "  }\n}\n";
    script
}

/// Loads a ruleset with `nft -f -`.
pub fn apply(script: &str) -> Result<()> {
    nft(&["-f", "-"], script)
}

/// Removes the table; a table that is not there is fine.
pub fn remove() -> Result<()> {
    nft(
        &["-f", "-"],
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
}

/// How long nft may take before the agent gives up on it (and kills it).
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

fn nft(args: &[&str], stdin: &str) -> Result<()> {
    let mut child = std::process::Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    // nft reads the whole script before it answers; a failed write shows in its exit status.
    let _ = child.stdin.take().expect("stdin").write_all(stdin.as_bytes());
    let deadline = Instant::now() + NFT_TIMEOUT;
    let status = loop {
        match child.try_wait().context("waiting for nft")? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("nft {} did not finish within {NFT_TIMEOUT:?}", args.join(" "));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    if !status.success() {
        bail!("nft {}: {}", args.join(" "), stderr.trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_masquerades_only_traffic_leaving_the_pod_cidrs() {
        let s = ruleset(&["10.244.0.0/16".parse().unwrap(), "fd00:244::/48".parse().unwrap()]);
        assert!(
            s.starts_with("table inet ferrynet\ndelete table inet ferrynet\n"),
            "{s}"
        );
        assert!(s.contains("elements = { 10.244.0.0/16 }"), "{s}");
        assert!(s.contains("ip saddr @pods_v4 ip daddr != @pods_v4 masquerade"), "{s}");
        assert!(s.contains("ip6 saddr @pods_v6 ip6 daddr != @pods_v6 masquerade"), "{s}");
        let v4_only = ruleset(&["10.244.0.0/16".parse().unwrap()]);
        assert!(!v4_only.contains("ip6"), "{v4_only}");
        let none = ruleset(&[]);
        assert!(!none.contains("masquerade"), "{none}");
    }
}
