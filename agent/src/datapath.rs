//! The eBPF datapath: kernel programs embedded at build time (`build.rs`), loaded and attached
//! here.
use aya::{
    Ebpf, EbpfError,
    maps::{MapError, MapInfo, PerCpuHashMap},
    programs::{ProgramError, SchedClassifier, TcAttachType},
};
use ferrynet_common::{FROM_POD_PROGRAM, FROM_POD_STATS_MAP, TrafficCounters};

/// The object file `build.rs` produced from `ebpf/ferrynet-ebpf`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferrynet-programs"));

/// The kernel object, as built (an ELF file), for inspection.
pub fn object() -> &'static [u8] {
    PROGRAMS
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

/// The pod program (TC classifier) in the object.
fn from_pod_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DatapathError> {
    ebpf.program_mut(FROM_POD_PROGRAM)
        .ok_or(DatapathError::Missing(FROM_POD_PROGRAM))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name: FROM_POD_PROGRAM,
            source,
        })
}

/// The loaded kernel programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads every program into the kernel (verifier included); attaches nothing yet.
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(PROGRAMS)?;
        from_pod_program(&mut ebpf)?
            .load()
            .map_err(|source| DatapathError::Program {
                name: FROM_POD_PROGRAM,
                source,
            })?;
        Ok(Self { ebpf })
    }

    /// Attaches the pod program at TCX ingress of a pod's host-side veth (`ifname`, in the calling
    /// thread's namespace), where it sees everything the pod sends. Detached when `self` drops.
    pub fn attach_pod_veth(&mut self, ifname: &str) -> Result<(), DatapathError> {
        from_pod_program(&mut self.ebpf)?
            .attach(ifname, TcAttachType::Ingress)
            .map(|_| ())
            .map_err(|source| DatapathError::Program {
                name: FROM_POD_PROGRAM,
                source,
            })
    }

    /// What the kernel says about one of the object's maps.
    pub fn map_info(&self, name: &'static str) -> Result<MapInfo, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
        let data = match map {
            aya::maps::Map::PerCpuLruHashMap(data) | aya::maps::Map::PerCpuHashMap(data) => data,
            _ => return Err(DatapathError::Missing(name)),
        };
        data.info().map_err(|source| DatapathError::Map { name, source })
    }

    /// What the pod behind host veth `ifindex` has sent, summed over CPUs.
    pub fn from_pod_counters(&self, ifindex: u32) -> Result<TrafficCounters, DatapathError> {
        let map = self
            .ebpf
            .map(FROM_POD_STATS_MAP)
            .ok_or(DatapathError::Missing(FROM_POD_STATS_MAP))?;
        let stats: PerCpuHashMap<_, u32, TrafficCounters> =
            PerCpuHashMap::try_from(map).map_err(|source| DatapathError::Map {
                name: FROM_POD_STATS_MAP,
                source,
            })?;
        match stats.get(&ifindex, 0) {
            Ok(per_cpu) => Ok(per_cpu
                .iter()
                .fold(TrafficCounters::default(), |sum, c| TrafficCounters {
                    packets: sum.packets + c.packets,
                    bytes: sum.bytes + c.bytes,
                })),
            Err(MapError::KeyNotFound) => Ok(TrafficCounters::default()),
            Err(source) => Err(DatapathError::Map {
                name: FROM_POD_STATS_MAP,
                source,
            }),
        }
    }
}
