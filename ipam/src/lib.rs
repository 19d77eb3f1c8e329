//! ferrynet's node-local IPAM: allocation from the node's PodCIDR ranges, in a store that is
//! persistent, crash-safe and safe under many concurrent plugin processes.
//!
//! The [`plugin`] module is the CNI protocol (shared with the main `ferrynet` plugin); the
//! `ferrynet-ipam` binary is a thin wrapper around [`ipam_plugin`].
mod bitmap;
pub mod config;
pub mod error;
pub mod fsutil;
pub mod ipam_plugin;
pub mod plugin;
pub mod store;

pub use config::{IpamConfig, IpamRoute, Range, RangeSet};
pub use error::{IpamError, Result};
pub use store::{AllocationRequest, Attachment, AttachmentKey, GcReport, LockedStore, Store};
