//! Builds the kernel programs (`ebpf/ferrynet-ebpf`) for the BPF target with the pinned nightly, so
//! a plain `cargo build` produces an agent with its programs embedded (aya-template's approach).

/// The nightly whose LLVM matches bpf-linker's. Keep in step with bootstrap.sh.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> aya_build::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/ferrynet-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/ferrynet-common")
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ferrynet-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
