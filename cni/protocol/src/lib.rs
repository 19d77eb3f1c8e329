//! The CNI plugin protocol (spec 1.1.0), shared by `ferrynet` and `ferrynet-ipam`: the bottom of
//! ferrynet's CNI layering (protocol ← IPAM ← plugin).
//!
//! Wire types (network config, results, legacy result encoding) come from `rscni-types`. The
//! dispatcher is our own. `rscni-plugin`'s `Plugin::run` reads stdin and deserialises the whole
//! config strictly before plugin code runs, and its `portMappings` type only knows camelCase
//! keys. containerd's CRI plugin sends them capitalised (`HostPort`, `ContainerPort`), so every
//! pod with a hostPort would fail with code 6 before ferrynet saw it. Here stdin is read once,
//! normalised, and then decoded.
//!
//! - [`version`]: the spec versions ferrynet speaks, and negotiation;
//! - [`error`]: spec-shaped errors and their codes;
//! - [`args`]: the `CNI_ARGS` variable;
//! - [`attachment`]: the (container ID, ifname) key every attachment is known by;
//! - [`invocation`]: one decoded call (environment and config), and delegation to other plugins;
//! - [`dispatch`]: the process entry point and the [`CniPlugin`] trait plugins implement.
pub mod args;
pub mod attachment;
pub mod dispatch;
pub mod error;
pub mod invocation;
pub mod version;

pub use args::CniArgs;
pub use attachment::{AttachmentKey, InvalidAttachmentKey, is_valid_name};
pub use dispatch::{CniPlugin, dispatch, main};
pub use error::{CniError, MAX_DETAILS_LEN, codes};
pub use invocation::{Command, Environment, Invocation, ProcessEnv, run_plugin};
pub use rscni_types;
