//! The `ferrynet` CNI plugin (routed L3, one veth per pod), plus the netlink and netns helpers the
//! agent reuses.
pub mod config;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod plugin;

pub use plugin::FerrynetPlugin;
