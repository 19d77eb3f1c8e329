//! The `ipam` section of a network config, in host-local's format so operators can move across:
//!
//! ```json
//! "ipam": {
//!   "type": "ferrynet-ipam",
//!   "ranges": [
//!     [{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.10", "rangeEnd": "10.244.1.250", "gateway": "10.244.1.1"}],
//!     [{"subnet": "fd00:10:244:1::/64"}]
//!   ],
//!   "routes": [{"dst": "0.0.0.0/0"}],
//!   "dataDir": "/var/lib/ferrynet/ipam",
//!   "lockTimeoutMs": 20000
//! }
//! ```
//!
//! Each inner list is a range set, and an attachment gets one address from every range set. Dual
//! stack is therefore one IPv4 set and one IPv6 set. host-local's older flat form (`subnet`,
//! `rangeStart`, `rangeEnd` and `gateway` directly in the section) is accepted as a single set.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::error::{IpamError, Result};

/// Where allocations live unless `dataDir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ferrynet/ipam";

/// The most addresses tracked per range. Larger ranges (an IPv6 /64, an IPv4 /8) allocate from
/// their first `MAX_RANGE_ADDRESSES` addresses after `rangeStart`: a million pods per node is far
/// beyond any kubelet's `maxPods`, and it keeps each range's index at 128 KiB.
pub const MAX_RANGE_ADDRESSES: u64 = 1 << 20;

/// The most `routes` an `ipam` section may list. Each is a route in every pod's namespace, written
/// on every ADD: a thousand already means the config is generated wrongly, not a real network.
pub const MAX_ROUTES: usize = 1024;

/// Blocks no pod address may come from: "this network", loopback, link-local (the pods' gateways
/// are 169.254.1.1 and fe80::1), multicast and broadcast. A range touching one is refused.
pub const SPECIAL_PURPOSE: [&str; 9] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fe80::/10",
    "ff00::/8",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpamConfig {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    range_start: Option<String>,
    #[serde(default)]
    range_end: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    lock_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: String,
    #[serde(default)]
    range_start: Option<String>,
    #[serde(default)]
    range_end: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawRoute {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
}

/// A validated `ipam` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConfig {
    pub range_sets: Vec<RangeSet>,
    pub routes: Vec<IpamRoute>,
    pub data_dir: PathBuf,
    /// How long to wait for another process's store lock before answering "try again later".
    pub lock_timeout: std::time::Duration,
}

/// Ranges of one address family; an attachment gets exactly one address from the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet {
    pub ranges: Vec<Range>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpamRoute {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// One contiguous block of allocatable addresses inside a subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    pub subnet: IpNet,
    /// First address handed out.
    pub start: IpAddr,
    /// Last address handed out (already capped to `MAX_RANGE_ADDRESSES` past `start`).
    pub end: IpAddr,
    /// Never handed out. Defaults to the subnet's first host address, as in host-local.
    pub gateway: IpAddr,
}

impl IpamConfig {
    /// Parses and validates an `ipam` section. Structural problems (wrong JSON types) and
    /// semantic ones (a range outside its subnet) are both reported as invalid configuration.
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        let raw: RawIpamConfig =
            serde_json::from_value(value.clone()).map_err(|e| IpamError::InvalidConfig(e.to_string()))?;
        raw.validate()
    }
}

impl RawIpamConfig {
    fn validate(self) -> Result<IpamConfig> {
        let _ = self.kind;
        let mut raw_sets = self.ranges;
        if let Some(subnet) = self.subnet {
            if !raw_sets.is_empty() {
                return Err(IpamError::InvalidConfig(
                    "use either `ranges` or the flat `subnet` form, not both".into(),
                ));
            }
            raw_sets.push(vec![RawRange {
                subnet,
                range_start: self.range_start,
                range_end: self.range_end,
                gateway: self.gateway,
            }]);
        }
        if raw_sets.is_empty() {
            return Err(IpamError::InvalidConfig("no `ranges` configured".into()));
        }

        let mut range_sets = Vec::with_capacity(raw_sets.len());
        for (set_index, raw_set) in raw_sets.into_iter().enumerate() {
            if raw_set.is_empty() {
                return Err(IpamError::InvalidConfig(format!("range set {set_index} is empty")));
            }
            let ranges = raw_set
                .into_iter()
                .map(RawRange::validate)
                .collect::<Result<Vec<_>>>()?;
            let family = ranges[0].is_ipv4();
            if ranges.iter().any(|r| r.is_ipv4() != family) {
                return Err(IpamError::InvalidConfig(format!(
                    "range set {set_index} mixes IPv4 and IPv6"
                )));
            }
            range_sets.push(RangeSet { ranges });
        }

        // Dual stack is one set per family; two sets of one family would give a pod two
        // addresses of that family, which neither Kubernetes nor our routing expects.
        let v4_sets = range_sets.iter().filter(|s| s.is_ipv4()).count();
        if v4_sets > 1 || range_sets.len() - v4_sets > 1 {
            return Err(IpamError::InvalidConfig(
                "at most one IPv4 and one IPv6 range set are allowed".into(),
            ));
        }
        let all: Vec<&Range> = range_sets.iter().flat_map(|s| &s.ranges).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                if a.overlaps(b) {
                    return Err(IpamError::InvalidConfig(format!("ranges {a} and {b} overlap")));
                }
            }
        }

        if self.routes.len() > MAX_ROUTES {
            return Err(IpamError::InvalidConfig(format!(
                "{} routes configured; at most {MAX_ROUTES} are allowed",
                self.routes.len()
            )));
        }
        let routes = self
            .routes
            .into_iter()
            .map(|r| {
                let dst = parse_net(&r.dst, "route dst")?;
                // The kernel refuses a destination with host bits; say so here, as code 7,
                // rather than fail half-way through wiring the pod.
                if dst.trunc() != dst {
                    return Err(IpamError::InvalidConfig(format!(
                        "route dst {dst} has host bits set (the network is {})",
                        dst.trunc()
                    )));
                }
                let gw = r.gw.as_deref().map(|g| parse_ip(g, "route gw")).transpose()?;
                if let Some(gw) = gw
                    && gw.is_ipv4() != dst.addr().is_ipv4()
                {
                    return Err(IpamError::InvalidConfig(format!(
                        "route to {dst} has a gateway of the other family"
                    )));
                }
                Ok(IpamRoute { dst, gw })
            })
            .collect::<Result<Vec<_>>>()?;

        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if !data_dir.is_absolute() {
            return Err(IpamError::InvalidConfig(format!(
                "dataDir {} must be an absolute path",
                data_dir.display()
            )));
        }
        // `..` would let a config name a store outside the directory it appears to name.
        if data_dir.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(IpamError::InvalidConfig(format!(
                "dataDir {} must not contain `..`",
                data_dir.display()
            )));
        }
        let lock_timeout = std::time::Duration::from_millis(self.lock_timeout_ms.unwrap_or(20_000));
        Ok(IpamConfig {
            range_sets,
            routes,
            data_dir,
            lock_timeout,
        })
    }
}

impl RawRange {
    fn validate(self) -> Result<Range> {
        let with_host = parse_net(&self.subnet, "subnet")?;
        let subnet = with_host.trunc();
        let first = subnet.network();
        let last = subnet.broadcast();
        // IPv4 subnets lose their network and broadcast addresses; /31 and /32 have neither
        // (RFC 3021). IPv6 loses only the subnet-router anycast address (the network address).
        let (lowest, highest) = match subnet {
            IpNet::V4(n) if n.prefix_len() >= 31 => (first, last),
            IpNet::V4(_) => (add(first, 1), add(last, -1)),
            IpNet::V6(n) if n.prefix_len() == 128 => (first, last),
            IpNet::V6(_) => (add(first, 1), last),
        };
        let gateway = match self.gateway.as_deref() {
            Some(g) => parse_ip(g, "gateway")?,
            None => add(first, 1).min(last),
        };
        if !subnet.contains(&gateway) {
            return Err(IpamError::InvalidConfig(format!(
                "gateway {gateway} is outside subnet {subnet}"
            )));
        }
        let start = match self.range_start.as_deref() {
            Some(s) => parse_ip(s, "rangeStart")?,
            None => lowest,
        };
        let end = match self.range_end.as_deref() {
            Some(s) => parse_ip(s, "rangeEnd")?,
            None => highest,
        };
        for (name, ip) in [("rangeStart", start), ("rangeEnd", end)] {
            if !subnet.contains(&ip) {
                return Err(IpamError::InvalidConfig(format!(
                    "{name} {ip} is outside subnet {subnet}"
                )));
            }
            if ip < lowest || ip > highest {
                return Err(IpamError::InvalidConfig(format!(
                    "{name} {ip} is the network or broadcast address of {subnet}"
                )));
            }
        }
        if start > end {
            return Err(IpamError::InvalidConfig(format!(
                "rangeStart {start} is after rangeEnd {end}"
            )));
        }
        let span = distance(start, end);
        let end = if span >= MAX_RANGE_ADDRESSES {
            add(start, (MAX_RANGE_ADDRESSES - 1) as i128)
        } else {
            end
        };
        if let Some(block) = special_purpose_overlap(start, end) {
            return Err(IpamError::InvalidConfig(format!(
                "range {start}-{end} of subnet {subnet} overlaps the special-purpose block {block}: pods cannot use those addresses"
            )));
        }
        Ok(Range {
            subnet,
            start,
            end,
            gateway,
        })
    }
}

impl RangeSet {
    pub fn is_ipv4(&self) -> bool {
        self.ranges[0].is_ipv4()
    }

    /// The range that contains `ip`, if any.
    pub fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.ranges.iter().find(|r| r.contains(ip))
    }
}

impl std::fmt::Display for RangeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.ranges.iter().map(ToString::to_string).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

impl Range {
    pub fn is_ipv4(&self) -> bool {
        self.start.is_ipv4()
    }

    /// Number of addresses between `start` and `end`, inclusive.
    pub fn len(&self) -> u64 {
        distance(self.start, self.end) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4() && self.start <= ip && ip <= self.end
    }

    /// Position of `ip` inside the range.
    pub fn offset_of(&self, ip: IpAddr) -> Option<u64> {
        self.contains(ip).then(|| distance(self.start, ip))
    }

    /// The address at `offset` (which must be below `len()`).
    pub fn addr_at(&self, offset: u64) -> IpAddr {
        add(self.start, i128::from(offset))
    }

    /// Addresses inside the range that are never handed out.
    pub fn is_reserved(&self, ip: IpAddr) -> bool {
        ip == self.gateway
    }

    /// The address with its subnet's prefix length, as a CNI result reports it.
    pub fn with_prefix(&self, ip: IpAddr) -> IpNet {
        IpNet::new(ip, self.subnet.prefix_len()).expect("prefix length comes from a valid subnet")
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.is_ipv4() == other.is_ipv4() && self.start <= other.end && other.start <= self.end
    }

    /// Stable text that names the range in the store (file names, logs).
    pub fn key(&self) -> String {
        format!("{}-{}", self.start, self.end).replace(':', "_")
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}-{})", self.subnet, self.start, self.end)
    }
}

/// The special-purpose block that the addresses `start..=end` touch, if any.
fn special_purpose_overlap(start: IpAddr, end: IpAddr) -> Option<IpNet> {
    SPECIAL_PURPOSE
        .iter()
        .map(|b| b.parse::<IpNet>().expect("valid block"))
        .find(|block| block.addr().is_ipv4() == start.is_ipv4() && block.network() <= end && start <= block.broadcast())
}

fn parse_net(s: &str, what: &str) -> Result<IpNet> {
    IpNet::from_str(s).map_err(|_| IpamError::InvalidConfig(format!("{what} {s:?} is not a CIDR")))
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr> {
    IpAddr::from_str(s).map_err(|_| IpamError::InvalidConfig(format!("{what} {s:?} is not an IP address")))
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// `ip + delta`, staying inside the address family (saturating at its ends).
fn add(ip: IpAddr, delta: i128) -> IpAddr {
    let value = to_u128(ip);
    let moved = if delta >= 0 {
        value.saturating_add(delta as u128)
    } else {
        value.saturating_sub(delta.unsigned_abs())
    };
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(moved.min(u128::from(u32::MAX)) as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(moved)),
    }
}

/// `b - a` for `a <= b` of one family, saturating at `u64::MAX`.
fn distance(a: IpAddr, b: IpAddr) -> u64 {
    u64::try_from(to_u128(b) - to_u128(a)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<IpamConfig> {
        IpamConfig::from_value(&v)
    }

    #[test]
    fn defaults_follow_host_local() {
        let c = parse(json!({"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.1.2.0/24"}]]})).unwrap();
        let r = c.range_sets[0].ranges[0];
        assert_eq!(r.start.to_string(), "10.1.2.1");
        assert_eq!(r.end.to_string(), "10.1.2.254");
        assert_eq!(r.gateway.to_string(), "10.1.2.1");
        assert!(r.is_reserved("10.1.2.1".parse().unwrap()));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn subnet_with_host_bits_is_truncated() {
        let c = parse(json!({"ranges": [[{"subnet": "10.1.2.77/24"}]]})).unwrap();
        assert_eq!(c.range_sets[0].ranges[0].subnet.to_string(), "10.1.2.0/24");
    }

    #[test]
    fn flat_legacy_form_is_one_range_set() {
        let c = parse(
            json!({"subnet": "10.9.0.0/16", "rangeStart": "10.9.1.0", "rangeEnd": "10.9.1.255",
            "gateway": "10.9.0.1", "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "/tmp/x"}),
        )
        .unwrap();
        let r = c.range_sets[0].ranges[0];
        assert_eq!(
            (r.start.to_string(), r.end.to_string()),
            ("10.9.1.0".into(), "10.9.1.255".into())
        );
        assert_eq!(
            c.routes,
            vec![IpamRoute {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None
            }]
        );
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn dual_stack_and_ipv6_defaults() {
        let c = parse(json!({"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/64"}]]})).unwrap();
        assert_eq!(c.range_sets.len(), 2);
        let v6 = c.range_sets[1].ranges[0];
        assert_eq!(v6.start.to_string(), "fd00::1");
        // A /64 is capped to MAX_RANGE_ADDRESSES addresses after rangeStart.
        assert_eq!(v6.len(), MAX_RANGE_ADDRESSES);
        assert_eq!(v6.gateway.to_string(), "fd00::1");
    }

    #[test]
    fn point_to_point_subnets_use_every_address() {
        let c = parse(json!({"ranges": [[{"subnet": "10.0.0.4/31", "gateway": "10.0.0.4"}]]})).unwrap();
        let r = c.range_sets[0].ranges[0];
        assert_eq!(
            (r.start.to_string(), r.end.to_string()),
            ("10.0.0.4".into(), "10.0.0.5".into())
        );
    }

    #[test]
    fn rejects_bad_ranges_with_clear_messages() {
        let cases = [
            (json!({"ranges": []}), "no `ranges`"),
            (json!({"ranges": [[]]}), "is empty"),
            (json!({"ranges": [[{"subnet": "banana"}]]}), "not a CIDR"),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.1.5"}]]}),
                "outside subnet",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24", "rangeEnd": "10.0.0.255"}]]}),
                "broadcast",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.0"}]]}),
                "network",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.3"}]]}),
                "after",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24", "gateway": "10.0.9.1"}]]}),
                "gateway",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}]]}),
                "mixes",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.0.1.0/24"}]]}),
                "at most one",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "10.0.0.128/25"}]]}),
                "overlap",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}]], "dataDir": "relative"}),
                "absolute",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}]], "routes": [{"dst": "::/0", "gw": "10.0.0.1"}]}),
                "other family",
            ),
            (json!({"ranges": "nope"}), "invalid type"),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}]], "routes": [{"dst": "10.1.2.3/24"}]}),
                "host bits",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}]], "dataDir": "/var/lib/../../etc"}),
                "`..`",
            ),
        ];
        for (cfg, needle) in cases {
            let err = parse(cfg.clone()).expect_err(&cfg.to_string()).to_string();
            assert!(err.contains(needle), "{cfg}: {err}");
        }
    }

    #[test]
    fn special_purpose_ranges_are_refused() {
        for subnet in [
            "0.0.0.0/8",
            "0.0.0.0/0",
            "127.0.0.0/24",
            "169.254.1.0/24",
            "169.254.0.0/16",
            "224.0.0.0/24",
            "239.1.0.0/16",
            "255.255.255.255/32",
            "255.255.255.254/31",
            "::/128",
            "::1/128",
            "::/64",
            "fe80::/64",
            "ff02::/64",
        ] {
            let err = parse(json!({"ranges": [[{"subnet": subnet}]]}))
                .expect_err(subnet)
                .to_string();
            assert!(err.contains("special-purpose"), "{subnet}: {err}");
        }
        // Neighbours of the blocks are fine, and so is a subnet whose allocatable part (capped at
        // MAX_RANGE_ADDRESSES from its start) stays clear of them.
        for subnet in [
            "1.0.0.0/24",
            "126.255.255.0/24",
            "169.253.0.0/16",
            "223.255.0.0/16",
            "fd00::/64",
            "fe00::/64",
            "2001:db8::/32",
        ] {
            parse(json!({"ranges": [[{"subnet": subnet}]]})).unwrap_or_else(|e| panic!("{subnet}: {e}"));
        }
    }

    #[test]
    fn at_most_max_routes_are_allowed() {
        let routes = |n: usize| -> Vec<serde_json::Value> {
            (0..n)
                .map(|i| json!({"dst": format!("10.{}.{}.0/24", 100 + i / 256, i % 256)}))
                .collect()
        };
        let ok = parse(json!({"ranges": [[{"subnet": "10.0.0.0/24"}]], "routes": routes(MAX_ROUTES)})).unwrap();
        assert_eq!(ok.routes.len(), MAX_ROUTES);
        let err = parse(json!({"ranges": [[{"subnet": "10.0.0.0/24"}]], "routes": routes(MAX_ROUTES + 1)}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 1024"), "{err}");
    }

    #[test]
    fn offsets_round_trip() {
        let c = parse(json!({"ranges": [[{"subnet": "10.0.0.0/16"}]]})).unwrap();
        let r = c.range_sets[0].ranges[0];
        assert_eq!(r.len(), 65534);
        let ip: IpAddr = "10.0.255.254".parse().unwrap();
        let off = r.offset_of(ip).unwrap();
        assert_eq!(r.addr_at(off), ip);
        assert!(r.offset_of("10.1.0.0".parse().unwrap()).is_none());
        assert!(r.offset_of("fd00::1".parse().unwrap()).is_none());
    }
}
