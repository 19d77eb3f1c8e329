//! The service controller: Services and EndpointSlices in, the datapath's maps out.
//!
//! It loads the datapath (adopting what an earlier agent pinned), attaches it, and then follows
//! the API: each Service or EndpointSlice event marks its Service dirty; dirty Services are
//! processed in batches (a burst is coalesced, and a steady stream still gets a batch at least
//! every few milliseconds, so nothing starves). For each, the pure [`table::service_entries`]
//! gives the desired entries, the pure [`diff::diff`] compares them with what the maps hold for
//! that Service, and [`maps::ServiceMaps::apply`] writes only that. After a (re)list of either
//! kind, everything is compared, which also removes Services deleted while the agent was away.
//!
//! With `--service-proxy=false` it removes any datapath an earlier run left, and idles.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt};
use ipnet::IpNet;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    diff::{self, AppliedFrontend, FrontendOp},
    health_check,
    http::{self, Health},
    maps::{BatchOutcome, MapHandles, ServiceMaps},
    metrics::ServiceMetrics,
    nodeport, notes,
    objects::{EndpointSlice, EndpointSliceObject, Service, ServiceObject, TRIGGER_TIME_ANNOTATION},
    past_stack, purge,
    service_cidrs::{ServiceCidrSource, ServiceCidrWatch, clear_of_cluster},
    table::{self, Frontend, NodeContext, PortEntry, ServiceRef},
};
use crate::{
    datapath::{self, Datapath, DatapathError, MapSizes, PinnedLinks, TranslationModes},
    kernel_paths,
    status::{StatusHandle, now_unix},
    warning::{Warning, WarningKind},
    watch::NodesView,
};

/// What the service controller is configured with.
#[derive(Debug, Clone)]
pub struct ServicesConfig {
    /// `--service-proxy`: translate Services at all.
    pub enabled: bool,
    pub node_name: String,
    /// The bpffs directory the datapath pins its maps, programs and links in.
    pub bpf_pin_path: PathBuf,
    /// The cgroup v2 directory the socket programs attach to.
    pub cgroup_path: PathBuf,
    pub modes: TranslationModes,
    /// Services labelled `service.kubernetes.io/service-proxy-name` with another name are left
    /// to that proxy.
    pub proxy_name: String,
    /// The cluster's Service CIDRs (an address there that no Service holds is refused): given,
    /// read from the API, or none.
    pub service_cidrs: ServiceCidrSource,
    pub sizes: MapSizes,
    /// `/healthz`'s port, on the node's address (0: off).
    pub healthz_port: u16,
    /// Where `/metrics` listens (none: off).
    pub metrics_addr: Option<SocketAddr>,
    pub state_dir: PathBuf,
    /// The IPAM store (its records name the pods' network namespaces).
    pub ipam_data_dir: PathBuf,
    pub network: String,
    pub resync: Duration,
    /// Stands for the programs' version in their identity (tests use it for an upgrade).
    pub datapath_revision: u32,
    /// `--nodeport-addresses`: the node addresses NodePorts answer on (empty: all but loopback
    /// and link-local).
    pub nodeport_addresses: Vec<IpNet>,
    /// `--nodeport-interfaces`: where the uplink program attaches (empty: the interfaces that
    /// hold the node's InternalIPs).
    pub nodeport_interfaces: Vec<String>,
    /// `--load-balancing` and `--maglev-table-size`.
    pub load_balancing: super::table::LoadBalancing,
    /// How often the maps' fill is counted for the metrics (`--map-fill-seconds`): counting the
    /// conntrack and socket maps walks them, one system call per entry, which is too much to do
    /// every resync on a busy node.
    pub map_fill_period: Duration,
}

/// Why the service controller stopped (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error(transparent)]
    KernelPath(#[from] kernel_paths::KernelPathError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("datapath: {0}")]
    Datapaths(crate::warning::ErrorList<DatapathError>),
    #[error("service maps: {0}")]
    Maps(#[from] super::maps::ServiceMapError),
    #[error("the host network namespace's cookie: {0}")]
    NetnsCookie(std::io::Error),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
    #[error("the nodes' view is gone")]
    ViewClosed,
    #[error("a datapath task was lost: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("starting the purge worker: {0}")]
    PurgeWorker(std::io::Error),
}

/// How long events may settle before a batch, and the longest a batch waits while events keep
/// coming. (Tokio's timer rounds up to the next millisecond: a quiet period of 1 ms is 1 to 2.)
const BATCH_QUIET: Duration = Duration::from_millis(1);
const BATCH_AT_MOST: Duration = Duration::from_millis(20);
/// How often pod veths without the pod programs are looked for.
const VETH_SCAN: Duration = Duration::from_secs(2);

/// Runs until aborted.
pub async fn run(
    cfg: Arc<ServicesConfig>,
    client: Client,
    nodes: watch::Receiver<Arc<NodesView>>,
    status: StatusHandle,
    metrics: Arc<ServiceMetrics>,
    health: Arc<Health>,
) -> Result<(), ServicesError> {
    if !cfg.enabled {
        return run_disabled(&cfg, &status).await;
    }
    status.update(|s| {
        s.services.details.enabled = true;
        s.services.ready = false;
    });
    kernel_paths::prepare_pin_path(&cfg.bpf_pin_path)?;
    kernel_paths::check_cgroup2(&cfg.cgroup_path)?;
    let setup_cfg = cfg.clone();
    let setup = tokio::task::spawn_blocking(move || set_up(&setup_cfg));
    // The API is listed while the datapath loads (the verifier's work and the lists' parsing
    // take about as long, on different threads): the lists are filed, and once both are in, the
    // full sync's pure part is computed before the maps are there to write.
    let cidr_watch = (cfg.service_cidrs == ServiceCidrSource::Api).then(|| ServiceCidrWatch::start(client.clone()));
    let mut watches = Watches::start(client);
    let mut objects = Objects::new(health.clone());
    let mut service_list: Listing<Service> = Listing::default();
    let mut slice_list: Listing<EndpointSlice> = Listing::default();
    let mut ahead: Option<Ahead> = None;
    tokio::pin!(setup);
    let (datapath, maps, report) = loop {
        tokio::select! {
            done = &mut setup => break done??,
            event = watches.next() => match event {
                Ok(event) => {
                    objects.on_watch_event(event, &mut service_list, &mut slice_list);
                    if ahead.is_none() && service_list.listed && slice_list.listed {
                        let node = node_context(&cfg, &nodes.borrow());
                        let started = Instant::now();
                        ahead = Some(tokio::task::block_in_place(|| objects.ahead(node)));
                        info!(
                            "both lists are in before the datapath: {} Services computed in {:.1} ms",
                            objects.services.len(),
                            started.elapsed().as_secs_f64() * 1e3
                        );
                    }
                }
                Err(e) => {
                    // Not while the datapath is being set up: a restart would set it up again
                    // over the same pins.
                    let _ = setup.await;
                    return Err(e);
                }
            },
        }
    };
    info!(
        "service datapath loaded and attached ({} links made, {} upgraded, {} kept, {} out of force removed)",
        report.attached, report.upgraded, report.kept, report.detached
    );
    let map_warnings: Vec<Warning> = datapath
        .pinned_size_mismatches(cfg.sizes)
        .into_iter()
        .map(|(map, pinned, wanted)| {
            let warning = Warning::new(
                WarningKind::PinnedMapSize,
                format!(
                    "map {map} is pinned with {pinned} entries where the settings ask for {wanted}: \
                     a pinned map keeps its capacity (so that flows survive restarts); \
                     `ferrynet-agent cleanup` and a restart apply the new size"
                ),
            );
            warn!("{}", warning.message);
            warning
        })
        .collect();
    status.update(|s| {
        let d = &mut s.services.details;
        d.bpf_pin_path = Some(cfg.bpf_pin_path.clone());
        d.cgroup_path = Some(cfg.cgroup_path.clone());
        d.socket_lb = cfg.modes.socket_lb;
        d.host_netns_only = cfg.modes.host_netns_only;
        d.per_packet = cfg.modes.per_packet_translates();
        d.service_cidrs = cfg.service_cidrs.fixed().map(<[IpNet]>::to_vec);
        // Said again by this run, if still so: an earlier run's may have been mended meanwhile.
        d.service_cidrs_left_out.clear();
    });
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = cfg.metrics_addr {
        servers.spawn(http::serve_metrics(addr, metrics.clone()));
    }
    let (purged_tx, purged) = tokio::sync::mpsc::unbounded_channel();
    let purger = purge::Purger::start(datapath.pins().clone(), purged_tx).map_err(ServicesError::PurgeWorker)?;
    let mut controller = Controller {
        cfg: cfg.clone(),
        datapath,
        maps,
        objects,
        ahead,
        service_frontends: HashMap::new(),
        frontend_owner: HashMap::new(),
        node: node_context(&cfg, &nodes.borrow()),
        internal_ips: Vec::new(),
        health_checks: BTreeMap::new(),
        health_servers: health_check::HealthCheckServers::default(),
        warnings: BTreeMap::new(),
        metrics,
        health: health.clone(),
        status: status.clone(),
        synced: false,
        fill_refreshed: None,
        fill_walk: None,
        external_on: None,
        generation_due: false,
        notes: notes::NotesWriter::start(notes::dir(&cfg.state_dir)),
        status_after_notes: VecDeque::new(),
        status_published: false,
        change_waiting: false,
        map_warnings,
        purger,
        cidr_watch,
        peer_pods: None,
        service_cidrs_from_api: None,
        service_cidrs_left_out: Vec::new(),
        nodes_view: Arc::default(),
        service_cidrs_wanted: None,
        service_cidrs_written: None,
    };
    controller
        .run(watches, service_list, slice_list, nodes, servers, purged)
        .await
}

/// What a batch puts in the status's service section.
struct BatchStatus {
    errors: Vec<String>,
    warnings: Vec<Warning>,
    services: usize,
    frontends: usize,
    backends: usize,
    /// Whether the batch wrote anything (the last change's time moves on).
    changed: bool,
}

impl BatchStatus {
    fn publish(self, status: &StatusHandle) {
        status.update(|s| {
            let section = &mut s.services;
            section.ready = self.errors.is_empty();
            section.last_error = (!self.errors.is_empty()).then(|| self.errors.join("; "));
            section.warnings = self.warnings;
            section.details.services = self.services;
            section.details.frontends = self.frontends;
            section.details.backends = self.backends;
            if self.changed {
                section.last_change_unix = Some(now_unix());
            }
        });
    }
}

/// What one Service needs, computed apart from the controller's bookkeeping.
struct Computed {
    health_check: Option<(u16, health_check::HealthCheck)>,
    entries: table::ServiceEntries,
}

/// Batches' statuses kept waiting for their notes at most (see `Controller::run`).
const STATUSES_WAITING_AT_MOST: usize = 64;

/// A full sync computes on at most this many threads ...
const COMPUTE_THREADS_AT_MOST: usize = 4;
/// ... each with at least this many Services (fewer are not worth a thread).
const COMPUTE_CHUNK_AT_LEAST: usize = 512;

/// What the watches have said: the Services, their slices, and what changed since the last
/// batch. Fed while the datapath loads as well as after, so that a start's lists are filed (and
/// its full sync computed, see [`Ahead`]) before the maps are there to write.
struct Objects {
    services: HashMap<ServiceRef, Arc<Service>>,
    /// Slices by Service (a Service has few: a list, where a map would allocate a whole node for
    /// each Service's one or two).
    slices: HashMap<ServiceRef, Vec<Arc<EndpointSlice>>>,
    /// Which Service each slice (namespace, name) belongs to.
    slice_owner: HashMap<(String, String), ServiceRef>,
    dirty: BTreeSet<ServiceRef>,
    /// The earliest EndpointSlice change not yet in the maps, by Service.
    triggers: HashMap<ServiceRef, k8s_openapi::jiff::Timestamp>,
    full_sync_due: bool,
    /// Counts the events filed: what was computed from an earlier count is stale.
    generation: u64,
    health: Arc<Health>,
}

/// A full sync's pure part, computed while the datapath loaded, and what it was computed from.
struct Ahead {
    generation: u64,
    node: NodeContext,
    services: Vec<ServiceRef>,
    computed: Vec<Option<Computed>>,
}

/// The `default/kubernetes` Service, whose endpoints are the API server's own addresses.
fn api_server_service() -> ServiceRef {
    ServiceRef {
        namespace: "default".into(),
        name: "kubernetes".into(),
    }
}

impl Objects {
    /// The API server's own addresses: its Service's endpoints, whatever their conditions.
    fn api_server_addresses(&self) -> Vec<IpAddr> {
        let slices = self
            .slices
            .get(&api_server_service())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut addresses: Vec<IpAddr> = slices
            .iter()
            .flat_map(|slice| slice.endpoints.iter())
            .flat_map(|endpoint| endpoint.addresses.iter())
            .filter_map(|address| address.parse().ok())
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }

    fn new(health: Arc<Health>) -> Self {
        Self {
            services: HashMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            dirty: BTreeSet::new(),
            triggers: HashMap::new(),
            full_sync_due: true,
            generation: 0,
            health,
        }
    }

    /// Every Service a full sync goes through (with `also`, the ones the maps hold), in order.
    fn all<'a>(&self, also: impl Iterator<Item = &'a ServiceRef>) -> Vec<ServiceRef> {
        let mut all: BTreeSet<ServiceRef> = self.services.keys().cloned().collect();
        all.extend(also.cloned());
        all.into_iter().collect()
    }

    /// The full sync's pure part, for a start whose lists are in before its datapath.
    fn ahead(&self, node: NodeContext) -> Ahead {
        let services = self.all(std::iter::empty());
        Ahead {
            generation: self.generation,
            computed: self.compute_all(&services, &node),
            node,
            services,
        }
    }

    fn on_watch_event(
        &mut self,
        event: WatchEvent,
        service_list: &mut Listing<Service>,
        slice_list: &mut Listing<EndpointSlice>,
    ) {
        self.generation += 1;
        match event {
            WatchEvent::Service(Ok(event)) => self.on_service_event(event, service_list),
            WatchEvent::Service(Err(e)) => {
                warn!("watching services (retrying with backoff, keeping the datapath): {e}")
            }
            WatchEvent::Slice(Ok(event)) => self.on_slice_event(event, slice_list),
            WatchEvent::Slice(Err(e)) => {
                warn!("watching endpointslices (retrying with backoff, keeping the datapath): {e}")
            }
        }
    }

    fn mark(&mut self, svc: ServiceRef) {
        self.health.queued();
        self.dirty.insert(svc);
    }

    fn on_service_event(&mut self, event: watcher::Event<Service>, listing: &mut Listing<Service>) {
        let key = |s: &Service| ServiceRef {
            namespace: s.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: s.metadata.name.clone().unwrap_or_default(),
        };
        match event {
            watcher::Event::Init => listing.building = Some(Vec::new()),
            watcher::Event::InitApply(s) => listing.building.get_or_insert_with(Vec::new).push(s),
            watcher::Event::InitDone => {
                let listed = listing.building.take().unwrap_or_default();
                info!("listed {} Services", listed.len());
                self.services = listed.into_iter().map(|s| (key(&s), Arc::new(s))).collect();
                listing.listed = true;
                // A relist may hide deletions: compare everything.
                self.full_sync_due = true;
                self.health.queued();
            }
            watcher::Event::Apply(s) => {
                let k = key(&s);
                self.services.insert(k.clone(), Arc::new(s));
                self.mark(k);
            }
            watcher::Event::Delete(s) => {
                let k = key(&s);
                self.services.remove(&k);
                self.mark(k);
            }
        }
    }

    fn on_slice_event(&mut self, event: watcher::Event<EndpointSlice>, listing: &mut Listing<EndpointSlice>) {
        match event {
            watcher::Event::Init => listing.building = Some(Vec::new()),
            watcher::Event::InitApply(s) => listing.building.get_or_insert_with(Vec::new).push(s),
            watcher::Event::InitDone => {
                let listed = listing.building.take().unwrap_or_default();
                info!("listed {} EndpointSlices", listed.len());
                self.slices.clear();
                self.slice_owner.clear();
                for slice in listed {
                    self.put_slice(slice);
                }
                listing.listed = true;
                self.full_sync_due = true;
                self.health.queued();
            }
            watcher::Event::Apply(slice) => {
                if let Some(svc) = self.put_slice(slice) {
                    self.mark(svc);
                }
            }
            watcher::Event::Delete(slice) => {
                let id = (
                    slice.metadata.namespace.clone().unwrap_or_default(),
                    slice.metadata.name.clone().unwrap_or_default(),
                );
                if let Some(owner) = self.slice_owner.remove(&id) {
                    self.remove_slice(&owner, &id.1);
                    self.note_trigger(&owner, &slice);
                    self.mark(owner);
                }
            }
        }
    }

    /// Files a slice under its Service; returns the Services whose endpoints changed.
    fn put_slice(&mut self, slice: EndpointSlice) -> Option<ServiceRef> {
        let id = (
            slice.metadata.namespace.clone().unwrap_or_default(),
            slice.metadata.name.clone().unwrap_or_default(),
        );
        let owner = table::slice_service(&slice);
        if let Some(previous) = self.slice_owner.get(&id).cloned()
            && Some(&previous) != owner.as_ref()
        {
            self.remove_slice(&previous, &id.1);
            self.mark(previous);
        }
        let owner = owner?;
        self.note_trigger(&owner, &slice);
        // Labels and annotations have been read (the owner, the change time): the table needs
        // neither, and each map costs a whole allocation node per slice.
        let mut slice = slice;
        slice.metadata.labels = None;
        slice.metadata.annotations = None;
        self.slice_owner.insert(id.clone(), owner.clone());
        self.remove_slice(&owner, &id.1);
        self.slices.entry(owner.clone()).or_default().push(Arc::new(slice));
        Some(owner)
    }

    /// Forgets the slice called `name` of Service `owner`.
    fn remove_slice(&mut self, owner: &ServiceRef, name: &str) {
        if let Some(slices) = self.slices.get_mut(owner) {
            slices.retain(|s| s.metadata.name.as_deref() != Some(name));
            if slices.is_empty() {
                self.slices.remove(owner);
            }
        }
    }

    fn note_trigger(&mut self, owner: &ServiceRef, slice: &EndpointSlice) {
        let Some(at) = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        else {
            return;
        };
        let earliest = self.triggers.entry(owner.clone()).or_insert(at);
        if at < *earliest {
            *earliest = at;
        }
    }

    /// What `svc` needs in the maps, and its health check (pure: none when it is gone).
    fn compute(&self, svc: &ServiceRef, node: &NodeContext) -> Option<Computed> {
        let service = self.services.get(svc)?;
        let slices: &[Arc<EndpointSlice>] = self.slices.get(svc).map_or(&[], Vec::as_slice);
        Some(Computed {
            health_check: health_check::wanted(svc, service, slices, &node.name),
            entries: table::service_entries(service, slices, node),
        })
    }

    /// [`Self::compute`] for every one of `services`, on all cores (a full sync's 10,000
    /// Services take a core a tenth of a second), in their order.
    fn compute_all(&self, services: &[ServiceRef], node: &NodeContext) -> Vec<Option<Computed>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(COMPUTE_THREADS_AT_MOST));
        let chunk = services.len().div_ceil(threads).max(COMPUTE_CHUNK_AT_LEAST);
        let mut chunks = services.chunks(chunk);
        let Some(first) = chunks.next() else {
            return Vec::new();
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = chunks
                .map(|part| scope.spawn(move || part.iter().map(|svc| self.compute(svc, node)).collect::<Vec<_>>()))
                .collect();
            let mut all: Vec<Option<Computed>> = first.iter().map(|svc| self.compute(svc, node)).collect();
            for other in others {
                match other.join() {
                    Ok(part) => all.extend(part),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            all
        })
    }
}

/// The Service and EndpointSlice watches (with kube's backoff on errors), each in a task of its
/// own, so that the two lists' JSON is parsed on both worker threads at once and beside the
/// controller's work: at 10,000 Services, parsing the lists is most of an agent's start.
struct Watches {
    /// An event, or the kind whose watch ended (its stream never should).
    events: mpsc::Receiver<Result<WatchEvent, &'static str>>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

/// Events a watch may have waiting for the controller before it waits itself.
const WATCH_EVENTS_QUEUED: usize = 4096;

/// One event of either watch, its objects already in the form the agent keeps (so that events
/// waiting for the datapath hold no more than the controller would).
enum WatchEvent {
    Service(Result<watcher::Event<Service>, watcher::Error>),
    Slice(Result<watcher::Event<EndpointSlice>, watcher::Error>),
}

/// An event with its object converted to the form the agent keeps.
fn kept<K, S: From<K>>(event: watcher::Event<K>) -> watcher::Event<S> {
    match event {
        watcher::Event::Apply(object) => watcher::Event::Apply(object.into()),
        watcher::Event::Delete(object) => watcher::Event::Delete(object.into()),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(object) => watcher::Event::InitApply(object.into()),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

impl Watches {
    fn start(client: Client) -> Self {
        let (tx, events) = mpsc::channel(WATCH_EVENTS_QUEUED);
        let services = watcher(Api::<ServiceObject>::all(client.clone()), watcher::Config::default()).default_backoff();
        let slices = watcher(Api::<EndpointSliceObject>::all(client), watcher::Config::default()).default_backoff();
        Self {
            events,
            tasks: [
                tokio::spawn(forward(services, tx.clone(), WatchEvent::Service, "services")),
                tokio::spawn(forward(slices, tx, WatchEvent::Slice, "endpointslices")),
            ],
        }
    }

    /// The next event of either watch; an error when one has ended.
    async fn next(&mut self) -> Result<WatchEvent, ServicesError> {
        match self.events.recv().await {
            Some(Ok(event)) => Ok(event),
            Some(Err(kind)) => Err(ServicesError::WatchEnded(kind)),
            // Both tasks hold a sender until they end, and an ending one says so first.
            None => Err(ServicesError::WatchEnded("services and endpointslices")),
        }
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Sends a watch's events, converted to the form the agent keeps, until it ends or panics (then
/// says so: the controller ends, and its supervisor starts it again) or the controller is gone.
async fn forward<K, S: From<K>>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    tx: mpsc::Sender<Result<WatchEvent, &'static str>>,
    wrap: fn(Result<watcher::Event<S>, watcher::Error>) -> WatchEvent,
    kind: &'static str,
) {
    let events = tx.clone();
    let watched = std::panic::AssertUnwindSafe(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if events.send(Ok(wrap(event.map(kept)))).await.is_err() {
                return;
            }
        }
    })
    .catch_unwind()
    .await;
    if watched.is_err() {
        warn!("the {kind} watch panicked");
    }
    let _ = tx.send(Err(kind)).await;
}

/// This node as the table needs it, from the agent's settings and the nodes' view.
fn node_context(cfg: &ServicesConfig, view: &NodesView) -> NodeContext {
    NodeContext {
        name: cfg.node_name.clone(),
        zone: view.get(&cfg.node_name).and_then(|n| n.zone.clone()),
        proxy_name: cfg.proxy_name.clone(),
        load_balancing: cfg.load_balancing,
    }
}

/// Removes a datapath an earlier run left (pins, links, programs, maps), and idles.
async fn run_disabled(cfg: &ServicesConfig, status: &StatusHandle) -> Result<(), ServicesError> {
    let pin_path = cfg.bpf_pin_path.clone();
    let removed = tokio::task::spawn_blocking(move || datapath::cleanup(&pin_path)).await?;
    status.update(|s| {
        let section = &mut s.services;
        section.details.enabled = false;
        section.ready = true;
        match &removed {
            Ok(()) => section.last_error = None,
            Err(e) => section.last_error = Some(format!("removing an earlier datapath: {e}")),
        }
    });
    removed.map_err(ServicesError::Datapaths)?;
    info!("service translation is off (--service-proxy=false); no datapath is loaded");
    std::future::pending().await
}

/// The host network namespace's cookie (`SO_NETNS_COOKIE`), for host-namespace-only socket LB.
fn host_netns_cookie() -> Result<u64, std::io::Error> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt with a buffer of the size it is told, on a socket we own. nix has no
    // wrapper for SO_NETNS_COOKIE.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Loads, adopts and attaches the datapath (blocking).
fn set_up(cfg: &ServicesConfig) -> Result<(Datapath, ServiceMaps, datapath::AttachReport), ServicesError> {
    let started = Instant::now();
    let mut dp = Datapath::load(&cfg.bpf_pin_path, cfg.sizes)?;
    info!(
        "service datapath loaded (maps made or adopted, programs verified) in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let identity = datapath::programs_identity(cfg.datapath_revision);
    // The programs in the pinned links are this agent's unless an earlier (other) agent's config
    // says otherwise: then every link gets this agent's programs.
    let replace = dp.current_config()?.programs != identity;
    let mut report = datapath::AttachReport::default();
    if cfg.modes.socket_lb {
        let r = dp.attach_socket_lb(&cfg.cgroup_path, replace)?;
        report.attached += r.attached;
        report.upgraded += r.upgraded;
        report.kept += r.kept;
    } else {
        dp.detach_socket_lb().map_err(ServicesError::Datapaths)?;
    }
    // No connect writes an older layout's socket map any more: carry its sockets over.
    dp.adopt_retired_socket_backends()?;
    // Without the per-packet path, `to_pod` has nothing to do on a pod's veth: new veths get
    // `from_pod` alone, and existing ones lose `to_pod`. With it, every veth gets `to_pod` here,
    // before the settings turn the path on. An earlier run's settings may have the path on until
    // this run's are written, and its flows need `to_pod` meanwhile: a program out of force
    // keeps its pin and links until then.
    let per_packet = cfg.modes.per_packet_translates();
    dp.set_per_packet(per_packet);
    dp.keep_out_of_force(true);
    dp.pin_pod_programs()?;
    let pinned = if replace {
        PinnedLinks::Replace
    } else {
        PinnedLinks::Verify
    };
    attach_pod_veths(&mut dp, pinned, &mut report)?;
    // Uplinks an earlier run attached to get this agent's program at once (new ones come with
    // the first scan, once the node's addresses are known).
    if replace {
        let links = links_by_index()?;
        for index in datapath::pinned_uplinks(dp.pins()) {
            if let Some(name) = links.get(&index) {
                let r = dp.attach_uplink(name, index, PinnedLinks::Replace)?;
                report.upgraded += r.upgraded;
            }
        }
    }
    dp.configure(
        cfg.modes,
        host_netns_cookie().map_err(ServicesError::NetnsCookie)?,
        identity,
        cfg.service_cidrs.fixed(),
    )?;
    dp.keep_out_of_force(false);
    if !per_packet {
        dp.unpin_out_of_force_programs()?;
        attach_pod_veths(&mut dp, PinnedLinks::Keep, &mut report)?;
    }
    let handles = MapHandles::new(|name| dp.take_map(name).ok())?;
    let maps = ServiceMaps::adopt(handles, cfg.sizes.services, cfg.sizes.backends)?;
    Ok((dp, maps, report))
}

/// Makes every pod veth's links match the pod programs in force (`pinned`: what happens to links
/// that exist), adding what it did to `report`.
fn attach_pod_veths(
    dp: &mut Datapath,
    pinned: PinnedLinks,
    report: &mut datapath::AttachReport,
) -> Result<(), ServicesError> {
    for veth in host_veths()? {
        let r = match dp.attach_pod_veth(&veth, pinned) {
            Ok(r) => r,
            // Deleted since the listing (a pod going away).
            Err(_) if !datapath::interface_exists(&veth) => continue,
            Err(e) => return Err(e.into()),
        };
        report.attached += r.attached;
        report.upgraded += r.upgraded;
        report.detached += r.detached;
        // A veth's links the first pass found or made are not counted twice.
        if pinned != PinnedLinks::Keep {
            report.kept += r.kept;
        }
    }
    Ok(())
}

/// Every interface of this namespace (the node's), by index.
fn links_by_index() -> Result<BTreeMap<u32, String>, ServicesError> {
    let mut netlink =
        ferrynet_kernel::netlink::Netlink::current().map_err(|e| ServicesError::Netlink(e.to_string()))?;
    Ok(netlink
        .links()
        .map_err(|e| ServicesError::Netlink(e.to_string()))?
        .iter()
        .filter_map(|l| {
            Some((
                l.header.index,
                ferrynet_kernel::netlink::inspect::link_name(l)?.to_string(),
            ))
        })
        .collect())
}

/// The pod host veths in this namespace (the node's).
fn host_veths() -> Result<Vec<String>, ServicesError> {
    Ok(links_by_index()?
        .into_values()
        .filter(|n| n.starts_with(ferrynet_kernel::names::HOST_VETH_PREFIX))
        .collect())
}

struct Controller {
    cfg: Arc<ServicesConfig>,
    datapath: Datapath,
    maps: ServiceMaps,
    objects: Objects,
    /// A full sync computed while the datapath loaded, for the first batch.
    ahead: Option<Ahead>,
    /// The frontends each Service has in the maps.
    /// (Sorted lists, not sets: a Service has a handful.)
    service_frontends: HashMap<ServiceRef, Vec<Frontend>>,
    frontend_owner: HashMap<Frontend, ServiceRef>,
    node: NodeContext,
    /// This node's InternalIPs (the uplinks are the interfaces that hold them; health check
    /// ports listen on them).
    internal_ips: Vec<IpAddr>,
    /// The health check port each Service needs, with its local endpoint count.
    health_checks: BTreeMap<ServiceRef, (u16, health_check::HealthCheck)>,
    health_servers: health_check::HealthCheckServers,
    warnings: BTreeMap<ServiceRef, Vec<Warning>>,
    metrics: Arc<ServiceMetrics>,
    health: Arc<Health>,
    status: StatusHandle,
    /// Both kinds have been listed.
    synced: bool,
    /// When the maps' fill was last counted.
    fill_refreshed: Option<Instant>,
    /// The walk counting the maps' fill, while it runs.
    fill_walk: Option<tokio::task::JoinHandle<()>>,
    /// What the datapath's external reply check was last set to (none: not yet this run).
    external_on: Option<bool>,
    /// A removal the removal generation has not yet been moved on for (a write that failed is
    /// tried again at the next batch or resync).
    generation_due: bool,
    notes: notes::NotesWriter,
    /// Batches' statuses, each to be published once its notes are written (when the receiver
    /// resolves), in order; `run` takes them over at each turn of its loop.
    status_after_notes: VecDeque<(tokio::sync::oneshot::Receiver<()>, BatchStatus)>,
    /// A status was published at once (a full sync's) since `run` last took the queue: the
    /// older ones it still holds are out of date.
    status_published: bool,
    /// A status still waiting says the maps changed: one published in its place says so too, so
    /// that the last change's time is not lost with it.
    change_waiting: bool,
    /// Pinned maps whose capacity is not the settings' (found at load).
    map_warnings: Vec<Warning>,
    /// Purges removed backends' and frontends' flows beside the controller.
    purger: purge::Purger,
    /// The API's ServiceCIDR objects, when the Service CIDRs are read there.
    cidr_watch: Option<ServiceCidrWatch>,
    /// The other nodes' PodCIDRs last written for flows past the stack (none: not yet).
    peer_pods: Option<Vec<IpNet>>,
    /// The Service CIDRs those objects give (none before they are listed, or when they are not
    /// read), and what of them [`clear_of_cluster`] left out, as last said.
    service_cidrs_from_api: Option<Vec<IpNet>>,
    service_cidrs_left_out: Vec<String>,
    /// The nodes as last seen: their addresses and PodCIDRs are kept out of the Service CIDRs.
    nodes_view: Arc<NodesView>,
    /// The Service CIDRs to be in the datapath, and those last written there.
    service_cidrs_wanted: Option<Vec<IpNet>>,
    service_cidrs_written: Option<Vec<IpNet>>,
}

/// A watch of one kind, with its list state.
struct Listing<K> {
    building: Option<Vec<K>>,
    listed: bool,
}

impl<K> Default for Listing<K> {
    fn default() -> Self {
        Self {
            building: None,
            listed: false,
        }
    }
}

impl Controller {
    async fn run(
        &mut self,
        mut watches: Watches,
        mut service_list: Listing<Service>,
        mut slice_list: Listing<EndpointSlice>,
        mut nodes: watch::Receiver<Arc<NodesView>>,
        mut servers: tokio::task::JoinSet<Result<(), http::ListenError>>,
        mut purged: tokio::sync::mpsc::UnboundedReceiver<purge::Purged>,
    ) -> Result<(), ServicesError> {
        let mut veth_scan = tokio::time::interval(VETH_SCAN);
        veth_scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval(self.cfg.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut healthz_started = false;
        let mut first_dirty: Option<Instant> = None;
        let mut last_event = Instant::now();
        self.nodes_view = nodes.borrow_and_update().clone();
        self.update_zone(&self.nodes_view.clone());
        // Service CIDRs the API listed while the datapath loaded.
        if let Some(cidrs) = self.cidr_watch.as_mut().and_then(ServiceCidrWatch::current) {
            tokio::task::block_in_place(|| self.want_service_cidrs(cidrs));
        }
        // What an earlier agent removed and did not live to purge.
        let unfinished = self.maps.take_unfinished();
        if !unfinished.is_empty() {
            info!(
                "purging the flows of {} backends an earlier run removed",
                unfinished.backends.len()
            );
            self.purge(unfinished);
        }
        // Lists that finished while the datapath loaded are programmed at once.
        self.process_when_due(&service_list, &slice_list, &mut first_dirty, last_event);
        // Batches' statuses waiting for their notes, oldest first. Each is published as its own
        // notes are written (the writer answers in order), so that under a steady stream of
        // changes the status keeps moving rather than waiting for the stream to end.
        let mut statuses: VecDeque<(tokio::sync::oneshot::Receiver<()>, BatchStatus)> = VecDeque::new();
        loop {
            if std::mem::take(&mut self.status_published) {
                statuses.clear();
            }
            statuses.extend(self.status_after_notes.drain(..));
            // A notes writer that stalls (a hung disk) must not make the queue grow without
            // bound: the oldest statuses, which newer ones supersede anyway, go.
            while statuses.len() > STATUSES_WAITING_AT_MOST {
                if let Some((_, dropped)) = statuses.pop_front()
                    && let Some((_, next)) = statuses.front_mut()
                {
                    next.changed |= dropped.changed;
                }
            }
            // /healthz listens on the node's own address, once the node is known.
            let node_ip = nodes
                .borrow()
                .get(&self.cfg.node_name)
                .and_then(|n| n.internal_ips.first().copied());
            if !healthz_started
                && self.cfg.healthz_port != 0
                && let Some(ip) = node_ip
            {
                servers.spawn(http::serve_healthz(
                    SocketAddr::new(ip, self.cfg.healthz_port),
                    self.health.clone(),
                ));
                healthz_started = true;
            }
            let batch_due = first_dirty.map(|first| {
                let quiet = last_event + BATCH_QUIET;
                let latest = first + BATCH_AT_MOST;
                quiet.min(latest)
            });
            let sleep_until = batch_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                event = watches.next() => {
                    self.objects.on_watch_event(event?, &mut service_list, &mut slice_list);
                    last_event = Instant::now();
                }
                changed = nodes.changed() => {
                    changed.map_err(|_| ServicesError::ViewClosed)?;
                    let view = nodes.borrow_and_update().clone();
                    self.update_zone(&view);
                    self.nodes_view = view;
                    // A node's new address or PodCIDR may be in a Service CIDR.
                    tokio::task::block_in_place(|| self.guard_service_cidrs());
                }
                _ = veth_scan.tick() => {
                    tokio::task::block_in_place(|| {
                        self.scan_veths(PinnedLinks::Keep);
                        self.scan_nodeports(PinnedLinks::Keep);
                    });
                }
                cidrs = async {
                    match self.cidr_watch.as_mut() {
                        Some(watch) => watch.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    tokio::task::block_in_place(|| self.want_service_cidrs(cidrs));
                }
                _ = resync.tick() => {
                    tokio::task::block_in_place(|| {
                        // Links something else detached are attached again within a resync.
                        self.scan_veths(PinnedLinks::Verify);
                        self.scan_nodeports(PinnedLinks::Verify);
                        self.refresh_datapath_counters();
                        // Service CIDRs whose write failed are written again.
                        self.write_service_cidrs();
                        self.finish_stamp_scan();
                    });
                    // A health check server that could not bind tries again.
                    self.sync_health_checks();
                }
                _ = async {
                    if let Some((written, _)) = statuses.front_mut() {
                        // Written, or the writer is gone: either way, nothing more to wait for.
                        let _ = written.await;
                    }
                }, if !statuses.is_empty() => {
                    if let Some((_, batch)) = statuses.pop_front() {
                        batch.publish(&self.status);
                    }
                    if statuses.is_empty() && self.status_after_notes.is_empty() {
                        self.change_waiting = false;
                    }
                }
                Some(done) = purged.recv() => {
                    tokio::task::block_in_place(|| self.on_purged(done));
                }
                Some(ended) = servers.join_next() => {
                    match ended {
                        Ok(Err(e)) => warn!("{e}"),
                        Ok(Ok(())) => {}
                        Err(e) => warn!("an HTTP endpoint ended: {e}"),
                    }
                }
                _ = tokio::time::sleep_until(sleep_until.into()), if batch_due.is_some() => {}
            }
            self.process_when_due(&service_list, &slice_list, &mut first_dirty, last_event);
        }
    }

    /// Once both kinds are listed: a batch, when one is due (a full sync at once; changes once
    /// events have settled, or have waited long enough).
    fn process_when_due(
        &mut self,
        service_list: &Listing<Service>,
        slice_list: &Listing<EndpointSlice>,
        first_dirty: &mut Option<Instant>,
        last_event: Instant,
    ) {
        self.synced = service_list.listed && slice_list.listed;
        if !self.synced || (self.objects.dirty.is_empty() && !self.objects.full_sync_due) {
            return;
        }
        let now = Instant::now();
        let first = *first_dirty.get_or_insert(now);
        let due = self.objects.full_sync_due || now >= (last_event + BATCH_QUIET).min(first + BATCH_AT_MOST);
        if due {
            tokio::task::block_in_place(|| self.process());
            *first_dirty = None;
        }
    }

    fn update_zone(&mut self, view: &NodesView) {
        if let Some(local) = view.get(&self.cfg.node_name)
            && local.internal_ips != self.internal_ips
        {
            self.internal_ips = local.internal_ips.clone();
            // Servers listen on the InternalIPs: started again on the new ones.
            self.health_servers = health_check::HealthCheckServers::default();
            self.sync_health_checks();
        }
        let zone = view.get(&self.cfg.node_name).and_then(|n| n.zone.clone());
        if zone != self.node.zone {
            self.node.zone = zone;
            // Topology hints are read against the zone: every Service may change.
            self.objects.full_sync_due = true;
        }
    }

    /// The desired entries of `svc` (none if it is gone or not translated).
    fn desired(&mut self, svc: &ServiceRef) -> Vec<PortEntry> {
        let computed = self.objects.compute(svc, &self.node);
        self.take_desired(svc, computed)
    }

    /// Files what was computed for `svc` (its health check and warnings) and returns its
    /// entries, less any frontend another Service already holds.
    fn take_desired(&mut self, svc: &ServiceRef, computed: Option<Computed>) -> Vec<PortEntry> {
        let Some(Computed {
            health_check,
            entries: mut out,
        }) = computed
        else {
            self.warnings.remove(svc);
            self.health_checks.remove(svc);
            return Vec::new();
        };
        match health_check {
            Some(check) => self.health_checks.insert(svc.clone(), check),
            None => self.health_checks.remove(svc),
        };
        // A frontend another Service holds stays that Service's (the API server never gives one
        // address to two Services; a stand-in or a bug might).
        out.entries.retain(|e| match self.frontend_owner.get(&e.frontend) {
            Some(owner) if owner != svc => {
                out.warnings.push(Warning::new(
                    WarningKind::HostileService,
                    format!("service {svc}: {} belongs to service {owner}; left out", e.frontend),
                ));
                false
            }
            _ => true,
        });
        if out.warnings.is_empty() {
            self.warnings.remove(svc);
        } else {
            self.warnings.insert(svc.clone(), out.warnings);
        }
        out.entries
    }

    /// One batch: the dirty Services (or everything, after a list), diffed and applied.
    fn process(&mut self) {
        let started = Instant::now();
        let full = std::mem::take(&mut self.objects.full_sync_due);
        let dirty: Vec<ServiceRef> = if full {
            self.objects.dirty.clear();
            self.objects.all(self.service_frontends.keys())
        } else {
            std::mem::take(&mut self.objects.dirty).into_iter().collect()
        };
        let mut ops: Vec<FrontendOp> = Vec::new();
        if full {
            // Against everything the maps hold: frontends of Services that are gone (deleted
            // while the agent was away, too) are deleted.
            self.frontend_owner.clear();
            self.service_frontends.clear();
            let mut desired = Vec::new();
            // Computed while the datapath loaded, unless anything it was computed from changed.
            let computed = match self.ahead.take() {
                Some(ahead)
                    if ahead.generation == self.objects.generation
                        && ahead.node == self.node
                        && ahead.services == dirty =>
                {
                    ahead.computed
                }
                _ => self.objects.compute_all(&dirty, &self.node),
            };
            for (svc, computed) in dirty.iter().zip(computed) {
                for entry in self.take_desired(svc, computed) {
                    if self.frontend_owner.contains_key(&entry.frontend) {
                        continue;
                    }
                    self.frontend_owner.insert(entry.frontend, svc.clone());
                    desired.push(entry);
                }
            }
            ops = diff::diff(self.maps.frontends(), &desired);
            for entry in &desired {
                let held = self.service_frontends.entry(entry.service.clone()).or_default();
                if let Err(at) = held.binary_search(&entry.frontend) {
                    held.insert(at, entry.frontend);
                }
            }
        } else {
            for svc in &dirty {
                let desired = self.desired(svc);
                let held = self.service_frontends.get(svc).cloned().unwrap_or_default();
                let current: BTreeMap<Frontend, AppliedFrontend> = self.maps.frontends_of(held.iter());
                ops.extend(diff::diff(&current, &desired));
                for frontend in &held {
                    self.frontend_owner.remove(frontend);
                }
                let mut now_held: Vec<Frontend> = desired.iter().map(|e| e.frontend).collect();
                now_held.sort();
                now_held.dedup();
                for frontend in &now_held {
                    self.frontend_owner.insert(*frontend, svc.clone());
                }
                if now_held.is_empty() {
                    self.service_frontends.remove(svc);
                } else {
                    self.service_frontends.insert(svc.clone(), now_held);
                }
            }
        }
        let computed = started.elapsed();
        let outcome = self.maps.apply(&ops);
        if full {
            // Frontends whose notes alone were written are no change to the maps (after a restart,
            // every frontend: its notes are not known from the maps).
            let notes_alone = ops.iter().filter(|op| matches!(op, FrontendOp::Notes { .. })).count();
            info!(
                "full sync: {} Services, {} frontend changes, {} notes alone ({:.1} ms to compute, {:.1} ms to write)",
                dirty.len(),
                ops.len() - notes_alone,
                notes_alone,
                computed.as_secs_f64() * 1e3,
                (started.elapsed() - computed).as_secs_f64() * 1e3
            );
        }
        self.sync_health_checks();
        // Pods' packets check for external flows' replies only while a NodePort exists.
        let external = self.maps.frontends().keys().any(|f| f.scope == table::Scope::External);
        // Written only when it changes: one map write per change, not per batch.
        if self.external_on != Some(external) {
            match self.datapath.set_external(external) {
                Ok(()) => self.external_on = Some(external),
                Err(e) => warn!(
                    "turning the external reply check {}: {e}",
                    if external { "on" } else { "off" }
                ),
            }
        }
        self.finish(outcome, &dirty, started, full);
        // The API server's addresses (its Service's endpoints, which this batch may have changed)
        // are kept out of the Service CIDRs.
        if full || dirty.binary_search(&api_server_service()).is_ok() {
            self.guard_service_cidrs();
        }
        if full {
            release_freed_memory();
        }
    }

    /// Moves the removal generation on when a removal is due: the per-packet path then looks up
    /// every known flow's frontend and backend again at its next packet, instead of sending it by
    /// its conntrack entry. A failed write stays due, for the next batch or resync.
    fn advance_removal_generation(&mut self, errors: &mut Vec<String>) {
        if !self.generation_due {
            return;
        }
        match self.datapath.advance_removal_generation() {
            Ok(()) => self.generation_due = false,
            // Moved: only the stamp scan failed, which stays due for the resync to finish
            // ([`Self::finish_stamp_scan`]) without moving the generation again.
            Err(e @ DatapathError::StampScan { .. }) => {
                self.generation_due = false;
                errors.push(e.to_string());
            }
            Err(e) => errors.push(format!("moving the removal generation on: {e}")),
        }
    }

    /// Finishes, within a resync, what a start of the removal generation again at 1 left due
    /// ([`Datapath::finish_due_stamp_scan`]), instead of waiting for the next removal, which on
    /// a quiet cluster may be hours away: a scan that failed runs again, and the second pass
    /// (for a stamp a program wrote behind the first's back) comes with a move of its own. A
    /// move costs each known flow one lookup at its next packet; the generation starts again at
    /// 1 once per 65,535 removals, and at a start on a fresh datapath or after a downgrade. A
    /// move whose write failed is tried again here too.
    fn finish_stamp_scan(&mut self) {
        let mut errors = Vec::new();
        match self.datapath.finish_due_stamp_scan() {
            Ok(move_due) => self.generation_due |= move_due,
            Err(e) => errors.push(format!("taking the stamps off the conntrack entries: {e}")),
        }
        self.advance_removal_generation(&mut errors);
        for e in errors {
            self.metrics.errors.add(1);
            warn!("{e}");
        }
    }

    /// Purges `removals` beside the controller; their ids are freed when it reports back
    /// ([`Self::on_purged`]). Without the worker, here and now.
    fn purge(&mut self, removals: purge::Removals) {
        if let Err(removals) = self.purger.submit(removals) {
            let done = purge::run(self.datapath.pins(), removals);
            self.on_purged(done);
        }
    }

    /// A purge finished: the removed ids are free again.
    fn on_purged(&mut self, done: purge::Purged) {
        self.metrics.conntrack_purged.add(done.entries as u64);
        let mut errors = done.errors;
        if let Err(e) = self.maps.release_removed(&done.removals) {
            errors.0.extend(e.0);
        }
        if !errors.0.is_empty() {
            self.metrics.errors.add(errors.0.len() as u64);
            warn!("service datapath, removing flows of removed backends: {errors}");
        }
    }

    /// Records what a batch did; terminates the sockets of removed backends and hands their
    /// flows to the purge worker; updates notes, metrics, health and status.
    ///
    /// A change's status waits for its notes ([`Controller::status_after_notes`]), so `explain` says
    /// why as soon as the status says done, while the controller goes on at once: a notes write
    /// that it waited for held up the next change by up to tens of milliseconds on a busy node.
    /// A full sync's notes (thousands at a start) follow on their own.
    fn finish(&mut self, mut outcome: BatchOutcome, processed: &[ServiceRef], started: Instant, full: bool) {
        for (id, entry) in std::mem::take(&mut outcome.written) {
            self.notes.write(id, entry);
        }
        for id in &outcome.removed_frontends {
            self.notes.remove(*id);
        }
        let notes_written = if full { None } else { self.notes.written() };
        let mut errors: Vec<String> = outcome.errors.0.iter().map(ToString::to_string).collect();
        // Frontends deleted or emptied by the batch are already out of the maps: flows checked
        // before must be checked again at their next packet, before anything slower runs here.
        self.generation_due |= outcome.generation_due;
        self.advance_removal_generation(&mut errors);
        let removed = !outcome.removed_backends.is_empty() || !outcome.removed_frontends.is_empty();
        if removed {
            if let Err(e) = self.maps.doom(&outcome.removed_backends) {
                errors.push(e.to_string());
            }
            if !outcome.removed_backends.is_empty() {
                for failure in self.terminate_sockets() {
                    errors.push(failure);
                }
                self.metrics.sockets_terminated_runs.add(1);
            }
            if let Err(e) = self.maps.detach_removed(&outcome.removed_backends) {
                errors.push(e.to_string());
            }
            // The backends are out of the maps now: their flows' next packets look them up.
            self.generation_due |= !outcome.removed_backends.is_empty();
            self.advance_removal_generation(&mut errors);
            self.purge(purge::Removals {
                backends: outcome.removed_backends.keys().copied().collect(),
                frontends: std::mem::take(&mut outcome.removed_frontends),
            });
        }
        let elapsed = started.elapsed();
        let now = k8s_openapi::jiff::Timestamp::now();
        for svc in processed {
            if let Some(trigger) = self.objects.triggers.remove(svc)
                && let Ok(span) = now.duration_since(trigger).try_into()
            {
                self.metrics.network_programming.observe(span);
            }
        }
        self.metrics.sync_duration.observe(elapsed);
        self.metrics.syncs.add(1);
        self.metrics.map_writes.add(outcome.writes as u64);
        self.metrics.last_sync_unix.set(now_unix());
        self.metrics.services.set(self.service_frontends.len() as u64);
        self.metrics.frontends.set(self.maps.frontends().len() as u64);
        self.metrics.backends.set(self.maps.backend_count() as u64);
        if !errors.is_empty() {
            self.metrics.errors.add(errors.len() as u64);
            warn!("service datapath: {}", errors.join("; "));
        } else {
            self.health.updated();
        }
        let warnings: Vec<Warning> = self
            .map_warnings
            .iter()
            .chain(self.warnings.values().flatten())
            .cloned()
            .collect();
        let mut batch = BatchStatus {
            errors,
            warnings,
            services: self.service_frontends.len(),
            frontends: self.maps.frontends().len(),
            backends: self.maps.backend_count(),
            changed: outcome.writes > 0,
        };
        match notes_written {
            Some(written) => {
                self.change_waiting |= batch.changed;
                self.status_after_notes.push_back((written, batch));
            }
            // Published now (a full sync's, or past a start's backlog of notes): any status
            // still waiting is older.
            None => {
                self.status_after_notes.clear();
                self.status_published = true;
                batch.changed |= std::mem::take(&mut self.change_waiting);
                batch.publish(&self.status);
            }
        }
    }

    /// Runs the socket terminators in the node's namespace and in every pod's: sockets
    /// connected to a removed backend are destroyed. Returns the failures.
    fn terminate_sockets(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        if let Err(e) = self.datapath.terminate_sockets_here() {
            failures.push(format!("terminating sockets on the node: {e}"));
        }
        for netns in pod_netns_paths(&self.cfg.ipam_data_dir, &self.cfg.network) {
            let Ok(fd) = ferrynet_kernel::netns::open(&netns) else {
                continue;
            };
            let datapath = &mut self.datapath;
            let result = ferrynet_kernel::netns::run_in(std::os::fd::AsFd::as_fd(&fd), || {
                datapath.terminate_sockets_here().map_err(std::io::Error::other)
            });
            if let Err(e) = result {
                failures.push(format!("terminating sockets in {}: {e}", netns.display()));
            }
        }
        failures
    }

    /// Attaches the pod programs to veths that lack them (`pinned`: what to do with those that
    /// have them); forgets the links of veths that are gone. (The CNI attaches to the veths it
    /// makes itself; the two take turns under a lock.)
    fn scan_veths(&mut self, pinned: PinnedLinks) {
        let Ok(veths) = host_veths() else {
            return;
        };
        if let Err(errors) = self.datapath.scan_pod_veths(&veths, pinned) {
            for e in errors.0 {
                warn!("scanning the pod veths: {e}");
            }
        }
    }

    /// Starts, updates and stops the `healthCheckNodePort` servers. Two Services on one port
    /// (which the API server never allows): the first by name serves it.
    fn sync_health_checks(&mut self) {
        let mut by_port: BTreeMap<u16, health_check::HealthCheck> = BTreeMap::new();
        for (port, check) in self.health_checks.values() {
            by_port.entry(*port).or_insert_with(|| check.clone());
        }
        self.health_servers.sync(&by_port, &self.internal_ips, &self.health);
    }

    /// Keeps the node address maps and the uplinks' program in step with the node's addresses
    /// and interfaces (an address added after start answers NodePorts within a scan).
    fn scan_nodeports(&mut self, pinned: PinnedLinks) {
        let Ok(mut netlink) = ferrynet_kernel::netlink::Netlink::current() else {
            return;
        };
        let (Ok(addresses), Ok(links)) = (netlink.addresses(None), links_by_index()) else {
            return;
        };
        let wanted = nodeport::addresses(&addresses, &self.cfg.nodeport_addresses);
        if let Err(e) = self.datapath.set_node_addresses(&wanted) {
            warn!("writing the node's NodePort addresses: {e}");
        }
        if let Err(e) = self.datapath.set_snat_addresses(&self.internal_ips) {
            warn!("writing the node's SNAT addresses: {e}");
        }
        let links: Vec<(u32, String)> = links.into_iter().collect();
        let uplinks = nodeport::uplinks(&addresses, &links, &self.internal_ips, &self.cfg.nodeport_interfaces);
        for (index, name) in &uplinks {
            if let Err(e) = self.datapath.attach_uplink(name, *index, pinned) {
                warn!("attaching the uplink program to {name}: {e}");
            }
        }
        // Flows past the stack go out only where the uplink program sees their replies: an
        // interface is among the uplinks from when its program is attached until before it is
        // detached (a failed write leaves the program on, for the next scan).
        let attached = datapath::pinned_uplinks(self.datapath.pins());
        let kept = attached.iter().copied().filter(|i| uplinks.contains_key(i)).collect();
        if let Err(e) = self.datapath.set_uplinks(kept) {
            warn!("writing the uplinks: {e}");
            return;
        }
        for index in attached {
            if !uplinks.contains_key(&index)
                && let Err(e) = datapath::unpin_uplink(self.datapath.pins(), index)
            {
                warn!("detaching the uplink program from interface {index}: {e}");
            }
        }
        self.sync_peer_pods();
    }

    /// Keeps the tries of other nodes' PodCIDRs whose flows may go past the stack in step with
    /// the node networking's routes (written when they change).
    /// Not before the node networking's first pass: until then its routes are not known, and
    /// what an earlier run wrote stays.
    fn sync_peer_pods(&mut self) {
        let node = self.status.snapshot().node_networking;
        if !node.ready && self.peer_pods.is_none() {
            return;
        }
        let wanted = past_stack::peer_pod_cidrs(&node.details);
        if self.peer_pods.as_ref() == Some(&wanted) {
            return;
        }
        match self.datapath.set_peer_pod_cidrs(&wanted) {
            Ok(()) => self.peer_pods = Some(wanted),
            Err(e) => warn!("writing the other nodes' PodCIDRs: {e}"),
        }
    }

    /// The Service CIDRs the API's ServiceCIDR objects give now: into the tries, then the
    /// settings' cover.
    fn want_service_cidrs(&mut self, cidrs: Vec<IpNet>) {
        self.service_cidrs_from_api = Some(cidrs);
        self.guard_service_cidrs();
    }

    /// The API's Service CIDRs without those holding a node's address or pods, or the API
    /// server's ([`clear_of_cluster`]), once the nodes and the EndpointSlices are listed: until
    /// then the datapath keeps what it holds, as it does until the ServiceCIDRs are listed.
    fn guard_service_cidrs(&mut self) {
        let Some(from_api) = &self.service_cidrs_from_api else {
            return;
        };
        if !self.nodes_view.synced || !self.synced {
            return;
        }
        let api_servers = self.objects.api_server_addresses();
        let (kept, left_out) = clear_of_cluster(from_api, &self.nodes_view.nodes, &api_servers);
        if left_out != self.service_cidrs_left_out {
            for problem in &left_out {
                warn!("{problem}");
            }
            self.status
                .update(|s| s.services.details.service_cidrs_left_out = left_out.clone());
            self.service_cidrs_left_out = left_out;
        }
        self.service_cidrs_wanted = Some(kept);
        self.write_service_cidrs();
    }

    /// Writes the wanted Service CIDRs unless the datapath holds them already (a write that
    /// fails is tried again at the next resync).
    fn write_service_cidrs(&mut self) {
        // Every resync asks: nothing to do (and nothing copied) while they are written.
        let Some(wanted) = self
            .service_cidrs_wanted
            .as_ref()
            .filter(|wanted| self.service_cidrs_written.as_ref() != Some(*wanted))
            .cloned()
        else {
            return;
        };
        let written = self
            .datapath
            .set_service_cidrs(&wanted)
            .and_then(|()| self.datapath.set_api_service_cidr_cover(&wanted));
        match written {
            Ok(()) => {
                self.status
                    .update(|s| s.services.details.service_cidrs = Some(wanted.clone()));
                self.service_cidrs_written = Some(wanted);
            }
            Err(e) => {
                self.metrics.errors.add(1);
                warn!("writing the Service CIDRs from the API: {e}");
            }
        }
    }

    /// The kernel's counters at every resync; the maps' fill less often (`map_fill_period`),
    /// from the mirror for the maps the agent writes and by walking the others.
    fn refresh_datapath_counters(&mut self) {
        let stats = self.datapath.stats().unwrap_or_default();
        if let Ok(mut slot) = self.metrics.datapath.lock() {
            slot.stats = stats;
        }
        let fill_due = self
            .fill_refreshed
            .is_none_or(|at| at.elapsed() >= self.cfg.map_fill_period);
        let walking = self.fill_walk.as_ref().is_some_and(|walk| !walk.is_finished());
        if !fill_due || walking {
            return;
        }
        self.fill_refreshed = Some(Instant::now());
        let frontends = self.maps.frontends();
        let v4 = frontends.keys().filter(|f| f.addr.is_ipv4()).count() as u64;
        let slots: u64 = frontends.values().map(|a| a.slots.len() as u64).sum();
        let known = [
            (ferrynet_common::SERVICES4_MAP, v4),
            (ferrynet_common::SERVICES6_MAP, frontends.len() as u64 - v4),
            (ferrynet_common::REV_NAT_MAP, frontends.len() as u64),
            (ferrynet_common::SERVICE_SLOTS_MAP, slots),
            (ferrynet_common::BACKENDS_MAP, self.maps.backend_count() as u64),
        ];
        // Walking the conntrack and socket maps takes a syscall per entry, a good part of a
        // second when they are full: beside the controller, whose changes must not wait for it.
        let pins = self.datapath.pins().clone();
        let metrics = self.metrics.clone();
        self.fill_walk = Some(tokio::task::spawn_blocking(move || {
            // The walk also removes the conntrack entries of flows that ended.
            let found = datapath::map_fill(&pins, &known);
            metrics.conntrack_expired.add(found.expired_removed);
            if let Ok(mut slot) = metrics.datapath.lock() {
                slot.fill = found.fill;
            }
        }));
    }
}

/// After a full sync (the first, or a relist), the list's objects and their JSON have been
/// freed: give that memory back to the system rather than keep it in the allocator's arenas,
/// so the agent's resident size follows what it holds, not the largest list it ever parsed.
pub(crate) fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The network namespaces of this node's pods, as their IPAM records name them.
fn pod_netns_paths(data_dir: &Path, network: &str) -> Vec<PathBuf> {
    let Ok(store) = ferrynet_ipam::Store::open(data_dir, network) else {
        return Vec::new();
    };
    let Ok(locked) = store.lock() else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = locked
        .attachments_lenient()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|a| a.netns.map(PathBuf::from))
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Whether `ip` is inside any of `cidrs`.
pub fn in_cidrs(ip: IpAddr, cidrs: &[IpNet]) -> bool {
    cidrs.iter().any(|c| c.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::EndpointConditions;

    use crate::services::objects::{Endpoint, EndpointPort, Meta, ServicePort, ServiceSpec};

    fn service(i: usize) -> Service {
        Service {
            metadata: Meta {
                name: Some(format!("web-{i}")),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.{}.{}", i / 250, i % 250 + 1)),
                ports: Some(vec![ServicePort {
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(i: usize) -> EndpointSlice {
        EndpointSlice {
            metadata: Meta {
                name: Some(format!("web-{i}-abc")),
                namespace: Some("default".into()),
                labels: Some([(table::SERVICE_NAME_LABEL.to_string(), format!("web-{i}"))].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            endpoints: vec![Endpoint {
                addresses: vec![format!("10.244.{}.{}", i / 250, i % 250 + 1)],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        }
    }

    /// Both lists, as the watches deliver them.
    fn listed(n: usize) -> Objects {
        let mut objects = Objects::new(Arc::new(Health::new(Duration::from_secs(60))));
        let mut service_list = Listing::default();
        let mut slice_list = Listing::default();
        let services = (0..n).map(|i| WatchEvent::Service(Ok(watcher::Event::InitApply(service(i)))));
        let slices = (0..n).map(|i| WatchEvent::Slice(Ok(watcher::Event::InitApply(slice(i)))));
        let events = [WatchEvent::Service(Ok(watcher::Event::Init))]
            .into_iter()
            .chain(services)
            .chain([
                WatchEvent::Service(Ok(watcher::Event::InitDone)),
                WatchEvent::Slice(Ok(watcher::Event::Init)),
            ])
            .chain(slices)
            .chain([WatchEvent::Slice(Ok(watcher::Event::InitDone))]);
        for event in events {
            objects.on_watch_event(event, &mut service_list, &mut slice_list);
        }
        assert!(service_list.listed && slice_list.listed);
        objects
    }

    fn node() -> NodeContext {
        NodeContext {
            name: "n1".into(),
            zone: None,
            proxy_name: "ferrynet".into(),
            load_balancing: Default::default(),
        }
    }

    #[test]
    fn a_full_sync_computed_on_several_threads_is_the_one_computed_service_by_service() {
        // Enough Services for several chunks, and not a multiple of a chunk.
        let objects = listed(COMPUTE_CHUNK_AT_LEAST * 2 + 37);
        let ahead = objects.ahead(node());
        assert_eq!(ahead.services.len(), objects.services.len());
        assert_eq!(ahead.computed.len(), ahead.services.len());
        for (svc, computed) in ahead.services.iter().zip(&ahead.computed) {
            let one = objects.compute(svc, &node()).expect("listed");
            let many = computed.as_ref().expect("listed");
            assert_eq!(many.entries.entries, one.entries.entries, "{svc}");
            assert_eq!(many.entries.entries.len(), 1, "{svc}: its ClusterIP port");
            assert_eq!(many.entries.entries[0].backends.len(), 1, "{svc}: its endpoint");
        }
        // In the order a full sync goes through them.
        assert!(ahead.services.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn an_event_after_the_lists_makes_what_was_computed_ahead_stale() {
        let mut objects = listed(3);
        let ahead = objects.ahead(node());
        assert_eq!(ahead.generation, objects.generation);
        let (mut service_list, mut slice_list) = (Listing::default(), Listing::default());
        objects.on_watch_event(
            WatchEvent::Service(Ok(watcher::Event::Delete(service(1)))),
            &mut service_list,
            &mut slice_list,
        );
        assert_ne!(ahead.generation, objects.generation);
        assert_eq!(objects.all(std::iter::empty()).len(), 2);
    }
}
