//! Service translation in the lab: real agents, real kernel programs, real traffic from pods and
//! nodes, on both families, TCP and UDP, at the socket and per packet.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::Command,
    time::Duration,
};

use ferrynet_tests::{
    binary,
    lab::{Lab, LabGuard, POD_PORT, eventually, service_object},
};
use k8s_openapi::{
    api::core::v1::{ClientIPConfig, Service, ServicePort as K8sServicePort, SessionAffinityConfig},
    apimachinery::pkg::util::intstr::IntOrString,
};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The pod name in an answer (`pod=<name> ...`).
fn answered_by(answer: &str) -> String {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pod="))
        .unwrap_or_default()
        .to_string()
}

/// A Service port of `protocol` `port` → `target` (a number, or a container port's name).
fn port(name: &str, protocol: &str, port: i32, target: IntOrString) -> K8sServicePort {
    K8sServicePort {
        name: Some(name.into()),
        protocol: Some(protocol.into()),
        port,
        target_port: Some(target),
        ..Default::default()
    }
}

/// A dual-stack Service selecting `app=<app>` with these ports.
fn service(name: &str, app: &str, ports: Vec<K8sServicePort>) -> Service {
    let mut svc = service_object(name, &labels(&[("app", app)]), &[]);
    svc.spec.as_mut().unwrap().ports = Some(ports);
    svc
}

/// Who answers `count` requests from `part` to `to`, once the agents have programmed it; panics
/// on any failure after that.
#[track_caller]
fn answers(lab: &Lab, part: &str, to: SocketAddr, udp: bool, count: usize) -> BTreeSet<String> {
    let mut last = String::new();
    let programmed = eventually(Duration::from_secs(20), || match lab.probe(part, to, udp) {
        Ok(_) => true,
        Err(e) => {
            last = e.to_string();
            false
        }
    });
    assert!(programmed, "{part} -> {to} udp={udp} never answered: {last}");
    (0..count)
        .map(|_| {
            let answer = lab
                .probe(part, to, udp)
                .unwrap_or_else(|e| panic!("{part} -> {to} ({}): {e}", if udp { "udp" } else { "tcp" }));
            // The application sees the Service address, not the backend's.
            assert!(answer.ends_with(&format!("peer={to}")), "{part} -> {to}: {answer}");
            answered_by(&answer)
        })
        .collect()
}

/// The agent on `node`'s datapath counter `event`, from its /metrics (refreshed every resync).
fn datapath_counter(lab: &Lab, node: &str, event: &str) -> u64 {
    let text = lab
        .exec_capture(
            node,
            &["curl".into(), "-s".into(), "http://127.0.0.1:10249/metrics".into()],
        )
        .unwrap_or_default();
    let needle = format!("ferrynet_datapath_events_total{{event=\"{event}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Two nodes, backends web-1 (n1) and web-2 (n2), a client pod on n1, and a Service `web` with a
/// TCP port 80 and a UDP port 53, both to the pods' port 8080.
fn two_backends() -> LabGuard {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("web-1", "n1", &labels(&[("app", "web")])).unwrap();
    lab.run_pod("web-2", "n2", &labels(&[("app", "web")])).unwrap();
    lab.run_pod("client", "n1", &BTreeMap::new()).unwrap();
    let target = IntOrString::Int(i32::from(POD_PORT));
    lab.create_service_object(&service(
        "web",
        "web",
        vec![port("http", "TCP", 80, target.clone()), port("dns", "UDP", 53, target)],
    ))
    .unwrap();
    lab
}

#[track_caller]
fn assert_reaches_both(lab: &Lab, part: &str) {
    let both: BTreeSet<String> = ["web-1", "web-2"].map(String::from).into();
    for v4 in [true, false] {
        let vip = lab.cluster_ip("web", v4).unwrap();
        for (port, udp) in [(80, false), (53, true)] {
            let to = SocketAddr::new(vip, port);
            // Random per connection: over enough connections, both backends answer.
            let mut seen = BTreeSet::new();
            let mut tries = 0;
            while seen != both && tries < 6 {
                seen.extend(answers(lab, part, to, udp, 8));
                tries += 1;
            }
            assert_eq!(seen, both, "{part} -> {to} udp={udp}");
        }
    }
}

#[test]
fn a_clusterip_reaches_its_backends_from_pods_and_nodes_over_both_families_and_protocols() {
    let lab = two_backends();
    // From a pod (socket LB translates its connects and datagrams), from a node's own
    // processes on the same node and on the other.
    for part in ["pod-client", "n1", "n2"] {
        assert_reaches_both(&lab, part);
    }
    assert!(
        eventually(Duration::from_secs(20), || datapath_counter(
            &lab,
            "n1",
            "sock_translated"
        ) > 0),
        "socket LB did the translating"
    );
}

#[test]
fn the_per_packet_path_translates_what_socket_lb_does_not() {
    let lab = two_backends();
    for node in ["n1", "n2"] {
        lab.stop_agent(node).unwrap();
        lab.start_agent_with(node, &["--socket-lb", "false"]).unwrap();
    }
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    // With socket LB off, a pod's traffic is translated at its veth, packet by packet.
    assert!(
        eventually(Duration::from_secs(20), || lab
            .probe(
                "pod-client",
                SocketAddr::new(lab.cluster_ip("web", true).unwrap(), 80),
                false
            )
            .is_ok()),
        "per-packet translation works"
    );
    assert_reaches_both(&lab, "pod-client");
    assert!(
        eventually(Duration::from_secs(20), || datapath_counter(
            &lab,
            "n1",
            "packet_flows_translated"
        ) > 0),
        "the per-packet path did the translating"
    );
    assert_eq!(datapath_counter(&lab, "n1", "sock_translated"), 0);

    // Socket LB in the node's namespace only (as service meshes need): pods are translated per
    // packet, the node's own processes at the socket.
    for node in ["n1", "n2"] {
        lab.stop_agent(node).unwrap();
        lab.start_agent_with(node, &["--socket-lb-host-netns-only", "true"])
            .unwrap();
    }
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    assert_reaches_both(&lab, "pod-client");
    assert_reaches_both(&lab, "n1");
}

#[test]
fn hairpin_named_ports_multiple_ports_and_ports_without_endpoints() {
    let mut lab = LabGuard::up(1, "native");
    lab.run_pod("self", "n1", &labels(&[("app", "self")])).unwrap();
    // A named target port (the pod's container port "http" is 8080), and a second port.
    lab.create_service_object(&service(
        "self",
        "self",
        vec![
            port("named", "TCP", 80, IntOrString::String("http".into())),
            port("numbered", "TCP", 81, IntOrString::Int(i32::from(POD_PORT))),
        ],
    ))
    .unwrap();
    // A Service whose selector matches nothing: its port is refused at once.
    lab.create_service_object(&service(
        "empty",
        "nobody",
        vec![port("p", "TCP", 80, IntOrString::Int(8080))],
    ))
    .unwrap();
    for v4 in [true, false] {
        let vip = lab.cluster_ip("self", v4).unwrap();
        // Hairpin: the pod reaches itself through its own Service, on either port.
        for p in [80, 81] {
            assert_eq!(
                answers(&lab, "pod-self", SocketAddr::new(vip, p), false, 3),
                ["self".to_string()].into()
            );
        }
        let empty = SocketAddr::new(lab.cluster_ip("empty", v4).unwrap(), 80);
        let started = std::time::Instant::now();
        let err = lab.probe("pod-self", empty, false).unwrap_err().to_string();
        assert!(err.contains("refused"), "{empty}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once, not after a timeout"
        );
    }
    // The same per packet (socket LB off).
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", &["--socket-lb", "false"]).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    for v4 in [true, false] {
        let vip = lab.cluster_ip("self", v4).unwrap();
        for p in [80, 81] {
            assert_eq!(
                answers(&lab, "pod-self", SocketAddr::new(vip, p), false, 3),
                ["self".to_string()].into()
            );
        }
        let empty = SocketAddr::new(lab.cluster_ip("empty", v4).unwrap(), 80);
        let err = lab.probe("pod-self", empty, false).unwrap_err().to_string();
        assert!(err.contains("refused"), "{empty}: {err}");
    }
}

#[test]
fn session_affinity_holds_and_expires() {
    let mut lab = LabGuard::up(1, "native");
    for pod in ["a1", "a2", "a3"] {
        lab.run_pod(pod, "n1", &labels(&[("app", "sticky")])).unwrap();
    }
    lab.run_pod("client", "n1", &BTreeMap::new()).unwrap();
    let mut svc = service(
        "sticky",
        "sticky",
        vec![port("p", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    let spec = svc.spec.as_mut().unwrap();
    spec.session_affinity = Some("ClientIP".into());
    spec.session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(2),
        }),
    });
    lab.create_service_object(&svc).unwrap();
    let to = SocketAddr::new(lab.cluster_ip("sticky", true).unwrap(), 80);
    // Every connection of the client goes to the same backend while it keeps coming back.
    let first = answers(&lab, "pod-client", to, false, 10);
    assert_eq!(first.len(), 1, "{first:?}");
    // Once the client has been quiet for longer than the timeout, it may land elsewhere: over
    // a few rounds, another backend answers.
    let started = std::time::Instant::now();
    let moved = eventually(Duration::from_secs(30), || {
        let quiet_since = std::time::Instant::now();
        // Quiet for longer than the timeout (the only way to let affinity expire).
        while quiet_since.elapsed() < Duration::from_millis(2_200) {
            std::thread::sleep(Duration::from_millis(100));
        }
        answers(&lab, "pod-client", to, false, 1) != first
    });
    assert!(moved, "affinity never expired ({:?})", started.elapsed());
}

#[test]
fn internal_traffic_policy_local_service_cidrs_and_services_left_alone() {
    let mut lab = LabGuard::up(3, "native");
    lab.run_pod("l1", "n1", &labels(&[("app", "local")])).unwrap();
    lab.run_pod("l2", "n2", &labels(&[("app", "local")])).unwrap();
    let mut local = service(
        "local",
        "local",
        vec![port("p", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    local.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
    lab.create_service_object(&local).unwrap();
    let to = SocketAddr::new(lab.cluster_ip("local", true).unwrap(), 80);
    // Each node's own endpoint only; a node without one refuses.
    assert_eq!(answers(&lab, "n1", to, false, 6), ["l1".to_string()].into());
    assert_eq!(answers(&lab, "n2", to, false, 6), ["l2".to_string()].into());
    let err = eventually_err(&lab, "n3", to);
    assert!(err.contains("refused"), "{err}");

    // Services that are not ferrynet's to translate stay untranslated.
    let mut other = service(
        "other",
        "local",
        vec![port("p", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    other.metadata.labels = Some(labels(&[("service.kubernetes.io/service-proxy-name", "someone-else")]));
    lab.create_service_object(&other).unwrap();
    let mut headless = service(
        "headless",
        "local",
        vec![port("p", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    lab.create_service_object(&headless).unwrap();
    let mut external = service(
        "external",
        "local",
        vec![port("p", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    let spec = external.spec.as_mut().unwrap();
    spec.type_ = Some("ExternalName".into());
    spec.external_name = Some("example.com".into());
    spec.ip_families = None;
    spec.ip_family_policy = None;
    lab.create_service_object(&external).unwrap();
    let other_vip = SocketAddr::new(lab.cluster_ip("other", true).unwrap(), 80);
    let listed = services_listing(&lab, "n1");
    assert!(listed.contains(&to.to_string()), "{listed}");
    assert!(!listed.contains(&other_vip.ip().to_string()), "{listed}");
    assert!(!listed.contains("headless") && !listed.contains("external"), "{listed}");
    // Nothing translates the other proxy's Service: the node has no route for it.
    let err = lab.probe("n1", other_vip, false).unwrap_err().to_string();
    assert!(!err.contains("refused"), "{err}");

    // With the cluster's Service CIDRs known, an address there that no Service holds, and a
    // port a Service does not have, are refused instead of leaking out.
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", &["--service-cidrs", "10.96.0.0/16,fd00:96::/108"])
        .unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    for to in ["10.96.200.200:80", "[fd00:96::ffff]:80"] {
        let to: SocketAddr = to.parse().unwrap();
        let err = eventually_err(&lab, "n1", to);
        assert!(err.contains("refused"), "{to}: {err}");
    }
    let wrong_port = SocketAddr::new(lab.cluster_ip("local", true).unwrap(), 9999);
    let err = eventually_err(&lab, "n1", wrong_port);
    assert!(err.contains("refused"), "{wrong_port}: {err}");
}

/// The probe's error once the agent refuses (it may still be starting).
fn eventually_err(lab: &Lab, part: &str, to: SocketAddr) -> String {
    let mut last = String::new();
    eventually(Duration::from_secs(20), || {
        last = lab
            .probe(part, to, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        last.contains("refused")
    });
    last
}

/// `ferrynet-agent services` on `node`, reading the pinned maps.
fn services_listing(lab: &Lab, node: &str) -> String {
    let pins = lab.node_pin_path(node).display().to_string();
    let state = lab.dir().join("nodes").join(node).join("agent").display().to_string();
    let out = lab
        .node_ns(node)
        .unwrap()
        .command_output(Command::new(binary("ferrynet-agent")).args([
            "--bpf-pin-path",
            &pins,
            "--state-dir",
            &state,
            "services",
        ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
