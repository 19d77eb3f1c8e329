//! `ferrynet-ipam`: ferrynet's IPAM as a standalone CNI IPAM plugin, usable as the `ipam` of any
//! main plugin (for example the reference `bridge`).
use std::process::ExitCode;

fn main() -> ExitCode {
    ferrynet_ipam::plugin::main(
        &ferrynet_ipam::ipam_plugin::IpamPlugin,
        concat!("ferrynet-ipam ", env!("CARGO_PKG_VERSION"), ": node-local IPAM"),
    )
}
