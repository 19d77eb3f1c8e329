//! The eBPF datapath: the kernel programs embedded at build time (`build.rs`), loaded with their
//! maps pinned, and attached through pinned links, so that everything outlives the agent: an agent
//! restart or upgrade adopts what is pinned, and established connections never notice.
//!
//! Everything lives under `<bpf-pin-path>/v<SCHEMA_VERSION>/` ([`PinLayout`]):
//!
//! ```text
//! maps/<MAP>                     every map (created once, reused by every later agent)
//! programs/from_pod, to_pod      the pod programs, for the CNI to attach to new pods' veths
//! links/cgroup/<program>         the socket LB programs' links to the cgroup (and sock_release's)
//! links/pods/<veth>-from|-to     each pod veth's TCX links
//! ```
//!
//! An upgraded agent loads its programs against the existing maps and swaps them into the
//! existing links: TCX links are updated in place (atomically); a cgroup link is replaced by a new
//! one attached before the old one goes, so no connect ever misses translation (two programs
//! translating in a row do nothing more: the second sees a backend, not a Service).
pub mod kfunc;

use std::{
    collections::BTreeSet,
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, MapData, MapError, MapInfo},
    programs::{
        CgroupAttachMode, Iter, Program, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use ferrynet_common::*;
pub use ferrynet_kernel::pins::PinLayout;

use crate::warning::ErrorList;

/// The object file `build.rs` produced from `ebpf/ferrynet-ebpf`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferrynet-programs"));

/// The kernel object, as built (an ELF file), for inspection.
pub fn object() -> &'static [u8] {
    PROGRAMS
}

/// The socket LB programs, each attached to the cgroup at its hook: the address hooks, and the
/// release hook that forgets a closed socket.
pub const SOCKET_PROGRAMS: [&str; 9] = [
    CONNECT4_PROGRAM,
    CONNECT6_PROGRAM,
    SENDMSG4_PROGRAM,
    SENDMSG6_PROGRAM,
    RECVMSG4_PROGRAM,
    RECVMSG6_PROGRAM,
    GETPEERNAME4_PROGRAM,
    GETPEERNAME6_PROGRAM,
    SOCK_RELEASE_PROGRAM,
];

/// The pod veth programs, the hook of each, and its link's suffix.
pub const POD_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (FROM_POD_PROGRAM, TcAttachType::Ingress, "from"),
    (TO_POD_PROGRAM, TcAttachType::Egress, "to"),
];

/// Whether the pod program `name` runs on pods' veths while the per-packet path translates
/// (`per_packet`) or not: `from_pod` always (external flows' replies, and per-packet
/// translation), `to_pod` only for the per-packet path's replies. Without it, `to_pod` would
/// return at once on every packet sent to a pod: a dispatch and a settings read a packet, for
/// nothing.
fn pod_program_in_force(name: &str, per_packet: bool) -> bool {
    name != TO_POD_PROGRAM || per_packet
}

/// How a program of the object is loaded.
#[derive(Debug, Clone, Copy)]
enum ProgramKind {
    /// A cgroup socket program: an address hook, or the release hook.
    Cgroup,
    Classifier,
    /// An iterator over the kernel's sockets of this kind.
    Iter(&'static str),
}

impl ProgramKind {
    fn load(
        self,
        name: &'static str,
        program: &mut aya::programs::Program,
        btf: &aya::Btf,
    ) -> Result<(), DatapathError> {
        let loaded = match self {
            Self::Cgroup => match program {
                Program::CgroupSockAddr(p) => p.load(),
                Program::CgroupSock(p) => p.load(),
                _ => Err(ProgramError::UnexpectedProgramType),
            },
            Self::Classifier => <&mut SchedClassifier>::try_from(program).and_then(|p| p.load()),
            Self::Iter(kind) => <&mut Iter>::try_from(program).and_then(|p| p.load(kind, btf)),
        };
        loaded.map_err(program_error(name))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: String, source: ProgramError },
    #[error("eBPF program {0}: its loading thread panicked")]
    LoadPanicked(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("kfunc calls: {0}")]
    Kfunc(#[from] kfunc::KfuncError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("the kernel's BTF (/sys/kernel/btf/vmlinux) cannot be read: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("pod veth {veth}: {source}")]
    PodVeth { veth: String, source: Box<DatapathError> },
    /// The settings were written (the removal generation moved), but the stamp scan they made
    /// due failed: it stays due in the settings.
    #[error("the removal generation moved to {generation}, but taking the stamps off failed: {source}")]
    StampScan {
        generation: u16,
        source: Box<DatapathError>,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatapathError + '_ {
    move |source| DatapathError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn program_error(name: &str) -> impl FnOnce(ProgramError) -> DatapathError + '_ {
    move |source| DatapathError::Program {
        name: name.to_string(),
        source,
    }
}

/// Capacities of the maps, from the agent's settings. They apply when a map is created; a map
/// adopted from an earlier run keeps its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub slots: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub sockets: u32,
    /// Frontends that may balance by Maglev at once.
    pub maglev_services: u32,
    /// The Maglev tables' size (how many map entries each takes).
    pub maglev_table_size: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: DEFAULT_MAX_SERVICES,
            backends: DEFAULT_MAX_BACKENDS,
            slots: DEFAULT_MAX_SLOTS,
            conntrack: DEFAULT_MAX_CONNTRACK,
            affinity: DEFAULT_MAX_AFFINITY,
            sockets: DEFAULT_MAX_SOCKETS,
            maglev_services: DEFAULT_MAX_MAGLEV_SERVICES,
            maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
        }
    }
}

impl MapSizes {
    /// (map, capacity) for every map whose size is a setting, as the maps are made (at least 1).
    pub fn entries(&self) -> [(&'static str, u32); 14] {
        [
            (SERVICES4_MAP, self.services),
            (SERVICES6_MAP, self.services),
            (REV_NAT_MAP, self.services),
            (SERVICE_SLOTS_MAP, self.slots),
            (BACKENDS_MAP, self.backends),
            (DOOMED_BACKENDS_MAP, self.backends),
            (CT4_MAP, self.conntrack),
            (CT6_MAP, self.conntrack),
            (AFFINITY4_MAP, self.affinity),
            (AFFINITY6_MAP, self.affinity),
            (SOCK_CONNECTED_MAP, self.sockets),
            (SOCK_REVNAT4_MAP, self.sockets),
            (SOCK_REVNAT6_MAP, self.sockets),
            (
                MAGLEV_MAP,
                self.maglev_services
                    .saturating_mul(self.maglev_table_size.div_ceil(MAGLEV_CHUNK)),
            ),
        ]
        .map(|(name, size)| (name, size.max(1)))
    }
}

/// How the datapath translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranslationModes {
    /// Socket LB at all.
    pub socket_lb: bool,
    /// Socket LB only in the node's own network namespace (pods keep seeing Service addresses,
    /// as service meshes need; the per-packet path translates for them).
    pub host_netns_only: bool,
    /// The per-packet path on pod veths.
    pub per_packet: bool,
    /// The per-packet path's flows to natively routed pods on other nodes go past the node's
    /// stack ([`CONFIG_F_STACK_BYPASS`]).
    pub stack_bypass: bool,
}

impl TranslationModes {
    /// Whether the per-packet path translates: only for what socket LB leaves to it (socket LB
    /// off, or restricted to the node's namespace). With socket LB for every namespace, pods'
    /// connections already go to backends, and the pod programs only count what pods send,
    /// so established flows pay no per-packet lookups.
    pub fn per_packet_translates(&self) -> bool {
        self.per_packet && (!self.socket_lb || self.host_netns_only)
    }

    fn flags(&self) -> u16 {
        let mut flags = 0;
        if self.socket_lb {
            flags |= CONFIG_F_SOCKET_LB;
        }
        if self.host_netns_only {
            flags |= CONFIG_F_HOST_NETNS_ONLY;
        }
        if self.per_packet_translates() {
            flags |= CONFIG_F_PER_PACKET;
            if self.stack_bypass {
                flags |= CONFIG_F_STACK_BYPASS;
            }
        }
        flags
    }
}

/// The removal generation after `generation`: never 0, which is what an earlier agent's settings
/// hold. After 0 and after the last, 1 (where every stamp is taken off: see
/// `Datapath::write_config_with_generation`).
fn next_removal_generation(generation: u16) -> u16 {
    generation.checked_add(1).unwrap_or(1)
}

/// The loaded kernel programs and their (pinned) maps.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    /// Whether pods' veths carry the per-packet path's reply program (see
    /// [`Self::set_per_packet`]).
    per_packet: bool,
    /// Whether a pod program out of force keeps its pin and links (see
    /// [`Self::keep_out_of_force`]).
    keep_out_of_force: bool,
}

/// How long the agent waits for a CNI ADD to finish a veth's links (an ADD holds the lock for a
/// few syscalls).
const POD_LINKS_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What attaching does with a TCX link that is already pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinnedLinks {
    /// Keep it as it is: the controller's scans every few seconds, which only look for new
    /// interfaces (checking every link's hook there would cost a few syscalls per interface, in
    /// the loop every change waits on).
    Keep,
    /// Keep it if its program still runs on the hook, and attach afresh if something else
    /// detached it (`bpftool link detach`): at start and at every resync.
    Verify,
    /// Swap this agent's program in, atomically (an upgrade); verified as `Verify` first.
    Replace,
}

/// What making the hooks match the loaded programs did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AttachReport {
    /// Links made.
    pub attached: usize,
    /// Links whose program was replaced by the one just loaded (an upgrade).
    pub upgraded: usize,
    /// Links already running the loaded program.
    pub kept: usize,
    /// Links removed: their program is not in force (see [`Datapath::set_per_packet`]).
    pub detached: usize,
}

/// The maps whose capacity (`pinned`: as pinned, None when unknown) is not the one `wanted`
/// asks for, with both (pure).
pub fn capacity_mismatches(
    wanted: &[(&'static str, u32)],
    pinned: impl Fn(&'static str) -> Option<u32>,
) -> Vec<(&'static str, u32, u32)> {
    wanted
        .iter()
        .filter_map(|&(name, want)| {
            let have = pinned(name)?;
            (have != want).then_some((name, have, want))
        })
        .collect()
}

impl Datapath {
    /// The pinned maps whose capacity differs from `sizes` (pinned, wanted): a map pinned by an
    /// earlier run is reused as it is, so a changed size setting takes effect only once
    /// `ferrynet-agent cleanup` has removed it.
    pub fn pinned_size_mismatches(&self, sizes: MapSizes) -> Vec<(&'static str, u32, u32)> {
        capacity_mismatches(&sizes.entries(), |name| {
            aya::maps::MapInfo::from_pin(self.pins.map(name))
                .ok()
                .map(|info| info.max_entries())
        })
    }

    /// Loads the kernel object (verifier included), with every map pinned under `pin_root` (the
    /// agent's `--bpf-pin-path`): maps an earlier run pinned are reused as they are.
    pub fn load(pin_root: &Path, sizes: MapSizes) -> Result<Self, DatapathError> {
        let pins = PinLayout::new(pin_root);
        pins.create()
            .map_err(|(path, source)| DatapathError::Io { path, source })?;
        retire_maps(&pins)?;
        // The kernel's BTF, parsed once for the kfunc ids, the loader's relocations and the
        // iterators' targets (a parse reads megabytes; the loader's `new` makes one more that
        // cannot be avoided).
        let btf = aya::Btf::from_sys_fs()?;
        let object = kfunc::resolve_all(PROGRAMS, &[SOCK_DESTROY_KFUNC], &btf)?;
        let mut loader = EbpfLoader::new();
        loader.btf(Some(&btf));
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pins.map(name));
        }
        for (name, size) in sizes.entries() {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(&object)?;
        // Every program is verified on a thread of its own: the kernel verifies them side by
        // side, and a start waits for the slowest (the pod program) instead of the sum.
        let wanted: Vec<(&'static str, ProgramKind)> = SOCKET_PROGRAMS
            .iter()
            .map(|name| (*name, ProgramKind::Cgroup))
            .chain(POD_PROGRAMS.iter().map(|(name, _, _)| (*name, ProgramKind::Classifier)))
            .chain([
                (FROM_UPLINK_PROGRAM, ProgramKind::Classifier),
                (TERMINATE_UDP_PROGRAM, ProgramKind::Iter("udp")),
                (TERMINATE_TCP_PROGRAM, ProgramKind::Iter("tcp")),
            ])
            .collect();
        let btf = &btf;
        let loaded: Vec<(&'static str, Result<(), DatapathError>)> = std::thread::scope(|scope| {
            let loads: Vec<_> = ebpf
                .programs_mut()
                .filter_map(|(name, program)| {
                    let (name, kind) = *wanted.iter().find(|(wanted, _)| *wanted == name)?;
                    Some((name, scope.spawn(move || kind.load(name, program, btf))))
                })
                .collect();
            loads
                .into_iter()
                .map(|(name, load)| (name, load.join().unwrap_or(Err(DatapathError::LoadPanicked(name)))))
                .collect()
        });
        for (name, _) in &wanted {
            if !loaded.iter().any(|(loaded, _)| loaded == name) {
                return Err(DatapathError::Missing(name));
            }
        }
        for (_, result) in loaded {
            result?;
        }
        Ok(Self {
            ebpf,
            pins,
            per_packet: true,
            keep_out_of_force: false,
        })
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    fn config_map(&mut self) -> Result<Array<&mut MapData, DatapathConfig>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(DATAPATH_CONFIG_MAP)
            .ok_or(DatapathError::Missing(DATAPATH_CONFIG_MAP))?;
        Array::try_from(map).map_err(|source| DatapathError::Map {
            name: DATAPATH_CONFIG_MAP,
            source,
        })
    }

    /// The settings the datapath runs with now (an earlier agent's, right after loading).
    pub fn current_config(&mut self) -> Result<DatapathConfig, DatapathError> {
        self.config_map()?.get(&0, 0).map_err(|source| DatapathError::Map {
            name: DATAPATH_CONFIG_MAP,
            source,
        })
    }

    /// Writes the datapath's settings into its config map, with the identity of the programs
    /// now attached, and the Service CIDRs `--service-cidrs` gives (None: read from the API
    /// later) into the tries.
    pub fn configure(
        &mut self,
        modes: TranslationModes,
        host_netns_cookie: u64,
        programs: u64,
        service_cidrs: Option<&[ipnet::IpNet]>,
    ) -> Result<(), DatapathError> {
        // External flows keep their translation across a restart: the flag stays until the
        // agent has read its maps back and says otherwise.
        let current = self.current_config()?;
        // So does a scan of the conntrack stamps an earlier run left due.
        let kept = current.flags & (CONFIG_F_EXTERNAL | CONFIG_F_STAMPS_DUE);
        // To be read from the API, the Service CIDRs start as an earlier run left them when they
        // are the API's as last read, so that a restart during an API outage keeps refusing what
        // it refused. Any others (a flag's: an agent moved from the flag to the API; or of an
        // unknown source) are no guess at the API's: nothing is refused for being in them until
        // the API is read.
        let from_api = current.flags & CONFIG_F_CIDRS_FROM_API != 0;
        let at_start = service_cidrs.or((!from_api).then_some(&[]));
        if let Some(cidrs) = at_start {
            // The mark goes before the tries change: a crash between the two writes must not
            // leave other CIDRs in the tries that a later start takes for the API's.
            if from_api {
                self.write_config(DatapathConfig {
                    flags: current.flags & !CONFIG_F_CIDRS_FROM_API,
                    ..current
                })?;
            }
            // The tries before the cover: the cover only spares lookups outside it.
            self.set_service_cidrs(cidrs)?;
        }
        let value = DatapathConfig {
            flags: modes.flags() | kept | if at_start.is_none() { CONFIG_F_CIDRS_FROM_API } else { 0 },
            // On from the earlier agent's, never back: a flow checked at a generation must not
            // find that generation again while something it needs may have gone. (The agent
            // reconciles the maps next, and moves it again for what that removes.)
            removal_generation: next_removal_generation(current.removal_generation),
            service_cidrs4: at_start.map_or(current.service_cidrs4, service_cidr_cover),
            host_netns_cookie,
            programs,
        };
        self.write_config_with_generation(value)
    }

    /// Writes the settings `config`, whose removal generation moved on. When it starts again at 1
    /// (a fresh datapath; an earlier agent's settings, which hold 0, after a downgrade; or the
    /// 16-bit count come round), entries may be stamped with the generations about to come
    /// (before a downgrade, or before the count came round): every stamp goes, so that no flow
    /// goes by an entry checked before a removal. The scan is due ([`CONFIG_F_STAMPS_DUE`], in
    /// the same write) from then until one has finished at a later generation: the scan right
    /// after the write of 1 takes off what was stamped before it, and the one at the next move
    /// (or the next start, if the agent stops meanwhile) what a program that read the settings
    /// just before the write stamped behind the first scan's back.
    fn write_config_with_generation(&mut self, mut config: DatapathConfig) -> Result<(), DatapathError> {
        if config.removal_generation == 1 {
            config.flags |= CONFIG_F_STAMPS_DUE;
        }
        self.write_config(config)?;
        if config.flags & CONFIG_F_STAMPS_DUE == 0 {
            return Ok(());
        }
        self.scan_due_stamps(config.removal_generation)
            .map_err(|source| DatapathError::StampScan {
                generation: config.removal_generation,
                source: Box::new(source),
            })
    }

    /// The stamp scan due at removal generation `generation`: every stamp goes, and the scan is
    /// done unless `generation` is 1 (see [`Self::write_config_with_generation`]).
    fn scan_due_stamps(&mut self, generation: u16) -> Result<(), DatapathError> {
        let forgotten = self.forget_checked_flows()?;
        if forgotten > 0 {
            tracing::info!(
                entries = forgotten,
                generation,
                "the removal generation started again at 1: conntrack entries checked at earlier ones are checked afresh"
            );
        }
        if generation != 1 {
            let mut done = self.current_config()?;
            done.flags &= !CONFIG_F_STAMPS_DUE;
            self.write_config(done)?;
        }
        Ok(())
    }

    /// Finishes a stamp scan still due: at a generation after 1 (its scan failed), the scan
    /// runs again in place. At 1 its second pass needs a later generation: true says the
    /// generation must move (which runs it).
    pub fn finish_due_stamp_scan(&mut self) -> Result<bool, DatapathError> {
        let config = self.current_config()?;
        if config.flags & CONFIG_F_STAMPS_DUE == 0 {
            return Ok(false);
        }
        if config.removal_generation == 1 {
            return Ok(true);
        }
        self.scan_due_stamps(config.removal_generation)?;
        Ok(false)
    }

    fn write_config(&mut self, config: DatapathConfig) -> Result<(), DatapathError> {
        self.config_map()?
            .set(0, config, 0)
            .map_err(|source| DatapathError::Map {
                name: DATAPATH_CONFIG_MAP,
                source,
            })
    }

    /// Takes the map called `name` out of the loaded object, for the service controller to own.
    pub fn take_map(&mut self, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
        self.ebpf.take_map(name).ok_or(DatapathError::Missing(name))
    }

    /// Attaches the socket LB programs to `cgroup` through pinned links. Links that exist are
    /// kept, unless `replace` (the attached programs are not these): then each is replaced
    /// without a gap.
    pub fn attach_socket_lb(&mut self, cgroup: &Path, replace: bool) -> Result<AttachReport, DatapathError> {
        let dir = File::open(cgroup).map_err(io(cgroup))?;
        let mut report = AttachReport::default();
        for name in SOCKET_PROGRAMS {
            let path = self.pins.cgroup_link(name);
            let existing = pinned_link(&path)?;
            if existing.is_some() && !replace {
                report.kept += 1;
                continue;
            }
            // The new link first, then the old one goes: every connect meets a program.
            let link = self.attach_to_cgroup(name, &dir, &path)?;
            if let Some(old) = existing {
                drop(old.unpin().map_err(io(&path))?);
                report.upgraded += 1;
            } else {
                report.attached += 1;
            }
            link.pin(&path).map_err(|source| DatapathError::Pin {
                path: path.clone(),
                source,
            })?;
        }
        Ok(report)
    }

    /// Attaches the cgroup program `name` to `cgroup` through a new link, for pinning at `path`.
    fn attach_to_cgroup(&mut self, name: &'static str, cgroup: &File, path: &Path) -> Result<FdLink, DatapathError> {
        let program = self.ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?;
        let link: Result<FdLink, LinkError> = match program {
            Program::CgroupSockAddr(program) => {
                let id = program
                    .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                    .map_err(program_error(name))?;
                program.take_link(id).map_err(program_error(name))?.try_into()
            }
            Program::CgroupSock(program) => {
                let id = program
                    .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                    .map_err(program_error(name))?;
                program.take_link(id).map_err(program_error(name))?.try_into()
            }
            _ => return Err(program_error(name)(ProgramError::UnexpectedProgramType)),
        };
        link.map_err(|source| DatapathError::Link {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Removes the socket LB links (socket LB turned off): their programs detach.
    pub fn detach_socket_lb(&mut self) -> Result<(), ErrorList<DatapathError>> {
        let mut errors = ErrorList::default();
        for name in SOCKET_PROGRAMS {
            let path = self.pins.cgroup_link(name);
            match pinned_link(&path) {
                Ok(Some(link)) => {
                    if let Err(e) = link.unpin() {
                        errors.push(io(&path)(e));
                    }
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        errors.into_result()
    }

    /// Carries the sockets that an agent from before [`SOCK_CONNECTED_MAP`] recorded in its
    /// `SOCK_BACKEND` map (socket cookie → backend id) into `SOCK_CONNECTED`, so that they are
    /// still terminated if their backend goes, then drops that map. The Service address comes
    /// from the socket's reverse NAT entry (which stays, for `getpeername`). Call it once this
    /// agent's socket programs are attached (or detached), so that no connect writes the old map
    /// any more. Returns how many sockets were carried over.
    pub fn adopt_retired_socket_backends(&mut self) -> Result<usize, DatapathError> {
        use aya::maps::HashMap;
        let path = self.pins.map(RETIRED_SOCKET_BACKENDS_MAP);
        if !path.exists() {
            return Ok(0);
        }
        let map_error = |name| move |source| DatapathError::Map { name, source };
        let old = MapData::from_pin(&path).map_err(map_error(RETIRED_SOCKET_BACKENDS_MAP))?;
        let old = aya::maps::Map::from_map_data(old).map_err(map_error(RETIRED_SOCKET_BACKENDS_MAP))?;
        let old: HashMap<_, u64, u32> = HashMap::try_from(old).map_err(map_error(RETIRED_SOCKET_BACKENDS_MAP))?;
        // Entries the kernel evicts while we walk are skipped: those sockets are gone.
        let backends: std::collections::HashMap<u64, u32> = old.iter().filter_map(Result::ok).collect();
        let connected = if backends.is_empty() {
            Vec::new()
        } else {
            let current = |id: u32| -> Option<BackendValue> {
                let map = self.ebpf.map(BACKENDS_MAP)?;
                HashMap::<_, u32, BackendValue>::try_from(map).ok()?.get(&id, 0).ok()
            };
            // Each socket's reverse entries, as (backend address, backend port, the Service).
            let mut reverse: std::collections::HashMap<u64, Vec<([u32; 4], u16, SockRevNatValue)>> =
                std::collections::HashMap::new();
            if let Some(map) = self.ebpf.map(SOCK_REVNAT4_MAP) {
                let map: HashMap<_, SockRevNatKey4, SockRevNatValue> =
                    HashMap::try_from(map).map_err(map_error(SOCK_REVNAT4_MAP))?;
                for (key, value) in map.iter().filter_map(Result::ok) {
                    if backends.contains_key(&key.cookie) {
                        reverse
                            .entry(key.cookie)
                            .or_default()
                            .push(([key.addr, 0, 0, 0], key.port, value));
                    }
                }
            }
            if let Some(map) = self.ebpf.map(SOCK_REVNAT6_MAP) {
                let map: HashMap<_, SockRevNatKey6, SockRevNatValue> =
                    HashMap::try_from(map).map_err(map_error(SOCK_REVNAT6_MAP))?;
                for (key, value) in map.iter().filter_map(Result::ok) {
                    if backends.contains_key(&key.cookie) {
                        reverse.entry(key.cookie).or_default().push((key.addr, key.port, value));
                    }
                }
            }
            backends
                .iter()
                .filter_map(|(&cookie, &backend)| {
                    let entries = reverse.get(&cookie)?;
                    // A UDP socket may also have sent unconnected datagrams to other Services:
                    // its peer is the backend's address, while the backend is still there.
                    // (Looked up only then: a syscall each.)
                    let (addr, port, service) = match entries.as_slice() {
                        [only] => only,
                        _ => {
                            let peer = current(backend).map(|b| (b.addr, b.port));
                            entries
                                .iter()
                                .find(|(addr, port, _)| Some((*addr, *port)) == peer)
                                .or_else(|| entries.first())?
                        }
                    };
                    Some((
                        cookie,
                        SockConnectedValue {
                            backend_addr: *addr,
                            service_addr: service.addr,
                            backend,
                            service: service.service,
                            backend_port: *port,
                            service_port: service.port,
                            _pad: 0,
                        },
                    ))
                })
                .collect()
        };
        let map = self
            .ebpf
            .map_mut(SOCK_CONNECTED_MAP)
            .ok_or(DatapathError::Missing(SOCK_CONNECTED_MAP))?;
        let mut map: HashMap<_, u64, SockConnectedValue> =
            HashMap::try_from(map).map_err(map_error(SOCK_CONNECTED_MAP))?;
        for (cookie, value) in &connected {
            map.insert(cookie, value, 0).map_err(map_error(SOCK_CONNECTED_MAP))?;
        }
        std::fs::remove_file(&path).map_err(io(&path))?;
        tracing::info!(
            "carried {} sockets over from {RETIRED_SOCKET_BACKENDS_MAP} to {SOCK_CONNECTED_MAP}, and removed {RETIRED_SOCKET_BACKENDS_MAP}",
            connected.len()
        );
        Ok(connected.len())
    }

    /// Writes the cluster's Service CIDRs into the tries, replacing what they held: the new
    /// ones first, then those no longer wanted go, so that an address in both is refused
    /// throughout (unless old and new together are more than a trie holds: then the old go
    /// first). Their cover goes into the settings ([`Self::configure`] at a start,
    /// [`Self::set_service_cidr_cover`] after), written after them.
    pub fn set_service_cidrs(&mut self, cidrs: &[ipnet::IpNet]) -> Result<(), DatapathError> {
        self.set_prefixes((SERVICE_CIDRS4_MAP, SERVICE_CIDRS6_MAP), cidrs, MAX_SERVICE_CIDRS)
    }

    /// Writes the other nodes' PodCIDRs this node routes natively into the tries whose flows go
    /// past the node's stack ([`PEER_PODS4_MAP`]), as [`Self::set_service_cidrs`] does: a CIDR in
    /// both the old and the new set stays throughout.
    pub fn set_peer_pod_cidrs(&mut self, cidrs: &[ipnet::IpNet]) -> Result<(), DatapathError> {
        self.set_prefixes((PEER_PODS4_MAP, PEER_PODS6_MAP), cidrs, MAX_PEER_POD_CIDRS)
    }

    /// Makes the LPM tries `names` (IPv4, IPv6) hold exactly `cidrs`, each trie `capacity` at
    /// most: the new ones first, then those no longer wanted go (unless old and new together
    /// are more than a trie holds: then the old go first).
    fn set_prefixes(
        &mut self,
        names: (&'static str, &'static str),
        cidrs: &[ipnet::IpNet],
        capacity: u32,
    ) -> Result<(), DatapathError> {
        use aya::maps::lpm_trie::{Key, LpmTrie};
        fn replace<K: aya::Pod + PartialEq>(
            map: &mut aya::maps::Map,
            name: &'static str,
            wanted: &[Key<K>],
            capacity: u32,
        ) -> Result<(), DatapathError> {
            let map_err = |source| DatapathError::Map { name, source };
            let mut trie: LpmTrie<&mut MapData, K, u8> = LpmTrie::try_from(map).map_err(map_err)?;
            let same = |a: &Key<K>, b: &Key<K>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
            let stale: Vec<Key<K>> = trie
                .keys()
                .filter_map(Result::ok)
                .filter(|key| !wanted.iter().any(|w| same(w, key)))
                .collect();
            // The kernel refuses an insert into a full trie.
            let stale_first = wanted.len() + stale.len() > capacity as usize;
            if stale_first {
                for key in &stale {
                    trie.remove(key).map_err(map_err)?;
                }
            }
            for key in wanted {
                trie.insert(key, 1, 0).map_err(map_err)?;
            }
            if !stale_first {
                for key in &stale {
                    trie.remove(key).map_err(map_err)?;
                }
            }
            Ok(())
        }
        let (mut v4, mut v6): (Vec<Key<u32>>, Vec<Key<[u32; 4]>>) = (Vec::new(), Vec::new());
        for cidr in cidrs {
            match cidr {
                ipnet::IpNet::V4(n) => v4.push(Key::new(u32::from(n.prefix_len()), addr4(n.network().octets()))),
                ipnet::IpNet::V6(n) => v6.push(Key::new(u32::from(n.prefix_len()), addr6(n.network().octets()))),
            }
        }
        let map = self.ebpf.map_mut(names.0).ok_or(DatapathError::Missing(names.0))?;
        replace(map, names.0, &v4, capacity)?;
        let map = self.ebpf.map_mut(names.1).ok_or(DatapathError::Missing(names.1))?;
        replace(map, names.1, &v6, capacity)
    }

    /// Writes the interfaces that carry the uplink program ([`UPLINKS_MAP`]), by index.
    pub fn set_uplinks(&mut self, uplinks: BTreeSet<u32>) -> Result<usize, DatapathError> {
        self.set_exactly(UPLINKS_MAP, uplinks)
    }

    /// Writes the cover of the IPv4 Service CIDRs `cidrs`, read from the API, into the settings,
    /// which say from then on that the tries hold the API's ([`CONFIG_F_CIDRS_FROM_API`]); after
    /// [`Self::set_service_cidrs`]: the cover only spares trie lookups for addresses outside it.
    pub fn set_api_service_cidr_cover(&mut self, cidrs: &[ipnet::IpNet]) -> Result<(), DatapathError> {
        let config = self.current_config()?;
        let written = DatapathConfig {
            service_cidrs4: service_cidr_cover(cidrs),
            flags: config.flags | CONFIG_F_CIDRS_FROM_API,
            ..config
        };
        if written == config {
            return Ok(());
        }
        self.write_config(written)
    }

    /// What the kernel programs counted, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        let map = self
            .ebpf
            .map(DATAPATH_STATS_MAP)
            .ok_or(DatapathError::Missing(DATAPATH_STATS_MAP))?;
        let stats: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(map).map_err(|source| DatapathError::Map {
                name: DATAPATH_STATS_MAP,
                source,
            })?;
        let mut out = Vec::new();
        for (i, name) in STAT_NAMES.iter().enumerate() {
            let total = stats
                .get(&(i as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            out.push((*name, total));
        }
        Ok(out)
    }

    /// Says whether the per-packet path translates (it does until told otherwise): without it,
    /// pods' veths carry `from_pod` alone, from the next [`Self::pin_pod_programs`] (for the
    /// CNI's new veths) and [`Self::attach_pod_veth`] (for existing ones) on.
    pub fn set_per_packet(&mut self, per_packet: bool) {
        self.per_packet = per_packet;
    }

    /// While `keep`, a pod program out of force keeps the pin and the links it has (they are
    /// neither made nor removed): until an agent's settings turn the per-packet path off, an
    /// earlier run's may still have it on, and its flows need `to_pod`.
    pub fn keep_out_of_force(&mut self, keep: bool) {
        self.keep_out_of_force = keep;
    }

    /// Removes the pins of the pod programs out of force (the CNI then attaches them to no new
    /// veth), leaving the others' as they are.
    pub fn unpin_out_of_force_programs(&self) -> Result<(), DatapathError> {
        for (name, _, _) in POD_PROGRAMS {
            let path = self.pins.program(name);
            if !pod_program_in_force(name, self.per_packet) && path.exists() {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    /// Pins the pod programs in force where the CNI finds them, replacing older pins, and
    /// removes the pin of one out of force (so that the CNI attaches it to no new veth).
    ///
    /// A program is pinned under a name of its own first and then renamed over the older pin:
    /// a CNI ADD meanwhile finds the older program or this one, never no pin at all (which
    /// would leave the new pod's veth bare until the agent's next scan).
    pub fn pin_pod_programs(&mut self) -> Result<(), DatapathError> {
        for (name, _, _) in POD_PROGRAMS {
            let path = self.pins.program(name);
            let pinned = path.exists();
            let wanted = pod_program_in_force(name, self.per_packet) || (self.keep_out_of_force && pinned);
            // Left by an agent stopped between the pin and the rename.
            let pinning = self.pins.program(&format!("pinning-{name}"));
            if pinning.exists() {
                std::fs::remove_file(&pinning).map_err(io(&pinning))?;
            }
            if !wanted {
                if pinned {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                }
                continue;
            }
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?
                .try_into()
                .map_err(program_error(name))?;
            program.pin(&pinning).map_err(|source| DatapathError::Pin {
                path: pinning.clone(),
                source,
            })?;
            std::fs::rename(&pinning, &path).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Attaches the pod programs in force to the host veth `veth` (in the calling thread's
    /// namespace) through pinned TCX links, first on their hooks, and detaches one out of force
    /// (its pinned link goes); `pinned` says what happens to links that exist.
    pub fn attach_pod_veth(&mut self, veth: &str, pinned: PinnedLinks) -> Result<AttachReport, DatapathError> {
        let mut report = AttachReport::default();
        let as_wanted = |(name, _, suffix): &(&str, TcAttachType, &str)| {
            let linked = self.pins.pod_link(veth, suffix).exists();
            if pod_program_in_force(name, self.per_packet) {
                linked
            } else {
                self.keep_out_of_force || !linked
            }
        };
        if pinned == PinnedLinks::Keep && POD_PROGRAMS.iter().all(as_wanted) {
            report.kept += POD_PROGRAMS
                .iter()
                .filter(|(name, _, _)| pod_program_in_force(name, self.per_packet))
                .count();
            return Ok(report);
        }
        // The CNI attaches to the veths it makes, under the same lock.
        let _lock = self
            .pins
            .lock_pod_links(POD_LINKS_LOCK_WAIT)
            .map_err(io(&self.pins.pod_links()))?;
        for (name, hook, suffix) in POD_PROGRAMS {
            let path = self.pins.pod_link(veth, suffix);
            if pod_program_in_force(name, self.per_packet) {
                self.attach_tcx(name, hook, veth, &path, pinned, &mut report)?;
            } else if !self.keep_out_of_force
                && let Some(link) = pinned_link(&path)?
            {
                // The last reference to the link: it detaches as it is dropped.
                drop(link.unpin().map_err(io(&path))?);
                report.detached += 1;
            }
        }
        Ok(report)
    }

    /// The controller's scan of the node's pod veths (`veths`, listed just before): attaches the
    /// pod programs to those that lack them (`pinned`: what happens to links that exist) and
    /// forgets the links of veths that are gone. A veth deleted since the listing is no
    /// failure. Keeps going past failures and reports them all.
    pub fn scan_pod_veths(&mut self, veths: &[String], pinned: PinnedLinks) -> Result<(), ErrorList<DatapathError>> {
        let mut errors = ErrorList::default();
        let on_veth = |veth: &str, source| DatapathError::PodVeth {
            veth: veth.to_string(),
            source: Box::new(source),
        };
        for veth in veths {
            if let Err(e) = self.attach_pod_veth(veth, pinned)
                && interface_exists(veth)
            {
                errors.push(on_veth(veth, e));
            }
        }
        let present: BTreeSet<&str> = veths.iter().map(String::as_str).collect();
        for veth in pinned_pod_veths(&self.pins) {
            if !present.contains(veth.as_str())
                && let Err(list) = unpin_pod_veth(&self.pins, &veth)
            {
                errors.0.extend(list.0.into_iter().map(|e| on_veth(&veth, e)));
            }
        }
        errors.into_result()
    }

    /// Attaches the uplink program to the ingress of `uplink` (interface `ifindex`), as
    /// [`Self::attach_pod_veth`] does.
    pub fn attach_uplink(
        &mut self,
        uplink: &str,
        ifindex: u32,
        pinned: PinnedLinks,
    ) -> Result<AttachReport, DatapathError> {
        let mut report = AttachReport::default();
        let path = self.pins.uplink_link(ifindex);
        self.attach_tcx(
            FROM_UPLINK_PROGRAM,
            TcAttachType::Ingress,
            uplink,
            &path,
            pinned,
            &mut report,
        )?;
        Ok(report)
    }

    /// Attaches the TC program `name` to `hook` of `iface` through a TCX link pinned at `path`.
    fn attach_tcx(
        &mut self,
        name: &'static str,
        hook: TcAttachType,
        iface: &str,
        path: &Path,
        pinned: PinnedLinks,
        report: &mut AttachReport,
    ) -> Result<(), DatapathError> {
        let mut existing = pinned_link(path)?;
        let replace = pinned == PinnedLinks::Replace;
        if existing.is_some() && pinned != PinnedLinks::Keep && !tcx_link_attached(name, path, iface, hook)? {
            // Detached by something else (`bpftool link detach`): still pinned, but running
            // nothing. Attached afresh.
            if let Some(stale) = existing.take() {
                drop(stale.unpin().map_err(io(path))?);
            }
        }
        if existing.is_some() && !replace {
            report.kept += 1;
            return Ok(());
        }
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing(name))?
            .try_into()
            .map_err(program_error(name))?;
        let link_id = match existing {
            Some(old) => {
                let old: FdLink = old.unpin().map_err(io(path))?;
                let old = SchedClassifierLink::try_from(old).map_err(|source| DatapathError::Link {
                    path: path.to_path_buf(),
                    source,
                })?;
                report.upgraded += 1;
                program.attach_to_link(old).map_err(program_error(name))?
            }
            None => {
                let attached = program.attach_with_options(
                    iface,
                    hook,
                    TcAttachOptions::TcxOrder(aya::programs::LinkOrder::first()),
                );
                match attached {
                    Ok(link_id) => {
                        report.attached += 1;
                        link_id
                    }
                    // A CNI that went on without the lock (this agent held it too long)
                    // attached it, and pins its own link.
                    Err(e) => {
                        let running = program.info().map_err(program_error(name))?.id();
                        let (_, on_hook) = SchedClassifier::query_tcx(iface, hook).map_err(program_error(name))?;
                        if !on_hook.iter().any(|p| p.id() == running) {
                            return Err(program_error(name)(e));
                        }
                        report.kept += 1;
                        return Ok(());
                    }
                }
            }
        };
        let link: FdLink = program
            .take_link(link_id)
            .map_err(program_error(name))?
            .try_into()
            .map_err(|source| DatapathError::Link {
                path: path.to_path_buf(),
                source,
            })?;
        link.pin(path).map_err(|source| DatapathError::Pin {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(())
    }

    /// Makes the node address maps hold exactly `addresses` (the addresses NodePorts answer on).
    /// Returns how many entries changed.
    pub fn set_node_addresses(&mut self, addresses: &BTreeSet<std::net::IpAddr>) -> Result<usize, DatapathError> {
        let v4 = addresses.iter().filter_map(|a| match a {
            std::net::IpAddr::V4(v4) => Some(addr4(v4.octets())),
            std::net::IpAddr::V6(_) => None,
        });
        let changed = self.set_exactly(NODE_ADDRS4_MAP, v4.collect())?;
        let v6 = addresses.iter().filter_map(|a| match a {
            std::net::IpAddr::V6(v6) => Some(addr6(v6.octets())),
            std::net::IpAddr::V4(_) => None,
        });
        Ok(changed + self.set_exactly(NODE_ADDRS6_MAP, v6.collect())?)
    }

    /// Makes the set-like hash map `name` (key → 1) hold exactly `want`; returns the changes.
    fn set_exactly<K: aya::Pod + Ord>(
        &mut self,
        name: &'static str,
        want: BTreeSet<K>,
    ) -> Result<usize, DatapathError> {
        let map_err = |source| DatapathError::Map { name, source };
        let map = self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?;
        let mut set: aya::maps::HashMap<&mut MapData, K, u8> = aya::maps::HashMap::try_from(map).map_err(map_err)?;
        let have: BTreeSet<K> = set.keys().filter_map(Result::ok).collect();
        let mut changed = 0;
        for gone in have.difference(&want) {
            set.remove(gone).map_err(map_err)?;
            changed += 1;
        }
        for new in want.difference(&have) {
            set.insert(new, 1, 0).map_err(map_err)?;
            changed += 1;
        }
        Ok(changed)
    }

    /// Writes the addresses flows to externalIPs and load balancer IPs are SNATed to (the node's
    /// InternalIPs, the first of each family).
    pub fn set_snat_addresses(&mut self, internal_ips: &[std::net::IpAddr]) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(SNAT_ADDRS_MAP)
            .ok_or(DatapathError::Missing(SNAT_ADDRS_MAP))?;
        let mut array: Array<&mut MapData, NodeAddress> =
            Array::try_from(map).map_err(|source| DatapathError::Map {
                name: SNAT_ADDRS_MAP,
                source,
            })?;
        let v4 = internal_ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some([addr4(v4.octets()), 0, 0, 0]),
            std::net::IpAddr::V6(_) => None,
        });
        let v6 = internal_ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V6(v6) => Some(addr6(v6.octets())),
            std::net::IpAddr::V4(_) => None,
        });
        for (index, value) in [(0, v4), (1, v6)] {
            let value = value.unwrap_or_default();
            if array.get(&index, 0).ok() != Some(value) {
                array.set(index, value, 0).map_err(|source| DatapathError::Map {
                    name: SNAT_ADDRS_MAP,
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Takes [`CT_F_BACKEND`] off every conntrack entry that has it: their flows are looked up
    /// again at their next packet, and stamped afresh. Returns how many entries it rewrote.
    fn forget_checked_flows(&mut self) -> Result<usize, DatapathError> {
        /// `BPF_EXIST` (linux/bpf.h): an update of an element that exists, never an insert.
        const BPF_EXIST: u64 = 2;
        fn forget<K: aya::Pod>(map: &mut aya::maps::Map, name: &'static str) -> Result<usize, DatapathError> {
            let mut ct = aya::maps::HashMap::<_, K, CtValue>::try_from(map)
                .map_err(|source| DatapathError::Map { name, source })?;
            let keys: Vec<K> = ct.keys().filter_map(Result::ok).collect();
            let mut rewritten = 0;
            for key in keys {
                // Read again just before the write: the walk takes a while, and meanwhile a
                // flow may have ended and its tuple been taken by a new one, or been refreshed.
                let value = match ct.get(&key, 0) {
                    Ok(value) if value.flags & CT_F_BACKEND != 0 => value,
                    Ok(_) | Err(MapError::KeyNotFound) => continue,
                    Err(source) => return Err(DatapathError::Map { name, source }),
                };
                let value = CtValue {
                    flags: value.flags & !CT_F_BACKEND,
                    ..value
                };
                // Only entries still there (BPF_EXIST): a flow that ended meanwhile stays ended.
                match ct.insert(key, value, BPF_EXIST) {
                    Ok(()) => rewritten += 1,
                    Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(source) => return Err(DatapathError::Map { name, source }),
                }
            }
            Ok(rewritten)
        }
        let mut rewritten = 0;
        for name in [CT4_MAP, CT6_MAP] {
            let map = self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?;
            rewritten += if name == CT4_MAP {
                forget::<CtKey4>(map, name)?
            } else {
                forget::<CtKey6>(map, name)?
            };
        }
        Ok(rewritten)
    }

    /// Moves the removal generation on: after a frontend or backend was removed from the maps
    /// (or a frontend lost its last endpoint), so that the per-packet path looks every known
    /// flow's frontend and backend up again at its next packet.
    pub fn advance_removal_generation(&mut self) -> Result<(), DatapathError> {
        let mut config = self.current_config()?;
        config.removal_generation = next_removal_generation(config.removal_generation);
        self.write_config_with_generation(config)
    }

    /// Turns the pod programs' check for replies of external flows on or off (on while any
    /// NodePort is programmed, so that without one a pod's packet pays nothing for it).
    pub fn set_external(&mut self, on: bool) -> Result<(), DatapathError> {
        let mut config = self.current_config()?;
        let flags = if on {
            config.flags | CONFIG_F_EXTERNAL
        } else {
            config.flags & !CONFIG_F_EXTERNAL
        };
        if flags == config.flags {
            return Ok(());
        }
        config.flags = flags;
        self.write_config(config)
    }

    /// Runs the socket terminators once in the calling thread's network namespace: every socket
    /// whose backend is in `DOOMED_BACKENDS` is destroyed.
    pub fn terminate_sockets_here(&mut self) -> Result<(), DatapathError> {
        for name in [TERMINATE_UDP_PROGRAM, TERMINATE_TCP_PROGRAM] {
            let program: &mut Iter = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?
                .try_into()
                .map_err(program_error(name))?;
            let link_id = program.attach().map_err(program_error(name))?;
            let link = program.take_link(link_id).map_err(program_error(name))?;
            let mut file = link.into_file().map_err(|source| DatapathError::Link {
                path: PathBuf::from(name),
                source,
            })?;
            // Reading the iterator to its end runs the program once per socket.
            std::io::copy(&mut file, &mut std::io::sink()).map_err(io(Path::new(name)))?;
        }
        Ok(())
    }

    /// What the kernel says about one of the object's maps.
    pub fn map_info(&self, name: &'static str) -> Result<MapInfo, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
        map_data(map)
            .ok_or(DatapathError::Missing(name))?
            .info()
            .map_err(|source| DatapathError::Map { name, source })
    }
}

/// Maps that earlier agents pinned and this one no longer has: an upgraded node drops them, so
/// that they neither hold memory nor outlive the datapath that used them.
const RETIRED_MAPS: [&str; 1] = [
    // Per-pod packet counters: a lookup on every packet a pod sent, read by no one.
    "FROM_POD_STATS",
];

/// The IPv4 cover of `cidrs` for the settings ([`service_cidr_cover4`]).
pub fn service_cidr_cover(cidrs: &[ipnet::IpNet]) -> u32 {
    let v4: Vec<(u32, u8)> = cidrs
        .iter()
        .filter_map(|cidr| match cidr {
            ipnet::IpNet::V4(v4) => Some((u32::from(v4.network()), v4.prefix_len())),
            ipnet::IpNet::V6(_) => None,
        })
        .collect();
    service_cidr_cover4(&v4)
}

/// Socket cookie → backend id, which agents before [`SOCK_CONNECTED_MAP`] wrote at every connect:
/// retired by [`Datapath::adopt_retired_socket_backends`], which carries its sockets over.
pub const RETIRED_SOCKET_BACKENDS_MAP: &str = "SOCK_BACKEND";

fn retire_maps(pins: &PinLayout) -> Result<(), DatapathError> {
    for name in RETIRED_MAPS {
        let path = pins.map(name);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!("removed the map {name}, which this version no longer uses"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    // A counters map pinned before a counter was added holds too few for it (a pinned map is
    // reused as it is): it goes, and the counters start again.
    let stats = pins.map(DATAPATH_STATS_MAP);
    if let Ok(info) = aya::maps::MapInfo::from_pin(&stats)
        && info.max_entries() < STAT_COUNT
    {
        std::fs::remove_file(&stats).map_err(io(&stats))?;
        tracing::info!("replaced the map {DATAPATH_STATS_MAP}, which held fewer counters than this version has");
    }
    Ok(())
}

/// Names of the kernel programs' counters, by [`Stat`] index.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "sock_translated",
    "sock_refused",
    "packet_flows_translated",
    "packets_translated",
    "packets_refused",
    "conntrack_full",
    "sock_revnat_full",
    "sockets_terminated",
    "backend_missing",
    "affinity_full",
    "fib_failed",
    "snat_ports_exhausted",
    "external_flows_translated",
    "external_dropped",
    "packets_past_stack",
];

/// (map, entries, capacity) of the maps pinned under `pins`. Entries are counted by walking
/// each map's keys (one system call per entry), except for the maps in `known`, whose entries
/// the caller already knows.
pub fn map_fill(pins: &PinLayout, known: &[(&'static str, u64)]) -> MapFill {
    use aya::maps::{HashMap, Map, lpm_trie::LpmTrie};
    let mut out = Vec::new();
    let mut expired_removed = 0;
    let now = monotonic_ns();
    for name in PINNED_MAPS {
        let Ok(data) = MapData::from_pin(pins.map(name)) else {
            continue;
        };
        let Ok(info) = data.info() else { continue };
        let capacity = u64::from(info.max_entries());
        if let Some((_, entries)) = known.iter().find(|(k, _)| *k == name) {
            out.push((name, *entries, capacity));
            continue;
        }
        let Ok(map) = Map::from_map_data(data) else {
            continue;
        };
        macro_rules! count {
            ($k:ty, $v:ty) => {
                HashMap::<_, $k, $v>::try_from(map).map_or(0, |m| m.keys().count() as u64)
            };
        }
        // A conntrack map's walk removes its expired entries, and counts what is left.
        macro_rules! sweep {
            ($k:ty) => {
                HashMap::<_, $k, CtValue>::try_from(map).map_or(0, |mut m| {
                    let (left, removed) = sweep_conntrack(&mut m, now, |k| k.proto);
                    expired_removed += removed;
                    left
                })
            };
        }
        let entries = match name {
            SERVICES4_MAP => count!(ServiceKey4, ServiceValue),
            SERVICES6_MAP => count!(ServiceKey6, ServiceValue),
            SERVICE_SLOTS_MAP => count!(SlotKey, u32),
            BACKENDS_MAP => count!(u32, BackendValue),
            REV_NAT_MAP => count!(u32, RevNatValue),
            CT4_MAP => sweep!(CtKey4),
            CT6_MAP => sweep!(CtKey6),
            AFFINITY4_MAP => count!(AffinityKey4, AffinityValue),
            AFFINITY6_MAP => count!(AffinityKey6, AffinityValue),
            SOCK_CONNECTED_MAP => count!(u64, SockConnectedValue),
            SOCK_REVNAT4_MAP => count!(SockRevNatKey4, SockRevNatValue),
            SOCK_REVNAT6_MAP => count!(SockRevNatKey6, SockRevNatValue),
            DOOMED_BACKENDS_MAP => count!(u32, u8),
            NODE_ADDRS4_MAP => count!(u32, u8),
            NODE_ADDRS6_MAP => count!([u32; 4], u8),
            SERVICE_CIDRS4_MAP => LpmTrie::<_, u32, u8>::try_from(map).map_or(0, |m| m.keys().count() as u64),
            SERVICE_CIDRS6_MAP => LpmTrie::<_, [u32; 4], u8>::try_from(map).map_or(0, |m| m.keys().count() as u64),
            SOURCE_RANGES4_MAP => {
                LpmTrie::<_, SourceRangeKey4, u8>::try_from(map).map_or(0, |m| m.keys().count() as u64)
            }
            SOURCE_RANGES6_MAP => {
                LpmTrie::<_, SourceRangeKey6, u8>::try_from(map).map_or(0, |m| m.keys().count() as u64)
            }
            MAGLEV_MAP => HashMap::<_, MaglevKey, MaglevChunk>::try_from(map).map_or(0, |m| m.keys().count() as u64),
            PEER_PODS4_MAP => LpmTrie::<_, u32, u8>::try_from(map).map_or(0, |m| m.keys().count() as u64),
            PEER_PODS6_MAP => LpmTrie::<_, [u32; 4], u8>::try_from(map).map_or(0, |m| m.keys().count() as u64),
            UPLINKS_MAP => count!(u32, u8),
            _ => continue,
        };
        out.push((name, entries, capacity));
    }
    MapFill {
        fill: out,
        expired_removed,
    }
}

/// What [`map_fill`] found: (map, entries, capacity), and how many expired conntrack entries it
/// removed.
#[derive(Debug, Default)]
pub struct MapFill {
    pub fill: Vec<(&'static str, u64, u64)>,
    pub expired_removed: u64,
}

/// The kernel programs' clock (`bpf_ktime_get_ns`: CLOCK_MONOTONIC), in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Removes the conntrack entries that have expired at `now` (what the programs would take for no
/// flow: closed for [`CT_CLOSED_NS`], or idle past the protocol's limit) and returns how many
/// entries are left and how many went. The programs remove an expired entry only when a packet
/// meets it again, and an LRU map only evicts when it is full: without the sweep, a node that
/// serves many short NodePort connections keeps its map full of finished flows, so that every
/// new flow's insert evicts (in a full LRU map even a flow's fresh entry on another CPU), and the
/// map's fill says nothing about the live flows.
///
/// Each entry is read again just before its removal, and stays unless it is still expired: a
/// packet may have reopened the tuple meanwhile (a flow written between that read and the
/// removal, a few microseconds, is the one it cannot see).
fn sweep_conntrack<K: aya::Pod + Eq>(
    map: &mut aya::maps::HashMap<MapData, K, CtValue>,
    now: u64,
    proto: impl Fn(&K) -> u8,
) -> (u64, u64) {
    // Keys are collected first: removing while walking would restart the kernel's iteration.
    let mut walked = 0;
    let mut expired = Vec::new();
    for (key, value) in map.iter().filter_map(Result::ok) {
        walked += 1;
        if value.expired(now, proto(&key)) {
            expired.push(key);
        }
    }
    let mut removed = 0;
    for key in expired {
        let still = map.get(&key, 0).is_ok_and(|value| value.expired(now, proto(&key)));
        if still && map.remove(&key).is_ok() {
            removed += 1;
        }
    }
    (walked - removed, removed)
}

/// The map's data, whatever its type.
fn map_data(map: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    Some(match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::LpmTrie(d) => d,
        _ => return None,
    })
}

/// The pinned link at `path`, if there is one.
fn pinned_link(path: &Path) -> Result<Option<PinnedLink>, DatapathError> {
    if !path.exists() {
        return Ok(None);
    }
    PinnedLink::from_pin(path)
        .map(Some)
        .map_err(|source| DatapathError::Link {
            path: path.to_path_buf(),
            source,
        })
}

/// Whether the program of the TCX link pinned at `path` runs on `hook` of `iface` (in the
/// calling thread's namespace).
fn tcx_link_attached(name: &'static str, path: &Path, iface: &str, hook: TcAttachType) -> Result<bool, DatapathError> {
    let program = link_program_id(path)?;
    let (_, attached) = SchedClassifier::query_tcx(iface, hook).map_err(program_error(name))?;
    Ok(attached.iter().any(|p| p.id() == program))
}

/// The id of the program a pinned link runs.
pub fn link_program_id(path: &Path) -> Result<u32, DatapathError> {
    let link = PinnedLink::from_pin(path).map_err(|source| DatapathError::Link {
        path: path.to_path_buf(),
        source,
    })?;
    // Reading a link's info needs an FdLink; converting keeps the pin.
    let fd: FdLink = link.into();
    fd.info()
        .map(|info| info.program_id())
        .map_err(|source| DatapathError::Link {
            path: path.to_path_buf(),
            source,
        })
}

/// The identity of the programs this agent carries: a digest of its kernel object and
/// `revision` (which tests use to stand for an upgraded agent). Stored in the config map, it
/// tells a restarted agent whether the attached programs are its own.
pub fn programs_identity(revision: u32) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(PROGRAMS);
    hasher.update(revision.to_le_bytes());
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Host veths that have pinned links, by name.
pub fn pinned_pod_veths(pins: &PinLayout) -> BTreeSet<String> {
    std::fs::read_dir(pins.pod_links())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.rsplit_once('-').map(|(veth, _)| veth.to_string())
        })
        .collect()
}

/// Uplinks that have a pinned link, by interface index.
pub fn pinned_uplinks(pins: &PinLayout) -> BTreeSet<u32> {
    std::fs::read_dir(pins.uplink_links())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Removes the pinned link of uplink `ifindex` (no longer an uplink, or gone): it detaches.
pub fn unpin_uplink(pins: &PinLayout, ifindex: u32) -> Result<(), DatapathError> {
    let path = pins.uplink_link(ifindex);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
        _ => Ok(()),
    }
}

/// Removes the pinned links of `veth` if it is gone (its links are defunct).
pub fn unpin_pod_veth(pins: &PinLayout, veth: &str) -> Result<(), ErrorList<DatapathError>> {
    let mut errors = ErrorList::default();
    // A CNI ADD may be making a veth of this name right now: under the lock, its links are
    // pinned only once the veth exists, so a veth still gone has none of them.
    let _lock = match pins.lock_pod_links(POD_LINKS_LOCK_WAIT) {
        Ok(lock) => lock,
        Err(e) => {
            errors.push(io(&pins.pod_links())(e));
            return errors.into_result();
        }
    };
    if interface_exists(veth) {
        return Ok(());
    }
    for (_, _, suffix) in POD_PROGRAMS {
        let path = pins.pod_link(veth, suffix);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => errors.push(io(&path)(e)),
            _ => {}
        }
    }
    errors.into_result()
}

/// Removes everything the datapath pinned under `pin_root`: links first (which detaches the
/// programs from the cgroup and the veths), then programs and maps. Keeps going past failures
/// and reports them all.
pub fn cleanup(pin_root: &Path) -> Result<(), ErrorList<DatapathError>> {
    let mut errors = ErrorList::default();
    let root = PinLayout::new(pin_root).root().to_path_buf();
    if !root.exists() {
        return Ok(());
    }
    let remove_tree = |dir: &Path, errors: &mut ErrorList<DatapathError>| {
        let mut stack = vec![dir.to_path_buf()];
        let mut dirs = Vec::new();
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                } else if let Err(e) = std::fs::remove_file(&path) {
                    errors.push(io(&path)(e));
                }
            }
            dirs.push(d);
        }
        for d in dirs.into_iter().rev() {
            if let Err(e) = std::fs::remove_dir(&d) {
                errors.push(io(&d)(e));
            }
        }
    };
    let pins = PinLayout::new(pin_root);
    remove_tree(&pins.links(), &mut errors);
    remove_tree(&root, &mut errors);
    errors.into_result()
}

/// Whether this namespace has an interface named `name`.
pub fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_removal_generation_moves_on_and_never_comes_back_to_an_earlier_agents_zero() {
        assert_eq!(super::next_removal_generation(0), 1);
        assert_eq!(super::next_removal_generation(41), 42);
        assert_eq!(super::next_removal_generation(u16::MAX), 1);
    }

    #[test]
    fn the_settings_cover_the_ipv4_service_cidrs_only() {
        use ferrynet_common::{CIDR_COVER_NONE, may_be_in_service_cidrs4};
        let cidrs: Vec<ipnet::IpNet> = ["fd00:96::/108", "10.96.0.0/16"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let cover = super::service_cidr_cover(&cidrs);
        assert!(may_be_in_service_cidrs4(
            cover,
            u32::from(std::net::Ipv4Addr::new(10, 96, 1, 1))
        ));
        assert!(!may_be_in_service_cidrs4(
            cover,
            u32::from(std::net::Ipv4Addr::new(10, 244, 1, 1))
        ));
        assert_eq!(super::service_cidr_cover(&cidrs[..1]), CIDR_COVER_NONE);
        assert_eq!(super::service_cidr_cover(&[]), CIDR_COVER_NONE);
    }

    #[test]
    fn maps_pinned_with_another_capacity_are_named_with_both() {
        let wanted = [("ct4", 4096), ("backends", 100), ("maglev", 10)];
        let pinned = |name: &str| match name {
            "ct4" => Some(8192),
            "backends" => Some(100),
            _ => None,
        };
        assert_eq!(super::capacity_mismatches(&wanted, pinned), [("ct4", 8192, 4096)]);
    }
}
