//! Server-side printing: `meta.k8s.io` `Table`s, which `kubectl get` asks for (`Accept:
//! application/json;as=Table;v=v1;g=meta.k8s.io,...`) and prints as they come. The columns and
//! cells are the real API server's (its `pkg/printers/internalversion` printers): like the real
//! server, every column is filled, and the ones only `-o wide` shows have priority 1. Each row
//! carries the object as `includeObject` asks (`Metadata`, the default, sends a
//! `PartialObjectMetadata`), from which kubectl takes the namespace column and labels.
use axum::http::{HeaderMap, header};
use serde_json::{Map, Value, json};

use super::{DEPLOYMENT, ENDPOINTS, ENDPOINTSLICE, NAMESPACE, NODE, POD, SERVICE, parse_rfc3339};

/// What a Table request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRequest {
    /// `v1` or `v1beta1` of `meta.k8s.io`.
    version: &'static str,
    include: Include,
}

/// `includeObject`: what each row carries of its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Include {
    None,
    Metadata,
    Object,
}

/// The Table a request's `Accept` header asks for, if its first acceptable media type is one;
/// an error for an `includeObject` the server does not know.
pub fn requested(headers: &HeaderMap, include: Option<&str>) -> Result<Option<TableRequest>, String> {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut version = None;
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let mime = parts.next().unwrap_or("");
        let params: Vec<(&str, &str)> = parts.filter_map(|p| p.split_once('=')).collect();
        let param = |name: &str| params.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        if !matches!(mime, "application/json" | "application/*" | "*/*") {
            continue;
        }
        match param("as") {
            None => break,
            Some("Table") if param("g") == Some("meta.k8s.io") => match param("v") {
                Some("v1") => version = Some("v1"),
                Some("v1beta1") => version = Some("v1beta1"),
                _ => continue,
            },
            Some(_) => continue,
        }
        break;
    }
    let Some(version) = version else {
        return Ok(None);
    };
    let include = match include.unwrap_or("Metadata") {
        "None" => Include::None,
        "Metadata" | "" => Include::Metadata,
        "Object" => Include::Object,
        other => return Err(format!("unrecognized includeObject value: {other:?}")),
    };
    Ok(Some(TableRequest { version, include }))
}

/// A Table of `objects` of `kind`. `columns` false leaves the column definitions out, as the
/// real server does for every watch event after the first (kubectl keeps the last ones).
pub fn table(kind: usize, objects: &[&Value], resource_version: &str, request: TableRequest, columns: bool) -> Value {
    let now = super::now_seconds();
    let rows: Vec<Value> = objects.iter().map(|o| row(kind, o, request.include, now)).collect();
    let definitions: Vec<Value> = if columns {
        column_definitions(kind)
            .iter()
            .map(|(name, ty, priority, description)| {
                json!({"name": name, "type": ty, "format": if *name == "Name" { "name" } else { "" },
                    "description": description, "priority": priority})
            })
            .collect()
    } else {
        Vec::new()
    };
    json!({"kind": "Table", "apiVersion": format!("meta.k8s.io/{}", request.version),
        "metadata": {"resourceVersion": resource_version}, "columnDefinitions": definitions, "rows": rows})
}

/// A watch's events with Tables for objects: the column definitions in the first only.
pub struct WatchTables {
    kind: usize,
    request: TableRequest,
    columns_sent: bool,
}

impl WatchTables {
    pub fn new(kind: usize, request: TableRequest) -> Self {
        Self {
            kind,
            request,
            columns_sent: false,
        }
    }

    /// The object of a watch event: a Table with its one row.
    pub fn object(&mut self, object: &Value) -> Value {
        let rv = object["metadata"]["resourceVersion"].as_str().unwrap_or("");
        let table = table(self.kind, &[object], rv, self.request, !self.columns_sent);
        self.columns_sent = true;
        table
    }
}

fn row(kind: usize, object: &Value, include: Include, now: i64) -> Value {
    let mut row = Map::new();
    row.insert("cells".into(), Value::Array(cells(kind, object, now)));
    let carried = match include {
        Include::None => Value::Null,
        Include::Object => object.clone(),
        Include::Metadata => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": object["metadata"]}),
    };
    row.insert("object".into(), carried);
    if kind == POD {
        match object["status"]["phase"].as_str() {
            Some("Succeeded") => {
                row.insert(
                    "conditions".into(),
                    json!([{"type": "Completed", "status": "True",
                    "reason": "Succeeded", "message": "The pod has completed successfully."}]),
                );
            }
            Some("Failed") => {
                row.insert(
                    "conditions".into(),
                    json!([{"type": "Completed", "status": "True",
                    "reason": "Failed", "message": "The pod failed."}]),
                );
            }
            _ => {}
        }
    }
    Value::Object(row)
}

/// (name, type, priority, description) of each column, as the real printers declare them.
fn column_definitions(kind: usize) -> Vec<(&'static str, &'static str, u8, &'static str)> {
    const NAME: (&str, &str, u8, &str) = (
        "Name",
        "string",
        0,
        "Name must be unique within a namespace. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    );
    const AGE: (&str, &str, u8, &str) = (
        "Age",
        "string",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match kind {
        POD => vec![
            NAME,
            (
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            (
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            (
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            (
                "IP",
                "string",
                1,
                "IP address allocated to the pod. Routable at least within the cluster.",
            ),
            (
                "Node",
                "string",
                1,
                "NodeName indicates in which node this pod is scheduled.",
            ),
            (
                "Nominated Node",
                "string",
                1,
                "nominatedNodeName is set when this pod preempts other pods on the node.",
            ),
            (
                "Readiness Gates",
                "string",
                1,
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ],
        SERVICE => vec![
            NAME,
            ("Type", "string", 0, "type determines how the Service is exposed."),
            ("Cluster-IP", "string", 0, "clusterIP is the IP address of the service."),
            (
                "External-IP",
                "string",
                0,
                "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
            ),
            (
                "Port(s)",
                "string",
                0,
                "The list of ports that are exposed by this service.",
            ),
            AGE,
            (
                "Selector",
                "string",
                1,
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ],
        DEPLOYMENT => vec![
            NAME,
            ("Ready", "string", 0, "Number of the pod with ready state"),
            (
                "Up-to-date",
                "string",
                0,
                "Total number of non-terminating pods targeted by this deployment that have the desired template spec.",
            ),
            (
                "Available",
                "string",
                0,
                "Total number of available non-terminating pods (ready for at least minReadySeconds) targeted by this deployment.",
            ),
            AGE,
            ("Containers", "string", 1, "Names of each container in the template."),
            (
                "Images",
                "string",
                1,
                "Images referenced by each container in the template.",
            ),
            (
                "Selector",
                "string",
                1,
                "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment.",
            ),
        ],
        ENDPOINTS => vec![
            NAME,
            (
                "Endpoints",
                "string",
                0,
                "The set of all endpoints is the union of all subsets.",
            ),
            AGE,
        ],
        NODE => vec![
            NAME,
            ("Status", "string", 0, "The status of the node"),
            ("Roles", "string", 0, "The roles of the node"),
            AGE,
            ("Version", "string", 0, "Kubelet Version reported by the node."),
            ("Internal-IP", "string", 1, "List of addresses reachable to the node."),
            ("External-IP", "string", 1, "List of addresses reachable to the node."),
            (
                "OS-Image",
                "string",
                1,
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
            ),
            (
                "Kernel-Version",
                "string",
                1,
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
            ),
            (
                "Container-Runtime",
                "string",
                1,
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
            ),
        ],
        ENDPOINTSLICE => vec![
            NAME,
            (
                "AddressType",
                "string",
                0,
                "addressType specifies the type of address carried by this EndpointSlice.",
            ),
            (
                "Ports",
                "string",
                0,
                "ports specifies the list of network ports exposed by each endpoint in this slice.",
            ),
            (
                "Endpoints",
                "string",
                0,
                "endpoints is a list of unique endpoints in this slice.",
            ),
            AGE,
        ],
        NAMESPACE => vec![NAME, ("Status", "string", 0, "The status of the namespace"), AGE],
        _ => vec![NAME, AGE],
    }
}

fn cells(kind: usize, object: &Value, now: i64) -> Vec<Value> {
    let name = json!(text(&object["metadata"]["name"]));
    let age = json!(age(&object["metadata"]["creationTimestamp"], now));
    match kind {
        POD => pod_cells(object, name, age, now),
        SERVICE => service_cells(object, name, age),
        DEPLOYMENT => deployment_cells(object, name, age),
        ENDPOINTS => vec![name, json!(format_endpoints(object)), age],
        NODE => node_cells(object, name, age),
        ENDPOINTSLICE => {
            let ports: Vec<String> = items(&object["ports"])
                .map(|p| match (&p["port"], &p["name"]) {
                    (Value::Number(n), _) => n.to_string(),
                    (_, Value::String(name)) => name.clone(),
                    _ => "*".into(),
                })
                .collect();
            let addresses: Vec<String> = items(&object["endpoints"])
                .flat_map(|e| items(&e["addresses"]))
                .map(|a| text(a).to_string())
                .collect();
            vec![
                name,
                json!(text(&object["addressType"])),
                json!(list_with_more(&ports)),
                json!(list_with_more(&addresses)),
                age,
            ]
        }
        NAMESPACE => vec![name, json!(text(&object["status"]["phase"])), age],
        _ => vec![name, age],
    }
}

/// printPod: READY, STATUS and RESTARTS as the real printer computes them from the statuses.
fn pod_cells(pod: &Value, name: Value, age: Value, now: i64) -> Vec<Value> {
    let status = &pod["status"];
    let phase = text(&status["phase"]);
    let mut reason = if text(&status["reason"]).is_empty() {
        phase.to_string()
    } else {
        text(&status["reason"]).to_string()
    };
    if items(&status["conditions"]).any(|c| c["type"] == "PodScheduled" && c["reason"] == "SchedulingGated") {
        reason = "SchedulingGated".into();
    }
    let restartable: Vec<&str> = items(&pod["spec"]["initContainers"])
        .filter(|c| c["restartPolicy"] == "Always")
        .map(|c| text(&c["name"]))
        .collect();
    let total = items(&pod["spec"]["containers"]).count() + restartable.len();
    let mut ready = 0;
    let mut restarts = 0;
    let mut sidecar_restarts = 0;
    let mut last_restart: Option<i64> = None;
    let mut sidecar_last_restart: Option<i64> = None;
    let init_count = items(&pod["spec"]["initContainers"]).count();
    let mut initializing = false;
    for (i, container) in items(&status["initContainerStatuses"]).enumerate() {
        let count = container["restartCount"].as_i64().unwrap_or(0);
        restarts += count;
        let finished = parse_rfc3339(text(&container["lastState"]["terminated"]["finishedAt"]));
        last_restart = last_restart.max(finished);
        let is_sidecar = restartable.contains(&text(&container["name"]));
        if is_sidecar {
            sidecar_restarts += count;
            sidecar_last_restart = sidecar_last_restart.max(finished);
        }
        let terminated = &container["state"]["terminated"];
        let waiting = text(&container["state"]["waiting"]["reason"]);
        if terminated.is_object() && terminated["exitCode"].as_i64().unwrap_or(0) == 0 {
            continue;
        }
        if is_sidecar && container["started"] == true {
            if container["ready"] == true {
                ready += 1;
            }
            continue;
        }
        reason = if terminated.is_object() {
            match text(&terminated["reason"]) {
                "" => match terminated["signal"].as_i64().unwrap_or(0) {
                    0 => format!("Init:ExitCode:{}", terminated["exitCode"].as_i64().unwrap_or(0)),
                    signal => format!("Init:Signal:{signal}"),
                },
                why => format!("Init:{why}"),
            }
        } else if !waiting.is_empty() && waiting != "PodInitializing" {
            format!("Init:{waiting}")
        } else {
            format!("Init:{i}/{init_count}")
        };
        initializing = true;
        break;
    }
    let initialized = items(&status["conditions"]).any(|c| c["type"] == "Initialized" && c["status"] == "True");
    if !initializing || initialized {
        restarts = sidecar_restarts;
        last_restart = sidecar_last_restart;
        let mut running = false;
        let statuses: Vec<&Value> = items(&status["containerStatuses"]).collect();
        for container in statuses.iter().rev() {
            restarts += container["restartCount"].as_i64().unwrap_or(0);
            let finished = parse_rfc3339(text(&container["lastState"]["terminated"]["finishedAt"]));
            last_restart = last_restart.max(finished);
            let state = &container["state"];
            let terminated = &state["terminated"];
            if !text(&state["waiting"]["reason"]).is_empty() {
                reason = text(&state["waiting"]["reason"]).to_string();
            } else if terminated.is_object() && !text(&terminated["reason"]).is_empty() {
                reason = text(&terminated["reason"]).to_string();
            } else if terminated.is_object() {
                reason = match terminated["signal"].as_i64().unwrap_or(0) {
                    0 => format!("ExitCode:{}", terminated["exitCode"].as_i64().unwrap_or(0)),
                    signal => format!("Signal:{signal}"),
                };
            } else if container["ready"] == true && state["running"].is_object() {
                running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && running {
            let pod_ready = items(&status["conditions"]).any(|c| c["type"] == "Ready" && c["status"] == "True");
            reason = if pod_ready { "Running" } else { "NotReady" }.into();
        }
    }
    let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
    if deleting && text(&status["reason"]) == "NodeLost" {
        reason = "Unknown".into();
    } else if deleting && !matches!(phase, "Succeeded" | "Failed") {
        reason = "Terminating".into();
    }
    let restarts = match last_restart {
        Some(at) if restarts != 0 && at > 0 => format!("{restarts} ({} ago)", human_duration(now - at)),
        _ => restarts.to_string(),
    };
    let ip = items(&status["podIPs"])
        .map(|p| text(&p["ip"]))
        .next()
        .filter(|ip| !ip.is_empty())
        .unwrap_or("<none>");
    let gates: Vec<&str> = items(&pod["spec"]["readinessGates"])
        .map(|g| text(&g["conditionType"]))
        .collect();
    let readiness_gates = if gates.is_empty() {
        "<none>".to_string()
    } else {
        let met = gates
            .iter()
            .filter(|gate| {
                items(&status["conditions"])
                    .find(|c| c["type"] == **gate)
                    .is_some_and(|c| c["status"] == "True")
            })
            .count();
        format!("{met}/{}", gates.len())
    };
    vec![
        name,
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts),
        age,
        json!(ip),
        json!(or_none(text(&pod["spec"]["nodeName"]))),
        json!(or_none(text(&status["nominatedNodeName"]))),
        json!(readiness_gates),
    ]
}

fn service_cells(service: &Value, name: Value, age: Value) -> Vec<Value> {
    let spec = &service["spec"];
    let kind = text(&spec["type"]);
    let cluster_ip = items(&spec["clusterIPs"]).map(text).next().unwrap_or("<none>");
    let external: Vec<&str> = items(&spec["externalIPs"]).map(text).collect();
    let external_ip = match kind {
        "ClusterIP" | "NodePort" if external.is_empty() => "<none>".to_string(),
        "ClusterIP" | "NodePort" => external.join(","),
        "LoadBalancer" => {
            let mut ingress: Vec<&str> = items(&service["status"]["loadBalancer"]["ingress"])
                .map(|i| {
                    if text(&i["ip"]).is_empty() {
                        text(&i["hostname"])
                    } else {
                        text(&i["ip"])
                    }
                })
                .filter(|s| !s.is_empty())
                .collect();
            ingress.sort_unstable();
            ingress.dedup();
            ingress.extend(external);
            if ingress.is_empty() {
                "<pending>".to_string()
            } else {
                ingress.join(",")
            }
        }
        "ExternalName" => text(&spec["externalName"]).to_string(),
        _ => "<unknown>".to_string(),
    };
    let ports: Vec<String> = items(&spec["ports"])
        .map(|p| {
            let protocol = or(text(&p["protocol"]), "TCP");
            match p["nodePort"].as_i64().filter(|n| *n > 0) {
                Some(node_port) => format!("{}:{node_port}/{protocol}", p["port"].as_i64().unwrap_or(0)),
                None => format!("{}/{protocol}", p["port"].as_i64().unwrap_or(0)),
            }
        })
        .collect();
    let ports = if ports.is_empty() {
        "<none>".to_string()
    } else {
        ports.join(",")
    };
    vec![
        name,
        json!(kind),
        json!(cluster_ip),
        json!(external_ip),
        json!(ports),
        age,
        json!(format_labels(&spec["selector"])),
    ]
}

fn deployment_cells(deployment: &Value, name: Value, age: Value) -> Vec<Value> {
    let (spec, status) = (&deployment["spec"], &deployment["status"]);
    let number = |v: &Value| v.as_i64().unwrap_or(0);
    let containers: Vec<&Value> = items(&spec["template"]["spec"]["containers"]).collect();
    let names: Vec<&str> = containers.iter().map(|c| text(&c["name"])).collect();
    let images: Vec<&str> = containers.iter().map(|c| text(&c["image"])).collect();
    vec![
        name,
        json!(format!(
            "{}/{}",
            number(&status["readyReplicas"]),
            number(&spec["replicas"])
        )),
        json!(number(&status["updatedReplicas"])),
        json!(number(&status["availableReplicas"])),
        age,
        json!(names.join(",")),
        json!(images.join(",")),
        json!(selector_string(&spec["selector"])),
    ]
}

fn node_cells(node: &Value, name: Value, age: Value) -> Vec<Value> {
    let status = &node["status"];
    let mut states: Vec<String> = items(&status["conditions"])
        .filter(|c| c["type"] == "Ready")
        .take(1)
        .map(|c| if c["status"] == "True" { "Ready" } else { "NotReady" }.to_string())
        .collect();
    if states.is_empty() {
        states.push("Unknown".into());
    }
    if node["spec"]["unschedulable"] == true {
        states.push("SchedulingDisabled".into());
    }
    let mut roles: Vec<&str> = node["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| match k.strip_prefix("node-role.kubernetes.io/") {
            Some(role) if !role.is_empty() => Some(role),
            Some(_) => None,
            None if k == "kubernetes.io/role" && !text(v).is_empty() => Some(text(v)),
            None => None,
        })
        .collect();
    roles.sort_unstable();
    roles.dedup();
    let address = |kind: &str| {
        items(&status["addresses"])
            .find(|a| a["type"] == kind)
            .map_or("<none>", |a| text(&a["address"]))
    };
    let info = &status["nodeInfo"];
    vec![
        name,
        json!(states.join(",")),
        json!(or_none(&roles.join(","))),
        age,
        json!(text(&info["kubeletVersion"])),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(or(text(&info["osImage"]), "<unknown>")),
        json!(or(text(&info["kernelVersion"]), "<unknown>")),
        json!(or(text(&info["containerRuntimeVersion"]), "<unknown>")),
    ]
}

/// formatEndpoints: up to three `ip:port`s (of every subset and port), then `+ N more...`.
fn format_endpoints(endpoints: &Value) -> String {
    let subsets: Vec<&Value> = items(&endpoints["subsets"]).collect();
    if subsets.is_empty() {
        return "<none>".into();
    }
    const MAX: usize = 3;
    let (mut list, mut count, mut more) = (Vec::new(), 0, false);
    for subset in subsets {
        let addresses: Vec<&str> = items(&subset["addresses"]).map(|a| text(&a["ip"])).collect();
        let ports: Vec<Option<i64>> = match items(&subset["ports"]).count() {
            // A headless Service without ports: the addresses alone.
            0 => vec![None],
            _ => items(&subset["ports"])
                .map(|p| Some(p["port"].as_i64().unwrap_or(0)))
                .collect(),
        };
        for port in ports {
            count += addresses.len();
            for ip in &addresses {
                if list.len() == MAX {
                    more = true;
                    break;
                }
                list.push(match port {
                    Some(port) if ip.contains(':') => format!("[{ip}]:{port}"),
                    Some(port) => format!("{ip}:{port}"),
                    None => ip.to_string(),
                });
            }
        }
    }
    let joined = list.join(",");
    if more {
        format!("{joined} + {} more...", count - MAX)
    } else {
        joined
    }
}

/// listWithMoreString: up to three, then `+ N more...`; `<unset>` for none.
fn list_with_more(all: &[String]) -> String {
    const MAX: usize = 3;
    let joined = all.iter().take(MAX).cloned().collect::<Vec<_>>().join(",");
    if all.len() > MAX {
        format!("{joined} + {} more...", all.len() - MAX)
    } else if joined.is_empty() {
        "<unset>".into()
    } else {
        joined
    }
}

/// labels.FormatLabels: `k=v` sorted by key, `<none>` for none.
fn format_labels(labels: &Value) -> String {
    let pairs: Vec<String> = labels
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", text(v)))
        .collect();
    or_none(&pairs.join(",")).to_string()
}

/// A LabelSelector as labels.Selector's String(): requirements sorted by key.
pub fn selector_string(selector: &Value) -> String {
    let mut requirements: Vec<(String, String)> = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), format!("{k}={}", text(v))))
        .collect();
    for expression in items(&selector["matchExpressions"]) {
        let key = text(&expression["key"]);
        let mut values: Vec<&str> = items(&expression["values"]).map(text).collect();
        values.sort_unstable();
        let values = values.join(",");
        let formatted = match text(&expression["operator"]) {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            _ => return "<invalid>".into(),
        };
        requirements.push((key.to_string(), formatted));
    }
    requirements.sort();
    requirements.into_iter().map(|(_, r)| r).collect::<Vec<_>>().join(",")
}

/// translateTimestampSince: the object's age, `<unknown>` without a creation time.
fn age(timestamp: &Value, now: i64) -> String {
    match timestamp.as_str().and_then(parse_rfc3339) {
        Some(created) => human_duration(now - created),
        None => "<unknown>".into(),
    }
}

/// k8s.io/apimachinery's duration.HumanDuration, for whole seconds.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        return match seconds % 60 {
            0 => format!("{minutes}m"),
            s => format!("{minutes}m{s}s"),
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        return match minutes % 60 {
            0 => format!("{hours}h"),
            m => format!("{hours}h{m}m"),
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        return match hours % 24 {
            0 => format!("{}d", hours / 24),
            h => format!("{}d{h}h", hours / 24),
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        return match (hours / 24) % 365 {
            0 => format!("{}y", hours / 24 / 365),
            d => format!("{}y{d}d", hours / 24 / 365),
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn items(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

fn or<'a>(value: &'a str, fallback: &'a str) -> &'a str {
    if value.is_empty() { fallback } else { value }
}

fn or_none(value: &str) -> &str {
    or(value, "<none>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells_of(kind: usize, object: Value) -> Vec<Value> {
        let mut object = object;
        object["metadata"]["creationTimestamp"] = json!(super::super::rfc3339(super::super::now_seconds() - 125));
        cells(kind, &object, super::super::now_seconds())
    }

    #[test]
    fn pod_status_is_computed_as_the_real_printer_does() {
        let pod = |status: Value| {
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
                "status": status})
        };
        let running = pod(
            json!({"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}], "containerStatuses": [
            {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
            {"name": "b", "ready": false, "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}),
        );
        assert_eq!(
            cells_of(POD, running),
            json!([
                "p",
                "1/2",
                "CrashLoopBackOff",
                "2",
                "2m5s",
                "10.244.1.5",
                "n1",
                "<none>",
                "<none>"
            ])
            .as_array()
            .unwrap()
            .clone()
        );
        let pulling = pod(json!({"phase": "Pending", "containerStatuses": [
            {"name": "a", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull"}}}]}));
        assert_eq!(cells_of(POD, pulling)[2], "ErrImagePull");
        assert_eq!(cells_of(POD, pod(json!({"phase": "Pending"})))[2], "Pending");
        let done = pod(json!({"phase": "Succeeded", "containerStatuses": [
            {"name": "a", "ready": false, "state": {"terminated": {"reason": "Completed", "exitCode": 0}}}]}));
        assert_eq!(cells_of(POD, done)[2], "Completed");
        let mut leaving = pod(json!({"phase": "Running"}));
        leaving["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        assert_eq!(cells_of(POD, leaving)[2], "Terminating");
        let init = json!({"metadata": {"name": "p"}, "spec": {"initContainers": [{"name": "i"}], "containers": [{"name": "a"}]},
            "status": {"phase": "Pending", "initContainerStatuses": [{"name": "i", "state": {"running": {}}}]}});
        assert_eq!(cells_of(POD, init)[2], "Init:0/1");
    }

    #[test]
    fn services_deployments_nodes_and_slices() {
        let svc = json!({"metadata": {"name": "web"}, "spec": {"type": "NodePort", "clusterIPs": ["10.96.0.10"],
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}],
            "selector": {"tier": "x", "app": "web"}}});
        assert_eq!(
            cells_of(SERVICE, svc),
            vec![
                json!("web"),
                json!("NodePort"),
                json!("10.96.0.10"),
                json!("<none>"),
                json!("80:30080/TCP,53/UDP"),
                json!("2m5s"),
                json!("app=web,tier=x")
            ]
        );
        let lb = json!({"metadata": {"name": "lb"}, "spec": {"type": "LoadBalancer", "clusterIPs": ["10.96.0.11"]}});
        assert_eq!(cells_of(SERVICE, lb)[3], "<pending>");
        let deploy = json!({"metadata": {"name": "demo"}, "spec": {"replicas": 3,
            "selector": {"matchLabels": {"app": "demo"}, "matchExpressions": [{"key": "env", "operator": "In", "values": ["b", "a"]}]},
            "template": {"spec": {"containers": [{"name": "nginx", "image": "nginx"}, {"name": "side", "image": "busybox"}]}}},
            "status": {"readyReplicas": 1, "updatedReplicas": 2}});
        assert_eq!(
            cells_of(DEPLOYMENT, deploy),
            vec![
                json!("demo"),
                json!("1/3"),
                json!(2),
                json!(0),
                json!("2m5s"),
                json!("nginx,side"),
                json!("nginx,busybox"),
                json!("app=demo,env in (a,b)")
            ]
        );
        let node = json!({"metadata": {"name": "n1", "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "Debian"}}});
        assert_eq!(
            cells_of(NODE, node),
            vec![
                json!("n1"),
                json!("Ready,SchedulingDisabled"),
                json!("control-plane"),
                json!("2m5s"),
                json!("v1.32.0"),
                json!("10.0.0.1"),
                json!("<none>"),
                json!("Debian"),
                json!("<unknown>"),
                json!("<unknown>")
            ]
        );
        let slice = json!({"metadata": {"name": "web-1"}, "addressType": "IPv4", "ports": [{"port": 80}, {"name": "x"}],
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}, {"addresses": ["10.0.0.3"]}, {"addresses": ["10.0.0.4"]}]});
        assert_eq!(
            cells_of(ENDPOINTSLICE, slice),
            vec![
                json!("web-1"),
                json!("IPv4"),
                json!("80,x"),
                json!("10.0.0.1,10.0.0.2,10.0.0.3 + 1 more..."),
                json!("2m5s")
            ]
        );
    }

    #[test]
    fn endpoints_are_formatted_three_at_most() {
        let endpoints = json!({"subsets": [
            {"addresses": [{"ip": "10.244.1.5"}, {"ip": "10.244.2.7"}], "ports": [{"port": 80}]},
            {"addresses": [{"ip": "10.244.3.1"}, {"ip": "fd00::1"}], "ports": [{"port": 80}]}]});
        assert_eq!(
            format_endpoints(&endpoints),
            "10.244.1.5:80,10.244.2.7:80,10.244.3.1:80 + 1 more..."
        );
        assert_eq!(format_endpoints(&json!({})), "<none>");
        assert_eq!(
            format_endpoints(&json!({"subsets": [{"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 80}]}]})),
            "[fd00::1]:80"
        );
    }

    #[test]
    fn durations_read_as_kubectl_prints_them() {
        for (seconds, want) in [
            (-5, "<invalid>"),
            (0, "0s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (30 * 3600, "30h"),
            (3 * 86_400 + 3600, "3d1h"),
            (40 * 86_400, "40d"),
            (3 * 365 * 86_400, "3y"),
        ] {
            assert_eq!(human_duration(seconds), want, "{seconds}");
        }
    }

    #[test]
    fn the_accept_header_decides() {
        let ask = |accept: &str, include: Option<&str>| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT, accept.parse().unwrap());
            requested(&headers, include)
        };
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(
            ask(kubectl, None).unwrap(),
            Some(TableRequest {
                version: "v1",
                include: Include::Metadata
            })
        );
        assert_eq!(ask("application/json", None).unwrap(), None);
        assert_eq!(
            ask("application/json, application/json;as=Table;v=v1;g=meta.k8s.io", None).unwrap(),
            None
        );
        assert_eq!(
            ask("application/json;as=Table;v=v1beta1;g=meta.k8s.io", Some("Object"))
                .unwrap()
                .map(|r| (r.version, r.include)),
            Some(("v1beta1", Include::Object))
        );
        assert!(ask(kubectl, Some("Everything")).is_err());
    }
}
