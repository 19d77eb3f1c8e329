//! Hostile input to the `ferrynet` plugin, run as a runtime runs it: a store tampered with,
//! operations racing on one attachment, corrupt records, the longest names, huge route lists and
//! special-purpose ranges. Each test fails on a plugin without the defence it names.
use std::{os::unix::fs::PermissionsExt, path::Path};

use ferrynet_tests::{
    cni::{Env, TestNode, host_veth_of},
    netns::Netns,
};
use serde_json::{Value, json};

fn test_node(v4: &str, v6: Option<&str>) -> TestNode {
    TestNode::new("hostile", "192.168.98.1", "fd98::1", v4, v6)
}

fn add_env(id: &str, pod: &Netns) -> Env {
    Env::new("ADD").container(id, Some(&pod.path()), "eth0")
}

fn del_env(id: &str, pod: &Netns) -> Env {
    Env::new("DEL").container(id, Some(&pod.path()), "eth0")
}

/// The store directory of the node's network.
fn store_dir(node: &TestNode) -> std::path::PathBuf {
    node.store().dir().to_path_buf()
}

#[test]
fn a_store_with_symlinks_or_loose_permissions_is_refused_and_nothing_outside_it_is_touched() {
    let node = test_node("10.30.0.0/28", None);
    let (pod, _) = node.add_pod("first");
    let dir = store_dir(&node);
    let outside = tempfile::tempdir().unwrap();
    let precious = outside.path().join("precious");
    std::fs::write(&precious, b"keep me").unwrap();

    // `lock` as a symlink to another file: DEL used to write the boot id into it.
    std::fs::remove_file(dir.join("lock")).unwrap();
    std::os::unix::fs::symlink(&precious, dir.join("lock")).unwrap();
    let out = node.run(&del_env("first", &pod));
    assert_eq!(out.code(), Some(103), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("symbolic link"), "{}", out.stdout);
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    std::fs::remove_file(dir.join("lock")).unwrap();

    // `ranges` as a symlink to another directory: ADD used to delete its files and write bitmaps.
    std::fs::remove_dir_all(dir.join("ranges")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.join("ranges")).unwrap();
    let other = Netns::new("pod");
    let out = node.run(&add_env("second", &other));
    assert_eq!(out.code(), Some(103), "{}{}", out.stdout, out.stderr);
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    assert!(!node.host_veths().contains(&host_veth_of("second")));
    std::fs::remove_file(dir.join("ranges")).unwrap();
    std::fs::create_dir(dir.join("ranges")).unwrap();
    std::fs::set_permissions(dir.join("ranges"), std::fs::Permissions::from_mode(0o700)).unwrap();

    // A store directory everybody may write: refused until it is fixed.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = node.run(&add_env("second", &other));
    assert_eq!(out.code(), Some(103), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("writable by group or others"), "{}", out.stdout);
    // Readable by others only: accepted, and made private again.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    node.run(&add_env("second", &other))
        .expect_ok("ADD into a store readable by others");
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    node.del_pod("second", Some(&other.path()));
    node.del_pod("first", Some(&pod.path()));
    node.assert_released("first");
}

/// ADD and DEL of one container, started together, 100 times. Whatever order they end up in, an
/// address is routed to the pod exactly when the store holds it for the pod: the two never
/// interleave. Afterwards, filling the range hands out every address once.
#[test]
fn add_racing_del_of_one_container_never_leaves_a_routed_address_free() {
    let node = test_node("10.31.0.0/27", None);
    let veth = host_veth_of("racer");
    for round in 0..100 {
        let pod = Netns::new("pod");
        let (add, del) = std::thread::scope(|s| {
            let add = s.spawn(|| node.run(&add_env("racer", &pod)));
            let del = s.spawn(|| node.run(&del_env("racer", &pod)));
            (add.join().unwrap(), del.join().unwrap())
        });
        assert!(
            add.ok() && del.ok(),
            "round {round}: ADD {} {} / DEL {} {}",
            add.stdout,
            add.stderr,
            del.stdout,
            del.stderr
        );
        let held: Vec<String> = node
            .allocations()
            .iter()
            .filter(|a| a.container_id == "racer")
            .flat_map(|a| a.ips.iter().map(|ip| ip.addr().to_string()))
            .collect();
        // Every pod route on the node (protocol 113 is ferrynet's), with its device.
        let routed: Vec<String> = node
            .host
            .ip_json(&["-4", "route", "show", "proto", "113"])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["dev"], json!(veth), "round {round}: {r}");
                r["dst"].as_str().unwrap().to_string()
            })
            .collect();
        let veth_exists = node.host_veths().contains(&veth);
        assert_eq!(
            veth_exists,
            !held.is_empty(),
            "round {round}: veth {veth_exists}, held {held:?}"
        );
        assert_eq!(routed, held, "round {round}: routed and held differ");
        node.del_pod("racer", Some(&pod.path()));
    }
    // Every address of the range goes to exactly one pod.
    let mut pods = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..29 {
        let (pod, result) = node.add_pod(&format!("fill-{i}"));
        let ip = ferrynet_tests::cni::result_ip(&result, true);
        assert!(seen.insert(ip), "{ip} handed out twice");
        pods.push((i, pod));
    }
    for (i, pod) in pods {
        node.del_pod(&format!("fill-{i}"), Some(&pod.path()));
    }
    assert!(node.allocations().is_empty());
}

#[test]
fn a_corrupt_record_neither_blocks_its_del_nor_gc() {
    let node = test_node("10.32.0.0/29", None);
    let (a, _) = node.add_pod("broken");
    let (_b, _) = node.add_pod("kept");
    let (_c, _) = node.add_pod("dropped");
    let records = store_dir(&node).join("attachments");
    std::fs::write(records.join("broken:eth0"), b"\x00garbage{").unwrap();

    // DEL of the container with the corrupt record succeeds and removes its veth and record.
    node.run(&del_env("broken", &a)).expect_ok("DEL with a corrupt record");
    assert!(!records.join("broken:eth0").exists());
    assert!(!node.host_veths().contains(&host_veth_of("broken")));
    // And its address is free again: a /29 has 5 addresses for pods, two are held.
    let mut extra = Vec::new();
    for i in 0..3 {
        extra.push(node.add_pod(&format!("extra-{i}")));
    }

    // GC with a corrupt record of an attachment it may release: succeeds, releases everything.
    std::fs::write(records.join("extra-0:eth0"), b"garbage").unwrap();
    node.runtime()
        .gc(
            &node.list,
            &[("kept", "eth0"), ("extra-1", "eth0"), ("extra-2", "eth0")],
        )
        .expect("GC past a corrupt record");
    node.assert_released("dropped");
    node.assert_released("extra-0");

    // GC with a corrupt record of a listed attachment: the others are still released, the record
    // is kept, and the runtime hears about it (103).
    std::fs::write(records.join("extra-1:eth0"), b"garbage").unwrap();
    let err = node
        .runtime()
        .gc(&node.list, &[("kept", "eth0"), ("extra-1", "eth0")])
        .unwrap_err();
    assert_eq!(err.code(), Some(103), "{}", err.stdout);
    assert!(err.stdout.contains("extra-1:eth0"), "{}", err.stdout);
    assert!(records.join("extra-1:eth0").exists());
    let left: Vec<String> = node
        .store()
        .lock()
        .unwrap()
        .attachments_lenient()
        .unwrap()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    assert_eq!(left, ["kept"], "extra-2 is released, extra-1's record unreadable");
    let mut veths = node.host_veths();
    veths.sort();
    let mut expected = vec![host_veth_of("kept"), host_veth_of("extra-1")];
    expected.sort();
    assert_eq!(veths, expected);
}

/// The longest names: container IDs and network names are unbounded in the spec, interface
/// names have 15 bytes. ADD, CHECK-free DEL and GC all work, and GC still tells the network's
/// veths apart.
#[test]
fn the_longest_names_work() {
    for (network, id) in [
        ("hostile".to_string(), "c".repeat(238)),
        ("n".repeat(176), "d".repeat(64)),
        // The alias at the kernel's limit exactly, and one byte over it.
        (
            "hostile".to_string(),
            "e".repeat(254 - "ferrynet/hostile//fifteen-chars-x".len()),
        ),
        (
            "hostile".to_string(),
            "f".repeat(255 - "ferrynet/hostile//fifteen-chars-x".len()),
        ),
        ("n".repeat(1000), "g".repeat(1000)),
    ] {
        let node = TestNode::new(&network, "192.168.98.1", "fd98::1", "10.33.0.0/28", Some("fd33::/64"));
        let pod = Netns::new("pod");
        let env = Env::new("ADD").container(&id, Some(&pod.path()), "fifteen-chars-x");
        let out = node.run(&env);
        out.expect_ok(&format!(
            "ADD with a {}-byte network and a {}-byte ID",
            network.len(),
            id.len()
        ));
        let veth = ferrynet_kernel::names::HostVeth::new(&id, "fifteen-chars-x").name;
        assert!(node.host_veths().contains(&veth));
        // GC with an empty keep list recognises the veth as this network's and removes it.
        node.runtime().gc(&node.list, &[]).expect("GC");
        assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
        assert!(node.allocations().is_empty());
        let out = node.run(&Env::new("DEL").container(&id, Some(&pod.path()), "fifteen-chars-x"));
        out.expect_ok("DEL after GC");
    }
}

#[test]
fn route_lists_are_validated_bounded_and_installed_in_full() {
    let node = test_node("10.34.0.0/28", None);
    let routes = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"dst": format!("172.{}.{}.0/24", 16 + i / 256, i % 256)}))
            .collect()
    };
    // 1024 routes: all in the pod, though the kernel cannot acknowledge them in one datagram.
    let pod = Netns::new("pod");
    let out = node.exec(&add_env("many", &pod), |c| c["ipam"]["routes"] = json!(routes(1024)));
    out.expect_ok("ADD with 1024 routes");
    let installed = pod.ip_json(&["-4", "route", "show"]).as_array().unwrap().len();
    assert_eq!(installed, 1024 + 1, "the routes and the default route");
    assert_eq!(out.json()["routes"].as_array().unwrap().len(), 1024 + 1);
    node.del_pod("many", Some(&pod.path()));

    // One more: a clear config error, short, with nothing made.
    let pod = Netns::new("pod");
    let out = node.exec(&add_env("too-many", &pod), |c| {
        c["ipam"]["routes"] = json!(routes(1025))
    });
    assert_eq!(out.code(), Some(7), "{}", &out.stdout[..out.stdout.len().min(500)]);
    assert!(out.stdout.len() < 1000, "{} bytes of error", out.stdout.len());
    assert!(out.stdout.contains("at most 1024"), "{}", out.stdout);
    node.assert_released("too-many");
    // 10,000 routes: the same, and still a short answer.
    let out = node.exec(&add_env("too-many", &pod), |c| {
        c["ipam"]["routes"] = json!(routes(10_000))
    });
    assert_eq!(out.code(), Some(7));
    assert!(out.stdout.len() < 1000, "{} bytes of error", out.stdout.len());

    // A destination with host bits: code 7 before anything is made (it was 102 from the kernel).
    let out = node.exec(&add_env("host-bits", &pod), |c| {
        c["ipam"]["routes"] = json!([{"dst": "10.1.2.3/24"}])
    });
    assert_eq!(out.code(), Some(7), "{}", out.stdout);
    assert!(out.stdout.contains("host bits"), "{}", out.stdout);
    node.assert_released("host-bits");
    assert_eq!(pod.links(), vec!["lo"]);
}

#[test]
fn special_purpose_ranges_bad_names_paths_and_args_are_refused() {
    let node = test_node("10.35.0.0/28", None);
    let pod = Netns::new("pod");
    for subnet in [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.1.0/24",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "fe80::/64",
        "ff00::/8",
    ] {
        let out = node.exec(&add_env("special", &pod), |c| {
            c["ipam"]["ranges"] = json!([[{ "subnet": subnet }]])
        });
        assert_eq!(out.code(), Some(7), "{subnet}: {}", out.stdout);
        assert!(out.stdout.contains("special-purpose"), "{subnet}: {}", out.stdout);
    }
    assert_eq!(pod.links(), vec!["lo"]);

    for data_dir in ["relative/dir", "/var/lib/../../tmp/x"] {
        let out = node.exec(&add_env("dir", &pod), |c| c["ipam"]["dataDir"] = json!(data_dir));
        assert_eq!(out.code(), Some(7), "{data_dir}: {}", out.stdout);
        assert!(!Path::new("/tmp/x").exists() || data_dir.starts_with("relative"));
    }

    for ifname in ["eth\u{1b}[0m", "eth\u{7}", "e\u{7f}", "eth0\n"] {
        let env = Env::new("ADD").container("ctl", Some(&pod.path()), ifname);
        let out = node.run(&env);
        assert_eq!(out.code(), Some(4), "{ifname:?}: {}", out.stdout);
    }

    let env = add_env("dup-args", &pod).args("K8S_POD_NAME=a;K8S_POD_NAME=b");
    let out = node.run(&env);
    assert_eq!(out.code(), Some(4), "{}", out.stdout);
    assert!(out.stdout.contains("more than once"), "{}", out.stdout);
    let env = add_env("dup-args", &pod).args("IP=10.35.0.5;IP=10.35.0.6");
    assert_eq!(node.run(&env).code(), Some(4));
    assert!(node.allocations().is_empty());
    assert!(node.host_veths().is_empty());
}
