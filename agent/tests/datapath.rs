//! The real kernel program, loaded and attached to a real pod's host veth, counting real traffic.
use std::net::SocketAddr;

use ferrynet_agent::datapath::Datapath;
use ferrynet_cni::names::HostVeth;
use ferrynet_ipam::AttachmentKey;
use ferrynet_tests::{
    cni::{Runtime, ferrynet_conflist, result_ip},
    netns::Netns,
    require_root,
    tcp::{EchoServer, request},
};
use serde_json::Value;

#[test]
fn the_pod_program_loads_attaches_and_counts_what_a_pod_sends() {
    require_root();
    let host = Netns::host("host", "192.168.95.1", "fd95::1");
    let state = tempfile::tempdir().unwrap();
    let list = ferrynet_conflist("ebpf", "10.40.0.0/24", None, state.path());
    let pod = Netns::new("pod");
    let result = Runtime::new(&host)
        .add(&list, "counted", &pod.path(), "eth0", &Value::Null, None)
        .expect("ADD");
    let veth = HostVeth::for_key(&AttachmentKey::new("counted", "eth0").unwrap()).name;
    let ifindex = host.ip_json(&["link", "show", &veth])[0]["ifindex"].as_u64().unwrap() as u32;

    // Loading runs the verifier on the real kernel; a broken kernel build fails here.
    let mut datapath = Datapath::load().expect("load the eBPF object");
    ferrynet_cni::netns::run_in(host.fd(), || {
        datapath.attach_pod_veth(&veth).map_err(std::io::Error::other)
    })
    .expect("attach at TCX ingress");
    assert_eq!(datapath.from_pod_counters(ifindex).unwrap().packets, 0);

    let server = EchoServer::start(&host, "192.168.95.1:7070".parse::<SocketAddr>().unwrap(), "host");
    for i in 0..5 {
        let answer = request(&pod, server.addr, &format!("n{i}")).expect("pod reaches host through the program");
        assert_eq!(answer, format!("host from={} n{i}", result_ip(&result, true)));
    }
    let counted = datapath.from_pod_counters(ifindex).unwrap();
    // Five TCP connections: at least SYN, ACK, data and FIN from the pod for each.
    assert!(counted.packets >= 20, "{counted:?}");
    assert!(counted.bytes >= counted.packets * 40, "{counted:?}");

    // Detached on drop: the pod keeps working without the program.
    drop(datapath);
    assert!(request(&pod, server.addr, "after").is_ok());
}
