//! Warnings: problems the agent works around and reports, never crashes on. Typed, so that the
//! status, the logs and the tests all agree on what kind of problem a node has.
use serde::{Deserialize, Serialize};

/// What kind of problem a warning reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WarningKind {
    /// A Node object without a name.
    NodeWithoutName,
    /// A podCIDR that is not a CIDR, or has host bits set.
    InvalidPodCidr,
    /// A second podCIDR of one family.
    ExtraPodCidr,
    /// An InternalIP that is not a usable address.
    InvalidInternalIp,
    /// This node is not (yet) in the API, or has no InternalIP: nothing is changed.
    LocalNodeIncomplete,
    /// A peer without a podCIDR.
    PeerWithoutPodCidr,
    /// A peer without an address of the family a route needs.
    PeerWithoutAddress,
    /// A peer's podCIDR that must never be routed (too broad, special-purpose, covering the
    /// underlay or this node).
    UnroutablePodCidr,
    /// Two nodes claim overlapping podCIDRs.
    PodCidrConflict,
    /// A peer's InternalIP that cannot be a peer's: this node's own, inside a PodCIDR or the
    /// cluster CIDRs, or another node's.
    ImpossiblePeerAddress,
    /// The local node has no address for a VXLAN endpoint.
    NoVxlanEndpoint,
    /// Someone else's route has the destination of one of ours.
    RouteCollision,
    /// A peer's address is not reachable directly from this node (native routing).
    PeerUnreachable,
    /// IP forwarding is off and could not be turned on.
    ForwardingOff,
    /// The BPF pin path is unusable.
    BpfPinPath,
    /// The cgroup path is unusable.
    CgroupPath,
    /// An IPAM record that cannot be read (kept, and reported).
    IpamCorruptRecord,
    /// A Service object that cannot be (fully) translated: no usable ClusterIP, bad ports.
    HostileService,
    /// An EndpointSlice endpoint that cannot be used: a garbage or wrong-family address.
    HostileEndpoint,
    /// A Service port of a protocol ferrynet does not translate (SCTP).
    UnsupportedProtocol,
    /// A datapath map is full: some entries could not be written.
    MapFull,
    /// The datapath could not be loaded, attached or written.
    Datapath,
    /// A pinned map's capacity is not what the settings ask: a pinned map keeps the capacity it
    /// was created with until `ferrynet-agent cleanup`.
    PinnedMapSize,
}

/// One problem, with the object it is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Warning {
    pub kind: WarningKind,
    pub message: String,
}

impl Warning {
    pub fn new(kind: WarningKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Every failure of one apply or teardown, in order (netavark's error list): an applier keeps
/// going past a failure so that one bad object never holds up the others, and reports them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorList<E>(pub Vec<E>);

impl<E> Default for ErrorList<E> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<E> ErrorList<E> {
    pub fn push(&mut self, error: impl Into<E>) {
        self.0.push(error.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing failed.
    pub fn into_result(self) -> Result<(), Self> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl<E: std::fmt::Display> std::fmt::Display for ErrorList<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for ErrorList<E> {}
