//! `ferrynet-ipam`: ferrynet's IPAM as a standalone CNI IPAM plugin, usable as the `ipam` of any
//! main plugin (for example the reference `bridge`).
use std::process::ExitCode;

fn main() -> ExitCode {
    ferrynet_cni_protocol::main(
        &ferrynet_ipam::cni_commands::IpamPlugin,
        concat!("ferrynet-ipam ", env!("CARGO_PKG_VERSION"), ": node-local IPAM"),
    )
}
