//! The lab answers a Kubernetes user's kubectl commands: pods made through the nodes' real CNI,
//! real programs per image, Services reached by name through the cluster DNS, and `kubectl exec`
//! as the lab's own verb.
use std::{net::IpAddr, process::Command, time::Duration};

use ferrynet_tests::{
    binary,
    lab::{
        Lab, LabGuard,
        demo::{is_ready, waiting_reason},
        eventually,
    },
};
use serde_json::Value;

/// `ferrynet-lab --name <lab> ARGS`, as a user runs it: whether it succeeded, and what it printed.
fn lab_cli(lab: &Lab, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("ferrynet-lab"))
        .args(["--name", &lab.state.name])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `kubectl exec POD -- CMD` through the lab's CLI; its output, or a panic with it.
#[track_caller]
fn exec(lab: &Lab, pod: &str, command: &[&str]) -> String {
    let mut args = vec!["kubectl", "--", "exec", pod, "--"];
    args.extend_from_slice(command);
    let (ok, out) = lab_cli(lab, &args);
    assert!(ok, "kubectl exec {pod} -- {command:?}: {out}");
    out
}

fn pod_json(lab: &Lab, name: &str) -> Option<Value> {
    let out = lab.kubectl(&["get", "pod", name, "-o", "json"]).ok()?;
    serde_json::from_str(&out).ok()
}

/// Waits (bounded) until `pod` satisfies `ready`, and returns it.
#[track_caller]
fn wait_pod(lab: &Lab, name: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = eventually(Duration::from_secs(30), || {
        last = pod_json(lab, name).unwrap_or(Value::Null);
        ready(&last)
    });
    assert!(ok, "pod {name} is not {what} within 30 s: {:#}", last["status"]);
    last
}

/// The node's PodCIDR (IPv4) a pod's address must come from.
fn in_pod_cidr(lab: &Lab, node: &str, ip: &str) -> bool {
    let node = lab.state.nodes.iter().find(|n| n.name == node).unwrap();
    let cidr: ipnet::IpNet = node.pod_cidrs()[0].parse().unwrap();
    cidr.contains(&ip.parse::<IpAddr>().unwrap())
}

/// A running pod's node and IPv4 address.
fn node_and_ip(lab: &Lab, pod: &str) -> (String, IpAddr) {
    let pod = pod_json(lab, pod).unwrap();
    (
        pod["spec"]["nodeName"].as_str().unwrap().to_string(),
        pod["status"]["podIP"].as_str().unwrap().parse().unwrap(),
    )
}

#[test]
fn kubectl_run_gets_a_pod_its_ip_from_the_cni_and_its_service_a_name_in_the_cluster_dns() {
    let lab = LabGuard::up_with_dns(2, "native");
    lab.kubectl(&["run", "nginx", "--image=nginx", "--port=80", "--expose"])
        .unwrap();
    let nginx = wait_pod(&lab, "nginx", "ready", is_ready);
    let node = nginx["spec"]["nodeName"].as_str().unwrap().to_string();
    let ip = nginx["status"]["podIP"].as_str().unwrap().to_string();
    assert!(in_pod_cidr(&lab, &node, &ip), "{ip} is not from {node}'s PodCIDR");
    assert_eq!(nginx["status"]["podIPs"].as_array().unwrap().len(), 2, "dual stack");
    let host = lab
        .state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .unwrap()
        .v4()
        .to_string();
    assert_eq!(nginx["status"]["hostIP"], host.as_str());
    // The address is the CNI's doing: on the pod's eth0, routed by its node to the pod's veth.
    let pod_ns = lab.pod_ns("nginx").unwrap();
    assert!(pod_ns.ip(&["-4", "addr", "show", "eth0"]).contains(&ip));
    let route = lab.node_ns(&node).unwrap().ip(&["-4", "route", "show", &ip]);
    assert!(route.contains("dev "), "{node} routes {ip}: {route:?}");

    lab.kubectl(&[
        "run",
        "client",
        "--image=busybox",
        "--restart=Never",
        "--",
        "sleep",
        "3600",
    ])
    .unwrap();
    wait_pod(&lab, "client", "ready", is_ready);
    // Through the Service's name (the cluster DNS, itself behind a ClusterIP), its ClusterIP,
    // and the pod's own address: the real nginx's welcome page each time.
    let cluster_ip = lab
        .kubectl(&["get", "service", "nginx", "-o", "jsonpath={.spec.clusterIP}"])
        .unwrap();
    for url in [
        "http://nginx/".to_string(),
        "http://nginx.default.svc.cluster.local/".into(),
        format!("http://{cluster_ip}/"),
        format!("http://{ip}/"),
    ] {
        let page = exec(&lab, "client", &["curl", "-sS", "-m", "5", &url]);
        assert!(page.contains("<title>Welcome to nginx!</title>"), "{url}: {page}");
    }
    let page = exec(&lab, "client", &["wget", "-qO-", "-T", "5", "nginx"]);
    assert!(page.contains("Welcome to nginx!"), "{page}");
    let answer = exec(&lab, "client", &["dig", "+short", "nginx.default.svc.cluster.local"]);
    assert_eq!(answer.trim(), cluster_ip);
    let unknown = exec(&lab, "client", &["dig", "no-such-service.default.svc.cluster.local"]);
    assert!(unknown.contains("status: NXDOMAIN"), "{unknown}");
    // The resolver the pod sees is the kubelet's, not the machine's.
    let resolv = exec(&lab, "client", &["cat", "/etc/resolv.conf"]);
    assert!(resolv.starts_with("nameserver 10.96.0.10\n"), "{resolv}");
    assert!(
        !std::fs::read_to_string("/etc/resolv.conf")
            .unwrap()
            .contains("10.96.0.10")
    );

    // An image the lab has no program for: the pod has its network, its container does not run.
    lab.kubectl(&["run", "broken", "--image=redis:7"]).unwrap();
    let broken = wait_pod(&lab, "broken", "ErrImagePull", |p| {
        waiting_reason(p) == Some("ErrImagePull")
    });
    assert!(broken["status"]["podIP"].is_string());
    assert_eq!(broken["status"]["phase"], "Pending");
    let message = broken["status"]["containerStatuses"][0]["state"]["waiting"]["message"].to_string();
    assert!(message.contains("redis"), "{message}");
    // A container that ends: the pod completes (restartPolicy Never).
    lab.kubectl(&["run", "once", "--image=busybox", "--restart=Never", "--", "true"])
        .unwrap();
    wait_pod(&lab, "once", "Succeeded", |p| p["status"]["phase"] == "Succeeded");

    // Deleting the pod stops nginx, runs CNI DEL (route and namespace gone) and empties the
    // Service's endpoints.
    let nginx_pid = lab.daemon_pid("pod-nginx").unwrap();
    lab.kubectl(&["delete", "pod", "nginx", "--timeout=30s"]).unwrap();
    assert!(pod_json(&lab, "nginx").is_none());
    assert!(
        !std::path::Path::new(&format!("/proc/{nginx_pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{nginx_pid}/stat")).unwrap_or_default();
            !stat.contains("(nginx)")
        }
    );
    assert!(lab.pod_ns("nginx").is_err(), "the pod's namespace is gone");
    // CNI DEL ran: the node's IPAM store gave the address back (deleting the namespace alone
    // would not).
    let held = lab.node_ipam_addresses(&node).unwrap();
    assert!(
        !held.contains(&ip.parse().unwrap()),
        "{ip} is still allocated on {node}: {held:?}"
    );
    let (client_node, client_ip) = node_and_ip(&lab, "client");
    let client_held = lab.node_ipam_addresses(&client_node).unwrap();
    assert!(
        client_held.contains(&client_ip),
        "the store is read right: the client's {client_ip} is in {client_node}'s {client_held:?}"
    );
    let route = lab.node_ns(&node).unwrap().ip(&["-4", "route", "show", &ip]);
    assert!(route.trim().is_empty(), "{node} still routes {ip}: {route}");
    let slices = lab
        .kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=nginx",
            "-o",
            "jsonpath={.items[*].endpoints}",
        ])
        .unwrap();
    assert!(!slices.contains(&ip), "{slices}");
    let (ok, out) = lab_cli(&lab, &["kubectl", "--", "exec", "nginx", "--", "true"]);
    assert!(!ok, "exec into a deleted pod: {out}");
}

#[test]
fn a_node_without_the_cni_configuration_leaves_its_pods_without_an_address_until_it_has_one() {
    let lab = LabGuard::up(2, "native");
    lab.hide_cni_config("n2").unwrap();
    lab.kubectl(&[
        "run",
        "stuck",
        "--image=nginx",
        // Bound to n2 directly: a real node without a CNI configuration is NotReady, and the
        // scheduler would keep the pod off it.
        "--overrides={\"apiVersion\":\"v1\",\"spec\":{\"nodeName\":\"n2\"}}",
    ])
    .unwrap();
    let stuck = wait_pod(&lab, "stuck", "stuck creating", |p| {
        waiting_reason(p) == Some("ContainerCreating")
    });
    assert_eq!(stuck["spec"]["nodeName"], "n2");
    assert!(stuck["status"]["podIP"].is_null(), "{:#}", stuck["status"]);
    let message = stuck["status"]["containerStatuses"][0]["state"]["waiting"]["message"].to_string();
    assert!(message.contains("no CNI configuration"), "{message}");
    // The service proxy on n2 runs all along: the agent translates Services, pods get no IP.
    let status = lab.agent_status("n2").unwrap();
    assert_eq!(status["services"]["running"], true, "{status:#}");

    lab.restore_cni_config("n2").unwrap();
    let running = wait_pod(&lab, "stuck", "ready", is_ready);
    let ip = running["status"]["podIP"].as_str().unwrap();
    assert!(in_pod_cidr(&lab, "n2", ip), "{ip}");
}

#[test]
fn a_deployment_keeps_its_replicas_spreads_them_scales_and_takes_them_along_when_deleted() {
    let lab = LabGuard::up(2, "native");
    lab.kubectl(&["create", "deployment", "demo", "--image=nginx", "--port=80"])
        .unwrap();
    lab.kubectl(&["expose", "deployment", "demo", "--port=80"]).unwrap();
    let pods = |lab: &Lab| -> Vec<Value> {
        let out = lab.kubectl(&["get", "pods", "-l", "app=demo", "-o", "json"]).unwrap();
        let list: Value = serde_json::from_str(&out).unwrap();
        list["items"].as_array().unwrap().clone()
    };
    let ready_pods = |lab: &Lab, n: usize| {
        let mut last = Vec::new();
        let ok = eventually(Duration::from_secs(30), || {
            last = pods(lab);
            last.len() == n
                && last
                    .iter()
                    .all(|p| is_ready(p) && p["metadata"]["deletionTimestamp"].is_null())
        });
        assert!(ok, "not {n} ready pods within 30 s: {:#}", Value::Array(last.clone()));
        last
    };
    let first = ready_pods(&lab, 1);
    let first_name = first[0]["metadata"]["name"].as_str().unwrap().to_string();
    assert!(first_name.starts_with("demo-"), "{first_name}");

    lab.kubectl(&["scale", "deployment", "demo", "--replicas=3"]).unwrap();
    let three = ready_pods(&lab, 3);
    let nodes: std::collections::BTreeSet<&str> =
        three.iter().map(|p| p["spec"]["nodeName"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "spread over both nodes");
    for pod in &three {
        let ip = pod["status"]["podIP"].as_str().unwrap();
        assert!(in_pod_cidr(&lab, pod["spec"]["nodeName"].as_str().unwrap(), ip), "{ip}");
    }
    // What the user sees: the wide listing with IP and NODE, the Deployment ready, and the
    // Service's endpoints (mirrored from the slices) listing every pod.
    let wide = lab.kubectl(&["get", "pods", "-o", "wide"]).unwrap();
    assert!(wide.contains("IP") && wide.contains("NODE"), "{wide}");
    for pod in &three {
        assert!(wide.contains(pod["status"]["podIP"].as_str().unwrap()), "{wide}");
    }
    let eventually_contains = |args: &[&str], needles: &[String]| {
        let mut last = String::new();
        let ok = eventually(Duration::from_secs(15), || {
            last = lab.kubectl(args).unwrap_or_default();
            needles.iter().all(|n| last.contains(n.as_str()))
        });
        assert!(ok, "kubectl {args:?} lacks {needles:?}: {last}");
    };
    eventually_contains(&["get", "deployment", "demo"], &["3/3".to_string()]);
    let ips: Vec<String> = three
        .iter()
        .map(|p| format!("{}:80", p["status"]["podIP"].as_str().unwrap()))
        .collect();
    eventually_contains(&["get", "endpoints", "demo", "-o", "wide"], &ips);
    // Through the Service: every answer comes from one of the pods (nginx, port 80).
    let cluster_ip = lab
        .kubectl(&["get", "service", "demo", "-o", "jsonpath={.spec.clusterIP}"])
        .unwrap();
    let page = lab
        .exec_capture(
            "n1",
            &[
                "curl".into(),
                "-sS".into(),
                "-m".into(),
                "5".into(),
                format!("http://{cluster_ip}/"),
            ],
        )
        .unwrap();
    assert!(page.contains("Welcome to nginx!"), "{page}");

    // A deleted pod is replaced; scaling down removes pods (their CNI DEL included).
    lab.kubectl(&["delete", "pod", &first_name, "--timeout=30s"]).unwrap();
    let replaced = ready_pods(&lab, 3);
    assert!(replaced.iter().all(|p| p["metadata"]["name"] != first_name.as_str()));
    lab.kubectl(&["scale", "deployment", "demo", "--replicas=1"]).unwrap();
    let one = ready_pods(&lab, 1);
    let kept = one[0]["metadata"]["name"].as_str().unwrap();
    for pod in replaced.iter().filter(|p| p["metadata"]["name"] != kept) {
        let name = pod["metadata"]["name"].as_str().unwrap();
        assert!(lab.pod_ns(name).is_err(), "{name}'s namespace is gone");
    }
    // Deleting the Deployment takes its pods along (the garbage collector).
    lab.kubectl(&["delete", "deployment", "demo"]).unwrap();
    let mut last = Vec::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            last = pods(&lab);
            last.is_empty()
        }),
        "{last:?}"
    );
    assert!(lab.pod_ns(kept).is_err());
}
