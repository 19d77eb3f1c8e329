//! The agent's IPAM GC against the real CNI, in a throwaway host namespace: it releases what is
//! dead and never what is live, including during the window of a repeated ADD.
use std::time::Duration;

use ferrynet_agent::ipam_gc;
use ferrynet_ipam::{AllocationRequest, AttachmentKey, IpamConfig};
use ferrynet_tests::cni::{TestNode, host_veth_of};
use serde_json::Value;

#[test]
fn a_gc_inside_a_repeated_adds_window_keeps_the_live_pods_address() {
    let node = TestNode::new("gcrace", "192.168.96.1", "fd96::1", "10.41.0.0/24", None);
    let (pod, _) = node.add_pod("live");
    let store = node.store();
    let key = AttachmentKey::new("live", "eth0").unwrap();
    let held = node.allocations()[0].ips.clone();
    // The pod has run for an hour: its record is as old as that.
    {
        let locked = store.lock().unwrap();
        let mut record = locked.get(&key).unwrap().unwrap();
        record.created_unix -= 3600;
        drop(locked);
        let path = store.dir().join("attachments").join("live:eth0");
        std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    }
    // The runtime repeats ADD (a kubelet restart, say). The plugin's IPAM step runs under the
    // store lock and finds the existing allocation...
    let ipam: Value = node.plugin_config()["ipam"].clone();
    let sets = IpamConfig::from_value(&ipam).unwrap().range_sets;
    let again = store
        .lock()
        .unwrap()
        .allocate(&key, &sets, &AllocationRequest::default())
        .unwrap();
    assert_eq!(again.ips, held);
    // ...then, outside the lock, it deletes the old veth before creating the new one.
    node.host.ip(&["link", "del", &host_veth_of("live")]);
    // The agent's GC runs in exactly that window: no veth, and (before the fix) an hour-old
    // record. It must keep the address: the pod is alive and about to get its veth back.
    let collected = ferrynet_kernel::netns::run_in(node.host.fd(), || {
        ipam_gc::collect(node.state.path(), "gcrace", Duration::from_secs(60)).map_err(std::io::Error::other)
    })
    .unwrap();
    assert!(collected.released.is_empty(), "released {:?}", collected.released);
    assert_eq!(node.allocations()[0].ips, held);
    // The repeated ADD completes, with the same address, and a second pod never gets it.
    node.runtime()
        .add(&node.list, "live", &pod.path(), "eth0", &Value::Null, None)
        .unwrap();
    let (_other, result) = node.add_pod("other");
    assert_ne!(ferrynet_tests::cni::result_ip(&result, true), held[0].addr());
    // A pod that really vanished (its veth gone, its record old) is released.
    let vanished = AttachmentKey::new("other", "eth0").unwrap();
    {
        let mut record = store.lock().unwrap().get(&vanished).unwrap().unwrap();
        record.created_unix -= 3600;
        std::fs::write(
            store.dir().join("attachments").join("other:eth0"),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
    }
    node.host.ip(&["link", "del", &host_veth_of("other")]);
    let collected = ferrynet_kernel::netns::run_in(node.host.fd(), || {
        ipam_gc::collect(node.state.path(), "gcrace", Duration::from_secs(60)).map_err(std::io::Error::other)
    })
    .unwrap();
    let released: Vec<String> = collected.released.iter().map(|a| a.container_id.clone()).collect();
    assert_eq!(released, ["other"]);
}
