//! Concurrency, crashes and reboots against the real `ferrynet` binary.
use std::{
    collections::{BTreeSet, HashSet},
    io::Write,
    net::IpAddr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Command, Stdio},
    sync::Barrier,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ferrynet_tests::{
    binary,
    cni::{Env, TestNode, exec_plugin, host_veth_of, result_ip},
    netns::Netns,
};
use serde_json::Value;

/// A node of these tests: host namespace 192.168.96.1 / fd96::1, network `stress`.
fn test_node(v4: &str, v6: Option<&str>) -> TestNode {
    TestNode::new("stress", "192.168.96.1", "fd96::1", v4, v6)
}

/// Every record parses and no address is held twice.
#[track_caller]
fn assert_store_consistent(node: &TestNode) -> Vec<ferrynet_ipam::Attachment> {
    let records = node.store().lock().unwrap().attachments().expect("every record parses");
    let mut seen = HashSet::new();
    for record in &records {
        for ip in &record.ips {
            assert!(seen.insert(ip.addr()), "{} held twice", ip.addr());
        }
    }
    records
}

#[test]
fn a_hundred_parallel_adds_get_distinct_addresses_and_dels_leave_nothing() {
    let node = test_node("10.30.0.0/24", Some("fd30::/64"));
    let pods: Vec<Netns> = (0..100).map(|_| Netns::new("pod")).collect();
    let barrier = Barrier::new(pods.len());
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (node, barrier) = (&node, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    node.run(&Env::new("ADD").container(&format!("par{i}"), Some(&pod.path()), "eth0"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut v4 = HashSet::new();
    let mut v6 = HashSet::new();
    for (i, out) in results.iter().enumerate() {
        let result = out.expect_ok(&format!("ADD par{i}"));
        assert!(v4.insert(result_ip(&result, true)), "duplicate IPv4 in {result}");
        assert!(v6.insert(result_ip(&result, false)), "duplicate IPv6 in {result}");
    }
    assert_eq!((v4.len(), v6.len()), (100, 100));
    assert_eq!(assert_store_consistent(&node).len(), 100);
    assert_eq!(node.host_veths().len(), 100);

    let barrier = Barrier::new(pods.len());
    std::thread::scope(|s| {
        for (i, pod) in pods.iter().enumerate() {
            let (node, barrier) = (&node, &barrier);
            s.spawn(move || {
                barrier.wait();
                node.run(&Env::new("DEL").container(&format!("par{i}"), Some(&pod.path()), "eth0"))
                    .expect_ok("DEL");
            });
        }
    });
    assert!(assert_store_consistent(&node).is_empty());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert_eq!(
        node.store()
            .lock()
            .unwrap()
            .gc(|_| true)
            .unwrap()
            .leaked_addresses_recovered,
        0
    );
}

/// xorshift64*: enough randomness for kill timing, reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn kill_9_during_adds_never_corrupts_or_duplicates_and_gc_recovers_every_address() {
    // A small range, so that addresses are reused across rounds.
    let node = test_node("10.31.0.0/25", Some("fd31::/121"));
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let config = node.plugin_config().to_string().into_bytes();
    let bin = binary("ferrynet");
    let mut live: BTreeSet<String> = BTreeSet::new();
    let mut pods: Vec<(String, Netns)> = Vec::new();
    let mut killed_total = 0;
    let mut partial_total = 0;
    let mut unfinished: BTreeSet<String> = BTreeSet::new();

    for round in 0..24 {
        // Six concurrent ADDs; some are killed at a random moment.
        let mut children = Vec::new();
        for j in 0..6 {
            let id = format!("r{round}p{j}");
            let pod = Netns::new("pod");
            let mut cmd = Command::new(&bin);
            cmd.env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", &id)
                .env("CNI_NETNS", pod.path())
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", "/nonexistent");
            let host_fd = node.host.fd().as_raw_fd();
            // SAFETY: only the async-signal-safe setns runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(host_fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Two in three are killed, each at its own random moment in its first 5 ms, which
            // spans the whole of an ADD running six at a time. The pid cannot be reused before we
            // reap the child, and we reap only after the killer is done.
            let killer = (rng.below(3) != 0).then(|| {
                let (pid, delay) = (child.id() as libc::pid_t, Duration::from_micros(rng.below(5_000)));
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    // SAFETY: kill(2) on our own unreaped child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                })
            });
            let _ = child.stdin.take().unwrap().write_all(&config);
            children.push((id.clone(), child, killer));
            pods.push((id, pod));
        }
        for (id, child, killer) in children {
            if let Some(k) = killer {
                k.join().unwrap();
            }
            let out = child.wait_with_output().unwrap();
            if out.status.success() {
                live.insert(id);
            } else if out.status.code().is_none() {
                killed_total += 1;
                unfinished.insert(id);
            } else {
                panic!(
                    "ADD {id} failed without being killed: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        // Whatever was killed where, the store parses and holds no address twice.
        assert_store_consistent(&node);
        // Remove some finished pods, so later rounds reuse their addresses.
        for _ in 0..2 {
            if let Some(id) = live.iter().nth(rng.below(live.len().max(1) as u64) as usize).cloned() {
                node.run(&Env::new("DEL").container(&id, None, "eth0")).expect_ok("DEL");
                live.remove(&id);
            }
        }
        // The runtime's periodic GC, listing the attachments it knows are live.
        if round % 8 == 7 {
            partial_total += gc_and_verify(&node, &config, &live, &std::mem::take(&mut unfinished));
        }
    }
    partial_total += gc_and_verify(&node, &config, &live, &unfinished);
    println!(
        "{killed_total} ADDs killed, {partial_total} of them left partial state, {} completed and live",
        live.len()
    );
    assert!(killed_total >= 20, "only {killed_total} processes were killed");
    // Kills that only ever hit before or after an ADD would prove nothing.
    assert!(partial_total > 0, "no kill landed in the middle of an ADD");
    // And the live pods still work: their addresses are distinct and routed.
    let routed: Vec<Value> = node
        .host
        .ip_json(&["-4", "route", "show", "proto", "113"])
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(routed.len(), live.len());
    drop(pods);
}

/// Runs the plugin's GC with `live` as the valid attachments, then checks it recovered everything:
/// exactly the live attachments hold addresses and veths, and no index bit lacks a record.
/// Returns how many of the `unfinished` (killed) ADDs had left state behind for GC to clean.
fn gc_and_verify(node: &TestNode, config: &[u8], live: &BTreeSet<String>, unfinished: &BTreeSet<String>) -> usize {
    let records: BTreeSet<String> = assert_store_consistent(node)
        .into_iter()
        .map(|r| r.container_id)
        .collect();
    let veths = node.host_veths();
    let partial = unfinished
        .iter()
        .filter(|id| records.contains(*id) || veths.contains(&host_veth_of(id)))
        .count();
    let mut conf: Value = serde_json::from_slice(config).unwrap();
    conf["cni.dev/valid-attachments"] = live
        .iter()
        .map(|id| serde_json::json!({"containerID": id, "ifname": "eth0"}))
        .collect();
    exec_plugin(
        &binary("ferrynet"),
        node.host.fd(),
        &Env::new("GC"),
        conf.to_string().as_bytes(),
    )
    .expect_ok("GC");
    let records = assert_store_consistent(node);
    let held: BTreeSet<String> = records.iter().map(|r| r.container_id.clone()).collect();
    assert_eq!(&held, live, "after GC exactly the live attachments hold addresses");
    let expected_veths: BTreeSet<String> = live.iter().map(|id| host_veth_of(id)).collect();
    assert_eq!(
        node.host_veths().into_iter().collect::<BTreeSet<_>>(),
        expected_veths,
        "after GC exactly the live attachments have veths"
    );
    assert_eq!(
        node.store()
            .lock()
            .unwrap()
            .gc(|_| true)
            .unwrap()
            .leaked_addresses_recovered,
        0
    );
    partial
}

#[test]
fn a_reboot_leaks_no_address() {
    // A /28: .2 to .14 are allocatable (.1 gateway, .15 broadcast): 13 addresses.
    let node = test_node("10.32.0.0/28", None);
    let mut before = Vec::new();
    for i in 0..5 {
        let pod = Netns::new("pod");
        node.run(&Env::new("ADD").container(&format!("old{i}"), Some(&pod.path()), "eth0"))
            .expect_ok("ADD");
        before.push(pod);
    }
    assert_eq!(node.host_veths().len(), 5);

    // The reboot: every namespace is gone (their veths with them), and the kernel has a new
    // boot id, which from the store's side means the recorded one no longer matches.
    drop(before);
    assert!(ferrynet_tests::wait_for(Duration::from_secs(5), || node.host_veths().is_empty().then_some(())).is_some());
    // The store records the boot its allocations belong to in the first line of its lock file.
    std::fs::write(node.state.path().join("stress/lock"), "a-boot-before-this-one\n").unwrap();

    // The runtime sends no DEL for the old containers. New pods still get all 13 addresses.
    let mut after = Vec::new();
    let mut got = BTreeSet::new();
    for i in 0..13 {
        let pod = Netns::new("pod");
        let result = node
            .run(&Env::new("ADD").container(&format!("new{i}"), Some(&pod.path()), "eth0"))
            .expect_ok("ADD after reboot");
        got.insert(result_ip(&result, true));
        after.push(pod);
    }
    let expected: BTreeSet<IpAddr> = (2..=14).map(|i| format!("10.32.0.{i}").parse().unwrap()).collect();
    assert_eq!(got, expected);
    let pod = Netns::new("pod");
    let out = node.run(&Env::new("ADD").container("one-more", Some(&pod.path()), "eth0"));
    assert_eq!(out.code(), Some(100), "{}", out.stdout);
    assert!(
        assert_store_consistent(&node)
            .iter()
            .all(|r| r.container_id.starts_with("new"))
    );
}
