//! The real kernel programs: loaded (the verifier runs), pinned, attached to a real pod's host
//! veth, with real traffic through them.
use std::net::SocketAddr;

use aya::programs::{SchedClassifier, TcAttachType};
use ferrynet_agent::datapath::{self, Datapath, MapSizes, PinnedLinks};
use ferrynet_kernel::names::HostVeth;
use ferrynet_tests::{
    bpffs::TestBpfFs,
    cni::{Runtime, ferrynet_conflist, result_ip},
    netns::Netns,
    require_root,
    tcp::{EchoServer, request},
};
use object::{Object, ObjectSection};
use serde_json::Value;

/// Pins at `path` a map of `kind` as an earlier agent version made it (by bpftool, so that
/// nothing of this version's layout is involved).
fn create_pinned_map(path: &std::path::Path, kind: &str, key: u32, value: u32, entries: u32, name: &str) {
    let made = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args(["type", kind, "key", &key.to_string(), "value", &value.to_string()])
        .args(["entries", &entries.to_string(), "name", name])
        .status()
        .expect("bpftool (installed by bootstrap.sh)");
    assert!(made.success() && path.exists(), "bpftool map create {name}");
}

/// The ids of the programs the kernel runs on `veth`'s `hook` (TCX), in order.
fn tcx_programs(host: &Netns, veth: &str, hook: TcAttachType) -> Vec<u32> {
    let (_, attached) = ferrynet_kernel::netns::run_in(host.fd(), || {
        SchedClassifier::query_tcx(veth, hook).map_err(std::io::Error::other)
    })
    .expect("query the hook's TCX programs");
    attached.iter().map(|p| p.id()).collect()
}

/// The id of the program pinned as `name`.
fn pinned_program_id(pins: &datapath::PinLayout, name: &str) -> u32 {
    let program = SchedClassifier::from_pin(pins.program(name)).expect("pinned program");
    program.info().expect("program info").id()
}

#[test]
fn the_pod_programs_load_attach_first_at_tcx_and_pass_a_pods_traffic() {
    require_root();
    let bpffs = TestBpfFs::mount();
    let host = Netns::host("host", "192.168.95.1", "fd95::1");
    let state = tempfile::tempdir().unwrap();
    let list = ferrynet_conflist("ebpf", "10.40.0.0/24", None, state.path());
    let pod = Netns::new("pod");
    let result = Runtime::new(&host)
        .add(&list, "counted", &pod.path(), "eth0", &Value::Null, None)
        .expect("ADD");
    let veth = HostVeth::new("counted", "eth0").name;

    // A map an earlier version pinned and this one retired (per-pod packet counters): an
    // upgraded node drops it at load.
    let pins = datapath::PinLayout::new(&bpffs.pin_path("dp"));
    pins.create().unwrap();
    let retired = pins.map("FROM_POD_STATS");
    create_pinned_map(&retired, "percpu_hash", 4, 16, 16, "FROM_POD_STATS");

    // Loading runs the verifier on the real kernel; a broken kernel build fails here.
    let mut datapath = Datapath::load(&bpffs.pin_path("dp"), MapSizes::default()).expect("load the eBPF object");
    assert!(!retired.exists(), "the retired map's pin is still there");
    ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath
            .attach_pod_veth(&veth, PinnedLinks::Verify)
            .map_err(std::io::Error::other)
    })
    .expect("attach at TCX ingress and egress");

    // The kernel runs the pinned links' programs on the veth, first on each hook (ahead of any
    // program another tool attaches, which must see translated packets).
    for (hook, suffix) in [(TcAttachType::Ingress, "from"), (TcAttachType::Egress, "to")] {
        let ours = datapath::link_program_id(&pins.pod_link(&veth, suffix)).unwrap();
        let ids = tcx_programs(&host, &veth, hook);
        assert_eq!(ids.first(), Some(&ours), "{suffix}: {ids:?}");
    }

    let server = EchoServer::start(&host, "192.168.95.1:7070".parse::<SocketAddr>().unwrap(), "host");
    for i in 0..5 {
        let answer = request(&pod, server.addr, &format!("n{i}")).expect("pod reaches host through the program");
        assert_eq!(answer, format!("host from={} n{i}", result_ip(&result, true)));
    }

    // A link something else detached stays pinned but runs nothing: attaching again, as a
    // restarted agent (or its resync) does on every veth, finds that out and attaches afresh.
    let from = pins.pod_link(&veth, "from");
    let shown = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(&from)
        .output()
        .unwrap();
    let link: Value = serde_json::from_slice(&shown.stdout).expect("bpftool's link as JSON");
    let link_id = link["id"].as_u64().expect("the link's id").to_string();
    let detached = std::process::Command::new("bpftool")
        .args(["link", "detach", "id", &link_id])
        .status()
        .unwrap();
    assert!(detached.success() && from.exists());
    let ingress = || tcx_programs(&host, &veth, TcAttachType::Ingress);
    let ours = datapath::link_program_id(&from).unwrap();
    assert!(!ingress().contains(&ours), "detached: {:?}", ingress());
    // The controller's frequent scans keep pinned links without asking the kernel...
    let report = ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath
            .attach_pod_veth(&veth, PinnedLinks::Keep)
            .map_err(std::io::Error::other)
    })
    .expect("scan");
    assert_eq!((report.attached, report.kept), (0, 2), "{report:?}");
    assert!(!ingress().contains(&ours), "a scan does not check: {:?}", ingress());
    // ...its start and resyncs verify them.
    let report = ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath
            .attach_pod_veth(&veth, PinnedLinks::Verify)
            .map_err(std::io::Error::other)
    })
    .expect("attach again");
    assert_eq!((report.attached, report.kept), (1, 1), "{report:?}");
    let ours = datapath::link_program_id(&from).unwrap();
    assert_eq!(ingress().first(), Some(&ours), "attached afresh, first");
    assert!(request(&pod, server.addr, "reattached").is_ok());

    // The links are pinned: dropping the loader keeps them attached.
    drop(datapath);
    assert!(request(&pod, server.addr, "after").is_ok());
    assert!(pins.pod_link(&veth, "from").exists() && pins.pod_link(&veth, "to").exists());
    assert_eq!(ingress().len(), 1, "the link went with the loader");
    // Cleanup removes every pin; the veth keeps working without the programs.
    datapath::cleanup(&bpffs.pin_path("dp")).unwrap();
    assert!(!pins.root().exists());
    assert!(request(&pod, server.addr, "after cleanup").is_ok());
}

#[test]
fn the_kernel_object_declares_its_dual_licence() {
    // The kernel reads the licence from the object's `license` section; without one, the loader
    // declares "GPL" on the object's behalf. It must say what the kernel crate's licence says.
    let elf = object::File::parse(datapath::object()).expect("an ELF object");
    let section = elf.section_by_name("license").expect("a license section");
    assert_eq!(section.data().unwrap(), b"Dual MIT/GPL\0");
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/ferrynet-ebpf/Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"MIT OR GPL-2.0\""), "{manifest}");
}

/// What the agent itself may take besides its maps: the services benchmark's RSS target at
/// 10,000 Services.
const AGENT_RSS_BUDGET: u64 = 100 << 20;

/// A Kubernetes memory quantity in bytes (`256Mi`, `1Gi`, `512M`, plain bytes).
fn quantity_bytes(q: &str) -> u64 {
    let units: [(&str, u64); 6] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap_or_else(|e| panic!("{q}: {e}")) * factor;
        }
    }
    q.parse().unwrap_or_else(|e| panic!("{q}: {e}"))
}

#[test]
fn the_maps_at_their_default_sizes_fit_the_daemonsets_memory_limit() {
    require_root();
    // Since Linux 5.11 a map's memory is charged to the memory cgroup of the process that
    // created it: the agent's container. Its maps are preallocated at their full size, so the
    // DaemonSet's memory limit must hold them all, and the agent besides.
    let bpffs = TestBpfFs::mount();
    let datapath = Datapath::load(&bpffs.pin_path("dp"), MapSizes::default()).expect("load the eBPF object");
    let pins = datapath::PinLayout::new(&bpffs.pin_path("dp"));
    let mut maps_bytes = 0;
    for name in ferrynet_common::PINNED_MAPS {
        let shown = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(pins.map(name))
            .output()
            .expect("bpftool (installed by bootstrap.sh)");
        let map: Value = serde_json::from_slice(&shown.stdout).unwrap_or_else(|e| panic!("{name}: {e}"));
        maps_bytes += map["bytes_memlock"].as_u64().unwrap_or_else(|| panic!("{name}: {map}"));
    }
    drop(datapath);
    datapath::cleanup(&bpffs.pin_path("dp")).unwrap();

    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/daemonset.yaml");
    let daemonset: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    let containers = daemonset["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    let agent = containers
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("the agent container");
    let resources = &agent["resources"];
    let limit = quantity_bytes(resources["limits"]["memory"].as_str().expect("a memory limit"));
    let request = quantity_bytes(resources["requests"]["memory"].as_str().expect("a memory request"));
    let mib = |b: u64| b >> 20;
    assert!(
        maps_bytes + AGENT_RSS_BUDGET <= limit,
        "the maps take {} MiB and the agent up to {} MiB: over the limit of {} MiB",
        mib(maps_bytes),
        mib(AGENT_RSS_BUDGET),
        mib(limit)
    );
    // The maps are there from the start, whatever the cluster holds: the scheduler must count them.
    assert!(
        request >= maps_bytes,
        "the request of {} MiB does not cover the maps' {} MiB",
        mib(request),
        mib(maps_bytes)
    );
}

#[test]
fn the_sockets_an_older_agent_recorded_are_carried_over_and_its_socket_map_dropped() {
    use aya::maps::{HashMap, Map, MapData};
    use ferrynet_common::{
        BackendValue, SockConnectedValue, SockRevNatKey4, SockRevNatKey6, SockRevNatValue, addr4, addr6, port,
    };
    require_root();
    let bpffs = TestBpfFs::mount();
    let pins = datapath::PinLayout::new(&bpffs.pin_path("dp"));
    let mut datapath = Datapath::load(&bpffs.pin_path("dp"), MapSizes::default()).expect("load the eBPF object");
    let open = |name: &str| Map::from_map_data(MapData::from_pin(pins.map(name)).unwrap()).unwrap();

    // An agent from before SOCK_CONNECTED recorded each connected socket's backend by cookie in
    // SOCK_BACKEND, and its Service address in the reverse NAT maps.
    let old = pins.map(datapath::RETIRED_SOCKET_BACKENDS_MAP);
    create_pinned_map(&old, "lru_hash", 8, 4, 64, "SOCK_BACKEND");
    let mut backends_of: HashMap<_, u64, u32> = HashMap::try_from(open("SOCK_BACKEND")).unwrap();
    // Sockets 1 (IPv4), 2 (IPv6) and 3 (a UDP socket that also sent unconnected datagrams to
    // another Service) are carried over; socket 4 has no reverse entry (evicted): nothing to
    // carry.
    for (cookie, backend) in [(1, 7), (2, 8), (3, 9), (4, 10)] {
        backends_of.insert(cookie, backend, 0).unwrap();
    }
    let service = |addr: [u32; 4], port_host: u16, id: u32| SockRevNatValue {
        addr,
        port: port(port_host),
        _pad: 0,
        service: id,
    };
    let vip4 = [addr4([10, 96, 0, 2]), 0, 0, 0];
    let other_vip4 = [addr4([10, 96, 0, 3]), 0, 0, 0];
    let vip6 = addr6([0xfd, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let backend6 = addr6([0xfd, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let mut reverse4: HashMap<_, SockRevNatKey4, SockRevNatValue> = HashMap::try_from(open("SOCK_REVNAT4")).unwrap();
    let key4 = |cookie: u64, addr: [u8; 4], port_host: u16| SockRevNatKey4 {
        cookie,
        addr: addr4(addr),
        port: port(port_host),
        _pad: 0,
    };
    // Socket 5 only sent unconnected datagrams: it never had a SOCK_BACKEND entry.
    for (cookie, backend, backend_port, vip, vip_port, id) in [
        (1, [10, 244, 2, 2], 9000, vip4, 80, 3),
        (3, [10, 244, 2, 9], 53, other_vip4, 53, 5),
        (3, [10, 244, 2, 4], 53, vip4, 53, 4),
        (5, [10, 244, 2, 2], 9000, vip4, 80, 3),
    ] {
        let key = key4(cookie, backend, backend_port);
        reverse4.insert(key, service(vip, vip_port, id), 0).unwrap();
    }
    let mut reverse6: HashMap<_, SockRevNatKey6, SockRevNatValue> = HashMap::try_from(open("SOCK_REVNAT6")).unwrap();
    let key6 = SockRevNatKey6 {
        cookie: 2,
        addr: backend6,
        port: port(8080),
        _pad: [0; 6],
    };
    reverse6.insert(key6, service(vip6, 80, 6), 0).unwrap();
    // Socket 3's backend, still there: its address tells the connected peer apart.
    let mut backends: HashMap<_, u32, BackendValue> = HashMap::try_from(open("BACKENDS")).unwrap();
    let backend9 = BackendValue {
        addr: [addr4([10, 244, 2, 4]), 0, 0, 0],
        port: port(53),
        family: 4,
        ..Default::default()
    };
    backends.insert(9, backend9, 0).unwrap();

    assert_eq!(
        datapath
            .adopt_retired_socket_backends()
            .expect("carry the sockets over"),
        3
    );
    assert!(!old.exists(), "the retired map's pin is still there");
    let connected: HashMap<_, u64, SockConnectedValue> = HashMap::try_from(open("SOCK_CONNECTED")).unwrap();
    let mut carried: Vec<(u64, SockConnectedValue)> = connected.iter().map(Result::unwrap).collect();
    carried.sort_by_key(|(cookie, _)| *cookie);
    let entry =
        |backend_addr, backend_port: u16, service_addr, service_port: u16, backend, service| SockConnectedValue {
            backend_addr,
            service_addr,
            backend,
            service,
            backend_port: port(backend_port),
            service_port: port(service_port),
            _pad: 0,
        };
    assert_eq!(
        carried,
        [
            (1, entry([addr4([10, 244, 2, 2]), 0, 0, 0], 9000, vip4, 80, 7, 3)),
            (2, entry(backend6, 8080, vip6, 80, 8, 6)),
            (3, entry([addr4([10, 244, 2, 4]), 0, 0, 0], 53, vip4, 53, 9, 4)),
        ]
    );
    // The reverse entries stay (getpeername falls back to them), and a second run has nothing
    // left to do.
    assert_eq!(reverse4.iter().count(), 4);
    assert_eq!(datapath.adopt_retired_socket_backends().unwrap(), 0);
    drop(datapath);
    datapath::cleanup(&bpffs.pin_path("dp")).unwrap();
}

/// The host veths of the calling thread's namespace, as the controller's scan lists them.
fn host_veths_here() -> Vec<String> {
    let mut netlink = ferrynet_kernel::netlink::Netlink::current().expect("netlink");
    netlink
        .links()
        .expect("links")
        .iter()
        .filter_map(ferrynet_kernel::netlink::inspect::link_name)
        .filter(|name| name.starts_with(ferrynet_kernel::names::HOST_VETH_PREFIX))
        .map(str::to_string)
        .collect()
}

/// A test's own world for the pod programs: a throwaway host netns, a private bpffs where a
/// loaded datapath pinned them, and a conflist whose ADDs attach them.
struct PinnedPodPrograms {
    datapath: Datapath,
    pin_root: std::path::PathBuf,
    pins: datapath::PinLayout,
    host: Netns,
    list: ferrynet_tests::cni::Conflist,
    /// Each hook, its link's suffix, and the id of the program pinned for it.
    hooks: [(TcAttachType, &'static str, u32); 2],
    _state: tempfile::TempDir,
    _bpffs: TestBpfFs,
}

impl PinnedPodPrograms {
    fn new(network: &str, host_v4: &str, host_v6: &str, subnet: &str) -> Self {
        use ferrynet_common::{FROM_POD_PROGRAM, TO_POD_PROGRAM};
        let bpffs = TestBpfFs::mount();
        let pin_root = bpffs.pin_path("dp");
        let pins = datapath::PinLayout::new(&pin_root);
        let host = Netns::host("host", host_v4, host_v6);
        let state = tempfile::tempdir().unwrap();
        let mut list = ferrynet_conflist(network, subnet, None, state.path());
        list.0["plugins"][0]["datapath"] = serde_json::json!({ "pinPath": pin_root });
        let mut datapath = Datapath::load(&pin_root, MapSizes::default()).expect("load the eBPF object");
        datapath.pin_pod_programs().expect("pin the pod programs");
        let hooks = [
            (
                TcAttachType::Ingress,
                "from",
                pinned_program_id(&pins, FROM_POD_PROGRAM),
            ),
            (TcAttachType::Egress, "to", pinned_program_id(&pins, TO_POD_PROGRAM)),
        ];
        Self {
            datapath,
            pin_root,
            pins,
            host,
            list,
            hooks,
            _state: state,
            _bpffs: bpffs,
        }
    }

    fn finish(self) {
        drop(self.datapath);
        datapath::cleanup(&self.pin_root).unwrap();
    }
}

/// Whether `veth` runs exactly the programs of `hooks` (hook, link suffix, program id), once
/// each.
fn runs_exactly(host: &Netns, hooks: &[(TcAttachType, &'static str, u32); 2], veth: &str) -> Result<(), String> {
    for (hook, suffix, ours) in hooks {
        let ids = tcx_programs(host, veth, *hook);
        if ids != [*ours] {
            return Err(format!("{veth} {suffix} runs {ids:?}, not [{ours}]"));
        }
    }
    Ok(())
}

/// Runs `step` back to back in a thread of its own (at most a million times, for at most two
/// minutes) while `main` runs here; then `main`'s outcome, the steps' failures and how many
/// steps ran.
fn alongside<T>(
    mut step: impl FnMut() -> Result<(), String> + Send,
    main: impl FnOnce() -> T,
) -> (T, Vec<String>, u32) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let running = AtomicBool::new(true);
    std::thread::scope(|s| {
        let stepper = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut failures = Vec::new();
            let mut steps = 0u32;
            while running.load(Ordering::Relaxed) && steps < 1_000_000 && Instant::now() < deadline {
                if let Err(e) = step() {
                    failures.push(e);
                }
                steps += 1;
            }
            (failures, steps)
        });
        let outcome = main();
        running.store(false, Ordering::Relaxed);
        let (failures, steps) = stepper.join().expect("the stepping thread");
        (outcome, failures, steps)
    })
}

#[test]
fn the_cni_and_the_agents_scan_attaching_to_new_veths_at_once_neither_fail_nor_leave_one_bare() {
    require_root();
    let mut world = PinnedPodPrograms::new("race", "192.168.96.1", "fd96::1", "10.41.0.0/24");
    let pod = Netns::new("pod");
    let runtime = Runtime::new(&world.host);
    let (datapath, host, hooks, list) = (&mut world.datapath, &world.host, &world.hooks, &world.list);

    // Interfaces e0..e29 of one pod are added, deleted and added again (the same veth names a
    // second time, after links pinned for the first ones), while the agent's scan runs back to
    // back: every new veth is one both sides go for at once.
    let scan = || {
        let scanned = ferrynet_kernel::netns::run_in(host.fd(), || {
            let veths = host_veths_here();
            Ok(datapath.scan_pod_veths(&veths, PinnedLinks::Keep))
        })
        .expect("enter the host netns");
        scanned.map_err(|errors| errors.to_string())
    };
    let adds = || {
        let mut live = std::collections::BTreeSet::new();
        for round in 0..90 {
            let ifname = format!("e{}", round % 30);
            if live.remove(&ifname) {
                runtime
                    .del(list, "race", Some(&pod.path()), &ifname, &Value::Null, None)
                    .map_err(|e| format!("DEL {ifname}: {e:?}"))?;
                continue;
            }
            runtime
                .add(list, "race", &pod.path(), &ifname, &Value::Null, None)
                .map_err(|e| format!("ADD {ifname} (round {round}) failed while the agent scanned: {e:?}"))?;
            live.insert(ifname.clone());
            // The programs run on the new veth, once each, whoever attached them.
            let veth = HostVeth::new("race", &ifname).name;
            runs_exactly(host, hooks, &veth).map_err(|e| format!("round {round}: {e}"))?;
        }
        Ok::<(), String>(())
    };
    let (added, scan_failures, scans) = alongside(scan, adds);
    added.unwrap_or_else(|failure| panic!("{failure}"));
    assert!(scan_failures.is_empty(), "the agent's scan failed: {scan_failures:?}");
    assert!(scans >= 90, "only {scans} scans ran alongside the ADDs");

    // Every live veth's two links are pinned, and those pins are the links on that veth (not a
    // defunct link of an earlier veth of the same name, nor a link about to go with no pin to
    // hold it); a last scan leaves no pin of a deleted veth.
    let PinnedPodPrograms {
        datapath,
        pins,
        host,
        hooks,
        ..
    } = &mut world;
    let veths = ferrynet_kernel::netns::run_in(host.fd(), || Ok(host_veths_here())).unwrap();
    assert_eq!(veths.len(), 30, "{veths:?}");
    ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath
            .scan_pod_veths(&veths, PinnedLinks::Keep)
            .map_err(std::io::Error::other)
    })
    .expect("a last scan");
    let pinned: Vec<String> = datapath::pinned_pod_veths(pins).into_iter().collect();
    let mut sorted = veths.clone();
    sorted.sort();
    assert_eq!(pinned, sorted);
    for veth in &veths {
        let ifindex = ferrynet_kernel::netns::run_in(host.fd(), || {
            nix::net::if_::if_nametoindex(veth.as_str()).map_err(std::io::Error::from)
        })
        .unwrap();
        for (_, suffix, ours) in *hooks {
            let link = pins.pod_link(veth, suffix);
            let linked = ferrynet_tests::bpffs::tcx_link_ifindex(&link).expect("the pinned link's info");
            assert_eq!(linked, ifindex, "{veth}-{suffix}: a link of another interface");
            assert_eq!(datapath::link_program_id(&link).unwrap(), ours, "{veth}-{suffix}");
        }
    }
    world.finish();
}

#[test]
fn without_the_per_packet_path_pods_veths_carry_from_pod_alone_from_the_cni_and_the_agent() {
    use ferrynet_common::{FROM_POD_PROGRAM, TO_POD_PROGRAM};
    require_root();
    let bpffs = TestBpfFs::mount();
    let pin_root = bpffs.pin_path("dp");
    let pins = datapath::PinLayout::new(&pin_root);
    let host = Netns::host("host", "192.168.97.1", "fd97::1");
    let state = tempfile::tempdir().unwrap();
    let mut list = ferrynet_conflist("hooks", "10.42.0.0/24", None, state.path());
    list.0["plugins"][0]["datapath"] = serde_json::json!({ "pinPath": pin_root });
    let runtime = Runtime::new(&host);
    let server = EchoServer::start(&host, "192.168.97.1:7070".parse::<SocketAddr>().unwrap(), "host");
    let programs_on = |veth: &str, hook: TcAttachType| tcx_programs(&host, veth, hook);
    let pinned_id = |name: &str| pinned_program_id(&pins, name);

    // The per-packet path translates (as it does until told otherwise): a pod made now gets both.
    let mut datapath = Datapath::load(&pin_root, MapSizes::default()).expect("load the eBPF object");
    datapath.pin_pod_programs().unwrap();
    let (from, to) = (pinned_id(FROM_POD_PROGRAM), pinned_id(TO_POD_PROGRAM));
    let early = Netns::new("early");
    runtime
        .add(&list, "hooks", &early.path(), "eth0", &Value::Null, None)
        .expect("ADD");
    let early_veth = HostVeth::new("hooks", "eth0").name;
    assert_eq!(programs_on(&early_veth, TcAttachType::Ingress), [from]);
    assert_eq!(programs_on(&early_veth, TcAttachType::Egress), [to]);

    // An agent restarted into socket LB alone: until its settings are written, the earlier
    // run's may have the per-packet path on, and nothing out of force goes.
    datapath.set_per_packet(false);
    datapath.keep_out_of_force(true);
    datapath.pin_pod_programs().unwrap();
    assert!(pins.program(TO_POD_PROGRAM).exists());
    let report = ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath
            .attach_pod_veth(&early_veth, PinnedLinks::Verify)
            .map_err(std::io::Error::other)
    })
    .unwrap();
    assert_eq!((report.kept, report.detached), (1, 0), "{report:?}");
    assert_eq!(programs_on(&early_veth, TcAttachType::Egress), [to]);
    // Then the reply program's pin goes, and the agent takes it off existing veths.
    datapath.keep_out_of_force(false);
    datapath.unpin_out_of_force_programs().unwrap();
    assert!(pins.program(FROM_POD_PROGRAM).exists() && !pins.program(TO_POD_PROGRAM).exists());
    let report = ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath
            .attach_pod_veth(&early_veth, PinnedLinks::Keep)
            .map_err(std::io::Error::other)
    })
    .unwrap();
    assert_eq!((report.kept, report.detached), (1, 1), "{report:?}");
    assert_eq!(programs_on(&early_veth, TcAttachType::Ingress), [from]);
    assert_eq!(programs_on(&early_veth, TcAttachType::Egress), Vec::<u32>::new());
    assert!(!pins.pod_link(&early_veth, "to").exists());
    // A pod made now gets `from_pod` alone from the CNI, and its traffic flows.
    let late = Netns::new("late");
    let result = runtime
        .add(&list, "hooks", &late.path(), "eth1", &Value::Null, None)
        .expect("ADD without a pinned to_pod");
    let late_veth = HostVeth::new("hooks", "eth1").name;
    assert_eq!(programs_on(&late_veth, TcAttachType::Ingress), [from]);
    assert_eq!(programs_on(&late_veth, TcAttachType::Egress), Vec::<u32>::new());
    assert!(pins.pod_link(&late_veth, "from").exists() && !pins.pod_link(&late_veth, "to").exists());
    let answer = request(&late, server.addr, "late").expect("the pod reaches the host");
    assert_eq!(answer, format!("host from={} late", result_ip(&result, true)));
    // The agent's scans keep it so.
    let veths = ferrynet_kernel::netns::run_in(host.fd(), || Ok(host_veths_here())).unwrap();
    ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath
            .scan_pod_veths(&veths, PinnedLinks::Verify)
            .map_err(std::io::Error::other)
    })
    .expect("scan");
    for veth in [&early_veth, &late_veth] {
        assert_eq!(programs_on(veth, TcAttachType::Egress), Vec::<u32>::new(), "{veth}");
    }

    // The per-packet path again (an agent restarted with socket LB off): every veth gets
    // `to_pod` back, from the scan alone.
    datapath.set_per_packet(true);
    datapath.pin_pod_programs().unwrap();
    let to = pinned_id(TO_POD_PROGRAM);
    ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath
            .scan_pod_veths(&veths, PinnedLinks::Keep)
            .map_err(std::io::Error::other)
    })
    .expect("scan");
    for veth in [&early_veth, &late_veth] {
        assert_eq!(programs_on(veth, TcAttachType::Egress), [to], "{veth}");
        assert_eq!(programs_on(veth, TcAttachType::Ingress), [from], "{veth}");
    }
    assert!(request(&late, server.addr, "again").is_ok());
    drop(datapath);
    datapath::cleanup(&pin_root).unwrap();
}

#[test]
fn a_cni_add_while_the_agent_pins_its_pod_programs_again_finds_them_pinned() {
    use ferrynet_common::{FROM_POD_PROGRAM, TO_POD_PROGRAM};
    require_root();
    let mut world = PinnedPodPrograms::new("repin", "192.168.98.1", "fd98::1", "10.43.0.0/24");
    let pod = Netns::new("pod");
    let runtime = Runtime::new(&world.host);
    let (datapath, host, hooks, list) = (&mut world.datapath, &world.host, &world.hooks, &world.list);

    // The agent pins its pod programs again back to back (as each start and switch of the
    // per-packet path does), while pods are added: each ADD must find both pins and attach both
    // programs, whichever pin it meets.
    let pin = || datapath.pin_pod_programs().map_err(|e| e.to_string());
    let adds = || {
        for round in 0..60 {
            let ifname = format!("e{round}");
            runtime
                .add(list, "repin", &pod.path(), &ifname, &Value::Null, None)
                .map_err(|e| format!("ADD {ifname} failed while the agent pinned: {e:?}"))?;
            let veth = HostVeth::new("repin", &ifname).name;
            runs_exactly(host, hooks, &veth).map_err(|e| format!("round {round}: {e}"))?;
        }
        Ok::<(), String>(())
    };
    let (added, pin_failures, pinnings) = alongside(pin, adds);
    added.unwrap_or_else(|failure| panic!("{failure}"));
    assert!(pin_failures.is_empty(), "pinning failed: {pin_failures:?}");
    assert!(pinnings >= 60, "only {pinnings} pinnings ran alongside the ADDs");
    // Only the two programs' pins are left.
    let mut left: Vec<String> = std::fs::read_dir(world.pins.programs())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("pod"))
        .collect();
    left.sort();
    assert_eq!(left, [FROM_POD_PROGRAM, TO_POD_PROGRAM]);
    world.finish();
}

/// The prefixes a pinned Service CIDR trie holds.
fn trie_prefixes<K: aya::Pod + Into<std::net::IpAddr>>(pins: &datapath::PinLayout, name: &str) -> Vec<ipnet::IpNet> {
    let data = aya::maps::MapData::from_pin(pins.map(name)).expect("the pinned trie");
    let trie: aya::maps::lpm_trie::LpmTrie<_, K, u8> =
        aya::maps::lpm_trie::LpmTrie::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    let mut prefixes: Vec<ipnet::IpNet> = trie
        .keys()
        .map(|key| {
            let key = key.expect("a key");
            ipnet::IpNet::new(key.data().into(), key.prefix_len() as u8).expect("a prefix")
        })
        .collect();
    prefixes.sort();
    prefixes
}

/// An IPv4 trie key's address (network order, as the datapath writes it).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Addr4(u32);
// SAFETY: a plain u32.
unsafe impl aya::Pod for Addr4 {}
impl From<Addr4> for std::net::IpAddr {
    fn from(a: Addr4) -> Self {
        std::net::Ipv4Addr::from(u32::from_be(a.0)).into()
    }
}

/// An IPv6 trie key's address.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Addr6([u8; 16]);
// SAFETY: plain bytes.
unsafe impl aya::Pod for Addr6 {}
impl From<Addr6> for std::net::IpAddr {
    fn from(a: Addr6) -> Self {
        std::net::Ipv6Addr::from(a.0).into()
    }
}

#[test]
fn the_service_cidr_tries_change_in_place_even_when_full() {
    use ferrynet_common::{MAX_SERVICE_CIDRS, SERVICE_CIDRS4_MAP, SERVICE_CIDRS6_MAP};
    require_root();
    let bpffs = TestBpfFs::mount();
    let pin_root = bpffs.pin_path("dp");
    let pins = datapath::PinLayout::new(&pin_root);
    let mut datapath = Datapath::load(&pin_root, MapSizes::default()).expect("load the eBPF object");
    let cidrs = |v4: std::ops::Range<u32>| -> Vec<ipnet::IpNet> {
        v4.map(|i| format!("10.{i}.0.0/16").parse().unwrap())
            .chain(["fd00:96::/108".parse().unwrap()])
            .collect()
    };
    let held = || {
        let mut all = trie_prefixes::<Addr4>(&pins, SERVICE_CIDRS4_MAP);
        all.extend(trie_prefixes::<Addr6>(&pins, SERVICE_CIDRS6_MAP));
        all
    };
    let full = MAX_SERVICE_CIDRS;
    // As many as a trie holds, then all but one of them with another: old and new together are
    // more than it holds, so the old go first.
    datapath.set_service_cidrs(&cidrs(0..full)).expect("a full trie");
    assert_eq!(held(), cidrs(0..full));
    datapath
        .set_service_cidrs(&cidrs(1..full + 1))
        .expect("a full trie, changed");
    assert_eq!(held(), cidrs(1..full + 1));
    // Fewer: the new go in before the old go out.
    datapath.set_service_cidrs(&cidrs(2..6)).expect("a few");
    assert_eq!(held(), cidrs(2..6));
    datapath.set_service_cidrs(&[]).expect("none");
    assert_eq!(held(), Vec::new());
    drop(datapath);
    datapath::cleanup(&pin_root).unwrap();
}
