//! The lab's control plane and kubelets, as one daemon (`ferrynet-lab controllers`, in the
//! control-plane namespace): the parts of a cluster the lab has no binaries for, so that the
//! commands a Kubernetes user types work against the lab.
//!
//! - **Deployment controller** (apps/v1): keeps `spec.replicas` pods of the template (its labels,
//!   plus `pod-template-hash`), replaces deleted ones, scales up and down, replaces the pods of
//!   an older template once the new ones are ready, and reports the status `kubectl get
//!   deployments` prints. The lab has no ReplicaSets: a Deployment owns its pods directly.
//! - **Garbage collector**: pods owned by a Deployment that is gone are deleted.
//! - **Scheduler**: a pod without a node goes to the Ready node (matching its `nodeSelector`)
//!   with the fewest pods, so pods spread.
//! - **Kubelets** (one per node, see [`super::kubelet`]).
//! - **EndpointSlice controller** (see [`super::endpoints`]) and the **cluster DNS** records
//!   (see [`super::dns`]).
//!
//! Every pass reads the whole state and converges on it (level-triggered), after any change the
//! API reports, and every two seconds (container exits, readiness, a node's CNI configuration
//! appearing). The EndpointSlices and DNS records, derived from every Service and Pod, are
//! synced when a Service or Pod changed, while a pod is terminating, and every
//! [`ENDPOINTS_RESYNC`] whatever happened (repairing a slice something else changed).
use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentCondition, DeploymentStatus},
        core::v1::{Node, Pod, Service},
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;

use super::{
    Lab,
    endpoints::{list_all, pod_ready},
    kubelet::{PodChange, pod_part},
};

const TEMPLATE_HASH: &str = "pod-template-hash";
const RESYNC: Duration = Duration::from_secs(2);
/// How often the EndpointSlices and DNS records are synced with no Service or Pod change.
const ENDPOINTS_RESYNC: Duration = Duration::from_secs(60);

/// A short, stable hash of a pod template, as `pod-template-hash` (FNV-1a, 10 hex digits).
pub fn template_hash(deployment: &Deployment) -> String {
    let template = deployment
        .spec
        .as_ref()
        .map(|s| serde_json::to_string(&s.template).unwrap_or_default())
        .unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in template.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:010x}", hash & 0xff_ffff_ffff)
}

/// Five characters for a pod's name, from the alphabet Kubernetes uses (no vowels, no
/// look-alikes), different at every call.
fn name_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos
        ^ (COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15))
        ^ u64::from(std::process::id());
    (0..5)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(ALPHABET[(x % ALPHABET.len() as u64) as usize])
        })
        .collect()
}

fn owned_by(pod: &Pod, uid: &str) -> bool {
    pod.owner_references().iter().any(|o| o.uid == uid)
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// What a Deployment needs done (pure).
#[derive(Debug, Default)]
pub struct DeploymentPlan {
    pub create: Vec<Pod>,
    /// Pods to delete (gracefully), by name.
    pub delete: Vec<String>,
    pub status: DeploymentStatus,
}

/// The pods a Deployment wants created and deleted, and the status it reports, given every pod
/// of its namespace (pure).
pub fn plan_deployment(deployment: &Deployment, pods: &[Pod]) -> DeploymentPlan {
    let mut plan = DeploymentPlan::default();
    let Some(spec) = &deployment.spec else { return plan };
    let uid = deployment.metadata.uid.clone().unwrap_or_default();
    let wanted = usize::try_from(spec.replicas.unwrap_or(1).max(0)).unwrap_or(0);
    let hash = template_hash(deployment);
    let mut owned: Vec<&Pod> = pods.iter().filter(|p| owned_by(p, &uid) && !terminating(p)).collect();
    owned.sort_by_key(|p| p.name_any());
    // A finished pod of a Deployment (restartPolicy Always makes this rare) is replaced.
    plan.delete
        .extend(owned.iter().filter(|p| finished(p)).map(|p| p.name_any()));
    owned.retain(|p| !finished(p));
    let current_template = |p: &&&Pod| p.labels().get(TEMPLATE_HASH) == Some(&hash);
    let (current, old): (Vec<&Pod>, Vec<&Pod>) = owned.iter().partition(|p| current_template(p));
    let current_ready = current.iter().filter(|p| pod_ready(p)).count();
    if current.len() < wanted {
        for _ in current.len()..wanted {
            plan.create.push(pod_from_template(deployment, &hash));
        }
    } else if current.len() > wanted {
        // Scale down: not-ready pods go first, then the newest names (stable choice).
        let mut victims = current.clone();
        victims.sort_by_key(|p| (pod_ready(p), std::cmp::Reverse(p.name_any())));
        plan.delete
            .extend(victims.iter().take(current.len() - wanted).map(|p| p.name_any()));
    }
    // Pods of an older template go once the new template's are all ready (a rollout that never
    // leaves the Service without ready pods).
    if current_ready >= wanted {
        plan.delete.extend(old.iter().map(|p| p.name_any()));
    }
    let total = i32::try_from(owned.len()).unwrap_or(i32::MAX);
    let ready_count = i32::try_from(owned.iter().filter(|p| pod_ready(p)).count()).unwrap_or(i32::MAX);
    let available = ready_count >= i32::try_from(wanted).unwrap_or(i32::MAX);
    plan.status = DeploymentStatus {
        observed_generation: deployment.metadata.generation,
        replicas: Some(total),
        updated_replicas: Some(i32::try_from(current.len()).unwrap_or(i32::MAX)),
        ready_replicas: Some(ready_count),
        available_replicas: Some(ready_count),
        unavailable_replicas: Some((i32::try_from(wanted).unwrap_or(i32::MAX) - ready_count).max(0)),
        conditions: Some(vec![DeploymentCondition {
            type_: "Available".into(),
            status: if available { "True" } else { "False" }.into(),
            reason: Some(
                if available {
                    "MinimumReplicasAvailable"
                } else {
                    "MinimumReplicasUnavailable"
                }
                .into(),
            ),
            message: Some(format!("{ready_count} of {wanted} replicas ready")),
            ..Default::default()
        }]),
        ..Default::default()
    };
    plan
}

/// A new pod of a Deployment's template: its labels plus `pod-template-hash`, owned by the
/// Deployment, named as the real controllers name them.
fn pod_from_template(deployment: &Deployment, hash: &str) -> Pod {
    let template = deployment.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(TEMPLATE_HASH.into(), hash.into());
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}-{}", deployment.name_any(), name_suffix())),
            namespace: deployment.namespace(),
            labels: Some(labels),
            annotations: template.metadata.as_ref().and_then(|m| m.annotations.clone()),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: deployment.name_any(),
                uid: deployment.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }
}

/// Pods owned by a Deployment that no longer exists (pure): the garbage collector's work.
pub fn orphaned_pods<'a>(deployments: &[Deployment], pods: &'a [Pod]) -> Vec<&'a Pod> {
    pods.iter()
        .filter(|p| !terminating(p))
        .filter(|p| {
            let owners: Vec<&OwnerReference> = p.owner_references().iter().filter(|o| o.kind == "Deployment").collect();
            !owners.is_empty()
                && owners.iter().all(|o| {
                    !deployments
                        .iter()
                        .any(|d| d.metadata.uid.as_deref() == Some(o.uid.as_str()))
                })
        })
        .collect()
}

/// Where the scheduler puts each pod that has no node yet (pure): the Ready node matching its
/// `nodeSelector` with the fewest pods, ties to the first by name.
pub fn schedule(pods: &[Pod], nodes: &[Node]) -> Vec<(String, String, String)> {
    let node_ready = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    };
    let mut load: BTreeMap<String, usize> = nodes
        .iter()
        .filter(|n| node_ready(n))
        .map(|n| (n.name_any(), 0))
        .collect();
    for pod in pods.iter().filter(|p| !finished(p)) {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref())
            && let Some(count) = load.get_mut(node)
        {
            *count += 1;
        }
    }
    let mut bindings = Vec::new();
    let mut unscheduled: Vec<&Pod> = pods
        .iter()
        .filter(|p| !terminating(p) && p.spec.as_ref().is_some_and(|s| s.node_name.is_none()))
        .collect();
    unscheduled.sort_by_key(|p| (p.namespace(), p.name_any()));
    for pod in unscheduled {
        let selector = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_selector.clone())
            .unwrap_or_default();
        let fits = |name: &str| {
            nodes.iter().find(|n| n.name_any() == name).is_some_and(|n| {
                let labels = n.labels();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
        };
        let Some(node) = load
            .iter()
            .filter(|(name, _)| fits(name))
            .min_by_key(|(name, count)| (**count, (*name).clone()))
            .map(|(name, _)| name.clone())
        else {
            continue;
        };
        *load.get_mut(&node).expect("from the map") += 1;
        bindings.push((
            pod.namespace().unwrap_or_else(|| "default".into()),
            pod.name_any(),
            node,
        ));
    }
    bindings
}

fn pods_in(client: &Client, namespace: &str) -> Api<Pod> {
    Api::namespaced(client.clone(), namespace)
}

/// Runs the controllers until killed.
pub fn run(lab_name: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let lab_name = lab_name.to_string();
    runtime.block_on(async move {
        let kubeconfig = Lab::open(&lab_name)?.kubeconfig();
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig)?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        let client = Client::try_from(config)?;
        let changed = std::sync::Arc::new(tokio::sync::Notify::new());
        let endpoint_inputs = std::sync::Arc::new(AtomicU64::new(0));
        spawn_watch::<Pod>(&client, &changed, Some(&endpoint_inputs));
        spawn_watch::<Deployment>(&client, &changed, None);
        spawn_watch::<Service>(&client, &changed, Some(&endpoint_inputs));
        spawn_watch::<Node>(&client, &changed, None);
        let mut endpoints_synced = EndpointsSynced {
            inputs: endpoint_inputs,
            at: None,
        };
        let mut last_error = String::new();
        loop {
            // An error is logged when it changes, not at every pass.
            let error = pass(&lab_name, &client, &mut endpoints_synced)
                .await
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            if error != last_error && !error.is_empty() {
                eprintln!("controllers: {error}");
            }
            last_error = error;
            let _ = tokio::time::timeout(RESYNC, changed.notified()).await;
        }
    })
}

/// How far the EndpointSlice controller and the DNS records have followed the Services and
/// Pods.
///
/// They are derived from every Service and Pod, and listing thousands of Services at every pass
/// loaded the API stand-in (and both cores) every 2 s, which stalled whatever else the lab was
/// doing: a benchmark's single endpoint changes waited up to 400 ms for their writes. As the
/// real controllers work from their informers' events, these run only when a Service or Pod
/// changed (a watch that relists counts as a change).
struct EndpointsSynced {
    /// Watch events of Services and Pods so far.
    inputs: std::sync::Arc<AtomicU64>,
    /// `inputs` as it was when the last sync that succeeded began, and when that was.
    at: Option<(u64, std::time::Instant)>,
}

/// Wakes the controllers whenever objects of kind `K` change, counting the events in `counted`.
fn spawn_watch<K>(
    client: &Client,
    changed: &std::sync::Arc<tokio::sync::Notify>,
    counted: Option<&std::sync::Arc<AtomicU64>>,
) where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let changed = changed.clone();
    let counted = counted.cloned();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Some(event) = events.next().await {
            if event.is_ok() {
                if let Some(counted) = &counted {
                    // Counted before the wake, so the pass it wakes sees the change as due.
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                changed.notify_one();
            } else {
                // The API stand-in is away: the watcher retries; do not spin meanwhile.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
}

/// One pass of every controller over the whole state. A failing step does not stop the others.
async fn pass(lab_name: &str, client: &Client, endpoints: &mut EndpointsSynced) -> Result<()> {
    let lab = Lab::open(lab_name)?;
    let mut errors = Vec::new();
    // Read before anything is listed: a change that lands during the pass is due at the next.
    let inputs = endpoints.inputs.load(Ordering::SeqCst);
    let endpoints_due = endpoints
        .at
        .is_none_or(|(seen, when)| seen != inputs || when.elapsed() >= ENDPOINTS_RESYNC);
    let pods: Vec<Pod> = list_all(client).await?;
    let nodes: Vec<Node> = list_all(client).await?;
    // Without the Deployments, neither the Deployment controller nor the garbage collector can
    // tell what is owned: both wait for the next pass.
    let deployments = match list_all::<Deployment>(client).await {
        Ok(list) => list,
        Err(e) => {
            errors.push(format!("{e:#}"));
            Vec::new()
        }
    };
    let deployments_known = errors.is_empty();
    for deployment in &deployments {
        let namespace = deployment.namespace().unwrap_or_else(|| "default".into());
        if let Err(e) = sync_deployment(client, deployment, &namespace, &pods).await {
            errors.push(format!("deployment {namespace}/{}: {e:#}", deployment.name_any()));
        }
    }
    for pod in orphaned_pods(&deployments, &pods)
        .into_iter()
        .filter(|_| deployments_known)
    {
        let namespace = pod.namespace().unwrap_or_else(|| "default".into());
        if let Err(e) = delete_pod(client, &namespace, &pod.name_any(), None).await {
            errors.push(format!("collecting pod {namespace}/{}: {e:#}", pod.name_any()));
        }
    }
    // Pods bound to a node that is gone go too (the pod garbage collector's job).
    for pod in &pods {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref())
            && !nodes.iter().any(|n| &n.name_any() == node)
        {
            let namespace = pod.namespace().unwrap_or_else(|| "default".into());
            if let Err(e) = delete_pod(client, &namespace, &pod.name_any(), Some(0)).await {
                errors.push(format!(
                    "collecting pod {namespace}/{} of gone node {node}: {e:#}",
                    pod.name_any()
                ));
            }
        }
    }
    for (namespace, name, node) in schedule(&pods, &nodes) {
        let patch = json!({"spec": {"nodeName": node}});
        if let Err(e) = pods_in(client, &namespace)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            errors.push(format!("binding pod {namespace}/{name} to {node}: {e}"));
        }
    }
    // A terminating pod leaves its Services' endpoints (as terminating) before its kubelet stops
    // it, so that new connections stop going to it first.
    if pods.iter().any(terminating)
        && let Err(e) = super::endpoints::sync_slices(client).await
    {
        errors.push(format!("endpoint slices: {e:#}"));
    }
    for pod in &pods {
        let namespace = pod.namespace().unwrap_or_else(|| "default".into());
        let name = pod.name_any();
        // The lab's own pods are run by its commands.
        if namespace == "default" && lab.state.pods.iter().any(|p| p.name == name) {
            continue;
        }
        let change = tokio::task::block_in_place(|| lab.kubelet_sync_pod(pod));
        let result = match change {
            Ok(None) => Ok(()),
            Ok(Some(PodChange::Status(status))) => pods_in(client, &namespace)
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": status})),
                )
                .await
                .map(|_| ())
                .context("writing its status"),
            Ok(Some(PodChange::FinishDeletion)) => delete_pod(client, &namespace, &name, Some(0)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            errors.push(format!("kubelet, pod {}: {e:#}", pod_part(&namespace, &name)));
        }
    }
    errors.extend(tokio::task::block_in_place(|| lab.kubelet_remove_orphans(&pods)));
    if endpoints_due {
        let mut synced = true;
        if let Err(e) = super::endpoints::sync_slices(client).await {
            errors.push(format!("endpoint slices: {e:#}"));
            synced = false;
        }
        match list_all::<Service>(client).await {
            Ok(services) => {
                if let Err(e) = lab.write_dns_records(&services) {
                    errors.push(format!("DNS records: {e:#}"));
                    synced = false;
                }
            }
            Err(e) => {
                errors.push(format!("{e:#}"));
                synced = false;
            }
        }
        // A failed sync is tried again at the next pass (at most RESYNC away).
        if synced {
            endpoints.at = Some((inputs, std::time::Instant::now()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", errors.join("\n"))
    }
}

async fn sync_deployment(client: &Client, deployment: &Deployment, namespace: &str, pods: &[Pod]) -> Result<()> {
    let plan = plan_deployment(deployment, pods);
    let api = pods_in(client, namespace);
    for pod in &plan.create {
        api.create(&PostParams::default(), pod)
            .await
            .with_context(|| format!("creating pod {}", pod.name_any()))?;
    }
    for name in &plan.delete {
        delete_pod(client, namespace, name, None).await?;
    }
    if deployment.status.as_ref() != Some(&plan.status) {
        Api::<Deployment>::namespaced(client.clone(), namespace)
            .patch_status(
                &deployment.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": plan.status})),
            )
            .await
            .context("writing its status")?;
    }
    Ok(())
}

/// Deletes a pod: gracefully (its kubelet finishes it), or at once with a grace period of 0.
/// One already gone is fine.
async fn delete_pod(client: &Client, namespace: &str, name: &str, grace: Option<u32>) -> Result<()> {
    let params = DeleteParams {
        grace_period_seconds: grace,
        ..Default::default()
    };
    match pods_in(client, namespace).delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting pod {namespace}/{name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::{
        apps::v1::DeploymentSpec,
        core::v1::{Container, NodeCondition, NodeStatus, PodCondition, PodSpec, PodStatus, PodTemplateSpec},
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn deployment(replicas: i32, image: &str) -> Deployment {
        let labels: BTreeMap<String, String> = [("app".to_string(), "demo".to_string())].into();
        Deployment {
            metadata: ObjectMeta {
                name: Some("demo".into()),
                namespace: Some("default".into()),
                uid: Some("d1".into()),
                generation: Some(2),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                selector: LabelSelector {
                    match_labels: Some(labels.clone()),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "nginx".into(),
                            image: Some(image.into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            status: None,
        }
    }

    fn with_state(mut pod: Pod, node: &str, is_ready: bool) -> Pod {
        pod.spec.get_or_insert_with(Default::default).node_name = Some(node.into());
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if is_ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        pod
    }

    fn node(name: &str, is_ready: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("kubernetes.io/hostname".to_string(), name.to_string())].into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if is_ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_deployment_creates_owned_labelled_pods_and_scales_down_not_ready_ones_first() {
        let d = deployment(3, "nginx");
        let plan = plan_deployment(&d, &[]);
        assert_eq!(plan.create.len(), 3);
        let pod = &plan.create[0];
        let hash = template_hash(&d);
        assert!(
            pod.name_any().starts_with(&format!("demo-{hash}-"))
                && pod.name_any().len() == "demo-".len() + 10 + "-".len() + 5
        );
        assert_eq!(pod.labels()["app"], "demo");
        assert_eq!(pod.labels()[TEMPLATE_HASH], hash);
        assert_eq!(pod.owner_references()[0].uid, "d1");
        let names: std::collections::BTreeSet<String> = plan.create.iter().map(|p| p.name_any()).collect();
        assert_eq!(names.len(), 3, "every pod gets a name of its own");
        // Running: nothing to do, and the status says 2 of 3 ready.
        let pods: Vec<Pod> = plan
            .create
            .iter()
            .enumerate()
            .map(|(i, p)| with_state(p.clone(), "n1", i != 1))
            .collect();
        let steady = plan_deployment(&d, &pods);
        assert!(steady.create.is_empty() && steady.delete.is_empty());
        assert_eq!(steady.status.ready_replicas, Some(2));
        assert_eq!(steady.status.replicas, Some(3));
        // Scaled to 2: the not-ready pod goes.
        let down = plan_deployment(&deployment(2, "nginx"), &pods);
        assert_eq!(down.delete, [pods[1].name_any()]);
        // A deleted pod is replaced.
        let replaced = plan_deployment(&d, &pods[..2]);
        assert_eq!(replaced.create.len(), 1);
    }

    #[test]
    fn a_new_template_replaces_old_pods_only_once_the_new_ones_are_ready() {
        let old = deployment(1, "nginx");
        let old_pod = with_state(plan_deployment(&old, &[]).create.remove(0), "n1", true);
        let new = deployment(1, "nginx:1.27");
        let plan = plan_deployment(&new, std::slice::from_ref(&old_pod));
        assert_eq!(plan.create.len(), 1);
        assert!(plan.delete.is_empty(), "the old pod serves until the new one is ready");
        let new_pod = with_state(plan.create[0].clone(), "n2", true);
        let plan = plan_deployment(&new, &[old_pod.clone(), new_pod]);
        assert_eq!(plan.delete, [old_pod.name_any()]);
    }

    #[test]
    fn pods_of_a_deleted_deployment_are_collected_and_others_are_not() {
        let d = deployment(1, "nginx");
        let owned = plan_deployment(&d, &[]).create.remove(0);
        let mut bare = owned.clone();
        bare.metadata.owner_references = None;
        let pods = [owned, bare];
        assert!(orphaned_pods(std::slice::from_ref(&d), &pods).is_empty());
        let orphans = orphaned_pods(&[], &pods);
        assert_eq!(orphans.len(), 1);
        assert!(!orphans[0].owner_references().is_empty());
    }

    #[test]
    fn the_scheduler_spreads_pods_over_ready_nodes_and_honours_node_selectors() {
        let nodes = [node("n1", true), node("n2", true), node("n3", false)];
        let d = deployment(4, "nginx");
        let mut pods = plan_deployment(&d, &[]).create;
        pods[0] = with_state(pods[0].clone(), "n1", true);
        let bindings = schedule(&pods, &nodes);
        let on: Vec<&str> = bindings.iter().map(|(_, _, n)| n.as_str()).collect();
        assert_eq!(on.len(), 3);
        assert_eq!(on.iter().filter(|n| **n == "n2").count(), 2, "{on:?}");
        assert!(!on.contains(&"n3"), "never to a node that is not ready");
        let mut pinned = plan_deployment(&d, &[]).create.remove(0);
        pinned.spec.as_mut().unwrap().node_selector =
            Some([("kubernetes.io/hostname".to_string(), "n1".to_string())].into());
        assert_eq!(schedule(&[pinned], &nodes)[0].2, "n1");
        let mut nowhere = plan_deployment(&d, &[]).create.remove(0);
        nowhere.spec.as_mut().unwrap().node_selector = Some([("disk".to_string(), "ssd".to_string())].into());
        assert!(schedule(&[nowhere], &nodes).is_empty(), "stays pending");
    }
}
