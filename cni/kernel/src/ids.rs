//! The marks by which ferrynet recognises its own kernel state, so that it never touches anyone
//! else's: route protocol ids (`ip route show proto N`) and routing tables.

/// Route protocol of the host routes the CNI installs to each pod (`/32` and `/128` via the
/// pod's host veth).
pub const ROUTE_PROTOCOL_POD: u8 = 113;
/// Route protocol of the agent's routes: to other nodes' PodCIDRs, and the `unreachable` route
/// that covers this node's own PodCIDRs.
pub const ROUTE_PROTOCOL_AGENT: u8 = 114;
/// The main routing table (`RT_TABLE_MAIN`), where all of ferrynet's routes live.
pub const MAIN_TABLE: u32 = 254;
/// The `ifindex` of loopback in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;
/// The routing table that delivers refused Service traffic locally, where the agent's firewall
/// rejects it (see the agent's `node::refusal`).
pub const REFUSAL_TABLE: u32 = 2114;
/// The priority of the rule that sends refused Service traffic to [`REFUSAL_TABLE`]: before the
/// main table (32766), after the local one (0).
pub const REFUSAL_RULE_PRIORITY: u32 = 114;
