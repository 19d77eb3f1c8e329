//! ferrynet's node-local IPAM: allocation from the node's PodCIDR ranges, in a store that is
//! persistent, crash-safe and safe under many concurrent plugin processes.
//!
//! It sits on the CNI protocol layer (`ferrynet-cni-protocol`) and below the `ferrynet` plugin:
//! [`cni_commands`] are the IPAM's CNI commands, which the `ferrynet-ipam` binary runs and the main
//! plugin calls in-process.
mod bitmap;
pub mod cni_commands;
pub mod config;
pub mod error;
pub mod fsutil;
pub mod store;

pub use config::{IpamConfig, IpamRoute, Range, RangeSet};
pub use error::{IpamError, Result};
pub use ferrynet_cni_protocol::AttachmentKey;
pub use store::{AllocationRequest, Attachment, AttachmentLock, GcReport, LockedStore, Store};
