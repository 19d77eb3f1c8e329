//! The real kernel programs: loaded (the verifier runs), pinned, attached to a real pod's host
//! veth, counting real traffic.
use std::net::SocketAddr;

use aya::maps::MapType;
use ferrynet_agent::datapath::{self, Datapath, MapSizes};
use ferrynet_common::FROM_POD_STATS_MAP;
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

#[test]
fn the_pod_program_loads_attaches_and_counts_what_a_pod_sends() {
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
    let ifindex = host.ip_json(&["link", "show", &veth])[0]["ifindex"].as_u64().unwrap() as u32;

    // Loading runs the verifier on the real kernel; a broken kernel build fails here.
    let mut datapath = Datapath::load(&bpffs.pin_path("dp"), MapSizes::default()).expect("load the eBPF object");
    // The counters are an LRU map: a pod that goes leaves an entry that new pods push out,
    // instead of new pods going uncounted once the map is full.
    assert_eq!(
        datapath.map_info(FROM_POD_STATS_MAP).unwrap().map_type().unwrap(),
        MapType::LruPerCpuHash
    );
    ferrynet_kernel::netns::run_in(host.fd(), || {
        datapath.attach_pod_veth(&veth, false).map_err(std::io::Error::other)
    })
    .expect("attach at TCX ingress and egress");
    // IPv6 DAD or MLD from the new veth may be counted already: count from here.
    let before = datapath.from_pod_counters(ifindex).unwrap();

    let server = EchoServer::start(&host, "192.168.95.1:7070".parse::<SocketAddr>().unwrap(), "host");
    for i in 0..5 {
        let answer = request(&pod, server.addr, &format!("n{i}")).expect("pod reaches host through the program");
        assert_eq!(answer, format!("host from={} n{i}", result_ip(&result, true)));
    }
    let after = datapath.from_pod_counters(ifindex).unwrap();
    let (packets, bytes) = (after.packets - before.packets, after.bytes - before.bytes);
    // Five TCP connections: at least SYN, ACK, data and FIN from the pod for each.
    assert!(packets >= 20, "{before:?} -> {after:?}");
    assert!(bytes >= packets * 40, "{before:?} -> {after:?}");

    // The links are pinned: dropping the loader keeps them attached and counting.
    drop(datapath);
    assert!(request(&pod, server.addr, "after").is_ok());
    let pins = datapath::PinLayout::new(&bpffs.pin_path("dp"));
    assert!(pins.pod_link(&veth, "from").exists() && pins.pod_link(&veth, "to").exists());
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
