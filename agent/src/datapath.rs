//! The eBPF datapath: the kernel programs embedded at build time, loaded and attached here.
use aya::Ebpf;

/// The object file `build.rs` produced from `ebpf/ferrynet-ebpf`.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferrynet-programs"));

pub fn load() -> Result<Ebpf, aya::EbpfError> {
    Ebpf::load(PROGRAMS)
}
