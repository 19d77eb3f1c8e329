//! Which flows the per-packet path may take past the node's stack (`CONFIG_F_STACK_BYPASS`):
//! those to other nodes' PodCIDRs that the node networking routes natively, as far as the
//! stack would not masquerade them. Pure: from the node networking's published state.
use ipnet::IpNet;

use crate::{node::topology::Via, status::NodeNetworkingDetails};

/// The other nodes' PodCIDRs whose flows may go past the stack: those routed natively (through
/// VXLAN, the replies come in on the VXLAN device, which has no program), and, while the node
/// masquerades, only inside the CIDRs it leaves alone (past the stack, nothing masquerades).
pub fn peer_pod_cidrs(node: &NodeNetworkingDetails) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = node
        .peers
        .values()
        .flatten()
        .filter(|route| matches!(route.via, Via::Native { .. }))
        .map(|route| route.cidr)
        .filter(|cidr| {
            node.masquerade
                .as_ref()
                .is_none_or(|inside| inside.iter().any(|net| net.contains(cidr)))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::topology::PeerRoute;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn native(cidr: &str) -> PeerRoute {
        PeerRoute {
            cidr: net(cidr),
            via: Via::Native {
                gateway: "10.200.0.12".parse().unwrap(),
            },
        }
    }

    #[test]
    fn only_natively_routed_peer_cidrs_the_node_does_not_masquerade() {
        let mut node = NodeNetworkingDetails::default();
        node.peers
            .insert("n2".into(), vec![native("10.244.2.0/24"), native("fd00:244:2::/64")]);
        node.peers.insert(
            "n3".into(),
            vec![PeerRoute {
                cidr: net("10.244.3.0/24"),
                via: Via::Vxlan {
                    vtep: "10.200.0.13".parse().unwrap(),
                    inner: "10.244.3.0".parse().unwrap(),
                    mac: [2, 0, 0, 0, 0, 3],
                },
            }],
        );
        // A peer whose PodCIDR is outside the configured cluster CIDRs: the stack masquerades it.
        node.peers.insert("n4".into(), vec![native("10.99.4.0/24")]);
        assert_eq!(
            peer_pod_cidrs(&node),
            [net("10.99.4.0/24"), net("10.244.2.0/24"), net("fd00:244:2::/64")]
        );
        node.masquerade = Some(vec![net("10.244.0.0/16"), net("fd00:244::/32")]);
        assert_eq!(peer_pod_cidrs(&node), [net("10.244.2.0/24"), net("fd00:244:2::/64")]);
        assert!(peer_pod_cidrs(&NodeNetworkingDetails::default()).is_empty());
    }
}
