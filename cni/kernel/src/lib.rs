//! Kernel plumbing shared by the `ferrynet` CNI plugin and `ferrynet-agent`:
//!
//! - [`netlink`]: a small synchronous rtnetlink client whose changes go to the kernel in batches;
//! - [`netns`]: network namespaces, entered only by a throwaway thread (netavark's pattern);
//! - [`ids`]: the route protocol ids and tables that mark what ferrynet owns in the kernel;
//! - [`names`]: the deterministic names and addresses of each pod's host-side objects;
//! - [`pins`]: where the service datapath pins its maps, programs and links.
//!
//! Defined once here, so that the plugin that creates an object and the agent that later finds,
//! adopts or removes it can never disagree.
pub mod ids;
pub mod names;
pub mod netlink;
pub mod netns;
pub mod pins;
