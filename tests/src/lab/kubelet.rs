//! The lab's kubelet, for pods that Kubernetes users create (`kubectl run`, Deployments): for a
//! pod bound to one of the lab's nodes it makes the pod's network namespace, runs the node's real
//! `ferrynet` CNI exactly as a runtime does, starts the container's program (see [`images`]) in
//! the pod's namespace and cgroup, and reports the pod's status (IPs, host IP, Ready) as a kubelet
//! does. A pod's deletion stops its program (SIGTERM, then SIGKILL), runs CNI DEL, and finishes
//! the deletion in the API.
//!
//! Pods that the lab's own commands run (`ferrynet-lab run-pod`, [`Lab::run_pod`]) are created
//! running, and this kubelet leaves them alone: it adopts only pods that no one started yet (no
//! `status.phase`), and keeps a record of each one it runs in `<lab>/kubelet/`.
//!
//! [`images`]: super::images
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, HostIP,
    Pod, PodCondition, PodIP, PodStatus,
};
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Lab,
    images::{self, Program},
    kernel_fs::{join_cgroup, with_resolv_conf},
    topology::ns_name,
};
use crate::{binary, netns::Netns};

/// The ClusterIPs of the lab's DNS Service (`kube-system/kube-dns`), as kubeadm's defaults.
pub const DNS_V4: &str = "10.96.0.10";
pub const DNS_V6: &str = "fd00:96::a";
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A pod this kubelet runs, as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub container_id: String,
    pub ips: Vec<IpAddr>,
    /// The CNI result, kept for DEL as a runtime keeps it.
    pub result: Value,
    /// The network configuration ADD ran with, kept for DEL (as libcni's cache keeps it): the
    /// node's conflist may be gone or changed by then.
    #[serde(default)]
    pub conflist: Value,
    /// Why the container cannot run (its image), if it cannot.
    pub image_error: Option<String>,
    pub started_at: String,
    /// How the container ended, once it has: (exit code, reason).
    pub finished: Option<(i32, String)>,
    pub restarts: i32,
}

/// What the kubelet wants done to a pod in the API.
#[derive(Debug)]
pub enum PodChange {
    /// Write this status.
    Status(Box<PodStatus>),
    /// The pod is gone from the node: finish its deletion (grace period 0).
    FinishDeletion,
}

/// The lab-namespace part of a pod (`pod-<name>` for the `default` namespace, as the lab's own
/// pods, and `pod-<namespace>_<name>` for the others: an underscore is in no namespace or pod
/// name (DNS labels and subdomains), so two pods never share a part).
pub fn pod_part(namespace: &str, name: &str) -> String {
    if namespace == "default" {
        format!("pod-{name}")
    } else {
        format!("pod-{namespace}_{name}")
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn condition(kind: &str, ok: bool, message: Option<String>) -> PodCondition {
    PodCondition {
        type_: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        message,
        last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        )),
        ..Default::default()
    }
}

/// The resolver configuration of pods in `namespace`, as kubelet writes it with
/// `dnsPolicy: ClusterFirst`.
pub fn resolv_conf(namespace: &str) -> String {
    format!(
        "nameserver {DNS_V4}\nsearch {namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\noptions ndots:5\n"
    )
}

/// The container's name and image (the lab runs a pod's first container).
fn container_of(pod: &Pod) -> (String, String) {
    let container = pod.spec.as_ref().and_then(|s| s.containers.first());
    (
        container.map(|c| c.name.clone()).unwrap_or_default(),
        container.and_then(|c| c.image.clone()).unwrap_or_default(),
    )
}

/// The status of a pod whose sandbox could not be made: pending, its container creating, with
/// the runtime's error, as `kubectl describe` shows a `FailedCreatePodSandBox`.
pub fn sandbox_failed_status(pod: &Pod, host_ip: &str, error: &str) -> PodStatus {
    let (name, image) = container_of(pod);
    let message = format!("Failed to create pod sandbox: {error}");
    PodStatus {
        phase: Some("Pending".into()),
        host_ip: Some(host_ip.into()),
        host_ips: Some(vec![HostIP { ip: host_ip.into() }]),
        conditions: Some(vec![
            condition("PodScheduled", true, None),
            condition("PodReadyToStartContainers", false, Some(message.clone())),
            condition("Ready", false, None),
        ]),
        container_statuses: Some(vec![ContainerStatus {
            name,
            image,
            image_id: String::new(),
            ready: false,
            restart_count: 0,
            started: Some(false),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: Some(message),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The status of a pod whose sandbox exists (pure): running and ready, running and not ready yet,
/// finished, or waiting on an image the lab cannot run.
pub fn pod_status(pod: &Pod, record: &PodRecord, host_ip: &str, ready: bool) -> PodStatus {
    let (name, image) = container_of(pod);
    let (phase, state, container_ready) = match (&record.image_error, &record.finished) {
        (Some(why), _) => (
            "Pending",
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ErrImagePull".into()),
                    message: Some(why.clone()),
                }),
                ..Default::default()
            },
            false,
        ),
        (None, Some((code, reason))) => (
            if *code == 0 { "Succeeded" } else { "Failed" },
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *code,
                    reason: Some(reason.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            false,
        ),
        (None, None) => (
            "Running",
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: record
                        .started_at
                        .parse()
                        .ok()
                        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
                }),
                ..Default::default()
            },
            ready,
        ),
    };
    PodStatus {
        phase: Some(phase.into()),
        host_ip: Some(host_ip.into()),
        host_ips: Some(vec![HostIP { ip: host_ip.into() }]),
        pod_ip: record.ips.first().map(ToString::to_string),
        pod_ips: Some(record.ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
        start_time: record
            .started_at
            .parse()
            .ok()
            .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
        conditions: Some(vec![
            condition("PodScheduled", true, None),
            condition("PodReadyToStartContainers", true, None),
            condition("Initialized", true, None),
            condition("ContainersReady", container_ready, None),
            condition("Ready", container_ready, None),
        ]),
        container_statuses: Some(vec![ContainerStatus {
            name,
            image,
            image_id: String::new(),
            container_id: Some(format!("lab://{}", record.container_id)),
            ready: container_ready,
            restart_count: record.restarts,
            started: Some(record.image_error.is_none() && record.finished.is_none()),
            state: Some(state),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// Whether two statuses say the same thing, leaving out the transition times (so that the
/// kubelet writes only what changed).
pub fn same_status(a: &PodStatus, b: &PodStatus) -> bool {
    let strip = |s: &PodStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_transition_time = None;
            c.last_probe_time = None;
        }
        s
    };
    strip(a) == strip(b)
}

impl Lab {
    fn kubelet_dir(&self) -> PathBuf {
        self.dir.join("kubelet")
    }

    fn record_path(&self, namespace: &str, name: &str) -> PathBuf {
        self.kubelet_dir().join(format!("{}.json", pod_part(namespace, name)))
    }

    /// A directory of the pod's own, for its program's files (nginx's configuration and pid).
    fn pod_dir(&self, part: &str) -> PathBuf {
        self.kubelet_dir().join(part)
    }

    /// The pods this kubelet runs.
    pub fn kubelet_records(&self) -> Vec<PodRecord> {
        std::fs::read_dir(self.kubelet_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect()
    }

    fn save_record(&self, record: &PodRecord) -> Result<()> {
        std::fs::create_dir_all(self.kubelet_dir())?;
        let path = self.record_path(&record.namespace, &record.name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The cgroup of a pod's processes: one of its own under its node's.
    pub(super) fn pod_part_cgroup(&self, node: &str, part: &str) -> Result<PathBuf> {
        Ok(self.node_cgroup(node)?.join(part))
    }

    /// The resolver configuration file for pods of `namespace` (written when missing).
    pub fn resolv_conf_path(&self, namespace: &str) -> Result<PathBuf> {
        let dir = self.dir.join("resolv");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{namespace}.conf"));
        if !path.exists() {
            std::fs::write(&path, resolv_conf(namespace))?;
        }
        Ok(path)
    }

    /// The node a kubelet-run pod lives on, and its namespace, by lab part (`pod-...`).
    pub(super) fn kubelet_pod(&self, part: &str) -> Option<PodRecord> {
        self.kubelet_records()
            .into_iter()
            .find(|r| pod_part(&r.namespace, &r.name) == part)
    }

    /// Makes a pod's network: its namespace, then the node's CNI, run exactly as a runtime runs
    /// it. Returns the CNI result and the pod's addresses; leaves nothing behind on failure.
    pub(super) fn sandbox_add(
        &self,
        node: &str,
        part: &str,
        container_id: &str,
        namespace: &str,
        name: &str,
    ) -> Result<(Value, Value, Vec<IpAddr>)> {
        let node_ns = self.node_ns(node)?;
        let conflist_path = self.node_dir(node).join("cni-conf").join(super::CONFLIST);
        let conflist: Value = serde_json::from_slice(&std::fs::read(&conflist_path).map_err(|e| {
            anyhow!(
                "no network: node {node} has no CNI configuration ({}: {e})",
                conflist_path.display()
            )
        })?)
        .with_context(|| format!("{} is not JSON", conflist_path.display()))?;
        let pod_ns = Netns::create_named(&ns_name(&self.state.name, part))?;
        let runtime = crate::cni::Runtime {
            host: &node_ns,
            plugin_dirs: vec![self.node_dir(node).join("cni-bin")],
        };
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
        );
        let result = match runtime.add(
            &crate::cni::Conflist(conflist.clone()),
            container_id,
            &pod_ns.path(),
            "eth0",
            &Value::Null,
            Some(&args),
        ) {
            Ok(r) => r,
            Err(out) => {
                let _ = Command::new("ip").args(["netns", "del", &pod_ns.name]).output();
                anyhow::bail!("CNI ADD failed: {}{}", out.stdout, out.stderr);
            }
        };
        let ips = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        Ok((conflist, result, ips))
    }

    /// Removes a pod's network: CNI DEL with the configuration ADD ran with and its cached
    /// result, then its namespace. The namespace goes even when DEL fails (the error is
    /// returned).
    pub(super) fn sandbox_del(
        &self,
        node: &str,
        part: &str,
        container_id: &str,
        conflist: &Value,
        result: &Value,
    ) -> Result<()> {
        let pod_ns = ns_name(&self.state.name, part);
        let del = (|| -> Result<()> {
            let node_ns = self.node_ns(node)?;
            let runtime = crate::cni::Runtime {
                host: &node_ns,
                plugin_dirs: vec![self.node_dir(node).join("cni-bin")],
            };
            runtime
                .del(
                    &crate::cni::Conflist(conflist.clone()),
                    container_id,
                    Some(std::path::Path::new(&format!("/run/netns/{pod_ns}"))),
                    "eth0",
                    &Value::Null,
                    Some(result),
                )
                .map_err(|out| anyhow!("CNI DEL failed: {}{}", out.stdout, out.stderr))
        })();
        let _ = Command::new("ip").args(["netns", "del", &pod_ns]).output();
        del
    }

    /// Starts the container's program in the pod's namespace and cgroup, with the pod's resolver
    /// configuration.
    fn start_container(&self, record: &PodRecord, program: &Program) -> Result<()> {
        let part = pod_part(&record.namespace, &record.name);
        let pod_dir = self.pod_dir(&part);
        std::fs::create_dir_all(&pod_dir)?;
        let argv: Vec<String> = match program {
            Program::Nginx => {
                let conf = pod_dir.join("nginx.conf");
                std::fs::write(&conf, images::nginx_config(&pod_dir))?;
                vec![
                    "/usr/sbin/nginx".into(),
                    "-c".into(),
                    conf.display().to_string(),
                    "-e".into(),
                    "stderr".into(),
                ]
            }
            Program::Command(argv) => argv.clone(),
            Program::Dnsmasq => super::dns::dnsmasq_argv(&self.dns_hosts_dir()),
            Program::PodServer => {
                let mut argv = vec![
                    binary("ferrynet-lab").display().to_string(),
                    "pod-server".into(),
                    "--name".into(),
                    record.name.clone(),
                    "--node".into(),
                    record.node.clone(),
                    "--port".into(),
                    super::POD_PORT.to_string(),
                ];
                for ip in &record.ips {
                    argv.extend(["--ip".into(), ip.to_string()]);
                }
                argv
            }
        };
        let (program, args) = argv.split_first().ok_or_else(|| anyhow!("an empty command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir("/");
        if self.state.dns {
            with_resolv_conf(&mut cmd, &self.resolv_conf_path(&record.namespace)?)?;
        }
        let cgroup = self.pod_part_cgroup(&record.node, &part)?;
        std::fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        join_cgroup(&mut cmd, &cgroup)?;
        let ns = self.ns(&part)?;
        self.spawn_command(&ns, &part, cmd)?;
        Ok(())
    }

    /// Whether the container answers on its declared ports (TCP), within `timeout`: its
    /// readiness, as a TCP probe would see it. A container that declares no port is ready once
    /// it runs.
    fn container_ready(&self, pod: &Pod, record: &PodRecord, timeout: Duration) -> bool {
        let ports: Vec<u16> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.first())
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect();
        let Some(ip) = record.ips.first().copied() else {
            return false;
        };
        let Ok(ns) = self.ns(&pod_part(&record.namespace, &record.name)) else {
            return false;
        };
        ports.iter().all(|port| {
            crate::wait_for(timeout, || {
                ferrynet_kernel::netns::run_in(ns.fd(), || {
                    TcpStream::connect_timeout(&SocketAddr::new(ip, *port), Duration::from_millis(200))
                })
                .ok()
                .map(|_| ())
            })
            .is_some()
        })
    }

    /// Tears down what the kubelet made for a pod: its program, its network, its cgroup, its
    /// directory and its record. Keeps going past failures and reports them all.
    pub(super) fn kubelet_teardown(&self, record: &PodRecord) -> Result<()> {
        let part = pod_part(&record.namespace, &record.name);
        let mut errors = Vec::new();
        if let Err(e) = self.stop_daemon(&part) {
            errors.push(format!("stopping the container: {e:#}"));
        }
        // Whatever the container started (a shell's children) goes with it, as a runtime kills
        // the whole container cgroup.
        let cgroup = self.pod_part_cgroup(&record.node, &part);
        if let Ok(cgroup) = &cgroup
            && cgroup.exists()
        {
            let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
        }
        if let Err(e) = self.sandbox_del(
            &record.node,
            &part,
            &record.container_id,
            &record.conflist,
            &record.result,
        ) {
            errors.push(format!("{e:#}"));
        }
        if let Ok(cgroup) = &cgroup
            && let Err(e) = super::kernel_fs::remove_cgroup(cgroup)
        {
            errors.push(format!("{e:#}"));
        }
        let _ = std::fs::remove_dir_all(self.pod_dir(&part));
        if !errors.is_empty() {
            // The record stays, so the next pass tries again (and the pod stays terminating).
            return Err(anyhow!(
                "pod {}/{}: {}",
                record.namespace,
                record.name,
                errors.join("; ")
            ));
        }
        match std::fs::remove_file(self.record_path(&record.namespace, &record.name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(anyhow!(
                "pod {}/{}: removing the record: {e}",
                record.namespace,
                record.name
            )),
            _ => Ok(()),
        }
    }

    /// One pass of the kubelet over one pod bound to one of the lab's nodes: what to write to
    /// the API, if anything.
    pub fn kubelet_sync_pod(&self, pod: &Pod) -> Result<Option<PodChange>> {
        let namespace = pod.namespace().unwrap_or_else(|| "default".into());
        let name = pod.name_any();
        let Some(node_name) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return Ok(None);
        };
        let Some(node) = self.state.nodes.iter().find(|n| n.name == node_name) else {
            return Ok(None);
        };
        let host_ip = node.v4().to_string();
        let record = std::fs::read(self.record_path(&namespace, &name))
            .ok()
            .and_then(|b| serde_json::from_slice::<PodRecord>(&b).ok())
            .filter(|r| Some(&r.uid) == pod.metadata.uid.as_ref());
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        let mut record = match record {
            Some(record) => record,
            // Nothing of it runs here (any more): its deletion is finished. (The lab's own pods
            // never get here: the controllers leave them to the lab's commands.)
            None if pod.metadata.deletion_timestamp.is_some() => return Ok(Some(PodChange::FinishDeletion)),
            // Started by someone else (the lab's own pods are created running): not ours.
            None if phase.is_some() && phase.as_deref() != Some("Pending") => return Ok(None),
            None => {
                let part = pod_part(&namespace, &name);
                let container_id = format!("{}-{}", self.state.name, pod.metadata.uid.clone().unwrap_or_default());
                let (conflist, result, ips) =
                    match self.sandbox_add(&node_name, &part, &container_id, &namespace, &name) {
                        Ok(made) => made,
                        Err(e) => {
                            let status = sandbox_failed_status(pod, &host_ip, &format!("{e:#}"));
                            return Ok(changed(pod, status));
                        }
                    };
                let program = images::program_for_pod(pod);
                let record = PodRecord {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    node: node_name.clone(),
                    container_id,
                    ips,
                    result,
                    conflist,
                    image_error: program.as_ref().err().cloned(),
                    started_at: now(),
                    finished: None,
                    restarts: 0,
                };
                self.save_record(&record)?;
                if let Ok(program) = &program
                    && let Err(e) = self.start_container(&record, program)
                {
                    let mut failed = record.clone();
                    failed.finished = Some((128, format!("StartError: {e:#}")));
                    self.save_record(&failed)?;
                    return Ok(changed(pod, pod_status(pod, &failed, &host_ip, false)));
                }
                record
            }
        };
        if pod.metadata.deletion_timestamp.is_some() {
            self.kubelet_teardown(&record)?;
            return Ok(Some(PodChange::FinishDeletion));
        }
        let part = pod_part(&namespace, &name);
        if record.image_error.is_none() && record.finished.is_none() && !self.daemon_running(&part) {
            let code = self.daemon_ended(&part).and_then(|s| s.code()).unwrap_or(137);
            let policy = pod
                .spec
                .as_ref()
                .and_then(|s| s.restart_policy.clone())
                .unwrap_or_else(|| "Always".into());
            let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
            if restart && let Ok(program) = images::program_for_pod(pod) {
                record.restarts += 1;
                record.started_at = now();
                self.start_container(&record, &program)?;
            } else {
                record.finished = Some((code, if code == 0 { "Completed" } else { "Error" }.into()));
            }
            self.save_record(&record)?;
        }
        let ready = record.image_error.is_none()
            && record.finished.is_none()
            && self.container_ready(pod, &record, Duration::from_secs(3));
        Ok(changed(pod, pod_status(pod, &record, &host_ip, ready)))
    }

    /// Tears down every pod this kubelet runs that is no longer in the API (deleted at once,
    /// `--force`, or deleted while the kubelet was down).
    pub fn kubelet_remove_orphans(&self, pods: &[Pod]) -> Vec<String> {
        let mut errors = Vec::new();
        for record in self.kubelet_records() {
            let known = pods.iter().any(|p| {
                p.metadata.uid.as_deref() == Some(record.uid.as_str())
                    && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(record.node.as_str())
            });
            if !known && let Err(e) = self.kubelet_teardown(&record) {
                errors.push(format!("{e:#}"));
            }
        }
        errors
    }

    /// Whether the daemon `what` (a pod's container) still runs.
    fn daemon_running(&self, what: &str) -> bool {
        let Some(pid) = self.daemon_pid(what) else {
            return false;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !(stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')))
    }
}

/// A status change, if the status is not already what the API holds. A condition that did not
/// change keeps the time of its last transition.
fn changed(pod: &Pod, mut status: PodStatus) -> Option<PodChange> {
    let Some(current) = pod.status.as_ref() else {
        return Some(PodChange::Status(Box::new(status)));
    };
    if same_status(current, &status) {
        return None;
    }
    for condition in status.conditions.iter_mut().flatten() {
        if let Some(before) = current
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = before.last_transition_time.clone();
        }
    }
    Some(PodChange::Status(Box::new(status)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn pod(image: &str) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                containers: vec![Container {
                    name: "web".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
    }

    fn record(image_error: Option<String>, finished: Option<(i32, String)>) -> PodRecord {
        PodRecord {
            namespace: "default".into(),
            name: "web".into(),
            uid: "u1".into(),
            node: "n1".into(),
            container_id: "lab-u1".into(),
            ips: vec!["10.244.1.7".parse().unwrap(), "fd00:244:1::7".parse().unwrap()],
            result: Value::Null,
            conflist: Value::Null,
            image_error,
            started_at: "2026-12-01T10:00:00Z".into(),
            finished,
            restarts: 0,
        }
    }

    #[test]
    fn a_running_pod_reports_its_addresses_host_and_readiness() {
        let status = pod_status(&pod("nginx"), &record(None, None), "10.200.0.11", true);
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.7"));
        assert_eq!(status.pod_ips.as_ref().unwrap().len(), 2);
        assert_eq!(status.host_ip.as_deref(), Some("10.200.0.11"));
        let ready = status.conditions.iter().flatten().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        let not_ready = pod_status(&pod("nginx"), &record(None, None), "10.200.0.11", false);
        assert!(!same_status(&status, &not_ready));
        // Only the times differ between two passes over the same state: nothing to write.
        let again = pod_status(&pod("nginx"), &record(None, None), "10.200.0.11", true);
        assert!(same_status(&status, &again));
    }

    /// The first container's waiting state (the test fails if it is not waiting).
    fn waiting_state(
        statuses: Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>,
    ) -> k8s_openapi::api::core::v1::ContainerStateWaiting {
        statuses.unwrap()[0].state.clone().unwrap().waiting.unwrap()
    }

    #[test]
    fn an_unknown_image_leaves_the_pod_pending_with_err_image_pull_but_with_its_ip() {
        let status = pod_status(
            &pod("redis"),
            &record(Some("not found".into()), None),
            "10.200.0.11",
            true,
        );
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let waiting = waiting_state(status.container_statuses);
        assert_eq!(waiting.reason.as_deref(), Some("ErrImagePull"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.7"));
    }

    #[test]
    fn a_finished_container_ends_the_pod_by_its_exit_code() {
        let ok = pod_status(
            &pod("busybox"),
            &record(None, Some((0, "Completed".into()))),
            "h",
            false,
        );
        assert_eq!(ok.phase.as_deref(), Some("Succeeded"));
        let failed = pod_status(&pod("busybox"), &record(None, Some((1, "Error".into()))), "h", false);
        assert_eq!(failed.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn a_missing_network_keeps_the_pod_creating_with_the_runtime_error() {
        let status = sandbox_failed_status(&pod("nginx"), "10.200.0.11", "no network: no CNI configuration");
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        assert!(status.pod_ip.is_none());
        let waiting = waiting_state(status.container_statuses);
        assert_eq!(waiting.reason.as_deref(), Some("ContainerCreating"));
        assert!(waiting.message.unwrap().contains("no CNI configuration"));
    }

    #[test]
    fn pods_of_different_namespaces_never_share_a_lab_part() {
        assert_eq!(pod_part("default", "web"), "pod-web");
        assert_eq!(pod_part("kube-system", "kube-dns"), "pod-kube-system_kube-dns");
        // Pod names may hold dots and dashes, namespaces dashes: no pair of them collides.
        assert_ne!(pod_part("default", "kube-system-x"), pod_part("kube-system", "x"));
        assert_ne!(pod_part("default", "kube-system.x"), pod_part("kube-system", "x"));
        assert_ne!(pod_part("a-b", "c"), pod_part("a", "b-c"));
        assert_ne!(pod_part("a", "b.c"), pod_part("a-b", "c"));
    }
}
