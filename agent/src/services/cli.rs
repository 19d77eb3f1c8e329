//! `ferrynet-agent services` and `ferrynet-agent explain`: how this node translates Services,
//! read from the pinned maps themselves, so they work while the agent is down (like
//! `cilium bpf lb list`). The agent's notes add names and the reasons endpoints are excluded.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError, lpm_trie::LpmTrie};
use ferrynet_common::*;

use super::{
    maps::ip_of,
    notes,
    table::{Backend, BackendState, Frontend, PortEntry, Protocol, Scope},
};
use crate::datapath::PinLayout;

/// Why the maps could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading pinned map {path} (is service translation on, and is --bpf-pin-path right?): {source}")]
    Map { path: String, source: MapError },
    #[error("{0:?} is not an address:port, [v6]:port, with an optional /tcp or /udp")]
    Target(String),
}

/// One frontend as the maps hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub frontend: Frontend,
    pub id: u32,
    pub backends: Vec<(Backend, BackendState)>,
    pub affinity_timeout_s: Option<u32>,
    /// The size of its Maglev table, when new flows pick their backend by Maglev.
    pub maglev: Option<u32>,
    pub notes: Option<PortEntry>,
}

struct Pinned {
    services4: HashMap<MapData, ServiceKey4, ServiceValue>,
    services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, BackendValue>,
    affinity4: HashMap<MapData, AffinityKey4, AffinityValue>,
    affinity6: HashMap<MapData, AffinityKey6, AffinityValue>,
    cidrs4: LpmTrie<MapData, u32, u8>,
    cidrs6: LpmTrie<MapData, [u32; 4], u8>,
    node_addrs4: HashMap<MapData, u32, u8>,
    node_addrs6: HashMap<MapData, [u32; 4], u8>,
}

fn open<T: TryFrom<Map, Error = MapError>>(pins: &PinLayout, name: &str) -> Result<T, CliError> {
    let path = pins.map(name);
    let wrap = |source| CliError::Map {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(wrap)?;
    T::try_from(Map::from_map_data(data).map_err(wrap)?).map_err(wrap)
}

impl Pinned {
    fn open(pin_root: &Path) -> Result<Self, CliError> {
        let pins = PinLayout::new(pin_root);
        Ok(Self {
            services4: open(&pins, SERVICES4_MAP)?,
            services6: open(&pins, SERVICES6_MAP)?,
            slots: open(&pins, SERVICE_SLOTS_MAP)?,
            backends: open(&pins, BACKENDS_MAP)?,
            affinity4: open(&pins, AFFINITY4_MAP)?,
            affinity6: open(&pins, AFFINITY6_MAP)?,
            cidrs4: open(&pins, SERVICE_CIDRS4_MAP)?,
            cidrs6: open(&pins, SERVICE_CIDRS6_MAP)?,
            node_addrs4: open(&pins, NODE_ADDRS4_MAP)?,
            node_addrs6: open(&pins, NODE_ADDRS6_MAP)?,
        })
    }

    /// The entry of `scope` for `addr`:`port`: its own, or a NodePort's (keyed by the unspecified
    /// address) when `addr` is one of the addresses NodePorts answer on. With the frontend it is.
    fn entry(&self, addr: IpAddr, port: u16, protocol: Protocol, scope: Scope) -> Option<(Frontend, ServiceValue)> {
        let get = |addr: IpAddr| {
            let value = match addr {
                IpAddr::V4(v4) => self.services4.get(
                    &ServiceKey4 {
                        addr: addr4(v4.octets()),
                        port: ferrynet_common::port(port),
                        proto: protocol.number(),
                        scope: scope.number(),
                    },
                    0,
                ),
                IpAddr::V6(v6) => self.services6.get(
                    &ServiceKey6 {
                        addr: addr6(v6.octets()),
                        port: ferrynet_common::port(port),
                        proto: protocol.number(),
                        scope: scope.number(),
                    },
                    0,
                ),
            };
            let frontend = Frontend {
                addr,
                port,
                protocol,
                scope,
            };
            value.ok().map(|v| (frontend, v))
        };
        if let Some(found) = get(addr) {
            return Some(found);
        }
        let (node_address, any) = match addr {
            IpAddr::V4(v4) => (
                self.node_addrs4.get(&addr4(v4.octets()), 0).is_ok(),
                IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            ),
            IpAddr::V6(v6) => (
                self.node_addrs6.get(&addr6(v6.octets()), 0).is_ok(),
                IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
            ),
        };
        if node_address { get(any) } else { None }
    }

    fn backend(&self, id: u32) -> Option<(Backend, BackendState)> {
        let value = self.backends.get(&id, 0).ok()?;
        Some((
            Backend {
                addr: ip_of(value.addr, value.family),
                port: u16::from_be(value.port),
                protocol: Protocol::from_number(value.proto)?,
            },
            if value.state == BACKEND_TERMINATING {
                BackendState::Terminating
            } else {
                BackendState::Active
            },
        ))
    }

    fn listed(&self, frontend: Frontend, value: &ServiceValue, notes_reader: &mut notes::NotesReader) -> Listed {
        let backends = (0..u32::from(value.count))
            .filter_map(|slot| {
                self.slots
                    .get(
                        &SlotKey {
                            service: value.id,
                            slot,
                        },
                        0,
                    )
                    .ok()
            })
            .filter_map(|id| self.backend(id))
            .collect();
        Listed {
            frontend,
            id: value.id,
            backends,
            affinity_timeout_s: (value.flags & SERVICE_F_AFFINITY != 0).then_some(value.affinity_timeout_s),
            maglev: (value.maglev_size != 0).then_some(value.maglev_size),
            notes: notes_reader.get(value.id),
        }
    }
}

/// Every frontend the maps hold, in order.
pub fn list(pin_root: &Path, state_dir: &Path) -> Result<Vec<Listed>, CliError> {
    let maps = Pinned::open(pin_root)?;
    let mut notes_reader = notes::NotesReader::new(notes::dir(state_dir));
    let mut out = Vec::new();
    for (key, value) in maps.services4.iter().filter_map(Result::ok) {
        if let Some(protocol) = Protocol::from_number(key.proto) {
            let frontend = Frontend {
                addr: IpAddr::from(key.addr.to_ne_bytes()),
                port: u16::from_be(key.port),
                protocol,
                scope: Scope::from_number(key.scope),
            };
            out.push(maps.listed(frontend, &value, &mut notes_reader));
        }
    }
    for (key, value) in maps.services6.iter().filter_map(Result::ok) {
        if let Some(protocol) = Protocol::from_number(key.proto) {
            let frontend = Frontend {
                addr: IpAddr::from(octets6(key.addr)),
                port: u16::from_be(key.port),
                protocol,
                scope: Scope::from_number(key.scope),
            };
            out.push(maps.listed(frontend, &value, &mut notes_reader));
        }
    }
    out.sort_by_key(|l| l.frontend);
    Ok(out)
}

fn service_name(listed: &Listed) -> String {
    listed.notes.as_ref().map_or("(no notes)".to_string(), |n| {
        if n.port_name.is_empty() {
            n.service.to_string()
        } else {
            format!("{}:{}", n.service, n.port_name)
        }
    })
}

/// The table `ferrynet-agent services` prints.
pub fn render_list(listed: &[Listed]) -> String {
    let mut out = format!("{:<30} {:<8} {:<34} {}\n", "FRONTEND", "ID", "SERVICE", "BACKENDS");
    for l in listed {
        let backends = if l.backends.is_empty() {
            "(none: refused)".to_string()
        } else {
            l.backends
                .iter()
                .map(|(b, s)| match s {
                    BackendState::Active => b.to_string(),
                    BackendState::Terminating => format!("{b} (terminating)"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        out += &format!(
            "{:<30} {:<8} {:<34} {backends}\n",
            l.frontend.to_string(),
            l.id,
            service_name(l)
        );
    }
    out
}

/// What `explain` is asked about: `addr:port`, `[v6]:port`, with `/tcp` (default) or `/udp`.
pub fn parse_target(target: &str) -> Result<(IpAddr, u16, Protocol), CliError> {
    let (addr, protocol) = match target.rsplit_once('/') {
        Some((a, "tcp")) => (a, Protocol::Tcp),
        Some((a, "udp")) => (a, Protocol::Udp),
        Some(_) => return Err(CliError::Target(target.into())),
        None => (target, Protocol::Tcp),
    };
    let socket: SocketAddr = addr.parse().map_err(|_| CliError::Target(target.into()))?;
    Ok((socket.ip(), socket.port(), protocol))
}

/// How this node translates `target` for a client at `from` (pure over what it was given).
pub fn explain(pin_root: &Path, state_dir: &Path, target: &str, from: Option<IpAddr>) -> Result<String, CliError> {
    let (addr, port, protocol) = parse_target(target)?;
    let maps = Pinned::open(pin_root)?;
    let mut notes_reader = notes::NotesReader::new(notes::dir(state_dir));
    // As asked (the entries of a NodePort are keyed by the unspecified address).
    let asked = Frontend {
        addr,
        port,
        protocol,
        scope: Scope::Internal,
    };
    let internal = maps.entry(addr, port, protocol, Scope::Internal);
    let external = maps.entry(addr, port, protocol, Scope::External);
    let mut out = String::new();
    let Some((frontend, value)) = internal else {
        let in_cidrs = match addr {
            IpAddr::V4(v4) => maps
                .cidrs4
                .get(&aya::maps::lpm_trie::Key::new(32, addr4(v4.octets())), 0)
                .is_ok(),
            IpAddr::V6(v6) => maps
                .cidrs6
                .get(&aya::maps::lpm_trie::Key::new(128, addr6(v6.octets())), 0)
                .is_ok(),
        };
        out += &format!("{asked}: no Service on this node has it.\n");
        out += if in_cidrs {
            "It is inside the cluster's Service CIDRs (--service-cidrs, or the API's ServiceCIDR objects), so it is refused: ECONNREFUSED at connect, an ICMP error or a TCP reset per packet.\n"
        } else {
            "Traffic to it is not translated.\n"
        };
        return Ok(out);
    };
    let listed = maps.listed(frontend, &value, &mut notes_reader);
    let node_port = if frontend.addr.is_unspecified() {
        " (a NodePort on this node's addresses)"
    } else {
        ""
    };
    out += &format!(
        "{asked} is service {}{node_port} (frontend id {})\n",
        service_name(&listed),
        listed.id
    );
    out += &describe(&listed, "  ");
    // What arrives from outside (NodePorts, externalIPs, load balancer IPs) has an entry of
    // its own: the external traffic policy, source ranges, Maglev.
    if let Some((ext_frontend, ext_value)) = external {
        let ext = maps.listed(ext_frontend, &ext_value, &mut notes_reader);
        out += &format!("  from outside the cluster (frontend id {}):\n", ext.id);
        out += &describe(&ext, "    ");
    }
    if let Some(client) = from {
        let held = match client {
            IpAddr::V4(v4) => maps
                .affinity4
                .get(
                    &AffinityKey4 {
                        service: listed.id,
                        client: addr4(v4.octets()),
                        netns_cookie: 0,
                    },
                    0,
                )
                .ok(),
            IpAddr::V6(v6) => maps
                .affinity6
                .get(
                    &AffinityKey6 {
                        service: listed.id,
                        client: addr6(v6.octets()),
                        _pad: 0,
                        netns_cookie: 0,
                    },
                    0,
                )
                .ok(),
        };
        match (listed.affinity_timeout_s, held.and_then(|h| maps.backend(h.backend))) {
            (Some(_), Some((b, _))) => out += &format!("  from {client}: sticks to {b} (affinity)\n"),
            (Some(_), None) => {
                out += &format!("  from {client}: no affinity yet; the next connection picks at random and sticks\n")
            }
            (None, _) if listed.backends.is_empty() => out += &format!("  from {client}: refused\n"),
            (None, _) => {
                out += &format!(
                    "  from {client}: each new connection picks one of the {} backends at random\n",
                    listed.backends.len()
                )
            }
        }
    }
    Ok(out)
}

/// One entry's policy and backends, each line indented by `indent`.
fn describe(listed: &Listed, indent: &str) -> String {
    let mut out = String::new();
    if let Some(notes) = &listed.notes {
        out += &format!("{indent}traffic policy: {}\n", notes.notes.traffic_policy);
        if let Some(topology) = &notes.notes.topology {
            out += &format!("{indent}topology hints in force: {topology}\n");
        }
    }
    let per_connection = match listed.maglev {
        Some(size) => {
            out += &format!(
                "{indent}load balancing: Maglev, a table of {size} entries (a flow's backend is the same on every node)\n"
            );
            "by Maglev"
        }
        None => "at random",
    };
    match listed.affinity_timeout_s {
        Some(t) => out += &format!("{indent}session affinity: ClientIP, {t} s\n"),
        None => out += &format!("{indent}session affinity: none (a backend {per_connection} per connection)\n"),
    }
    if listed.backends.is_empty() {
        out += &format!(
            "{indent}backends: none, so connections are refused at once (ECONNREFUSED, an ICMP error or a TCP reset)\n"
        );
    } else {
        out += &format!("{indent}backends ({}):\n", listed.backends.len());
        for (b, s) in &listed.backends {
            let state = match s {
                BackendState::Active => "ready",
                BackendState::Terminating => "serving, terminating (no ready endpoint is left)",
            };
            out += &format!("{indent}  {b:<28} {state}\n");
        }
    }
    if let Some(notes) = &listed.notes {
        for (b, why) in &notes.notes.excluded {
            out += &format!("{indent}  {b:<28} excluded: {}\n", why.describe());
        }
    }
    out
}

/// Frontends grouped by service, for summaries.
pub fn by_service(listed: &[Listed]) -> BTreeMap<String, Vec<&Listed>> {
    let mut out: BTreeMap<String, Vec<&Listed>> = BTreeMap::new();
    for l in listed {
        out.entry(service_name(l)).or_default().push(l);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_an_optional_protocol() {
        assert_eq!(
            parse_target("10.96.0.10:80").unwrap(),
            ("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp)
        );
        assert_eq!(
            parse_target("[fd00:96::a]:53/udp").unwrap(),
            ("fd00:96::a".parse().unwrap(), 53, Protocol::Udp)
        );
        for bad in ["10.96.0.10", "10.96.0.10:80/sctp", "nope:80", "[fd00::1]"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
