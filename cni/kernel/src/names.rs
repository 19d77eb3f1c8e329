//! Deterministic host-side identities of an attachment, derived from (container ID, ifname) alone,
//! so that DEL can find everything even when the netns and prevResult are gone, and the agent can
//! tell a live pod's veth from a vanished one's.
use sha2::{Digest, Sha256};

/// Prefix of every host-side veth ferrynet creates.
pub const HOST_VETH_PREFIX: &str = "fnv";
/// Pods' default gateway: link-local, answered by a permanent neighbour entry (Calico's model).
pub const GATEWAY_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The host side of one attachment's veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVeth {
    /// `fnv` + 12 hex digits: 15 bytes, the kernel's limit.
    pub name: String,
    /// Locally administered unicast MAC, stable for the attachment.
    pub mac: [u8; 6],
    /// The pod side's MAC, chosen the same way (so ADD knows it without asking the kernel).
    pub pod_mac: [u8; 6],
}

impl HostVeth {
    /// The host veth of attachment (`container_id`, `ifname`).
    pub fn new(container_id: &str, ifname: &str) -> Self {
        let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
        let name = format!(
            "{HOST_VETH_PREFIX}{}",
            digest[..6].iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let mac_from = |bytes: &[u8]| {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(bytes);
            mac[0] = (mac[0] & 0xfc) | 0x02;
            mac
        };
        Self {
            name,
            mac: mac_from(&digest[6..12]),
            pod_mac: mac_from(&digest[12..18]),
        }
    }

    /// The alias stamped on the host veth. GC recognises the network's veths by its prefix.
    pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
        let alias = format!("{}{container_id}/{ifname}", Self::alias_prefix(network));
        alias.chars().take(255).collect()
    }

    pub fn alias_prefix(network: &str) -> String {
        format!("ferrynet/{network}/")
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_short_and_distinct() {
        let a = HostVeth::new("abc", "eth0");
        let b = HostVeth::new("abc", "eth1");
        assert_eq!(a, HostVeth::new("abc", "eth0"));
        assert_ne!(a.name, b.name);
        assert_eq!(a.name.len(), 15);
        assert!(a.name.starts_with(HOST_VETH_PREFIX));
        // Unicast (bit 0 clear) and locally administered (bit 1 set).
        assert_eq!(a.mac[0] & 0x03, 0x02);
        assert_eq!(a.pod_mac[0] & 0x03, 0x02);
        assert_ne!(a.mac, a.pod_mac);
    }

    #[test]
    fn alias_fits_the_kernel_limit() {
        let long = "c".repeat(250);
        assert!(HostVeth::alias("net", &long, "eth0").len() <= 255);
        assert!(HostVeth::alias("net", &long, "eth0").starts_with("ferrynet/net/"));
    }
}
