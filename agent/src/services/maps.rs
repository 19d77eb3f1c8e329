//! The service maps, and the small applier that writes [`FrontendOp`]s into them.
//!
//! [`ServiceMaps`] owns typed handles on the pinned maps and a mirror of what they hold (the
//! frontends, the backend table, the ids in use), read back from the maps when the agent starts
//! (so a restarted agent adopts what is there) and kept in step with every write afterwards. Each
//! operation touches only its own frontend's entries, in an order that never lets a connection
//! see a half-written frontend: backends before slots, slots before the service entry's count,
//! and the service entry first when a frontend goes. A port's gate opens before the first entry
//! with the port is written, and closes after the last one went ([`super::port_gates`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{
    Array, HashMap, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use ferrynet_common::*;
use ipnet::IpNet;

use super::{
    diff::{AppliedFrontend, FrontendOp},
    port_gates::{PortGate, Word},
    purge::Removals,
    table::{Backend, BackendState, Frontend, PortEntry, Protocol, Scope},
};
use crate::warning::ErrorList;

/// Why a map could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ServiceMapError {
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("map {0} is full")]
    Full(&'static str),
    #[error("no free {0} id left")]
    NoId(&'static str),
    #[error("the datapath has no map {0}")]
    Missing(&'static str),
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> ServiceMapError {
    move |source| match &source {
        MapError::SyscallError(e)
            if matches!(
                e.io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC)
            ) =>
        {
            ServiceMapError::Full(map)
        }
        _ => ServiceMapError::Map { map, source },
    }
}

/// Ids in use, handing out the smallest free one.
#[derive(Debug, Clone, Default)]
pub struct IdAllocator {
    used: BTreeSet<u32>,
    limit: u32,
    /// No id below this is free: the search starts here, so that handing out ids one after
    /// another (a start with thousands of Services) costs a lookup each, not a walk from 1.
    free_from: u32,
}

impl IdAllocator {
    pub fn new(limit: u32) -> Self {
        Self {
            used: BTreeSet::new(),
            limit,
            free_from: 1,
        }
    }

    pub fn mark(&mut self, id: u32) {
        self.used.insert(id);
    }

    pub fn allocate(&mut self, what: &'static str) -> Result<u32, ServiceMapError> {
        let mut candidate = self.free_from.max(1);
        for id in self.used.range(candidate..) {
            if *id > candidate {
                break;
            }
            candidate = id + 1;
        }
        if candidate > self.limit {
            return Err(ServiceMapError::NoId(what));
        }
        self.used.insert(candidate);
        self.free_from = candidate + 1;
        Ok(candidate)
    }

    pub fn free(&mut self, id: u32) {
        self.used.remove(&id);
        self.free_from = self.free_from.min(id);
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// Typed handles on the maps the control plane writes (the flow maps' purges open their own:
/// [`super::purge`]).
pub struct MapHandles {
    pub services4: HashMap<MapData, ServiceKey4, ServiceValue>,
    pub services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, BackendValue>,
    pub rev_nat: HashMap<MapData, u32, RevNatValue>,
    pub doomed: HashMap<MapData, u32, u8>,
    pub source_ranges4: LpmTrie<MapData, SourceRangeKey4, u8>,
    pub source_ranges6: LpmTrie<MapData, SourceRangeKey6, u8>,
    pub maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    /// The ports no frontend (no backend) uses.
    pub frontend_ports: GateMap,
    pub backend_ports: GateMap,
}

/// A port gate's map ([`PORTS_WITHOUT_FRONTENDS_MAP`], [`PORTS_WITHOUT_BACKENDS_MAP`]) and the
/// count of its ports' users, which says what to write to it.
pub struct GateMap {
    name: &'static str,
    map: Array<MapData, u64>,
    ports: PortGate,
}

impl GateMap {
    /// The gate over `map`, its words as the map holds them, no users counted yet.
    fn new(name: &'static str, map: Array<MapData, u64>) -> Self {
        let words = (0..PORT_GATE_WORDS).map(|i| map.get(&i, 0).unwrap_or(0)).collect();
        Self {
            name,
            map,
            ports: PortGate::new(words),
        }
    }

    /// Counts a user of `port` (an entry that holds it).
    fn count(&mut self, port: u16) {
        self.ports.count(port);
    }

    /// A user of `port` went; its bit is set at the next [`GateMap::close_unused`].
    fn release(&mut self, port: u16) {
        self.ports.release(port);
    }

    /// Writes `words`, recording each one written.
    fn write(&mut self, words: Vec<Word>) -> Result<(), ServiceMapError> {
        for word in words {
            self.map.set(word.0, word.1, 0).map_err(map_error(self.name))?;
            self.ports.written(word);
        }
        Ok(())
    }

    /// Opens `port`'s gate, before an entry with it is written.
    fn open(&mut self, port: u16) -> Result<(), ServiceMapError> {
        match self.ports.open(port) {
            Some(word) => self.write(vec![word]),
            None => Ok(()),
        }
    }

    /// Closes the gates of the ports whose last entry went.
    fn close_unused(&mut self) -> Result<(), ServiceMapError> {
        let words = self.ports.close_unused();
        self.write(words)
    }

    /// Makes the map what the counted users make it (at adoption).
    fn settle(&mut self) -> Result<(), ServiceMapError> {
        let words = self.ports.settle();
        self.write(words)
    }
}

impl MapHandles {
    /// Typed handles on maps taken out of the loaded object, by name.
    pub fn new(mut take: impl FnMut(&'static str) -> Option<Map>) -> Result<Self, ServiceMapError> {
        macro_rules! typed {
            ($name:expr) => {{
                let map = take($name).ok_or(ServiceMapError::Missing($name))?;
                HashMap::try_from(map).map_err(map_error($name))?
            }};
        }
        macro_rules! array {
            ($name:expr) => {{
                let map = take($name).ok_or(ServiceMapError::Missing($name))?;
                Array::try_from(map).map_err(map_error($name))?
            }};
        }
        macro_rules! trie {
            ($name:expr) => {{
                let map = take($name).ok_or(ServiceMapError::Missing($name))?;
                LpmTrie::try_from(map).map_err(map_error($name))?
            }};
        }
        Ok(Self {
            services4: typed!(SERVICES4_MAP),
            services6: typed!(SERVICES6_MAP),
            slots: typed!(SERVICE_SLOTS_MAP),
            backends: typed!(BACKENDS_MAP),
            rev_nat: typed!(REV_NAT_MAP),
            doomed: typed!(DOOMED_BACKENDS_MAP),
            source_ranges4: trie!(SOURCE_RANGES4_MAP),
            source_ranges6: trie!(SOURCE_RANGES6_MAP),
            maglev: typed!(MAGLEV_MAP),
            frontend_ports: GateMap::new(PORTS_WITHOUT_FRONTENDS_MAP, array!(PORTS_WITHOUT_FRONTENDS_MAP)),
            backend_ports: GateMap::new(PORTS_WITHOUT_BACKENDS_MAP, array!(PORTS_WITHOUT_BACKENDS_MAP)),
        })
    }
}

/// An address as the datapath keeps it: IPv4 in the first word.
pub fn datapath_addr(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [addr4(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => addr6(v6.octets()),
    }
}

/// The address the datapath keeps in `words`, of `family` 4 or 6.
pub fn ip_of(words: [u32; 4], family: u8) -> IpAddr {
    if family == 4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        IpAddr::from(octets6(words))
    }
}

fn backend_value(backend: &Backend, state: BackendState, local: bool) -> BackendValue {
    BackendValue {
        addr: datapath_addr(backend.addr),
        port: port(backend.port),
        proto: backend.protocol.number(),
        family: if backend.addr.is_ipv4() { 4 } else { 6 },
        state: match state {
            BackendState::Active => BACKEND_ACTIVE,
            BackendState::Terminating => BACKEND_TERMINATING,
        },
        flags: if local { BACKEND_F_LOCAL } else { 0 },
        _pad: [0; 2],
    }
}

fn backend_of(value: &BackendValue) -> Option<(Backend, BackendState)> {
    let protocol = Protocol::from_number(value.proto)?;
    let state = if value.state == BACKEND_TERMINATING {
        BackendState::Terminating
    } else {
        BackendState::Active
    };
    Some((
        Backend {
            addr: ip_of(value.addr, value.family),
            port: u16::from_be(value.port),
            protocol,
        },
        state,
    ))
}

/// A source range's key: the frontend id (32 bits, matched whole), then the prefix.
fn range_key4(id: u32, net: &ipnet::Ipv4Net) -> Key<SourceRangeKey4> {
    Key::new(
        32 + u32::from(net.prefix_len()),
        SourceRangeKey4 {
            service: id,
            addr: addr4(net.network().octets()),
        },
    )
}

fn range_key6(id: u32, net: &ipnet::Ipv6Net) -> Key<SourceRangeKey6> {
    Key::new(
        32 + u32::from(net.prefix_len()),
        SourceRangeKey6 {
            service: id,
            addr: addr6(net.network().octets()),
        },
    )
}

fn service_value(
    id: u32,
    count: usize,
    affinity: Option<u32>,
    drop_when_empty: bool,
    restricted: bool,
    maglev: Option<u32>,
) -> ServiceValue {
    let mut flags = 0;
    if restricted {
        flags |= SERVICE_F_SOURCE_RANGES;
    }
    if affinity.is_some() {
        flags |= SERVICE_F_AFFINITY;
    }
    if drop_when_empty {
        flags |= SERVICE_F_DROP_EMPTY;
    }
    ServiceValue {
        id,
        count: count as u16,
        flags,
        affinity_timeout_s: affinity.unwrap_or(0),
        maglev_size: maglev.unwrap_or(0),
    }
}

/// Maglev tables computed in one batch, by backend set and size.
type MaglevCache = BTreeMap<(Vec<Backend>, u32), Vec<u32>>;

/// What one batch of operations did, and what it leaves to be finished.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Map entries written or deleted.
    pub writes: usize,
    /// Backends no frontend uses any more: their sockets, conntrack and affinity entries must go
    /// before their ids are reused ([`ServiceMaps::release_removed`]).
    pub removed_backends: BTreeMap<u32, Backend>,
    /// Frontend ids that went: their conntrack and affinity entries go with them.
    pub removed_frontends: BTreeSet<u32>,
    /// Whether a frontend went from the service map or lost its last endpoint: the per-packet
    /// path refuses its flows from then on, so they must be looked up again (the removal
    /// generation moves). Set as soon as the map write is done, even if the operation fails later.
    pub generation_due: bool,
    /// Frontends written, for the notes the CLI reads (id, entry).
    pub written: Vec<(u32, PortEntry)>,
    pub errors: ErrorList<ServiceMapError>,
}

/// The maps and their mirror.
pub struct ServiceMaps {
    maps: MapHandles,
    frontends: BTreeMap<Frontend, AppliedFrontend>,
    backend_ids: BTreeMap<Backend, u32>,
    backend_states: BTreeMap<Backend, BackendState>,
    /// Backends the backend table marks as on this node.
    backend_local: BTreeSet<Backend>,
    /// How many frontends reference each backend (in a slot or retained).
    refs: BTreeMap<Backend, usize>,
    frontend_ids: IdAllocator,
    backend_id_pool: IdAllocator,
    /// Backends the maps hold that no frontend was seen to use when adopting.
    orphans: BTreeSet<Backend>,
    /// Removals an earlier agent did not finish (found at adoption), to purge first.
    unfinished: Removals,
}

impl ServiceMaps {
    /// Adopts what the maps hold (an earlier agent's work, or nothing).
    pub fn adopt(maps: MapHandles, max_services: u32, max_backends: u32) -> Result<Self, ServiceMapError> {
        let mut this = Self {
            maps,
            frontends: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            backend_states: BTreeMap::new(),
            backend_local: BTreeSet::new(),
            refs: BTreeMap::new(),
            frontend_ids: IdAllocator::new(max_services),
            backend_id_pool: IdAllocator::new(max_backends),
            orphans: BTreeSet::new(),
            unfinished: Removals::default(),
        };
        let mut by_id: BTreeMap<u32, Backend> = BTreeMap::new();
        for item in this.maps.backends.iter() {
            let (id, value) = item.map_err(map_error(BACKENDS_MAP))?;
            if let Some((backend, state)) = backend_of(&value) {
                by_id.insert(id, backend);
                this.backend_ids.insert(backend, id);
                this.backend_states.insert(backend, state);
                if value.flags & BACKEND_F_LOCAL != 0 {
                    this.backend_local.insert(backend);
                }
                this.backend_id_pool.mark(id);
            }
        }
        let mut entries: Vec<(Frontend, ServiceValue)> = Vec::new();
        for item in this.maps.services4.iter() {
            let (key, value) = item.map_err(map_error(SERVICES4_MAP))?;
            if let Some(protocol) = Protocol::from_number(key.proto) {
                entries.push((
                    Frontend {
                        addr: IpAddr::from(key.addr.to_ne_bytes()),
                        port: u16::from_be(key.port),
                        protocol,
                        scope: Scope::from_number(key.scope),
                    },
                    value,
                ));
            }
        }
        for item in this.maps.services6.iter() {
            let (key, value) = item.map_err(map_error(SERVICES6_MAP))?;
            if let Some(protocol) = Protocol::from_number(key.proto) {
                entries.push((
                    Frontend {
                        addr: IpAddr::from(octets6(key.addr)),
                        port: u16::from_be(key.port),
                        protocol,
                        scope: Scope::from_number(key.scope),
                    },
                    value,
                ));
            }
        }
        let mut used: BTreeSet<Backend> = BTreeSet::new();
        let mut ranges = this.read_ranges();
        let mut tables = this.read_maglev_chunks();
        for (frontend, value) in entries {
            this.frontend_ids.mark(value.id);
            let mut slots = Vec::new();
            for slot in 0..u32::from(value.count) {
                if let Ok(id) = this.maps.slots.get(
                    &SlotKey {
                        service: value.id,
                        slot,
                    },
                    0,
                ) && let Some(backend) = by_id.get(&id)
                {
                    slots.push(*backend);
                }
            }
            used.extend(slots.iter().copied());
            let states = slots
                .iter()
                .map(|b| (*b, this.backend_states.get(b).copied().unwrap_or(BackendState::Active)))
                .collect();
            let local = slots
                .iter()
                .filter(|b| this.backend_local.contains(b))
                .copied()
                .collect();
            this.frontends.insert(
                frontend,
                AppliedFrontend {
                    id: value.id,
                    slots,
                    states,
                    retained: BTreeSet::new(),
                    affinity_timeout_s: (value.flags & SERVICE_F_AFFINITY != 0).then_some(value.affinity_timeout_s),
                    drop_when_empty: value.flags & SERVICE_F_DROP_EMPTY != 0,
                    local,
                    source_ranges: (value.flags & SERVICE_F_SOURCE_RANGES != 0)
                        .then(|| ranges.remove(&value.id).unwrap_or_default()),
                    maglev: (value.maglev_size != 0).then_some(value.maglev_size),
                    notes_digest: None,
                },
            );
            // A Maglev frontend's chunks are its own; a table of its size has no more.
            if value.maglev_size != 0
                && let Some(chunks) = tables.get_mut(&value.id)
            {
                chunks.retain(|c| *c >= value.maglev_size.div_ceil(MAGLEV_CHUNK));
            }
        }
        // What is left belongs to no restricted frontend (a run that stopped half-way): it must
        // not open a future frontend with the same id to its sources.
        for (id, stray) in ranges {
            for net in &stray {
                let _ = this.delete_range(id, net);
            }
        }
        // Chunks no Maglev frontend reads (a frontend that went while no agent ran, or a smaller
        // table than before) would be memory held for nothing.
        for (id, chunks) in tables {
            for chunk in chunks {
                let _ = this.maps.maglev.remove(&MaglevKey { service: id, chunk });
            }
        }
        this.orphans = this.backend_ids.keys().filter(|b| !used.contains(b)).copied().collect();
        this.refs = this.reference_counts();
        // The gates as the adopted entries make them (an earlier agent's, or a fresh map's zeros
        // that gate nothing).
        for frontend in this.frontends.keys() {
            this.maps.frontend_ports.count(frontend.port);
        }
        for backend in this.backend_ids.keys() {
            this.maps.backend_ports.count(backend.port);
        }
        this.maps.frontend_ports.settle()?;
        this.maps.backend_ports.settle()?;
        // Marked, with no entry left: removed by an agent that did not live to purge their
        // flows. Their ids stay taken until this one has.
        for item in this.maps.doomed.keys() {
            let id = item.map_err(map_error(DOOMED_BACKENDS_MAP))?;
            if !by_id.contains_key(&id) {
                this.backend_id_pool.mark(id);
                this.unfinished.backends.insert(id);
            }
        }
        Ok(this)
    }

    /// The removals an earlier agent left unpurged, taken once.
    pub fn take_unfinished(&mut self) -> Removals {
        std::mem::take(&mut self.unfinished)
    }

    /// Every frontend the maps hold.
    pub fn frontends(&self) -> &BTreeMap<Frontend, AppliedFrontend> {
        &self.frontends
    }

    /// The frontends among `keys` that the maps hold.
    pub fn frontends_of<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a Frontend>,
    ) -> BTreeMap<Frontend, AppliedFrontend> {
        keys.into_iter()
            .filter_map(|k| Some((*k, self.frontends.get(k)?.clone())))
            .collect()
    }

    pub fn backend_count(&self) -> usize {
        self.backend_ids.len()
    }

    /// Counts references from scratch (at adoption; afterwards they are kept incrementally).
    fn reference_counts(&self) -> BTreeMap<Backend, usize> {
        let mut counts: BTreeMap<Backend, usize> = BTreeMap::new();
        for applied in self.frontends.values() {
            for backend in applied.referenced() {
                *counts.entry(*backend).or_default() += 1;
            }
        }
        counts
    }

    /// The backend's id, creating (or updating the state of) its entry.
    fn ensure_backend(
        &mut self,
        backend: &Backend,
        state: BackendState,
        local: bool,
        out: &mut BatchOutcome,
    ) -> Result<u32, ServiceMapError> {
        self.orphans.remove(backend);
        if let Some(id) = self.backend_ids.get(backend).copied() {
            // Rewritten in place (same id): its established flows go on.
            if self.backend_states.get(backend) != Some(&state) || self.backend_local.contains(backend) != local {
                self.maps
                    .backends
                    .insert(id, backend_value(backend, state, local), 0)
                    .map_err(map_error(BACKENDS_MAP))?;
                self.backend_states.insert(*backend, state);
                self.set_local(backend, local);
                out.writes += 1;
            }
            return Ok(id);
        }
        let id = self.backend_id_pool.allocate("backend")?;
        // Its replies may be translated as soon as a slot names it.
        let opened = self.maps.backend_ports.open(backend.port);
        if let Err(e) = opened.and_then(|()| {
            self.maps
                .backends
                .insert(id, backend_value(backend, state, local), 0)
                .map_err(map_error(BACKENDS_MAP))
        }) {
            self.backend_id_pool.free(id);
            return Err(e);
        }
        self.maps.backend_ports.count(backend.port);
        self.backend_ids.insert(*backend, id);
        self.backend_states.insert(*backend, state);
        self.set_local(backend, local);
        out.writes += 1;
        Ok(id)
    }

    fn set_local(&mut self, backend: &Backend, local: bool) {
        if local {
            self.backend_local.insert(*backend);
        } else {
            self.backend_local.remove(backend);
        }
    }

    fn write_service(&mut self, frontend: &Frontend, value: ServiceValue) -> Result<(), ServiceMapError> {
        match frontend.addr {
            IpAddr::V4(v4) => self
                .maps
                .services4
                .insert(
                    ServiceKey4 {
                        addr: addr4(v4.octets()),
                        port: port(frontend.port),
                        proto: frontend.protocol.number(),
                        scope: frontend.scope.number(),
                    },
                    value,
                    0,
                )
                .map_err(map_error(SERVICES4_MAP)),
            IpAddr::V6(v6) => self
                .maps
                .services6
                .insert(
                    ServiceKey6 {
                        addr: addr6(v6.octets()),
                        port: port(frontend.port),
                        proto: frontend.protocol.number(),
                        scope: frontend.scope.number(),
                    },
                    value,
                    0,
                )
                .map_err(map_error(SERVICES6_MAP)),
        }
    }

    fn delete_service(&mut self, frontend: &Frontend) -> Result<(), ServiceMapError> {
        let result = match frontend.addr {
            IpAddr::V4(v4) => self.maps.services4.remove(&ServiceKey4 {
                addr: addr4(v4.octets()),
                port: port(frontend.port),
                proto: frontend.protocol.number(),
                scope: frontend.scope.number(),
            }),
            IpAddr::V6(v6) => self.maps.services6.remove(&ServiceKey6 {
                addr: addr6(v6.octets()),
                port: port(frontend.port),
                proto: frontend.protocol.number(),
                scope: frontend.scope.number(),
            }),
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(SERVICES4_MAP)(e)),
        }
    }

    fn write_slot(&mut self, service: u32, slot: u32, backend: u32) -> Result<(), ServiceMapError> {
        self.maps
            .slots
            .insert(SlotKey { service, slot }, backend, 0)
            .map_err(map_error(SERVICE_SLOTS_MAP))
    }

    fn delete_slot(&mut self, service: u32, slot: u32) -> Result<(), ServiceMapError> {
        match self.maps.slots.remove(&SlotKey { service, slot }) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(SERVICE_SLOTS_MAP)(e)),
        }
    }

    fn write_range(&mut self, id: u32, net: &IpNet) -> Result<(), ServiceMapError> {
        match net {
            IpNet::V4(v4) => self
                .maps
                .source_ranges4
                .insert(&range_key4(id, v4), 1, 0)
                .map_err(map_error(SOURCE_RANGES4_MAP)),
            IpNet::V6(v6) => self
                .maps
                .source_ranges6
                .insert(&range_key6(id, v6), 1, 0)
                .map_err(map_error(SOURCE_RANGES6_MAP)),
        }
    }

    fn delete_range(&mut self, id: u32, net: &IpNet) -> Result<(), ServiceMapError> {
        let result = match net {
            IpNet::V4(v4) => self.maps.source_ranges4.remove(&range_key4(id, v4)),
            IpNet::V6(v6) => self.maps.source_ranges6.remove(&range_key6(id, v6)),
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_error(SOURCE_RANGES4_MAP)(e)),
        }
    }

    /// The Maglev chunks the map holds, by frontend id.
    fn read_maglev_chunks(&self) -> BTreeMap<u32, BTreeSet<u32>> {
        let mut out: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for key in self.maps.maglev.keys().filter_map(Result::ok) {
            out.entry(key.service).or_default().insert(key.chunk);
        }
        out
    }

    /// Writes frontend `id`'s Maglev table for `backends` (whose ids the backend table holds).
    /// Each chunk is replaced whole, so a reader sees the old or the new one, and either names
    /// backends that exist until the batch's removals are finished.
    fn write_maglev(
        &mut self,
        id: u32,
        backends: &BTreeMap<Backend, BackendState>,
        size: u32,
        cache: &mut MaglevCache,
    ) -> Result<usize, ServiceMapError> {
        let set: Vec<Backend> = backends.keys().copied().collect();
        if set.is_empty() {
            // Nothing to pick: the datapath stops at the empty count first.
            return Ok(0);
        }
        let table = cache
            .entry((set.clone(), size))
            .or_insert_with(|| super::maglev::table(&set, size));
        let ids: Vec<u32> = set
            .iter()
            .map(|b| self.backend_ids.get(b).copied().unwrap_or(0))
            .collect();
        let mut writes = 0;
        for (chunk, entries) in table.chunks(MAGLEV_CHUNK as usize).enumerate() {
            let mut value: MaglevChunk = [0; MAGLEV_CHUNK as usize];
            for (slot, index) in value.iter_mut().zip(entries) {
                *slot = ids[*index as usize];
            }
            self.maps
                .maglev
                .insert(
                    MaglevKey {
                        service: id,
                        chunk: chunk as u32,
                    },
                    value,
                    0,
                )
                .map_err(map_error(MAGLEV_MAP))?;
            writes += 1;
        }
        Ok(writes)
    }

    /// Deletes frontend `id`'s Maglev chunks from `from` on (0: the whole table of `size`).
    fn delete_maglev(&mut self, id: u32, size: u32, from: u32) -> Result<usize, ServiceMapError> {
        let mut writes = 0;
        for chunk in from..size.div_ceil(MAGLEV_CHUNK) {
            match self.maps.maglev.remove(&MaglevKey { service: id, chunk }) {
                Ok(()) => writes += 1,
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_error(MAGLEV_MAP)(e)),
            }
        }
        Ok(writes)
    }

    /// The source ranges the tries hold, by frontend id.
    fn read_ranges(&self) -> BTreeMap<u32, BTreeSet<IpNet>> {
        let mut out: BTreeMap<u32, BTreeSet<IpNet>> = BTreeMap::new();
        for key in self.maps.source_ranges4.keys().filter_map(Result::ok) {
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32).min(32) as u8;
            if let Ok(net) = ipnet::Ipv4Net::new(data.addr.to_ne_bytes().into(), prefix) {
                out.entry(data.service).or_default().insert(net.into());
            }
        }
        for key in self.maps.source_ranges6.keys().filter_map(Result::ok) {
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(32).min(128) as u8;
            if let Ok(net) = ipnet::Ipv6Net::new(octets6(data.addr).into(), prefix) {
                out.entry(data.service).or_default().insert(net.into());
            }
        }
        out
    }

    fn create(
        &mut self,
        entry: &PortEntry,
        out: &mut BatchOutcome,
        touched: &mut BTreeSet<Backend>,
        cache: &mut MaglevCache,
    ) -> Result<u32, ServiceMapError> {
        let id = self.frontend_ids.allocate("service")?;
        let result = (|| {
            // Packets to the port must reach the service map once the entry is there.
            self.maps.frontend_ports.open(entry.frontend.port)?;
            let mut slots = Vec::new();
            for (backend, state) in &entry.backends {
                let local = entry.local_backends.contains(backend);
                slots.push(self.ensure_backend(backend, *state, local, out)?);
            }
            for backend in &entry.retained {
                let local = entry.local_backends.contains(backend);
                self.ensure_backend(backend, BackendState::Terminating, local, out)?;
            }
            for (slot, backend) in slots.iter().enumerate() {
                self.write_slot(id, slot as u32, *backend)?;
                out.writes += 1;
            }
            let vip = RevNatValue {
                addr: datapath_addr(entry.frontend.addr),
                port: port(entry.frontend.port),
                family: if entry.frontend.addr.is_ipv4() { 4 } else { 6 },
                _pad: 0,
            };
            self.maps.rev_nat.insert(id, vip, 0).map_err(map_error(REV_NAT_MAP))?;
            for net in entry.source_ranges.iter().flatten() {
                self.write_range(id, net)?;
                out.writes += 1;
            }
            if let Some(size) = entry.maglev {
                out.writes += self.write_maglev(id, &entry.backends, size, cache)?;
            }
            // The service entry last: once it is visible, its slots are complete.
            self.write_service(
                &entry.frontend,
                service_value(
                    id,
                    slots.len(),
                    entry.affinity_timeout_s,
                    entry.drop_when_empty,
                    entry.source_ranges.is_some(),
                    entry.maglev,
                ),
            )?;
            out.writes += 2;
            Ok(())
        })();
        if let Err(e) = result {
            // Chunks written before the failure would be held by an id that is free again.
            if let Some(size) = entry.maglev {
                let _ = self.delete_maglev(id, size, 0);
            }
            self.frontend_ids.free(id);
            return Err(e);
        }
        self.set_frontend(
            entry.frontend,
            Some(AppliedFrontend {
                id,
                slots: entry.backends.keys().copied().collect(),
                states: entry.backends.clone(),
                retained: entry.retained.clone(),
                affinity_timeout_s: entry.affinity_timeout_s,
                drop_when_empty: entry.drop_when_empty,
                local: entry.local_backends.clone(),
                source_ranges: entry.source_ranges.clone(),
                maglev: entry.maglev,
                notes_digest: Some(entry.notes_digest()),
            }),
            touched,
        );
        Ok(id)
    }

    fn reference(&mut self, applied: &AppliedFrontend, touched: &mut BTreeSet<Backend>) {
        for backend in applied.referenced() {
            *self.refs.entry(*backend).or_default() += 1;
            touched.insert(*backend);
        }
    }

    fn unreference(&mut self, applied: &AppliedFrontend, touched: &mut BTreeSet<Backend>) {
        for backend in applied.referenced() {
            if let Some(n) = self.refs.get_mut(backend) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.refs.remove(backend);
                }
            }
            touched.insert(*backend);
        }
    }

    /// Replaces what the mirror holds for `frontend`, keeping the reference counts.
    fn set_frontend(&mut self, frontend: Frontend, applied: Option<AppliedFrontend>, touched: &mut BTreeSet<Backend>) {
        if let Some(old) = self.frontends.remove(&frontend) {
            self.unreference(&old, touched);
            self.maps.frontend_ports.release(frontend.port);
        }
        if let Some(new) = applied {
            self.reference(&new, touched);
            self.maps.frontend_ports.count(frontend.port);
            self.frontends.insert(frontend, new);
        }
    }

    /// Applies one batch of operations. Every operation is attempted; failures are collected.
    /// Backends no frontend uses any more are reported, not yet deleted. Costs what the
    /// operations touch, whatever the number of frontends.
    pub fn apply(&mut self, ops: &[FrontendOp]) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        let mut touched: BTreeSet<Backend> = std::mem::take(&mut self.orphans);
        // Frontends of one Service port (its NodePort, load balancer IPs, externalIPs) share
        // their backends: one Maglev table each batch serves them all.
        let mut cache = MaglevCache::new();
        for op in ops {
            let result = match op {
                FrontendOp::Create(entry) => self
                    .create(entry, &mut out, &mut touched, &mut cache)
                    .map(|id| out.written.push((id, entry.clone()))),
                FrontendOp::Update { old, new, slots } => {
                    let id = old.id;
                    let result = (|| {
                        for (backend, state) in &new.backends {
                            let local = new.local_backends.contains(backend);
                            self.ensure_backend(backend, *state, local, &mut out)?;
                        }
                        for backend in &new.retained {
                            let local = new.local_backends.contains(backend);
                            self.ensure_backend(backend, BackendState::Terminating, local, &mut out)?;
                        }
                        for (slot, backend) in &slots.writes {
                            let backend_id = self.backend_ids[backend];
                            self.write_slot(id, *slot, backend_id)?;
                            out.writes += 1;
                        }
                        // New ranges before the entry that turns them on; gone ones after.
                        let empty = BTreeSet::new();
                        let old_ranges = old.source_ranges.as_ref().unwrap_or(&empty);
                        let new_ranges = new.source_ranges.as_ref().unwrap_or(&empty);
                        for net in new_ranges.difference(old_ranges) {
                            self.write_range(id, net)?;
                            out.writes += 1;
                        }
                        // The table before the entry that turns it on (or names its size).
                        let backends_changed = old.slots.iter().copied().collect::<BTreeSet<_>>()
                            != new.backends.keys().copied().collect::<BTreeSet<_>>();
                        if let Some(size) = new.maglev
                            && (backends_changed || old.maglev != new.maglev)
                        {
                            out.writes += self.write_maglev(id, &new.backends, size, &mut cache)?;
                        }
                        let value = service_value(
                            id,
                            slots.slots.len(),
                            new.affinity_timeout_s,
                            new.drop_when_empty,
                            new.source_ranges.is_some(),
                            new.maglev,
                        );
                        self.write_service(&new.frontend, value)?;
                        out.writes += 1;
                        out.generation_due |= slots.slots.is_empty() && !old.slots.is_empty();
                        // Chunks the entry no longer reads: all when it stopped using Maglev,
                        // those past a smaller table's end.
                        if let Some(old_size) = old.maglev {
                            let keep = new.maglev.map_or(0, |size| size.div_ceil(MAGLEV_CHUNK));
                            out.writes += self.delete_maglev(id, old_size, keep)?;
                        }
                        for net in old_ranges.difference(new_ranges) {
                            self.delete_range(id, net)?;
                            out.writes += 1;
                        }
                        for slot in &slots.deletes {
                            self.delete_slot(id, *slot)?;
                            out.writes += 1;
                        }
                        self.set_frontend(
                            new.frontend,
                            Some(AppliedFrontend {
                                id,
                                slots: slots.slots.clone(),
                                states: new.backends.clone(),
                                retained: new.retained.clone(),
                                affinity_timeout_s: new.affinity_timeout_s,
                                drop_when_empty: new.drop_when_empty,
                                local: new.local_backends.clone(),
                                source_ranges: new.source_ranges.clone(),
                                maglev: new.maglev,
                                notes_digest: Some(new.notes_digest()),
                            }),
                            &mut touched,
                        );
                        out.written.push((id, new.clone()));
                        Ok(())
                    })();
                    // Chunks written for a frontend that was not using Maglev, before a failure:
                    // nothing reads them, and nothing would delete them later.
                    if result.is_err()
                        && old.maglev.is_none()
                        && let Some(size) = new.maglev
                    {
                        let _ = self.delete_maglev(id, size, 0);
                    }
                    result
                }
                FrontendOp::Delete(frontend, old) => (|| {
                    // No new connections first; then its slots and reverse NAT.
                    self.delete_service(frontend)?;
                    out.generation_due = true;
                    for slot in 0..old.slots.len() as u32 {
                        self.delete_slot(old.id, slot)?;
                    }
                    match self.maps.rev_nat.remove(&old.id) {
                        Ok(()) | Err(MapError::KeyNotFound) => {}
                        Err(e) => return Err(map_error(REV_NAT_MAP)(e)),
                    }
                    for net in old.source_ranges.iter().flatten() {
                        self.delete_range(old.id, net)?;
                        out.writes += 1;
                    }
                    if let Some(size) = old.maglev {
                        out.writes += self.delete_maglev(old.id, size, 0)?;
                    }
                    out.writes += old.slots.len() + 2;
                    self.set_frontend(*frontend, None, &mut touched);
                    out.removed_frontends.insert(old.id);
                    Ok(())
                })(),
                // Nothing in the maps: the notes alone are written.
                FrontendOp::Notes { id, entry } => {
                    if let Some(applied) = self.frontends.get_mut(&entry.frontend) {
                        applied.notes_digest = Some(entry.notes_digest());
                    }
                    out.written.push((*id, entry.clone()));
                    Ok(())
                }
            };
            if let Err(e) = result {
                out.errors.push(e);
            }
        }
        if let Err(e) = self.maps.frontend_ports.close_unused() {
            out.errors.push(e);
        }
        // Backends the batch touched (or adopted unused) that nothing references any more.
        for backend in touched {
            if !self.refs.contains_key(&backend)
                && let Some(id) = self.backend_ids.get(&backend)
            {
                out.removed_backends.insert(*id, backend);
            }
        }
        out
    }

    /// Marks backends whose sockets are to be terminated (the socket iterators read this).
    pub fn doom(&mut self, backends: &BTreeMap<u32, Backend>) -> Result<(), ErrorList<ServiceMapError>> {
        let mut errors = ErrorList::default();
        for id in backends.keys() {
            if let Err(e) = self.maps.doomed.insert(*id, 1, 0) {
                errors.push(map_error(DOOMED_BACKENDS_MAP)(e));
            }
        }
        errors.into_result()
    }

    /// Takes out the backends a batch removed, at once: their entries go (the datapath balances
    /// their flows' next packets afresh, as it does for any backend it cannot find), while their
    /// ids stay taken until their flows are purged. A backend that comes back before then (a pod
    /// made ready again) gets a fresh id, so that neither the purge nor the socket terminations
    /// of the old one touch its new flows.
    pub fn detach_removed(&mut self, backends: &BTreeMap<u32, Backend>) -> Result<(), ErrorList<ServiceMapError>> {
        let mut errors = ErrorList::default();
        for (id, backend) in backends {
            if self.backend_ids.get(backend) != Some(id) || self.refs.contains_key(backend) {
                continue;
            }
            match self.maps.backends.remove(id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => errors.push(map_error(BACKENDS_MAP)(e)),
            }
            self.backend_ids.remove(backend);
            self.backend_states.remove(backend);
            self.backend_local.remove(backend);
            self.maps.backend_ports.release(backend.port);
        }
        if let Err(e) = self.maps.backend_ports.close_unused() {
            errors.push(e);
        }
        errors.into_result()
    }

    /// Frees what a batch removed, once its flows are purged ([`super::purge`]): the removed
    /// backends' and frontends' ids may be reused.
    pub fn release_removed(&mut self, removals: &Removals) -> Result<(), ErrorList<ServiceMapError>> {
        let mut errors = ErrorList::default();
        for id in &removals.backends {
            // An id some backend still has was never detached: not freed under it.
            if self.backend_ids.values().any(|v| v == id) {
                continue;
            }
            match self.maps.doomed.remove(id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => errors.push(map_error(DOOMED_BACKENDS_MAP)(e)),
            }
            self.backend_id_pool.free(*id);
        }
        let frontends = &removals.frontends;
        for id in frontends {
            self.frontend_ids.free(*id);
        }
        errors.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_smallest_free_ones_and_bounded() {
        let mut ids = IdAllocator::new(3);
        assert_eq!(ids.allocate("x").unwrap(), 1);
        assert_eq!(ids.allocate("x").unwrap(), 2);
        ids.mark(3);
        assert!(matches!(ids.allocate("x"), Err(ServiceMapError::NoId("x"))));
        ids.free(1);
        assert_eq!(ids.allocate("x").unwrap(), 1);
        assert_eq!(ids.len(), 3);
        // Freed out of order: still the smallest first.
        ids.free(3);
        ids.free(2);
        assert_eq!(ids.allocate("x").unwrap(), 2);
        assert_eq!(ids.allocate("x").unwrap(), 3);
    }

    #[test]
    fn addresses_round_trip_through_the_datapaths_layout() {
        for ip in ["10.96.0.10", "fd00:96::a", "255.255.255.255", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_of(datapath_addr(ip), if ip.is_ipv4() { 4 } else { 6 }), ip);
        }
        let b = Backend {
            addr: "10.244.1.2".parse().unwrap(),
            port: 8080,
            protocol: Protocol::Udp,
        };
        let value = backend_value(&b, BackendState::Terminating, true);
        assert_eq!(backend_of(&value), Some((b, BackendState::Terminating)));
        assert_eq!(value.flags, BACKEND_F_LOCAL);
        assert_eq!(backend_value(&b, BackendState::Active, false).flags, 0);
        // On the wire, the port's bytes are big-endian.
        assert_eq!(value.port.to_ne_bytes(), 8080u16.to_be_bytes());
    }
}
