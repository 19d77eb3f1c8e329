//! The lab's EndpointSlice controller: for every Service with a selector, the slices listing the
//! pods it selects, per address family, with the conditions the real controller writes (`ready`,
//! `serving`, `terminating`) and each Service port resolved per pod (named ports through the
//! pod's container ports). Computed from the API's Services and Pods (pure), then applied.
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams},
};

use super::{Lab, api::LabApi};

/// The label that says who manages a slice; the lab touches only its own.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGER: &str = "ferrynet-lab";
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The annotation with the time of the change a slice reflects.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Whether `pod` matches every label of `selector`.
fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One Service port resolved for one pod: (name, port, protocol).
type ResolvedPort = (Option<String>, i32, String);

/// The Service's ports as `pod` serves them; `None` when a named port is not on the pod.
fn resolve_ports(service: &Service, pod: &Pod) -> Option<Vec<ResolvedPort>> {
    let spec = service.spec.as_ref()?;
    let container_ports: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .collect();
    spec.ports
        .iter()
        .flatten()
        .map(|port| {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let number = match &port.target_port {
                None => port.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => {
                    container_ports
                        .iter()
                        .find(|cp| {
                            cp.name.as_deref() == Some(name) && cp.protocol.as_deref().unwrap_or("TCP") == protocol
                        })?
                        .container_port
                }
            };
            Some((port.name.clone(), number, protocol))
        })
        .collect()
}

/// Whether the pod's `Ready` condition is true.
pub(super) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The slices the Services and Pods call for (pure).
pub fn desired_slices(services: &[Service], pods: &[Pod]) -> Vec<EndpointSlice> {
    let mut slices = Vec::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let selector = spec.selector.clone().unwrap_or_default();
        if selector.is_empty() || spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let families = spec.ip_families.clone().unwrap_or_else(|| vec!["IPv4".into()]);
        for family in families {
            let v4 = family == "IPv4";
            // Pods serving the same resolved ports share a slice, as with the real controller.
            let mut groups: BTreeMap<Vec<ResolvedPort>, Vec<Endpoint>> = BTreeMap::new();
            let mut selected: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.namespace() == service.namespace() && selects(&selector, p))
                .collect();
            selected.sort_by_key(|p| p.name_any());
            for pod in selected {
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                if matches!(phase, Some("Succeeded" | "Failed")) {
                    continue;
                }
                let Some(address) = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|ip| ip.ip.clone())
                    .find(|ip| ip.contains(':') != v4)
                else {
                    continue;
                };
                let Some(ports) = resolve_ports(service, pod) else {
                    continue;
                };
                let terminating = pod.metadata.deletion_timestamp.is_some();
                let serving = pod_ready(pod);
                groups.entry(ports).or_default().push(Endpoint {
                    addresses: vec![address],
                    conditions: Some(EndpointConditions {
                        ready: Some(serving && !terminating),
                        serving: Some(serving),
                        terminating: Some(terminating),
                    }),
                    node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                    target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                        kind: Some("Pod".into()),
                        namespace: pod.namespace(),
                        name: Some(pod.name_any()),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            if groups.is_empty() {
                // A Service without endpoints still gets an (empty) slice, as with the real
                // controller, with its ports unresolved.
                let ports = spec
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| (p.name.clone(), 0, p.protocol.clone().unwrap_or_else(|| "TCP".into())))
                    .collect();
                groups.insert(ports, Vec::new());
            }
            for (index, (ports, endpoints)) in groups.into_iter().enumerate() {
                let name = service.name_any();
                let suffix = if v4 { "v4" } else { "v6" };
                slices.push(EndpointSlice {
                    metadata: ObjectMeta {
                        name: Some(format!("{name}-{suffix}-{index}")),
                        namespace: service.namespace(),
                        labels: Some(
                            [
                                (SERVICE_NAME.to_string(), name.clone()),
                                (MANAGED_BY.to_string(), MANAGER.to_string()),
                            ]
                            .into(),
                        ),
                        ..Default::default()
                    },
                    address_type: family.clone(),
                    endpoints,
                    ports: Some(
                        ports
                            .into_iter()
                            .map(|(name, port, protocol)| EndpointPort {
                                name,
                                port: (port != 0).then_some(port),
                                protocol: Some(protocol),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                });
            }
        }
    }
    slices
}

/// Runs the EndpointSlice controller once, over every namespace: writes what changed, deletes
/// what is gone. The lab's commands and its controllers daemon both run it, so a write that lost
/// a race with the other (a conflict) is retried from a fresh read.
pub async fn sync_slices(client: &Client) -> Result<()> {
    let mut last = None;
    for _ in 0..3 {
        match sync_slices_once(client).await {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried at least once"))
}

/// Every object of kind `K`, in every namespace.
pub(super) async fn list_all<K>(client: &Client) -> Result<Vec<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    Ok(Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing {}", K::plural(&())))?
        .items)
}

async fn sync_slices_once(client: &Client) -> Result<()> {
    let services: Vec<Service> = list_all(client).await?;
    let pods: Vec<Pod> = list_all(client).await?;
    let managed = ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}"));
    let existing = Api::<EndpointSlice>::all(client.clone()).list(&managed).await?.items;
    let wanted = desired_slices(&services, &pods);
    let slices =
        |ns: Option<String>| Api::<EndpointSlice>::namespaced(client.clone(), ns.as_deref().unwrap_or("default"));
    // The time of the change a slice reflects, as the real controller stamps it (kube-proxy
    // measures network programming latency from it).
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let stamped = |slice: &EndpointSlice| {
        let mut slice = slice.clone();
        slice
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(TRIGGER_TIME.to_string(), now.clone());
        slice
    };
    let same = |a: &EndpointSlice, b: &EndpointSlice| a.name_any() == b.name_any() && a.namespace() == b.namespace();
    for slice in &wanted {
        let api = slices(slice.namespace());
        match existing.iter().find(|e| same(e, slice)) {
            Some(current) if current.endpoints == slice.endpoints && current.ports == slice.ports => {}
            Some(current) => {
                let mut updated = stamped(slice);
                updated.metadata.resource_version = current.metadata.resource_version.clone();
                api.replace(&slice.name_any(), &PostParams::default(), &updated)
                    .await
                    .with_context(|| format!("replacing EndpointSlice {}", slice.name_any()))?;
            }
            None => {
                api.create(&PostParams::default(), &stamped(slice))
                    .await
                    .with_context(|| format!("creating EndpointSlice {}", slice.name_any()))?;
            }
        }
    }
    for slice in existing {
        if !wanted.iter().any(|w| same(w, &slice)) {
            match slices(slice.namespace())
                .delete(&slice.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting EndpointSlice {}", slice.name_any())),
            }
        }
    }
    Ok(())
}

impl Lab {
    /// Runs the EndpointSlice controller once (see [`sync_slices`]).
    pub fn sync_endpoint_slices(&self) -> Result<()> {
        LabApi::new(self)?.call(|client| async move { sync_slices(&client).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, PodCondition, PodIP, PodSpec, PodStatus, ServicePort, ServiceSpec,
    };

    fn pod(name: &str, ready: bool, terminating: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                deletion_timestamp: terminating.then_some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                )),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8080,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ips: Some(vec![
                    PodIP {
                        ip: format!("10.244.1.{}", name.len()),
                    },
                    PodIP {
                        ip: format!("fd00::{}", name.len()),
                    },
                ]),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn service(target: IntOrString) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ip_families: Some(vec!["IPv4".into(), "IPv6".into()]),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(target),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn slices_carry_conditions_per_family_and_resolve_named_ports() {
        let pods = [pod("a", true, false), pod("bb", false, false), pod("ccc", true, true)];
        let slices = desired_slices(&[service(IntOrString::String("http".into()))], &pods);
        assert_eq!(slices.len(), 2);
        let v4 = &slices[0];
        assert_eq!(v4.address_type, "IPv4");
        assert_eq!(v4.ports.as_ref().unwrap()[0].port, Some(8080));
        let conditions: Vec<(bool, bool, bool)> = v4
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
            })
            .collect();
        // Ready; not ready; terminating (still serving, not ready).
        assert_eq!(
            conditions,
            [(true, true, false), (false, false, false), (false, true, true)]
        );
        assert_eq!(slices[1].endpoints[0].addresses, ["fd00::1"]);
        // A named port no pod has: no endpoints, one empty slice per family.
        let none = desired_slices(&[service(IntOrString::String("grpc".into()))], &pods);
        assert!(none.iter().all(|s| s.endpoints.is_empty()), "{none:?}");
    }
}
