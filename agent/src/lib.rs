//! ferrynet-agent: the node half of ferrynet, as a set of supervised controllers (see
//! [`agent`]). Each controller computes its desired state with pure functions, diffs it against
//! the kernel's or the disk's state with pure functions, and applies the difference.
//!
//! - [`watch`]: reflectors and the read-only views they publish;
//! - [`node`]: node networking (routes, VXLAN, the firewall table, forwarding);
//! - [`cni_config`]: the CNI binaries and conflist;
//! - [`ipam_gc`]: releasing addresses of pods that vanished without a DEL;
//! - [`services`]: service translation (the kube-proxy replacement);
//! - [`datapath`], [`kernel_paths`]: the eBPF programs and what they hang off;
//! - [`supervisor`], [`status`], [`warning`]: supervision, the status file, typed warnings.
pub mod agent;
pub mod cni_config;
pub mod datapath;
pub mod ipam_gc;
pub mod kernel_paths;
pub mod node;
pub mod services;
pub mod status;
pub mod supervisor;
pub mod warning;
pub mod watch;
