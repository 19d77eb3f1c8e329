//! Every manifest parses into typed Kubernetes objects, field for field, and says what it must.
use std::{collections::BTreeSet, path::PathBuf, process::Command};

use ferrynet_tests::binary;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

fn manifests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Every YAML document of a file, as JSON.
fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(manifests().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `doc` as `T` and checks that nothing was lost: k8s-openapi ignores unknown fields, so
/// a misspelled field only shows up as a difference after the round trip.
#[track_caller]
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let object: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
    let back = serde_json::to_value(&object).unwrap();
    assert_eq!(&back, doc, "fields were lost in the round trip (a misspelling?)");
    object
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    docs.iter().map(|d| d["kind"].as_str().unwrap()).collect()
}

#[test]
fn rbac_is_least_privilege() {
    let docs = documents("rbac.yaml");
    assert_eq!(kinds(&docs), ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]);
    let sa: ServiceAccount = typed(&docs[0]);
    let role: ClusterRole = typed(&docs[1]);
    let binding: ClusterRoleBinding = typed(&docs[2]);
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.verbs, ["get", "list", "watch"], "read-only");
        for resource in rule.resources.unwrap() {
            for group in rule.api_groups.clone().unwrap() {
                granted.insert(format!("{group}/{resource}"));
            }
        }
    }
    assert_eq!(
        granted,
        BTreeSet::from([
            "/nodes".to_string(),
            "/services".into(),
            "discovery.k8s.io/endpointslices".into(),
            "networking.k8s.io/servicecidrs".into()
        ])
    );
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (sa.metadata.name.as_deref().unwrap(), sa.metadata.namespace.as_deref())
    );
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
}

#[test]
fn the_daemonset_runs_everywhere_on_the_host_network_with_justified_capabilities() {
    let docs = documents("daemonset.yaml");
    let text = std::fs::read_to_string(manifests().join("daemonset.yaml")).unwrap();
    let ds: DaemonSet = typed(&docs[0]);
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("ferrynet-agent"));
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    let init = &pod.init_containers.unwrap()[0];
    assert_eq!(init.command.as_ref().unwrap()[1], "install-cni");
    let agent = &pod.containers[0];
    // The init container copies files and needs no capability; the agent needs exactly these,
    // each justified in the manifest's header.
    let added = |c: &k8s_openapi::api::core::v1::Container| {
        let caps = c.security_context.as_ref().unwrap().capabilities.clone().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]), "{}", c.name);
        caps.add.unwrap_or_default()
    };
    assert!(added(init).is_empty(), "{:?}", added(init));
    assert_eq!(added(agent), ["NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN"]);
    let header: String = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    // Each capability is justified by the calls that need it (the loader's: maps and programs,
    // their links to the cgroup and the veths, the socket iterators, entering pods' namespaces).
    for (cap, calls) in [
        (
            "NET_ADMIN",
            &["netlink", "nft -f", "bpf(BPF_PROG_LOAD)", "bpf(BPF_LINK_CREATE)"][..],
        ),
        (
            "BPF",
            &["BPF_MAP_CREATE", "BPF_PROG_LOAD", "BPF_OBJ_PIN", "BPF_OBJ_GET"][..],
        ),
        ("PERFMON", &["bpf(BPF_PROG_LOAD) of the socket iterators"][..]),
        ("SYS_ADMIN", &["setns(2)"][..]),
    ] {
        let start = header
            .find(&format!("#   {cap} "))
            .unwrap_or_else(|| panic!("{cap} is not justified"));
        let rest = &header[start + 4..];
        // Up to the next capability's line, or the end of the list.
        let end = rest
            .match_indices("\n#")
            .map(|(i, _)| i)
            .find(|&i| {
                let next = &rest[i + 2..];
                !next.starts_with("              ")
            })
            .unwrap_or(rest.len());
        let justification = rest[..end]
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .collect::<Vec<_>>()
            .join(" ");
        for call in calls {
            assert!(
                justification.contains(call),
                "{cap}'s justification names no {call}: {justification}"
            );
        }
    }
    // What it does not need, said, and not granted.
    for not_needed in ["SYS_RESOURCE", "hostPID"] {
        assert!(header.contains(not_needed), "{not_needed}");
    }
    assert_eq!(pod.host_pid, None);
    assert_eq!(pod.host_ipc, None);
    // The agent can be paused on a node with a label (the kind demos do): a node affinity that
    // excludes the labelled nodes, documented in the header.
    let affinity = pod.affinity.clone().unwrap().node_affinity.unwrap();
    let terms = affinity
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms;
    let expressions = terms[0].match_expressions.clone().unwrap();
    assert_eq!(terms.len(), 1);
    assert_eq!(
        (
            expressions[0].key.as_str(),
            expressions[0].operator.as_str(),
            expressions[0].values.as_deref()
        ),
        ("ferrynet.io/agent", "NotIn", Some(&["paused".to_string()][..]))
    );
    assert!(header.contains("kubectl label node <node> ferrynet.io/agent=paused"));
    for c in [init, agent] {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let mounts: BTreeSet<String> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.clone())
            .collect();
        for path in [
            "/host/opt/cni/bin",
            "/host/etc/cni/net.d",
            "/var/lib/ferrynet",
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
        ] {
            assert!(mounts.contains(path), "{} lacks {path}", c.name);
        }
        let env: Vec<String> = c.env.as_ref().unwrap().iter().map(|e| e.name.clone()).collect();
        assert!(env.contains(&"NODE_NAME".to_string()));
        let settings = agent_settings();
        for name in env.iter().filter(|n| n.starts_with("FERRYNET_")) {
            assert!(settings.contains(name), "the agent has no setting {name}");
        }
        let node_name = c.env.as_ref().unwrap().iter().find(|e| e.name == "NODE_NAME").unwrap();
        assert_eq!(
            node_name
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "spec.nodeName"
        );
    }
    // The agent's writable /proc/sys/net is the host's, where the agent looks for it; the init
    // container does without.
    let mount = |c: &k8s_openapi::api::core::v1::Container, name: &str| {
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == name)
            .map(|m| (m.mount_path.clone(), m.read_only))
    };
    assert_eq!(
        mount(agent, "proc-sys-net"),
        Some(("/host/proc/sys/net".to_string(), None))
    );
    assert_eq!(mount(init, "proc-sys-net"), None);
    // The pins are the host's bpffs (following mounts made after the pod started); the socket
    // programs attach to the host's cgroup v2 root, opened read-only.
    let bpffs = agent
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "bpffs")
        .unwrap();
    assert_eq!(
        (bpffs.mount_path.as_str(), bpffs.mount_propagation.as_deref()),
        ("/sys/fs/bpf", Some("HostToContainer"))
    );
    assert_eq!(mount(agent, "cgroup"), Some(("/sys/fs/cgroup".to_string(), Some(true))));
    assert_eq!(
        env_value(agent, "FERRYNET_BPF_PIN_PATH").as_deref(),
        Some("/sys/fs/bpf/ferrynet")
    );
    assert_eq!(
        env_value(agent, "FERRYNET_CGROUP_PATH").as_deref(),
        Some("/sys/fs/cgroup")
    );
    // Pods' network namespaces, where the runtime names them, read-only, and following the
    // runtime's later mounts: the agent enters them to close sockets to removed backends.
    assert_eq!(mount(agent, "netns"), Some(("/run/netns".to_string(), Some(true))));
    let netns = agent
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "netns")
        .unwrap();
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(
        env_value(agent, "FERRYNET_PROC_SYS_NET").as_deref(),
        Some("/host/proc/sys/net")
    );
    let probe = agent
        .readiness_probe
        .as_ref()
        .unwrap()
        .exec
        .as_ref()
        .unwrap()
        .command
        .clone()
        .unwrap();
    assert_eq!(probe, ["/usr/local/bin/ferrynet-agent", "status", "--ready"]);
    let volumes: BTreeSet<String> = pod
        .volumes
        .unwrap()
        .iter()
        .map(|v| v.host_path.as_ref().unwrap().path.clone())
        .collect();
    assert_eq!(
        volumes,
        BTreeSet::from(
            [
                "/opt/cni/bin",
                "/etc/cni/net.d",
                "/var/lib/ferrynet",
                "/sys/fs/bpf",
                "/sys/fs/cgroup",
                "/run/netns",
                "/proc/sys/net"
            ]
            .map(String::from)
        )
    );

    // The image the Dockerfile builds has what the DaemonSet points at.
    let dockerfile = std::fs::read_to_string(manifests().join("Dockerfile")).unwrap();
    let source = env_value(agent, "FERRYNET_CNI_SOURCE_DIR").unwrap();
    assert!(
        dockerfile.contains(&format!("COPY --from=build /out/cni/ {source}/")),
        "{source}"
    );
    assert!(dockerfile.contains("COPY --from=build /out/ferrynet-agent /usr/local/bin/ferrynet-agent"));
    assert!(dockerfile.contains("nftables"));
}

#[test]
fn the_configmap_sets_only_settings_the_agent_reads_and_they_parse() {
    let docs = documents("configmap.yaml");
    let cm: ConfigMap = typed(&docs[0]);
    let data = cm.data.unwrap();
    let known = agent_settings();
    for key in data.keys() {
        assert!(
            known.contains(key.as_str()),
            "the agent has no setting {key} (it reads {known:?})"
        );
    }
    // The agent accepts the values: with them set, it gets as far as reading its status file.
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(binary("ferrynet-agent"))
        .envs(&data)
        .args(["--state-dir", state.path().to_str().unwrap(), "status"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent-status.json"), "{err}");
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct KindCluster {
    kind: String,
    api_version: String,
    networking: KindNetworking,
    nodes: Vec<KindNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KindNetworking {
    #[serde(rename = "disableDefaultCNI")]
    disable_default_cni: bool,
    pod_subnet: String,
    service_subnet: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct KindNode {
    role: String,
}

#[test]
fn the_kind_config_disables_the_default_cni() {
    let doc = &documents("kind-config.yaml")[0];
    let cluster: KindCluster = serde_json::from_value(doc.clone()).unwrap();
    assert_eq!(
        (cluster.kind.as_str(), cluster.api_version.as_str()),
        ("Cluster", "kind.x-k8s.io/v1alpha4")
    );
    assert!(cluster.networking.disable_default_cni);
    cluster.networking.pod_subnet.parse::<ipnet::IpNet>().unwrap();
    cluster.networking.service_subnet.parse::<ipnet::IpNet>().unwrap();
}

/// The environment variables the agent reads (from its `--help`).
fn agent_settings() -> BTreeSet<String> {
    let help = Command::new(binary("ferrynet-agent")).arg("--help").output().unwrap();
    String::from_utf8_lossy(&help.stdout)
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split('=').next())
        .map(String::from)
        .collect()
}

/// The literal value of a container's environment variable.
fn env_value(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env.as_ref()?.iter().find(|e| e.name == name)?.value.clone()
}
