//! The agent's nftables table (`inet ferrynet`), the node's only packet filter rules. It holds:
//!
//! - **egress masquerade** (when on): pod traffic leaving the cluster's pod CIDRs takes the node's
//!   address;
//! - **VXLAN from known peers only**: the VXLAN port takes packets only from other nodes'
//!   addresses, so nothing else that can reach the port can inject traffic into the pod network;
//! - **pod source check**: a packet arriving from a pod's host veth must carry a source address
//!   that is routed back through that veth (strict reverse-path filtering), so a pod cannot spoof
//!   another's address;
//! - **refused Service traffic**: a packet the per-packet service path marked (a Service port
//!   without endpoints, a Service CIDR address nobody holds) is delivered locally by a policy
//!   rule (`node::refusal`) and rejected here, before any socket, with a TCP reset or an ICMP
//!   port unreachable, as kube-proxy's nftables mode does.
//!
//! The desired table ([`desired`]) and the table read back from the kernel ([`observe`]) have the
//! same shape, [`TableState`]; [`diff`] (pure) says whether to replace it. Replacing runs one
//! `nft -f` script, one atomic transaction, and touches nobody else's tables. Read back on every
//! pass, so a flushed ruleset is repaired at the next pass.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    process::Stdio,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde_json::Value;

pub const TABLE: &str = "ferrynet";
/// Host veths of pods (see `ferrynet_kernel::names`).
const POD_VETHS: &str = "fnv*";

/// What the table should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSpec {
    /// Masquerade egress from these CIDRs (the cluster's pod CIDRs), when masquerade is on.
    pub masquerade: Option<Vec<IpNet>>,
    /// The VXLAN UDP port, and the peers' underlay addresses allowed to send to it.
    pub vxlan_port: u16,
    pub vxlan_peers: BTreeSet<std::net::IpAddr>,
}

/// A table's content, reduced to what identifies the agent's rules: each set's elements, each
/// chain's hook, and the comments of each chain's rules, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableState {
    pub sets: BTreeMap<String, BTreeSet<String>>,
    /// Chain name → (type, hook, priority).
    pub chains: BTreeMap<String, (String, String, i64)>,
    /// Chain name → the comments of its rules, in order.
    pub rules: BTreeMap<String, Vec<String>>,
}

/// What to do with the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirewallOp {
    Keep,
    /// Replace the whole table with this script (one atomic transaction).
    Replace(String),
}

struct Rule {
    chain: &'static str,
    text: String,
    comment: &'static str,
}

struct Chain {
    name: &'static str,
    kind: &'static str,
    hook: &'static str,
    priority: i64,
}

const EGRESS: Chain = Chain {
    name: "egress",
    kind: "nat",
    hook: "postrouting",
    priority: 100,
};
const VXLAN_INPUT: Chain = Chain {
    name: "vxlan_input",
    kind: "filter",
    hook: "input",
    priority: 0,
};
const POD_SOURCE: Chain = Chain {
    name: "pod_source",
    kind: "filter",
    hook: "prerouting",
    priority: -300,
};
/// On `input`: marked packets are delivered locally by the refusal rule (see `node::refusal`).
const SERVICE_REJECT: Chain = Chain {
    name: "service_reject",
    kind: "filter",
    hook: "input",
    priority: 0,
};

/// A set: its element type, whether it holds intervals, and its elements.
struct SetSpec {
    kind: &'static str,
    interval: bool,
    elements: BTreeSet<String>,
}

/// Sets, chains and rules of one table.
struct Layout {
    sets: BTreeMap<String, SetSpec>,
    chains: Vec<&'static Chain>,
    rules: Vec<Rule>,
}

/// Sets, chains and rules of the table `spec` asks for.
fn layout(spec: &FirewallSpec) -> Layout {
    let mut sets = BTreeMap::new();
    let mut chains: Vec<&'static Chain> = vec![&VXLAN_INPUT, &POD_SOURCE, &SERVICE_REJECT];
    let mut rules = Vec::new();
    let element = |net: &IpNet| {
        if net.prefix_len() == net.max_prefix_len() {
            net.addr().to_string()
        } else {
            net.to_string()
        }
    };
    if let Some(cluster) = &spec.masquerade {
        chains.insert(0, &EGRESS);
        for (v4, set, family) in [(true, "pods_v4", "ip"), (false, "pods_v6", "ip6")] {
            let elements: BTreeSet<String> = cluster
                .iter()
                .filter(|c| c.addr().is_ipv4() == v4)
                .map(element)
                .collect();
            if elements.is_empty() {
                continue;
            }
            let kind = if v4 { "ipv4_addr" } else { "ipv6_addr" };
            sets.insert(
                set.to_string(),
                SetSpec {
                    kind,
                    interval: true,
                    elements,
                },
            );
            rules.push(Rule {
                chain: EGRESS.name,
                text: format!("{family} saddr @{set} {family} daddr != @{set} masquerade"),
                comment: "pod egress",
            });
        }
    }
    for (v4, set, family) in [(true, "vxlan_peers_v4", "ip"), (false, "vxlan_peers_v6", "ip6")] {
        let peers: BTreeSet<String> = spec
            .vxlan_peers
            .iter()
            .filter(|ip| ip.is_ipv4() == v4)
            .map(ToString::to_string)
            .collect();
        let kind = if v4 { "ipv4_addr" } else { "ipv6_addr" };
        sets.insert(
            set.to_string(),
            SetSpec {
                kind,
                interval: false,
                elements: peers,
            },
        );
        rules.push(Rule {
            chain: VXLAN_INPUT.name,
            text: format!("udp dport {} {family} saddr != @{set} drop", spec.vxlan_port),
            comment: "vxlan from unknown peers",
        });
    }
    // Link-local sources never leave the link and have no route to check; everything else
    // must be routed back through the veth it came from.
    rules.push(Rule {
        chain: POD_SOURCE.name,
        text: format!("iifname \"{POD_VETHS}\" ip6 saddr fe80::/10 return"),
        comment: "pod link-local source",
    });
    rules.push(Rule {
        chain: POD_SOURCE.name,
        text: format!("iifname \"{POD_VETHS}\" fib saddr . iif oif missing counter drop"),
        comment: "spoofed pod source",
    });
    let mark = format!(
        "meta mark & {:#010x} == {:#010x}",
        ferrynet_common::MARK_MASK,
        ferrynet_common::MARK_REJECT
    );
    rules.push(Rule {
        chain: SERVICE_REJECT.name,
        text: format!("{mark} meta l4proto tcp counter reject with tcp reset"),
        comment: "refused service (tcp)",
    });
    rules.push(Rule {
        chain: SERVICE_REJECT.name,
        text: format!("{mark} counter reject with icmpx port-unreachable"),
        comment: "refused service",
    });
    Layout { sets, chains, rules }
}

/// The table `spec` asks for, as [`observe`] would read it back.
pub fn desired(spec: &FirewallSpec) -> TableState {
    let Layout { sets, chains, rules } = layout(spec);
    let mut state = TableState {
        sets: sets.into_iter().map(|(name, set)| (name, set.elements)).collect(),
        ..Default::default()
    };
    for chain in chains {
        state.chains.insert(
            chain.name.to_string(),
            (chain.kind.to_string(), chain.hook.to_string(), chain.priority),
        );
        state.rules.insert(chain.name.to_string(), Vec::new());
    }
    for rule in rules {
        state
            .rules
            .entry(rule.chain.to_string())
            .or_default()
            .push(rule.comment.to_string());
    }
    state
}

/// The `nft -f` script that replaces the table with what `spec` asks for, atomically.
pub fn script(spec: &FirewallSpec) -> String {
    let Layout { sets, chains, rules } = layout(spec);
    let mut out = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    for (name, set) in &sets {
        out += &format!("  set {name} {{ type {};", set.kind);
        if set.interval {
            out += " flags interval;";
        }
        if !set.elements.is_empty() {
            let elements: Vec<&str> = set.elements.iter().map(String::as_str).collect();
            out += &format!(" elements = {{ {} }}", elements.join(", "));
        }
        out += " }\n";
    }
    for chain in chains {
        out += &format!(
            "  chain {} {{\n    type {} hook {} priority {}; policy accept;\n",
            chain.name, chain.kind, chain.hook, chain.priority
        );
        for rule in rules.iter().filter(|r| r.chain == chain.name) {
            out += &format!("    {} comment \"{}\"\n", rule.text, rule.comment);
        }
        out += "  }\n";
    }
    out += "}\n";
    out
}

/// Whether the kernel's table must be replaced (pure).
pub fn diff(observed: Option<&TableState>, spec: &FirewallSpec) -> FirewallOp {
    if observed == Some(&desired(spec)) {
        FirewallOp::Keep
    } else {
        FirewallOp::Replace(script(spec))
    }
}

/// Reads `nft -j list table inet ferrynet` output into a [`TableState`] (pure).
pub fn parse_listing(listing: &Value) -> TableState {
    let mut state = TableState::default();
    let items = listing["nftables"].as_array().map(Vec::as_slice).unwrap_or_default();
    for item in items {
        if let Some(set) = item.get("set") {
            let name = set["name"].as_str().unwrap_or_default().to_string();
            let elements = set["elem"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(element_text)
                .collect();
            state.sets.insert(name, elements);
        } else if let Some(chain) = item.get("chain") {
            let name = chain["name"].as_str().unwrap_or_default().to_string();
            state.chains.insert(
                name.clone(),
                (
                    chain["type"].as_str().unwrap_or_default().to_string(),
                    chain["hook"].as_str().unwrap_or_default().to_string(),
                    chain["prio"].as_i64().unwrap_or(i64::MIN),
                ),
            );
            state.rules.entry(name).or_default();
        } else if let Some(rule) = item.get("rule") {
            let chain = rule["chain"].as_str().unwrap_or_default().to_string();
            let comment = rule["comment"].as_str().unwrap_or_default().to_string();
            state.rules.entry(chain).or_default().push(comment);
        }
    }
    state
}

fn element_text(element: &Value) -> Option<String> {
    match element {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => {
            if let Some(prefix) = o.get("prefix") {
                Some(format!("{}/{}", prefix["addr"].as_str()?, prefix["len"].as_u64()?))
            } else if let Some(range) = o.get("range").and_then(Value::as_array) {
                Some(format!("{}-{}", range.first()?.as_str()?, range.get(1)?.as_str()?))
            } else {
                o.get("elem").and_then(|e| element_text(&e["val"]))
            }
        }
        _ => None,
    }
}

/// Why nft failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft (is nftables installed?): {0}")]
    Spawn(std::io::Error),
    #[error("nft {args} did not finish within {timeout:?}")]
    Timeout { args: String, timeout: Duration },
    #[error("nft {args}: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("nft {args}: unreadable output: {source}")]
    Output { args: String, source: serde_json::Error },
}

/// The table as the kernel has it; `None` if there is none.
pub fn observe() -> Result<Option<TableState>, NftError> {
    match nft(&["-j", "list", "table", "inet", TABLE], "") {
        Ok(out) => {
            let listing: Value = serde_json::from_str(&out).map_err(|source| NftError::Output {
                args: "-j list table".into(),
                source,
            })?;
            Ok(Some(parse_listing(&listing)))
        }
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Applies `op`.
pub fn apply(op: &FirewallOp) -> Result<(), NftError> {
    match op {
        FirewallOp::Keep => Ok(()),
        FirewallOp::Replace(script) => nft(&["-f", "-"], script).map(|_| ()),
    }
}

/// Removes the table; a table that is not there is fine.
pub fn remove() -> Result<(), NftError> {
    nft(
        &["-f", "-"],
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
    .map(|_| ())
}

/// How long nft may take before the agent gives up on it (and kills it).
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

fn nft(args: &[&str], stdin: &str) -> Result<String, NftError> {
    let joined = args.join(" ");
    let mut child = std::process::Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    // nft reads the whole script before it answers; a failed write shows in its exit status.
    let _ = child.stdin.take().expect("piped").write_all(stdin.as_bytes());
    let mut stdout_pipe = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout_pipe.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + NFT_TIMEOUT;
    let status = loop {
        match child.try_wait().map_err(NftError::Spawn)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NftError::Timeout {
                    args: joined,
                    timeout: NFT_TIMEOUT,
                });
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let stdout = reader.join().unwrap_or_default();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    if !status.success() {
        return Err(NftError::Failed {
            args: joined,
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(masquerade: bool) -> FirewallSpec {
        FirewallSpec {
            masquerade: masquerade.then(|| vec!["10.244.0.0/16".parse().unwrap(), "fd00:244::/48".parse().unwrap()]),
            vxlan_port: 4789,
            vxlan_peers: ["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()].into(),
        }
    }

    #[test]
    fn the_script_masquerades_egress_admits_known_vxlan_peers_and_checks_pod_sources() {
        let s = script(&spec(true));
        assert!(
            s.starts_with("table inet ferrynet\ndelete table inet ferrynet\n"),
            "{s}"
        );
        assert!(s.contains("elements = { 10.244.0.0/16 }"), "{s}");
        assert!(s.contains("ip saddr @pods_v4 ip daddr != @pods_v4 masquerade"), "{s}");
        assert!(s.contains("ip6 saddr @pods_v6 ip6 daddr != @pods_v6 masquerade"), "{s}");
        assert!(
            s.contains("set vxlan_peers_v4 { type ipv4_addr; elements = { 10.0.0.2, 10.0.0.3 } }"),
            "{s}"
        );
        assert!(s.contains("udp dport 4789 ip saddr != @vxlan_peers_v4 drop"), "{s}");
        assert!(s.contains("set vxlan_peers_v6 { type ipv6_addr; }"), "{s}");
        assert!(
            s.contains("iifname \"fnv*\" fib saddr . iif oif missing counter drop"),
            "{s}"
        );
        let off = script(&spec(false));
        assert!(!off.contains("masquerade") && !off.contains("chain egress"), "{off}");
        assert!(
            off.contains("chain vxlan_input") && off.contains("chain pod_source"),
            "{off}"
        );
    }

    /// What `nft -j list table inet ferrynet` printed for the table `script(&spec(true))` loads
    /// (nftables 1.0.6), trimmed to the parts that matter.
    fn listing() -> Value {
        json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "ferrynet", "handle": 3}},
            {"set": {"family": "inet", "name": "pods_v4", "table": "ferrynet", "type": "ipv4_addr", "handle": 1, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.244.0.0", "len": 16}}]}},
            {"set": {"family": "inet", "name": "pods_v6", "table": "ferrynet", "type": "ipv6_addr", "handle": 2, "flags": ["interval"], "elem": [{"prefix": {"addr": "fd00:244::", "len": 48}}]}},
            {"set": {"family": "inet", "name": "vxlan_peers_v4", "table": "ferrynet", "type": "ipv4_addr", "handle": 3, "elem": ["10.0.0.2", "10.0.0.3"]}},
            {"set": {"family": "inet", "name": "vxlan_peers_v6", "table": "ferrynet", "type": "ipv6_addr", "handle": 4}},
            {"chain": {"family": "inet", "table": "ferrynet", "name": "egress", "handle": 5, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
            {"chain": {"family": "inet", "table": "ferrynet", "name": "vxlan_input", "handle": 6, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
            {"chain": {"family": "inet", "table": "ferrynet", "name": "pod_source", "handle": 7, "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}},
            {"chain": {"family": "inet", "table": "ferrynet", "name": "service_reject", "handle": 14, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "ferrynet", "chain": "egress", "handle": 8, "comment": "pod egress", "expr": []}},
            {"rule": {"family": "inet", "table": "ferrynet", "chain": "egress", "handle": 9, "comment": "pod egress", "expr": []}},
            {"rule": {"family": "inet", "table": "ferrynet", "chain": "vxlan_input", "handle": 10, "comment": "vxlan from unknown peers", "expr": []}},
            {"rule": {"family": "inet", "table": "ferrynet", "chain": "vxlan_input", "handle": 11, "comment": "vxlan from unknown peers", "expr": []}},
            {"rule": {"family": "inet", "table": "ferrynet", "chain": "pod_source", "handle": 12, "comment": "pod link-local source", "expr": []}},
            {"rule": {"family": "inet", "table": "ferrynet", "chain": "pod_source", "handle": 13, "comment": "spoofed pod source", "expr": []}},
            {"rule": {"family": "inet", "table": "ferrynet", "chain": "service_reject", "handle": 15, "comment": "refused service (tcp)", "expr": []}},
            {"rule": {"family": "inet", "table": "ferrynet", "chain": "service_reject", "handle": 16, "comment": "refused service", "expr": []}}
        ]})
    }

    #[test]
    fn a_table_read_back_as_loaded_needs_nothing_and_any_drift_replaces_it() {
        let observed = parse_listing(&listing());
        assert_eq!(observed, desired(&spec(true)));
        assert_eq!(diff(Some(&observed), &spec(true)), FirewallOp::Keep);
        // No table (someone flushed the ruleset), a lost rule, a changed set: replaced.
        assert!(matches!(diff(None, &spec(true)), FirewallOp::Replace(_)));
        let mut lost_rule = observed.clone();
        lost_rule.rules.get_mut("pod_source").unwrap().pop();
        assert!(matches!(diff(Some(&lost_rule), &spec(true)), FirewallOp::Replace(_)));
        let mut new_peer = spec(true);
        new_peer.vxlan_peers.insert("10.0.0.4".parse().unwrap());
        assert!(matches!(diff(Some(&observed), &new_peer), FirewallOp::Replace(_)));
        // Masquerade turned off: the egress chain goes.
        assert!(matches!(diff(Some(&observed), &spec(false)), FirewallOp::Replace(s) if !s.contains("masquerade")));
    }
}
