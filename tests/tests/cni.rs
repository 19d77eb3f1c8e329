//! The `ferrynet` CNI plugin, run as a runtime runs it, inside throwaway namespaces.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use ferrynet_ipam::Store;
use ferrynet_kernel::names::HostVeth;
use ferrynet_tests::{
    binary,
    cni::{Conflist, Env, Runtime, TestNode, exec_plugin, host_veth_of, result_ip},
    netns::{Netns, link_pair},
    require_root,
    tcp::{EchoServer, request},
};
use serde_json::{Value, json};

/// A node of these tests: host namespace 192.168.99.1 / fd99::1, network `testnet`.
fn test_node(v4: &str, v6: Option<&str>) -> TestNode {
    TestNode::new("testnet", "192.168.99.1", "fd99::1", v4, v6)
}

fn sock(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

#[test]
fn add_wires_a_routed_dual_stack_pod() {
    let node = test_node("10.10.0.0/24", Some("fd10::/64"));
    let (pod, result) = node.add_pod("pod-a");
    let (v4, v6) = (result_ip(&result, true), result_ip(&result, false));
    assert_eq!(v4.to_string(), "10.10.0.2");
    assert_eq!(v6.to_string(), "fd10::2");
    assert_eq!(result["cniVersion"], "1.1.0");

    // The host side: a veth with the deterministic name, alias and MAC the result reports.
    let veth = HostVeth::new("pod-a", "eth0");
    assert_eq!(result["interfaces"][0]["name"], veth.name.as_str());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], pod.path().display().to_string());
    let host_link = &node.host.ip_json(&["-d", "link", "show", &veth.name])[0];
    assert_eq!(host_link["ifalias"], "ferrynet/testnet/pod-a/eth0");
    assert_eq!(host_link["mtu"], 1400);
    assert_eq!(host_link["address"], result["interfaces"][0]["mac"]);
    assert!(host_link["flags"].as_array().unwrap().contains(&json!("UP")));
    let host_mac = host_link["address"].as_str().unwrap().to_string();

    // Host routes, one per address, tagged with ferrynet's route protocol.
    for (family, ip) in [("-4", v4), ("-6", v6)] {
        let routes = node.host.ip_json(&[family, "route", "show", "proto", "113"]);
        let found = routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == ip.to_string() && r["dev"] == veth.name.as_str());
        assert!(found, "no host route to {ip}: {routes}");
    }

    // The pod side: /32 and /128, up, MTU, loopback up.
    let pod_if = &pod.ip_json(&["addr", "show", "eth0"])[0];
    assert_eq!(pod_if["mtu"], 1400);
    assert_eq!(pod_if["operstate"], "UP");
    let addrs: Vec<(String, u64)> = pod_if["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| {
            (
                a["local"].as_str().unwrap().to_string(),
                a["prefixlen"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(addrs, vec![("10.10.0.2".to_string(), 32), ("fd10::2".to_string(), 128)]);
    let v6_addr = pod_if["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["local"] == "fd10::2")
        .unwrap();
    assert_eq!(v6_addr["nodad"], true, "IPv6 address must skip DAD: {v6_addr}");
    assert!(
        pod.ip_json(&["link", "show", "lo"])[0]["flags"]
            .as_array()
            .unwrap()
            .contains(&json!("UP"))
    );

    // Link-local gateways, resolved by permanent entries to the host veth's MAC.
    let r4 = pod.ip_json(&["-4", "route", "show", "default"]);
    assert_eq!(r4[0]["gateway"], "169.254.1.1");
    let r6 = pod.ip_json(&["-6", "route", "show", "default"]);
    assert_eq!(r6[0]["gateway"], "fe80::1");
    for gw in ["169.254.1.1", "fe80::1"] {
        let neigh = pod.ip_json(&["neigh", "show", gw, "dev", "eth0"]);
        assert_eq!(neigh[0]["lladdr"], host_mac.as_str(), "{gw}: {neigh}");
        assert!(
            neigh[0]["state"].as_array().unwrap().contains(&json!("PERMANENT")),
            "{neigh}"
        );
    }

    // Real TCP, both directions, both families: host to pod and pod to host.
    let in_pod = [
        EchoServer::start(&pod, sock(v4, 8080), "pod-a"),
        EchoServer::start(&pod, sock(v6, 8080), "pod-a"),
    ];
    assert_eq!(
        request(&node.host, in_pod[0].addr, "hi").unwrap(),
        "pod-a from=192.168.99.1 hi"
    );
    assert_eq!(
        request(&node.host, in_pod[1].addr, "hi").unwrap(),
        "pod-a from=fd99::1 hi"
    );
    let on_host = [
        EchoServer::start(&node.host, "192.168.99.1:9090".parse().unwrap(), "host"),
        EchoServer::start(&node.host, "[fd99::1]:9090".parse().unwrap(), "host"),
    ];
    assert_eq!(request(&pod, on_host[0].addr, "yo").unwrap(), "host from=10.10.0.2 yo");
    assert_eq!(request(&pod, on_host[1].addr, "yo").unwrap(), "host from=fd10::2 yo");

    node.del_pod("pod-a", Some(&pod.path()));
    node.assert_released("pod-a");
}

#[test]
fn pods_on_one_node_reach_each_other_over_tcp() {
    let node = test_node("10.11.0.0/24", Some("fd11::/64"));
    let (a, ra) = node.add_pod("a");
    let (b, rb) = node.add_pod("b");
    for v4 in [true, false] {
        let (ia, ib) = (result_ip(&ra, v4), result_ip(&rb, v4));
        assert_ne!(ia, ib);
        let sa = EchoServer::start(&a, sock(ia, 7000), "a");
        let sb = EchoServer::start(&b, sock(ib, 7000), "b");
        assert_eq!(request(&a, sb.addr, "x").unwrap(), format!("b from={ia} x"));
        assert_eq!(request(&b, sa.addr, "y").unwrap(), format!("a from={ib} y"));
    }
    node.del_pod("a", Some(&a.path()));
    node.del_pod("b", Some(&b.path()));
    assert!(node.allocations().is_empty());
}

#[test]
fn results_are_answered_in_each_config_version() {
    let node = test_node("10.12.0.0/24", Some("fd12::/64"));
    for (i, version) in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let pod = Netns::new("pod");
        let id = format!("v{i}");
        let env = Env::new("ADD").container(&id, Some(&pod.path()), "eth0");
        let out = node.exec(&env, |c| c["cniVersion"] = json!(version));
        let result = out.expect_ok(version);
        assert_eq!(result["cniVersion"], version);
        let legacy = version.starts_with("0.");
        // 0.3.x/0.4.0 results carry "version" per address; 1.x results do not.
        assert_eq!(result["ips"][0].get("version").is_some(), legacy, "{version}: {result}");
        if legacy {
            assert_eq!(result["ips"][0]["version"], "4");
            assert_eq!(result["ips"][1]["version"], "6");
        }
        // Interface MTU is a 1.1.0 field.
        assert_eq!(
            result["interfaces"][1].get("mtu").is_some(),
            version == "1.1.0",
            "{version}: {result}"
        );
        let del = Env::new("DEL").container(&id, Some(&pod.path()), "eth0");
        node.exec(&del, |c| c["cniVersion"] = json!(version)).expect_ok("DEL");
    }
    assert!(node.allocations().is_empty());
}

#[test]
fn cni_versions_gives_new_runtimes_1_1_0_and_old_ones_cni_version() {
    // The list as the agent writes it.
    let mut node = test_node("10.22.0.0/24", Some("fd22::/64"));
    node.list.0["cniVersion"] = json!("1.0.0");
    node.list.0["cniVersions"] = json!(["0.4.0", "1.0.0", "1.1.0"]);
    let new_runtime = node.list.clone();
    let old_runtime = node.list.as_older_runtimes_read_it();
    let runtime = node.runtime();
    for (id, list, version) in [("new", &new_runtime, "1.1.0"), ("old", &old_runtime, "1.0.0")] {
        let pod = Netns::new("pod");
        let result = runtime
            .add(list, id, &pod.path(), "eth0", &Value::Null, None)
            .unwrap_or_else(|o| panic!("ADD {id}: {} {}", o.stdout, o.stderr));
        assert_eq!(result["cniVersion"], version, "{result}");
        // STATUS exists from 1.1.0 on: the new runtime may call it, the old one cannot.
        let status = runtime.exec(
            &list.plugin_config(&list.plugins()[0], &Value::Null, None),
            &Env::new("STATUS"),
        );
        if version == "1.1.0" {
            status.expect_ok("STATUS at 1.1.0");
        } else {
            assert_eq!(status.code(), Some(1), "{id}: {}", status.stdout);
        }
        runtime
            .del(list, id, Some(&pod.path()), "eth0", &Value::Null, Some(&result))
            .unwrap_or_else(|o| panic!("DEL {id}: {}", o.stdout));
    }
    assert!(node.allocations().is_empty());
}

#[test]
fn version_lists_what_is_supported() {
    require_root();
    let host = Netns::new("host");
    for (plugin, asked) in [("ferrynet", "1.0.0"), ("ferrynet-ipam", "0.4.0")] {
        let out = exec_plugin(
            &binary(plugin),
            host.fd(),
            &Env::new("VERSION"),
            json!({"cniVersion": asked}).to_string().as_bytes(),
        );
        let v = out.expect_ok("VERSION");
        assert_eq!(v["cniVersion"], asked);
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}

#[test]
fn del_succeeds_and_releases_in_every_case() {
    let node = test_node("10.13.0.0/24", Some("fd13::/64"));

    // DEL twice.
    let (pod, _) = node.add_pod("twice");
    node.del_pod("twice", Some(&pod.path()));
    node.del_pod("twice", Some(&pod.path()));
    node.assert_released("twice");

    // DEL without a prior ADD.
    let never = Netns::new("pod");
    node.del_pod("never-added", Some(&never.path()));
    node.del_pod("never-added", None);

    // containerd's pair: DEL with the netns, then DEL with CNI_NETNS="" and no prevResult.
    let (pod, result) = node.add_pod("containerd");
    node.runtime()
        .del(
            &node.list,
            "containerd",
            Some(&pod.path()),
            "eth0",
            &Value::Null,
            Some(&result),
        )
        .unwrap();
    node.del_pod("containerd", None);
    node.assert_released("containerd");

    // CNI_NETNS="" only (as ctr sends it), while the pod still exists.
    let (_pod, _) = node.add_pod("ctr");
    node.del_pod("ctr", None);
    node.assert_released("ctr");

    // DEL after the netns is gone.
    let (mut pod, _) = node.add_pod("gone");
    let path = pod.path();
    pod.delete();
    assert!(!path.exists());
    node.del_pod("gone", Some(&path));
    node.assert_released("gone");

    assert!(node.allocations().is_empty());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
}

#[test]
fn a_failed_add_rolls_back_everything() {
    let node = test_node("10.14.0.0/24", Some("fd14::/64"));

    // IPv6 disabled in the pod: the IPv4 side is done when the IPv6 address is refused.
    let pod = Netns::new("pod");
    pod.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    pod.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
    let env = Env::new("ADD").container("half", Some(&pod.path()), "eth0");
    let out = node.exec(&env, |_| {});
    assert!(!out.ok());
    assert_eq!(out.code(), Some(102), "{}", out.stdout);
    node.assert_released("half");
    assert_eq!(pod.links(), vec!["lo"], "the pod side must be gone too");
    assert!(
        node.host
            .ip_json(&["-4", "route", "show", "proto", "113"])
            .as_array()
            .unwrap()
            .is_empty()
    );

    // The interface name is taken in the pod: nothing is created, the reservation is returned.
    let pod = Netns::new("pod");
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    let env = Env::new("ADD").container("taken", Some(&pod.path()), "eth0");
    let out = node.exec(&env, |_| {});
    assert!(!out.ok(), "{}", out.stdout);
    assert!(
        out.json()["details"].as_str().unwrap().contains("eth0"),
        "{}",
        out.stdout
    );
    node.assert_released("taken");

    // No address leaked: the index agrees exactly with the (empty) records, and ADD still works.
    let report = node.store().lock().unwrap().gc(|_| true).unwrap();
    assert_eq!(report.leaked_addresses_recovered, 0);
    node.add_pod("after");
}

#[test]
fn bad_input_gets_spec_shaped_errors() {
    let node = test_node("10.15.0.0/29", None);
    let pod = Netns::new("pod");
    let add = || Env::new("ADD").container("bad", Some(&pod.path()), "eth0");
    let bin = binary("ferrynet");
    let raw = |env: &Env, stdin: &[u8]| exec_plugin(&bin, node.host.fd(), env, stdin);

    let cases: Vec<(&str, ferrynet_tests::cni::Outcome, u64)> = vec![
        ("not JSON", raw(&add(), b"{nope"), 6),
        (
            "no type",
            node.exec(&add(), |c| {
                c.as_object_mut().unwrap().remove("type");
            }),
            6,
        ),
        (
            "unsupported version",
            node.exec(&add(), |c| c["cniVersion"] = json!("0.2.0")),
            1,
        ),
        (
            "bad subnet",
            node.exec(&add(), |c| c["ipam"]["ranges"] = json!([[{"subnet": "10.0.0.0/33"}]])),
            7,
        ),
        ("no ranges", node.exec(&add(), |c| c["ipam"]["ranges"] = json!([])), 7),
        ("bad mtu", node.exec(&add(), |c| c["mtu"] = json!(10)), 7),
        ("mtu not a number", node.exec(&add(), |c| c["mtu"] = json!("big")), 7),
        (
            "no CNI_NETNS",
            node.exec(&Env::new("ADD").container("bad", None, "eth0"), |_| {}),
            4,
        ),
        (
            "bad container id",
            node.exec(&Env::new("ADD").container("no way!", Some(&pod.path()), "eth0"), |_| {}),
            4,
        ),
        ("unknown CNI_ARGS key", node.exec(&add().args("COLOUR=blue"), |_| {}), 4),
        (
            "netns does not exist",
            node.exec(
                &Env::new("ADD").container("bad", Some(Path::new("/run/netns/nope-nope")), "eth0"),
                |_| {},
            ),
            3,
        ),
        (
            "netns is not a netns",
            node.exec(
                &Env::new("ADD").container("bad", Some(Path::new("/etc/hostname")), "eth0"),
                |_| {},
            ),
            4,
        ),
        (
            "CHECK on 0.3.1",
            node.exec(&Env::new("CHECK").container("bad", Some(&pod.path()), "eth0"), |c| {
                c["cniVersion"] = json!("0.3.1")
            }),
            1,
        ),
        ("unknown command", node.exec(&Env::new("FROB"), |_| {}), 4),
    ];
    for (what, out, code) in cases {
        assert!(!out.ok(), "{what} should fail");
        let err = out.json();
        assert_eq!(err["code"], code, "{what}: {err}");
        assert!(err["msg"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {err}");
        assert!(err["details"].is_string(), "{what}: {err}");
        assert!(err["cniVersion"].is_string(), "{what}: {err}");
    }
    // Unknown CNI_ARGS keys are fine with IgnoreUnknown, and the K8S_POD_* keys are recorded.
    let out = node.exec(&add().args("IgnoreUnknown=1;COLOUR=blue;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=u1;K8S_POD_INFRA_CONTAINER_ID=bad"), |_| {});
    out.expect_ok("ADD with IgnoreUnknown");
    let record = &node.allocations()[0];
    assert_eq!(
        (record.pod_namespace.as_deref(), record.pod_name.as_deref()),
        (Some("shop"), Some("cart-0"))
    );
    assert!(
        node.allocations().iter().all(|a| a.container_id == "bad"),
        "failed ADDs must not hold addresses"
    );

    // Exhaustion: a /29 has .2-.6; "bad" holds one, four more fit, the next is refused.
    let mut pods = Vec::new();
    for i in 0..4 {
        pods.push(node.add_pod(&format!("fill{i}")));
    }
    let last = Netns::new("pod");
    let out = node.exec(
        &Env::new("ADD").container("one-too-many", Some(&last.path()), "eth0"),
        |_| {},
    );
    assert_eq!(out.code(), Some(100), "{}", out.stdout);
    assert!(
        out.json()["details"].as_str().unwrap().contains("10.15.0.0/29"),
        "{}",
        out.stdout
    );
    node.assert_released("one-too-many");

    // STATUS: 50 while the range is full, fine once an address is free, 51 without forwarding.
    let status = || node.exec(&Env::new("STATUS"), |_| {});
    assert_eq!(status().code(), Some(50), "{}", status().stdout);
    node.del_pod("fill0", Some(&pods[0].0.path()));
    status().expect_ok("STATUS");
    node.host.sysctl("net.ipv4.ip_forward", "0");
    assert_eq!(status().code(), Some(51), "{}", status().stdout);
    node.host.sysctl("net.ipv4.ip_forward", "1");
    status().expect_ok("STATUS");

    // Another process holding the store lock: "try again later" once the configured wait is over.
    let held = ferrynet_ipam::fsutil::FileLock::acquire(
        &node.state.path().join("testnet/lock"),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let out = node.exec(&Env::new("ADD").container("waits", Some(&last.path()), "eth0"), |c| {
        c["ipam"]["lockTimeoutMs"] = json!(200)
    });
    assert_eq!(out.code(), Some(11), "{}", out.stdout);
    drop(held);
    node.assert_released("waits");
}

/// A pod namespace that is the plugin's own (the host's) is refused before anything changes:
/// accepted, it would move the host's default route onto a pod interface.
#[test]
fn the_hosts_own_namespace_is_refused_as_a_pod_namespace() {
    let node = test_node("10.16.0.0/29", None);
    let routes_before = node.host.ip(&["route", "show", "table", "all"]);
    let links_before = node.host.links();
    let out = node.run(&Env::new("ADD").container("own", Some(Path::new("/proc/self/ns/net")), "eth0"));
    assert_eq!(out.code(), Some(4), "{}{}", out.stdout, out.stderr);
    assert!(
        out.json()["details"]
            .as_str()
            .unwrap()
            .contains("own network namespace"),
        "{}",
        out.stdout
    );
    assert_eq!(node.host.ip(&["route", "show", "table", "all"]), routes_before);
    assert_eq!(node.host.links(), links_before);
    node.assert_released("own");
}

/// A FIFO as CNI_NETNS gets code 4 at once; it must not block the plugin in `open`. (Should the
/// plugin block anyway, a writer opening the FIFO after 5 s releases it, so the test ends and
/// fails on the time taken.)
#[test]
fn a_fifo_as_the_pod_namespace_is_refused_at_once() {
    let node = test_node("10.17.0.0/29", None);
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("netns");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            if done_rx.recv_timeout(std::time::Duration::from_secs(5)).is_err() {
                // A writer unblocks a reader stuck in open (non-blocking: with no reader, this
                // fails at once instead of waiting).
                use std::os::unix::fs::OpenOptionsExt;
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo);
            }
        })
    };
    let out = node.run(&Env::new("ADD").container("fifo", Some(&fifo), "eth0"));
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    assert_eq!(out.code(), Some(4), "{}{}", out.stdout, out.stderr);
    assert!(
        out.elapsed < std::time::Duration::from_secs(3),
        "the plugin blocked on the FIFO for {:?}",
        out.elapsed
    );
    node.assert_released("fifo");
}

#[test]
fn garbage_never_makes_the_plugins_panic() {
    require_root();
    let host = Netns::new("host");
    let junk: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"\"str\"".to_vec(),
        b"{\"cniVersion\":1}".to_vec(),
        b"{\"cniVersion\":\"1.1.0\",\"name\":\"n\",\"type\":\"ferrynet\",\"ipam\":null}".to_vec(),
        b"{\"cniVersion\":\"1.1.0\",\"name\":\"n\",\"type\":\"ferrynet\",\"ipam\":{\"ranges\":[[{\"subnet\":\"::/0\"}]]},\"prevResult\":{\"ips\":[{\"address\":\"x\"}]}}".to_vec(),
        b"{\"cniVersion\":\"1.1.0\",\"name\":\"n\",\"type\":\"ferrynet\",\"runtimeConfig\":{\"portMappings\":[{\"HostPort\":\"x\"}]}}".to_vec(),
        b"{\"cniVersion\":\"1.1.0\",\"name\":\"n\",\"type\":\"ferrynet\",\"ipam\":{\"ranges\":[[{\"subnet\":\"10.0.0.0/8\",\"rangeStart\":\"10.255.255.255\"}]]}}".to_vec(),
        (0..=255u8).collect(),
        vec![b'{'; 10_000],
    ];
    for plugin in ["ferrynet", "ferrynet-ipam"] {
        for command in ["ADD", "DEL", "CHECK", "STATUS", "GC"] {
            for stdin in &junk {
                let env = Env::new(command).container("junk", Some(Path::new("/run/netns/does-not-exist")), "eth0");
                let out = exec_plugin(&binary(plugin), host.fd(), &env, stdin);
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "{plugin} {command} {:?}: {} {}",
                    String::from_utf8_lossy(stdin),
                    out.stdout,
                    out.stderr
                );
                let err = out.json();
                assert!(
                    err["code"].as_u64().is_some_and(|c| c != 999),
                    "{plugin} {command}: {err}"
                );
            }
        }
    }
}

#[test]
fn check_passes_then_detects_drift() {
    let node = test_node("10.16.0.0/24", Some("fd16::/64"));
    let (pod, result) = node.add_pod("checked");
    node.runtime()
        .check(&node.list, "checked", &pod.path(), "eth0", &Value::Null, &result)
        .expect("CHECK on a fresh pod");
    pod.ip(&["-6", "route", "del", "default"]);
    let err = node
        .runtime()
        .check(&node.list, "checked", &pod.path(), "eth0", &Value::Null, &result)
        .unwrap_err();
    assert_eq!(err.code(), Some(101), "{}", err.stdout);
    assert!(err.stdout.contains("fe80::1"), "{}", err.stdout);
    // CHECK of a container whose netns is gone: code 3.
    let mut gone = Netns::new("pod");
    let path = gone.path();
    gone.delete();
    let err = node
        .runtime()
        .check(&node.list, "checked", &path, "eth0", &Value::Null, &result)
        .unwrap_err();
    assert_eq!(err.code(), Some(3), "{}", err.stdout);
    node.del_pod("checked", Some(&pod.path()));
}

#[test]
fn gc_releases_everything_not_listed() {
    let node = test_node("10.17.0.0/24", None);
    let (_a, _) = node.add_pod("keep-me");
    let (_b, _) = node.add_pod("drop-1");
    let (_c, _) = node.add_pod("drop-2");
    assert_eq!(node.host_veths().len(), 3);
    // Without the keep list, GC refuses (code 7) and releases nothing.
    let mut conf = node.plugin_config();
    conf["cniVersion"] = json!("1.1.0");
    let out = exec_plugin(
        &binary("ferrynet"),
        node.host.fd(),
        &Env::new("GC"),
        conf.to_string().as_bytes(),
    );
    assert_eq!(out.code(), Some(7), "{}", out.stdout);
    assert_eq!(node.host_veths().len(), 3);
    assert_eq!(node.allocations().len(), 3);
    node.runtime().gc(&node.list, &[("keep-me", "eth0")]).expect("GC");
    node.assert_released("drop-1");
    node.assert_released("drop-2");
    let left: Vec<String> = node.allocations().into_iter().map(|a| a.container_id).collect();
    assert_eq!(left, ["keep-me"]);
    assert_eq!(node.host_veths(), vec![host_veth_of("keep-me")]);
    // The older key, `cni.dev/attachments`, is honoured the same way.
    let (_d, _) = node.add_pod("drop-3");
    conf["cni.dev/attachments"] = json!([{"containerID": "keep-me", "ifname": "eth0"}]);
    exec_plugin(
        &binary("ferrynet"),
        node.host.fd(),
        &Env::new("GC"),
        conf.to_string().as_bytes(),
    )
    .expect_ok("GC with cni.dev/attachments");
    node.assert_released("drop-3");
    let left: Vec<String> = node.allocations().into_iter().map(|a| a.container_id).collect();
    assert_eq!(left, ["keep-me"]);
}

#[test]
fn chains_with_reference_portmap_and_bandwidth() {
    let mut node = test_node("10.18.0.0/24", None);
    // The reference plugins stop at CNI 1.0.0.
    node.list.0["cniVersion"] = json!("1.0.0");
    node.list.0["plugins"].as_array_mut().unwrap().extend([
        json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
    ]);
    // An external client on the node's underlay.
    let client = Netns::new("client");
    link_pair(&node.host, "192.168.250.1/24", &client, "192.168.250.2/24");

    let pod = Netns::new("pod");
    // containerd's CRI sends Go's field names; ferrynet accepts them (the reference plugins do too).
    let runtime_config = json!({
        "portMappings": [{"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}],
        "bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000, "egressRate": 100_000_000, "egressBurst": 1_000_000},
    });
    let args =
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=web1;K8S_POD_UID=42";
    let result = node
        .runtime()
        .add(&node.list, "web1", &pod.path(), "eth0", &runtime_config, Some(args))
        .unwrap_or_else(|o| panic!("chained ADD: {} {}", o.stdout, o.stderr));
    let ip = result_ip(&result, true);
    let _server = EchoServer::start(&pod, sock(ip, 80), "web");

    // portmap: the client reaches the pod through the node's port 8080.
    let answer =
        request(&client, "192.168.250.1:8080".parse().unwrap(), "via hostport").expect("hostPort reaches the pod");
    assert!(answer.starts_with("web from="), "{answer}");
    // bandwidth: a token bucket on the host veth shapes traffic to the pod.
    let veth = host_veth_of("web1");
    let qdiscs = node.host.ip(&["link", "show", &veth]);
    assert!(qdiscs.contains("qdisc tbf"), "{qdiscs}");

    // CHECK of ferrynet's own entry with the chain's result. (Reference portmap 1.1.1's own CHECK
    // fails for IPv4-only pods, looking for an IPv6 chain it never made; containerd never calls
    // CHECK.)
    let only_ferrynet =
        Conflist(json!({"cniVersion": "1.0.0", "name": node.list.name(), "plugins": [node.list.plugins()[0]]}));
    node.runtime()
        .check(&only_ferrynet, "web1", &pod.path(), "eth0", &runtime_config, &result)
        .expect("CHECK");
    node.runtime()
        .del(
            &node.list,
            "web1",
            Some(&pod.path()),
            "eth0",
            &runtime_config,
            Some(&result),
        )
        .expect("chained DEL");
    node.assert_released("web1");
    assert!(
        request(&client, "192.168.250.1:8080".parse().unwrap(), "after").is_err(),
        "the hostPort must be gone"
    );
}

#[test]
fn requested_addresses_are_honoured() {
    let node = test_node("10.19.0.0/24", None);
    let pod = Netns::new("pod");
    let env = Env::new("ADD").container("fixed", Some(&pod.path()), "eth0");
    let out = node.exec(&env, |c| c["runtimeConfig"] = json!({"ips": ["10.19.0.77/24"]}));
    assert_eq!(
        result_ip(&out.expect_ok("ADD with ips"), true).to_string(),
        "10.19.0.77"
    );
    let other = Netns::new("pod");
    let env = Env::new("ADD")
        .container("clash", Some(&other.path()), "eth0")
        .args("IP=10.19.0.77");
    let out = node.exec(&env, |_| {});
    assert_eq!(out.code(), Some(105), "{}", out.stdout);
    assert!(out.stdout.contains("fixed/eth0"), "{}", out.stdout);
    // The `args.cni.ips` convention too.
    let third = Netns::new("pod");
    let env = Env::new("ADD").container("by-args", Some(&third.path()), "eth0");
    let out = node.exec(&env, |c| c["args"] = json!({"cni": {"ips": ["10.19.0.78"]}}));
    assert_eq!(
        result_ip(&out.expect_ok("ADD with args.cni.ips"), true).to_string(),
        "10.19.0.78"
    );
}

#[test]
fn runs_after_another_plugin_and_adds_to_its_result() {
    let mut node = test_node("10.21.0.0/24", Some("fd21::/64"));
    // Debian's loopback plugin first: ferrynet then gets its result as prevResult.
    node.list.0["cniVersion"] = json!("1.0.0");
    node.list.0["plugins"]
        .as_array_mut()
        .unwrap()
        .insert(0, json!({"type": "loopback"}));
    let (pod, result) = node.add_pod("after-lo");
    let interfaces = result["interfaces"].as_array().unwrap();
    let names: Vec<&str> = interfaces.iter().filter_map(|i| i["name"].as_str()).collect();
    let host_veth = host_veth_of("after-lo");
    assert_eq!(names, ["lo", host_veth.as_str(), "eth0"], "{result}");
    // The loopback plugin's addresses stay, pointing at lo; ferrynet's point at its eth0 (its
    // indexes shifted past lo).
    let ips = result["ips"].as_array().unwrap();
    let on = |address: &str| {
        let ip = ips
            .iter()
            .find(|ip| ip["address"].as_str().is_some_and(|a| a.starts_with(address)))
            .unwrap_or_else(|| panic!("no {address} in {result}"));
        interfaces[ip["interface"].as_u64().unwrap() as usize]["name"].clone()
    };
    assert_eq!(on("127.0.0.1/"), "lo");
    assert_eq!(on("10.21.0."), "eth0");
    assert_eq!(on("fd21::"), "eth0");
    // The merged result is what CHECK and DEL get back, and the pod works.
    node.runtime()
        .check(&node.list, "after-lo", &pod.path(), "eth0", &Value::Null, &result)
        .unwrap_or_else(|o| panic!("CHECK: {} {}", o.stdout, o.stderr));
    let server = EchoServer::start(&node.host, "192.168.99.1:7071".parse().unwrap(), "host");
    let answer = request(&pod, server.addr, "hi").unwrap();
    assert!(answer.starts_with("host from=10.21.0."), "{answer}");
    node.runtime()
        .del(
            &node.list,
            "after-lo",
            Some(&pod.path()),
            "eth0",
            &Value::Null,
            Some(&result),
        )
        .unwrap_or_else(|o| panic!("DEL: {} {}", o.stdout, o.stderr));
    node.assert_released("after-lo");
}

#[test]
fn ferrynet_ipam_serves_the_reference_bridge() {
    require_root();
    let host = Netns::host("host", "192.168.98.1", "fd98::1");
    let state = tempfile::tempdir().unwrap();
    let list = Conflist(json!({
        "cniVersion": "1.0.0",
        "name": "bridged",
        "plugins": [{
            "type": "bridge", "bridge": "fnbr0", "isGateway": true, "ipMasq": false,
            "ipam": {"type": "ferrynet-ipam", "ranges": [[{"subnet": "10.20.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": state.path()},
        }]
    }));
    let runtime = Runtime::new(&host);
    let (a, b) = (Netns::new("pod"), Netns::new("pod"));
    let ra = runtime
        .add(&list, "ba", &a.path(), "eth0", &Value::Null, None)
        .unwrap_or_else(|o| panic!("{} {}", o.stdout, o.stderr));
    let rb = runtime
        .add(&list, "bb", &b.path(), "eth0", &Value::Null, None)
        .unwrap_or_else(|o| panic!("{} {}", o.stdout, o.stderr));
    let (ia, ib) = (result_ip(&ra, true), result_ip(&rb, true));
    assert_eq!(
        (ia.to_string(), ib.to_string()),
        ("10.20.0.2".into(), "10.20.0.3".into())
    );
    // The bridge got the range's gateway from ferrynet-ipam's result.
    assert!(host.ip(&["addr", "show", "fnbr0"]).contains("10.20.0.1/24"));
    let server = EchoServer::start(&b, sock(ib, 5000), "bb");
    assert_eq!(
        request(&a, server.addr, "over the bridge").unwrap(),
        format!("bb from={ia} over the bridge")
    );
    let store = Store::open(state.path(), "bridged").unwrap();
    assert_eq!(store.lock().unwrap().attachments().unwrap().len(), 2);
    runtime
        .del(&list, "ba", Some(&a.path()), "eth0", &Value::Null, Some(&ra))
        .unwrap();
    runtime.del(&list, "bb", None, "eth0", &Value::Null, None).unwrap();
    assert!(store.lock().unwrap().attachments().unwrap().is_empty());
}

#[test]
fn ferrynet_delegates_to_another_ipam_plugin() {
    require_root();
    let host = Netns::host("host", "192.168.97.1", "fd97::1");
    let state = tempfile::tempdir().unwrap();
    let list = Conflist(json!({
        "cniVersion": "1.0.0",
        "name": "delegated",
        "plugins": [{"type": "ferrynet", "mtu": 1400, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.21.0.0/24"}]], "dataDir": state.path()}}]
    }));
    let runtime = Runtime::new(&host);
    let pod = Netns::new("pod");
    let result = runtime
        .add(&list, "hl", &pod.path(), "eth0", &Value::Null, None)
        .unwrap_or_else(|o| panic!("{} {}", o.stdout, o.stderr));
    let ip = result_ip(&result, true);
    assert!(
        state.path().join("delegated").join(ip.to_string()).exists(),
        "host-local recorded {ip}"
    );
    let server = EchoServer::start(&pod, sock(ip, 5000), "hl");
    assert_eq!(request(&host, server.addr, "hi").unwrap(), "hl from=192.168.97.1 hi");
    runtime
        .del(&list, "hl", Some(&pod.path()), "eth0", &Value::Null, Some(&result))
        .unwrap();
    assert!(
        !state.path().join("delegated").join(ip.to_string()).exists(),
        "host-local released {ip}"
    );
}
