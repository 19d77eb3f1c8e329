//! ferrynet's kernel programs, built for `bpfel-unknown-none` by `agent/build.rs`.
//!
//! On any other target this crate is an empty binary, so that workspace-wide commands
//! (`cargo build --workspace`, `cargo clippy --workspace`) work on the host.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// For `atomic_xadd`: the BPF target has atomic adds (BPF_ATOMIC) but declares no `fetch_add`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
