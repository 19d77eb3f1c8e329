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
    api::{
        core::v1::{ClientIPConfig, Pod, Service, ServicePort as K8sServicePort, SessionAffinityConfig},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
    },
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

/// One request line from `local_port` in `pod`'s namespace to `to`, with the answer (the port
/// may be taken again while its last connection is in TIME_WAIT; connecting gives up after 3 s).
fn request_from_port(lab: &Lab, pod: &str, local_port: u16, to: SocketAddr) -> std::io::Result<String> {
    request_from_port_in(&lab.pod_ns(pod).map_err(std::io::Error::other)?, local_port, to)
}

/// [`request_from_port`] from any namespace.
fn request_from_port_in(ns: &ferrynet_tests::netns::Netns, local_port: u16, to: SocketAddr) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let stream = ferrynet_kernel::netns::run_in(ns.fd(), || {
        ferrynet_tests::probe::connect_from_port(to, local_port, Duration::from_secs(3))
    })?;
    (&stream).write_all(b"hello\n")?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}

/// Whether `node`'s port gate `name` marks `port` as used by no entry.
fn port_gate_closed(lab: &Lab, node: &str, name: &str, port: u16) -> bool {
    let pin = lab
        .node_pin_path(node)
        .join(format!("v{}", ferrynet_common::SCHEMA_VERSION))
        .join("maps")
        .join(name);
    let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&pin).unwrap()).unwrap();
    let words = aya::maps::Array::<_, u64>::try_from(map).unwrap();
    words.get(&u32::from(port / 64), 0).unwrap() & (1 << (port % 64)) != 0
}

fn ip4(ip: std::net::IpAddr) -> std::net::Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => panic!("{v6} is not IPv4"),
    }
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
    let mut lab = two_backends();
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

    // A pod that reached a backend through the Service, then reaches that backend directly from
    // the same source port, talks to the backend's own address: the finished Service flow's
    // translation must not be applied to the new connection's replies.
    for (v4, local_port) in [(true, 20_123), (false, 20_124)] {
        let vip = SocketAddr::new(lab.cluster_ip("web", v4).unwrap(), 80);
        let through_service = request_from_port(&lab, "client", local_port, vip)
            .unwrap_or_else(|e| panic!("client:{local_port} -> {vip}: {e}"));
        let backend = answered_by(&through_service);
        let direct = SocketAddr::new(lab.pod(&backend).unwrap().ip(v4), POD_PORT);
        let again = request_from_port(&lab, "client", local_port, direct)
            .unwrap_or_else(|e| panic!("client:{local_port} -> {direct} after the Service flow on that port: {e}"));
        assert_eq!(answered_by(&again), backend, "{again}");
    }

    // A connection the pod resets leaves no conntrack entry behind, so that the map holds live
    // flows; one it closes with a FIN keeps its entries until they go idle or are evicted.
    {
        use ferrynet_common::{CT_FORWARD, CT4_MAP, CtKey4, CtValue, PROTO_TCP};
        use std::io::{BufRead, BufReader, Write};
        let ct = pinned_map::<CtKey4, CtValue>(&lab, "n1", CT4_MAP);
        let client = lab.pod("client").unwrap().ip(true);
        let vip = lab.cluster_ip("web", true).unwrap();
        let forward = |local_port: u16| {
            let key = CtKey4 {
                saddr: u32::from_ne_bytes(ip4(client).octets()),
                daddr: u32::from_ne_bytes(ip4(vip).octets()),
                sport: local_port.to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                direction: CT_FORWARD,
                _pad: [0; 2],
            };
            ct.get(&key, 0).ok()
        };
        for (local_port, reset) in [(20_125, false), (20_126, true)] {
            let ns = lab.pod_ns("client").unwrap();
            let stream = ferrynet_kernel::netns::run_in(ns.fd(), || {
                ferrynet_tests::probe::connect_from_port(SocketAddr::new(vip, 80), local_port, Duration::from_secs(3))
            })
            .unwrap();
            (&stream).write_all(b"hello\n").unwrap();
            let mut answer = String::new();
            BufReader::new(&stream).read_line(&mut answer).unwrap();
            assert!(
                forward(local_port).is_some(),
                "the open flow from :{local_port} is tracked"
            );
            if reset {
                ferrynet_tests::probe::reset_on_close(&stream).unwrap();
            }
            drop(stream);
            if reset {
                assert!(
                    eventually(Duration::from_secs(5), || forward(local_port).is_none()),
                    "the reset flow's entry went"
                );
            } else {
                assert!(forward(local_port).is_some(), "a FIN leaves the entry");
            }
        }
    }

    // The port gates: a packet to a port no frontend has skips the service map, one from a port
    // no backend has skips the reply lookups. The Service's ports (80, 53) and the backends'
    // (POD_PORT) are open, ports nothing uses closed; a NodePort's opens with its Service and
    // closes after it goes.
    let gate = |lab: &Lab, name: &str, port: u16| port_gate_closed(lab, "n1", name, port);
    use ferrynet_common::{PORTS_WITHOUT_BACKENDS_MAP, PORTS_WITHOUT_FRONTENDS_MAP};
    for (name, open, closed) in [
        (PORTS_WITHOUT_FRONTENDS_MAP, [80, 53], [81, 9]),
        (PORTS_WITHOUT_BACKENDS_MAP, [POD_PORT, POD_PORT], [81, 9]),
    ] {
        for port in open {
            assert!(!gate(&lab, name, port), "{name}: {port} is in use");
        }
        for port in closed {
            assert!(gate(&lab, name, port), "{name}: {port} is not");
        }
    }

    // NodePorts from a pod, per packet: on its own node's addresses (the pod program translates
    // them as a ClusterIP, replies coming from the address the pod sent to) and on another
    // node's (that node's uplink program does), both families, both backends.
    let mut node_port = service(
        "web-np",
        "web",
        vec![port("http", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    node_port.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    lab.create_service_object(&node_port).unwrap();
    let np = node_ports(&lab, "web-np")[0];
    let both: BTreeSet<String> = ["web-1", "web-2"].map(String::from).into();
    let flows_before = datapath_counter(&lab, "n1", "packet_flows_translated");
    for node in lab.state.nodes.clone() {
        for addr in [std::net::IpAddr::from(node.v4()), node.v6().into()] {
            let to = SocketAddr::new(addr, np);
            let mut seen = BTreeSet::new();
            for _ in 0..6 {
                seen.extend(answers(&lab, "pod-client", to, false, 8));
                if seen == both {
                    break;
                }
            }
            assert_eq!(seen, both, "pod-client -> {to} ({})", node.name);
        }
    }
    assert!(
        eventually(Duration::from_secs(20), || datapath_counter(
            &lab,
            "n1",
            "packet_flows_translated"
        ) > flows_before),
        "the pod program translated the NodePort on its own node"
    );
    assert_eq!(datapath_counter(&lab, "n1", "sock_translated"), 0);
    // The node connecting to a pod from a port that is also a NodePort: the pod's answer goes to
    // the node's address on that port, and is an answer, not a new flow to the NodePort.
    let pod_addr = SocketAddr::new(lab.pod("web-1").unwrap().ip(true), POD_PORT);
    let answer = request_from_port_in(&lab.node_ns("n1").unwrap(), np, pod_addr)
        .unwrap_or_else(|e| panic!("n1:{np} -> {pod_addr}: {e}"));
    assert_eq!(answered_by(&answer), "web-1", "{answer}");
    assert!(!gate(&lab, PORTS_WITHOUT_FRONTENDS_MAP, np), "the NodePort is open");
    lab.delete_service("web-np").unwrap();
    assert!(
        eventually(Duration::from_secs(20), || gate(&lab, PORTS_WITHOUT_FRONTENDS_MAP, np)),
        "the NodePort closes when its Service goes"
    );
    assert!(!gate(&lab, PORTS_WITHOUT_FRONTENDS_MAP, 80), "port 80 is still web's");

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
    // The same per packet (socket LB off). The node has no default route: a refused packet
    // must reach the reject without one.
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
            // Translated per packet, not by a socket LB link left behind: the pod sees its own
            // connection come from the hairpin address.
            let answer = lab.probe("pod-self", SocketAddr::new(vip, p), false).unwrap();
            let hairpin = if v4 { "169.254.7.1" } else { "100::701" };
            assert!(answer.contains(&format!("client={hairpin} ")), "{answer}");
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
    // `explain` says why: the policy, the backend it keeps and the one it leaves out.
    let explained = agent_cli(&lab, "n1", &["explain", &to.to_string()]);
    let (l1, l2) = (
        lab.pod("l1").unwrap().ip(true).to_string(),
        lab.pod("l2").unwrap().ip(true).to_string(),
    );
    assert!(explained.contains("is service default/local"), "{explained}");
    assert!(explained.contains("traffic policy: Local"), "{explained}");
    let line = |ip: &str| {
        explained
            .lines()
            .find(|l| l.contains(&format!("{ip}:")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line(&l1).contains("ready"), "{explained}");
    assert!(line(&l2).contains("excluded"), "{explained}");
    // An endpoint that is not ready joins: the maps stay as they are (it is neither picked nor
    // kept for flows), but `explain` must name it and why.
    lab.run_pod("l3", "n1", &labels(&[("app", "waiting")])).unwrap();
    lab.set_pod_ready("l3", false).unwrap();
    lab.api()
        .unwrap()
        .merge_patch::<Pod>("l3", serde_json::json!({"metadata": {"labels": {"app": "local"}}}))
        .unwrap();
    let l3 = format!("{}:", lab.pod("l3").unwrap().ip(true));
    let mut explained = String::new();
    let named = eventually(Duration::from_secs(20), || {
        explained = agent_cli(&lab, "n1", &["explain", &to.to_string()]);
        explained.lines().any(|l| l.contains(&l3) && l.contains("not ready"))
    });
    assert!(named, "{explained}");
    assert_eq!(answers(&lab, "n1", to, false, 6), ["l1".to_string()].into());
    let other_vip = SocketAddr::new(lab.cluster_ip("other", true).unwrap(), 80);
    let listed = services_listing(&lab, "n1");
    assert!(listed.contains(&to.to_string()), "{listed}");
    assert!(!listed.contains(&other_vip.ip().to_string()), "{listed}");
    assert!(!listed.contains("headless") && !listed.contains("external"), "{listed}");
    // The lab's agents are given no Service CIDRs: they read them from the API's ServiceCIDR
    // objects (the stand-in keeps `kubernetes`, as the real API server does). An address there
    // that no Service holds, and a port a Service does not have, are refused instead of leaking
    // out; so is the other proxy's Service, which ferrynet does not translate (kube-proxy's
    // nftables mode, which does not know it either, drops it).
    let wrong_port = SocketAddr::new(lab.cluster_ip("local", true).unwrap(), 9999);
    for to in ["10.96.200.200:80", "[fd00:96::ffff]:80"] {
        let to: SocketAddr = to.parse().unwrap();
        let err = eventually_err(&lab, "n1", to);
        assert!(err.contains("refused"), "{to}: {err}");
    }
    for to in [wrong_port, other_vip] {
        let err = eventually_err(&lab, "n1", to);
        assert!(err.contains("refused"), "{to}: {err}");
    }
    // A ServiceCIDR added is refused in within moments, and no longer once it is deleted (the
    // node has no route there: the probe fails some other way).
    let extra: ServiceCIDR = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": "extra"},
        "spec": {"cidrs": ["10.97.0.0/24"]}
    }))
    .unwrap();
    lab.api().unwrap().create(&extra).unwrap();
    let in_extra: SocketAddr = "10.97.0.9:80".parse().unwrap();
    let err = eventually_err(&lab, "n1", in_extra);
    assert!(err.contains("refused"), "{in_extra}: {err}");
    lab.api().unwrap().delete::<ServiceCIDR>("extra").unwrap();
    let left = eventually(Duration::from_secs(20), || {
        lab.probe("n1", in_extra, false)
            .err()
            .is_some_and(|e| !e.to_string().contains("refused"))
    });
    assert!(left, "{in_extra} is still refused after its ServiceCIDR went");
    // The API server's own Service, as the real API server keeps it: its endpoint is the
    // stand-in's address, outside the nodes (as a managed control plane's is). Once the agent
    // translates it, it knows where the API server is.
    let api_server: SocketAddr = ferrynet_tests::lab::API_ADDR.parse().unwrap();
    let kubernetes: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": api_server.port()}]}
    }))
    .unwrap();
    let kubernetes = lab.api().unwrap().create(&kubernetes).unwrap();
    let api_slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes"}
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [api_server.ip().to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": api_server.port(), "protocol": "TCP"}]
    }))
    .unwrap();
    lab.api().unwrap().create(&api_slice).unwrap();
    let kubernetes_vip = SocketAddr::new(kubernetes.spec.unwrap().cluster_ip.unwrap().parse().unwrap(), 443);
    let translated = eventually(Duration::from_secs(20), || {
        services_listing(&lab, "n1")
            .lines()
            .any(|l| l.contains(&kubernetes_vip.to_string()))
    });
    assert!(translated, "{}", services_listing(&lab, "n1"));
    // A hostile ServiceCIDR holding a node's address, another's pods and the API server: those
    // CIDRs are left out (said in the status), its good one is refused in, and the nodes still
    // reach each other, the pods and the API server.
    let n2 = lab.state.nodes.iter().find(|n| n.name == "n2").unwrap().clone();
    let api_server_cidr = format!("{}/32", api_server.ip());
    let hostile: ServiceCIDR = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": "hostile"},
        "spec": {"cidrs": [format!("{}/32", n2.v4()), "10.244.0.0/16", api_server_cidr, "10.97.1.0/24"]}
    }))
    .unwrap();
    lab.api().unwrap().create(&hostile).unwrap();
    let in_good: SocketAddr = "10.97.1.9:80".parse().unwrap();
    let err = eventually_err(&lab, "n1", in_good);
    assert!(err.contains("refused"), "{in_good}: {err}");
    let mut left_out = String::new();
    let said = eventually(Duration::from_secs(10), || {
        left_out = lab.agent_status("n1").map_or_else(
            |e| e.to_string(),
            |s| s["services"]["details"]["serviceCidrsLeftOut"].to_string(),
        );
        left_out.contains(&format!("{}/32 holds node n2's InternalIP", n2.v4()))
            && left_out.contains("10.244.0.0/16 holds node n")
            && left_out.contains(&format!("holds the API server's address {}", api_server.ip()))
    });
    assert!(said, "{left_out}");
    // The node's own connections to the API server are not refused (the stand-in answers
    // something other than a pod's answer: any error but a refusal is an answer).
    let reached = lab.probe("n1", api_server, false).unwrap_or_else(|e| e.to_string());
    assert!(!reached.contains("refused"), "the API server from n1: {reached}");
    let l2_pod = SocketAddr::new(lab.pod("l2").unwrap().ip(true), POD_PORT);
    assert_eq!(answered_by(&lab.probe("n1", l2_pod, false).unwrap()), "l2");
    let healthz = format!("http://{}:10256/healthz", n2.v4());
    let code = lab
        .exec_capture(
            "n1",
            &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &healthz].map(String::from),
        )
        .unwrap_or_default();
    assert!(matches!(code.trim(), "200" | "503"), "n2's /healthz from n1: {code:?}");
    lab.api().unwrap().delete::<ServiceCIDR>("hostile").unwrap();
    let cleared = eventually(Duration::from_secs(10), || {
        lab.agent_status("n1")
            .is_ok_and(|s| s["services"]["details"]["serviceCidrsLeftOut"].is_null())
    });
    assert!(cleared, "serviceCidrsLeftOut stayed after the hostile ServiceCIDR went");
    lab.api().unwrap().delete::<EndpointSlice>("kubernetes").unwrap();
    lab.api().unwrap().delete::<Service>("kubernetes").unwrap();

    // `--service-cidrs none`: nothing is refused for being in them, and nothing translates the
    // other proxy's Service: the node has no route for it.
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", &["--service-cidrs", "none"]).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    let untouched = |to: SocketAddr| {
        eventually(Duration::from_secs(20), || {
            lab.probe("n1", to, false)
                .err()
                .is_some_and(|e| !e.to_string().contains("refused"))
        })
    };
    assert!(
        untouched("10.96.200.200:80".parse().unwrap()),
        "refused with --service-cidrs none"
    );
    assert!(
        untouched(other_vip),
        "the other proxy's Service was refused or answered"
    );

    // Given by `--service-cidrs`, as the DaemonSet's ConfigMap gives them (one the API does not
    // have): refused again.
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", &["--service-cidrs", "10.96.0.0/16,10.97.3.0/24,fd00:96::/108"])
        .unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    let flag_only: SocketAddr = "10.97.3.9:80".parse().unwrap();
    for to in ["10.96.200.200:80", "[fd00:96::ffff]:80"] {
        let to: SocketAddr = to.parse().unwrap();
        let err = eventually_err(&lab, "n1", to);
        assert!(err.contains("refused"), "{to}: {err}");
    }
    for to in [wrong_port, flag_only] {
        let err = eventually_err(&lab, "n1", to);
        assert!(err.contains("refused"), "{to}: {err}");
    }

    // Moved from the flag to the API while the API is down: the flag's CIDRs are no guess at
    // the API's, so nothing is refused for being in them until the API is read (the pinned
    // datapath kept refusing them while no agent ran); then the API's are.
    lab.stop_agent("n1").unwrap();
    lab.stop_apiserver().unwrap();
    lab.start_agent_with("n1", &[]).unwrap();
    assert!(untouched(flag_only), "{flag_only}, the flag's alone, is still refused");
    assert!(
        untouched("10.96.200.200:80".parse().unwrap()),
        "the flag's CIDRs are still refused in before the API is read"
    );
    lab.start_apiserver().unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    let err = eventually_err(&lab, "n1", "10.96.200.200:80".parse().unwrap());
    assert!(err.contains("refused"), "10.96.200.200:80 from the API's CIDRs: {err}");
    assert!(
        untouched(flag_only),
        "{flag_only} is refused again once the API is read"
    );
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

/// Restarts `node`'s agent with `args` on a datapath made anew (after `ferrynet-agent cleanup`):
/// pinned maps keep the size they were made with, so a map size in `args` needs a fresh start.
fn start_agent_afresh(lab: &Lab, node: &str, args: &[&str]) {
    lab.stop_agent(node).unwrap();
    agent_cli(lab, node, &["cleanup"]);
    lab.start_agent_with(node, args).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
}

/// `ferrynet-agent services` on `node`, reading the pinned maps.
fn services_listing(lab: &Lab, node: &str) -> String {
    agent_cli(lab, node, &["services"])
}

/// `ferrynet-agent <args>` on `node`, with the node agent's pin path and state dir.
fn agent_cli(lab: &Lab, node: &str, args: &[&str]) -> String {
    let pins = lab.node_pin_path(node).display().to_string();
    let state = lab.dir().join("nodes").join(node).join("agent").display().to_string();
    let out = lab.node_ns(node).unwrap().command_output(
        Command::new(binary("ferrynet-agent"))
            .args(["--bpf-pin-path", &pins, "--state-dir", &state])
            .args(args),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `node`'s pinned maps give `frontend` exactly `backends` (by address).
#[track_caller]
fn wait_backends(lab: &Lab, node: &str, frontend: &str, backends: &[std::net::IpAddr]) {
    let mut last = String::new();
    let ok = eventually(Duration::from_secs(20), || {
        last = services_listing(lab, node);
        let Some(line) = last.lines().find(|l| l.starts_with(frontend)) else {
            return backends.is_empty();
        };
        let listed = line.matches(':').count();
        backends.iter().all(|b| line.contains(&format!("{b}:")))
            && !line.contains("terminating")
            && listed >= backends.len()
            && line.split(", ").count() == backends.len()
    });
    assert!(ok, "{frontend} on {node} never had exactly {backends:?}:\n{last}");
}

/// A dnsmasq in pod `pod` answering `demo.test` with `answer`.
fn start_dnsmasq(lab: &Lab, pod: &str, answer: &str) {
    let pid_file = lab.dir().join(format!("dnsmasq-{pod}.pid")).display().to_string();
    lab.spawn_in(
        &format!("pod-{pod}"),
        &format!("dnsmasq-{pod}"),
        &[
            "/usr/sbin/dnsmasq".into(),
            "--keep-in-foreground".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            format!("--pid-file={pid_file}"),
            format!("--address=/demo.test/{answer}"),
            "--port=53".into(),
        ],
    )
    .unwrap();
}

/// `dig` from `part` for demo.test at `server`: the answer, if any.
fn dig(lab: &Lab, part: &str, server: std::net::IpAddr) -> String {
    lab.exec_capture(
        part,
        &[
            "dig".into(),
            format!("@{server}"),
            "demo.test".into(),
            "+short".into(),
            "+time=1".into(),
            "+tries=1".into(),
        ],
    )
    .unwrap_or_default()
    .trim()
    .to_string()
}

#[test]
fn dns_over_a_udp_clusterip_keeps_answering_when_its_backend_is_replaced() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("dns-1", "n1", &labels(&[("app", "dns")])).unwrap();
    start_dnsmasq(&lab, "dns-1", "10.1.2.3");
    lab.run_pod("client", "n2", &BTreeMap::new()).unwrap();
    lab.create_service_object(&service(
        "dns",
        "dns",
        vec![
            port("dns", "UDP", 53, IntOrString::Int(53)),
            port("dns-tcp", "TCP", 53, IntOrString::Int(53)),
        ],
    ))
    .unwrap();
    let vip = lab.cluster_ip("dns", true).unwrap();
    for part in ["pod-client", "n2"] {
        assert!(
            eventually(Duration::from_secs(20), || dig(&lab, part, vip) == "10.1.2.3"),
            "{part}: {}",
            dig(&lab, part, vip)
        );
    }
    // The backend is replaced: the new one first, then the old one goes (gracefully).
    lab.run_pod("dns-2", "n2", &labels(&[("app", "dns")])).unwrap();
    start_dnsmasq(&lab, "dns-2", "10.1.2.4");
    let dns2 = lab.pod("dns-2").unwrap().ip(true);
    // The new one answers (at its own address) before the old one goes, as a readiness probe
    // would have it.
    assert!(eventually(Duration::from_secs(20), || dig(&lab, "n2", dns2) == "10.1.2.4"));
    lab.terminate_pod("dns-1").unwrap();
    wait_backends(&lab, "n2", &format!("{vip}:53/udp"), &[dns2]);
    lab.delete_pod("dns-1").unwrap();
    for part in ["pod-client", "n2"] {
        for _ in 0..5 {
            assert_eq!(dig(&lab, part, vip), "10.1.2.4", "{part}");
        }
    }
}

/// The `connected` (UDP) client's log: (unix ms, answering pod or the error).
/// Starts a long-lived connected UDP client in `part` (as daemon `what`): a request every 50 ms
/// for 30 s to `to`, each answer or error logged to `out`.
fn start_connected_udp(lab: &Lab, part: &str, what: &str, to: SocketAddr, out: &std::path::Path) {
    lab.spawn_in(
        part,
        what,
        &[
            binary("ferrynet-lab").display().to_string(),
            "probe".into(),
            "connected".into(),
            to.to_string(),
            "--seconds".into(),
            "30".into(),
            "--interval-ms".into(),
            "50".into(),
            "--out".into(),
            out.display().to_string(),
        ],
    )
    .unwrap();
}

fn connected_log(path: &std::path::Path) -> Vec<(u64, Result<String, String>)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ' ');
            let at: u64 = parts.next()?.parse().ok()?;
            let kind = parts.next()?;
            let rest = parts.next().unwrap_or_default();
            Some((
                at,
                if kind == "ok" {
                    Ok(answered_by(rest))
                } else {
                    Err(rest.to_string())
                },
            ))
        })
        .collect()
}

#[test]
fn a_connected_udp_socket_leaves_a_removed_backend_within_a_second() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("u1", "n1", &labels(&[("app", "udp")])).unwrap();
    lab.run_pod("client", "n1", &BTreeMap::new()).unwrap();
    lab.create_service_object(&service(
        "udp",
        "udp",
        vec![port("p", "UDP", 9000, IntOrString::Int(i32::from(POD_PORT)))],
    ))
    .unwrap();
    let to = SocketAddr::new(lab.cluster_ip("udp", true).unwrap(), 9000);
    assert_eq!(answers(&lab, "pod-client", to, true, 1), ["u1".to_string()].into());
    // Long-lived connected UDP sockets, as DNS clients keep: in a pod and on the node.
    let clients = [("pod-client", "udp-pod"), ("n1", "udp-node")];
    for (part, what) in clients {
        let out = lab.dir().join(format!("{what}.log"));
        start_connected_udp(&lab, part, what, to, &out);
    }
    let dir = lab.dir().to_path_buf();
    let log = |what: &str| connected_log(&dir.join(format!("{what}.log")));
    for (_, what) in clients {
        assert!(
            eventually(Duration::from_secs(10), || log(what)
                .iter()
                .filter(|(_, r)| r.as_deref() == Ok("u1"))
                .count()
                >= 3),
            "{what}: {:?}",
            log(what)
        );
    }
    // Another backend joins: the connected sockets stay where they are.
    lab.run_pod("u2", "n2", &labels(&[("app", "udp")])).unwrap();
    // The first backend leaves the Service while its server still runs: only the datapath can
    // move the sockets (nothing else would ever stop u1 from answering).
    let removed_at = ferrynet_tests::probe::unix_ms();
    lab.set_pod_ready("u1", false).unwrap();
    for (_, what) in clients {
        assert!(
            eventually(Duration::from_secs(10), || log(what)
                .iter()
                .any(|(at, r)| *at > removed_at && r.as_deref() == Ok("u2"))),
            "{what} never reached u2: {:?}",
            log(what)
        );
        let entries = log(what);
        let moved = entries
            .iter()
            .find(|(at, r)| *at > removed_at && r.as_deref() == Ok("u2"))
            .unwrap()
            .0;
        assert!(moved - removed_at < 1_000, "{what} took {} ms", moved - removed_at);
        // It was the datapath that aborted the socket (a destroyed UDP socket reports the abort,
        // and is no longer connected), and nothing reached u1 afterwards.
        assert!(
            entries.iter().any(|(at, r)| *at > removed_at
                && r.as_ref()
                    .is_err_and(|e| e.contains("abort") || e.contains("Destination address required"))),
            "{what}: {entries:?}"
        );
        assert!(
            !entries.iter().any(|(at, r)| *at > moved && r.as_deref() == Ok("u1")),
            "{what}: {entries:?}"
        );
    }
}

#[test]
fn a_tcp_client_of_a_removed_backend_fails_fast_however_many_sockets_came_and_went_since() {
    // A small socket map, which the short connections below pass through three times over.
    const SOCKETS: u64 = 2048;
    let mut lab = LabGuard::up(1, "native");
    start_agent_afresh(&lab, "n1", &["--max-sockets", &SOCKETS.to_string()]);
    for pod in ["h1", "h2"] {
        lab.run_pod(pod, "n1", &labels(&[("app", "held")])).unwrap();
    }
    lab.run_pod("client", "n1", &BTreeMap::new()).unwrap();
    lab.create_service_object(&service(
        "held",
        "held",
        vec![port("p", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    ))
    .unwrap();
    let vip = lab.cluster_ip("held", true).unwrap();
    let to = SocketAddr::new(vip, 80);
    let ip = |pod: &str| lab.pod(pod).unwrap().ip(true);
    wait_backends(&lab, "n1", &format!("{to}/tcp"), &[ip("h1"), ip("h2")]);
    answers(&lab, "pod-client", to, false, 1);

    // A long-lived connection, as a pooled HTTP or gRPC client keeps.
    let (held_log, ask_peer) = (lab.dir().join("held.log"), lab.dir().join("held.ask-peer"));
    lab.spawn_in(
        "pod-client",
        "held",
        &[
            binary("ferrynet-lab").display().to_string(),
            "probe".into(),
            "connected".into(),
            to.to_string(),
            "--tcp".into(),
            "--seconds".into(),
            "120".into(),
            "--interval-ms".into(),
            "50".into(),
            "--out".into(),
            held_log.display().to_string(),
            "--ask-peer".into(),
            ask_peer.display().to_string(),
        ],
    )
    .unwrap();
    let raw = || std::fs::read_to_string(&held_log).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(10), || connected_log(&held_log)
            .iter()
            .filter(|(_, r)| r.is_ok())
            .count()
            >= 3),
        "{}",
        raw()
    );
    let held_by = connected_log(&held_log)
        .into_iter()
        .find_map(|(_, r)| r.ok())
        .expect("an answer");
    let other = if held_by == "h1" { "h2" } else { "h1" };

    // Then many short connections from the same pod, each closed by its client, more than the
    // socket map holds: closed sockets must leave the map, not push the held one out of it.
    let load = LoadProbe::start(&lab, "pod-client", "short", to);
    let progress = || load.progress();
    let enough = eventually(Duration::from_secs(120), || progress().0 >= 3 * SOCKETS);
    load.stop(&lab);
    assert!(enough, "short connections: {:?}", progress());
    let (_, failed) = progress();
    assert_eq!(failed, 0, "{}", load.report());
    // The held socket still shows the Service address (its entry is still there).
    let peers = || raw().lines().filter(|l| l.contains(" peer=")).count();
    let before = peers();
    std::fs::write(&ask_peer, "").unwrap();
    assert!(eventually(Duration::from_secs(10), || peers() > before), "{}", raw());
    let last_peer = raw()
        .lines()
        .rfind(|l| l.contains(" peer="))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        last_peer.ends_with(&format!("peer={to}")),
        "getpeername after the load: {last_peer}"
    );

    // Its backend leaves the Service while its server still runs: only the datapath can end the
    // connection, and the client must see it at once rather than talk on to a removed backend.
    let removed_at = ferrynet_tests::probe::unix_ms();
    lab.set_pod_ready(&held_by, false).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || connected_log(&held_log)
            .iter()
            .any(|(at, r)| *at > removed_at && r.as_deref() == Ok(other))),
        "the held connection never moved to {other}:\n{}",
        raw()
    );
    let entries = connected_log(&held_log);
    let aborted = entries
        .iter()
        .find(|(at, r)| *at > removed_at && r.is_err())
        .unwrap_or_else(|| panic!("no error after the removal:\n{}", raw()));
    assert!(
        aborted.1.as_ref().is_err_and(|e| e.contains("abort")),
        "the datapath aborts the socket: {aborted:?}"
    );
    assert!(
        aborted.0 - removed_at < 1_000,
        "the client learnt after {} ms",
        aborted.0 - removed_at
    );
    assert!(
        !entries
            .iter()
            .any(|(at, r)| *at > aborted.0 && r.as_deref() == Ok(held_by.as_str())),
        "{}",
        raw()
    );
    // Counted in the metrics (refreshed every resync).
    assert!(eventually(Duration::from_secs(40), || datapath_counter(
        &lab,
        "n1",
        "sockets_terminated"
    ) >= 1));
}

#[test]
fn no_request_fails_while_backends_roll_and_the_agent_is_killed_and_upgraded() {
    let mut lab = rolling_backends("ClusterIP");
    lab.run_pod("client", "n1", &BTreeMap::new()).unwrap();
    let vip = lab.cluster_ip("roll", true).unwrap();
    steady_load_through_rolls_and_agent_restarts(&mut lab, "pod-client", SocketAddr::new(vip, 80));
}

#[test]
fn no_node_port_request_fails_while_backends_roll_and_the_agent_is_killed_and_upgraded() {
    // From outside, into n1: a local backend there (no SNAT) and remote ones on n2 (SNAT).
    let mut lab = rolling_backends("NodePort");
    let node_port = node_ports(&lab, "roll")[0];
    let n1 = lab.state.nodes.iter().find(|n| n.name == "n1").unwrap().v4();
    steady_load_through_rolls_and_agent_restarts(&mut lab, "client", SocketAddr::new(n1.into(), node_port));
}

/// Two nodes, backends b1 (n1), b2 and b3 (n2), and a Service `roll` of `kind` selecting them.
fn rolling_backends(kind: &str) -> LabGuard {
    let mut lab = LabGuard::up(2, "native");
    for (pod, node) in [("b1", "n1"), ("b2", "n2"), ("b3", "n2")] {
        lab.run_pod(pod, node, &labels(&[("app", "roll")])).unwrap();
    }
    let mut svc = service(
        "roll",
        "roll",
        vec![port("p", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    svc.spec.as_mut().unwrap().type_ = Some(kind.into());
    lab.create_service_object(&svc).unwrap();
    lab
}

/// Steady load from `client` to `to` (a frontend n1 translates), while the backends scale down
/// gracefully and are all replaced, and n1's agent is killed and restarted, then upgraded: not
/// one request may fail.
fn steady_load_through_rolls_and_agent_restarts(lab: &mut LabGuard, client: &str, to: SocketAddr) {
    let frontend = if to.ip() == lab.cluster_ip("roll", true).unwrap() {
        format!("{to}/tcp")
    } else {
        format!("0.0.0.0:{}/tcp", to.port())
    };
    answers(lab, client, to, false, 1);
    let load = LoadProbe::start(lab, client, "load", to);
    let progress = || load.progress();
    // Waits until the load has made `more` successful requests beyond `from`.
    let advance = |more: u64| {
        let from = progress().0;
        assert!(
            eventually(Duration::from_secs(30), || progress().0 >= from + more),
            "the load stalled: {:?}",
            progress()
        );
    };
    advance(50);
    // The load makes one request at a time: once it has made a few more after n1 stopped
    // choosing a terminating backend, none is in flight to that backend, and deleting the pod
    // (which kills its server) cannot cut one off. A terminating backend keeps its established
    // connections; a pod that goes while one is open loses it whatever the proxy.
    let drain = || advance(3);

    // Graceful scale-down: b3 terminates (out of the slots while ready ones exist), then goes.
    let ip = |lab: &Lab, pod: &str| lab.pod(pod).unwrap().ip(true);
    lab.terminate_pod("b3").unwrap();
    wait_backends(lab, "n1", &frontend, &[ip(lab, "b1"), ip(lab, "b2")]);
    drain();
    lab.delete_pod("b3").unwrap();
    advance(50);

    // A rolling replacement of every backend: a new one ready, an old one terminating, gone.
    for (old, new, node) in [("b1", "c1", "n1"), ("b2", "c2", "n2")] {
        lab.run_pod(new, node, &labels(&[("app", "roll")])).unwrap();
        lab.terminate_pod(old).unwrap();
        let mut live: Vec<_> = lab
            .state
            .pods
            .iter()
            .filter(|p| p.labels.get("app").map(String::as_str) == Some("roll") && p.name != old)
            .map(|p| p.ip(true))
            .collect();
        live.sort();
        wait_backends(lab, "n1", &frontend, &live);
        drain();
        lab.delete_pod(old).unwrap();
        advance(50);
    }

    // The client's node's agent is killed outright, and comes back: the pinned datapath goes on
    // translating meanwhile, and the new agent adopts it.
    lab.kill_agent("n1").unwrap();
    advance(50);
    lab.start_agent("n1").unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    advance(50);

    // An upgrade: an agent whose programs differ replaces the attached ones, keeping the maps.
    let link = lab.node_pin_path("n1").join("v1/links/cgroup/sock4_connect");
    let before = ferrynet_agent_link_program(lab, &link);
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", &["--datapath-revision", "1"]).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || ferrynet_agent_link_program(lab, &link)
            != before),
        "the upgraded agent's programs are not attached"
    );
    advance(50);

    load.stop(lab);
    let text = load.report();
    let (ok, failed) = progress();
    assert!(ok > 300, "{text}");
    assert_eq!(failed, 0, "failed requests:\n{text}");
}

/// A steady load of new connections (`ferrynet-lab probe load`), run as a daemon of the lab.
struct LoadProbe {
    what: String,
    stop: std::path::PathBuf,
    out: std::path::PathBuf,
}

impl LoadProbe {
    /// Starts the load from `part` to `to`, as the lab's daemon `what`.
    fn start(lab: &Lab, part: &str, what: &str, to: SocketAddr) -> Self {
        let (stop, out) = (
            lab.dir().join(format!("{what}.stop")),
            lab.dir().join(format!("{what}.out")),
        );
        lab.spawn_in(
            part,
            what,
            &[
                binary("ferrynet-lab").display().to_string(),
                "probe".into(),
                "load".into(),
                to.to_string(),
                "--stop".into(),
                stop.display().to_string(),
                "--out".into(),
                out.display().to_string(),
            ],
        )
        .unwrap();
        Self {
            what: what.to_string(),
            stop,
            out,
        }
    }

    /// The requests that succeeded and failed so far.
    fn progress(&self) -> (u64, u64) {
        let text = self.report();
        let mut first = text.lines().next().unwrap_or("0 0").split_whitespace();
        let ok = first.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let failed = first.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        (ok, failed)
    }

    /// What the load wrote: its counts, then every failure.
    fn report(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Stops the load, and waits until it has exited (having written its last counts).
    fn stop(&self, lab: &Lab) {
        std::fs::write(&self.stop, "").unwrap();
        let exited = || {
            lab.daemon_pid(&self.what).is_none_or(|pid| {
                !std::path::Path::new(&format!("/proc/{pid}")).exists()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .unwrap_or_default()
                        .contains(") Z")
            })
        };
        assert!(
            eventually(Duration::from_secs(10), exited),
            "the load {} did not stop",
            self.what
        );
    }
}

/// The id of the program the pinned link at `path` runs (bpftool's view of the link).
fn ferrynet_agent_link_program(lab: &Lab, path: &std::path::Path) -> u64 {
    let _ = lab;
    let out = Command::new("bpftool")
        .args(["link", "show", "pinned"])
        .arg(path)
        .arg("-j")
        .output()
        .unwrap();
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    link["prog_id"].as_u64().unwrap_or(0)
}

#[test]
fn cleanup_and_service_proxy_off_leave_no_program_link_map_or_pin() {
    let mut lab = LabGuard::up(1, "native");
    lab.run_pod("b", "n1", &labels(&[("app", "gone")])).unwrap();
    lab.create_service_object(&service(
        "gone",
        "gone",
        vec![port("p", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    ))
    .unwrap();
    let vip = lab.cluster_ip("gone", true).unwrap();
    answers(&lab, "n1", SocketAddr::new(vip, 80), false, 1);
    let pins = lab.node_pin_path("n1");
    let cgroup = lab.node_cgroup("n1").unwrap();
    let veth = ferrynet_tests::cni::host_veth_of(&lab.pod("b").unwrap().container_id);
    let attached = || -> Vec<u64> {
        // Program ids attached to the node's cgroup and to the pod's veth, as the kernel says.
        let mut ids = Vec::new();
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&cgroup)
            .arg("-j")
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        ids.extend(v.as_array().into_iter().flatten().filter_map(|p| p["id"].as_u64()));
        // TCX attachments on the pod's host veth (the kernel's own list, queried in the node's
        // namespace).
        let node = lab.node_ns("n1").unwrap();
        // And on the node's uplink (its InternalIP's interface), for NodePorts.
        for (iface, hook) in [
            (veth.as_str(), aya::programs::TcAttachType::Ingress),
            (veth.as_str(), aya::programs::TcAttachType::Egress),
            ("eth0", aya::programs::TcAttachType::Ingress),
        ] {
            let tcx = ferrynet_kernel::netns::run_in(node.fd(), || {
                aya::programs::SchedClassifier::query_tcx(iface, hook).map_err(std::io::Error::other)
            });
            if let Ok((_, programs)) = tcx {
                ids.extend(programs.iter().map(|p| u64::from(p.id())));
            }
        }
        ids
    };
    // The uplink is attached at the agent's first scan of the node's addresses.
    eventually(Duration::from_secs(10), || attached().len() == 11);
    let programs = attached();
    assert_eq!(
        programs.len(),
        11,
        "9 socket hooks (8 address hooks and sock_release), the veth's ingress (socket LB leaves \
         its egress bare: the per-packet path's replies are none) and the uplink's: {programs:?}"
    );
    let loaded = |id: u64| {
        Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .unwrap()
            .status
            .success()
    };
    let pinned = || -> usize { walk(&pins) };

    // With the agent down, `cleanup` removes everything the datapath made.
    lab.stop_agent("n1").unwrap();
    let out = lab.node_ns("n1").unwrap().command_output(
        Command::new(binary("ferrynet-agent"))
            .args(lab.agent_args("n1"))
            .arg("cleanup"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(pinned(), 0);
    assert!(attached().is_empty(), "{:?}", attached());
    assert!(
        eventually(Duration::from_secs(10), || !programs.iter().any(|id| loaded(*id))),
        "programs still loaded"
    );
    // Translation stopped; the pod's own address still works.
    assert!(lab.probe("n1", SocketAddr::new(vip, 80), false).is_err());
    assert!(
        lab.probe("n1", SocketAddr::new(lab.pod("b").unwrap().ip(true), POD_PORT), false)
            .is_ok()
    );

    // Back on: everything is there again.
    lab.start_agent("n1").unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    answers(&lab, "n1", SocketAddr::new(vip, 80), false, 1);
    eventually(Duration::from_secs(10), || attached().len() == 11);
    let programs = attached();
    assert_eq!(programs.len(), 11);
    // While the agent is down, the Service is deleted: back up, the agent removes its entries.
    lab.stop_agent("n1").unwrap();
    lab.api().unwrap().delete::<Service>("gone").unwrap();
    lab.start_agent("n1").unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || !services_listing(&lab, "n1")
            .contains(&vip.to_string())),
        "{}",
        services_listing(&lab, "n1")
    );

    // A size setting that differs from a pinned map's capacity is reported, not silently
    // ignored (the pinned map is kept, so that flows survive the restart).
    let map_warnings = || -> Vec<String> {
        lab.agent_status("n1").map_or_else(
            |_| Vec::new(),
            |status| {
                status["services"]["warnings"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|w| w["message"].as_str())
                    .filter(|m| m.contains("is pinned with"))
                    .map(str::to_string)
                    .collect()
            },
        )
    };
    let other_size = (ferrynet_common::DEFAULT_MAX_CONNTRACK * 2).to_string();
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", &["--max-conntrack", &other_size]).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    let reported = map_warnings();
    assert!(
        reported
            .iter()
            .any(|m| m.contains(ferrynet_common::CT4_MAP) && m.contains(&other_size)),
        "{reported:?}"
    );
    lab.stop_agent("n1").unwrap();
    lab.start_agent("n1").unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    assert_eq!(map_warnings(), Vec::<String>::new());

    // Restarted with --service-proxy=false, the agent removes the datapath an earlier run left.
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", &["--service-proxy", "false"]).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || pinned() == 0 && attached().is_empty()),
        "{} pins, {:?}",
        pinned(),
        attached()
    );
    assert!(eventually(Duration::from_secs(10), || !programs
        .iter()
        .any(|id| loaded(*id))));
    assert!(
        lab.probe("n1", SocketAddr::new(lab.pod("b").unwrap().ip(true), POD_PORT), false)
            .is_ok()
    );
}

/// How many pins (files) are under `dir`.
fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// The agent flags of a node that translates per packet only, with the lab's Service CIDRs (as the
/// DaemonSet's ConfigMap sets the cluster's), so that known ClusterIP flows go by their conntrack
/// entries.
const PER_PACKET_WITH_SERVICE_CIDRS: &[&str] =
    &["--socket-lb", "false", "--service-cidrs", "10.96.0.0/16,fd00:96::/108"];

/// One node with [`PER_PACKET_WITH_SERVICE_CIDRS`], a backend pod `backend`, a client pod and a
/// Service `name` of `backend` with port `svc_port`.
fn per_packet_node_with_one_backend(name: &str, backend: &str, svc_port: K8sServicePort) -> LabGuard {
    let mut lab = LabGuard::up(1, "native");
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", PER_PACKET_WITH_SERVICE_CIDRS).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    lab.run_pod(backend, "n1", &labels(&[("app", name)])).unwrap();
    lab.run_pod("client", "n1", &BTreeMap::new()).unwrap();
    lab.create_service_object(&service(name, name, vec![svc_port])).unwrap();
    lab
}

#[test]
fn a_udp_flow_translated_per_packet_moves_off_a_removed_backend_within_a_second() {
    // The flow's packets go by its conntrack entry alone between removals: the backend's removal
    // must reach them through the removal generation.
    let mut lab = per_packet_node_with_one_backend(
        "udp",
        "u1",
        port("p", "UDP", 9000, IntOrString::Int(i32::from(POD_PORT))),
    );
    let to = SocketAddr::new(lab.cluster_ip("udp", true).unwrap(), 9000);
    assert_eq!(answers(&lab, "pod-client", to, true, 1), ["u1".to_string()].into());
    // One flow (one source port), tracked per packet, pinned to u1 by its conntrack entry.
    let out = lab.dir().join("flow.log");
    start_connected_udp(&lab, "pod-client", "flow", to, &out);
    let log = || connected_log(&out);
    assert!(eventually(Duration::from_secs(10), || log()
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok("u1"))
        .count()
        >= 3));
    lab.run_pod("u2", "n1", &labels(&[("app", "udp")])).unwrap();
    let removed_at = ferrynet_tests::probe::unix_ms();
    lab.set_pod_ready("u1", false).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || log()
            .iter()
            .any(|(at, r)| *at > removed_at && r.as_deref() == Ok("u2"))),
        "{:?}",
        log()
    );
    let entries = log();
    let moved = entries
        .iter()
        .find(|(at, r)| *at > removed_at && r.as_deref() == Ok("u2"))
        .unwrap()
        .0;
    assert!(
        moved - removed_at < 1_000,
        "took {} ms: {entries:?}",
        moved - removed_at
    );
    // The same socket, the same flow: its stale conntrack entry went with the backend.
    assert!(
        !entries.iter().any(|(at, r)| *at > moved && r.as_deref() == Ok("u1")),
        "{entries:?}"
    );
}

/// The datapath settings pinned on `node`.
fn pinned_config(lab: &Lab, node: &str) -> aya::maps::Array<aya::maps::MapData, ferrynet_common::DatapathConfig> {
    let pin = lab
        .node_pin_path(node)
        .join(format!("v{}", ferrynet_common::SCHEMA_VERSION))
        .join("maps")
        .join(ferrynet_common::DATAPATH_CONFIG_MAP);
    let data = aya::maps::MapData::from_pin(&pin).unwrap();
    aya::maps::Array::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap()
}

#[test]
fn a_known_per_packet_flow_goes_by_its_conntrack_entry_until_the_removal_generation_moves() {
    use ferrynet_common::{
        CT_F_BACKEND, CT_FORWARD, CT4_MAP, CtKey4, CtValue, PROTO_TCP, SCOPE_INTERNAL, SERVICES4_MAP, ServiceKey4,
        ServiceValue,
    };
    // The Service CIDRs are set: only an address inside them takes the shortcut.
    let mut lab = per_packet_node_with_one_backend(
        "known",
        "k1",
        port("http", "TCP", 80, IntOrString::Int(i32::from(POD_PORT))),
    );
    let vip = lab.cluster_ip("known", true).unwrap();
    let to = SocketAddr::new(vip, 80);
    assert_eq!(answers(&lab, "pod-client", to, false, 1), ["k1".to_string()].into());

    // An open connection through the Service, translated per packet.
    let ns = lab.pod_ns("client").unwrap();
    let stream = ferrynet_kernel::netns::run_in(ns.fd(), || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
    })
    .unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(ask(&stream).unwrap(), "k1");
    assert_eq!(ask(&stream).unwrap(), "k1");
    // Its forward entry holds the backend, vouched for at the settings' removal generation.
    let ct = pinned_map::<CtKey4, CtValue>(&lab, "n1", CT4_MAP);
    let forward_entry = |stream: &std::net::TcpStream| {
        let local = stream.local_addr().unwrap();
        ct.get(
            &CtKey4 {
                saddr: u32::from_ne_bytes(ip4(local.ip()).octets()),
                daddr: u32::from_ne_bytes(ip4(vip).octets()),
                sport: local.port().to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                direction: CT_FORWARD,
                _pad: [0; 2],
            },
            0,
        )
        .expect("the open flow's forward entry")
    };
    let entry = forward_entry(&stream);
    let mut config = pinned_config(&lab, "n1");
    let settings = config.get(&0, 0).unwrap();
    assert_ne!(entry.flags & CT_F_BACKEND, 0, "{entry:?}");
    assert_eq!(entry.generation, settings.removal_generation, "{entry:?} {settings:?}");
    let k1 = ip4(lab.pod("k1").unwrap().ip(true));
    assert_eq!(entry.client_addr[0], u32::from_ne_bytes(k1.octets()), "{entry:?}");
    assert_eq!(entry.client_port, POD_PORT.to_be(), "{entry:?}");

    // With the agent stopped (nothing rewrites the maps), the frontend's entry goes behind the
    // generation's back: a new connection fails (an address of the Service CIDRs nobody holds),
    // while the open one goes on by its entry, the service map unread.
    lab.stop_agent("n1").unwrap();
    let mut services = pinned_map::<ServiceKey4, ServiceValue>(&lab, "n1", SERVICES4_MAP);
    services
        .remove(&ServiceKey4 {
            addr: u32::from_ne_bytes(ip4(vip).octets()),
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            scope: SCOPE_INTERNAL,
        })
        .unwrap();
    let refused = ferrynet_kernel::netns::run_in(ns.fd(), || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
    });
    assert!(
        refused.is_err(),
        "a new connection reached the frontend that went: {refused:?}"
    );
    for _ in 0..3 {
        assert_eq!(ask(&stream).unwrap(), "k1");
    }
    // The generation moves, as the agent moves it after a removal: the flow's next packet looks
    // its frontend up again, finds none, and is refused.
    config
        .set(
            0,
            ferrynet_common::DatapathConfig {
                removal_generation: settings.removal_generation.wrapping_add(1),
                ..settings
            },
            0,
        )
        .unwrap();
    let after = ask(&stream);
    assert!(after.is_err(), "the flow went on after its frontend went: {after:?}");

    // The agent puts the frontend back, and the Service answers again.
    lab.start_agent_with("n1", PER_PACKET_WITH_SERVICE_CIDRS).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    assert_eq!(answers(&lab, "pod-client", to, false, 1), ["k1".to_string()].into());

    // The generation starts again at 1 when the agent finds an earlier agent's settings (a
    // downgrade: they hold 0) or the 16-bit count at its last value, at a start or at a removal.
    // Stamps from before may carry the generations about to come: every stamp goes, and the flow
    // is checked afresh at its next packet.
    let mut settings_written = |generation: u16| {
        let settings = config.get(&0, 0).unwrap();
        config
            .set(
                0,
                ferrynet_common::DatapathConfig {
                    removal_generation: generation,
                    ..settings
                },
                0,
            )
            .unwrap();
    };
    let generation_now = |lab: &LabGuard| pinned_config(lab, "n1").get(&0, 0).unwrap().removal_generation;
    let flags_now = |lab: &LabGuard| pinned_config(lab, "n1").get(&0, 0).unwrap().flags;
    let stamped_flow = || {
        let stream = ferrynet_kernel::netns::run_in(ns.fd(), || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
        })
        .unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        assert_eq!(ask(&stream).unwrap(), "k1");
        assert_ne!(forward_entry(&stream).flags & CT_F_BACKEND, 0);
        stream
    };
    let checked_afresh = |stream: &std::net::TcpStream, generation: u16, how: &str| {
        let forgotten = forward_entry(stream);
        assert_eq!(forgotten.flags & CT_F_BACKEND, 0, "{how}: {forgotten:?}");
        assert_eq!(ask(stream).unwrap(), "k1", "{how}");
        let stamped = forward_entry(stream);
        assert_ne!(stamped.flags & CT_F_BACKEND, 0, "{how}: {stamped:?}");
        assert_eq!(stamped.generation, generation, "{how}: {stamped:?}");
    };
    // The scan stays due in the settings (for a restart to finish) until one has run at a later
    // generation, which catches a stamp a program wrote behind the first scan's back: the agent
    // moves the generation for it at its next resync (at a start, the first comes at once), not
    // at the next removal.
    let scan_finished = |lab: &LabGuard| {
        eventually(Duration::from_secs(20), || {
            (2..u16::MAX).contains(&generation_now(lab)) && flags_now(lab) & ferrynet_common::CONFIG_F_STAMPS_DUE == 0
        })
    };
    for (how, found) in [("a downgrade's settings", 0), ("the count at its last value", u16::MAX)] {
        let stream = stamped_flow();
        lab.stop_agent("n1").unwrap();
        settings_written(found);
        lab.start_agent_with("n1", PER_PACKET_WITH_SERVICE_CIDRS).unwrap();
        lab.wait_converged(Duration::from_secs(30)).unwrap();
        assert!(
            scan_finished(&lab),
            "{how}: generation {}, flags {:#x}",
            generation_now(&lab),
            flags_now(&lab)
        );
        checked_afresh(&stream, generation_now(&lab), how);
    }
    // At a removal: another Service goes while the count is at its last value.
    let another_service = |lab: &mut LabGuard, name: &str, svc_port: u16| {
        let ports = vec![port(
            "http",
            "TCP",
            i32::from(svc_port),
            IntOrString::Int(i32::from(POD_PORT)),
        )];
        lab.create_service_object(&service(name, "known", ports)).unwrap();
        let to = SocketAddr::new(lab.cluster_ip(name, true).unwrap(), svc_port);
        assert_eq!(answers(lab, "pod-client", to, false, 1), ["k1".to_string()].into());
    };
    // With resyncs far apart, so that the removal's own scan is what is seen.
    lab.stop_agent("n1").unwrap();
    let slow_resyncs: Vec<&str> = PER_PACKET_WITH_SERVICE_CIDRS
        .iter()
        .copied()
        .chain(["--resync-seconds", "600"])
        .collect();
    lab.start_agent_with("n1", &slow_resyncs).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    another_service(&mut lab, "known-other", 81);
    let stream = stamped_flow();
    settings_written(u16::MAX);
    lab.delete_service("known-other").unwrap();
    // (The agent writes the generation, then walks the conntrack maps to clear the stamps: the
    // walk is waited for too.)
    assert!(
        eventually(Duration::from_secs(20), || generation_now(&lab) == 1
            && forward_entry(&stream).flags & CT_F_BACKEND == 0),
        "the generation did not start again at 1 after a removal at its last value, or the flow's stamp stayed: {:?}",
        forward_entry(&stream)
    );
    // The second pass is still due, for the next resync (or a restart) to run.
    assert_ne!(flags_now(&lab) & ferrynet_common::CONFIG_F_STAMPS_DUE, 0);
    checked_afresh(&stream, 1, "the count at its last value at a removal");
}

/// The NodePorts the API stand-in gave `service`'s ports, in order.
fn node_ports(lab: &Lab, service: &str) -> Vec<u16> {
    let svc: Service = lab.api().unwrap().get(service).unwrap().unwrap();
    svc.spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()).expect("a NodePort"))
        .collect()
}

/// The address a pod's server saw the request come from (`client=<ip>` or `client=<ip:port>`).
fn seen_client(answer: &str) -> String {
    let raw = answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("client="))
        .unwrap_or_default();
    match raw.parse::<SocketAddr>() {
        Ok(addr) => addr.ip().to_string(),
        Err(_) => raw.to_string(),
    }
}

#[test]
fn node_ports_answer_from_outside_on_every_node_over_both_families_and_protocols() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("np", "n1", &labels(&[("app", "np")])).unwrap();
    let mut svc = service(
        "np",
        "np",
        vec![
            port("tcp", "TCP", 80, IntOrString::Int(i32::from(POD_PORT))),
            port("udp", "UDP", 80, IntOrString::Int(i32::from(POD_PORT))),
        ],
    );
    svc.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    lab.create_service_object(&svc).unwrap();
    let ports = node_ports(&lab, "np");
    let client = |v4: bool| -> String {
        if v4 {
            ferrynet_tests::lab::CLIENT_V4.to_string()
        } else {
            ferrynet_tests::lab::CLIENT_V6.to_string()
        }
    };
    let nodes: Vec<(String, [std::net::IpAddr; 2])> = lab
        .state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), [n.v4().into(), n.v6().into()]))
        .collect();
    for (node, addresses) in &nodes {
        for address in addresses {
            for (udp, node_port) in [(false, ports[0]), (true, ports[1])] {
                let to = SocketAddr::new(*address, node_port);
                // From the external client; the reply comes from the address it sent to.
                assert_eq!(answers(&lab, "client", to, udp, 3), ["np".to_string()].into());
                let answer = lab.probe("client", to, udp).unwrap();
                // The backend is on n1: entering there, it sees the client; entering n2, the
                // flow is SNATed to n2's address so that the reply comes back through n2.
                let want = if node == "n1" {
                    client(address.is_ipv4())
                } else {
                    address.to_string()
                };
                assert_eq!(seen_client(&answer), want, "{node} {to} udp={udp}: {answer}");
            }
        }
    }

    // A client that reached the backend through n1's NodePort, then reaches the pod directly
    // from the same source port (the network routes pod IPs through their node): the finished
    // NodePort flow's reply translation must not catch the new connection's answer.
    let pod_ip = lab.pod("np").unwrap().ip(true);
    lab.route_from_client(&[pod_ip], &["n1"]).unwrap();
    for to in [
        SocketAddr::new(nodes[0].1[0], ports[0]),
        SocketAddr::new(pod_ip, POD_PORT),
    ] {
        let flows = lab.flows("client", to, 23_000..=23_000);
        assert_eq!(
            flows.as_ref().ok().and_then(|f| f.get(&23_000)).map(String::as_str),
            Some("np"),
            "client:23000 -> {to}: {flows:?}"
        );
    }

    // The nodes themselves reach every node's NodePorts (socket LB), as with kube-proxy.
    for (_, addresses) in &nodes {
        for address in addresses {
            for (udp, node_port) in [(false, ports[0]), (true, ports[1])] {
                let to = SocketAddr::new(*address, node_port);
                assert_eq!(answers(&lab, "n2", to, udp, 2), ["np".to_string()].into(), "n2 -> {to}");
            }
        }
    }

    // An address added to a node after its agent started answers too, once the agent's next
    // scan has seen it.
    let added: std::net::IpAddr = "10.200.0.111".parse().unwrap();
    let out = lab
        .node_ns("n1")
        .unwrap()
        .exec("ip", &["addr", "add", "10.200.0.111/24", "dev", "eth0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        answers(&lab, "client", SocketAddr::new(added, ports[0]), false, 3),
        ["np".to_string()].into()
    );

    // A LoadBalancer with externalTrafficPolicy: Local: the client's address reaches the
    // backend, and a node without a local endpoint drops (a timeout, not a refusal).
    lab.api()
        .unwrap()
        .merge_patch::<Service>(
            "np",
            serde_json::json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}}),
        )
        .unwrap();
    assert_eq!(node_ports(&lab, "np"), ports, "NodePorts stay with the Service");
    for (node, addresses) in &nodes {
        for address in addresses {
            let to = SocketAddr::new(*address, ports[0]);
            if node == "n1" {
                let answer = lab.probe("client", to, false).unwrap();
                assert_eq!(seen_client(&answer), client(address.is_ipv4()), "{answer}");
            } else {
                assert_dropped(&lab, to);
            }
        }
    }
    // The health check port answers as kube-proxy's: 200 with the local endpoint count where
    // there are local endpoints, 503 elsewhere; it follows scale-up and scale-down.
    let svc: Service = lab.api().unwrap().get("np").unwrap().unwrap();
    let check_port = svc.spec.unwrap().health_check_node_port.expect("a health check port");
    expect_health(&lab, "n1", check_port, "200", 1);
    expect_health(&lab, "n2", check_port, "503", 0);
    lab.run_pod("np2", "n2", &labels(&[("app", "np")])).unwrap();
    lab.sync_endpoint_slices().unwrap();
    expect_health(&lab, "n2", check_port, "200", 1);
    lab.delete_pod("np").unwrap();
    expect_health(&lab, "n1", check_port, "503", 0);

    // Counted: the flows the uplink program translated (the metrics refresh every resync).
    assert!(eventually(Duration::from_secs(20), || datapath_counter(
        &lab,
        "n1",
        "external_flows_translated"
    ) > 0));
}

#[test]
fn load_balancer_ips_and_external_ips_answer_where_they_arrive_and_short_circuit_for_pods() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("lb", "n1", &labels(&[("app", "lb")])).unwrap();
    lab.run_pod("client", "n2", &BTreeMap::new()).unwrap();
    let mut svc = service(
        "lb",
        "lb",
        vec![port("tcp", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    let external: [std::net::IpAddr; 2] = ["10.210.1.1".parse().unwrap(), "fd00:210::1:1".parse().unwrap()];
    let balanced: [std::net::IpAddr; 2] = ["10.210.0.1".parse().unwrap(), "fd00:210::1".parse().unwrap()];
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some("LoadBalancer".into());
    spec.external_ips = Some(external.iter().map(ToString::to_string).collect());
    lab.create_service_object(&svc).unwrap();
    // The load balancer sends its IPs to n2 (the backend is on n1: SNATed to n2's address), the
    // network routes the externalIPs to n1 (local: the client's address is kept).
    lab.expose_load_balancer("lb", &balanced, &["n2"]).unwrap();
    lab.route_from_client(&external, &["n1"]).unwrap();
    let n2 = lab.state.nodes.iter().find(|n| n.name == "n2").unwrap().clone();
    for (ip, seen) in [
        (balanced[0], n2.v4().to_string()),
        (balanced[1], n2.v6().to_string()),
        (external[0], ferrynet_tests::lab::CLIENT_V4.to_string()),
        (external[1], ferrynet_tests::lab::CLIENT_V6.to_string()),
    ] {
        let to = SocketAddr::new(ip, 80);
        assert_eq!(answers(&lab, "client", to, false, 3), ["lb".to_string()].into());
        let answer = lab.probe("client", to, false).unwrap();
        assert_eq!(seen_client(&answer), seen, "{to}: {answer}");
        // Pods reach the same addresses without leaving the node (socket LB short-circuits).
        assert_eq!(answers(&lab, "pod-client", to, false, 3), ["lb".to_string()].into());
    }

    // ipMode: Proxy: the load balancer proxies to the NodePorts itself and must see the traffic,
    // so its IP is not short-circuited: no frontend holds it, and a pod's connection to it leaves
    // the node (here, for nowhere). A VIP-mode IP added by the same status update shows when the
    // update is in the maps.
    {
        use k8s_openapi::api::core::v1::LoadBalancerIngress;
        let proxied: std::net::IpAddr = "10.210.0.3".parse().unwrap();
        let added: std::net::IpAddr = "10.210.0.4".parse().unwrap();
        let api = lab.api().unwrap();
        let mut current: Service = api.get("lb").unwrap().unwrap();
        let ingress = current
            .status
            .as_mut()
            .and_then(|s| s.load_balancer.as_mut())
            .and_then(|l| l.ingress.as_mut())
            .unwrap();
        for (ip, mode) in [(proxied, "Proxy"), (added, "VIP")] {
            ingress.push(LoadBalancerIngress {
                ip: Some(ip.to_string()),
                ip_mode: Some(mode.into()),
                ..Default::default()
            });
        }
        api.replace_status(&current).unwrap();
        assert_eq!(
            answers(&lab, "pod-client", SocketAddr::new(added, 80), false, 2),
            ["lb".to_string()].into()
        );
        let listed = services_listing(&lab, "n2");
        assert!(listed.contains(&format!("{added}:80")), "{listed}");
        assert!(!listed.contains(&format!("{proxied}:")), "{listed}");
        assert!(
            lab.probe("pod-client", SocketAddr::new(proxied, 80), false).is_err(),
            "a pod reached the Proxy-mode IP without leaving the node"
        );
    }

    // loadBalancerSourceRanges: the client's address is in them, then it is not (dropped).
    let mut guarded = service(
        "guarded",
        "lb",
        vec![port("tcp", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    let spec = guarded.spec.as_mut().unwrap();
    spec.type_ = Some("LoadBalancer".into());
    spec.load_balancer_source_ranges = Some(vec!["10.200.0.250/32".into(), "fd00:200::250/128".into()]);
    lab.create_service_object(&guarded).unwrap();
    let guarded_ips: [std::net::IpAddr; 2] = ["10.210.0.2".parse().unwrap(), "fd00:210::2".parse().unwrap()];
    lab.expose_load_balancer("guarded", &guarded_ips, &["n1"]).unwrap();
    for ip in guarded_ips {
        assert_eq!(
            answers(&lab, "client", SocketAddr::new(ip, 80), false, 3),
            ["lb".to_string()].into()
        );
    }
    lab.api()
        .unwrap()
        .merge_patch::<Service>(
            "guarded",
            serde_json::json!({"spec": {"loadBalancerSourceRanges": ["192.0.2.0/24", "2001:db8::/64"]}}),
        )
        .unwrap();
    for ip in guarded_ips {
        let to = SocketAddr::new(ip, 80);
        assert_dropped(&lab, to);
    }
}

/// The source ports of the flows the Maglev test follows (outside the ephemeral range, see
/// [`ferrynet_tests::probe::FIXED_SOURCE_PORTS`]).
const FLOW_PORTS: std::ops::RangeInclusive<u16> = 22_000..=22_127;

/// The backend each flow of [`FLOW_PORTS`] from the external client to `to` lands on.
fn flows_to(lab: &Lab, to: SocketAddr) -> BTreeMap<u16, String> {
    let flows = lab.flows("client", to, FLOW_PORTS).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(flows.len(), FLOW_PORTS.len(), "{to}: every flow answers");
    flows
}

#[test]
fn maglev_sends_a_flow_to_one_backend_through_every_node_and_a_removed_backend_moves_only_its_flows() {
    let mut lab = LabGuard::up(2, "native");
    for (pod, node) in [("m1", "n1"), ("m2", "n1"), ("m3", "n2"), ("m4", "n2")] {
        lab.run_pod(pod, node, &labels(&[("app", "m")])).unwrap();
    }
    // Two Services over the same pods: one balanced by Maglev (its annotation), and one at
    // random, the control that shows the comparison below can fail.
    let hashed: [std::net::IpAddr; 2] = ["10.210.0.11".parse().unwrap(), "fd00:210::11".parse().unwrap()];
    let random: [std::net::IpAddr; 2] = ["10.210.0.12".parse().unwrap(), "fd00:210::12".parse().unwrap()];
    for (name, algorithm, ips) in [("hashed", "maglev", &hashed), ("random", "random", &random)] {
        let mut svc = service(
            name,
            "m",
            vec![port("tcp", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
        );
        svc.metadata.annotations = Some([("ferrynet.io/lb-algorithm".to_string(), algorithm.to_string())].into());
        svc.spec.as_mut().unwrap().type_ = Some("LoadBalancer".into());
        lab.create_service_object(&svc).unwrap();
        lab.expose_load_balancer(name, ips, &["n1"]).unwrap();
    }
    // Programmed (the client reaches it through n1) before n1's maps are read.
    answers(&lab, "client", SocketAddr::new(hashed[0], 80), false, 1);
    let explained = agent_cli(&lab, "n1", &["explain", &format!("{}:80", hashed[0])]);
    assert!(
        explained.contains("load balancing: Maglev, a table of 16381 entries"),
        "{explained}"
    );

    let mut before: BTreeMap<std::net::IpAddr, BTreeMap<u16, String>> = BTreeMap::new();
    for (hashed_ip, random_ip) in hashed.into_iter().zip(random) {
        let (to, control) = (SocketAddr::new(hashed_ip, 80), SocketAddr::new(random_ip, 80));
        answers(&lab, "client", to, false, 1);
        answers(&lab, "client", control, false, 1);
        // The same flows entering n1, then n2 (where the load balancer's route moved), then both
        // (ECMP, spread by ports): the backends on each node are local to one and SNATed from
        // the other, and each node computed its own table.
        let through_n1 = flows_to(&lab, to);
        let control_n1 = flows_to(&lab, control);
        lab.route_from_client(&[hashed_ip, random_ip], &["n2"]).unwrap();
        let through_n2 = flows_to(&lab, to);
        let control_n2 = flows_to(&lab, control);
        lab.route_from_client(&[hashed_ip, random_ip], &["n1", "n2"]).unwrap();
        let through_both = flows_to(&lab, to);
        let spread: BTreeSet<&String> = through_n1.values().collect();
        assert_eq!(
            spread.len(),
            4,
            "{to}: the flows spread over every backend: {through_n1:?}"
        );
        assert_eq!(
            through_n1, through_n2,
            "{to}: a flow lands on one backend whichever node it enters"
        );
        assert_eq!(through_n1, through_both, "{to}: also when ECMP spreads the flows");
        let differ = control_n1.iter().filter(|(p, b)| control_n2[*p] != **b).count();
        assert!(
            differ > 0,
            "{control}: random picks gave every flow the same backend through both nodes"
        );
        before.insert(hashed_ip, through_n1);
    }

    // One backend of four goes: its flows move to the others, and the others' flows stay.
    lab.delete_pod("m2").unwrap();
    for ip in hashed {
        let to = SocketAddr::new(ip, 80);
        let mut after = BTreeMap::new();
        let settled = eventually(Duration::from_secs(20), || {
            after = lab.flows("client", to, FLOW_PORTS).unwrap_or_default();
            after.len() == FLOW_PORTS.len() && after.values().all(|b| b != "m2")
        });
        assert!(settled, "{to}: the flows never left the removed backend: {after:?}");
        let old = &before[&ip];
        let orphaned = old.values().filter(|b| *b == "m2").count();
        let kept: Vec<u16> = old.iter().filter(|(_, b)| *b != "m2").map(|(p, _)| *p).collect();
        let moved = kept.iter().filter(|p| after[*p] != old[*p]).count();
        eprintln!(
            "maglev {to}: {orphaned} of {} flows were on the removed backend and moved; {moved} of the other {} moved ({:.1}%)",
            old.len(),
            kept.len(),
            100.0 * moved as f64 / kept.len() as f64
        );
        assert!(orphaned > 0, "{to}: some flows were on m2: {old:?}");
        assert!(
            moved * 20 <= kept.len(),
            "{to}: {moved} of {} flows of kept backends moved",
            kept.len()
        );
    }
}

/// A metric of the agent on `node` with exactly these labels, from its /metrics.
fn metric_value(lab: &Lab, node: &str, series: &str) -> Option<f64> {
    let text = lab
        .exec_capture(
            node,
            &["curl".into(), "-s".into(), "http://127.0.0.1:10249/metrics".into()],
        )
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// One request line over an open connection; the pod that answered.
fn ask(stream: &std::net::TcpStream) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut writer = stream;
    writer.write_all(b"hello\n")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answered_by(&answer))
}

/// A one-node lab whose agent runs with `agent_args`, pods `<app>1` and `<app>2` labelled
/// `app=<app>`, and a NodePort Service `name` on them, answering the external client at the
/// returned address.
fn one_node_port(name: &str, app: &str, agent_args: &[&str]) -> (LabGuard, SocketAddr) {
    let mut lab = LabGuard::up(1, "native");
    start_agent_afresh(&lab, "n1", agent_args);
    for i in 1..=2 {
        lab.run_pod(&format!("{app}{i}"), "n1", &labels(&[("app", app)]))
            .unwrap();
    }
    let mut svc = service(
        name,
        app,
        vec![port("tcp", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    svc.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    lab.create_service_object(&svc).unwrap();
    let node = lab.state.nodes[0].clone();
    let to = SocketAddr::new(node.v4().into(), node_ports(&lab, name)[0]);
    answers(&lab, "client", to, false, 1);
    (lab, to)
}

#[test]
fn a_syn_flood_from_one_source_turns_conntrack_over_without_evicting_established_flows() {
    const CONNTRACK: u32 = 4096;
    // A small conntrack table, and its fill counted every second for the metrics.
    let (lab, to) = one_node_port(
        "flood",
        "f",
        &["--max-conntrack", &CONNTRACK.to_string(), "--map-fill-seconds", "1"],
    );

    // Established connections from the external client, each on the backend it was given; a
    // lost conntrack entry would send its next segment to a backend picked afresh (a reset half
    // the time) or let the backend's reply out untranslated.
    let client = lab.ns("client").unwrap();
    let established: Vec<(std::net::TcpStream, String)> = (0..16)
        .map(|i| {
            let stream = ferrynet_kernel::netns::run_in(client.fd(), || {
                std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
            })
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let backend = ask(&stream).unwrap();
            (stream, backend)
        })
        .collect();
    let spread: BTreeSet<&String> = established.iter().map(|(_, b)| b).collect();
    assert_eq!(spread.len(), 2, "the connections use both backends");

    // One source floods SYNs from every port: six times the table's capacity in entries (each
    // flow to a local backend takes two). The established connections keep talking meanwhile,
    // as live flows do, so LRU order keeps them.
    let attacker: std::net::IpAddr = "10.200.0.77".parse().unwrap();
    let raw = ferrynet_tests::packets::RawSender::open(&client, false).unwrap();
    let flood_flows = 3 * CONNTRACK as usize;
    for (i, sport) in (1024u16..).take(flood_flows).enumerate() {
        raw.send(&ferrynet_tests::packets::ip_tcp_syn(
            attacker,
            to.ip(),
            sport,
            to.port(),
        ))
        .unwrap();
        if i % 400 == 399 {
            for (n, (stream, backend)) in established.iter().enumerate() {
                let answer = ask(stream).unwrap_or_else(|e| panic!("connection {n} after {i} SYNs: {e}"));
                assert_eq!(&answer, backend, "connection {n} after {i} SYNs changed backend");
            }
        }
    }
    for (n, (stream, backend)) in established.iter().enumerate() {
        let answer = ask(stream).unwrap_or_else(|e| panic!("connection {n} after the flood: {e}"));
        assert_eq!(&answer, backend, "connection {n} after the flood changed backend");
    }
    // The flood did fill the table, and the metrics say so.
    let mut fill = (None, None);
    let full = eventually(Duration::from_secs(20), || {
        fill = (
            metric_value(&lab, "n1", "ferrynet_map_entries{map=\"CT4\"}"),
            metric_value(&lab, "n1", "ferrynet_map_full{map=\"CT4\"}"),
        );
        fill.1 == Some(1.0)
    });
    assert!(full, "CT4 never showed full in the metrics: (entries, full) = {fill:?}");
    // New connections still work while it is full (they take the least recently used entries).
    assert!(!answers(&lab, "client", to, false, 4).is_empty());
}

/// Waits (up to 60 s) until `node`'s agent says its IPv4 conntrack map holds at most `entries`
/// entries after its sweep removed at least `removed` expired ones; returns what it said then.
fn wait_swept(lab: &Lab, node: &str, entries: f64, removed: f64) -> (f64, f64) {
    let metric = |series: &str| metric_value(lab, node, series).unwrap_or(f64::NAN);
    let mut seen = (0.0, 0.0);
    let swept = eventually(Duration::from_secs(60), || {
        seen = (
            metric("ferrynet_map_entries{map=\"CT4\"}"),
            metric("ferrynet_conntrack_expired_removed_total"),
        );
        seen.0 <= entries && seen.1 >= removed
    });
    assert!(swept, "(CT4 entries, expired entries removed) = {seen:?}");
    seen
}

#[test]
fn the_agent_sweeps_finished_flows_out_of_conntrack_and_keeps_live_ones() {
    // The map walk that counts the fill (and sweeps) at every resync.
    let (lab, to) = one_node_port("sweep", "s", &["--map-fill-seconds", "1"]);
    // A connection from the external client that stays open throughout (a live flow: two
    // entries, for its two directions)...
    let client = lab.ns("client").unwrap();
    let live = ferrynet_kernel::netns::run_in(client.fd(), || {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
    })
    .unwrap();
    live.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let backend = ask(&live).unwrap();
    // ...and 40 that end (closed by both ends): the programs leave their entries in the map,
    // expired 10 s after the close, and the agent's walk removes them.
    answers(&lab, "client", to, false, 40);
    wait_swept(&lab, "n1", 2.0, 80.0);
    // The live flow kept its entries: its backend answers it still.
    assert_eq!(ask(&live).unwrap(), backend);
}

/// A one-node lab whose agent translates packet by packet (socket LB off) and walks (and sweeps)
/// its maps every second, with `backends` pods `<app>1`... labelled `app=<app>`, a pod `client`,
/// and a ClusterIP Service `app` (port 80 to `target_port`), whose IPv4 address it returns.
fn per_packet_sweeping_lab(app: &str, backends: usize, target_port: u16) -> (LabGuard, SocketAddr) {
    let mut lab = LabGuard::up(1, "native");
    start_agent_afresh(&lab, "n1", &["--socket-lb", "false", "--map-fill-seconds", "1"]);
    for i in 1..=backends {
        lab.run_pod(&format!("{app}{i}"), "n1", &labels(&[("app", app)]))
            .unwrap();
    }
    lab.run_pod("client", "n1", &BTreeMap::new()).unwrap();
    lab.create_service_object(&service(
        app,
        app,
        vec![port("tcp", "TCP", 80, IntOrString::Int(i32::from(target_port)))],
    ))
    .unwrap();
    let vip = SocketAddr::new(lab.cluster_ip(app, true).unwrap(), 80);
    (lab, vip)
}

#[test]
fn per_packet_flows_both_ends_closed_are_swept_and_a_new_connection_on_their_tuple_is_not() {
    let (lab, vip) = per_packet_sweeping_lab("fin", 2, POD_PORT);
    answers(&lab, "pod-client", vip, false, 1);
    // A connection from a fixed port, ended by both ends (the pod's FIN first, then the
    // backend's)...
    let ns = lab.pod_ns("client").unwrap();
    let local_port = ferrynet_tests::probe::FIXED_SOURCE_PORTS.start + 1;
    request_from_port(&lab, "client", local_port, vip).unwrap();
    // ...then a new connection on the same tuple (the pod's side of the last one is in
    // TIME_WAIT, which it may take over a second after the last segment), kept open: a live
    // flow on a tuple whose last flow ended.
    let reopened = connect_on_reused_port(&ns, local_port, vip);
    let backend = ask(&reopened).unwrap();
    // And 40 connections that both ends end: the programs close their entries once both FINs
    // passed, and the agent's walk removes them after the closed-flow time. Before, only a
    // reset ended a per-packet flow, and these stayed until they idled out (hours) or were
    // evicted.
    answers(&lab, "pod-client", vip, false, 40);
    let seen = wait_swept(&lab, "n1", 2.0, 80.0);
    // The new connection on the ended flow's tuple, quiet since before those 40 (so for longer
    // than the closed-flow time when the walk removed the last of theirs), kept both its
    // entries: its SYN started them afresh, without the old flow's ending.
    assert_eq!(seen.0, 2.0, "the reopened flow's entries went with the closed ones");
    // ...and its backend answers it still.
    assert_eq!(ask(&reopened).unwrap(), backend);
}

#[test]
fn per_packet_hairpin_flows_both_ends_closed_are_swept() {
    // The pod is its own Service's only backend: each connection leaves it for the Service and
    // comes back into it (from the hairpin address), so it is the flow's client and its backend
    // at once, and both its FINs cross its one veth.
    let (lab, vip) = per_packet_sweeping_lab("loop", 1, POD_PORT);
    assert_eq!(answers(&lab, "pod-loop1", vip, false, 40), ["loop1".to_string()].into());
    // Closed by both ends, the flows' entries are removed after the closed-flow time, as other
    // flows' are; before the pod's FIN was noted as its backend's, they stayed for hours.
    wait_swept(&lab, "n1", 0.0, 80.0);
}

#[test]
fn a_per_packet_flow_half_closed_for_longer_than_the_closed_flow_time_stays_live() {
    // Socket LB off, the sweep at every resync. The backend is the test's own listener in a
    // pod's namespace, so that it can go on sending after its client's FIN, as a server
    // streaming its answer to a request ended by shutdown(SHUT_WR) does.
    const BACKEND_PORT: u16 = 9_099;
    let (lab, vip) = per_packet_sweeping_lab("half", 1, BACKEND_PORT);
    let listener = own_backend(&lab, "half1", BACKEND_PORT, vip);
    let client_ns = lab.pod_ns("client").unwrap();
    let client = ferrynet_kernel::netns::run_in(client_ns.fd(), || {
        std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3))
    })
    .unwrap();
    client.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    half_closed_past_the_closed_flow_time(&lab, client, accept_one(&listener));
}

/// A per-packet flow from `client` to `server` (its backend, the test's own) on node n1, half
/// closed by the client: the backend reads the request and the client's FIN, and is quiet for
/// longer than the closed-flow time, with the sweep walking every second. The flow is
/// half-closed, not closed, and keeps its entries (2, its two directions). Then the backend
/// answers, from the Service's address, and ends its half: the client reads it all, and the
/// sweep removes both entries after the closed-flow time.
fn half_closed_past_the_closed_flow_time(lab: &Lab, mut client: std::net::TcpStream, mut server: std::net::TcpStream) {
    use std::io::{Read, Write};
    client.write_all(b"request").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut request = Vec::new();
    server.read_to_end(&mut request).unwrap();
    assert_eq!(request, b"request");
    // The quiet time is the subject of the test: no condition can stand for it.
    let quiet = Duration::from_nanos(ferrynet_common::CT_CLOSED_NS) + Duration::from_secs(3);
    std::thread::sleep(quiet);
    assert_eq!(
        metric_value(lab, "n1", "ferrynet_map_entries{map=\"CT4\"}"),
        Some(2.0),
        "the half-closed flow's entries after {quiet:?}"
    );
    server.write_all(b"answer").unwrap();
    drop(server);
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"answer");
    wait_swept(lab, "n1", 0.0, 2.0);
}

/// A connection from `local_port` in `ns` to `to`, with a 3 s read timeout. The port's last
/// connection may hold it in TIME_WAIT, which a new one (`tcp_tw_reuse`, set here) takes over
/// only a second after its last segment: tried for up to 10 s.
fn connect_on_reused_port(ns: &ferrynet_tests::netns::Netns, local_port: u16, to: SocketAddr) -> std::net::TcpStream {
    ferrynet_kernel::netns::run_in(ns.fd(), || std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")).unwrap();
    let mut stream = None;
    let connected = eventually(Duration::from_secs(10), || {
        stream = ferrynet_kernel::netns::run_in(ns.fd(), || {
            ferrynet_tests::probe::connect_from_port(to, local_port, Duration::from_secs(3))
        })
        .ok();
        stream.is_some()
    });
    assert!(connected, "no connection from port {local_port} to {to}");
    let stream = stream.unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    stream
}

/// The test's own backend: a listener on `port` in `pod`'s namespace, once `vip`'s only backend
/// on n1 is that pod (so that a backend can go on sending after its client's FIN, as a server
/// streaming its answer to a request ended by shutdown(SHUT_WR) does).
fn own_backend(lab: &Lab, pod: &str, port: u16, vip: SocketAddr) -> std::net::TcpListener {
    let ns = lab.pod_ns(pod).unwrap();
    let listener = ferrynet_kernel::netns::run_in(ns.fd(), || std::net::TcpListener::bind(("0.0.0.0", port))).unwrap();
    listener.set_nonblocking(true).unwrap();
    wait_backends(lab, "n1", &vip.to_string(), &[lab.pod(pod).unwrap().ip(true)]);
    listener
}

/// The next connection `listener` accepts (within 5 s), blocking, with a 3 s read timeout.
fn accept_one(listener: &std::net::TcpListener) -> std::net::TcpStream {
    let mut accepted = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            accepted = listener.accept().ok();
            accepted.is_some()
        }),
        "no connection reached the backend"
    );
    let (server, _) = accepted.unwrap();
    server.set_nonblocking(false).unwrap();
    server.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    server
}

#[test]
fn a_backends_fin_left_on_an_ended_flows_entry_does_not_close_a_new_connection_on_its_tuple() {
    use ferrynet_common::{CT_F_BACKEND_FIN, CT_F_CLIENT_FIN, CT_F_CLOSED, CT4_MAP, CtKey4, CtValue, PROTO_TCP};
    use std::io::Read;
    const BACKEND_PORT: u16 = 9_098;
    let (lab, vip) = per_packet_sweeping_lab("stale", 1, BACKEND_PORT);
    let listener = own_backend(&lab, "stale1", BACKEND_PORT, vip);
    let client_ns = lab.pod_ns("client").unwrap();
    let local_port = ferrynet_tests::probe::FIXED_SOURCE_PORTS.start + 3;
    let connect = || connect_on_reused_port(&client_ns, local_port, vip);
    // A first connection on the tuple, ended by both ends (the client first, so that its side,
    // not the backend's, holds the TIME_WAIT the next connection takes over).
    let mut first = connect();
    let mut server = accept_one(&listener);
    first.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    drop(server);
    first.read_to_end(&mut rest).unwrap();
    drop(first);
    // Its entries as a flow whose backend's FIN was the last the datapath saw leaves them (the
    // client's went another way, or was lost): the reply entry notes the backend's FIN alone,
    // and neither entry is closed. (Written with the agent running: it writes no entry of a
    // live flow, and the sweep removes only closed or idle ones.)
    let mut ct = pinned_map::<CtKey4, CtValue>(&lab, "n1", CT4_MAP);
    let tuple_port = local_port.to_be();
    let keys: Vec<CtKey4> = ct
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.proto == PROTO_TCP && (k.sport == tuple_port || k.dport == tuple_port))
        .collect();
    assert_eq!(keys.len(), 2, "the first connection's entries: {keys:?}");
    for key in &keys {
        let mut value = ct.get(key, 0).unwrap();
        assert_ne!(value.flags & CT_F_CLOSED, 0, "the first connection closed: {value:?}");
        value.flags &= !(CT_F_CLOSED | CT_F_CLIENT_FIN);
        ct.insert(key, value, 0).unwrap();
    }
    assert!(
        keys.iter().any(|k| ct.get(k, 0).unwrap().flags & CT_F_BACKEND_FIN != 0),
        "no entry noted the backend's FIN"
    );
    // A new connection on the tuple, whose client half-closes: with the old FIN still on the
    // reply entry, its FIN would close the flow, and the sweep remove its entries while the
    // backend still has its answer to send. Its SYN started them afresh.
    let second = connect();
    let server = accept_one(&listener);
    for key in &keys {
        let value = ct.get(key, 0).unwrap();
        assert_eq!(
            value.flags & CT_F_BACKEND_FIN,
            0,
            "the old FIN outlived the new SYN: {value:?}"
        );
    }
    half_closed_past_the_closed_flow_time(&lab, second, server);
}

/// A raw IPv4 TCP socket in `ns`, which sees a copy of every TCP segment arriving there.
fn raw_tcp_receiver(ns: &ferrynet_tests::netns::Netns) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    ferrynet_kernel::netns::run_in(ns.fd(), || {
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    })
    .unwrap()
}

/// The source of the first SYN-ACK to `port` that `raw` receives within 5 s.
fn syn_ack_source(raw: &std::os::fd::OwnedFd, port: u16) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < deadline {
        let mut poll = libc::pollfd {
            fd: raw.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 200) } <= 0 {
            continue;
        }
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(raw.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 14 {
            continue;
        }
        let tcp = &buf[ihl..n];
        let (sport, dport, flags) = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
            tcp[13],
        );
        if dport == port && flags & 0x12 == 0x12 {
            let src = std::net::Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            return Some(SocketAddr::new(src.into(), sport));
        }
    }
    None
}

#[test]
fn a_nodeport_flow_whose_reply_entry_was_evicted_gets_it_back_at_the_clients_next_syn() {
    let (lab, to) = one_node_port("evict", "e", &[]);
    let client = lab.ns("client").unwrap();
    // The client answers nothing: no reset closes the half-open flows below (a reset would end
    // the flow, and the next SYN open it afresh, whatever became of its entries).
    let held = lab
        .exec_output(
            "client",
            &[
                "nft",
                "add table inet hold; add chain inet hold out { type filter hook output priority 0; }; add rule inet hold out tcp flags rst drop",
            ]
            .map(String::from),
        )
        .unwrap();
    assert!(held.status.success(), "{held:?}");
    let raw = raw_tcp_receiver(&client);
    let sender = ferrynet_tests::packets::RawSender::open(&client, false).unwrap();
    let port = ferrynet_tests::probe::FIXED_SOURCE_PORTS.start + 77;
    let syn = ferrynet_tests::packets::ip_tcp_syn(ferrynet_tests::lab::CLIENT_V4.into(), to.ip(), port, to.port());
    sender.send(&syn).unwrap();
    assert_eq!(syn_ack_source(&raw, port), Some(to), "the first SYN-ACK");
    // The flow's reply entry goes, as a full LRU map may evict it (the client's stays).
    let pin = lab
        .node_pin_path("n1")
        .join(format!("v{}", ferrynet_common::SCHEMA_VERSION))
        .join("maps")
        .join(ferrynet_common::CT4_MAP);
    let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&pin).unwrap()).unwrap();
    let mut ct = aya::maps::HashMap::<_, ferrynet_common::CtKey4, ferrynet_common::CtValue>::try_from(map).unwrap();
    let replies: Vec<ferrynet_common::CtKey4> = ct
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.direction == ferrynet_common::CT_EXT_OUT && k.dport == port.to_be())
        .collect();
    assert_eq!(replies.len(), 1, "{replies:?}");
    ct.remove(&replies[0]).unwrap();
    // The client sends its SYN again (its SYN-ACK lost): the reply is translated, as the first.
    sender.send(&syn).unwrap();
    assert_eq!(syn_ack_source(&raw, port), Some(to), "the SYN-ACK after the entry went");
}

/// The status code and JSON body of `node`'s health check port `port`, from the external client.
fn health_check(lab: &Lab, node: &str, port: i32) -> (String, serde_json::Value) {
    let ip = lab.state.nodes.iter().find(|n| n.name == node).unwrap().v4();
    let out = lab
        .exec_output(
            "client",
            &[
                "curl".into(),
                "-s".into(),
                "-m".into(),
                "2".into(),
                "-w".into(),
                "\n%{http_code}".into(),
                format!("http://{ip}:{port}/healthz"),
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), serde_json::from_str(body).unwrap_or_default())
}

/// Waits until `node`'s health check port answers `code` with `local` local endpoints, as
/// kube-proxy's does.
#[track_caller]
fn expect_health(lab: &Lab, node: &str, port: i32, code: &str, local: u64) {
    let mut last = Default::default();
    let ok = eventually(Duration::from_secs(20), || {
        last = health_check(lab, node, port);
        last.0 == code && last.1["localEndpoints"] == local
    });
    assert!(ok, "{node}: {last:?}");
    assert_eq!(
        last.1["service"],
        serde_json::json!({"namespace": "default", "name": "np"})
    );
    assert_eq!(last.1["serviceProxyHealthy"], true);
}

/// Waits until TCP from the external client to `to` times out: dropped, not refused.
#[track_caller]
fn assert_dropped(lab: &Lab, to: SocketAddr) {
    let mut last = String::new();
    let dropped = eventually(Duration::from_secs(20), || {
        last = lab
            .probe("client", to, false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        last.contains("timed out")
    });
    assert!(dropped, "{to}: {last}");
}

/// A pinned map of `node`'s datapath, typed.
fn pinned_map<K: aya::Pod, V: aya::Pod>(
    lab: &Lab,
    node: &str,
    name: &str,
) -> aya::maps::HashMap<aya::maps::MapData, K, V> {
    let pin = lab
        .node_pin_path(node)
        .join(format!("v{}", ferrynet_common::SCHEMA_VERSION))
        .join("maps")
        .join(name);
    let data = aya::maps::MapData::from_pin(&pin).unwrap();
    aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap()
}

#[test]
fn a_purge_of_a_removed_backends_flows_does_not_hold_up_other_services_changes() {
    use ferrynet_common::{BACKENDS_MAP, BackendValue, CT_FORWARD, CT4_MAP, CtKey4, CtValue, PROTO_TCP};
    const FLOWS: u32 = 200_000;
    let mut lab = LabGuard::up(1, "native");
    for (pod, app) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        lab.run_pod(pod, "n1", &labels(&[("app", app)])).unwrap();
    }
    let target = IntOrString::Int(i32::from(POD_PORT));
    for name in ["a", "b"] {
        lab.create_service_object(&service(name, name, vec![port("http", "TCP", 80, target.clone())]))
            .unwrap();
    }
    let ip = |pod: &str| lab.pod(pod).unwrap().ip(true);
    let frontend = |svc: &str| format!("{}:80", lab.cluster_ip(svc, true).unwrap());
    wait_backends(&lab, "n1", &frontend("a"), &[ip("a1"), ip("a2")]);
    wait_backends(&lab, "n1", &frontend("b"), &[ip("b1"), ip("b2")]);

    // A conntrack map as a busy node's is: many flows, here all on backend a1 (written as the
    // per-packet path writes them), for the agent to purge when a1 goes.
    type Ct = aya::maps::HashMap<aya::maps::MapData, CtKey4, CtValue>;
    let backends = pinned_map::<u32, BackendValue>(&lab, "n1", BACKENDS_MAP);
    // The ids of `pod`'s IPv4 backend entries.
    let ids_of = |pod: &str| -> Vec<u32> {
        let addr = ip(pod);
        backends
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, b)| b.family == 4 && std::net::IpAddr::from(b.addr[0].to_ne_bytes()) == addr)
            .map(|(id, _)| id)
            .collect()
    };
    let flows_of = |ct: &Ct, id: u32| {
        ct.iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.backend == id)
            .count()
    };
    let a1_id = *ids_of("a1").first().expect("a1's backend entry");
    let mut ct = pinned_map::<CtKey4, CtValue>(&lab, "n1", CT4_MAP);
    let fill = |ct: &mut Ct, backend: u32| {
        // Seen now (the programs' clock): an entry last seen at 0 is idle past the TCP limit on
        // a machine up for longer than it, and the agent's sweep would remove it.
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: plain clock_gettime(2) into a local.
        assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) }, 0);
        let last_seen_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
        for n in 0..FLOWS {
            let key = CtKey4 {
                saddr: u32::from_ne_bytes([10, 99, (n >> 16) as u8, (n >> 8) as u8]),
                daddr: u32::from_ne_bytes([10, 98, 0, 1]),
                sport: (n as u16).to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                direction: CT_FORWARD,
                _pad: [0; 2],
            };
            let value = CtValue {
                backend,
                last_seen_ns,
                ..CtValue::default()
            };
            ct.insert(key, value, 0).unwrap();
        }
    };
    fill(&mut ct, a1_id);

    // a1 goes, and after it one of b's backends, while the purge worker is held stopped: b's
    // change must reach the maps with a1's purge not even begun (the controller does not wait
    // for the walk).
    let purge_worker = lab.pause_agent_thread("n1", "purge").unwrap();
    lab.set_pod_ready("a1", false).unwrap();
    wait_backends(&lab, "n1", &frontend("a"), &[ip("a2")]);
    lab.set_pod_ready("b1", false).unwrap();
    wait_backends(&lab, "n1", &frontend("b"), &[ip("b2")]);
    let doomed = pinned_map::<u32, u8>(&lab, "n1", ferrynet_common::DOOMED_BACKENDS_MAP);
    // a1's entry went with its batch (its flows' next packets are balanced afresh); its id
    // stays taken, marked for the socket terminations, until the purge ends.
    assert!(backends.get(&a1_id, 0).is_err());
    assert!(doomed.get(&a1_id, 0).is_ok());

    // a1 comes back before the purge ends: it gets a fresh id, which the purge leaves alone.
    lab.set_pod_ready("a1", true).unwrap();
    wait_backends(&lab, "n1", &frontend("a"), &[ip("a1"), ip("a2")]);
    let new_id = *ids_of("a1")
        .iter()
        .find(|id| **id != a1_id)
        .expect("a1 back under a new id");
    assert!(doomed.get(&new_id, 0).is_err(), "the new id is marked for termination");
    assert_eq!(
        flows_of(&ct, a1_id),
        FLOWS as usize,
        "a flow went while the purge worker was stopped"
    );
    drop(purge_worker);

    // Then the purge ends: the flows go, the old id is free again (no longer marked), and the
    // new one stays.
    assert!(
        eventually(Duration::from_secs(60), || flows_of(&ct, a1_id) == 0),
        "{} of a1's flows are left",
        flows_of(&ct, a1_id)
    );
    assert!(eventually(Duration::from_secs(10), || doomed.get(&a1_id, 0).is_err()));
    assert_eq!(ids_of("a1"), [new_id]);
    wait_backends(&lab, "n1", &frontend("a"), &[ip("a1"), ip("a2")]);
    let purged = metric_value(&lab, "n1", "ferrynet_conntrack_purged_total").unwrap_or(0.0);
    assert!(purged >= f64::from(FLOWS), "{purged}");

    // An agent killed mid-purge: the next one finds the removed backend's id still marked,
    // keeps it taken, and finishes the purge.
    let a2_id = *ids_of("a2").first().expect("a2's backend entry");
    fill(&mut ct, a2_id);
    let purge_worker = lab.pause_agent_thread("n1", "purge").unwrap();
    lab.set_pod_ready("a2", false).unwrap();
    wait_backends(&lab, "n1", &frontend("a"), &[ip("a1")]);
    // (The mark is written after the entries go.)
    assert!(eventually(Duration::from_secs(10), || doomed.get(&a2_id, 0).is_ok()));
    purge_worker.kill_daemon().unwrap();
    lab.kill_agent("n1").unwrap();
    assert_eq!(
        flows_of(&ct, a2_id),
        FLOWS as usize,
        "a flow went while the purge worker was stopped"
    );
    assert!(doomed.get(&a2_id, 0).is_ok());
    lab.start_agent("n1").unwrap();
    assert!(
        eventually(Duration::from_secs(60), || flows_of(&ct, a2_id) == 0),
        "{} of a2's flows are left after the restart",
        flows_of(&ct, a2_id)
    );
    assert!(eventually(Duration::from_secs(10), || doomed.get(&a2_id, 0).is_err()));
    // And the restarted agent programs as before.
    lab.set_pod_ready("a2", true).unwrap();
    wait_backends(&lab, "n1", &frontend("a"), &[ip("a1"), ip("a2")]);
}

/// A lab whose n2 has a NodePort with one backend, on n1: n2 SNATs every flow to it. Returns
/// the lab and the NodePort's address on n2, which the external client connects to.
fn node_port_snated_to_another_node() -> (LabGuard, SocketAddr) {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("busy", "n1", &labels(&[("app", "busy")])).unwrap();
    let mut svc = service(
        "busy",
        "busy",
        vec![port("tcp", "TCP", 80, IntOrString::Int(i32::from(POD_PORT)))],
    );
    svc.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    lab.create_service_object(&svc).unwrap();
    let n2 = lab.state.nodes.iter().find(|n| n.name == "n2").unwrap().v4();
    let to = SocketAddr::new(n2.into(), node_ports(&lab, "busy")[0]);
    let answer = lab.probe("client", to, false).unwrap();
    assert_eq!(seen_client(&answer), n2.to_string(), "SNATed to n2: {answer}");
    (lab, to)
}

/// How the external client ends each connection in [`connect_one_at_a_time`].
#[derive(Clone, Copy)]
enum Ending {
    /// A reset (SO_LINGER 0): neither end keeps the tuple.
    Reset,
    /// A plain close: the client's FIN, which the lab's pod server answers with its own once
    /// it reads the end of the stream (the backend closes passively).
    ClientFinFirst,
}

/// `connections` connections from the external client to `to`, one at a time and at most
/// `per_second` a second, each asking once and then ended as `ending` says. Returns the first
/// few failures.
fn connect_one_at_a_time(
    lab: &LabGuard,
    to: SocketAddr,
    connections: usize,
    per_second: u32,
    ending: Ending,
) -> Vec<String> {
    let ns = lab.ns("client").unwrap();
    let gap = Duration::from_secs_f64(1.0 / f64::from(per_second));
    let mut failures = Vec::new();
    let mut last_start: Option<std::time::Instant> = None;
    for i in 0..connections {
        // A rate limit, not a wait for a condition: a connection starts no sooner than `gap`
        // after the one before it, so a stall is never made up by a burst above the pace.
        if let Some(early) = last_start.and_then(|s| (s + gap).checked_duration_since(std::time::Instant::now())) {
            std::thread::sleep(early);
        }
        last_start = Some(std::time::Instant::now());
        let one = || -> std::io::Result<String> {
            let stream = ferrynet_kernel::netns::run_in(ns.fd(), || {
                std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
            })?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            let answer = ask(&stream);
            if let Ending::Reset = ending {
                ferrynet_tests::probe::reset_on_close(&stream)?;
            }
            answer
        };
        if let Err(e) = one() {
            failures.push(format!("connection {i}: {e}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    failures
}

/// Asserts that n2's agent counted at least `connections` external flows, and no new flow
/// without a free SNAT port.
fn assert_snat_ports_never_ran_out(lab: &LabGuard, connections: usize) {
    // The counters are read from the agent's metrics, refreshed every resync: once they show
    // every flow, they show every SNAT failure too.
    let mut translated = 0;
    assert!(
        eventually(Duration::from_secs(30), || {
            translated = datapath_counter(lab, "n2", "external_flows_translated");
            translated >= connections as u64
        }),
        "n2 counted {translated} external flows"
    );
    let exhausted = datapath_counter(lab, "n2", "snat_ports_exhausted");
    assert_eq!(exhausted, 0, "n2 found no free SNAT port for {exhausted} new flows");
}

/// The ports of the SNAT range (`SNAT_PORT_MIN..=SNAT_PORT_MAX`).
fn snat_ports() -> usize {
    usize::from(ferrynet_common::SNAT_PORT_MAX - ferrynet_common::SNAT_PORT_MIN) + 1
}

#[test]
fn snat_ports_of_reset_flows_are_taken_again_so_a_busy_node_port_does_not_run_out() {
    // More connections than the SNAT range has ports, each ended by the client's reset, through
    // a node whose NodePort SNATs them to a backend on another node. A reset leaves neither end
    // holding the tuple, so its port is free again at once; held for the closed-flow time
    // instead, the range ran out after a few thousand connections and each new SYN was dropped
    // (a second's stall at the client) until ports expired.
    const CONNECTIONS: usize = 6_000;
    assert!(
        CONNECTIONS > snat_ports(),
        "the load must need more ports than the range has"
    );
    let (lab, to) = node_port_snated_to_another_node();
    let failures = connect_one_at_a_time(&lab, to, CONNECTIONS, u32::MAX, Ending::Reset);
    assert!(failures.is_empty(), "{failures:?}");
    assert_snat_ports_never_ran_out(&lab, CONNECTIONS);
}

#[test]
fn snat_ports_of_flows_their_clients_closed_first_are_taken_again_within_a_second() {
    // Clients that close first (most HTTP clients), each FIN answered by the backend's: the
    // backend closes passively and keeps no TIME_WAIT, so the flow's port is free again a second
    // after its last packet. Paced at a rate that a one-second wait serves with most of the range
    // to spare, while the closed-flow time (10 s) runs the range out within three seconds: the
    // old datapath dropped new SYNs here for want of a port.
    const CONNECTIONS: usize = 9_000;
    const PER_SECOND: u32 = 2_000;
    let passive_wait = Duration::from_nanos(ferrynet_common::CT_PASSIVE_CLOSE_NS);
    assert!(
        f64::from(PER_SECOND) * (passive_wait.as_secs_f64() + 0.5) < snat_ports() as f64,
        "the pace must leave ports to spare under the passive close wait"
    );
    let (lab, to) = node_port_snated_to_another_node();
    let started = std::time::Instant::now();
    let failures = connect_one_at_a_time(&lab, to, CONNECTIONS, PER_SECOND, Ending::ClientFinFirst);
    let took = started.elapsed();
    assert!(failures.is_empty(), "{failures:?}");
    assert_snat_ports_never_ran_out(&lab, CONNECTIONS);
    // At a slower pace, ports held for the whole closed-flow time would have sufficed too: the
    // test tells the two apart only above it.
    let closed_wait = Duration::from_nanos(ferrynet_common::CT_CLOSED_NS);
    let telling = closed_wait.mul_f64(CONNECTIONS as f64 / snat_ports() as f64 * 0.9);
    assert!(
        took < telling,
        "{CONNECTIONS} connections took {took:?}: too slow to need ports taken again (under {telling:?})"
    );
}

/// The `spoofed pod source` rule's packet counter in `node`'s firewall table.
fn spoof_drops(lab: &Lab, node: &str) -> u64 {
    let table = lab
        .exec_capture(
            node,
            &[
                "nft".into(),
                "list".into(),
                "table".into(),
                "inet".into(),
                "ferrynet".into(),
            ],
        )
        .unwrap();
    let line = table
        .lines()
        .find(|l| l.contains("spoofed pod source"))
        .unwrap_or_else(|| panic!("no source check in {table}"));
    line.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line}"))
}

#[test]
fn per_packet_flows_to_another_nodes_pods_go_past_the_stack_both_ways() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("far", "n2", &labels(&[("app", "far")])).unwrap();
    lab.run_pod("near", "n1", &labels(&[("app", "near")])).unwrap();
    lab.run_pod("client", "n1", &BTreeMap::new()).unwrap();
    let target = IntOrString::Int(i32::from(POD_PORT));
    for app in ["far", "near"] {
        lab.create_service_object(&service(app, app, vec![port("http", "TCP", 80, target.clone())]))
            .unwrap();
    }
    lab.stop_agent("n1").unwrap();
    lab.start_agent_with("n1", &["--socket-lb", "false"]).unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    // The connections whose source port is `port` that n1's conntrack holds (the node's stack saw
    // them), by the original direction's source port.
    let tracked = |lab: &Lab, port: u16| {
        let table = lab
            .exec_capture("n1", &["cat".into(), "/proc/net/nf_conntrack".into()])
            .unwrap();
        table.lines().any(|l| l.contains(&format!(" sport={port} ")))
    };
    // The backend's namespace counts what arrives from the client by the TTL (hop limit) it
    // has left: sent with 64, each node on the way (n1, past its stack or not, and n2) takes
    // one off.
    let client_ips = [true, false].map(|v4| lab.pod("client").unwrap().ip(v4));
    let ttl_counters = format!(
        "table inet hops {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         ip saddr {v4} ip ttl 62 counter\n    ip saddr {v4} ip ttl 63 counter\n    \
         ip6 saddr {v6} ip6 hoplimit 62 counter\n    ip6 saddr {v6} ip6 hoplimit 63 counter\n  }}\n}}\n",
        v4 = client_ips[0],
        v6 = client_ips[1]
    );
    let rules = lab.dir().join("hops.nft");
    std::fs::write(&rules, ttl_counters).unwrap();
    let loaded = lab
        .exec_output("pod-far", &["nft".into(), "-f".into(), rules.display().to_string()])
        .unwrap();
    assert!(loaded.status.success(), "{loaded:?}");
    for (v4, base) in [(true, 21_000u16), (false, 21_100)] {
        let far = SocketAddr::new(lab.cluster_ip("far", v4).unwrap(), 80);
        let near = SocketAddr::new(lab.cluster_ip("near", v4).unwrap(), 80);
        // Translated, and the next hops' neighbours known (a packet whose neighbour the FIB does
        // not know yet goes through the stack, which resolves it).
        for to in [far, near] {
            assert!(
                eventually(Duration::from_secs(20), || lab.probe("pod-client", to, false).is_ok()),
                "client -> {to}"
            );
        }
        let before = datapath_counter(&lab, "n1", "packets_past_stack");
        for i in 0..5 {
            let answer = request_from_port(&lab, "client", base + i, far).unwrap();
            assert_eq!(answered_by(&answer), "far", "{answer}");
        }
        // Each connection's packets both ways (at least SYN, request and FIN out; SYN-ACK,
        // answer and FIN back) went past n1's stack, and its conntrack saw none of them.
        assert!(
            eventually(Duration::from_secs(10), || datapath_counter(
                &lab,
                "n1",
                "packets_past_stack"
            ) >= before + 5 * 6),
            "v4={v4}: {} packets past the stack, from {before}",
            datapath_counter(&lab, "n1", "packets_past_stack")
        );
        for i in 0..5 {
            assert!(
                !tracked(&lab, base + i),
                "v4={v4}: the stack saw the flow from :{}",
                base + i
            );
        }
        // What the stack does differently stays with it: a flow to this node's own pod, and (the
        // control: conntrack shows what the stack sees) a connection to the pod IP.
        let answer = request_from_port(&lab, "client", base + 10, near).unwrap();
        assert_eq!(answered_by(&answer), "near", "{answer}");
        assert!(
            tracked(&lab, base + 10),
            "v4={v4}: the flow to n1's own pod went through its stack"
        );
        let direct = SocketAddr::new(lab.pod("far").unwrap().ip(v4), POD_PORT);
        let answer = request_from_port(&lab, "client", base + 11, direct).unwrap();
        assert_eq!(answered_by(&answer), "far", "{answer}");
        assert!(
            tracked(&lab, base + 11),
            "v4={v4}: the pod-IP connection went through the stack"
        );
    }

    // Past n1's stack, each packet lost a hop there as it would have in the stack.
    let hops = lab
        .exec_capture(
            "pod-far",
            &[
                "nft".into(),
                "list".into(),
                "table".into(),
                "inet".into(),
                "hops".into(),
            ],
        )
        .unwrap();
    let counts: Vec<u64> = hops
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "packets").nth(1))
        .map(|n| n.parse().unwrap())
        .collect();
    let [v4_62, v4_63, v6_62, v6_63] = counts[..] else {
        panic!("four counters expected: {hops}")
    };
    assert!(v4_62 > 0 && v6_62 > 0, "{hops}");
    assert_eq!((v4_63, v6_63), (0, 0), "packets that kept a hop: {hops}");

    // A pod that sends from an address that is not its own (another node's pod's) gets nothing
    // past the stack: the firewall's source check drops it, as it drops what the stack forwards.
    let spoofed = match lab.pod("far").unwrap().ip(true) {
        std::net::IpAddr::V4(far) => {
            let [a, b, c, _] = far.octets();
            std::net::Ipv4Addr::new(a, b, c, 250)
        }
        std::net::IpAddr::V6(_) => unreachable!(),
    };
    assert!(
        lab.exec(
            "pod-client",
            &["ip", "addr", "add", &format!("{spoofed}/32"), "dev", "lo"].map(String::from)
        )
        .unwrap()
        .success()
    );
    let far = SocketAddr::new(lab.cluster_ip("far", true).unwrap(), 80);
    let (past_before, drops_before) = (
        datapath_counter(&lab, "n1", "packets_past_stack"),
        spoof_drops(&lab, "n1"),
    );
    let curl = |from: Option<std::net::Ipv4Addr>| {
        let mut argv = vec!["curl".to_string(), "-s".into(), "--max-time".into(), "2".into()];
        if let Some(from) = from {
            argv.extend(["--interface".into(), from.to_string()]);
        }
        argv.push(format!("http://{far}/"));
        lab.exec_output("pod-client", &argv).unwrap()
    };
    let spoofed_out = curl(Some(spoofed));
    assert!(
        !spoofed_out.status.success(),
        "a connection from a spoofed source was answered"
    );
    assert!(
        spoof_drops(&lab, "n1") > drops_before,
        "the source check did not see the spoofed packets"
    );
    assert_eq!(
        datapath_counter(&lab, "n1", "packets_past_stack"),
        past_before,
        "spoofed packets went past the stack"
    );
    // From its own address, the same request goes through.
    let own = curl(None);
    assert!(String::from_utf8_lossy(&own.stdout).contains("pod=far"), "{own:?}");
}
