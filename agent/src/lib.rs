//! ferrynet-agent: the node half of ferrynet. Pure desired-state functions (`topology`,
//! `cniconf::conflist`, `masquerade::ruleset`) feed small appliers (`routing`, `cniconf`,
//! `masquerade`), driven by `run`.
pub mod cniconf;
pub mod datapath;
pub mod ipam_gc;
pub mod kernel_paths;
pub mod masquerade;
pub mod routing;
pub mod run;
pub mod status;
pub mod topology;
