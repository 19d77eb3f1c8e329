//! Services and EndpointSlices as the agent reads and keeps them: only the fields the service
//! table reads, parsed straight from the API's JSON.
//!
//! Why not k8s-openapi's types: they hold every field of the API (an `Endpoint` is about 340
//! bytes before its strings, a `Service` about 800, and `managedFields` often outweighs the
//! object), and at 10,000 Services most of the agent's memory went to fields it never reads,
//! most of all while the initial list was parsed. serde skips undeclared fields while parsing,
//! so what is not declared here is never allocated; of the labels and annotations only the
//! entries in [`KEPT_KEYS`] are (a `kubectl apply`'s `last-applied-configuration` annotation can
//! be as large as the object). Field names and nesting follow the API's, so the table reads
//! these as it would read the API's types.
//!
//! Two shapes per kind: [`ServiceObject`] and [`EndpointSliceObject`] are what the watches parse
//! (kube's `Resource` needs a full `ObjectMeta`, filled only with what is read); [`Service`] and
//! [`EndpointSlice`] are what the controller keeps, with a four-field [`Meta`].

use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        core::v1::SessionAffinityConfig,
        discovery::v1::{EndpointConditions, EndpointHints},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

use super::table::{LB_ALGORITHM_ANNOTATION, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};

/// The annotation the EndpointSlice controller stamps with the time of the change a slice
/// reflects (kube-proxy measures network programming latency from it).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The only label and annotation keys the agent reads, of either kind: a Service's proxy name
/// and load balancing, a slice's Service and change time.
pub const KEPT_KEYS: [&str; 4] = [
    SERVICE_PROXY_NAME_LABEL,
    LB_ALGORITHM_ANNOTATION,
    SERVICE_NAME_LABEL,
    TRIGGER_TIME_ANNOTATION,
];

/// The metadata the agent reads: the object's identity, its labels and annotations (the
/// controller keeps only the few it needs of those).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Meta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
}

/// What the watches parse of `metadata`: [`Meta`] and the resource version (the watch resumes
/// from it); `managedFields`, owner references and the rest are skipped while parsing.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchedMeta {
    // Not `#[serde(flatten)]` over `Meta`: flattening buffers every unknown field (all of
    // `managedFields`) before picking, the very allocation this module exists to avoid.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default, deserialize_with = "kept_entries")]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "kept_entries")]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    resource_version: Option<String>,
}

/// Of a labels or annotations map, the entries under [`KEPT_KEYS`] (None when there are none);
/// the other values are skipped unread.
fn kept_entries<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Kept;

    impl<'de> Visitor<'de> for Kept {
        type Value = Option<BTreeMap<String, String>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of strings, or null")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_map(Kept)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if KEPT_KEYS.contains(&key.as_str()) {
                    let value = map.next_value::<String>()?;
                    kept.insert(key, value);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok((!kept.is_empty()).then_some(kept))
        }
    }

    deserializer.deserialize_option(Kept)
}

/// A list the API may send as `null` (an EndpointSlice without endpoints comes as
/// `"endpoints": null` from API servers before Kubernetes 1.36): empty then.
fn list_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

fn watched_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let meta = WatchedMeta::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        labels: meta.labels,
        annotations: meta.annotations,
        resource_version: meta.resource_version,
        ..Default::default()
    })
}

fn meta_of(object: ObjectMeta) -> Meta {
    Meta {
        name: object.name,
        namespace: object.namespace,
        labels: object.labels,
        annotations: object.annotations,
    }
}

/// A Service, as the agent keeps it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Service {
    pub metadata: Meta,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

/// The part of a Service's spec that decides its translation.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Option<Vec<ServicePort>>,
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    #[serde(default)]
    pub external_traffic_policy: Option<String>,
    #[serde(default)]
    pub health_check_node_port: Option<i32>,
    #[serde(default)]
    pub load_balancer_source_ranges: Option<Vec<String>>,
    #[serde(default)]
    pub session_affinity: Option<String>,
    #[serde(default)]
    pub session_affinity_config: Option<SessionAffinityConfig>,
}

/// A Service's port. (`targetPort` is not read: the EndpointSlices carry each endpoint's
/// resolved port, by the Service port's name.)
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    /// Zero when absent: the table refuses it as out of range, as it refuses any bad number.
    #[serde(default)]
    pub port: i32,
    #[serde(default)]
    pub node_port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerStatus {
    #[serde(default)]
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIngress {
    #[serde(default)]
    pub ip: Option<String>,
    #[serde(default)]
    pub ip_mode: Option<String>,
}

/// An EndpointSlice, as the agent keeps it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EndpointSlice {
    pub metadata: Meta,
    pub address_type: String,
    pub endpoints: Vec<Endpoint>,
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "list_or_null")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub hints: Option<EndpointHints>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A Service as the watch parses it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceObject {
    #[serde(default, deserialize_with = "watched_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<ServiceSpec>,
    #[serde(default)]
    pub status: Option<ServiceStatus>,
}

/// An EndpointSlice as the watch parses it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceObject {
    #[serde(default, deserialize_with = "watched_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    #[serde(default, deserialize_with = "list_or_null")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}

impl From<ServiceObject> for Service {
    fn from(object: ServiceObject) -> Self {
        Self {
            metadata: meta_of(object.metadata),
            spec: object.spec,
            status: object.status,
        }
    }
}

impl From<EndpointSliceObject> for EndpointSlice {
    fn from(object: EndpointSliceObject) -> Self {
        Self {
            metadata: meta_of(object.metadata),
            address_type: object.address_type,
            endpoints: object.endpoints,
            ports: object.ports,
        }
    }
}

/// kube's `Resource` for a type that reads only part of an API kind: the kind's identity is
/// k8s-openapi's (so URLs and watches are the kind's own), the metadata the type's own.
macro_rules! resource_as {
    ($lean:ty, $api:ty) => {
        impl kube::Resource for $lean {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                <$api as kube::Resource>::kind(&())
            }

            fn group(_: &()) -> Cow<'_, str> {
                <$api as kube::Resource>::group(&())
            }

            fn version(_: &()) -> Cow<'_, str> {
                <$api as kube::Resource>::version(&())
            }

            fn plural(_: &()) -> Cow<'_, str> {
                <$api as kube::Resource>::plural(&())
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource_as!(ServiceObject, k8s_openapi::api::core::v1::Service);
resource_as!(EndpointSliceObject, k8s_openapi::api::discovery::v1::EndpointSlice);

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1, discovery::v1 as discovery};
    use kube::Resource;

    use super::*;

    #[test]
    fn the_lean_kinds_are_the_api_kinds() {
        assert_eq!(
            ServiceObject::url_path(&(), Some("ns")),
            v1::Service::url_path(&(), Some("ns"))
        );
        assert_eq!(
            EndpointSliceObject::url_path(&(), None),
            discovery::EndpointSlice::url_path(&(), None)
        );
        assert_eq!(ServiceObject::api_version(&()), "v1");
        assert_eq!(EndpointSliceObject::api_version(&()), "discovery.k8s.io/v1");
    }

    #[test]
    fn what_the_table_reads_is_parsed_and_the_rest_skipped() {
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "web", "namespace": "shop", "resourceVersion": "42", "uid": "u-1",
                "labels": {"app": "web"},
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00::5"],
                "externalIPs": ["192.0.2.1"], "selector": {"app": "web"}, "ipFamilies": ["IPv4", "IPv6"],
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30080}],
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                "internalTrafficPolicy": "Cluster", "loadBalancerSourceRanges": ["198.51.100.0/24"],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7", "ipMode": "VIP", "hostname": "lb"}]}},
        }))
        .expect("a full Service parses");
        assert_eq!(service.metadata.resource_version.as_deref(), Some("42"));
        // Of the labels, only those the agent reads.
        assert_eq!(service.metadata.labels, None);
        assert_eq!(service.metadata.uid, None);
        assert_eq!(service.metadata.managed_fields, None);
        let service = Service::from(service);
        assert_eq!(service.metadata.name.as_deref(), Some("web"));
        assert_eq!(service.metadata.namespace.as_deref(), Some("shop"));
        let spec = service.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(
            spec.cluster_ips.as_deref(),
            Some(&["10.96.0.5".to_string(), "fd00::5".to_string()][..])
        );
        assert_eq!(spec.external_ips.as_deref(), Some(&["192.0.2.1".to_string()][..]));
        assert_eq!(
            spec.ports.as_deref(),
            Some(
                &[ServicePort {
                    name: Some("http".into()),
                    protocol: Some("TCP".into()),
                    port: 80,
                    node_port: Some(30080),
                }][..]
            )
        );
        assert_eq!(spec.health_check_node_port, Some(31000));
        assert_eq!(
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref()?.timeout_seconds),
            Some(60)
        );
        let ingress = &service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref()?.ingress.clone());
        assert_eq!(
            ingress.as_deref(),
            Some(
                &[LoadBalancerIngress {
                    ip: Some("203.0.113.7".into()),
                    ip_mode: Some("VIP".into()),
                }][..]
            )
        );

        let slice: EndpointSliceObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "n1", "zone": "a", "hostname": "web-0",
                "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "shop", "uid": "p-1"},
                "hints": {"forZones": [{"name": "a"}]},
            }],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
        }))
        .expect("a full EndpointSlice parses");
        let slice = EndpointSlice::from(slice);
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints.len(), 1);
        assert_eq!(slice.endpoints[0].addresses, ["10.244.1.5"]);
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(slice.endpoints[0].conditions.as_ref().and_then(|c| c.ready), Some(true));
        assert!(slice.endpoints[0].hints.is_some());
        assert_eq!(slice.ports.as_ref().map(|p| p[0].port), Some(Some(8080)));
    }

    #[test]
    fn nulls_and_missing_fields_parse_as_absent() {
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "labels": null},
            "spec": {"ports": [{"port": 80, "nodePort": null}], "clusterIPs": null},
        }))
        .expect("parses");
        let service = Service::from(service);
        assert_eq!(service.metadata.labels, None);
        let spec = service.spec.expect("spec");
        assert_eq!(spec.cluster_ips, None);
        assert_eq!(spec.ports.expect("ports")[0].node_port, None);
        let slice: EndpointSliceObject = serde_json::from_value(serde_json::json!({"metadata": {}})).expect("parses");
        assert!(slice.endpoints.is_empty());
        // A slice without endpoints, as API servers before 1.36 send it.
        let slice: EndpointSliceObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "annotations": null},
            "addressType": "IPv4", "endpoints": null, "ports": null,
        }))
        .expect("null lists parse");
        assert!(slice.endpoints.is_empty());
        assert_eq!(slice.ports, None);
        let slice: EndpointSliceObject = serde_json::from_value(serde_json::json!({
            "addressType": "IPv4", "endpoints": [{"addresses": null}],
        }))
        .expect("null addresses parse");
        assert!(slice.endpoints[0].addresses.is_empty());
    }

    #[test]
    fn of_labels_and_annotations_only_the_read_keys_are_kept() {
        let last_applied = "x".repeat(10_000);
        let slice: EndpointSliceObject = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1",
                "labels": {"kubernetes.io/service-name": "web", "app": "web", "endpointslice.kubernetes.io/managed-by": "x"},
                "annotations": {
                    "endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T10:00:00Z",
                    "kubectl.kubernetes.io/last-applied-configuration": last_applied,
                    "nested": {"not": "a string"},
                },
            },
        }))
        .expect("parses");
        assert_eq!(
            slice.metadata.labels,
            Some([(SERVICE_NAME_LABEL.to_string(), "web".to_string())].into())
        );
        assert_eq!(
            slice.metadata.annotations,
            Some([(TRIGGER_TIME_ANNOTATION.to_string(), "2026-12-01T10:00:00Z".to_string())].into())
        );
        let service: ServiceObject = serde_json::from_value(serde_json::json!({
            "metadata": {
                "labels": {"service.kubernetes.io/service-proxy-name": "ferrynet"},
                "annotations": {"ferrynet.io/lb-algorithm": "maglev", "other": "y"},
            },
        }))
        .expect("parses");
        let service = Service::from(service);
        assert_eq!(
            service.metadata.labels,
            Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "ferrynet".to_string())].into())
        );
        assert_eq!(
            service.metadata.annotations,
            Some([(LB_ALGORITHM_ANNOTATION.to_string(), "maglev".to_string())].into())
        );
        // A value of a kept key that is not a string is refused, as the API's types refuse it.
        let bad: Result<ServiceObject, _> = serde_json::from_value(serde_json::json!({
            "metadata": {"labels": {"service.kubernetes.io/service-proxy-name": 7}},
        }));
        assert!(bad.is_err());
    }
}
