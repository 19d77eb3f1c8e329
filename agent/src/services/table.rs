//! From a Service and its EndpointSlices to the entries this node's datapath needs (pure,
//! unit-tested without root). Kubernetes' semantics, as kube-proxy implements them:
//!
//! - only ready endpoints; when none is ready anywhere, serving and terminating ones, so a rolling
//!   update drops nothing; a port with none at all is refused;
//! - `internalTrafficPolicy: Local`: only this node's endpoints (ready ones, else its serving
//!   terminating ones), none local means refused;
//! - topology hints (`forNodes`, `forZones`), used only when every ready endpoint has them and
//!   one is for this node (or zone); otherwise every endpoint;
//! - `sessionAffinity: ClientIP` with its `timeoutSeconds`;
//! - external frontends balance by Maglev when the agent's `--load-balancing` says so or the
//!   Service's `ferrynet.io/lb-algorithm` annotation does (`maglev` or `random`);
//! - headless and ExternalName Services, and Services another proxy owns (the
//!   `service.kubernetes.io/service-proxy-name` label), are not translated; SCTP ports are
//!   reported as unsupported and left out, never half-programmed.
//!
//! Hostile objects (no ClusterIP, garbage addresses, duplicate or out-of-range ports, endpoints of
//! the wrong family, slices whose Service does not exist) become warnings, never panics.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::objects::{Endpoint, EndpointSlice, Service, ServiceSpec};
use crate::warning::{Warning, WarningKind};

/// The label that hands a Service to a particular service proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;
/// The annotation that picks a Service's load balancing for external traffic: `maglev` or
/// `random`, overriding the agent's `--load-balancing`.
pub const LB_ALGORITHM_ANNOTATION: &str = "ferrynet.io/lb-algorithm";

/// A Service, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => ferrynet_common::PROTO_TCP,
            Self::Udp => ferrynet_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            ferrynet_common::PROTO_TCP => Some(Self::Tcp),
            ferrynet_common::PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// Which traffic an entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// From pods and the node's own processes (`internalTrafficPolicy`).
    Internal,
    /// From outside the cluster (`externalTrafficPolicy`).
    External,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Self::Internal => ferrynet_common::SCOPE_INTERNAL,
            Self::External => ferrynet_common::SCOPE_EXTERNAL,
        }
    }

    pub fn from_number(n: u8) -> Self {
        if n == ferrynet_common::SCOPE_EXTERNAL {
            Self::External
        } else {
            Self::Internal
        }
    }
}

/// An address, port and protocol traffic is sent to: one service port on one of its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol.as_str()),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol.as_str()),
        }
    }
}

/// A backend: one endpoint's address and resolved port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    Active,
    /// Serving but terminating: used only while no ready endpoint exists.
    Terminating,
}

/// Why an endpoint of the Service is not a backend here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exclusion {
    /// Neither ready nor serving.
    NotReady,
    /// Serving but terminating, and ready endpoints exist.
    Terminating,
    /// On another node, and the traffic policy is Local.
    OtherNode,
    /// Topology hints send this node's traffic elsewhere.
    Topology,
}

impl Exclusion {
    pub fn describe(self) -> &'static str {
        match self {
            Self::NotReady => "not ready",
            Self::Terminating => "terminating, and ready endpoints exist",
            Self::OtherNode => "on another node, and the traffic policy is Local",
            Self::Topology => "topology hints route this node's traffic to other endpoints",
        }
    }
}

/// Everything the datapath holds for one frontend, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortEntry {
    pub frontend: Frontend,
    pub service: ServiceRef,
    /// The service port's name ("" when unnamed).
    pub port_name: String,
    /// The backends connections are spread over (none: the port is refused). In JSON a list
    /// of `[backend, state]` pairs: an object's keys can only be strings.
    #[serde(with = "pairs")]
    pub backends: BTreeMap<Backend, BackendState>,
    /// Endpoints that exist but are not picked for new connections (terminating ones while ready
    /// ones exist, or excluded by policy): their established flows go on.
    pub retained: BTreeSet<Backend>,
    /// `sessionAffinity: ClientIP`'s timeout.
    pub affinity_timeout_s: Option<u32>,
    /// The backends (picked or retained) that run on this node: external traffic reaches them
    /// without SNAT.
    #[serde(default)]
    pub local_backends: BTreeSet<Backend>,
    /// `loadBalancerSourceRanges` of a load balancer IP's external entry: only these sources may
    /// open flows (an empty set: none may). None: any source.
    #[serde(default)]
    pub source_ranges: Option<BTreeSet<IpNet>>,
    /// Without backends, drop rather than refuse (`externalTrafficPolicy: Local`: a load
    /// balancer's health check steers around this node).
    #[serde(default)]
    pub drop_when_empty: bool,
    /// The size of the Maglev table new flows pick their backend from (external frontends of
    /// Services balanced by Maglev). None: at random.
    #[serde(default)]
    pub maglev: Option<u32>,
    pub notes: PortNotes,
}

impl PortEntry {
    /// A digest of what `explain` tells of this entry beyond the maps' contents: its Service,
    /// port name and notes. These can change with the maps left as they are (an endpoint that
    /// is not ready comes or goes, a port is renamed): the digest says when to rewrite the notes
    /// alone. Compared within one agent's run only (the hash is not stable across builds).
    pub fn notes_digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (&self.service, &self.port_name, &self.notes).hash(&mut hasher);
        hasher.finish()
    }
}

/// A map with structured keys, serialised as a list of `[key, value]` pairs.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(
        map: &BTreeMap<K, V>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>, K: Deserialize<'de> + Ord, V: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<K, V>, D::Error> {
        Ok(Vec::<(K, V)>::deserialize(deserializer)?.into_iter().collect())
    }
}

/// How the backends were chosen, for `ferrynet-agent explain`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortNotes {
    /// `Cluster` or `Local`.
    pub traffic_policy: String,
    /// The topology hints in force: `kubernetes.io/hostname`, `topology.kubernetes.io/zone`, or
    /// none.
    pub topology: Option<String>,
    pub excluded: Vec<(Backend, Exclusion)>,
}

/// This node, as service translation needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// The proxy name Services may hand themselves to with the service-proxy-name label.
    pub proxy_name: String,
    pub load_balancing: LoadBalancing,
}

/// How external frontends pick a backend for a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadBalancing {
    /// Maglev for Services without the annotation (`--load-balancing=maglev`).
    pub maglev_by_default: bool,
    /// The Maglev table's size (a prime, `--maglev-table-size`).
    pub maglev_table_size: u32,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        Self {
            maglev_by_default: false,
            maglev_table_size: ferrynet_common::DEFAULT_MAGLEV_TABLE_SIZE,
        }
    }
}

/// What one Service comes to on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceEntries {
    pub entries: Vec<PortEntry>,
    pub warnings: Vec<Warning>,
    /// Why the Service is not translated at all, when it is not.
    pub skipped: Option<String>,
}

/// One endpoint address, read leniently.
struct EndpointView<'a> {
    addr: IpAddr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
    endpoint: &'a Endpoint,
}

fn warn(kind: WarningKind, message: String) -> Warning {
    Warning::new(kind, message)
}

/// The Service's entries on this node (pure).
pub fn service_entries(service: &Service, slices: &[Arc<EndpointSlice>], node: &NodeContext) -> ServiceEntries {
    let mut out = ServiceEntries::default();
    let namespace = service.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let Some(name) = service.metadata.name.clone().filter(|n| !n.is_empty()) else {
        out.skipped = Some("a Service without a name".into());
        out.warnings.push(warn(
            WarningKind::HostileService,
            "a Service without a name is ignored".into(),
        ));
        return out;
    };
    let svc_ref = ServiceRef { namespace, name };
    if let Some(proxy) = service
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
        && *proxy != node.proxy_name
    {
        out.skipped = Some(format!(
            "handed to service proxy {proxy:?} by its {SERVICE_PROXY_NAME_LABEL} label"
        ));
        return out;
    }
    let Some(spec) = &service.spec else {
        out.skipped = Some("no spec".into());
        return out;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        out.skipped = Some("an ExternalName Service (DNS only)".into());
        return out;
    }
    let raw_ips: Vec<String> = match spec.cluster_ips.clone().filter(|ips| !ips.is_empty()) {
        Some(ips) => ips,
        None => spec.cluster_ip.clone().into_iter().collect(),
    };
    if raw_ips.iter().any(|ip| ip == "None") {
        out.skipped = Some("a headless Service (no ClusterIP)".into());
        return out;
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for raw in &raw_ips {
        match raw.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_loopback() && !ip.is_multicast() => {
                if cluster_ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4()) {
                    out.warnings.push(warn(
                        WarningKind::HostileService,
                        format!("service {svc_ref}: a second ClusterIP of one family ({raw}) is ignored"),
                    ));
                } else {
                    cluster_ips.push(ip);
                }
            }
            _ => out.warnings.push(warn(
                WarningKind::HostileService,
                format!("service {svc_ref}: ClusterIP {raw:?} is not usable; ignored"),
            )),
        }
    }
    if cluster_ips.is_empty() {
        out.skipped = Some("no usable ClusterIP".into());
        out.warnings.push(warn(
            WarningKind::HostileService,
            format!("service {svc_ref}: no usable ClusterIP; not translated"),
        ));
        return out;
    }
    let local_policy = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    // NodePorts: NodePort and LoadBalancer Services (a LoadBalancer one may have none).
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let external_ips = external_addresses(service, &svc_ref, &cluster_ips, &mut out.warnings);
    let source_ranges = source_ranges(spec, &svc_ref, &mut out.warnings);
    let maglev = maglev_for(service, &svc_ref, node.load_balancing, &mut out.warnings);
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t));
        timeout.map_or(DEFAULT_AFFINITY_TIMEOUT_S, |t| t as u32)
    });

    let mut seen: BTreeSet<(u16, Protocol)> = BTreeSet::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                out.warnings.push(warn(
                    WarningKind::UnsupportedProtocol,
                    format!(
                        "service {svc_ref}: port {} is {other}, which ferrynet does not translate; left out",
                        port.port
                    ),
                ));
                continue;
            }
        };
        let Ok(number) = u16::try_from(port.port)
            .map_err(|_| ())
            .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
        else {
            out.warnings.push(warn(
                WarningKind::HostileService,
                format!("service {svc_ref}: port {} is out of range; left out", port.port),
            ));
            continue;
        };
        if !seen.insert((number, protocol)) {
            out.warnings.push(warn(
                WarningKind::HostileService,
                format!(
                    "service {svc_ref}: port {number}/{} appears twice; the first is used",
                    protocol.as_str()
                ),
            ));
            continue;
        }
        // One entry of this port: `frontend`'s backends under a Local (or Cluster) policy.
        let entry = |frontend: Frontend, endpoints: &[EndpointView<'_>], local: bool, drop_when_empty: bool| {
            let mut entry = choose(frontend, endpoints, local, node);
            entry.service = svc_ref.clone();
            entry.port_name = port_name.clone();
            entry.affinity_timeout_s = affinity;
            entry.drop_when_empty = drop_when_empty;
            // Consistent hashing is for traffic several nodes may share (through a load balancer
            // or ECMP); in-cluster traffic is translated once, at its own node.
            entry.maglev = maglev.filter(|_| frontend.scope == Scope::External);
            entry
        };
        for ip in &cluster_ips {
            let endpoints = endpoints_of(&svc_ref, slices, *ip, &port_name, protocol, node, &mut out.warnings);
            let frontend = Frontend {
                addr: *ip,
                port: number,
                protocol,
                scope: Scope::Internal,
            };
            out.entries.push(entry(frontend, &endpoints, local_policy, false));
        }
        // externalIPs and load balancer IPs: translated where they arrive from outside
        // (externalTrafficPolicy), and short-circuited for pods and the node's own processes,
        // which get every endpoint (as kube-proxy does, whatever the external policy).
        for (ip, balanced) in &external_ips {
            let endpoints = endpoints_of(&svc_ref, slices, *ip, &port_name, protocol, node, &mut Vec::new());
            for (scope, local) in [(Scope::External, external_local), (Scope::Internal, false)] {
                let frontend = Frontend {
                    addr: *ip,
                    port: number,
                    protocol,
                    scope,
                };
                let mut e = entry(frontend, &endpoints, local, local);
                // Source ranges restrict what arrives at a load balancer IP from outside.
                if *balanced && scope == Scope::External {
                    e.source_ranges = source_ranges.as_ref().map(|r| {
                        r.iter()
                            .filter(|n| n.addr().is_ipv4() == ip.is_ipv4())
                            .copied()
                            .collect()
                    });
                }
                out.entries.push(e);
            }
        }
        let node_port = match port.node_port {
            Some(n) if node_ports && n != 0 => match u16::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    out.warnings.push(warn(
                        WarningKind::HostileService,
                        format!("service {svc_ref}: nodePort {n} is out of range; left out"),
                    ));
                    None
                }
            },
            _ => None,
        };
        // A NodePort answers on the node's addresses of each family the Service has: the
        // datapath keys it by the unspecified address and checks the destination is the node's.
        for (ip, node_port) in cluster_ips.iter().filter_map(|ip| Some((ip, node_port?))) {
            let endpoints = endpoints_of(&svc_ref, slices, *ip, &port_name, protocol, node, &mut Vec::new());
            let any: IpAddr = if ip.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            };
            let frontend = Frontend {
                addr: any,
                port: node_port,
                protocol,
                scope: Scope::External,
            };
            out.entries
                .push(entry(frontend, &endpoints, external_local, external_local));
            // The node itself and its pods reach the NodePort too (at the socket): every
            // endpoint, as kube-proxy short-circuits them, whatever the external policy.
            let internal = Frontend {
                scope: Scope::Internal,
                ..frontend
            };
            out.entries.push(entry(internal, &endpoints, false, false));
        }
    }
    out
}

/// The Maglev table size for the Service's external frontends, or None for random picks: its
/// annotation if it has a valid one, else the agent's default (pure).
fn maglev_for(service: &Service, svc: &ServiceRef, lb: LoadBalancing, warnings: &mut Vec<Warning>) -> Option<u32> {
    let annotation = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION));
    let maglev = match annotation.map(|v| v.trim()) {
        None => lb.maglev_by_default,
        Some("maglev") => true,
        Some("random") => false,
        Some(other) => {
            warnings.push(warn(
                WarningKind::HostileService,
                format!(
                    "service {svc}: {LB_ALGORITHM_ANNOTATION} {other:?} is neither \"maglev\" nor \"random\"; the agent's default is used"
                ),
            ));
            lb.maglev_by_default
        }
    };
    maglev.then_some(lb.maglev_table_size)
}

/// A Service's `externalIPs` and its load balancer's ingress IPs (those not in `ipMode: Proxy`,
/// which the load balancer must see), of the Service's families, each once (pure).
fn external_addresses(
    service: &Service,
    svc: &ServiceRef,
    cluster_ips: &[IpAddr],
    warnings: &mut Vec<Warning>,
) -> Vec<(IpAddr, bool)> {
    let spec = service.spec.as_ref();
    let external = spec
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|ip| (ip.clone(), false));
    let balanced = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|_| matches!(spec.and_then(|s| s.type_.as_deref()), Some("LoadBalancer")))
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| Some((i.ip.clone()?, true)));
    let mut out: Vec<(IpAddr, bool)> = Vec::new();
    for (raw, is_balanced) in external.chain(balanced) {
        match raw.parse::<IpAddr>() {
            Ok(ip)
                if !ip.is_unspecified()
                    && !ip.is_loopback()
                    && !ip.is_multicast()
                    && cluster_ips.iter().any(|c| c.is_ipv4() == ip.is_ipv4())
                    && !cluster_ips.contains(&ip) =>
            {
                match out.iter_mut().find(|(known, _)| *known == ip) {
                    // An address that is both: the load balancer's (its source ranges apply).
                    Some(known) => known.1 |= is_balanced,
                    None => out.push((ip, is_balanced)),
                }
            }
            _ => warnings.push(warn(
                WarningKind::HostileService,
                format!("service {svc}: external address {raw:?} is not usable for its families; left out"),
            )),
        }
    }
    out
}

/// `loadBalancerSourceRanges`, when set (pure). An entry that is not a CIDR is left out with a
/// warning; the rest still restrict, so that a typo never opens the Service to everyone.
fn source_ranges(spec: &ServiceSpec, svc: &ServiceRef, warnings: &mut Vec<Warning>) -> Option<BTreeSet<IpNet>> {
    let raw = spec.load_balancer_source_ranges.as_ref().filter(|r| !r.is_empty())?;
    let mut out = BTreeSet::new();
    for range in raw {
        match range.trim().parse::<IpNet>() {
            Ok(net) => {
                out.insert(net.trunc());
            }
            Err(_) => warnings.push(warn(
                WarningKind::HostileService,
                format!("service {svc}: loadBalancerSourceRanges entry {range:?} is not a CIDR; left out"),
            )),
        }
    }
    Some(out)
}

/// The endpoints of one service port and family, across the Service's slices.
fn endpoints_of<'a>(
    svc: &ServiceRef,
    slices: &'a [Arc<EndpointSlice>],
    family_of: IpAddr,
    port_name: &str,
    protocol: Protocol,
    node: &NodeContext,
    warnings: &mut Vec<Warning>,
) -> Vec<EndpointView<'a>> {
    let family = if family_of.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut out: Vec<EndpointView<'a>> = Vec::new();
    for slice in slices {
        if slice.address_type != family {
            continue;
        }
        let protocol_name = if protocol == Protocol::Tcp { "TCP" } else { "UDP" };
        let Some(slice_port) = slice.ports.iter().flatten().find(|p| {
            p.name.clone().unwrap_or_default() == port_name && p.protocol.as_deref().unwrap_or("TCP") == protocol_name
        }) else {
            continue;
        };
        let Some(number) = slice_port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            // Unset conditions mean ready (and serving as ready), as the API documents.
            let ready = conditions.ready.unwrap_or(true);
            let serving = conditions.serving.unwrap_or(ready);
            let terminating = conditions.terminating.unwrap_or(false);
            let local = endpoint.node_name.as_deref() == Some(node.name.as_str());
            for raw in &endpoint.addresses {
                match raw.parse::<IpAddr>() {
                    Ok(addr) if addr.is_ipv4() == family_of.is_ipv4() && !addr.is_unspecified() && !addr.is_loopback() => {
                        if out.iter().any(|e| e.addr == addr && e.port == number) {
                            continue;
                        }
                        out.push(EndpointView {
                            addr,
                            port: number,
                            ready,
                            serving,
                            terminating,
                            local,
                            endpoint,
                        });
                    }
                    _ => warnings.push(warn(
                        WarningKind::HostileEndpoint,
                        format!(
                            "service {svc}: endpoint address {raw:?} in slice {} is not a usable {family} address; ignored",
                            slice.metadata.name.as_deref().unwrap_or("?")
                        ),
                    )),
                }
            }
        }
    }
    out.sort_by_key(|e| (e.addr, e.port));
    out
}

/// Which topology hints to honour, as kube-proxy decides (`topologyModeFromHints`).
fn topology_mode(endpoints: &[EndpointView<'_>], node: &NodeContext) -> Option<&'static str> {
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    for e in endpoints.iter().filter(|e| e.ready) {
        let hints = e.endpoint.hints.as_ref();
        let zones: Vec<&str> = hints
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| z.name.as_str())
            .collect();
        let nodes: Vec<&str> = hints
            .and_then(|h| h.for_nodes.as_ref())
            .into_iter()
            .flatten()
            .map(|n| n.name.as_str())
            .collect();
        if zones.is_empty() {
            all_zone_hints = false;
        } else if node.zone.as_deref().is_some_and(|z| zones.contains(&z)) {
            for_zone = true;
        }
        if nodes.is_empty() {
            all_node_hints = false;
        } else if nodes.contains(&node.name.as_str()) {
            for_node = true;
        }
    }
    if all_node_hints && for_node {
        return Some("kubernetes.io/hostname");
    }
    if all_zone_hints && for_zone {
        return Some("topology.kubernetes.io/zone");
    }
    None
}

fn hinted(e: &EndpointView<'_>, mode: Option<&str>, node: &NodeContext) -> bool {
    let hints = e.endpoint.hints.as_ref();
    match mode {
        None => true,
        Some("kubernetes.io/hostname") => hints
            .and_then(|h| h.for_nodes.as_ref())
            .is_some_and(|n| n.iter().any(|n| n.name == node.name)),
        Some(_) => hints
            .and_then(|h| h.for_zones.as_ref())
            .is_some_and(|z| z.iter().any(|z| Some(z.name.as_str()) == node.zone.as_deref())),
    }
}

/// Picks the backends of one frontend from its endpoints (kube-proxy's `CategorizeEndpoints`).
fn choose(frontend: Frontend, endpoints: &[EndpointView<'_>], local_policy: bool, node: &NodeContext) -> PortEntry {
    let backend = |e: &EndpointView<'_>| Backend {
        addr: e.addr,
        port: e.port,
        protocol: frontend.protocol,
    };
    let mut backends = BTreeMap::new();
    let mut excluded = Vec::new();
    let mut topology = None;
    if local_policy {
        let local_ready = endpoints.iter().any(|e| e.local && e.ready);
        for e in endpoints {
            let pick = if local_ready {
                e.local && e.ready
            } else {
                e.local && e.serving && e.terminating
            };
            if pick {
                let state = if e.ready {
                    BackendState::Active
                } else {
                    BackendState::Terminating
                };
                backends.insert(backend(e), state);
            } else {
                let why = if !e.local {
                    Exclusion::OtherNode
                } else if e.serving && e.terminating {
                    Exclusion::Terminating
                } else {
                    Exclusion::NotReady
                };
                excluded.push((backend(e), why));
            }
        }
    } else {
        topology = topology_mode(endpoints, node);
        for e in endpoints.iter().filter(|e| e.ready) {
            if hinted(e, topology, node) {
                backends.insert(backend(e), BackendState::Active);
            }
        }
        let fallback = backends.is_empty();
        for e in endpoints {
            if backends.contains_key(&backend(e)) {
                continue;
            }
            if fallback && e.serving && e.terminating {
                backends.insert(backend(e), BackendState::Terminating);
                continue;
            }
            let why = if e.ready {
                Exclusion::Topology
            } else if e.serving && e.terminating {
                Exclusion::Terminating
            } else {
                Exclusion::NotReady
            };
            excluded.push((backend(e), why));
        }
    }
    // Endpoints that are not picked but still serve keep their established flows.
    let retained: BTreeSet<Backend> = endpoints
        .iter()
        .filter(|e| e.serving || e.ready)
        .map(backend)
        .filter(|b| !backends.contains_key(b))
        .collect();
    let local_backends = endpoints
        .iter()
        .filter(|e| e.local)
        .map(backend)
        .filter(|b| backends.contains_key(b) || retained.contains(b))
        .collect();
    PortEntry {
        frontend,
        service: ServiceRef {
            namespace: String::new(),
            name: String::new(),
        },
        port_name: String::new(),
        backends,
        retained,
        affinity_timeout_s: None,
        local_backends,
        source_ranges: None,
        drop_when_empty: false,
        maglev: None,
        notes: PortNotes {
            traffic_policy: if local_policy { "Local" } else { "Cluster" }.into(),
            topology: topology.map(str::to_string),
            excluded,
        },
    }
}

/// The Service an EndpointSlice belongs to, from its label.
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceRef> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone();
    Some(ServiceRef {
        namespace: slice.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::{ClientIPConfig, SessionAffinityConfig},
        discovery::v1::{EndpointConditions, EndpointHints, ForNode, ForZone},
    };

    use super::*;
    use crate::services::objects::{
        EndpointPort, LoadBalancerIngress, LoadBalancerStatus, Meta as ObjectMeta, ServicePort, ServiceStatus,
    };

    fn node(name: &str, zone: Option<&str>) -> NodeContext {
        NodeContext {
            name: name.into(),
            zone: zone.map(str::to_string),
            proxy_name: "ferrynet".into(),
            load_balancing: LoadBalancing::default(),
        }
    }

    fn service(ips: &[&str], ports: &[(&str, i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().map(|s| s.to_string()),
                cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, port, proto)| ServicePort {
                            name: (!name.is_empty()).then(|| name.to_string()),
                            port: *port,
                            protocol: Some(proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    struct Ep {
        addr: &'static str,
        node: &'static str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
        zones: &'static [&'static str],
        nodes: &'static [&'static str],
    }

    fn ep(addr: &'static str, node: &'static str) -> Ep {
        Ep {
            addr,
            node,
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
            zones: &[],
            nodes: &[],
        }
    }

    fn slice(name: &str, family: &str, ports: &[(&str, i32, &str)], endpoints: &[Ep]) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            address_type: family.into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, proto)| EndpointPort {
                        name: (!name.is_empty()).then(|| name.to_string()),
                        port: Some(*port),
                        protocol: Some(proto.to_string()),
                    })
                    .collect(),
            ),
            endpoints: endpoints
                .iter()
                .map(|e| Endpoint {
                    addresses: vec![e.addr.into()],
                    node_name: Some(e.node.into()),
                    conditions: Some(EndpointConditions {
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    }),
                    hints: (!e.zones.is_empty() || !e.nodes.is_empty()).then(|| EndpointHints {
                        for_zones: (!e.zones.is_empty())
                            .then(|| e.zones.iter().map(|z| ForZone { name: z.to_string() }).collect()),
                        for_nodes: (!e.nodes.is_empty())
                            .then(|| e.nodes.iter().map(|n| ForNode { name: n.to_string() }).collect()),
                    }),
                })
                .collect(),
        })
    }

    fn addrs(entry: &PortEntry) -> Vec<String> {
        entry.backends.keys().map(ToString::to_string).collect()
    }

    fn node_port_service(kind: &str, external: Option<&str>, node_ports: &[i32]) -> Service {
        let mut svc = service(
            &["10.96.0.10", "fd00:96::10"],
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
        );
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some(kind.into());
        spec.external_traffic_policy = external.map(str::to_string);
        for (port, node_port) in spec.ports.iter_mut().flatten().zip(node_ports) {
            port.node_port = Some(*node_port);
        }
        svc
    }

    fn external(out: &ServiceEntries) -> Vec<&PortEntry> {
        out.entries
            .iter()
            .filter(|e| e.frontend.scope == Scope::External)
            .collect()
    }

    #[test]
    fn node_ports_answer_on_every_node_address_of_each_family_with_the_external_policy() {
        let slices = [
            slice(
                "v4",
                "IPv4",
                &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
                &[ep("10.244.1.2", "n1"), ep("10.244.2.2", "n2")],
            ),
            slice("v6", "IPv6", &[("http", 8080, "TCP")], &[ep("fd00:244:2::2", "n2")]),
        ];
        // Cluster: every endpoint, the local one marked local; both families; both ports.
        let out = service_entries(
            &node_port_service("NodePort", None, &[30080, 30053]),
            &slices,
            &node("n1", None),
        );
        let ext = external(&out);
        assert_eq!(ext.len(), 4, "{ext:#?}");
        let http4 = ext
            .iter()
            .find(|e| e.frontend.port == 30080 && e.frontend.addr.is_ipv4())
            .unwrap();
        assert!(http4.frontend.addr.is_unspecified());
        assert_eq!(http4.frontend.protocol, Protocol::Tcp);
        assert_eq!(addrs(http4), ["10.244.1.2:8080", "10.244.2.2:8080"]);
        let local: Vec<String> = http4.local_backends.iter().map(ToString::to_string).collect();
        assert_eq!(local, ["10.244.1.2:8080"]);
        assert!(!http4.drop_when_empty);
        let dns6 = ext
            .iter()
            .find(|e| e.frontend.port == 30053 && e.frontend.addr.is_ipv6())
            .unwrap();
        assert!(dns6.backends.is_empty(), "no IPv6 endpoint has the dns port");
        // The ClusterIP entries are still there, and each NodePort has an in-cluster entry for
        // the node and its pods, with every endpoint.
        assert_eq!(out.entries.len(), 12);
        let inside = out
            .entries
            .iter()
            .find(|e| {
                e.frontend.scope == Scope::Internal && e.frontend.addr.is_unspecified() && e.frontend.port == 30080
            })
            .unwrap();
        assert_eq!(inside.backends.len(), 2);

        // Local: this node's endpoints only, and drop (not refuse) when there are none.
        let out = service_entries(
            &node_port_service("LoadBalancer", Some("Local"), &[30080, 30053]),
            &slices,
            &node("n1", None),
        );
        let ext = external(&out);
        let http4 = ext
            .iter()
            .find(|e| e.frontend.port == 30080 && e.frontend.addr.is_ipv4())
            .unwrap();
        assert_eq!(addrs(http4), ["10.244.1.2:8080"]);
        assert_eq!(http4.notes.traffic_policy, "Local");
        let http6 = ext
            .iter()
            .find(|e| e.frontend.port == 30080 && e.frontend.addr.is_ipv6())
            .unwrap();
        assert!(http6.backends.is_empty() && http6.drop_when_empty);
        // The internal entries keep the internal policy (Cluster).
        let internal4 = out
            .entries
            .iter()
            .find(|e| e.frontend.scope == Scope::Internal && e.frontend.port == 80 && e.frontend.addr.is_ipv4())
            .unwrap();
        assert_eq!(internal4.backends.len(), 2);
    }

    #[test]
    fn node_ports_of_clusterip_services_and_hostile_node_ports_are_left_out() {
        let slices = [slice("v4", "IPv4", &[("http", 8080, "TCP")], &[ep("10.244.1.2", "n1")])];
        // A ClusterIP Service with a nodePort (the API refuses it; a stale object may carry one).
        let out = service_entries(
            &node_port_service("ClusterIP", None, &[30080]),
            &slices,
            &node("n1", None),
        );
        assert!(external(&out).is_empty());
        // Out of range: warned about and left out; the ClusterIP entries stay.
        let out = service_entries(
            &node_port_service("NodePort", None, &[70000, 0]),
            &slices,
            &node("n1", None),
        );
        assert!(external(&out).is_empty());
        assert!(
            out.warnings.iter().any(|w| w.message.contains("nodePort 70000")),
            "{:?}",
            out.warnings
        );
        assert_eq!(out.entries.len(), 4);
    }

    #[test]
    fn load_balancer_ips_and_external_ips_get_both_scopes_and_source_ranges_restrict_the_balanced() {
        let slices = [slice("v4", "IPv4", &[("http", 8080, "TCP")], &[ep("10.244.1.2", "n1")])];
        let mut svc = node_port_service("LoadBalancer", None, &[30080, 30053]);
        let spec = svc.spec.as_mut().unwrap();
        spec.external_ips = Some(vec!["10.210.1.1".into(), "10.96.0.10".into(), "garbage".into()]);
        spec.load_balancer_source_ranges = Some(vec!["10.200.0.0/24".into(), "bogus".into(), "fd00:200::/64".into()]);
        let ingress = |ip: &str, mode: Option<&str>| LoadBalancerIngress {
            ip: Some(ip.into()),
            ip_mode: mode.map(str::to_string),
        };
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    ingress("10.210.0.1", Some("VIP")),
                    ingress("fd00:210::1", None),
                    ingress("10.210.0.9", Some("Proxy")),
                ]),
            }),
        });
        let out = service_entries(&svc, &slices, &node("n1", None));
        let find = |addr: &str, scope: Scope| {
            let addr: IpAddr = addr.parse().unwrap();
            out.entries
                .iter()
                .find(|e| e.frontend.addr == addr && e.frontend.port == 80 && e.frontend.scope == scope)
        };
        let balanced = find("10.210.0.1", Scope::External).unwrap();
        let want: BTreeSet<IpNet> = ["10.200.0.0/24".parse().unwrap()].into();
        assert_eq!(balanced.source_ranges.as_ref(), Some(&want));
        assert_eq!(addrs(balanced), ["10.244.1.2:8080"]);
        let balanced6 = find("fd00:210::1", Scope::External).unwrap();
        let want6: BTreeSet<IpNet> = ["fd00:200::/64".parse().unwrap()].into();
        assert_eq!(balanced6.source_ranges.as_ref(), Some(&want6));
        // In-cluster entries, and externalIPs, are not restricted.
        assert!(find("10.210.0.1", Scope::Internal).unwrap().source_ranges.is_none());
        assert!(find("10.210.1.1", Scope::External).unwrap().source_ranges.is_none());
        assert!(find("10.210.1.1", Scope::Internal).is_some());
        // ipMode: Proxy is left to the load balancer; a ClusterIP as an externalIP, or garbage, is
        // left out; so is a range that is not a CIDR, with a warning.
        assert!(find("10.210.0.9", Scope::External).is_none());
        assert!(find("10.96.0.10", Scope::External).is_none());
        for needle in ["\"garbage\"", "\"bogus\"", "\"10.96.0.10\""] {
            assert!(
                out.warnings.iter().any(|w| w.message.contains(needle)),
                "{needle}: {:?}",
                out.warnings
            );
        }
        // allocateLoadBalancerNodePorts: false leaves the ports without NodePorts: no wildcard.
        let mut without = svc.clone();
        for port in without.spec.as_mut().unwrap().ports.iter_mut().flatten() {
            port.node_port = None;
        }
        let out = service_entries(&without, &slices, &node("n1", None));
        assert!(out.entries.iter().all(|e| !e.frontend.addr.is_unspecified()));
        assert!(out.entries.iter().any(|e| e.frontend.scope == Scope::External));
    }

    #[test]
    fn maglev_balances_external_frontends_by_flag_or_annotation_and_never_in_cluster_ones() {
        let slices = [slice("v4", "IPv4", &[("http", 8080, "TCP")], &[ep("10.244.1.2", "n1")])];
        let maglev_sizes = |svc: &Service, by_default: bool| {
            let mut ctx = node("n1", None);
            ctx.load_balancing = LoadBalancing {
                maglev_by_default: by_default,
                maglev_table_size: 251,
            };
            let out = service_entries(svc, &slices, &ctx);
            let external: BTreeSet<Option<u32>> = external(&out).iter().map(|e| e.maglev).collect();
            let internal: BTreeSet<Option<u32>> = out
                .entries
                .iter()
                .filter(|e| e.frontend.scope == Scope::Internal)
                .map(|e| e.maglev)
                .collect();
            assert_eq!(internal, [None].into(), "in-cluster entries never use Maglev");
            (external, out.warnings)
        };
        let mut svc = node_port_service("NodePort", None, &[30080]);
        // The agent's default decides without the annotation.
        assert_eq!(maglev_sizes(&svc, false).0, [None].into());
        assert_eq!(maglev_sizes(&svc, true).0, [Some(251)].into());
        // The annotation overrides it both ways.
        for (value, expected) in [("maglev", Some(251)), ("random", None)] {
            svc.metadata.annotations = Some([(LB_ALGORITHM_ANNOTATION.to_string(), value.to_string())].into());
            for by_default in [false, true] {
                let (external, warnings) = maglev_sizes(&svc, by_default);
                assert_eq!(external, [expected].into(), "{value} over default {by_default}");
                assert!(warnings.is_empty());
            }
        }
        // Garbage: a warning, and the default.
        svc.metadata.annotations = Some([(LB_ALGORITHM_ANNOTATION.to_string(), "round-robin".to_string())].into());
        let (external, warnings) = maglev_sizes(&svc, true);
        assert_eq!(external, [Some(251)].into());
        assert!(
            warnings.iter().any(|w| w.message.contains("round-robin")),
            "{warnings:?}"
        );
    }

    /// `explain` reads what the controller wrote: every entry must survive the notes file.
    #[test]
    fn entries_round_trip_through_the_notes_files() {
        let svc = service(&["10.96.0.10"], &[("http", 80, "TCP")]);
        let mut terminating = ep("10.244.1.3", "n1");
        terminating.ready = Some(false);
        terminating.serving = Some(true);
        terminating.terminating = Some(true);
        let slices = [slice(
            "a",
            "IPv4",
            &[("http", 8080, "TCP")],
            &[ep("10.244.1.2", "n1"), ep("10.244.2.2", "n2"), terminating],
        )];
        let out = service_entries(&svc, &slices, &node("n1", None));
        let entry = &out.entries[0];
        assert_eq!(entry.backends.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        crate::services::notes::write(dir.path(), 7, entry).expect("notes are written");
        assert_eq!(crate::services::notes::read(dir.path(), 7).as_ref(), Some(entry));
    }

    #[test]
    fn numeric_and_named_target_ports_resolve_per_slice_and_multi_port_services_get_an_entry_each() {
        let svc = service(&["10.96.0.10"], &[("http", 80, "TCP"), ("dns", 53, "UDP")]);
        // The target port is resolved per endpoint: each slice carries the number its pods use.
        let slices = [
            slice(
                "a",
                "IPv4",
                &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
                &[ep("10.244.1.2", "n1")],
            ),
            slice("b", "IPv4", &[("http", 9090, "TCP")], &[ep("10.244.2.2", "n2")]),
        ];
        let out = service_entries(&svc, &slices, &node("n1", None));
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert_eq!(out.entries.len(), 2);
        let http = &out.entries[0];
        assert_eq!(http.frontend.to_string(), "10.96.0.10:80/tcp");
        assert_eq!(addrs(http), ["10.244.1.2:8080", "10.244.2.2:9090"]);
        let dns = &out.entries[1];
        assert_eq!(dns.frontend.to_string(), "10.96.0.10:53/udp");
        assert_eq!(addrs(dns), ["10.244.1.2:5353"]);
    }

    #[test]
    fn dual_stack_services_get_an_entry_per_family_from_that_familys_slices() {
        let svc = service(&["10.96.0.10", "fd00:96::a"], &[("", 80, "TCP")]);
        let slices = [
            slice("v4", "IPv4", &[("", 8080, "TCP")], &[ep("10.244.1.2", "n1")]),
            slice("v6", "IPv6", &[("", 8080, "TCP")], &[ep("fd00:244:1::2", "n1")]),
        ];
        let out = service_entries(&svc, &slices, &node("n1", None));
        let shown: Vec<(String, Vec<String>)> =
            out.entries.iter().map(|e| (e.frontend.to_string(), addrs(e))).collect();
        assert_eq!(
            shown,
            [
                ("10.96.0.10:80/tcp".to_string(), vec!["10.244.1.2:8080".to_string()]),
                (
                    "[fd00:96::a]:80/tcp".to_string(),
                    vec!["[fd00:244:1::2]:8080".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn only_ready_endpoints_and_serving_terminating_ones_when_none_is_ready() {
        let svc = service(&["10.96.0.10"], &[("", 80, "TCP")]);
        let mut terminating = ep("10.244.1.3", "n1");
        terminating.ready = Some(false);
        terminating.terminating = Some(true);
        let mut not_ready = ep("10.244.1.4", "n1");
        not_ready.ready = Some(false);
        not_ready.serving = Some(false);
        // Unset conditions mean ready.
        let mut unset = ep("10.244.1.5", "n1");
        unset.ready = None;
        unset.serving = None;
        unset.terminating = None;
        let slices = [slice(
            "a",
            "IPv4",
            &[("", 8080, "TCP")],
            &[ep("10.244.1.2", "n1"), terminating, not_ready, unset],
        )];
        let out = service_entries(&svc, &slices, &node("n1", None));
        let entry = &out.entries[0];
        assert_eq!(addrs(entry), ["10.244.1.2:8080", "10.244.1.5:8080"]);
        // The terminating one keeps its established flows; the not-ready one is out.
        let retained: Vec<String> = entry.retained.iter().map(ToString::to_string).collect();
        assert_eq!(retained, ["10.244.1.3:8080"]);
        let reasons: Vec<(String, Exclusion)> = entry.notes.excluded.iter().map(|(b, r)| (b.to_string(), *r)).collect();
        assert_eq!(
            reasons,
            [
                ("10.244.1.3:8080".to_string(), Exclusion::Terminating),
                ("10.244.1.4:8080".to_string(), Exclusion::NotReady)
            ]
        );

        // No ready endpoint anywhere: the serving terminating ones take the traffic.
        let mut t1 = ep("10.244.1.3", "n1");
        t1.ready = Some(false);
        t1.terminating = Some(true);
        let slices = [slice("a", "IPv4", &[("", 8080, "TCP")], &[t1])];
        let entry = &service_entries(&svc, &slices, &node("n1", None)).entries[0];
        assert_eq!(
            entry.backends.values().collect::<Vec<_>>(),
            [&BackendState::Terminating]
        );

        // No endpoints at all: an entry without backends, which the datapath refuses.
        let entry = &service_entries(&svc, &[], &node("n1", None)).entries[0];
        assert!(entry.backends.is_empty() && entry.retained.is_empty());
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints_only() {
        let mut svc = service(&["10.96.0.10"], &[("", 80, "TCP")]);
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        let slices = [slice(
            "a",
            "IPv4",
            &[("", 8080, "TCP")],
            &[ep("10.244.1.2", "n1"), ep("10.244.2.2", "n2")],
        )];
        let entry = &service_entries(&svc, &slices, &node("n1", None)).entries[0];
        assert_eq!(addrs(entry), ["10.244.1.2:8080"]);
        assert_eq!(entry.notes.traffic_policy, "Local");
        assert_eq!(entry.notes.excluded[0].1, Exclusion::OtherNode);
        // None local: refused, even though others exist.
        let entry = &service_entries(&svc, &slices, &node("n3", None)).entries[0];
        assert!(entry.backends.is_empty());
        // Local serving terminating ones when no local ready one is left.
        let mut t = ep("10.244.1.2", "n1");
        t.ready = Some(false);
        t.terminating = Some(true);
        let slices = [slice("a", "IPv4", &[("", 8080, "TCP")], &[t, ep("10.244.2.2", "n2")])];
        let entry = &service_entries(&svc, &slices, &node("n1", None)).entries[0];
        assert_eq!(addrs(entry), ["10.244.1.2:8080"]);
    }

    #[test]
    fn topology_hints_are_honoured_exactly_as_kube_proxy_does() {
        let svc = service(&["10.96.0.10"], &[("", 80, "TCP")]);
        let zoned = |addr: &'static str, zone: &'static [&'static str]| Ep {
            zones: zone,
            ..ep(addr, "x")
        };
        let slices = [slice(
            "a",
            "IPv4",
            &[("", 8080, "TCP")],
            &[zoned("10.244.1.2", &["a"]), zoned("10.244.2.2", &["b"])],
        )];
        let entry = &service_entries(&svc, &slices, &node("n1", Some("a"))).entries[0];
        assert_eq!(addrs(entry), ["10.244.1.2:8080"]);
        assert_eq!(entry.notes.topology.as_deref(), Some("topology.kubernetes.io/zone"));
        assert_eq!(entry.notes.excluded[0].1, Exclusion::Topology);
        // A zone no hint names, or a node without a zone: every endpoint.
        assert_eq!(
            service_entries(&svc, &slices, &node("n1", Some("c"))).entries[0]
                .backends
                .len(),
            2
        );
        assert_eq!(
            service_entries(&svc, &slices, &node("n1", None)).entries[0]
                .backends
                .len(),
            2
        );
        // One ready endpoint without hints: hints are incomplete, every endpoint.
        let slices = [slice(
            "a",
            "IPv4",
            &[("", 8080, "TCP")],
            &[zoned("10.244.1.2", &["a"]), ep("10.244.2.2", "x")],
        )];
        assert_eq!(
            service_entries(&svc, &slices, &node("n1", Some("a"))).entries[0]
                .backends
                .len(),
            2
        );
        // Node hints (PreferSameNode) win over zone hints when every endpoint has them.
        let both = |addr: &'static str, zones: &'static [&'static str], nodes: &'static [&'static str]| Ep {
            zones,
            nodes,
            ..ep(addr, "x")
        };
        let slices = [slice(
            "a",
            "IPv4",
            &[("", 8080, "TCP")],
            &[both("10.244.1.2", &["a"], &["n1"]), both("10.244.1.3", &["a"], &["n2"])],
        )];
        let entry = &service_entries(&svc, &slices, &node("n1", Some("a"))).entries[0];
        assert_eq!(addrs(entry), ["10.244.1.2:8080"]);
        assert_eq!(entry.notes.topology.as_deref(), Some("kubernetes.io/hostname"));
        // Node hints that name another node only: zone hints decide.
        let entry = &service_entries(&svc, &slices, &node("n9", Some("a"))).entries[0];
        assert_eq!(entry.backends.len(), 2);
    }

    #[test]
    fn session_affinity_carries_its_timeout() {
        let mut svc = service(&["10.96.0.10"], &[("", 80, "TCP")]);
        svc.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
        let out = service_entries(&svc, &[], &node("n1", None));
        assert_eq!(out.entries[0].affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
        svc.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(5),
            }),
        });
        assert_eq!(
            service_entries(&svc, &[], &node("n1", None)).entries[0].affinity_timeout_s,
            Some(5)
        );
        svc.spec.as_mut().unwrap().session_affinity = Some("None".into());
        assert_eq!(
            service_entries(&svc, &[], &node("n1", None)).entries[0].affinity_timeout_s,
            None
        );
    }

    #[test]
    fn services_that_are_not_ours_to_translate_are_skipped() {
        let mut headless = service(&["None"], &[("", 80, "TCP")]);
        assert!(service_entries(&headless, &[], &node("n1", None)).skipped.is_some());
        headless.spec.as_mut().unwrap().cluster_ips = None;
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert!(service_entries(&headless, &[], &node("n1", None)).skipped.is_some());
        let mut external = service(&["10.96.0.10"], &[("", 80, "TCP")]);
        external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        assert!(service_entries(&external, &[], &node("n1", None)).skipped.is_some());
        let mut other = service(&["10.96.0.10"], &[("", 80, "TCP")]);
        other.metadata.labels = Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "someone-else".to_string())].into());
        assert!(service_entries(&other, &[], &node("n1", None)).skipped.is_some());
        // Labelled with our own proxy name: ours.
        other.metadata.labels = Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "ferrynet".to_string())].into());
        assert_eq!(service_entries(&other, &[], &node("n1", None)).entries.len(), 1);
    }

    #[test]
    fn hostile_objects_become_warnings_and_never_panic() {
        use WarningKind::*;
        let kinds = |out: &ServiceEntries| -> Vec<WarningKind> { out.warnings.iter().map(|w| w.kind).collect() };
        // No ClusterIP at all, or only garbage.
        let mut none = service(&[], &[("", 80, "TCP")]);
        none.spec.as_mut().unwrap().cluster_ip = None;
        let out = service_entries(&none, &[], &node("n1", None));
        assert!(out.skipped.is_some() && out.entries.is_empty());
        let garbage = service(&["banana", "0.0.0.0", "::1"], &[("", 80, "TCP")]);
        let out = service_entries(&garbage, &[], &node("n1", None));
        assert!(out.entries.is_empty());
        assert_eq!(
            kinds(&out),
            [HostileService, HostileService, HostileService, HostileService]
        );
        // Duplicate ports, ports out of range, SCTP.
        let ports = service(
            &["10.96.0.10"],
            &[
                ("a", 80, "TCP"),
                ("b", 80, "TCP"),
                ("c", 70000, "TCP"),
                ("d", 0, "UDP"),
                ("e", 9, "SCTP"),
            ],
        );
        let out = service_entries(&ports, &[], &node("n1", None));
        assert_eq!(out.entries.len(), 1);
        assert_eq!(
            kinds(&out),
            [HostileService, HostileService, HostileService, UnsupportedProtocol]
        );
        // Endpoints of the wrong family, garbage addresses, a port number of 0 in a slice.
        let svc = service(&["10.96.0.10"], &[("", 80, "TCP")]);
        let slices = [
            slice(
                "a",
                "IPv4",
                &[("", 8080, "TCP")],
                &[ep("fd00::1", "n1"), ep("nope", "n1"), ep("10.244.1.2", "n1")],
            ),
            slice("b", "IPv4", &[("", 0, "TCP")], &[ep("10.244.1.9", "n1")]),
            slice("c", "FQDN", &[("", 8080, "TCP")], &[ep("example.com", "n1")]),
        ];
        let out = service_entries(&svc, &slices, &node("n1", None));
        assert_eq!(addrs(&out.entries[0]), ["10.244.1.2:8080"]);
        assert_eq!(kinds(&out), [HostileEndpoint, HostileEndpoint]);
        // A Service with no spec and no name at all.
        assert!(
            service_entries(&Service::default(), &[], &node("n1", None))
                .skipped
                .is_some()
        );
        // A slice whose Service does not exist is found by nobody: slices are only ever looked
        // up by their Service (see `slice_service`); one without the label belongs to none.
        let orphan = slice("x", "IPv4", &[], &[]);
        let mut unlabelled = (*orphan).clone();
        unlabelled.metadata.labels = None;
        assert_eq!(slice_service(&unlabelled), None);
        assert_eq!(slice_service(&orphan).unwrap().name, "web");
    }
}
