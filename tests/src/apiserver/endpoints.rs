//! v1 Endpoints, kept by the stand-in as the control plane's endpoints controller keeps them: one
//! per Service (but ExternalName ones), of the same name, computed here from the EndpointSlices
//! labelled `kubernetes.io/service-name` with the Service's name, whoever wrote those. Ready
//! endpoints are `addresses`, not-ready ones `notReadyAddresses`, terminating ones neither (as
//! the controller leaves out pods being deleted); only slices of the Service's primary IP family
//! count (Endpoints carry one family). Subsets group addresses by their ports, addresses sorted.
//! Clients only read them: the stand-in writes them on every change to a slice or a Service.
use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::{ApiServer, ENDPOINTS, ENDPOINTSLICE, Inner, SERVICE, rfc3339_now, uid};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service an EndpointSlice belongs to, by its label.
pub fn service_of_slice(slice: &Value) -> Option<&str> {
    slice["metadata"]["labels"][SERVICE_NAME_LABEL].as_str()
}

/// The Endpoints the controller would keep for `service` given its `slices`: none for an
/// ExternalName Service. Without resourceVersion, uid or creationTimestamp (the store's).
pub fn mirror(service: &Value, slices: &[&Value]) -> Option<Value> {
    let spec = &service["spec"];
    if spec["type"] == "ExternalName" {
        return None;
    }
    let family = spec["ipFamilies"][0].as_str().unwrap_or("IPv4");
    // Subsets by their ports (as canonical JSON): (ports, ready by IP, not ready by IP).
    type Subset = (Vec<Value>, BTreeMap<String, Value>, BTreeMap<String, Value>);
    let mut subsets: BTreeMap<String, Subset> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s["addressType"] == family) {
        let ports = endpoint_ports(slice);
        let key = Value::Array(ports.clone()).to_string();
        let subset = subsets
            .entry(key)
            .or_insert_with(|| (ports, BTreeMap::new(), BTreeMap::new()));
        for endpoint in slice["endpoints"].as_array().into_iter().flatten() {
            let conditions = &endpoint["conditions"];
            // A nil `ready` means ready (the EndpointSlice API's rule).
            let ready = conditions["ready"] != json!(false);
            if !ready && conditions["terminating"] == json!(true) {
                continue;
            }
            for ip in endpoint["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let address = endpoint_address(ip, endpoint);
                if ready {
                    subset.2.remove(ip);
                    subset.1.insert(ip.to_string(), address);
                } else if !subset.1.contains_key(ip) {
                    subset.2.insert(ip.to_string(), address);
                }
            }
        }
    }
    let subsets: Vec<Value> = subsets
        .into_values()
        .filter(|(_, ready, not_ready)| !ready.is_empty() || !not_ready.is_empty())
        .map(|(ports, ready, not_ready)| {
            let mut subset = Map::new();
            if !ready.is_empty() {
                subset.insert("addresses".into(), Value::Array(ready.into_values().collect()));
            }
            if !not_ready.is_empty() {
                subset.insert(
                    "notReadyAddresses".into(),
                    Value::Array(not_ready.into_values().collect()),
                );
            }
            if !ports.is_empty() {
                subset.insert("ports".into(), Value::Array(ports));
            }
            Value::Object(subset)
        })
        .collect();
    let meta = &service["metadata"];
    let mut labels = meta["labels"].as_object().cloned().unwrap_or_default();
    if spec["clusterIP"] == "None" {
        labels.insert("service.kubernetes.io/headless".into(), json!(""));
    }
    let mut metadata = json!({"name": meta["name"], "namespace": meta["namespace"]});
    if !labels.is_empty() {
        metadata["labels"] = Value::Object(labels);
    }
    let mut endpoints = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": metadata});
    if !subsets.is_empty() {
        endpoints["subsets"] = Value::Array(subsets);
    }
    Some(endpoints)
}

/// A slice's ports as EndpointPorts (a port without a number, "all ports", has no place there),
/// sorted by name and number.
fn endpoint_ports(slice: &Value) -> Vec<Value> {
    let mut ports: Vec<Value> = slice["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["port"].is_number())
        .map(|p| {
            let mut port = Map::new();
            if let Some(name) = p["name"].as_str().filter(|n| !n.is_empty()) {
                port.insert("name".into(), json!(name));
            }
            port.insert("port".into(), p["port"].clone());
            port.insert("protocol".into(), json!(p["protocol"].as_str().unwrap_or("TCP")));
            if let Some(app) = p["appProtocol"].as_str() {
                port.insert("appProtocol".into(), json!(app));
            }
            Value::Object(port)
        })
        .collect();
    ports.sort_by_key(|p| (p["name"].as_str().unwrap_or("").to_string(), p["port"].as_i64()));
    ports
}

fn endpoint_address(ip: &str, endpoint: &Value) -> Value {
    let mut address = Map::new();
    address.insert("ip".into(), json!(ip));
    for field in ["hostname", "nodeName", "targetRef"] {
        if !endpoint[field].is_null() {
            address.insert(field.into(), endpoint[field].clone());
        }
    }
    Value::Object(address)
}

/// A slice index entry key: (namespace, Service name).
pub type ServiceKey = (String, String);

impl ApiServer {
    /// The Services whose Endpoints a change to `object` (of kind index `kind`) may change: the
    /// Service itself, or a slice's Service before and after the change.
    pub(super) fn services_touched(inner: &Inner, kind: usize, object: &Value) -> BTreeSet<ServiceKey> {
        let key = super::key_of(kind, object);
        let mut touched = BTreeSet::new();
        match kind {
            SERVICE => {
                touched.insert((key.1, key.2));
            }
            ENDPOINTSLICE => {
                for slice in [Some(object), inner.get(&key)].into_iter().flatten() {
                    if let Some(service) = service_of_slice(slice) {
                        touched.insert((key.1.clone(), service.to_string()));
                    }
                }
            }
            _ => {}
        }
        touched
    }

    /// Keeps the slice index current for a change to a slice (`old` as stored before it).
    pub(super) fn index_slice(inner: &mut Inner, old: Option<&Value>, new: Option<&Value>) {
        for (slice, add) in [(old, false), (new, true)] {
            let Some(slice) = slice else {
                continue;
            };
            let (_, ns, name) = super::key_of(ENDPOINTSLICE, slice);
            let Some(service) = service_of_slice(slice) else {
                continue;
            };
            let key = (ns, service.to_string());
            if add {
                inner.slices_by_service.entry(key).or_default().insert(name);
            } else if let Some(names) = inner.slices_by_service.get_mut(&key) {
                names.remove(&name);
                if names.is_empty() {
                    inner.slices_by_service.remove(&key);
                }
            }
        }
    }

    /// Brings the Endpoints of Service `name` in `ns` in line with the Service and its slices.
    pub(super) fn sync_endpoints(&self, inner: &mut Inner, (ns, name): &ServiceKey) {
        let service = inner.get(&(SERVICE, ns.clone(), name.clone()));
        let slice_names = inner.slices_by_service.get(&(ns.clone(), name.clone()));
        let slices: Vec<&Value> = slice_names
            .into_iter()
            .flatten()
            .filter_map(|slice| inner.get(&(ENDPOINTSLICE, ns.clone(), slice.clone())))
            .collect();
        let wanted = service.and_then(|service| mirror(service, &slices));
        let current = inner.copy(&(ENDPOINTS, ns.clone(), name.clone()));
        match (current, wanted) {
            (None, None) => {}
            (Some(current), None) => {
                self.commit(inner, ENDPOINTS, "DELETED", current);
            }
            (None, Some(mut wanted)) => {
                inner.uid_counter += 1;
                wanted["metadata"]["uid"] = json!(uid(inner.uid_counter));
                wanted["metadata"]["creationTimestamp"] = json!(rfc3339_now());
                self.commit(inner, ENDPOINTS, "ADDED", wanted);
            }
            (Some(current), Some(mut wanted)) => {
                if current["metadata"]["labels"] == wanted["metadata"]["labels"]
                    && current["subsets"] == wanted["subsets"]
                {
                    return;
                }
                for field in ["uid", "creationTimestamp"] {
                    wanted["metadata"][field] = current["metadata"][field].clone();
                }
                self.commit(inner, ENDPOINTS, "MODIFIED", wanted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Value {
        json!({"metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"clusterIP": "10.96.0.10", "ipFamilies": ["IPv4"], "ports": [{"port": 80}]}})
    }

    #[test]
    fn ready_not_ready_and_terminating_endpoints_by_their_ports() {
        let target = |pod: &str| json!({"kind": "Pod", "namespace": "default", "name": pod, "uid": format!("u-{pod}")});
        let a = json!({"addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.2.7"], "conditions": {"ready": true}, "nodeName": "n2", "targetRef": target("b")},
                {"addresses": ["10.244.1.5"], "nodeName": "n1", "targetRef": target("a")},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": false}, "nodeName": "n1"},
                {"addresses": ["10.244.1.9"], "conditions": {"ready": false, "terminating": true}}]});
        // A second slice with the same ports joins the same subset; another family is left out.
        let b = json!({"addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.3.1"]}]});
        let v6 = json!({"addressType": "IPv6", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::1"]}]});
        let other_ports = json!({"addressType": "IPv4", "ports": [{"port": 9090}, {"name": "all"}],
            "endpoints": [{"addresses": ["10.244.4.4"]}]});
        let endpoints = mirror(&service(), &[&a, &b, &v6, &other_ports]).unwrap();
        assert_eq!(
            endpoints,
            json!({"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
                "subsets": [
                    {"addresses": [
                        {"ip": "10.244.1.5", "nodeName": "n1", "targetRef": target("a")},
                        {"ip": "10.244.2.7", "nodeName": "n2", "targetRef": target("b")},
                        {"ip": "10.244.3.1"}],
                     "notReadyAddresses": [{"ip": "10.244.1.6", "nodeName": "n1"}],
                     "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
                    {"addresses": [{"ip": "10.244.4.4"}], "ports": [{"port": 9090, "protocol": "TCP"}]}]})
        );
    }

    #[test]
    fn no_slices_no_subsets_headless_labelled_and_external_names_none() {
        let empty = mirror(&service(), &[]).unwrap();
        assert!(empty.get("subsets").is_none(), "{empty}");
        let mut headless = service();
        headless["spec"]["clusterIP"] = json!("None");
        let endpoints = mirror(&headless, &[]).unwrap();
        assert_eq!(endpoints["metadata"]["labels"]["service.kubernetes.io/headless"], "");
        let mut external = service();
        external["spec"]["type"] = json!("ExternalName");
        assert!(mirror(&external, &[]).is_none());
        // An address ready in one slice and not in another is ready.
        let twice = |ready: bool| {
            json!({"addressType": "IPv4", "ports": [{"port": 80}],
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": ready}}]})
        };
        let (yes, no) = (twice(true), twice(false));
        let endpoints = mirror(&service(), &[&no, &yes]).unwrap();
        assert_eq!(
            endpoints["subsets"],
            json!([{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80, "protocol": "TCP"}]}])
        );
        // A dual-stack Service whose primary family is IPv6 mirrors its IPv6 slices.
        let mut v6 = service();
        v6["spec"]["ipFamilies"] = json!(["IPv6", "IPv4"]);
        let slice = json!({"addressType": "IPv6", "ports": [{"port": 80}], "endpoints": [{"addresses": ["fd00::5"]}]});
        assert_eq!(
            mirror(&v6, &[&slice, &yes]).unwrap()["subsets"][0]["addresses"],
            json!([{"ip": "fd00::5"}])
        );
    }
}
