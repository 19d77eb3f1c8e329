//! `ferrynet`: the CNI plugin binary a container runtime runs from `/opt/cni/bin`.
use std::process::ExitCode;

fn main() -> ExitCode {
    ferrynet_cni_protocol::main(
        &ferrynet_cni::RoutedVethPlugin,
        concat!("ferrynet ", env!("CARGO_PKG_VERSION"), ": routed pod networking (CNI)"),
    )
}
