//! Node networking: routes to other nodes' pods (native or VXLAN), the local PodCIDRs'
//! `unreachable` routes, the agent's firewall table, and IP forwarding.
//!
//! - [`topology`]: Node objects → the routes this node needs (pure);
//! - [`routing`], [`vxlan`], [`nftables`], [`refusal`]: each reads its kernel state back, diffs it against the
//!   desired state in a pure function, and applies only the difference;
//! - [`controller`]: the task that runs a pass whenever the nodes' projection changes, and on a
//!   resync timer to repair drift.
pub mod controller;
pub mod nftables;
pub mod refusal;
pub mod routing;
pub mod topology;
pub mod vxlan;
