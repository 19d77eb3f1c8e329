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

    /// The alias stamped on the host veth, `ferrynet/<network>/<container ID>/<ifname>`. GC
    /// recognises the network's veths by its prefix, DEL its own veth by the whole alias.
    ///
    /// The spec bounds neither network names nor container IDs, the kernel bounds aliases: a part
    /// that would make the alias too long is replaced by a digest of it. That keeps the alias
    /// deterministic (DEL and GC compute the same one) and distinct per attachment.
    pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
        let prefix = Self::alias_prefix(network);
        let alias = format!("{prefix}{container_id}/{ifname}");
        if alias.len() <= MAX_ALIAS_LEN {
            alias
        } else {
            format!("{prefix}{}/{ifname}", digest_name(container_id))
        }
    }

    pub fn alias_prefix(network: &str) -> String {
        if network.len() <= MAX_ALIAS_NETWORK_LEN {
            format!("ferrynet/{network}/")
        } else {
            format!("ferrynet/{}/", digest_name(network))
        }
    }
}

/// The longest alias the kernel takes: it keeps 255 bytes, and the NUL that netlink sends after
/// the string counts against them.
pub const MAX_ALIAS_LEN: usize = 254;
/// Network names longer than this appear in aliases as a digest (so a prefix never fills the
/// alias by itself).
const MAX_ALIAS_NETWORK_LEN: usize = 128;

/// `sha256-` and the first 128 bits of the name's SHA-256, in hex.
fn digest_name(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!(
        "sha256-{}",
        digest[..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
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
    fn alias_fits_the_kernel_limit_and_stays_distinct() {
        let short = HostVeth::alias("net", "abc", "eth0");
        assert_eq!(short, "ferrynet/net/abc/eth0");
        for (network, cid) in [
            ("net".to_string(), "c".repeat(238)),
            ("net".to_string(), "c".repeat(10_000)),
            ("n".repeat(176), "c".repeat(64)),
            ("n".repeat(5_000), "c".repeat(5_000)),
        ] {
            let alias = HostVeth::alias(&network, &cid, "fifteen-chars-x");
            assert!(alias.len() <= MAX_ALIAS_LEN, "{} bytes", alias.len());
            assert!(alias.starts_with(&HostVeth::alias_prefix(&network)));
            assert!(alias.ends_with("/fifteen-chars-x"));
            let other = HostVeth::alias(&network, &format!("{cid}d"), "fifteen-chars-x");
            assert_ne!(alias, other, "two containers, one alias");
            assert_eq!(alias, HostVeth::alias(&network, &cid, "fifteen-chars-x"));
        }
        // A long network name is digested in the prefix too, so GC's prefix still tells networks
        // apart.
        assert_ne!(
            HostVeth::alias_prefix(&"n".repeat(300)),
            HostVeth::alias_prefix(&"m".repeat(300))
        );
    }
}
