//! The lab: 2-3 node clusters in namespaces, real agents, real CNI, real traffic.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    process::Command,
    time::{Duration, Instant},
};

use ferrynet_tests::{
    binary,
    lab::{
        CLIENT_V4, CLIENT_V6, Lab, LabGuard, POD_PORT, ServicePort, cgroup2_root,
        demo::{MYTHS, MythOutcome, exit_code, summary_table},
        eventually,
    },
    packets::{UdpProbe, ip_udp, send_raw, udp_icmp_error, vxlan_payload},
    tcp::{EchoServer, request},
};
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use kube::core::{ApiResource, DynamicObject};
use serde_json::{Value, json};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `from` reaches `to`'s server on both families, and the server sees `from`'s pod address.
#[track_caller]
fn assert_pod_to_pod(lab: &Lab, from: &str, to: &str) {
    for v4 in [true, false] {
        let target = SocketAddr::new(lab.pod(to).unwrap().ip(v4), POD_PORT);
        let answer = lab
            .request_from_pod(from, target)
            .unwrap_or_else(|e| panic!("{from} -> {to} ({target}): {e}"));
        let me = lab.pod(from).unwrap().ip(v4);
        assert_eq!(
            answer,
            format!(
                "pod={to} node={} ip={} client={me}",
                lab.pod(to).unwrap().node,
                target.ip()
            ),
            "{from} -> {to}"
        );
    }
}

/// Every route of the agent's on `node` (protocol 114): peers' PodCIDRs and the `unreachable`
/// routes covering its own.
fn agent_routes(lab: &Lab, node: &str) -> Vec<Value> {
    let ns = lab.node_ns(node).unwrap();
    let mut routes = ns
        .ip_json(&["-4", "route", "show", "proto", "114"])
        .as_array()
        .unwrap()
        .clone();
    routes.extend(
        ns.ip_json(&["-6", "route", "show", "proto", "114"])
            .as_array()
            .unwrap()
            .clone(),
    );
    routes
}

/// The agent's routes to other nodes' pods on `node`.
fn peer_routes(lab: &Lab, node: &str) -> Vec<Value> {
    agent_routes(lab, node)
        .into_iter()
        .filter(|r| r["type"] != "unreachable")
        .collect()
}

fn routed_cidrs(lab: &Lab, node: &str) -> Vec<String> {
    let mut cidrs: Vec<String> = peer_routes(lab, node)
        .iter()
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect();
    cidrs.sort();
    cidrs
}

fn expected_cidrs(lab: &Lab, except: &str) -> Vec<String> {
    let mut cidrs: Vec<String> = lab
        .state
        .nodes
        .iter()
        .filter(|n| n.name != except)
        .flat_map(|n| n.pod_cidrs())
        .collect();
    cidrs.sort();
    cidrs
}

#[test]
fn native_mode_connects_pods_across_nodes_and_masquerades_egress() {
    let mut lab = LabGuard::up(3, "native");
    for (pod, node) in [("p1", "n1"), ("p2", "n2"), ("p3", "n3")] {
        lab.run_pod(pod, node, &labels(&[("app", "demo")])).unwrap();
    }
    for (from, to) in [("p1", "p2"), ("p2", "p3"), ("p3", "p1"), ("p1", "p3")] {
        assert_pod_to_pod(&lab, from, to);
    }
    // Native: a route per peer PodCIDR via the peer's address on eth0; no VXLAN device.
    for node in ["n1", "n2", "n3"] {
        assert_eq!(routed_cidrs(&lab, node), expected_cidrs(&lab, node), "{node}");
        let routes = peer_routes(&lab, node);
        assert!(
            routes.iter().all(|r| r["dev"] == "eth0"
                && r["gateway"]
                    .as_str()
                    .is_some_and(|g| g.starts_with("10.200.0.") || g.starts_with("fd00:200::"))),
            "{routes:?}"
        );
        assert!(
            !lab.node_ns(node)
                .unwrap()
                .links()
                .contains(&"ferrynet.vxlan".to_string())
        );
    }
    // Egress to a host outside the pod CIDRs takes the node's address, on both families.
    let client = lab.ns("client").unwrap();
    let outside = EchoServer::start(&client, SocketAddr::new(CLIENT_V4.into(), 9000), "outside");
    let outside_v6 = EchoServer::start(&client, SocketAddr::new(CLIENT_V6.into(), 9000), "outside");
    for (pod, server, node_address) in [
        ("p2", &outside, "10.200.0.12"),
        ("p3", &outside, "10.200.0.13"),
        ("p3", &outside_v6, "fd00:200::13"),
    ] {
        assert_eq!(
            request(&lab.pod_ns(pod).unwrap(), server.addr, "hi").unwrap(),
            format!("outside from={node_address} hi")
        );
    }
    // The agent keeps the masquerade in a table of its own.
    let nft = lab.node_ns("n1").unwrap().exec("nft", &["list", "tables"]);
    assert_eq!(String::from_utf8_lossy(&nft.stdout).trim(), "table inet ferrynet");

    // `ferrynet-agent status` shows the node, its PodCIDRs, its peers and CNI readiness.
    let state_dir = lab.dir().join("nodes/n1/agent").display().to_string();
    let out = lab
        .exec_capture(
            "n1",
            &[
                binary("ferrynet-agent").display().to_string(),
                "--state-dir".into(),
                state_dir.clone(),
                "status".into(),
            ],
        )
        .unwrap();
    for needle in [
        "node:       n1",
        "ready:      yes",
        "10.244.1.0/24",
        "n2",
        "10.244.2.0/24 ",
        "via 10.200.0.12",
        "n3",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let ready = lab
        .node_ns("n1")
        .unwrap()
        .command_output(Command::new(binary("ferrynet-agent")).args(["--state-dir", &state_dir, "status", "--ready"]));
    assert!(ready.status.success());

    // Masquerading turned off: the masquerade an earlier run left goes (the table keeps its
    // filters), and egress keeps the pod's address (the outside host is given a route back to
    // the node's pods to show it).
    lab.stop_agent("n3").unwrap();
    lab.start_agent_with("n3", &["--masquerade", "false"]).unwrap();
    let n3 = lab.node_ns("n3").unwrap();
    let table = || String::from_utf8_lossy(&n3.exec("nft", &["list", "table", "inet", "ferrynet"]).stdout).into_owned();
    assert!(
        eventually(Duration::from_secs(20), || {
            let t = table();
            !t.contains("masquerade") && t.contains("spoofed pod source")
        }),
        "{}",
        table()
    );
    client.ip(&["route", "add", "10.244.3.0/24", "via", "10.200.0.13"]);
    let p3 = lab.pod("p3").unwrap().ip(true);
    assert_eq!(
        request(&lab.pod_ns("p3").unwrap(), outside.addr, "hi").unwrap(),
        format!("outside from={p3} hi")
    );

    // Pods release their addresses when deleted.
    lab.delete_pod("p2").unwrap();
    let store = ferrynet_ipam::Store::open(&lab.dir().join("nodes/n2/ipam"), "ferrynet").unwrap();
    assert!(store.lock().unwrap().attachments().unwrap().is_empty());
}

#[test]
fn vxlan_mode_connects_pods_across_nodes() {
    let mut lab = LabGuard::up(3, "vxlan");
    lab.run_pod("a", "n1", &BTreeMap::new()).unwrap();
    lab.run_pod("b", "n2", &BTreeMap::new()).unwrap();
    lab.run_pod("c", "n3", &BTreeMap::new()).unwrap();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a")] {
        assert_pod_to_pod(&lab, from, to);
    }
    let n1 = lab.node_ns("n1").unwrap();
    let vxlan = &n1.ip_json(&["-d", "link", "show", "ferrynet.vxlan"])[0];
    assert_eq!(vxlan["linkinfo"]["info_data"]["id"], 4242);
    assert_eq!(vxlan["mtu"], 1450);
    assert!(peer_routes(&lab, "n1").iter().all(|r| r["dev"] == "ferrynet.vxlan"));
    assert_eq!(routed_cidrs(&lab, "n1"), expected_cidrs(&lab, "n1"));
    // The pods' MTU leaves room for the encapsulation.
    let conflist: Value =
        serde_json::from_slice(&std::fs::read(lab.dir().join("nodes/n1/cni-conf/05-ferrynet.conflist")).unwrap())
            .unwrap();
    assert_eq!(conflist["plugins"][0]["mtu"], 1450);
    assert_eq!(
        lab.pod_ns("a").unwrap().ip_json(&["link", "show", "eth0"])[0]["mtu"],
        1450
    );
}

#[test]
fn auto_mode_on_one_segment_routes_natively_and_reserves_the_overlay_mtu() {
    let lab = LabGuard::up(2, "auto");
    assert_eq!(routed_cidrs(&lab, "n1"), expected_cidrs(&lab, "n1"));
    assert!(peer_routes(&lab, "n1").iter().all(|r| r["dev"] == "eth0"));
    assert!(
        !lab.node_ns("n1")
            .unwrap()
            .links()
            .contains(&"ferrynet.vxlan".to_string())
    );
    let conflist: Value =
        serde_json::from_slice(&std::fs::read(lab.dir().join("nodes/n2/cni-conf/05-ferrynet.conflist")).unwrap())
            .unwrap();
    assert_eq!(conflist["plugins"][0]["mtu"], 1450);
}

#[test]
fn auto_mode_routes_natively_within_a_segment_and_over_vxlan_across_segments() {
    // n1 and n3 share segment 0; n2 is on segment 1, behind the underlay's router, which knows
    // nothing of pod CIDRs: only an overlay carries pod traffic between the segments.
    let mut lab = LabGuard::up_segmented(3, "auto", 2);
    let node = |name: &str| lab.state.nodes.iter().find(|n| n.name == name).unwrap().clone();
    let (n2, n3) = (node("n2"), node("n3"));
    assert_eq!((node("n1").segment, n2.segment, n3.segment), (0, 1, 0));
    for name in ["n1", "n2", "n3"] {
        assert_eq!(routed_cidrs(&lab, name), expected_cidrs(&lab, name), "{name}");
    }
    // n1 reaches n3's pods natively, through n3's own address, and n2's over VXLAN.
    for route in peer_routes(&lab, "n1") {
        let dst = route["dst"].as_str().unwrap().to_string();
        if n3.pod_cidrs().contains(&dst) {
            let gateway = if dst.contains(':') {
                n3.v6().to_string()
            } else {
                n3.v4().to_string()
            };
            assert_eq!(
                (&route["dev"], &route["gateway"]),
                (&json!("eth0"), &json!(gateway)),
                "{route}"
            );
        } else {
            assert!(n2.pod_cidrs().contains(&dst), "{route}");
            assert_eq!(route["dev"], "ferrynet.vxlan", "{route}");
        }
    }
    // n2 shares a segment with no one.
    assert!(peer_routes(&lab, "n2").iter().all(|r| r["dev"] == "ferrynet.vxlan"));
    // n1's overlay knows n2's tunnel endpoint (routed, on the other segment) and not n3's.
    let fdb = lab
        .node_ns("n1")
        .unwrap()
        .exec("bridge", &["-j", "fdb", "show", "dev", "ferrynet.vxlan"]);
    let fdb: Value = serde_json::from_slice(&fdb.stdout).unwrap();
    let endpoints: Vec<&str> = fdb
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["dst"].as_str())
        .collect();
    assert_eq!(endpoints, [n2.v4().to_string()], "{fdb}");
    // Auto mode may need the overlay on any node: the pods' MTU leaves room for it everywhere.
    let conflist: Value =
        serde_json::from_slice(&std::fs::read(lab.dir().join("nodes/n1/cni-conf/05-ferrynet.conflist")).unwrap())
            .unwrap();
    assert_eq!(conflist["plugins"][0]["mtu"], 1450);

    lab.run_pod("a", "n1", &BTreeMap::new()).unwrap();
    lab.run_pod("b", "n2", &BTreeMap::new()).unwrap();
    lab.run_pod("c", "n3", &BTreeMap::new()).unwrap();
    for (from, to) in [("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")] {
        assert_pod_to_pod(&lab, from, to);
    }
}

#[test]
fn the_agent_turns_forwarding_on_through_its_proc_sys_net_setting() {
    let lab = LabGuard::up(1, "native");
    let n1 = lab.node_ns("n1").unwrap();
    let forwarding = || {
        ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"].map(|key| {
            String::from_utf8_lossy(&n1.exec("sysctl", &["-n", key]).stdout)
                .trim()
                .to_string()
        })
    };
    // A new namespace starts with forwarding off; the agent turned it on.
    assert_eq!(forwarding(), ["1", "1"]);
    lab.stop_agent("n1").unwrap();
    n1.sysctl("net.ipv4.ip_forward", "0");
    n1.sysctl("net.ipv6.conf.all.forwarding", "0");
    // Pointed at a directory that is not /proc/sys/net, it cannot, and says where it looked.
    let elsewhere = lab.dir().join("not-proc-sys-net");
    lab.start_agent_with("n1", &["--proc-sys-net", elsewhere.to_str().unwrap()])
        .unwrap();
    let wanted = format!("enabling {}/ipv4/ip_forward", elsewhere.display());
    assert!(
        eventually(Duration::from_secs(20), || lab
            .agent_status("n1")
            .is_ok_and(|s| s["nodeNetworking"]["warnings"].to_string().contains(&wanted))),
        "{:?}",
        lab.agent_status("n1")
    );
    assert_eq!(forwarding(), ["0", "0"]);
    // Pointed at the node's /proc/sys/net mounted elsewhere (as the DaemonSet mounts the host's
    // at /host/proc/sys/net), it turns forwarding on there.
    lab.stop_agent("n1").unwrap();
    let mounted = lab.dir().join("host-proc-sys-net");
    std::os::unix::fs::symlink("/proc/sys/net", &mounted).unwrap();
    lab.start_agent_with("n1", &["--proc-sys-net", mounted.to_str().unwrap()])
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || forwarding() == ["1", "1"]));
}

#[test]
fn joining_and_leaving_nodes_update_every_nodes_routes() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("old", "n1", &BTreeMap::new()).unwrap();
    let added = lab.add_node().unwrap();
    assert_eq!(added, "n3");
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    for node in ["n1", "n2", "n3"] {
        assert_eq!(
            routed_cidrs(&lab, node),
            expected_cidrs(&lab, node),
            "{node} after n3 joined"
        );
    }
    lab.run_pod("new", "n3", &BTreeMap::new()).unwrap();
    assert_pod_to_pod(&lab, "old", "new");
    assert_pod_to_pod(&lab, "new", "old");

    lab.delete_node("n2").unwrap();
    let gone = eventually(Duration::from_secs(15), || {
        ["n1", "n3"].iter().all(|n| {
            !routed_cidrs(&lab, n)
                .iter()
                .any(|c| c == "10.244.2.0/24" || c == "fd00:244:2::/64")
        })
    });
    assert!(
        gone,
        "routes to the deleted node's pods remain: {:?}",
        routed_cidrs(&lab, "n1")
    );
    assert_eq!(routed_cidrs(&lab, "n1"), expected_cidrs(&lab, "n1"));
    assert_pod_to_pod(&lab, "old", "new");
}

#[test]
fn restarting_an_agent_keeps_routes_and_traffic_and_changes_nothing() {
    let mut lab = LabGuard::up(3, "vxlan");
    lab.run_pod("x", "n1", &BTreeMap::new()).unwrap();
    lab.run_pod("y", "n2", &BTreeMap::new()).unwrap();
    let before = routed_cidrs(&lab, "n1");
    let vxlan_before = lab.node_ns("n1").unwrap().ip_json(&["link", "show", "ferrynet.vxlan"])[0]["ifindex"].clone();

    // SIGTERM: the agent stops; the data path stays.
    lab.stop_agent("n1").unwrap();
    assert_eq!(routed_cidrs(&lab, "n1"), before);
    assert_pod_to_pod(&lab, "x", "y");
    assert_pod_to_pod(&lab, "y", "x");
    let status_path = lab.dir().join("nodes/n1/agent/agent-status.json");
    std::fs::remove_file(&status_path).unwrap();

    // Back: it adopts what is there. Its first sync changes nothing (same device, same routes,
    // same firewall table), and it is alive and converged.
    lab.start_agent("n1").unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    let status = lab.agent_status("n1").unwrap();
    assert_eq!(
        status["nodeNetworking"]["details"]["lastChanges"],
        json!({"routes": 0, "vxlanDevice": 0, "vxlanEntries": 0, "firewall": 0, "sysctls": 0}),
        "{status}"
    );
    assert_agent_alive(&lab, "n1");
    assert_eq!(routed_cidrs(&lab, "n1"), before);
    assert_eq!(
        lab.node_ns("n1").unwrap().ip_json(&["link", "show", "ferrynet.vxlan"])[0]["ifindex"],
        vxlan_before
    );
    assert_pod_to_pod(&lab, "x", "y");

    // While it is down again, a node leaves, and someone else adds a route of their own. Back
    // up, the agent finds its stale routes by their protocol and removes them, and leaves the
    // other route alone.
    lab.stop_agent("n1").unwrap();
    lab.delete_node("n3").unwrap();
    let n1 = lab.node_ns("n1").unwrap();
    n1.ip(&["route", "add", "192.0.2.0/24", "via", "10.200.0.250", "proto", "static"]);
    assert!(
        routed_cidrs(&lab, "n1").contains(&"10.244.3.0/24".to_string()),
        "stale before the restart"
    );
    lab.start_agent("n1").unwrap();
    lab.wait_converged(Duration::from_secs(30)).unwrap();
    assert_eq!(routed_cidrs(&lab, "n1"), expected_cidrs(&lab, "n1"));
    assert_eq!(
        n1.ip_json(&["route", "show", "192.0.2.0/24"])[0]["gateway"],
        "10.200.0.250",
        "someone else's route survives"
    );
    let neighbours = n1.ip_json(&["neigh", "show", "dev", "ferrynet.vxlan"]);
    assert!(
        neighbours.as_array().unwrap().iter().all(|n| n["dst"] != "10.244.3.0"),
        "{neighbours}"
    );
    assert_pod_to_pod(&lab, "x", "y");
}

#[test]
fn agents_ride_out_an_api_stand_in_restart_and_converge_after() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("s", "n1", &BTreeMap::new()).unwrap();
    lab.run_pod("t", "n2", &BTreeMap::new()).unwrap();
    lab.stop_apiserver().unwrap();
    // Without an API server the agent keeps the node as it is, and keeps repairing it: a route
    // someone deletes meanwhile is back at the next resync, and nothing is torn down.
    let n1 = lab.node_ns("n1").unwrap();
    n1.ip(&["route", "del", "10.244.2.0/24"]);
    assert!(
        eventually(Duration::from_secs(20), || routed_cidrs(&lab, "n1")
            == expected_cidrs(&lab, "n1")),
        "{:?}",
        routed_cidrs(&lab, "n1")
    );
    assert_agent_alive(&lab, "n1");
    assert_pod_to_pod(&lab, "s", "t");
    lab.start_apiserver().unwrap();
    // The watches reconnect by themselves: a node added now reaches every agent.
    lab.add_node().unwrap();
    lab.wait_converged(Duration::from_secs(60)).unwrap();
    for node in ["n1", "n2", "n3"] {
        assert_eq!(routed_cidrs(&lab, node), expected_cidrs(&lab, node), "{node}");
    }
}

#[test]
fn hostile_node_objects_do_not_crash_the_agents() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("u", "n1", &BTreeMap::new()).unwrap();
    lab.run_pod("v", "n2", &BTreeMap::new()).unwrap();
    let hostile = [
        json!({"metadata": {"name": "no-cidr"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.99"}]}}),
        json!({"metadata": {"name": "bad-cidr"}, "spec": {"podCIDRs": ["banana", "10.244.77.0/33"]}, "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.98"}]}}),
        json!({"metadata": {"name": "steals-n1"}, "spec": {"podCIDRs": ["10.244.1.0/25"]}, "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.97"}]}}),
        json!({"metadata": {"name": "no-address"}, "spec": {"podCIDRs": ["10.244.66.0/24"]}}),
        json!({"metadata": {"name": "v6-only"}, "spec": {"podCIDRs": ["fd00:244:99::/64"]}, "status": {"addresses": [{"type": "InternalIP", "address": "not-an-address"}, {"type": "InternalIP", "address": "fd00:200::99"}]}}),
        json!({"metadata": {"name": "garbage"}, "spec": {"podCIDRs": [], "taints": "not-a-list"}, "status": {"addresses": "nope"}}),
        json!({"metadata": {"name": "covers-underlay"}, "spec": {"podCIDRs": ["10.200.0.0/16"]}, "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.96"}]}}),
        json!({"metadata": {"name": "default-route"}, "spec": {"podCIDRs": ["0.0.0.0/0"]}, "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.95"}]}}),
        json!({"metadata": {"name": "collider"}, "spec": {"podCIDRs": ["10.244.50.0/24"]}, "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.94"}]}}),
        // Not on the nodes' segment: no native route can reach it.
        json!({"metadata": {"name": "off-link"}, "spec": {"podCIDRs": ["10.244.88.0/24"]}, "status": {"addresses": [{"type": "InternalIP", "address": "10.201.0.77"}]}}),
    ];
    // Someone else already routes 10.244.50.0/24 on n1 (say, a static route); n1 also has a
    // default route. Neither is the agent's to replace.
    let n1 = lab.node_ns("n1").unwrap();
    n1.ip(&[
        "route",
        "add",
        "10.244.50.0/24",
        "via",
        "10.200.0.250",
        "proto",
        "static",
    ]);
    n1.ip(&["route", "add", "default", "via", "10.200.0.250"]);
    // Posted as they are, through kube-rs's dynamic API: a real API server would refuse some of
    // them, the stand-in does not validate.
    let resource = ApiResource::erase::<Node>(&());
    let api = lab.api().unwrap();
    for node in &hostile {
        let object: DynamicObject = serde_json::from_value(node.clone()).unwrap();
        let resource = resource.clone();
        api.call(move |client| async move {
            kube::Api::<DynamicObject>::all_with(client, &resource)
                .create(&Default::default(), &object)
                .await?;
            Ok(())
        })
        .unwrap();
    }
    // The agents keep running and keep the cluster working; the hostile nodes only warn.
    let wanted = [
        "no-cidr",
        "bad-cidr",
        "steals-n1",
        "no-address",
        "covers-underlay",
        "default-route",
        "route 10.244.50.0/24",
        "route 10.244.88.0/24",
    ];
    let warned = || {
        let warnings = lab.agent_status("n1").unwrap()["nodeNetworking"]["warnings"].to_string();
        wanted.iter().all(|name| warnings.contains(name))
    };
    assert!(
        eventually(Duration::from_secs(30), warned),
        "{}",
        lab.agent_status("n1").unwrap()["nodeNetworking"]["warnings"]
    );
    for node in ["n1", "n2"] {
        assert_agent_alive(&lab, node);
    }
    // None of it is an error of the node's own: every other peer is routed.
    let status = lab.agent_status("n1").unwrap();
    assert!(status["nodeNetworking"]["lastError"].is_null(), "{status}");
    // Other people's routes are untouched: the static one, the default, the underlay's own.
    let route = |dst: &str| n1.ip_json(&["route", "show", dst]);
    assert_eq!(route("10.244.50.0/24")[0]["protocol"], "static");
    assert_eq!(route("default")[0]["gateway"], "10.200.0.250");
    assert_eq!(route("10.200.0.0/24")[0]["protocol"], "kernel");
    // A route for v6-only's IPv6 PodCIDR is fine (it has an IPv6 InternalIP); none of the others.
    let mut want = expected_cidrs(&lab, "n1");
    want.push("fd00:244:99::/64".into());
    want.sort();
    assert_eq!(routed_cidrs(&lab, "n1"), want);
    assert_pod_to_pod(&lab, "u", "v");
}

#[test]
fn a_service_gets_endpoint_slices_for_its_ready_pods() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("w1", "n1", &labels(&[("app", "w")])).unwrap();
    lab.run_pod("w2", "n2", &labels(&[("app", "w")])).unwrap();
    lab.run_pod("other", "n2", &labels(&[("app", "x")])).unwrap();
    lab.create_service(
        "w",
        &labels(&[("app", "w")]),
        &[ServicePort {
            port: 80,
            target_port: POD_PORT,
        }],
        "ClusterIP",
    )
    .unwrap();
    let slices = lab
        .kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=w",
            "-o",
            "json",
        ])
        .unwrap();
    let slices: Value = serde_json::from_str(&slices).unwrap();
    let mut addresses: Vec<String> = slices["items"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["addresses"][0].as_str().unwrap().to_string())
        })
        .collect();
    addresses.sort();
    let mut want: Vec<String> = ["w1", "w2"]
        .iter()
        .flat_map(|p| {
            lab.pod(p)
                .unwrap()
                .ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    want.sort();
    assert_eq!(addresses, want);
    lab.delete_pod("w2").unwrap();
    let slices: Value = serde_json::from_str(&lab.kubectl(&["get", "endpointslices", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(slices["items"][0]["endpoints"].as_array().unwrap().len(), 1);
    lab.delete_service("w").unwrap();
    let slices: Value = serde_json::from_str(&lab.kubectl(&["get", "endpointslices", "-o", "json"]).unwrap()).unwrap();
    assert!(slices["items"].as_array().unwrap().is_empty());
}

/// The output printed under each command line of the demo that contains `command`: its lines up
/// to the next command, step, remark or check.
fn outputs_of<'a>(text: &'a str, command: &str) -> Vec<Vec<&'a str>> {
    let lines: Vec<&str> = text.lines().collect();
    let remark = ["  PASS ", "  FAIL ", "  changed: ", "  unchanged: ", "  why ", "  ("];
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.starts_with(' ') && l.contains(command))
        .map(|(i, _)| {
            lines[i + 1..]
                .iter()
                .take_while(|l| l.starts_with("  ") && !remark.iter().any(|r| l.starts_with(r)))
                .copied()
                .collect()
        })
        .collect()
}

/// The columns of the row of pod `name` (by prefix) in `kubectl get pods -o wide` outputs.
fn pod_rows<'a>(outputs: &[Vec<&'a str>], name: &str) -> Vec<Vec<&'a str>> {
    outputs
        .iter()
        .flatten()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.first().is_some_and(|c| c.starts_with(name)) && cols.len() >= 7)
        .collect()
}

/// The demo's summary table rows (after its `==> Summary` line).
fn summary_rows(text: &str) -> Vec<&str> {
    let summary = &text[text.rfind("==> Summary").expect("the demo prints a summary")..];
    summary
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

#[test]
fn the_demo_settles_the_four_myths_and_down_leaves_nothing() {
    ferrynet_tests::require_root();
    let name = format!("dm{}", std::process::id() % 100_000);
    let _down = DownOnDrop(name.clone());
    let demo = |args: &[&str]| {
        let started = Instant::now();
        let out = Command::new(binary("ferrynet-lab"))
            .args(["--name", &name, "demo"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "demo {args:?} failed ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("demo {args:?} took {:.0} s", started.elapsed().as_secs_f64());
        text
    };
    let text = demo(&[]);
    let rows = summary_rows(&text);
    assert_eq!(rows.len(), 4, "{text}");
    for ((number, title), row) in MYTHS.iter().zip(&rows) {
        assert!(
            row.starts_with(&format!("{number} ")) && row.contains(title) && row.contains(" PASS "),
            "{row}\n{text}"
        );
    }
    assert!(!text.contains("  FAIL  "), "{text}");

    // Myth 1: test-pod's IP, as `kubectl get pods -o wide` printed it, is in its node's PodCIDR;
    // no-cni, on n3 without the CNI configuration, had none.
    let listings = outputs_of(&text, "$ kubectl get pods -o wide");
    let test_pod = &pod_rows(&listings, "test-pod")[0];
    let (ip, node) = (test_pod[5].parse::<IpAddr>().unwrap(), test_pod[6]);
    let index: u8 = node.strip_prefix('n').unwrap().parse().unwrap();
    let cidr: ipnet::IpNet = format!("10.244.{index}.0/24").parse().unwrap();
    assert!(cidr.contains(&ip), "{ip} on {node}");
    assert!(
        pod_rows(&listings, "no-cni")
            .iter()
            .any(|cols| cols[2] == "ContainerCreating" && cols[5] == "<none>" && cols[6] == "n3"),
        "{listings:?}"
    );
    // Myth 2: the real nginx's page through the Service's name.
    let by_name = outputs_of(&text, "kubectl -- exec client -- curl -s -m 2 http://nginx");
    assert!(
        by_name[0]
            .iter()
            .any(|l| l.contains("<title>Welcome to nginx!</title>")),
        "{by_name:?}"
    );
    // Myth 3: explain names the deployment's pod, then the three after the scale-up.
    let deployed = outputs_of(&text, "$ kubectl get pods -l app=demo -o wide");
    let pod_ip = pod_rows(&deployed[..1], "demo-")[0][5];
    let explained = outputs_of(&text, "$ ferrynet-agent explain ");
    assert_eq!(explained.len(), 2, "{text}");
    assert!(
        explained[0].iter().any(|l| l.trim() == format!("{pod_ip}:80 ready")),
        "{pod_ip}: {:?}",
        explained[0]
    );
    assert!(
        explained[1].iter().any(|l| l.contains("backends (3):")),
        "{:?}",
        explained[1]
    );
    assert!(text.contains("no socket listens on 10.96."), "{text}");
    // Myth 4: the restore, timed, after each way of removing translation.
    let restored: Vec<f64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("service restored "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(restored.len(), 2, "{text}");
    assert!(restored.iter().all(|s| *s > 0.0 && *s < 30.0), "{restored:?}");
    assert_nothing_left(&name);

    // One myth alone, on a fresh lab.
    let text = demo(&["--myth", "2"]);
    let rows = summary_rows(&text);
    assert_eq!(rows.len(), 1, "{text}");
    assert!(rows[0].starts_with("2 ") && rows[0].contains(" PASS "), "{text}");
    for other in [1, 3, 4] {
        assert!(!text.contains(&format!("==> Myth {other}:")), "{text}");
    }
    assert!(
        text.contains("==> Myth 2:") && text.contains("Welcome to nginx!"),
        "{text}"
    );
    assert_nothing_left(&name);
    // Names that could reach outside the lab are refused.
    for bad in ["/", "..", "", "a-b", "../etc"] {
        assert!(Lab::down(bad).is_err(), "{bad:?}");
    }
}

fn outcome(number: u8, passed: usize, failed: &[&str], error: Option<&str>) -> MythOutcome {
    MythOutcome {
        number,
        title: MYTHS[usize::from(number) - 1].1.into(),
        passed,
        failed: failed.iter().map(|f| f.to_string()).collect(),
        error: error.map(str::to_string),
    }
}

#[test]
fn the_demo_fails_a_myth_whose_check_failed_or_that_stopped_and_exits_non_zero() {
    let all = [outcome(1, 3, &[], None), outcome(2, 2, &[], None)];
    assert_eq!(exit_code(&all), 0);
    let table = summary_table(&all);
    assert_eq!(table.lines().filter(|l| l.contains(" PASS ")).count(), 2, "{table}");

    let one_check = [outcome(1, 3, &[], None), outcome(2, 1, &["curl failed"], None)];
    assert_eq!(exit_code(&one_check), 1);
    let table = summary_table(&one_check);
    assert!(
        table.lines().any(|l| l.starts_with("1 ") && l.contains(" PASS ")),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("2 ") && l.contains(" FAIL ")),
        "{table}"
    );
    assert!(table.contains("failed: curl failed"), "{table}");

    let stopped = [outcome(3, 2, &[], Some("pod demo not ready"))];
    assert_eq!(exit_code(&stopped), 1);
    assert!(summary_table(&stopped).contains("stopped: pod demo not ready"));
    // A myth with no check that held proves nothing; no myth at all is no success either.
    assert_eq!(exit_code(&[outcome(4, 0, &[], None)]), 1);
    assert_eq!(exit_code(&[]), 1);
}

#[test]
fn up_cleans_up_after_a_crashed_lab() {
    ferrynet_tests::require_root();
    let name = format!("crash{}", std::process::id() % 100_000);
    let lab = Lab::up(&ferrynet_tests::lab::LabOptions {
        name: name.clone(),
        nodes: 1,
        mode: "native".into(),
        segments: 1,
        dns: false,
    })
    .unwrap();
    // "Crash": the state file is lost, processes and namespaces are left behind.
    std::fs::remove_file(lab.dir().join("state.json")).unwrap();
    drop(lab);
    let lab = Lab::up(&ferrynet_tests::lab::LabOptions {
        name: name.clone(),
        nodes: 1,
        mode: "native".into(),
        segments: 1,
        dns: false,
    })
    .unwrap();
    assert_eq!(lab.state.nodes.len(), 1);
    Lab::down(&name).unwrap();
    assert_nothing_left(&name);
}

/// Nothing of lab `name` is left: namespaces, state directory, bpffs mount, cgroups.
#[track_caller]
fn assert_nothing_left(name: &str) {
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("fl-{name}-")))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let dir = Lab::dir_of(name).unwrap();
    assert!(!dir.exists());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&dir.display().to_string()), "{mountinfo}");
    let cgroup = cgroup2_root().unwrap().join("ferrynet-lab").join(name);
    assert!(!cgroup.exists(), "{}", cgroup.display());
}

#[test]
fn each_agent_has_its_own_pin_path_and_cgroup_and_down_removes_them() {
    let lab = LabGuard::up(2, "native");
    let root = cgroup2_root().unwrap();
    for node in ["n1", "n2"] {
        let status = lab.agent_status(node).unwrap();
        let pins = lab.node_pin_path(node);
        let cgroup = lab.node_cgroup(node).unwrap();
        let services = &status["services"]["details"];
        assert_eq!(services["bpfPinPath"], pins.display().to_string(), "{status}");
        assert_eq!(services["cgroupPath"], cgroup.display().to_string(), "{status}");
        // The agent made its pin directory, root only, in the lab's own bpffs.
        let meta = std::fs::metadata(&pins).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        // The agent, and what runs on the node, live in the node's cgroup, not the root.
        let own = format!("0::/{}", cgroup.strip_prefix(&root).unwrap().display());
        let pid = lab.agent_pid(node).unwrap();
        let agent = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(agent.lines().any(|l| l == own), "{agent}");
        let shell = lab
            .exec_capture(node, &["cat".into(), "/proc/self/cgroup".into()])
            .unwrap();
        assert!(shell.lines().any(|l| l == own), "{shell}");
    }
    assert_ne!(lab.node_pin_path("n1"), lab.node_pin_path("n2"));
    // The demo's "no kube-proxy" check finds kube-proxy's rules wherever a node has them, in
    // each of its modes: planted here one at a time, each found, then taken out again.
    // (The nodes' traces: a kube-proxy process elsewhere on the machine is not this lab's.)
    let node_traces = || -> Vec<String> {
        lab.kube_proxy_traces()
            .unwrap()
            .into_iter()
            .filter(|t| !t.starts_with("this machine"))
            .collect()
    };
    assert_eq!(node_traces(), Vec::<String>::new());
    let plants: [(&str, &[&str], &[&str], &str); 3] = [
        (
            "n1",
            &["nft", "add", "table", "ip", "kube-proxy"],
            &["nft", "delete", "table", "ip", "kube-proxy"],
            "n1: nftables table kube-proxy",
        ),
        (
            "n2",
            &["iptables-nft", "-t", "nat", "-N", "KUBE-SERVICES"],
            &["iptables-nft", "-t", "nat", "-X", "KUBE-SERVICES"],
            "n2: iptables-nft chain KUBE-SERVICES",
        ),
        (
            "n2",
            &["iptables-legacy", "-t", "nat", "-N", "KUBE-SERVICES"],
            &["iptables-legacy", "-t", "nat", "-X", "KUBE-SERVICES"],
            "n2: iptables-legacy-save chain KUBE-SERVICES",
        ),
    ];
    let run = |node: &str, argv: &[&str]| {
        let out = lab
            .exec_output(node, &argv.iter().map(|a| a.to_string()).collect::<Vec<_>>())
            .unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (node, plant, remove, trace) in plants {
        run(node, plant);
        let found = node_traces();
        run(node, remove);
        assert_eq!(found, vec![trace.to_string()]);
    }
    assert_eq!(node_traces(), Vec::<String>::new());
    // A pin path that is not on a bpffs is refused (and not created), plainly, without
    // holding up the rest.
    lab.stop_agent("n2").unwrap();
    let off_bpffs = lab.dir().join("not-bpffs").join("pins");
    lab.start_agent_with("n2", &["--bpf-pin-path", off_bpffs.to_str().unwrap()])
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || lab.agent_status("n2").is_ok_and(|s| {
            s["services"]["details"]["bpfPinPath"].is_null()
                && s["services"]["lastError"].to_string().contains("is not on a bpffs")
                && s["services"]["ready"] == false
                && s["cniConfig"]["ready"] == true
        })),
        "{:?}",
        lab.agent_status("n2")
    );
    assert!(!off_bpffs.exists());

    let name = lab.state.name.clone();
    Lab::down(&name).unwrap();
    assert_nothing_left(&name);
}

/// Runs `ferrynet-agent <args> <subcommand...>` in a node's namespace as that node's agent.
fn agent_cli(lab: &Lab, node: &str, subcommand: &[&str]) -> std::process::Output {
    let mut args = lab.agent_args(node);
    args.extend(subcommand.iter().map(|s| s.to_string()));
    lab.node_ns(node)
        .unwrap()
        .command_output(Command::new(binary("ferrynet-agent")).args(&args))
}

#[test]
fn install_cni_then_uninstall_put_in_and_take_out_what_the_agent_owns() {
    let lab = LabGuard::up(2, "vxlan");
    lab.stop_agent("n1").unwrap();
    let dir = lab.dir().join("nodes/n1");
    let n1 = lab.node_ns("n1").unwrap();
    // The init container's mode, from nothing: binaries and conflist, and it exits.
    std::fs::remove_file(dir.join("cni-conf/05-ferrynet.conflist")).unwrap();
    for p in ["ferrynet", "ferrynet-ipam"] {
        std::fs::remove_file(dir.join("cni-bin").join(p)).unwrap();
    }
    let out = agent_cli(&lab, "n1", &["install-cni", "--wait-seconds", "20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("cni-conf/05-ferrynet.conflist").exists());
    for p in ["ferrynet", "ferrynet-ipam"] {
        assert!(dir.join("cni-bin").join(p).exists(), "{p}");
    }
    // Uninstall: the conflist, the binaries, the agent's routes, VXLAN device, firewall table,
    // and the rule and table that deliver refused Service traffic to the firewall.
    assert!(!agent_routes(&lab, "n1").is_empty());
    let refusal = || -> Vec<String> {
        ["-4", "-6"]
            .into_iter()
            .flat_map(|family| {
                let rules = n1.exec("ip", &[family, "rule", "show", "table", "2114"]);
                let routes = n1.exec("ip", &[family, "route", "show", "table", "2114"]);
                [rules, routes]
            })
            .flat_map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let installed = refusal();
    assert_eq!(installed.len(), 4, "a rule and a local route per family: {installed:?}");
    let out = agent_cli(&lab, "n1", &["uninstall"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.join("cni-conf/05-ferrynet.conflist").exists());
    assert!(!dir.join("cni-bin/ferrynet").exists() && !dir.join("cni-bin/ferrynet-ipam").exists());
    assert!(agent_routes(&lab, "n1").is_empty());
    assert!(!n1.links().contains(&"ferrynet.vxlan".to_string()));
    let nft = n1.exec("nft", &["list", "tables"]);
    assert!(String::from_utf8_lossy(&nft.stdout).trim().is_empty());
    assert!(refusal().is_empty(), "{:?}", refusal());
    // Without a conflist the node is not ready, and the readiness probe says so.
    let ready = agent_cli(&lab, "n1", &["status", "--ready"]);
    assert!(!ready.status.success());
}

#[test]
fn the_conflist_waits_for_a_pod_cidr_then_follows_pod_cidr_and_uplink_mtu_changes() {
    let mut lab = LabGuard::up(1, "native");
    let conflist = lab.dir().join("nodes/n1/cni-conf/05-ferrynet.conflist");
    let read_conflist = || -> Option<(Vec<String>, u64)> {
        let list: Value = serde_json::from_slice(&std::fs::read(&conflist).ok()?).ok()?;
        let plugin = &list["plugins"][0];
        let subnets = plugin["ipam"]["ranges"]
            .as_array()?
            .iter()
            .filter_map(|set| Some(set[0]["subnet"].as_str()?.to_string()))
            .collect();
        Some((subnets, plugin["mtu"].as_u64()?))
    };
    assert_eq!(
        read_conflist(),
        Some((vec!["10.244.1.0/24".to_string(), "fd00:244:1::/64".to_string()], 1500))
    );

    // A node the API has not given a PodCIDR yet: no conflist, and the running agent says it is
    // not ready (the readiness probe fails) until the PodCIDR arrives.
    lab.stop_agent("n1").unwrap();
    std::fs::remove_file(&conflist).unwrap();
    let api = lab.api().unwrap();
    let mut node: Node = api.get("n1").unwrap().unwrap();
    node.spec = Some(NodeSpec::default());
    api.replace(&node).unwrap();
    lab.start_agent("n1").unwrap();
    let not_ready = || {
        lab.agent_status("n1").is_ok_and(|s| {
            s["watches"]["ready"] == true && s["cniConfig"]["running"] == true && s["cniConfig"]["ready"] == false
        })
    };
    assert!(
        eventually(Duration::from_secs(20), not_ready),
        "{:?}",
        lab.agent_status("n1")
    );
    assert!(!agent_cli(&lab, "n1", &["status", "--ready"]).status.success());
    assert!(!conflist.exists());
    // The same run of the agent, once the PodCIDR arrives.
    let cidrs = ["10.244.9.0/24", "fd00:244:9::/64"];
    let mut node: Node = api.get("n1").unwrap().unwrap();
    node.spec = Some(NodeSpec {
        pod_cidr: Some(cidrs[0].into()),
        pod_cidrs: Some(cidrs.map(String::from).to_vec()),
        ..Default::default()
    });
    api.replace(&node).unwrap();
    let wanted = Some((cidrs.map(String::from).to_vec(), 1500));
    assert!(
        eventually(Duration::from_secs(20), || read_conflist() == wanted),
        "{:?}",
        read_conflist()
    );
    assert!(eventually(Duration::from_secs(20), || agent_cli(
        &lab,
        "n1",
        &["status", "--ready"]
    )
    .status
    .success()));
    // Pods now get addresses from the new range.
    let pod = lab.run_pod("late", "n1", &BTreeMap::new()).unwrap();
    assert!(pod.ip(true).to_string().starts_with("10.244.9."), "{:?}", pod.ips);

    // The uplink's MTU drops: new pods get the new MTU (in native mode, the uplink's own).
    lab.node_ns("n1").unwrap().ip(&["link", "set", "eth0", "mtu", "1400"]);
    let wanted = Some((cidrs.map(String::from).to_vec(), 1400));
    assert!(
        eventually(Duration::from_secs(20), || read_conflist() == wanted),
        "{:?}",
        read_conflist()
    );
}

#[test]
fn the_agent_releases_addresses_of_pods_that_vanished_without_a_del() {
    let mut lab = LabGuard::up(1, "native");
    lab.run_pod("kept", "n1", &BTreeMap::new()).unwrap();
    lab.run_pod("lost", "n1", &BTreeMap::new()).unwrap();
    let store = ferrynet_ipam::Store::open(&lab.dir().join("nodes/n1/ipam"), "ferrynet").unwrap();
    let held = || -> Vec<String> {
        store
            .lock()
            .unwrap()
            .attachments()
            .unwrap()
            .into_iter()
            .map(|a| a.container_id)
            .collect()
    };
    assert_eq!(held().len(), 2);
    // The pod vanished without a DEL (say the runtime crashed): its processes died and its
    // namespace went away, and the veth with it.
    let pid: i32 = std::fs::read_to_string(lab.dir().join("pod-lost.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the pod server the lab started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let lost_ns = lab.pod_ns("lost").unwrap().name.clone();
    Command::new("ip").args(["netns", "del", &lost_ns]).output().unwrap();
    let released = eventually(Duration::from_secs(20), || held().len() == 1);
    assert!(released, "still held: {:?}", held());
    assert_eq!(held(), [lab.pod("kept").unwrap().container_id.clone()]);
    // The living pod is untouched.
    let to = SocketAddr::new(lab.pod("kept").unwrap().ip(true), POD_PORT);
    assert!(request(&lab.node_ns("n1").unwrap(), to, "still there?").is_ok());
}

/// The agent on `node` is running: its pid file names a live process.
#[track_caller]
fn assert_agent_alive(lab: &Lab, node: &str) {
    let pid = lab.agent_pid(node).unwrap_or_else(|| panic!("no agent pid on {node}"));
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent on {node} died"
    );
}

#[test]
fn a_packet_for_an_unallocated_pod_address_is_refused_at_once_instead_of_leaving() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("sender", "n2", &BTreeMap::new()).unwrap();
    // n1 has a default route to the underlay, as real nodes have: without a route covering its
    // PodCIDR, a packet for an address no pod holds would follow it back out (and vanish).
    let n1 = lab.node_ns("n1").unwrap();
    n1.ip(&["route", "add", "default", "via", "10.200.0.250"]);
    n1.ip(&["-6", "route", "add", "default", "via", "fd00:200::250"]);
    let unreachable: Vec<String> = agent_routes(&lab, "n1")
        .iter()
        .filter(|r| r["type"] == "unreachable")
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(unreachable, ["10.244.1.0/24", "fd00:244:1::/64"]);
    for to in ["10.244.1.200", "fd00:244:1::200"] {
        let to = SocketAddr::new(to.parse::<IpAddr>().unwrap(), POD_PORT);
        // Answered by an ICMP unreachable from n1, at once.
        let err = udp_icmp_error(&lab.pod_ns("sender").unwrap(), to, Duration::from_secs(1))
            .unwrap()
            .unwrap_or_else(|| panic!("{to}: no ICMP error within 1 s"));
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable
            ),
            "{to}: {err:?}"
        );
    }
    // A TCP client gets it too: over IPv4 the connect fails at once.
    let started = Instant::now();
    let err = request(
        &lab.pod_ns("sender").unwrap(),
        "10.244.1.200:8080".parse().unwrap(),
        "anyone?",
    )
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{err} after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_flushed_ruleset_is_restored_by_the_agents_next_pass() {
    let lab = LabGuard::up(1, "native");
    let n1 = lab.node_ns("n1").unwrap();
    let table = || String::from_utf8_lossy(&n1.exec("nft", &["list", "table", "inet", "ferrynet"]).stdout).into_owned();
    assert!(table().contains("masquerade"), "{}", table());
    // Someone flushes the whole ruleset (an iptables-restore of another tool, a careless admin).
    // (Not checked empty after: the agent's pass may already have restored it.)
    assert!(n1.exec("nft", &["flush", "ruleset"]).status.success());
    assert!(
        eventually(Duration::from_secs(20), || {
            let t = table();
            t.contains("masquerade") && t.contains("vxlan from unknown peers") && t.contains("spoofed pod source")
        }),
        "not restored: {}",
        table()
    );
    // A rule deleted from the table is restored too.
    let listing: Value = serde_json::from_slice(
        &n1.exec("nft", &["-j", "-a", "list", "chain", "inet", "ferrynet", "pod_source"])
            .stdout,
    )
    .unwrap();
    let handle = listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|i| (i["rule"]["comment"] == "spoofed pod source").then(|| i["rule"]["handle"].as_u64().unwrap()))
        .unwrap();
    assert!(
        n1.exec(
            "nft",
            &[
                "delete",
                "rule",
                "inet",
                "ferrynet",
                "pod_source",
                "handle",
                &handle.to_string()
            ]
        )
        .status
        .success()
    );
    assert!(
        eventually(Duration::from_secs(20), || table().contains("spoofed pod source")),
        "{}",
        table()
    );
}

/// The VXLAN MAC of `node`'s tunnel endpoint, as its agent set it.
fn vtep_mac(lab: &Lab, node: &str) -> [u8; 6] {
    let link = &lab.node_ns(node).unwrap().ip_json(&["link", "show", "ferrynet.vxlan"])[0];
    let text = link["address"].as_str().unwrap();
    let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
    bytes.try_into().unwrap()
}

#[test]
fn vxlan_takes_packets_only_from_known_peers() {
    let mut lab = LabGuard::up(2, "vxlan");
    let target = lab.run_pod("target", "n1", &BTreeMap::new()).unwrap();
    let probe = UdpProbe::bind(&lab.pod_ns("target").unwrap(), "0.0.0.0:9999".parse().unwrap()).unwrap();
    // A frame for the pod, as n2's overlay would send it: from n2's pod range to the pod,
    // encapsulated to n1's VTEP.
    let inner = ip_udp("10.244.2.77".parse().unwrap(), target.ip(true), 4000, 9999, b"injected");
    let frame = vxlan_payload(4242, vtep_mac(&lab, "n1"), [2, 0, 0, 0, 0, 0x77], &inner);
    let send_from = |part: &str, source: &str| {
        let ns = lab.ns(part).unwrap();
        let frame = frame.clone();
        let source: SocketAddr = format!("{source}:0").parse().unwrap();
        ferrynet_kernel::netns::run_in(ns.fd(), move || {
            let socket = std::net::UdpSocket::bind(source)?;
            socket.send_to(&frame, "10.200.0.11:4789")
        })
        .unwrap();
    };
    // From a peer the frame is delivered: it is a well-formed overlay packet.
    send_from("n2", "10.200.0.12");
    let (payload, from) = probe
        .receive(Duration::from_secs(3))
        .expect("a peer's VXLAN reaches the pod");
    assert_eq!(
        (payload.as_slice(), from.ip()),
        (&b"injected"[..], "10.244.2.77".parse::<IpAddr>().unwrap())
    );
    // From anything else that can reach the port (here the external client), it is dropped.
    for _ in 0..3 {
        send_from("client", "10.200.0.250");
    }
    assert_eq!(
        probe.receive(Duration::from_secs(1)),
        None,
        "VXLAN from a stranger was delivered"
    );
}

#[test]
fn a_pod_cannot_send_with_another_pods_address() {
    let mut lab = LabGuard::up(2, "native");
    lab.run_pod("honest", "n1", &BTreeMap::new()).unwrap();
    lab.run_pod("victim", "n1", &BTreeMap::new()).unwrap();
    let receiver = lab.run_pod("receiver", "n2", &BTreeMap::new()).unwrap();
    let honest_ns = lab.pod_ns("honest").unwrap();
    for v4 in [true, false] {
        // A port per family: the first family's socket may outlive its loop for a moment (a
        // process another test forks holds its descriptor until it execs), and a dual-stack
        // wildcard on the same port would then be refused.
        let port: u16 = if v4 { 9998 } else { 9997 };
        let wildcard = SocketAddr::new(
            if v4 {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            },
            port,
        );
        let probe = UdpProbe::bind(&lab.pod_ns("receiver").unwrap(), wildcard).unwrap();
        let to = receiver.ip(v4);
        // With its own address, a raw packet arrives...
        let own = lab.pod("honest").unwrap().ip(v4);
        send_raw(&honest_ns, &ip_udp(own, to, 5000, port, b"honest")).unwrap();
        let (payload, from) = probe.receive(Duration::from_secs(3)).expect("own source delivered");
        assert_eq!((payload.as_slice(), from.ip()), (&b"honest"[..], own));
        // ...with another pod's, or an address nobody holds, it is dropped at the host veth.
        let victim = lab.pod("victim").unwrap().ip(v4);
        let nobody: IpAddr = if v4 { "10.244.1.222" } else { "fd00:244:1::222" }.parse().unwrap();
        for spoofed in [victim, nobody] {
            send_raw(&honest_ns, &ip_udp(spoofed, to, 5000, port, b"spoofed")).unwrap();
        }
        assert_eq!(
            probe.receive(Duration::from_secs(1)),
            None,
            "a spoofed packet was delivered"
        );
    }
}

/// Takes a lab down when dropped, by name (for labs the CLI brought up).
struct DownOnDrop(String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = Lab::down(&self.0);
    }
}

#[test]
fn the_readmes_lab_example_runs_as_written() {
    ferrynet_tests::require_root();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = &readme[readme.find("\n## The lab").expect("the README has a lab section")..];
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the lab section has a sh block");
    let name = format!("readme{}", std::process::id() % 100_000);
    let _down = DownOnDrop(name.clone());
    let mut outputs = Vec::new();
    for line in block.lines() {
        // Comments start with "#" after the command.
        let command = line.split(" #").next().unwrap().trim();
        if command.is_empty() {
            continue;
        }
        let mut words = command.split_whitespace();
        assert_eq!(words.next(), Some("ferrynet-lab"), "{line}");
        let out = Command::new(binary("ferrynet-lab"))
            .args(words)
            .env("FERRYNET_LAB_NAME", &name)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "`{command}` failed:\n{text}");
        outputs.push((command.to_string(), text));
    }
    let fetched = outputs
        .iter()
        .find(|(c, _)| c.contains("exec-pod"))
        .expect("the example runs a command in a pod");
    assert!(
        fetched.1.contains("pod=web-2 node=n2 ip=10.244.2.2 client=10.244.1."),
        "{}",
        fetched.1
    );
    let listed = outputs.iter().find(|(c, _)| c.contains("kubectl")).unwrap();
    for needle in ["node/n1", "pod/web-1", "service/web", "endpointslice"] {
        assert!(listed.1.contains(needle), "{needle} missing:\n{}", listed.1);
    }
    assert!(outputs.last().unwrap().0.ends_with("down"));
    assert_nothing_left(&name);
}
