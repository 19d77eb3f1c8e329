//! The `ferrynet` CNI plugin: routed L3 pod networking, one veth pair per pod (see the README's
//! "Pod networking").
//!
//! - [`config`]: the plugin's own network config fields;
//! - [`commands`]: ADD, DEL, CHECK, STATUS and GC;
//! - [`pod_datapath`]: attaching the service datapath's pinned pod programs.
//!
//! It sits on top of the CNI protocol (`ferrynet-cni-protocol`), the IPAM (`ferrynet-ipam`, run
//! in-process) and the kernel plumbing it shares with the agent (`ferrynet-kernel`).
pub mod commands;
pub mod config;
pub mod pod_datapath;

pub use commands::RoutedVethPlugin;
