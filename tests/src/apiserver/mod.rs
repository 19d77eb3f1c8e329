//! A stand-in for the Kubernetes API server, for environments without a cluster (the lab and the
//! tests). It is **not Kubernetes**: no authentication, no admission, no schema validation, no
//! garbage collector and no controllers, and only the kinds ferrynet and the lab work with
//! (Nodes, Namespaces, Services, Pods, EndpointSlices, apps/v1 Deployments, and v1 Endpoints).
//!
//! What it does implement is the REST protocol those kinds are used through, so that clients
//! (kube-rs, the real `kubectl`) talk to it exactly as they would to a real API server:
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`, each group and group version, with
//!   short names, the `all` category, `status` subresources and Deployments' `scale`;
//! - list with `resourceVersion`, `labelSelector` and `fieldSelector` (`metadata.name`,
//!   `metadata.namespace`);
//! - watch as a stream of newline-delimited events, replaying history from a `resourceVersion`,
//!   with `BOOKMARK` events when asked for and an `ERROR` event with status 410 (Gone) when the
//!   requested version is older than the history it keeps; `timeoutSeconds` ends the stream;
//! - server-side printing: list, get and watch answer with `meta.k8s.io` Tables when the
//!   `Accept` header asks (as `kubectl get` does), with the real printers' columns ([`table`]);
//! - create, replace (the object, or its `status` subresource), merge-patch and delete, with
//!   `resourceVersion` conflicts (409), `dryRun=All` (nothing allocated or stored), and Status
//!   objects for every error. Bodies are JSON, or Kubernetes protobuf for the kinds client-go's
//!   typed clients send (Deployment, Service, Pod: kubectl's `create deployment`, `create
//!   service`), decoded by a schema of their fields ([`protobuf`]); a strategic merge patch is
//!   refused (415), except on a `scale` subresource, where it is the same as a merge patch;
//! - what the real API server does to some kinds: a Service's ClusterIPs and NodePorts are
//!   allocated; a pod starts `Pending`; a pod's delete is graceful; a Deployment is defaulted
//!   (one replica, rolling update, the pod template's defaults), checked (its selector must
//!   select its template) and scaled through `/scale` (an `autoscaling/v1` Scale)
//!   ([`deployments`]); `metadata.generation` counts spec changes;
//! - v1 Endpoints, which the stand-in keeps itself, mirrored from each Service's EndpointSlices
//!   as the control plane's endpoints controller keeps them ([`endpoints`]). Clients may only
//!   read them: every write is refused with 405 (MethodNotAllowed).
//!
//! A delete removes the object at once whatever its `propagationPolicy`: with no garbage
//! collector, a deleted Deployment's dependents are for the lab's controllers to delete, by
//! their ownerReferences.
//!
//! Objects are persisted to a file (when given one) behind every change, so a restart keeps them,
//! as etcd would: a writer thread rewrites the file whenever something changed since its last
//! write, at most every [`PERSIST_SPACING`], so a burst of changes costs a write per quarter
//! second, not one per change, and
//! [`ApiServer::flush`] (run on SIGTERM) waits for the last one. History is not persisted: clients
//! that resume across a restart get 410 and list again, which is what real clients do after a
//! long disconnect. That holds after a crash too, which can cost the file its last quarter second
//! of changes: a restarted server counts its resourceVersions from a new epoch, above any an
//! earlier run handed out, so no client resumes past a change that was lost.
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

mod deployments;
mod endpoints;
mod protobuf;
mod table;

use table::TableRequest;

/// A kind the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Discovery categories (`kubectl get all`).
    pub categories: &'static [&'static str],
    /// Whether clients may write it (Endpoints are the stand-in's own).
    pub writable: bool,
}

impl Kind {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub const KINDS: [Kind; 8] = [
    Kind {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        categories: &[],
        writable: true,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
        writable: true,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
        writable: true,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
        writable: true,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        categories: &[],
        writable: true,
    },
    Kind {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short_names: &["deploy"],
        categories: &["all"],
        writable: true,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short_names: &["ep"],
        categories: &[],
        writable: false,
    },
    Kind {
        group: "networking.k8s.io",
        version: "v1",
        plural: "servicecidrs",
        singular: "servicecidr",
        kind: "ServiceCIDR",
        namespaced: false,
        short_names: &[],
        categories: &[],
        writable: true,
    },
];

// Indexes into [`KINDS`].
const NODE: usize = 0;
const NAMESPACE: usize = 1;
const SERVICE: usize = 2;
const POD: usize = 3;
const ENDPOINTSLICE: usize = 4;
const DEPLOYMENT: usize = 5;
const ENDPOINTS: usize = 6;
const SERVICECIDR: usize = 7;
/// The ServiceCIDR the real API server keeps for its `--service-cluster-ip-range`.
const DEFAULT_SERVICECIDR: &str = "kubernetes";

/// Tunables (the defaults suit the lab; tests shrink them to provoke bookmarks and 410s).
#[derive(Debug, Clone)]
pub struct Settings {
    /// How many change events are kept for watches that resume from a `resourceVersion`.
    pub history: usize,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Where objects are persisted (none: memory only).
    pub data_file: Option<PathBuf>,
    /// The Service CIDRs ClusterIPs are allocated from, one per family.
    pub service_cidrs: (ipnet::Ipv4Net, ipnet::Ipv6Net),
    /// The NodePort range (`--service-node-port-range`).
    pub node_ports: std::ops::RangeInclusive<u16>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            history: 10_000,
            bookmark_interval: Duration::from_secs(15),
            data_file: None,
            service_cidrs: (
                "10.96.0.0/16".parse().expect("valid"),
                "fd00:96::/108".parse().expect("valid"),
            ),
            node_ports: 30000..=32767,
        }
    }
}

/// The ClusterIPs in use, and where the next search starts, per family.
#[derive(Debug, Default)]
struct ClusterIps {
    used: std::collections::BTreeSet<std::net::IpAddr>,
}

impl ClusterIps {
    /// The lowest free address of `cidr` (past its network address and the first host, which
    /// the real API server keeps for the `kubernetes` Service).
    fn allocate(&mut self, cidr: ipnet::IpNet) -> Option<std::net::IpAddr> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let next = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => u32::from(v4).checked_add(1).map(|n| IpAddr::V4(Ipv4Addr::from(n))),
            IpAddr::V6(v6) => u128::from(v6).checked_add(1).map(|n| IpAddr::V6(Ipv6Addr::from(n))),
        };
        // Walk the taken addresses in order from the first candidate: the first gap is free.
        let mut free = cidr.hosts().nth(1)?;
        for taken in self.used.range(free..) {
            if *taken != free {
                break;
            }
            free = next(free)?;
        }
        let last = cidr.hosts().next_back()?;
        if free > last {
            return None;
        }
        self.used.insert(free);
        Some(free)
    }
}

type Key = (usize, String, String); // (kind index, namespace, name)

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: usize,
    event: &'static str,
    object: Value,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Change>,
    /// The oldest resourceVersion a watch can resume from.
    horizon: u64,
    uid_counter: u64,
    cluster_ips: ClusterIps,
    /// The NodePorts and health check NodePorts in use, by any Service.
    node_ports: std::collections::BTreeSet<u16>,
    /// The EndpointSlices of each Service (by their label), for its Endpoints.
    slices_by_service: BTreeMap<endpoints::ServiceKey, std::collections::BTreeSet<String>>,
}

impl Inner {
    /// The object stored under `key`.
    fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key).map(|o| &**o)
    }

    /// A copy of the object stored under `key`, to change and commit.
    fn copy(&self, key: &Key) -> Option<Value> {
        self.get(key).cloned()
    }

    /// No objects, at the first resourceVersion.
    fn empty() -> Self {
        Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            horizon: 1,
            uid_counter: 0,
            cluster_ips: ClusterIps::default(),
            node_ports: std::collections::BTreeSet::new(),
            slices_by_service: BTreeMap::new(),
        }
    }
}

#[derive(Clone)]
pub struct ApiServer {
    /// Every change commits whole under this lock, so the state is consistent between commits:
    /// a handler that panicked (a bug) leaves it usable, and the lock is taken over, never
    /// turning every later request into a panic.
    inner: Arc<Mutex<Inner>>,
    changes: broadcast::Sender<Change>,
    settings: Arc<Settings>,
    persister: Option<Arc<Persister>>,
}

/// The shortest time between two writes of the data file.
const PERSIST_SPACING: Duration = Duration::from_millis(250);

/// A run of the server counts resourceVersions within an epoch of 2^this; a restart starts the
/// next epoch (see [`ApiServer::new`]).
const RV_EPOCH_BITS: u32 = 32;

/// The data file's contents.
#[derive(serde::Serialize)]
struct SavedState<'a> {
    #[serde(rename = "resourceVersion")]
    rv: u64,
    #[serde(rename = "uidCounter")]
    uid_counter: u64,
    objects: Vec<&'a Value>,
}

/// The data file's writer: `dirty` says objects changed since the last snapshot was taken.
struct Persister {
    path: PathBuf,
    state: Mutex<PersistState>,
    changed: Condvar,
}

#[derive(Default)]
struct PersistState {
    dirty: bool,
    writing: bool,
}

/// Writes every object to the data file at `path` (a temporary file, then a rename).
fn save(path: &std::path::Path, inner: &Mutex<Inner>) -> std::io::Result<()> {
    let (rv, uid_counter, objects) = {
        let inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        // Shared, not copied: the lock is held for a moment, not for a deep copy of every
        // object (tens of ms with thousands), during which every request waited.
        let objects: Vec<Arc<Value>> = inner.objects.values().cloned().collect();
        (inner.rv, inner.uid_counter, objects)
    };
    let saved = SavedState {
        rv,
        uid_counter,
        objects: objects.iter().map(|o| &**o).collect(),
    };
    let tmp = path.with_extension("tmp");
    serde_json::to_vec(&saved)
        .map_err(std::io::Error::other)
        .and_then(|data| std::fs::write(&tmp, data))
        .and_then(|()| std::fs::rename(&tmp, path))
}

impl Persister {
    fn mark_dirty(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
        self.changed.notify_all();
    }

    /// The writer thread: snapshots under the lock, writes outside it, until the server is gone.
    fn run(self: Arc<Self>, inner: Weak<Mutex<Inner>>) {
        loop {
            // Writes are spaced: each one serializes every object (tens of MB with thousands of
            // Services), and back to back under a stream of changes they took a core of the
            // two the lab shares with what it runs.
            std::thread::sleep(PERSIST_SPACING);
            {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                while !state.dirty {
                    let (next, _) = self
                        .changed
                        .wait_timeout(state, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner());
                    state = next;
                    if !state.dirty && inner.strong_count() == 0 {
                        return;
                    }
                }
                state.dirty = false;
                state.writing = true;
            }
            if let Some(inner) = inner.upgrade()
                && let Err(e) = save(&self.path, &inner)
            {
                eprintln!("apiserver: could not persist to {}: {e}", self.path.display());
            }
            self.state.lock().unwrap_or_else(|e| e.into_inner()).writing = false;
            self.changed.notify_all();
        }
    }

    /// Waits (up to `timeout`) until every change made so far is in the file.
    fn flush(&self, timeout: Duration) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.dirty || s.writing)
            .unwrap_or_else(|e| e.into_inner());
        !state.dirty && !state.writing
    }
}

impl ApiServer {
    /// A server with the `default` and `kube-system` namespaces, or what `data_file` holds.
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        let (changes, _) = broadcast::channel(4096);
        let mut inner = Inner::empty();
        let restored = settings.data_file.as_ref().filter(|p| p.exists());
        match restored {
            Some(path) => {
                let saved: Value = serde_json::from_slice(&std::fs::read(path)?)?;
                // The file can lag the last changes by up to PERSIST_SPACING and a write: a
                // crash loses them, and the versions they had would be handed out again to other
                // changes. So a restarted server counts from a new epoch, above every version an
                // earlier run can have handed out; every watch from before the restart is then
                // older than the horizon and gets 410, and relists, instead of resuming past
                // changes that were lost or renumbered.
                let saved_rv = saved["resourceVersion"].as_u64().unwrap_or(1);
                inner.rv = ((saved_rv >> RV_EPOCH_BITS) + 1) << RV_EPOCH_BITS;
                inner.uid_counter = saved["uidCounter"].as_u64().unwrap_or(0);
                for object in saved["objects"].as_array().into_iter().flatten() {
                    let Some(kind) = KINDS.iter().position(|k| k.kind == object["kind"]) else {
                        continue;
                    };
                    let ns = object["metadata"]["namespace"].as_str().unwrap_or("").to_string();
                    let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
                    inner.objects.insert((kind, ns, name), Arc::new(object.clone()));
                }
                // Watches from before the restart cannot resume: history starts now.
                inner.horizon = inner.rv;
                let slices: Vec<Value> = inner
                    .objects
                    .iter()
                    .filter(|((kind, _, _), _)| *kind == ENDPOINTSLICE)
                    .map(|(_, slice)| Value::clone(slice))
                    .collect();
                for slice in &slices {
                    Self::index_slice(&mut inner, None, Some(slice));
                }
                for object in inner.objects.values() {
                    if object["kind"] == "Service" {
                        for ip in cluster_ips_of(object) {
                            inner.cluster_ips.used.insert(ip);
                        }
                        inner.node_ports.extend(node_ports_of(object));
                    }
                }
            }
            None => {
                for ns in ["default", "kube-system"] {
                    inner.uid_counter += 1;
                    let object = json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": ns, "uid": uid(inner.uid_counter), "resourceVersion": "1", "creationTimestamp": rfc3339_now()},
                        "status": {"phase": "Active"}});
                    inner
                        .objects
                        .insert((1, String::new(), ns.to_string()), Arc::new(object));
                }
            }
        }
        // As the real API server does, one ServiceCIDR holds the ranges ClusterIPs come from.
        let default_cidr = (SERVICECIDR, String::new(), DEFAULT_SERVICECIDR.to_string());
        if !inner.objects.contains_key(&default_cidr) {
            inner.uid_counter += 1;
            let object = json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                "metadata": {"name": DEFAULT_SERVICECIDR, "uid": uid(inner.uid_counter),
                    "resourceVersion": inner.rv.to_string(), "creationTimestamp": rfc3339_now()},
                "spec": {"cidrs": [settings.service_cidrs.0.to_string(), settings.service_cidrs.1.to_string()]},
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "",
                    "message": "Kubernetes Service CIDR is ready", "lastTransitionTime": rfc3339_now()}]}});
            inner.objects.insert(default_cidr, Arc::new(object));
        }
        let inner = Arc::new(Mutex::new(inner));
        // The new epoch is on disk before anything is served: a run that crashed before its
        // first write would otherwise leave the old epoch for the next run to hand out again.
        if let Some(path) = restored {
            save(path, &inner)?;
        }
        let persister = settings.data_file.clone().map(|path| {
            let persister = Arc::new(Persister {
                path,
                state: Mutex::default(),
                changed: Condvar::new(),
            });
            let writer = persister.clone();
            let weak = Arc::downgrade(&inner);
            std::thread::spawn(move || writer.run(weak));
            persister
        });
        let server = Self {
            inner,
            changes,
            settings: Arc::new(settings),
            persister,
        };
        server.resync_endpoints();
        Ok(server)
    }

    /// Brings every Service's Endpoints in line (a data file may come from before they were
    /// kept, or have Endpoints without a Service).
    fn resync_endpoints(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let services: std::collections::BTreeSet<endpoints::ServiceKey> = inner
            .objects
            .keys()
            .filter(|(kind, _, _)| *kind == SERVICE || *kind == ENDPOINTS)
            .map(|(_, ns, name)| (ns.clone(), name.clone()))
            .collect();
        for service in &services {
            self.sync_endpoints(&mut inner, service);
        }
    }

    /// Waits until every change so far is in the data file (true), or 10 s have passed (false).
    pub fn flush(&self) -> bool {
        self.persister.as_ref().is_none_or(|p| p.flush(Duration::from_secs(10)))
    }

    /// The axum app serving the API.
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// Serves on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    fn persist(&self) {
        if let Some(persister) = &self.persister {
            persister.mark_dirty();
        }
    }

    /// Records a change: bumps the resourceVersion, keeps history, wakes watchers; then brings
    /// the Endpoints of a changed Service, or of a changed slice's Service, in line.
    fn commit(&self, inner: &mut Inner, kind: usize, event: &'static str, mut object: Value) -> Value {
        let touched = Self::services_touched(inner, kind, &object);
        inner.rv += 1;
        object["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let key = key_of(kind, &object);
        let old = if event == "DELETED" {
            inner.objects.remove(&key)
        } else {
            inner.objects.insert(key, Arc::new(object.clone()))
        };
        if kind == ENDPOINTSLICE {
            let new = (event != "DELETED").then_some(&object);
            Self::index_slice(inner, old.as_deref(), new);
        }
        let change = Change {
            rv: inner.rv,
            kind,
            event,
            object: object.clone(),
        };
        inner.history.push_back(change.clone());
        while inner.history.len() > self.settings.history {
            let dropped = inner.history.pop_front().expect("non-empty");
            inner.horizon = dropped.rv;
        }
        self.persist();
        let _ = self.changes.send(change);
        for service in &touched {
            self.sync_endpoints(inner, service);
        }
        object
    }
}

/// The addresses in a Service's `clusterIPs`.
fn cluster_ips_of(object: &Value) -> Vec<std::net::IpAddr> {
    object["spec"]["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.as_str()?.parse().ok())
        .collect()
}

/// What the real API server does to a new Service: its ClusterIPs are allocated (both families
/// for dual stack), or the requested ones checked and taken; `ipFamilies` follow.
fn allocate_cluster_ips(inner: &mut Inner, settings: &Settings, object: &mut Value) -> Result<(), Box<Response>> {
    let spec = &mut object["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    if spec["type"] == "ExternalName" {
        return Ok(());
    }
    let requested: Vec<String> = match spec["clusterIPs"].as_array() {
        Some(list) if !list.is_empty() => list.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => spec["clusterIP"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .into_iter()
            .collect(),
    };
    if requested.first().is_some_and(|ip| ip == "None") {
        spec["clusterIP"] = json!("None");
        spec["clusterIPs"] = json!(["None"]);
        return Ok(());
    }
    let policy = spec["ipFamilyPolicy"].as_str().unwrap_or("SingleStack").to_string();
    let mut families: Vec<String> = spec["ipFamilies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    if families.is_empty() {
        families = requested
            .iter()
            .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" }.to_string())
            .collect();
    }
    if families.is_empty() {
        families.push("IPv4".into());
    }
    if policy != "SingleStack" && families.len() == 1 {
        families.push(if families[0] == "IPv4" { "IPv6" } else { "IPv4" }.into());
    }
    let invalid = |message: String| Box::new(status_error(422, "Invalid", message));
    let mut ips = Vec::new();
    for (i, family) in families.iter().enumerate() {
        let cidr: ipnet::IpNet = if family == "IPv4" {
            settings.service_cidrs.0.into()
        } else {
            settings.service_cidrs.1.into()
        };
        match requested.get(i) {
            Some(raw) => {
                let ip: std::net::IpAddr = raw.parse().map_err(|_| {
                    invalid(format!(
                        "spec.clusterIPs[{i}]: Invalid value: {raw:?}: must be a valid IP address"
                    ))
                })?;
                if !cidr.contains(&ip) {
                    return Err(invalid(format!(
                        "spec.clusterIPs[{i}]: Invalid value: {raw:?}: the provided IP is not in the valid range. The range of valid IPs is {cidr}"
                    )));
                }
                if inner.cluster_ips.used.contains(&ip) {
                    return Err(invalid(format!(
                        "spec.clusterIPs[{i}]: Invalid value: {raw:?}: provided IP is already allocated"
                    )));
                }
                ips.push(ip);
            }
            None => {
                let ip = inner
                    .cluster_ips
                    .allocate(cidr)
                    .ok_or_else(|| invalid(format!("no free ClusterIP left in {cidr}")))?;
                inner.cluster_ips.used.remove(&ip);
                ips.push(ip);
            }
        }
    }
    for ip in &ips {
        inner.cluster_ips.used.insert(*ip);
    }
    let texts: Vec<String> = ips.iter().map(ToString::to_string).collect();
    spec["clusterIP"] = json!(texts[0]);
    spec["clusterIPs"] = json!(texts);
    spec["ipFamilies"] = json!(families);
    spec["ipFamilyPolicy"] = json!(policy);
    if spec["type"].is_null() {
        spec["type"] = json!("ClusterIP");
    }
    Ok(())
}

/// Every NodePort a stored Service holds: its ports' and its health check's.
fn node_ports_of(object: &Value) -> std::collections::BTreeSet<u16> {
    let spec = &object["spec"];
    spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| &p["nodePort"])
        .chain([&spec["healthCheckNodePort"]])
        .filter_map(|v| u16::try_from(v.as_u64()?).ok())
        .filter(|p| *p != 0)
        .collect()
}

/// What the real API server does with a Service's NodePorts, on create (`old` none) and update:
/// a NodePort or LoadBalancer Service (unless `allocateLoadBalancerNodePorts: false`) gets one per
/// port, a requested one honoured when it is in the range and free, an update that leaves one out
/// keeping the port's earlier one; a LoadBalancer Service with `externalTrafficPolicy: Local`
/// gets a `healthCheckNodePort` the same way. A ClusterIP Service may have none. On success the
/// Service's old ports are released and its new ones taken.
fn settle_node_ports(
    inner: &mut Inner,
    settings: &Settings,
    old: Option<&Value>,
    object: &mut Value,
) -> Result<(), Box<Response>> {
    let invalid = |message: String| Box::new(status_error(422, "Invalid", message));
    let spec = &mut object["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    let load_balancer = kind == "LoadBalancer";
    let allocates = kind == "NodePort" || (load_balancer && spec["allocateLoadBalancerNodePorts"] != json!(false));
    let held: std::collections::BTreeSet<u16> = old.map(node_ports_of).unwrap_or_default();
    // Taken by other Services.
    let others: std::collections::BTreeSet<u16> = inner.node_ports.difference(&held).copied().collect();
    let range = settings.node_ports.clone();
    let mut taken: std::collections::BTreeSet<u16> = std::collections::BTreeSet::new();
    let check = |field: String, port: i64, taken: &mut std::collections::BTreeSet<u16>, shared: bool| {
        let number = u16::try_from(port).ok().filter(|p| range.contains(p)).ok_or_else(|| {
            invalid(format!(
                "{field}: Invalid value: {port}: provided port is not in the valid range. The range of valid ports is {}-{}",
                range.start(),
                range.end()
            ))
        })?;
        if others.contains(&number) || (!shared && taken.contains(&number)) {
            return Err(invalid(format!(
                "{field}: Invalid value: {port}: provided port is already allocated"
            )));
        }
        taken.insert(number);
        Ok(number)
    };
    let earlier = |port: &Value| -> Option<i64> {
        old?["spec"]["ports"]
            .as_array()?
            .iter()
            .find(|o| o["port"] == port["port"] && o["protocol"] == port["protocol"])?["nodePort"]
            .as_i64()
            .filter(|p| *p != 0)
    };
    let mut wanted: Vec<Option<i64>> = Vec::new();
    for (i, port) in spec["ports"].as_array().into_iter().flatten().enumerate() {
        let mut given = port["nodePort"].as_i64().filter(|p| *p != 0);
        // A Service turned into a ClusterIP one loses the NodePorts it had.
        if given.is_some() && given == earlier(port) && !(kind == "NodePort" || load_balancer) {
            given = None;
        }
        if given.is_some() && !(kind == "NodePort" || load_balancer) {
            return Err(invalid(format!(
                "spec.ports[{i}].nodePort: Forbidden: may not be used when `type` is '{kind}'"
            )));
        }
        wanted.push(given.or_else(|| allocates.then(|| earlier(port)).flatten()));
    }
    // Requested ports first, so that an allocated one never takes a port asked for later. One
    // port number may serve two protocols of one Service (as for DNS on TCP and UDP).
    let mut numbers: Vec<Option<u16>> = Vec::new();
    let mut by_protocol: std::collections::BTreeSet<(u16, String)> = std::collections::BTreeSet::new();
    for (i, port) in spec["ports"].as_array().into_iter().flatten().enumerate() {
        let Some(requested) = wanted[i] else {
            numbers.push(None);
            continue;
        };
        let protocol = port["protocol"].as_str().unwrap_or("TCP").to_string();
        let shared =
            u16::try_from(requested).is_ok_and(|n| taken.contains(&n) && !by_protocol.contains(&(n, protocol.clone())));
        let n = check(format!("spec.ports[{i}].nodePort"), requested, &mut taken, shared)?;
        by_protocol.insert((n, protocol));
        numbers.push(Some(n));
    }
    let mut free = range.clone().filter(|p| !others.contains(p));
    let mut next_free = |taken: &mut std::collections::BTreeSet<u16>| -> Result<u16, Box<Response>> {
        let n = free
            .find(|p| !taken.contains(p))
            .ok_or_else(|| invalid(format!("no free NodePort left in {}-{}", range.start(), range.end())))?;
        taken.insert(n);
        Ok(n)
    };
    if let Some(ports) = spec["ports"].as_array_mut() {
        for (i, port) in ports.iter_mut().enumerate() {
            // A port that is not an object (hostile input) gets nothing, and is no panic.
            let Some(map) = port.as_object_mut() else { continue };
            match numbers[i] {
                Some(n) => {
                    map.insert("nodePort".into(), json!(n));
                }
                None if allocates => {
                    map.insert("nodePort".into(), json!(next_free(&mut taken)?));
                }
                None => {
                    map.remove("nodePort");
                }
            }
        }
    }
    let local = spec["externalTrafficPolicy"] == "Local";
    let health = spec["healthCheckNodePort"]
        .as_i64()
        .filter(|p| *p != 0)
        // Left over from before a change of type or policy: dropped, as the API server does.
        .filter(|p| load_balancer && local || Some(*p) != old.and_then(|o| o["spec"]["healthCheckNodePort"].as_i64()));
    if load_balancer && local {
        let requested = health.or_else(|| old?["spec"]["healthCheckNodePort"].as_i64().filter(|p| *p != 0));
        let n = match requested {
            Some(port) => check("spec.healthCheckNodePort".into(), port, &mut taken, false)?,
            None => next_free(&mut taken)?,
        };
        spec["healthCheckNodePort"] = json!(n);
    } else if health.is_some() {
        return Err(invalid(
            "spec.healthCheckNodePort: Invalid value: may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"
                .into(),
        ));
    } else if let Some(map) = spec.as_object_mut() {
        map.remove("healthCheckNodePort");
    }
    inner.node_ports = others;
    inner.node_ports.extend(taken);
    Ok(())
}

fn key_of(kind: usize, object: &Value) -> Key {
    let ns = object["metadata"]["namespace"].as_str().unwrap_or("").to_string();
    let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
    (kind, ns, name)
}

fn uid(n: u64) -> String {
    format!("00000000-0000-4000-8000-{:012x}", n)
}

/// Seconds since the epoch.
fn now_seconds() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64
}

fn rfc3339_now() -> String {
    rfc3339(now_seconds())
}

/// RFC 3339 in UTC, whole seconds, as Kubernetes writes times.
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds since the epoch of an RFC 3339 time (`2024-05-01T10:00:00Z`, with or without
/// fractional seconds, `Z` or an offset).
fn parse_rfc3339(text: &str) -> Option<i64> {
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = text.get(range)?;
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (y, m, d) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hh, mm, ss) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if text.get(4..5)? != "-" || text.get(7..8)? != "-" || !matches!(text.get(10..11)?, "T" | "t" | " ") {
        return None;
    }
    let mut rest = text.get(19..)?;
    if let Some(fraction) = rest.strip_prefix('.') {
        rest = fraction.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.get(0..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            let (oh, om) = rest.get(1..)?.split_once(':')?;
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    // Howard Hinnant's days-from-civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss - offset)
}

fn status_error(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(code: StatusCode, value: Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

/// A parsed resource path.
struct Target {
    kind: usize,
    namespace: Option<String>,
    name: Option<String>,
    /// The `status` subresource.
    status: bool,
    /// The `scale` subresource (Deployments).
    scale: bool,
}

impl Target {
    /// The store key of the object the path names.
    fn key(&self) -> Key {
        (
            self.kind,
            self.namespace.clone().unwrap_or_default(),
            self.name.clone().unwrap_or_default(),
        )
    }
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", version, rest),
        ["apis", group, version, rest @ ..] => (group, version, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        KINDS
            .iter()
            .position(|k| k.group == group && k.version == version && k.plural == plural)
    };
    let (kind, namespace, tail) = match rest {
        // namespaces/{ns}/{plural}[/{name}[/status|/scale]]
        ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|k| KINDS[k].namespaced) => {
            (find(plural)?, Some(ns.to_string()), tail)
        }
        // {plural}[/{name}[/status]] for cluster-wide kinds; {plural} alone lists all namespaces.
        [plural, tail @ ..] => {
            let kind = find(plural)?;
            if KINDS[kind].namespaced && !tail.is_empty() {
                return None;
            }
            (kind, None, tail)
        }
        _ => return None,
    };
    let target = |name: Option<&str>, status: bool, scale: bool| Target {
        kind,
        namespace: namespace.clone(),
        name: name.map(str::to_string),
        status,
        scale,
    };
    match tail {
        [] => Some(target(None, false, false)),
        [name] => Some(target(Some(name), false, false)),
        [name, "status"] if KINDS[kind].writable => Some(target(Some(name), true, false)),
        [name, "scale"] if kind == DEPLOYMENT => Some(target(Some(name), false, true)),
        _ => None,
    }
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding of a query component. Works on bytes throughout: a `%` may be followed by
/// anything, including the middle of a multi-byte character, and must never be sliced as a `str`.
fn decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        char::from(b).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`.
#[derive(Debug, Clone, Default)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        // Split on commas outside parentheses.
        let mut depth = 0;
        let mut start = 0;
        let mut parts = Vec::new();
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or(format!("bad set in {part:?}"))?;
                Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
            };
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = part.split_once(" in ") {
                Requirement::In(k.trim().into(), set(rest)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::Absent(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: &Map<String, Value>) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::Ne(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::Absent(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|v| !vs.iter().any(|x| x == v)),
        })
    }
}

/// What a list or watch wants to see.
struct Filter {
    kind: usize,
    namespace: Option<String>,
    labels: Selector,
    fields: Vec<(String, bool, String)>, // (field, equal?, value)
}

impl Filter {
    fn new(target: &Target, q: &BTreeMap<String, String>) -> Result<Self, String> {
        let labels = Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
        let mut fields = Vec::new();
        for part in q
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .filter(|p| !p.trim().is_empty())
        {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("bad field selector {part:?}"));
            };
            if !matches!(field.trim(), "metadata.name" | "metadata.namespace") {
                return Err(format!("field label not supported: {}", field.trim()));
            }
            fields.push((field.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(Self {
            kind: target.kind,
            namespace: target.namespace.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, kind: usize, object: &Value) -> bool {
        let meta = &object["metadata"];
        let ns = meta["namespace"].as_str().unwrap_or("");
        kind == self.kind
            && self.namespace.as_deref().is_none_or(|want| want == ns)
            && self.labels.matches(meta["labels"].as_object().unwrap_or(&Map::new()))
            && self.fields.iter().all(|(field, eq, value)| {
                let actual = if field == "metadata.name" {
                    meta["name"].as_str().unwrap_or("")
                } else {
                    ns
                };
                (actual == value) == *eq
            })
    }
}

async fn handle(
    State(server): State<ApiServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    match (method.clone(), path.as_str()) {
        (Method::GET, "/version") => {
            return json_response(
                StatusCode::OK,
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0+ferrynet-standin", "platform": "linux/amd64",
                    "goVersion": "none", "compiler": "none", "buildDate": "", "gitCommit": "", "gitTreeState": ""}),
            );
        }
        (Method::GET, "/api") => {
            return json_response(
                StatusCode::OK,
                json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("")}]}),
            );
        }
        (Method::GET, "/apis") => {
            let groups: Vec<Value> = group_names().into_iter().map(group_json).collect();
            return json_response(
                StatusCode::OK,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            );
        }
        (Method::GET, p) if p.starts_with("/apis/") && p.trim_matches('/').split('/').count() == 2 => {
            let group = p.trim_matches('/').split('/').nth(1).unwrap_or("");
            return match group_names().into_iter().find(|g| *g == group) {
                Some(g) => json_response(StatusCode::OK, group_json(g)),
                None => status_error(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource {p}"),
                ),
            };
        }
        (Method::GET, "/openapi/v3") => return json_response(StatusCode::OK, openapi_root()),
        (Method::GET, p) if p.starts_with("/openapi/v3/") => {
            let gv = p.trim_start_matches("/openapi/v3/");
            return match resource_list_path(&format!("/{gv}")) {
                Some((group, version)) => json_response(StatusCode::OK, openapi_group_version(group, version)),
                None => status_error(404, "NotFound", format!("no OpenAPI document for {gv}")),
            };
        }
        (Method::GET, p) if resource_list_path(p).is_some() => {
            let (group, version) = resource_list_path(p).expect("checked");
            return json_response(StatusCode::OK, resource_list(group, version));
        }
        _ => {}
    }
    let Some(target) = parse_path(&path) else {
        return status_error(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({method} {path})"),
        );
    };
    let q = query(&uri);
    let dry_run = match q.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return status_error(
                400,
                "BadRequest",
                format!("dryRun: Unsupported value: {other:?}: supported values: \"All\""),
            );
        }
    };
    if method != Method::GET && !KINDS[target.kind].writable {
        return status_error(
            405,
            "MethodNotAllowed",
            format!(
                "{} are kept by the API stand-in from EndpointSlices and Services: clients may only read them ({method} refused)",
                KINDS[target.kind].plural
            ),
        );
    }
    if target.scale {
        return deployments::scale(&server, &target, &method, &headers, &body, dry_run);
    }
    let table = match table::requested(&headers, q.get("includeObject").map(String::as_str)) {
        Ok(table) => table,
        Err(e) => return status_error(400, "BadRequest", e),
    };
    match method {
        Method::GET
            if target.name.is_none() && matches!(q.get("watch").map(String::as_str), Some("true") | Some("1")) =>
        {
            watch(server, target, q, table).await
        }
        Method::GET if target.name.is_none() => list(&server, &target, &q, table),
        Method::GET => get(&server, &target, table),
        Method::POST if target.name.is_none() => match body_object(&headers, &body) {
            Ok(object) => create(&server, &target, object, dry_run),
            Err(refused) => *refused,
        },
        Method::PUT if target.name.is_some() => match body_object(&headers, &body) {
            Ok(object) => replace(&server, &target, object, dry_run),
            Err(refused) => *refused,
        },
        Method::PATCH if target.name.is_some() => patch(&server, &target, &headers, &body, dry_run),
        Method::DELETE if target.name.is_some() => delete(&server, &target, &q, &body, dry_run),
        _ => status_error(405, "MethodNotAllowed", format!("{method} is not supported on {path}")),
    }
}

/// A create's or replace's body as a JSON object: JSON as it is; Kubernetes protobuf (what
/// client-go's typed clients send, as kubectl's `create deployment`) decoded for the kinds
/// [`protobuf`] knows, refused with 415 for the others; any other content type refused (415).
fn body_object(headers: &HeaderMap, body: &[u8]) -> Result<Value, Box<Response>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if protobuf::is_protobuf(content_type) {
        return protobuf::decode_object(body).map_err(|e| {
            Box::new(match e {
                protobuf::ProtoError::Malformed(m) => status_error(400, "BadRequest", m),
                protobuf::ProtoError::Unsupported(m) => status_error(415, "UnsupportedMediaType", m),
            })
        });
    }
    if !content_type.starts_with("application/json") {
        return Err(Box::new(status_error(
            415,
            "UnsupportedMediaType",
            format!("the API stand-in takes JSON (or Kubernetes protobuf for some kinds), not {content_type:?}"),
        )));
    }
    match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(Box::new(status_error(
            400,
            "BadRequest",
            "the body is not a JSON object".into(),
        ))),
    }
}

fn group_names() -> Vec<&'static str> {
    let mut groups: Vec<&str> = Vec::new();
    for group in KINDS.iter().map(|k| k.group).filter(|g| !g.is_empty()) {
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    groups
}

fn group_json(group: &str) -> Value {
    let version = KINDS.iter().find(|k| k.group == group).map_or("v1", |k| k.version);
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

fn resource_list_path(path: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", version] => Some(("", *version)),
        ["apis", group, version] => Some((*group, *version)),
        _ => None,
    }
    .filter(|(g, v)| KINDS.iter().any(|k| k.group == *g && k.version == *v))
}

/// A group-version's resources, with their `status` subresources and Deployments' `scale`
/// (an `autoscaling/v1` Scale, which the scale client finds here); read-only kinds have the
/// read verbs only.
fn resource_list(group: &str, version: &str) -> Value {
    let mut kinds: Vec<&Kind> = KINDS
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    // In name order, as the real server lists them (kubectl expands `all` in this order).
    kinds.sort_by_key(|k| k.plural);
    let mut resources = Vec::new();
    for k in kinds {
        let verbs: &[&str] = if k.writable {
            &["create", "delete", "get", "list", "patch", "update", "watch"]
        } else {
            &["get", "list", "watch"]
        };
        let mut resource = json!({"name": k.plural, "singularName": k.singular, "namespaced": k.namespaced,
            "kind": k.kind, "verbs": verbs, "shortNames": k.short_names});
        if !k.categories.is_empty() {
            resource["categories"] = json!(k.categories);
        }
        resources.push(resource);
        if k.writable {
            resources.push(
                json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced,
                "kind": k.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
        if k.kind == "Deployment" {
            resources.push(json!({"name": format!("{}/scale", k.plural), "singularName": "",
                "namespaced": true, "group": "autoscaling", "version": "v1", "kind": "Scale",
                "verbs": ["get", "patch", "update"]}));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// The OpenAPI v3 index. Only what clients need to learn that the server validates fields itself
/// (kubectl's `--validate=strict` asks), not schemas: the stand-in does not validate schemas.
fn openapi_root() -> Value {
    let mut paths = Map::new();
    let mut gvs: Vec<(&str, &str)> = KINDS.iter().map(|k| (k.group, k.version)).collect();
    gvs.sort_unstable();
    gvs.dedup();
    for (group, version) in gvs {
        let gv = if group.is_empty() {
            format!("api/{version}")
        } else {
            format!("apis/{group}/{version}")
        };
        paths.insert(gv.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{gv}")}));
    }
    json!({"paths": paths})
}

/// One group-version's OpenAPI v3 document: each kind's object path with a PATCH operation that
/// takes `fieldValidation`, tagged with the kind.
fn openapi_group_version(group: &str, version: &str) -> Value {
    let mut paths = Map::new();
    for k in KINDS.iter().filter(|k| k.group == group && k.version == version) {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if k.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", k.plural)
        } else {
            format!("{prefix}/{}/{{name}}", k.plural)
        };
        let gvk = json!({"group": group, "version": version, "kind": k.kind});
        let param = json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string"}});
        let op = |action: &str| json!({"parameters": [param.clone()], "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk.clone(), "responses": {}});
        paths.insert(path, json!({"patch": op("patch"), "put": op("put")}));
    }
    json!({"openapi": "3.0.0", "info": {"title": "ferrynet API stand-in", "version": version}, "paths": paths})
}

/// A kind's resource as errors name it: `services`, `deployments.apps`.
fn group_resource(kind: usize) -> String {
    let k = &KINDS[kind];
    if k.group.is_empty() {
        k.plural.to_string()
    } else {
        format!("{}.{}", k.plural, k.group)
    }
}

fn not_found(target: &Target) -> Response {
    status_error(
        404,
        "NotFound",
        format!(
            "{} \"{}\" not found",
            group_resource(target.kind),
            target.name.clone().unwrap_or_default()
        ),
    )
}

fn list(server: &ApiServer, target: &Target, q: &BTreeMap<String, String>, table: Option<TableRequest>) -> Response {
    let filter = match Filter::new(target, q) {
        Ok(f) => f,
        Err(e) => return status_error(400, "BadRequest", e),
    };
    // The objects are shared out under the lock and serialized after it: a list of thousands
    // does not hold up every other request while it is written out.
    let (objects, rv) = {
        let inner = server.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let objects: Vec<Arc<Value>> = inner
            .objects
            .iter()
            .filter(|((k, _, _), o)| filter.matches(*k, o))
            .map(|(_, o)| o.clone())
            .collect();
        (objects, inner.rv.to_string())
    };
    let items: Vec<&Value> = objects.iter().map(|o| &**o).collect();
    if let Some(request) = table {
        return json_response(StatusCode::OK, table::table(target.kind, &items, &rv, request, true));
    }
    let k = &KINDS[target.kind];
    let body = ListBody {
        kind: format!("{}List", k.kind),
        api_version: k.api_version(),
        metadata: json!({"resourceVersion": rv}),
        items,
    };
    match serde_json::to_string(&body) {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => status_error(500, "InternalError", e.to_string()),
    }
}

/// A list's body, serialized from the stored objects as they are (no copy of each first).
#[derive(serde::Serialize)]
struct ListBody<'a> {
    kind: String,
    #[serde(rename = "apiVersion")]
    api_version: String,
    metadata: Value,
    items: Vec<&'a Value>,
}

fn get(server: &ApiServer, target: &Target, table: Option<TableRequest>) -> Response {
    let inner = server.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match (inner.get(&target.key()), table) {
        (Some(o), Some(request)) => {
            let rv = o["metadata"]["resourceVersion"].as_str().unwrap_or("");
            json_response(StatusCode::OK, table::table(target.kind, &[o], rv, request, true))
        }
        (Some(o), None) => json_response(StatusCode::OK, o.clone()),
        (None, _) => not_found(target),
    }
}

fn create(server: &ApiServer, target: &Target, mut object: Value, dry_run: bool) -> Response {
    let k = &KINDS[target.kind];
    if object.get("kind").is_some_and(|v| v != k.kind) {
        return status_error(
            400,
            "BadRequest",
            format!("kind {} does not match {}", object["kind"], k.plural),
        );
    }
    let mut inner = server.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    let generate = if object["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        match object["metadata"]["generateName"].as_str() {
            Some(prefix) => Some(prefix.to_string()),
            None => return status_error(422, "Invalid", "metadata.name: Required value".into()),
        }
    } else {
        None
    };
    if k.namespaced {
        let ns = target.namespace.clone().unwrap_or_else(|| "default".into());
        if object["metadata"]["namespace"].as_str().is_some_and(|n| n != ns) {
            return status_error(
                400,
                "BadRequest",
                "the namespace of the object does not match the request".into(),
            );
        }
        object["metadata"]["namespace"] = json!(ns);
    }
    if let Some(prefix) = generate {
        // From the uid counter, which the data file keeps (the resourceVersion's low bits start
        // over at each restart's epoch), moved on past any name an object already has.
        for n in 1..=0xfffff {
            object["metadata"]["name"] = json!(format!("{prefix}{:05x}", (inner.uid_counter + n) % 0xfffff));
            if !inner.objects.contains_key(&key_of(target.kind, &object)) {
                break;
            }
        }
    }
    if inner.objects.contains_key(&key_of(target.kind, &object)) {
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_string();
        return status_error(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", group_resource(target.kind)),
        );
    }
    if target.kind == DEPLOYMENT
        && let Err(refused) = deployments::prepare_new(&mut object)
    {
        return *refused;
    }
    // The API server starts every pod Pending (the stand-in keeps a status a creator gives: the
    // lab creates its pods running).
    if target.kind == POD && object["status"]["phase"].as_str().is_none_or(str::is_empty) {
        if !object["status"].is_object() {
            object["status"] = json!({});
        }
        object["status"]["phase"] = json!("Pending");
    }
    object["apiVersion"] = json!(k.api_version());
    object["kind"] = json!(k.kind);
    object["metadata"]["generation"] = json!(1);
    // A dry run allocates nothing and stores nothing: the object as it would be created, less
    // what only storing gives it.
    if dry_run {
        return json_response(StatusCode::CREATED, object);
    }
    if target.kind == SERVICE {
        if let Err(refused) = allocate_cluster_ips(&mut inner, &server.settings, &mut object) {
            return *refused;
        }
        if let Err(refused) = settle_node_ports(&mut inner, &server.settings, None, &mut object) {
            // The ClusterIPs were taken first: a refused NodePort gives them back.
            for ip in cluster_ips_of(&object) {
                inner.cluster_ips.used.remove(&ip);
            }
            return *refused;
        }
    }
    inner.uid_counter += 1;
    object["metadata"]["uid"] = json!(uid(inner.uid_counter));
    object["metadata"]["creationTimestamp"] = json!(rfc3339_now());
    let created = server.commit(&mut inner, target.kind, "ADDED", object);
    json_response(StatusCode::CREATED, created)
}

fn replace(server: &ApiServer, target: &Target, new: Value, dry_run: bool) -> Response {
    let mut inner = server.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(current) = inner.copy(&target.key()) else {
        return not_found(target);
    };
    if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
        && Some(rv) != current["metadata"]["resourceVersion"].as_str()
    {
        return conflict(target);
    }
    let mut updated = current.clone();
    if target.status {
        updated["status"] = new["status"].clone();
    } else {
        // The main resource does not change status (it has a subresource for that).
        updated = new;
        updated["apiVersion"] = current["apiVersion"].clone();
        updated["kind"] = current["kind"].clone();
        if !updated["metadata"].is_object() {
            updated["metadata"] = json!({});
        }
        keep_identity(&mut updated, &current);
        match current.get("status") {
            Some(s) => updated["status"] = s.clone(),
            None => {
                if let Some(map) = updated.as_object_mut() {
                    map.remove("status");
                }
            }
        }
        // A Service's ClusterIPs are immutable: kept when the update leaves them out.
        if target.kind == SERVICE {
            if !updated["spec"].is_object() {
                updated["spec"] = json!({});
            }
            for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                let given = &updated["spec"][field];
                if given.is_null() || given == &json!("") {
                    updated["spec"][field] = current["spec"][field].clone();
                } else if *given != current["spec"][field] && field.starts_with("cluster") {
                    return status_error(
                        422,
                        "Invalid",
                        format!("spec.{field}: Invalid value: field is immutable"),
                    );
                }
            }
        }
    }
    update(server, &mut inner, target, current, updated, dry_run)
}

/// What an update (replace or patch) may not change: identity and deletion state.
fn keep_identity(updated: &mut Value, current: &Value) {
    for field in [
        "uid",
        "creationTimestamp",
        "namespace",
        "name",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match current["metadata"].get(field) {
            Some(value) => updated["metadata"][field] = value.clone(),
            None => {
                if let Some(meta) = updated["metadata"].as_object_mut() {
                    meta.remove(field);
                }
            }
        }
    }
}

/// The end of every update of the main resource or its status: a kind's own checks, NodePorts
/// settled, `generation` bumped when the spec changed, then stored (unless a dry run).
fn update(
    server: &ApiServer,
    inner: &mut Inner,
    target: &Target,
    current: Value,
    mut updated: Value,
    dry_run: bool,
) -> Response {
    if !target.status {
        if target.kind == DEPLOYMENT
            && let Err(refused) = deployments::prepare_update(&mut updated)
        {
            return *refused;
        }
        if target.kind == SERVICE
            && !dry_run
            && let Err(refused) = settle_node_ports(inner, &server.settings, Some(&current), &mut updated)
        {
            return *refused;
        }
    }
    let generation = current["metadata"]["generation"].as_u64().unwrap_or(1);
    updated["metadata"]["generation"] = json!(if updated.get("spec") != current.get("spec") {
        generation + 1
    } else {
        generation
    });
    if dry_run {
        return json_response(StatusCode::OK, updated);
    }
    let stored = server.commit(inner, target.kind, "MODIFIED", updated);
    json_response(StatusCode::OK, stored)
}

fn conflict(target: &Target) -> Response {
    status_error(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
            group_resource(target.kind),
            target.name.clone().unwrap_or_default()
        ),
    )
}

fn patch(server: &ApiServer, target: &Target, headers: &HeaderMap, body: &[u8], dry_run: bool) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // A strategic merge patch merges lists by their merge keys, which the stand-in does not
    // know: applied as a merge patch it would replace whole lists. Refused, as the real API
    // server refuses it for kinds it cannot merge strategically.
    if !content_type.starts_with("application/merge-patch+json") {
        return status_error(
            415,
            "UnsupportedMediaType",
            format!(
                "the API stand-in does not support patch type {content_type:?}; use a JSON merge patch (kubectl patch --type=merge)"
            ),
        );
    }
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status_error(400, "BadRequest", e.to_string()),
    };
    let mut inner = server.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(current) = inner.copy(&target.key()) else {
        return not_found(target);
    };
    let mut patched = current.clone();
    merge_patch(&mut patched, &patch);
    if !patched.is_object() || !patched["metadata"].is_object() {
        return status_error(
            422,
            "Invalid",
            "the patched object is not an object with metadata".into(),
        );
    }
    if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
        && Some(rv) != current["metadata"]["resourceVersion"].as_str()
    {
        return conflict(target);
    }
    let updated = if target.status {
        // The status subresource changes status only.
        let mut updated = current.clone();
        updated["status"] = patched["status"].clone();
        updated
    } else {
        keep_identity(&mut patched, &current);
        patched["apiVersion"] = current["apiVersion"].clone();
        patched["kind"] = current["kind"].clone();
        patched
    };
    update(server, &mut inner, target, current, updated, dry_run)
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("object");
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A delete's grace period: from the query, else the body's DeleteOptions.
fn grace_period(q: &BTreeMap<String, String>, body: &[u8]) -> Option<u64> {
    q.get("gracePeriodSeconds")
        .and_then(|g| g.parse().ok())
        .or_else(|| serde_json::from_slice::<Value>(body).ok()?["gracePeriodSeconds"].as_u64())
}

/// Deletes at once, whatever `propagationPolicy` says: the stand-in has no garbage collector,
/// so dependents (a Deployment's ReplicaSets and pods) are the lab's controllers' to delete,
/// by their ownerReferences.
fn delete(server: &ApiServer, target: &Target, q: &BTreeMap<String, String>, body: &[u8], dry_run: bool) -> Response {
    let mut inner = server.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut object) = inner.copy(&target.key()) else {
        return not_found(target);
    };
    // A pod is deleted gracefully, as the real API server does: it gets a deletionTimestamp and
    // stays (terminating) until its kubelet deletes it with a grace period of 0.
    if target.kind == POD {
        let grace = grace_period(q, body)
            .or_else(|| object["spec"]["terminationGracePeriodSeconds"].as_u64())
            .unwrap_or(30);
        if grace > 0 {
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!(rfc3339_now());
                object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                if dry_run {
                    return json_response(StatusCode::OK, object);
                }
                let stored = server.commit(&mut inner, target.kind, "MODIFIED", object);
                return json_response(StatusCode::OK, stored);
            }
            return json_response(StatusCode::OK, object);
        }
    }
    if dry_run {
        return json_response(StatusCode::OK, object);
    }
    if target.kind == SERVICE {
        for ip in cluster_ips_of(&object) {
            inner.cluster_ips.used.remove(&ip);
        }
        for port in node_ports_of(&object) {
            inner.node_ports.remove(&port);
        }
    }
    let deleted = server.commit(&mut inner, target.kind, "DELETED", object);
    json_response(StatusCode::OK, deleted)
}

/// How a watch writes its events: objects as they are, or as Tables when the client asked.
struct EventWriter {
    tables: Option<table::WatchTables>,
}

impl EventWriter {
    fn line(&mut self, event: &str, object: &Value) -> Bytes {
        let object = match &mut self.tables {
            Some(tables) => tables.object(object),
            None => object.clone(),
        };
        Bytes::from(format!("{}\n", json!({"type": event, "object": object})))
    }
}

async fn watch(
    server: ApiServer,
    target: Target,
    q: BTreeMap<String, String>,
    table: Option<TableRequest>,
) -> Response {
    let filter = match Filter::new(&target, &q) {
        Ok(f) => f,
        Err(e) => return status_error(400, "BadRequest", e),
    };
    let bookmarks = matches!(
        q.get("allowWatchBookmarks").map(String::as_str),
        Some("true") | Some("1")
    );
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let since: Option<u64> = q
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .and_then(|v| v.parse().ok());
    // Subscribe before reading state, so that nothing falls between the two.
    let mut live = server.changes.subscribe();
    let (initial, mut last_rv, gone) = {
        let inner = server.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match since {
            // "Get state and start at most recent": the current objects as ADDED events.
            None => {
                let events: Vec<(&'static str, Value)> = inner
                    .objects
                    .iter()
                    .filter(|((k, _, _), o)| filter.matches(*k, o))
                    .map(|(_, o)| ("ADDED", Value::clone(o)))
                    .collect();
                (events, inner.rv, false)
            }
            // Older than the history kept, or newer than any version this run handed out (one
            // from an earlier run, whose last changes the data file may have missed): 410, and
            // the client lists again.
            Some(rv) if rv < inner.horizon || rv > inner.rv => (Vec::new(), rv, true),
            Some(rv) => {
                let events = inner
                    .history
                    .iter()
                    .filter(|c| c.rv > rv && filter.matches(c.kind, &c.object))
                    .map(|c| (c.event, c.object.clone()))
                    .collect();
                (events, rv.max(inner.history.back().map_or(inner.rv, |c| c.rv)), false)
            }
        }
    };
    let kind = KINDS[target.kind];
    let mut writer = EventWriter {
        tables: table.map(|request| table::WatchTables::new(target.kind, request)),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let bookmark_interval = server.settings.bookmark_interval;
    tokio::spawn(async move {
        // Errors and bookmarks are never Tables.
        let plain = |v: Value| Ok(Bytes::from(format!("{v}\n")));
        if gone {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410});
            let _ = tx.send(plain(json!({"type": "ERROR", "object": status}))).await;
            return;
        }
        for (event, object) in initial {
            if tx.send(Ok(writer.line(event, &object))).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = until_deadline => return,
                _ = ticker.tick(), if bookmarks => {
                    let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind.kind, "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": last_rv.to_string()}}});
                    if tx.send(plain(bookmark)).await.is_err() { return; }
                }
                change = live.recv() => match change {
                    Ok(c) if c.rv > last_rv => {
                        last_rv = c.rv;
                        if filter.matches(c.kind, &c.object)
                            && tx.send(Ok(writer.line(c.event, &c.object))).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell too far behind: end the stream, the client resumes from its last version.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
        .expect("response")
}

/// A kubeconfig pointing at the stand-in, for kube-rs and kubectl alike.
pub fn kubeconfig(server: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferrynet-lab\n  cluster:\n    server: http://{server}\n\
         contexts:\n- name: ferrynet-lab\n  context:\n    cluster: ferrynet-lab\n    user: lab\n\
         current-context: ferrynet-lab\nusers:\n- name: lab\n  user: {{}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let labels: Map<String, Value> = serde_json::from_str(r#"{"app": "web", "tier": "front"}"#).unwrap();
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web,tier=front", true),
            ("app!=web", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("tier in (front, back)", true),
            ("tier notin (front)", false),
            ("app=web,missing", false),
        ] {
            assert_eq!(Selector::parse(sel).unwrap().matches(&labels), want, "{sel}");
        }
    }

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/nodes/n1/status").unwrap();
        assert_eq!((t.kind, t.name.as_deref(), t.status), (0, Some("n1"), true));
        let t = parse_path("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices").unwrap();
        assert_eq!((t.kind, t.namespace.as_deref()), (4, Some("default")));
        let t = parse_path("/api/v1/namespaces/kube-system").unwrap();
        assert_eq!((t.kind, t.name.as_deref()), (1, Some("kube-system")));
        assert!(parse_path("/api/v1/secrets").is_none());
        assert!(parse_path("/api/v1/services/x").is_none(), "services are namespaced");
    }

    #[test]
    fn merge_patch_is_rfc7386() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut v, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    #[test]
    fn query_decoding_never_splits_a_character() {
        for (raw, want) in [
            ("a%3Db", "a=b"),
            ("%", "%"),
            ("%4", "%4"),
            ("x%zz", "x%zz"),
            ("%é", "%é"),
            ("%1é", "%1é"),
            ("é%C3%A9", "éé"),
            ("a+b", "a b"),
        ] {
            assert_eq!(decode(raw), want, "{raw}");
        }
        let uri: Uri = "/api/v1/nodes?labelSelector=app%3D%C3%A9&watch=%é".parse().unwrap();
        let q = query(&uri);
        assert_eq!(q["labelSelector"], "app=é");
    }

    fn settle(inner: &mut Inner, old: Option<&Value>, mut new: Value) -> Result<Value, String> {
        let settings = Settings {
            node_ports: 30000..=30004,
            ..Settings::default()
        };
        settle_node_ports(inner, &settings, old, &mut new)
            .map(|()| new)
            .map_err(|r| format!("{}", r.status()))
    }

    #[test]
    fn node_ports_are_kept_across_updates_shared_by_protocols_and_released_on_a_type_change() {
        let mut inner = Inner::empty();
        let dns = json!({"spec": {"type": "NodePort", "ports": [
            {"port": 53, "protocol": "UDP", "nodePort": 30002},
            {"port": 53, "protocol": "TCP", "nodePort": 30002},
            {"port": 80, "protocol": "TCP"}]}});
        let stored = settle(&mut inner, None, dns).unwrap();
        // The requested port is not handed out before it is taken.
        assert_eq!(stored["spec"]["ports"][2]["nodePort"], 30000);
        assert_eq!(inner.node_ports, [30000, 30002].into());
        // Ports that are not objects get no NodePort, and are no panic.
        let mut scratch = Inner::empty();
        let hostile = json!({"spec": {"type": "NodePort", "ports": [5, "x", null]}});
        let untouched = settle(&mut scratch, None, hostile).unwrap();
        assert_eq!(untouched["spec"]["ports"], json!([5, "x", null]));
        // The same number twice for one protocol is refused.
        let twice = json!({"spec": {"type": "NodePort", "ports": [
            {"port": 1, "nodePort": 30003}, {"port": 2, "nodePort": 30003}]}});
        assert_eq!(settle(&mut inner, None, twice).unwrap_err(), "422 Unprocessable Entity");
        assert_eq!(inner.node_ports, [30000, 30002].into(), "a refusal takes nothing");
        // An update that leaves the NodePorts out keeps them.
        let mut update = stored.clone();
        for port in update["spec"]["ports"].as_array_mut().unwrap() {
            port.as_object_mut().unwrap().remove("nodePort");
        }
        let kept = settle(&mut inner, Some(&stored), update).unwrap();
        assert_eq!(kept["spec"]["ports"], stored["spec"]["ports"]);
        // Turned into a ClusterIP Service, it gives them all back.
        let mut clusterip = kept.clone();
        clusterip["spec"]["type"] = json!("ClusterIP");
        let plain = settle(&mut inner, Some(&kept), clusterip).unwrap();
        assert!(plain["spec"]["ports"][0].get("nodePort").is_none(), "{plain}");
        assert!(inner.node_ports.is_empty());
        // A ClusterIP Service may not ask for one.
        let asks = json!({"spec": {"ports": [{"port": 1, "nodePort": 30001}]}});
        assert_eq!(settle(&mut inner, None, asks).unwrap_err(), "422 Unprocessable Entity");
    }

    #[test]
    fn load_balancers_get_node_ports_unless_told_not_to_and_a_health_check_port_when_local() {
        let mut inner = Inner::empty();
        let none = json!({"spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
            "ports": [{"port": 80}]}});
        let stored = settle(&mut inner, None, none).unwrap();
        assert!(stored["spec"]["ports"][0].get("nodePort").is_none());
        assert!(stored["spec"].get("healthCheckNodePort").is_none());
        let local = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "ports": [{"port": 80}]}});
        let stored = settle(&mut inner, None, local).unwrap();
        assert_eq!(stored["spec"]["ports"][0]["nodePort"], 30000);
        assert_eq!(stored["spec"]["healthCheckNodePort"], 30001);
        // Back to Cluster: the health check port goes.
        let mut cluster = stored.clone();
        cluster["spec"]["externalTrafficPolicy"] = json!("Cluster");
        let after = settle(&mut inner, Some(&stored), cluster).unwrap();
        assert!(after["spec"].get("healthCheckNodePort").is_none(), "{after}");
        assert_eq!(inner.node_ports, [30000].into());
        // The range runs out: refused, not wrapped.
        for _ in 0..4 {
            let _ = settle(
                &mut inner,
                None,
                json!({"spec": {"type": "NodePort", "ports": [{"port": 1}]}}),
            );
        }
        assert_eq!(inner.node_ports.len(), 5);
        let full = settle(
            &mut inner,
            None,
            json!({"spec": {"type": "NodePort", "ports": [{"port": 1}]}}),
        );
        assert_eq!(full.unwrap_err(), "422 Unprocessable Entity");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}
