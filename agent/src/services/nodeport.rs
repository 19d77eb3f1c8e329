//! Where NodePorts answer (pure): on which of the node's addresses, and on which interfaces the
//! uplink program sees their traffic arrive.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

/// The node's addresses NodePorts answer on: those inside `allowed` (`--nodeport-addresses`),
/// or, when it is empty, every address but loopback, link-local and multicast ones (kube-proxy's
/// default). `all` is every (interface, address) of the node.
pub fn addresses(all: &[(u32, IpNet)], allowed: &[IpNet]) -> BTreeSet<IpAddr> {
    all.iter()
        .map(|(_, net)| net.addr())
        .filter(|ip| {
            if allowed.is_empty() {
                !ip.is_loopback() && !ip.is_multicast() && !is_link_local(*ip) && !ip.is_unspecified()
            } else {
                allowed.iter().any(|cidr| cidr.contains(ip))
            }
        })
        .collect()
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// The interfaces the uplink program attaches to, by index: those named in `configured`
/// (`--nodeport-interfaces`) that exist, or, when it is empty, those holding one of the node's
/// InternalIPs.
pub fn uplinks(
    all: &[(u32, IpNet)],
    links: &[(u32, String)],
    internal_ips: &[IpAddr],
    configured: &[String],
) -> BTreeMap<u32, String> {
    links
        .iter()
        .filter(|(index, name)| {
            if configured.is_empty() {
                all.iter()
                    .any(|(i, net)| i == index && internal_ips.contains(&net.addr()))
            } else {
                configured.contains(name)
            }
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn node() -> Vec<(u32, IpNet)> {
        vec![
            (1, net("127.0.0.1/8")),
            (1, net("::1/128")),
            (2, net("10.200.0.11/24")),
            (2, net("fd00:200::11/64")),
            (2, net("fe80::1/64")),
            (3, net("192.168.9.1/24")),
            (4, net("169.254.1.1/32")),
        ]
    }

    #[test]
    fn every_routable_address_by_default_or_those_in_the_cidrs() {
        let all: Vec<String> = addresses(&node(), &[]).iter().map(ToString::to_string).collect();
        assert_eq!(all, ["10.200.0.11", "192.168.9.1", "fd00:200::11"]);
        let some: Vec<String> = addresses(&node(), &[net("10.200.0.0/16"), net("fd00:200::/64")])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(some, ["10.200.0.11", "fd00:200::11"]);
        // Loopback can be asked for explicitly.
        assert!(addresses(&node(), &[net("127.0.0.0/8")]).contains(&"127.0.0.1".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn uplinks_hold_the_internal_ips_unless_named() {
        let links = vec![(1, "lo".to_string()), (2, "eth0".to_string()), (3, "eth1".to_string())];
        let internal: Vec<IpAddr> = vec!["10.200.0.11".parse().unwrap(), "fd00:200::11".parse().unwrap()];
        assert_eq!(
            uplinks(&node(), &links, &internal, &[]),
            [(2, "eth0".to_string())].into()
        );
        assert_eq!(
            uplinks(&node(), &links, &internal, &["eth1".into(), "missing".into()]),
            [(3, "eth1".to_string())].into()
        );
        assert!(uplinks(&node(), &links, &[], &[]).is_empty());
    }
}
