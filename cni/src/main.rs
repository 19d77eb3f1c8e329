//! `ferrynet`: the CNI plugin binary a container runtime runs from `/opt/cni/bin`.
use std::process::ExitCode;

fn main() -> ExitCode {
    ferrynet_ipam::plugin::main(
        &ferrynet_cni::FerrynetPlugin,
        concat!("ferrynet ", env!("CARGO_PKG_VERSION"), ": routed pod networking (CNI)"),
    )
}
