//! kube-proxy's rules, reproduced as kube-proxy writes them, for the services benchmark's
//! anchors: its iptables mode (an `iptables-restore` input) and its nftables mode (an `nft -f`
//! input). Only ClusterIP and NodePort Services (`externalTrafficPolicy: Cluster`) with ready
//! endpoints are involved, so only the chains such a connection meets are written, with
//! kube-proxy's names, order and matches:
//!
//! - iptables: `PREROUTING`/`OUTPUT` → `KUBE-SERVICES` (one rule per service port, in the
//!   order given, so the last Service given is the last rule) → `KUBE-SVC-*` (the masquerade
//!   mark for traffic from outside the cluster CIDR, then one `statistic` rule per endpoint with
//!   probability 1/n, 1/(n-1), …) → `KUBE-SEP-*` (the hairpin mark, then DNAT);
//!   `KUBE-POSTROUTING` masquerades marked traffic; the filter table's `KUBE-FORWARD` and the
//!   `--ctstate NEW` jumps that every forwarded packet meets. NodePorts: the last rule of
//!   `KUBE-SERVICES` sends traffic to a local address to `KUBE-NODEPORTS` (one rule per
//!   NodePort, in the order given) → `KUBE-EXT-*` (the masquerade mark, then `KUBE-SVC-*`).
//! - nftables: table `ip kube-proxy`; the `services` chain looks up the verdict map
//!   `service-ips` keyed by address · protocol · port; each `service-*` chain marks traffic
//!   from outside the cluster CIDR and picks an `endpoint-*` chain with `numgen random`;
//!   `filter-forward` checks new connections against the `no-endpoint-services` map. NodePorts:
//!   the `services` chain's second rule looks traffic to the node's addresses (the
//!   `nodeport-ips` set: kube-proxy's nftables mode answers NodePorts on the node's primary
//!   addresses by default) up in the verdict map `service-nodeports`, keyed by protocol · port,
//!   which goes to an `external-*` chain (the masquerade mark, then the `service-*` chain).
//!
//! Pure: the benchmark loads what these return inside the lab node's namespace.
use std::{fmt::Write as _, net::Ipv4Addr};

/// One service port as the benchmark programs it: a ClusterIP, its NodePort when the Service
/// is of type NodePort (`externalTrafficPolicy: Cluster`), and its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterIpService {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl ClusterIpService {
    /// kube-proxy's service port name, `<namespace>/<name>:<port name>` (the port is unnamed).
    fn port_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// kube-proxy hashes a chain's identity into 16 base32 characters (so `KUBE-SVC-` plus the hash
/// fits iptables' 28-character chain names). Any stable hash does for the benchmark: this is
/// 80 bits of two FNV-1a hashes, in base32 as kube-proxy writes its.
fn chain_hash(identity: &str) -> String {
    let fnv = |seed: u64| {
        identity.bytes().fold(seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let bits = (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x8422_2325_cbf2_9ce4));
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// `iptables-restore` input for the nat and filter tables, as kube-proxy's iptables mode writes
/// them for `services` (all TCP), with `cluster_cidr` as its `--cluster-cidr` and NodePorts on
/// every local address (its default).
pub fn iptables_rules(services: &[ClusterIpService], cluster_cidr: &str) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut node_port_rules = String::new();
    for svc in services {
        let port_name = svc.port_name();
        let hash = chain_hash(&format!("{port_name}:tcp"));
        let svc_chain = format!("KUBE-SVC-{hash}");
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        if let Some(node_port) = svc.node_port {
            // kube-proxy names a port's external chain with the same hash as its service chain.
            let ext_chain = format!("KUBE-EXT-{hash}");
            let _ = writeln!(chains, ":{ext_chain} - [0:0]");
            let _ = writeln!(
                node_port_rules,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{port_name}\" -m tcp --dport {node_port} -j {ext_chain}"
            );
            let _ = writeln!(
                rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {port_name} external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
        }
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {} -j {svc_chain}",
            svc.vip, svc.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {cluster_cidr} -d {}/32 -p tcp -m comment --comment \"{port_name} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
            svc.vip, svc.port
        );
        let n = svc.endpoints.len();
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let sep_chain = format!("KUBE-SEP-{}", chain_hash(&format!("{port_name}:tcp:{ip}:{port}")));
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            let remaining = n - i;
            if remaining > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {ip}:{port}\" -m statistic --mode random --probability {:.11} -j {sep_chain}",
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{port_name} -> {ip}:{port}\" -j {sep_chain}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep_chain} -s {ip}/32 -m comment --comment \"{port_name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep_chain} -p tcp -m comment --comment \"{port_name}\" -m tcp -j DNAT --to-destination {ip}:{port}"
            );
        }
    }
    let mut out = String::new();
    out += "*filter\n\
        :KUBE-EXTERNAL-SERVICES - [0:0]\n\
        :KUBE-FIREWALL - [0:0]\n\
        :KUBE-FORWARD - [0:0]\n\
        :KUBE-NODEPORTS - [0:0]\n\
        :KUBE-PROXY-FIREWALL - [0:0]\n\
        :KUBE-SERVICES - [0:0]\n\
        -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
        -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
        -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
        -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
        -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
        -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
        -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
        -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A KUBE-FORWARD -m conntrack --ctstate INVALID -m comment --comment \"kubernetes forwarding rules\" -j DROP\n\
        -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
        -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
        COMMIT\n\
        *nat\n\
        :KUBE-MARK-MASQ - [0:0]\n\
        :KUBE-NODEPORTS - [0:0]\n\
        :KUBE-POSTROUTING - [0:0]\n\
        :KUBE-SERVICES - [0:0]\n";
    out += &chains;
    out += "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
        -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
        -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
        -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
        -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
        -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n";
    out += &rules;
    out += &node_port_rules;
    out += "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
        COMMIT\n";
    out
}

/// `iptables-restore` input that empties the filter and nat tables (a restore replaces a
/// table's whole contents): what [`iptables_rules`] wrote goes, chains and all.
pub const IPTABLES_EMPTY: &str = "*filter\nCOMMIT\n*nat\nCOMMIT\n";

/// The nftables table kube-proxy's nftables mode uses.
pub const NFT_TABLE: &str = "kube-proxy";

/// `nft -f` input for table `ip kube-proxy`, as kube-proxy's nftables mode writes it for
/// `services` (all TCP) on a node whose primary addresses are `node_ips` (where its NodePorts
/// answer).
pub fn nftables_rules(services: &[ClusterIpService], cluster_cidr: &str, node_ips: &[Ipv4Addr]) -> String {
    let t = format!("ip {NFT_TABLE}");
    let mut out = format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {t} mark-for-masquerade\n\
         add rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {t} masquerading\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add chain {t} services\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
         add chain {t} service-endpoints-check\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add rule {t} filter-forward ct state new jump service-endpoints-check\n\
         add chain {t} filter-output {{ type filter hook output priority -110 ; }}\n\
         add rule {t} filter-output ct state new jump service-endpoints-check\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
         add rule {t} nat-prerouting jump services\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {t} nat-output jump services\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
         add rule {t} nat-postrouting jump masquerading\n"
    );
    for ip in node_ips {
        let _ = writeln!(out, "add element {t} nodeport-ips {{ {ip} }}");
    }
    for svc in services {
        let port_name = svc.port_name();
        let svc_chain = format!(
            "service-{}-{port_name}/tcp/p{}",
            &chain_hash(&format!("{port_name}:tcp"))[..8],
            svc.port
        );
        let _ = writeln!(out, "add chain {t} {svc_chain}");
        let _ = writeln!(
            out,
            "add rule {t} {svc_chain} ip daddr {} tcp dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
            svc.vip, svc.port
        );
        let mut picks = Vec::new();
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let ep_chain = format!(
                "endpoint-{}-{port_name}/tcp/p{}__{ip}/{port}",
                &chain_hash(&format!("{port_name}:tcp:{ip}:{port}"))[..8],
                svc.port
            );
            let _ = writeln!(out, "add chain {t} {ep_chain}");
            let _ = writeln!(out, "add rule {t} {ep_chain} ip saddr {ip} jump mark-for-masquerade");
            let _ = writeln!(out, "add rule {t} {ep_chain} meta l4proto tcp dnat to {ip}:{port}");
            picks.push(format!("{i} : goto {ep_chain}"));
        }
        let _ = writeln!(
            out,
            "add rule {t} {svc_chain} numgen random mod {} vmap {{ {} }}",
            svc.endpoints.len(),
            picks.join(" , ")
        );
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . tcp . {} : goto {svc_chain} }}",
            svc.vip, svc.port
        );
        if let Some(node_port) = svc.node_port {
            let ext_chain = format!(
                "external-{}-{port_name}/tcp/p{}",
                &chain_hash(&format!("{port_name}:tcp"))[..8],
                svc.port
            );
            let _ = writeln!(out, "add chain {t} {ext_chain}");
            let _ = writeln!(out, "add rule {t} {ext_chain} jump mark-for-masquerade");
            let _ = writeln!(out, "add rule {t} {ext_chain} goto {svc_chain}");
            let _ = writeln!(
                out,
                "add element {t} service-nodeports {{ tcp . {node_port} : goto {ext_chain} }}"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(n: usize) -> Vec<ClusterIpService> {
        (0..n)
            .map(|i| ClusterIpService {
                namespace: "default".into(),
                name: format!("svc-{i}"),
                vip: Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8),
                port: 80,
                // Every other one a NodePort.
                node_port: (i % 2 == 1).then_some(30000 + i as u16),
                endpoints: vec![
                    (Ipv4Addr::new(10, 244, 1, 3), 9000),
                    (Ipv4Addr::new(10, 244, 1, 4), 9000),
                    (Ipv4Addr::new(10, 244, 1, 5), 9000),
                ],
            })
            .collect()
    }

    #[test]
    fn iptables_chains_follow_kube_proxy() {
        let rules = iptables_rules(&services(2), "10.244.0.0/16");
        let lines: Vec<&str> = rules.lines().collect();
        // Every chain a rule jumps to is declared, chain names fit iptables' limit, and the
        // hashes differ per service and per endpoint.
        let declared: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for line in lines.iter().filter(|l| l.starts_with("-A ")) {
            let target = line.rsplit("-j ").next().unwrap().split(' ').next().unwrap();
            if target.starts_with("KUBE-") {
                assert!(declared.contains(&target), "{target} is not declared");
            }
        }
        assert!(declared.iter().all(|c| c.len() <= 28), "{declared:?}");
        let svc_chains = declared.iter().filter(|c| c.starts_with("KUBE-SVC-")).count();
        let sep_chains = declared.iter().filter(|c| c.starts_with("KUBE-SEP-")).count();
        assert_eq!((svc_chains, sep_chains), (2, 6));
        // Only the NodePort Service has an external chain, reached from KUBE-NODEPORTS.
        let ext_chains: Vec<&&str> = declared.iter().filter(|c| c.starts_with("KUBE-EXT-")).collect();
        assert_eq!(ext_chains.len(), 1, "{declared:?}");
        let ext = ext_chains[0];
        assert!(rules.contains(&format!(
            "-A KUBE-NODEPORTS -p tcp -m comment --comment \"default/svc-1\" -m tcp --dport 30001 -j {ext}\n"
        )));
        assert!(rules.contains(&format!("-A {ext} -m comment --comment \"masquerade traffic for default/svc-1 external destinations\" -j KUBE-MARK-MASQ\n")));
        assert!(rules.contains(&format!("-A {ext} -j KUBE-SVC-{}\n", &ext["KUBE-EXT-".len()..])));
        // kube-proxy's probabilities: 1/3, then 1/2, then the rest.
        let svc0: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("svc-0 ->"))
            .collect();
        assert!(svc0[0].contains("--probability 0.33333333333"), "{svc0:?}");
        assert!(svc0[1].contains("--probability 0.50000000000"), "{svc0:?}");
        assert!(!svc0[2].contains("statistic"), "{svc0:?}");
        // The last Service created is the last service rule, before the nodeports rule.
        let services_rules: Vec<&&str> = lines.iter().filter(|l| l.starts_with("-A KUBE-SERVICES ")).collect();
        assert!(services_rules[1].contains("default/svc-1 cluster IP"));
        assert!(services_rules[2].contains("KUBE-NODEPORTS"));
        assert!(rules.contains("-A KUBE-SEP-") && rules.contains("-j DNAT --to-destination 10.244.1.5:9000"));
    }

    #[test]
    fn nftables_services_go_through_one_verdict_map() {
        let rules = nftables_rules(&services(2), "10.244.0.0/16", &[Ipv4Addr::new(10, 200, 0, 16)]);
        assert!(rules.contains("add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(rules.contains(
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
        ));
        assert!(rules.contains("add element ip kube-proxy nodeport-ips { 10.200.0.16 }"));
        assert_eq!(rules.matches("add element ip kube-proxy service-nodeports").count(), 1);
        assert!(rules.contains("add element ip kube-proxy service-nodeports { tcp . 30001 : goto external-"));
        assert!(rules.contains("jump mark-for-masquerade\nadd rule ip kube-proxy external-"));
        assert_eq!(rules.matches("add element ip kube-proxy service-ips").count(), 2);
        assert!(rules.contains("add element ip kube-proxy service-ips { 10.96.0.2 . tcp . 80 : goto service-"));
        assert!(rules.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("meta l4proto tcp dnat to 10.244.1.4:9000"));
        // Every chain a rule or map element goes to is declared before it.
        for (at, line) in rules.lines().enumerate() {
            for name in line.split("goto ").skip(1).map(|rest| rest.split(' ').next().unwrap()) {
                let declared = format!("add chain ip kube-proxy {name}");
                let declared_at = rules.lines().position(|l| l == declared);
                assert!(
                    declared_at.is_some_and(|d| d < at),
                    "{name} is not declared before line {at}"
                );
            }
        }
    }

    #[test]
    fn chain_hashes_are_stable_and_distinct() {
        assert_eq!(chain_hash("default/a:tcp"), chain_hash("default/a:tcp"));
        assert_ne!(chain_hash("default/a:tcp"), chain_hash("default/b:tcp"));
        assert_eq!(chain_hash("x").len(), 16);
    }
}
