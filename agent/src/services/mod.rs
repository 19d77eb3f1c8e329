//! Service translation, the kube-proxy replacement: the controller's slot in the agent.
//!
//! For now the controller prepares and checks what the eBPF datapath hangs off (the bpffs pin
//! directory and the cgroup v2 directory) and reports it; translation itself is the next step.
pub mod controller;
