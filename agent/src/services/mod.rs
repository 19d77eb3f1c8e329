//! Service translation, the kube-proxy replacement.
//!
//! - [`table`]: Services and EndpointSlices → the entries this node needs (pure);
//! - [`diff`]: those entries against what the maps hold → operations (pure);
//! - [`maps`]: the maps, their mirror, and the applier;
//! - [`nodeport`]: the addresses and interfaces NodePorts answer on (pure);
//! - [`past_stack`]: the other nodes' PodCIDRs whose flows may go past the node's stack (pure);
//! - [`controller`]: the task that follows the API and drives the three;
//! - [`http`], [`metrics`]: `/healthz` and `/metrics`;
//! - [`health_check`]: the `healthCheckNodePort` servers;
//! - [`notes`], [`cli`]: what `ferrynet-agent services` and `explain` show;
//! - [`purge`]: removed backends' flows purged beside the controller;
//! - [`service_cidrs`]: the cluster's Service CIDRs, given or read from the API;
//! - [`objects`]: Services and EndpointSlices as the agent parses and keeps them (what the table
//!   reads, nothing else).
pub mod cli;
pub mod controller;
pub mod diff;
pub mod health_check;
pub mod http;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod nodeport;
pub mod notes;
pub mod objects;
pub mod past_stack;
pub mod port_gates;
pub mod purge;
pub mod service_cidrs;
pub mod table;
