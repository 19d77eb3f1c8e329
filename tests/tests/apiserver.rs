//! The API stand-in, tested against kube-rs's own watcher and reflector, and the real kubectl.
//! Everything runs inside a throwaway network namespace.
use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use ferrynet_tests::{
    apiserver::{ApiServer, Settings, kubeconfig},
    netns::Netns,
    require_root, wait_for,
};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, NodeSpec, Service, ServiceSpec},
    discovery::v1::{Endpoint, EndpointSlice},
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, reflector, watcher},
};

/// Starts a stand-in inside `ns` on a fixed or free port, on a runtime of its own: dropping the
/// runtime stops it the way a process exit would, every connection included.
fn start(ns: &Netns, settings: Settings, port: u16) -> (SocketAddr, tokio::runtime::Runtime) {
    let (addr, rt, _) = start_server(ns, settings, port);
    (addr, rt)
}

/// [`start`], also handing back the server (to flush its data file before a restart).
fn start_server(ns: &Netns, settings: Settings, port: u16) -> (SocketAddr, tokio::runtime::Runtime, ApiServer) {
    let rt = ns.runtime();
    let server = ApiServer::new(settings).unwrap();
    let handle = server.clone();
    let listener = rt
        .block_on(rt.spawn(async move { tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap() }))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let _ = server.serve(listener).await;
    });
    (addr, rt, handle)
}

async fn client(addr: SocketAddr) -> Client {
    let kc = Kubeconfig::from_yaml(&kubeconfig(addr)).unwrap();
    Client::try_from(
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap(),
    )
    .unwrap()
}

fn node(name: &str, cidr: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("zone".to_string(), "a".to_string())].into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: Some(vec![cidr.into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn kube_rs_lists_watches_and_reflects_through_the_stand_in() {
    require_root();
    let ns = Netns::new("api");
    let rt = ns.runtime();
    let settings = Settings {
        bookmark_interval: Duration::from_millis(200),
        history: 8,
        ..Default::default()
    };
    let (addr, _server) = start(&ns, settings, 0);
    rt.block_on(rt.spawn(async move {
        let client = client(addr).await;
        let nodes: Api<Node> = Api::all(client.clone());
        let pp = PostParams::default();
        nodes.create(&pp, &node("n1", "10.244.1.0/24")).await.unwrap();
        nodes.create(&pp, &node("n2", "10.244.2.0/24")).await.unwrap();
        let err = nodes.create(&pp, &node("n1", "10.244.9.0/24")).await.unwrap_err();
        assert!(
            err.to_string().contains("AlreadyExists") || err.to_string().contains("409"),
            "{err}"
        );
        let listed = nodes.list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 2);
        assert!(listed.metadata.resource_version.is_some());
        // A merge patch is applied; a strategic merge patch, which needs list merge keys the
        // stand-in does not know, is refused (415) rather than applied as a merge patch.
        let patched = nodes
            .patch(
                "n1",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"zone": "m"}}})),
            )
            .await
            .unwrap();
        assert_eq!(patched.metadata.labels.unwrap()["zone"], "m");
        let strategic = serde_json::json!({"spec": {"podCIDRs": ["10.244.7.0/24"]}});
        match nodes
            .patch("n1", &PatchParams::default(), &Patch::Strategic(strategic))
            .await
        {
            Err(kube::Error::Api(e)) => assert_eq!(e.code, 415, "{e:?}"),
            other => panic!("a strategic merge patch was not refused: {other:?}"),
        }
        assert_eq!(
            nodes.get("n1").await.unwrap().spec.unwrap().pod_cidrs.unwrap(),
            ["10.244.1.0/24"]
        );
        nodes
            .patch(
                "n1",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"zone": "a"}}})),
            )
            .await
            .unwrap();
        assert_eq!(
            nodes
                .list(&ListParams::default().fields("metadata.name=n2"))
                .await
                .unwrap()
                .items
                .len(),
            1
        );
        assert_eq!(
            nodes
                .list(&ListParams::default().labels("zone=b"))
                .await
                .unwrap()
                .items
                .len(),
            0
        );

        // The reflector: initial list, then every change, in the store.
        let (reader, writer) = reflector::store::<Node>();
        let stream = reflector(
            writer,
            watcher(nodes.clone(), watcher::Config::default()).default_backoff(),
        );
        let pump = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while stream.next().await.is_some() {}
        });
        tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reader.state().len(), 2);
        nodes.create(&pp, &node("n3", "10.244.3.0/24")).await.unwrap();
        nodes.delete("n1", &Default::default()).await.unwrap();
        let mut n2 = nodes.get("n2").await.unwrap();
        n2.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.22.0/24".into()]);
        nodes.replace("n2", &pp, &n2).await.unwrap();
        let converged = async {
            loop {
                let mut names: Vec<String> = reader
                    .state()
                    .iter()
                    .map(|n| n.metadata.name.clone().unwrap())
                    .collect();
                names.sort();
                let n2_cidr = reader
                    .state()
                    .iter()
                    .find(|n| n.metadata.name.as_deref() == Some("n2"))
                    .and_then(|n| n.spec.as_ref()?.pod_cidrs.clone());
                if names == ["n2", "n3"] && n2_cidr == Some(vec!["10.244.22.0/24".to_string()]) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), converged)
            .await
            .expect("reflector converged");

        // A stale update conflicts (n2 was replaced after this copy was read).
        let err = nodes.replace("n2", &pp, &n2).await.unwrap_err();
        assert!(
            err.to_string().contains("409") || err.to_string().contains("Conflict"),
            "{err}"
        );
        // The status subresource changes status only.
        let mut fresh = nodes.get("n2").await.unwrap();
        fresh.status = Some(
            serde_json::from_value(serde_json::json!({"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}]}))
                .unwrap(),
        );
        fresh.spec.as_mut().unwrap().pod_cidrs = Some(vec!["1.2.3.0/24".into()]);
        let updated = nodes.replace_status("n2", &pp, &fresh).await.unwrap();
        assert_eq!(updated.status.unwrap().addresses.unwrap()[0].address, "10.0.0.2");
        assert_eq!(updated.spec.unwrap().pod_cidrs.unwrap(), vec!["10.244.22.0/24"]);

        // Bookmarks when asked for.
        let rv = nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let mut watch = nodes.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
        let bookmark = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(event) = watch.next().await {
                if let Ok(WatchEvent::Bookmark(b)) = event {
                    return b;
                }
            }
            panic!("watch ended without a bookmark");
        })
        .await
        .unwrap();
        assert_eq!(bookmark.metadata.resource_version, rv);

        // 410 Gone for a version older than the history kept (8 events): make 10 more changes.
        create_nodes(&nodes, "churn", "10.250.0.0/24", 10).await;
        let mut watch = nodes.watch(&WatchParams::default(), "2").await.unwrap().boxed();
        match tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
        {
            Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
            other => panic!("expected 410 Gone, got {other:?}"),
        }
        // kube-runtime's watcher handles that by listing again: the store still converges.
        nodes.delete("churn-0", &Default::default()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while reader.state().len() != 11 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("reflector after churn");
        pump.abort();

        // Namespaced kinds: Services and EndpointSlices.
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let svc = Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        services.create(&pp, &svc).await.unwrap();
        assert_eq!(
            Api::<Service>::all(client.clone())
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            1
        );
        assert_eq!(
            Api::<Service>::namespaced(client.clone(), "kube-system")
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            0
        );
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                labels: Some([("kubernetes.io/service-name".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["10.244.1.5".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        slices.create(&pp, &slice).await.unwrap();
        let found = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await
            .unwrap();
        assert_eq!(found.items[0].endpoints[0].addresses, vec!["10.244.1.5"]);
    }))
    .unwrap();
}

#[test]
fn the_watcher_recovers_when_the_stand_in_restarts() {
    require_root();
    let ns = Netns::new("api");
    let rt = ns.runtime();
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        data_file: Some(dir.path().join("objects.json")),
        ..Default::default()
    };
    let (addr, server, api) = start_server(&ns, settings.clone(), 0);
    let (reader, writer) = reflector::store::<Node>();
    let ready = reader.clone();
    // The reflector runs on the test runtime (whose threads are in the namespace), not the server's.
    let pump = rt.spawn(async move {
        let nodes: Api<Node> = Api::all(client(addr).await);
        nodes
            .create(&PostParams::default(), &node("before", "10.244.1.0/24"))
            .await
            .unwrap();
        let stream = reflector(writer, watcher(nodes, watcher::Config::default()).default_backoff());
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    rt.block_on(rt.spawn(async move {
        tokio::time::timeout(Duration::from_secs(10), ready.wait_until_ready())
            .await
            .unwrap()
            .unwrap();
    }))
    .unwrap();
    assert_eq!(reader.state().len(), 1);

    // Down (as the lab stops it: the data file brought up to date first), and back on the same
    // address with the same data: the watcher reconnects by itself.
    assert!(api.flush());
    server.shutdown_background();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        reader.state().len(),
        1,
        "the store keeps what it had while the server is away"
    );
    // While it is away, the objects change through another instance on the same data: the
    // history the watcher would resume from is gone.
    let (away_addr, away, away_api) = start_server(&ns, settings.clone(), 0);
    rt.block_on(rt.spawn(async move {
        let nodes: Api<Node> = Api::all(client(away_addr).await);
        nodes.delete("before", &DeleteParams::default()).await.unwrap();
        create_nodes(&nodes, "away", "10.244.3.0/24", 10).await;
    }))
    .unwrap();
    assert!(away_api.flush());
    away.shutdown_background();
    let (_addr2, _server2) = start(&ns, settings, addr.port());
    rt.block_on(rt.spawn(async move {
        let nodes: Api<Node> = Api::all(client(addr).await);
        assert_eq!(
            nodes.list(&ListParams::default()).await.unwrap().items.len(),
            10,
            "objects survive the restart"
        );
        nodes
            .create(&PostParams::default(), &node("after", "10.244.2.0/24"))
            .await
            .unwrap();
    }))
    .unwrap();
    // Resuming from its old resourceVersion gets 410 Gone; the watcher lists again, and so also
    // learns of the deletion it never saw an event for.
    let names = || -> Vec<String> {
        let mut names: Vec<String> = reader.state().iter().filter_map(|n| n.metadata.name.clone()).collect();
        names.sort();
        names
    };
    let mut wanted: Vec<String> = (0..10).map(|i| format!("away-{i}")).collect();
    wanted.push("after".into());
    wanted.sort();
    let seen = wait_for(Duration::from_secs(20), || (names() == wanted).then_some(()));
    assert!(seen.is_some(), "the reflector relisted: {:?}", names());
    pump.abort();
}

#[test]
fn a_watch_from_before_a_crash_that_lost_changes_gets_410() {
    require_root();
    let ns = Netns::new("api");
    let rt = ns.runtime();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.json");
    let crashed_file = dir.path().join("crashed.json");
    let (addr, server, api) = start_server(
        &ns,
        Settings {
            data_file: Some(file.clone()),
            ..Default::default()
        },
        0,
    );
    rt.block_on(rt.spawn(async move {
        let nodes: Api<Node> = Api::all(client(addr).await);
        nodes
            .create(&PostParams::default(), &node("saved", "10.244.1.0/24"))
            .await
            .unwrap();
    }))
    .unwrap();
    assert!(api.flush());
    // The file as a crash leaves it: without the changes after it was last written.
    std::fs::copy(&file, &crashed_file).unwrap();
    let seen = rt
        .block_on(rt.spawn(async move {
            let nodes: Api<Node> = Api::all(client(addr).await);
            create_nodes(&nodes, "lost", "10.244.2.0/24", 3).await;
            list_version(&nodes).await
        }))
        .unwrap();
    server.shutdown_background();

    // Back from the crash's file, and changed more times than the changes it lost: a watcher
    // resuming from what it saw must not be handed only the changes numbered above it.
    let (addr, server) = start(
        &ns,
        Settings {
            data_file: Some(crashed_file.clone()),
            ..Default::default()
        },
        0,
    );
    // The file as a crash of this run before its first periodic write leaves it.
    let crashed_again = dir.path().join("crashed-again.json");
    std::fs::copy(&crashed_file, &crashed_again).unwrap();
    let first_event = |nodes: Api<Node>, rv: String| async move {
        let stream = nodes.watch(&WatchParams::default().timeout(2), &rv).await.unwrap();
        let mut stream = std::pin::pin!(stream);
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
    };
    let seen_again = rt
        .block_on(rt.spawn(async move {
            let nodes: Api<Node> = Api::all(client(addr).await);
            create_nodes(&nodes, "after", "10.244.3.0/24", 5).await;
            let first_event = |rv: String| first_event(nodes.clone(), rv);
            match first_event(seen.clone()).await {
                Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
                other => panic!("a watch from {seen}, before the crash, resumed: {other:?}"),
            }
            // A watch from this run's own list resumes as ever: the next change reaches it.
            let listed = nodes.list(&ListParams::default()).await.unwrap();
            assert_eq!(listed.items.len(), 6, "the saved node and the five after the crash");
            let rv = listed.metadata.resource_version.unwrap();
            // A version this run never handed out gets 410 too.
            let future = (rv.parse::<u64>().unwrap() + 1000).to_string();
            match first_event(future.clone()).await {
                Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
                other => panic!("a watch from {future}, after this run's latest, resumed: {other:?}"),
            }
            // (Whether the watch starts before or after the change, it is after the version.)
            let watcher = tokio::spawn(first_event(rv));
            nodes
                .create(&PostParams::default(), &node("watched", "10.244.4.0/24"))
                .await
                .unwrap();
            match watcher.await.unwrap() {
                Some(Ok(WatchEvent::Added(n))) => assert_eq!(n.metadata.name.as_deref(), Some("watched")),
                other => panic!("the watch from this run's list: {other:?}"),
            }
            list_version(&nodes).await
        }))
        .unwrap();
    server.shutdown_background();

    // This run crashed too, before any write of its own: the next one must not count from the
    // same epoch, or, past as many changes, it would resume this run's watchers.
    let (addr, _server) = start(
        &ns,
        Settings {
            data_file: Some(crashed_again),
            ..Default::default()
        },
        0,
    );
    rt.block_on(rt.spawn(async move {
        let nodes: Api<Node> = Api::all(client(addr).await);
        create_nodes(&nodes, "third", "10.244.5.0/24", 10).await;
        match first_event(nodes, seen_again.clone()).await {
            Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
            other => panic!("a watch from {seen_again}, before the second crash, resumed: {other:?}"),
        }
    }))
    .unwrap();
}

#[test]
fn generated_names_move_on_past_names_already_taken() {
    require_root();
    let ns = Netns::new("api");
    let rt = ns.runtime();
    let (addr, _server) = start(&ns, Settings::default(), 0);
    rt.block_on(rt.spawn(async move {
        let nodes: Api<Node> = Api::all(client(addr).await);
        // A name the generator reaches within a few creates, taken first by hand.
        nodes
            .create(&PostParams::default(), &node("g-00010", "10.244.1.0/24"))
            .await
            .unwrap();
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..32 {
            let mut generated = node("", "10.244.2.0/24");
            generated.metadata.name = None;
            generated.metadata.generate_name = Some("g-".into());
            let created = nodes.create(&PostParams::default(), &generated).await.unwrap();
            names.insert(created.metadata.name.unwrap());
        }
        assert_eq!(names.len(), 32, "{names:?}");
        assert!(!names.contains("g-00010"), "{names:?}");
    }))
    .unwrap();
}

/// Creates `count` nodes, `{prefix}-0` on, with pod CIDR `cidr`.
async fn create_nodes(nodes: &Api<Node>, prefix: &str, cidr: &str, count: usize) {
    for i in 0..count {
        nodes
            .create(&PostParams::default(), &node(&format!("{prefix}-{i}"), cidr))
            .await
            .unwrap();
    }
}

/// The resourceVersion a list of the nodes answers with: the latest the stand-in handed out.
async fn list_version(nodes: &Api<Node>) -> String {
    nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap()
}

fn kubectl(ns: &Netns, home: &Path, config: &Path, args: &[&str]) -> (bool, String) {
    let out = ns.command_output(
        Command::new("kubectl")
            .env("HOME", home)
            .env("KUBECONFIG", config)
            .args(args),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn kubectl_gets_lists_creates_and_deletes_through_the_stand_in() {
    require_root();
    let ns = Netns::new("api");
    let (addr, _server) = start(&ns, Settings::default(), 0);
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("kubeconfig");
    std::fs::write(&config, kubeconfig(addr)).unwrap();
    let manifest = home.path().join("objects.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: kn1\nspec:\n  podCIDRs: [10.244.7.0/24]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: shop\n  namespace: default\nspec:\n  selector: {app: shop}\n  ports: [{port: 80}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: shop-1\n  namespace: default\n  labels: {kubernetes.io/service-name: shop}\n\
         addressType: IPv4\nendpoints: [{addresses: [10.244.7.9]}]\n",
    )
    .unwrap();

    let run = |args: &[&str]| kubectl(&ns, home.path(), &config, args);
    let (ok, out) = run(&["create", "-f", manifest.to_str().unwrap()]);
    assert!(ok, "{out}");
    for (args, needle) in [
        (vec!["get", "nodes"], "kn1"),
        (
            vec!["get", "node", "kn1", "-o", "jsonpath={.spec.podCIDRs[0]}"],
            "10.244.7.0/24",
        ),
        (vec!["get", "services", "-n", "default"], "shop"),
        (vec!["get", "svc", "shop", "-o", "json"], "\"app\": \"shop\""),
        (vec!["get", "endpointslices", "-A"], "shop-1"),
        (vec!["get", "namespaces"], "kube-system"),
    ] {
        let (ok, out) = run(&args);
        assert!(ok && out.contains(needle), "kubectl {args:?}: {out}");
    }
    let (ok, out) = run(&["delete", "service", "shop"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["delete", "-f", manifest.to_str().unwrap(), "--ignore-not-found"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["get", "nodes", "-o", "name"]);
    assert!(ok && !out.contains("kn1"), "{out}");
    let (ok, out) = run(&["get", "service", "shop"]);
    assert!(!ok && out.contains("NotFound"), "{out}");

    // NodePorts, as the real API server hands them out: allocated in 30000-32767, a requested
    // one honoured when free, a taken or out-of-range one refused, released with the Service.
    let node_port = |name: &str| -> u16 {
        let (ok, out) = run(&["get", "svc", name, "-o", "jsonpath={.spec.ports[0].nodePort}"]);
        assert!(ok, "{out}");
        out.trim().parse().unwrap_or_else(|_| panic!("{name}: {out:?}"))
    };
    // kubectl's `create service` sends protobuf, which the stand-in decodes.
    let (ok, out) = run(&["create", "service", "nodeport", "np", "--tcp=80:8080"]);
    assert!(ok, "{out}");
    let node_port_service = |name: &str, node_port: Option<u32>| -> (bool, String) {
        let file = home.path().join(format!("{name}.yaml"));
        let requested = node_port.map(|p| format!(", nodePort: {p}")).unwrap_or_default();
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: NodePort\n  selector: {{app: np}}\n  ports: [{{port: 80, targetPort: 8080{requested}}}]\n"
            ),
        )
        .unwrap();
        run(&["create", "-f", file.to_str().unwrap()])
    };
    let first = node_port("np");
    assert!((30000..=32767).contains(&first), "{first}");
    let (ok, out) = node_port_service("np2", Some(u32::from(first)));
    assert!(!ok && out.contains("provided port is already allocated"), "{out}");
    let (ok, out) = node_port_service("np2", Some(29999));
    assert!(!ok && out.contains("not in the valid range"), "{out}");
    let (ok, out) = node_port_service("np2", Some(31234));
    assert!(ok, "{out}");
    assert_eq!(node_port("np2"), 31234);
    let lb = home.path().join("lb.yaml");
    std::fs::write(
        &lb,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {app: lb}\n  ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]\n",
    )
    .unwrap();
    let (ok, out) = run(&["create", "-f", lb.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = run(&[
        "get",
        "svc",
        "lb",
        "-o",
        "jsonpath={.spec.ports[*].nodePort} {.spec.healthCheckNodePort}",
    ]);
    assert!(ok, "{out}");
    let ports: Vec<u16> = out.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(ports.len(), 3, "{out}");
    let unique: std::collections::BTreeSet<u16> = ports.iter().copied().chain([first, 31234]).collect();
    assert_eq!(unique.len(), 5, "every NodePort distinct: {out}");
    // Deleting a Service frees its NodePort.
    let (ok, out) = run(&["delete", "service", "np"]);
    assert!(ok, "{out}");
    let (ok, out) = node_port_service("np3", Some(u32::from(first)));
    assert!(ok, "{out}");
    assert_eq!(node_port("np3"), first);
}

/// kubectl's stdout parsed as JSON (stderr, with warnings, left out).
fn kubectl_json(ns: &Netns, home: &Path, config: &Path, args: &[&str]) -> serde_json::Value {
    let out = ns.command_output(
        Command::new("kubectl")
            .env("HOME", home)
            .env("KUBECONFIG", config)
            .args(args),
    );
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

/// The cells of the row of `name` (the first column) in kubectl's table output, AGE included.
fn row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .map(|line| line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.first().is_some_and(|c| c == name))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"))
}

/// The header of kubectl's table output, its words as one string.
fn header(table: &str) -> String {
    table
        .lines()
        .find(|l| l.starts_with("NAME") || l.starts_with("NAMESPACE"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
fn kubectl_creates_scales_exposes_runs_and_prints_as_against_a_real_cluster() {
    require_root();
    let ns = Netns::new("api");
    let (addr, _server) = start(&ns, Settings::default(), 0);
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("kubeconfig");
    std::fs::write(&config, kubeconfig(addr)).unwrap();
    let run = |args: &[&str]| kubectl(&ns, home.path(), &config, args);
    let ok = |args: &[&str]| -> String {
        let (ok, out) = run(args);
        assert!(ok, "kubectl {args:?}: {out}");
        out
    };
    let json = |args: &[&str]| kubectl_json(&ns, home.path(), &config, args);

    // `create deployment` sends protobuf: decoded, defaulted as the API server does.
    ok(&[
        "create",
        "deployment",
        "demo",
        "--image=nginx",
        "--replicas=2",
        "--port=80",
    ]);
    let demo = json(&["get", "deploy", "demo", "-o", "json"]);
    assert_eq!(demo["metadata"]["labels"], serde_json::json!({"app": "demo"}));
    assert_eq!(demo["metadata"]["generation"], 1);
    assert!(demo["metadata"]["uid"].is_string() && demo["metadata"]["creationTimestamp"].is_string());
    assert_eq!(
        demo["spec"],
        serde_json::json!({"replicas": 2, "selector": {"matchLabels": {"app": "demo"}},
            "template": {"metadata": {"labels": {"app": "demo"}}, "spec": {
                "containers": [{"name": "nginx", "image": "nginx", "ports": [{"containerPort": 80, "protocol": "TCP"}],
                    "resources": {}, "imagePullPolicy": "Always", "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File"}],
                "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "terminationGracePeriodSeconds": 30,
                "schedulerName": "default-scheduler", "securityContext": {}}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}},
            "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600})
    );
    assert_eq!(demo["status"], serde_json::json!({}));
    ok(&["create", "deployment", "d2", "--image=busybox", "--", "sleep", "3600"]);
    let d2 = json(&["get", "deployment", "d2", "-o", "json"]);
    let container = &d2["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"], serde_json::json!(["sleep", "3600"]), "{d2}");
    assert_eq!(d2["spec"]["replicas"], 1);
    // Server dry runs store nothing.
    ok(&["create", "deployment", "dry", "--image=nginx", "--dry-run=server"]);
    ok(&["run", "dry", "--image=nginx", "--dry-run=server"]);
    for kind in ["deployment", "pod"] {
        let (found, out) = run(&["get", kind, "dry"]);
        assert!(!found && out.contains("NotFound"), "{out}");
    }

    let table = ok(&["get", "deploy"]);
    assert_eq!(header(&table), "NAME READY UP-TO-DATE AVAILABLE AGE");
    assert_eq!(row(&table, "demo")[..4], ["demo", "0/2", "0", "0"]);
    let table = ok(&["get", "deploy", "-o", "wide"]);
    assert_eq!(
        header(&table),
        "NAME READY UP-TO-DATE AVAILABLE AGE CONTAINERS IMAGES SELECTOR"
    );
    assert_eq!(row(&table, "d2")[5..], ["busybox", "busybox", "app=d2"]);

    // `scale` patches the scale subresource.
    ok(&["scale", "deployment", "demo", "--replicas=3"]);
    let demo = json(&["get", "deploy", "demo", "-o", "json"]);
    assert_eq!(demo["spec"]["replicas"], 3);
    assert_eq!(demo["metadata"]["generation"], 2, "a spec change");

    // `expose` and `run --expose` make Services with ClusterIPs.
    ok(&["expose", "deployment", "demo", "--port=80"]);
    let svc = json(&["get", "svc", "demo", "-o", "json"]);
    assert_eq!(svc["spec"]["selector"], serde_json::json!({"app": "demo"}));
    let cluster_ip: std::net::Ipv4Addr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    assert!(
        "10.96.0.0/16".parse::<ipnet::Ipv4Net>().unwrap().contains(&cluster_ip),
        "{svc}"
    );
    ok(&["run", "nginx", "--image=nginx", "--port=80", "--expose"]);
    let nginx = json(&["get", "svc", "nginx", "-o", "json"]);
    assert_eq!(nginx["spec"]["selector"], serde_json::json!({"run": "nginx"}));
    assert!(
        nginx["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.96.")),
        "{nginx}"
    );
    assert_eq!(
        json(&["get", "pod", "nginx", "-o", "json"])["status"]["phase"],
        "Pending"
    );
    // `create service` sends protobuf too.
    ok(&["create", "service", "clusterip", "s1", "--tcp=80:8080"]);
    let s1 = json(&["get", "svc", "s1", "-o", "json"]);
    assert_eq!(
        s1["spec"]["ports"],
        serde_json::json!([{"name": "80-8080", "protocol": "TCP", "port": 80, "targetPort": 8080}])
    );

    // What the lab's controllers and kubelets would write: a node, a running pod, a slice.
    let objects = home.path().join("cluster.yaml");
    std::fs::write(
        &objects,
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: kn1\nstatus:\n  conditions: [{type: Ready, status: \"True\"}]\n\
         \x20 addresses: [{type: InternalIP, address: 10.0.0.1}]\n\
         \x20 nodeInfo: {kubeletVersion: v1.32.0, osImage: Debian, kernelVersion: 6.1.0, containerRuntimeVersion: \"containerd://1.7\"}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: demo-1\n  labels: {app: demo}\nspec:\n  nodeName: kn1\n  containers: [{name: nginx, image: nginx}]\n\
         status:\n  phase: Running\n  podIPs: [{ip: 10.244.1.5}]\n\
         \x20 containerStatuses: [{name: nginx, ready: true, restartCount: 0, image: nginx, imageID: \"\", state: {running: {}}}]\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: demo-2\n  labels: {app: demo}\nspec:\n  containers: [{name: nginx, image: nginx}]\n\
         status:\n  phase: Pending\n\
         \x20 containerStatuses: [{name: nginx, ready: false, restartCount: 0, image: nginx, imageID: \"\", state: {waiting: {reason: ErrImagePull}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: demo-abc\n  labels: {kubernetes.io/service-name: demo}\n\
         addressType: IPv4\nports: [{port: 80, protocol: TCP}]\nendpoints:\n\
         - {addresses: [10.244.1.5], conditions: {ready: true}, nodeName: kn1, targetRef: {kind: Pod, namespace: default, name: demo-1}}\n\
         - {addresses: [10.244.2.7], conditions: {ready: true}}\n- {addresses: [10.244.2.8]}\n- {addresses: [10.244.3.9]}\n\
         - {addresses: [10.244.3.10], conditions: {ready: false}}\n",
    )
    .unwrap();
    ok(&["create", "-f", objects.to_str().unwrap()]);

    let table = ok(&["get", "pods", "-o", "wide"]);
    assert_eq!(
        header(&table),
        "NAME READY STATUS RESTARTS AGE IP NODE NOMINATED NODE READINESS GATES"
    );
    let demo1 = row(&table, "demo-1");
    assert_eq!(demo1[1..4], ["1/1", "Running", "0"]);
    assert_eq!(demo1[5..], ["10.244.1.5", "kn1", "<none>", "<none>"]);
    assert_eq!(row(&table, "demo-2")[1..3], ["0/1", "ErrImagePull"]);
    assert_eq!(row(&table, "nginx")[1..3], ["0/1", "Pending"]);
    let table = ok(&["get", "pods", "-A", "-l", "app=demo"]);
    assert_eq!(header(&table), "NAMESPACE NAME READY STATUS RESTARTS AGE");
    assert_eq!(row(&table, "default")[1], "demo-1");
    assert!(!table.contains("nginx"), "{table}");
    let table = ok(&["get", "pod", "demo-1"]);
    assert_eq!(row(&table, "demo-1")[1..3], ["1/1", "Running"]);
    let names = ok(&["get", "pods", "-o", "name"]);
    assert!(names.contains("pod/demo-1") && names.contains("pod/nginx"), "{names}");

    // Endpoints, mirrored from the slice; read-only; gone with their Service.
    let table = ok(&["get", "endpoints"]);
    assert_eq!(header(&table), "NAME ENDPOINTS AGE");
    assert_eq!(
        row(&table, "demo")[1..5],
        ["10.244.1.5:80,10.244.2.7:80,10.244.2.8:80", "+", "1", "more..."]
    );
    assert_eq!(row(&table, "nginx")[1], "<none>");
    let endpoints = json(&["get", "endpoints", "demo", "-o", "json"]);
    assert_eq!(
        endpoints["subsets"][0]["addresses"][0],
        serde_json::json!({"ip": "10.244.1.5", "nodeName": "kn1", "targetRef": {"kind": "Pod", "namespace": "default", "name": "demo-1"}})
    );
    assert_eq!(
        endpoints["subsets"][0]["notReadyAddresses"],
        serde_json::json!([{"ip": "10.244.3.10"}])
    );
    assert_eq!(
        endpoints["subsets"][0]["ports"],
        serde_json::json!([{"port": 80, "protocol": "TCP"}])
    );
    let (written, out) = run(&["delete", "endpoints", "demo"]);
    assert!(!written && out.contains("MethodNotAllowed"), "{out}");
    ok(&[
        "patch",
        "endpointslice",
        "demo-abc",
        "--type=merge",
        "-p",
        "{\"endpoints\": [{\"addresses\": [\"10.244.9.9\"]}]}",
    ]);
    assert_eq!(row(&ok(&["get", "ep", "demo"]), "demo")[1], "10.244.9.9:80");
    ok(&["delete", "service", "nginx"]);
    let (found, out) = run(&["get", "endpoints", "nginx"]);
    assert!(!found && out.contains("NotFound"), "{out}");

    let table = ok(&["get", "svc", "-o", "wide"]);
    assert_eq!(header(&table), "NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE SELECTOR");
    let demo_svc = row(&table, "demo");
    assert_eq!(
        demo_svc[..5],
        ["demo", "ClusterIP", &cluster_ip.to_string(), "<none>", "80/TCP"]
    );
    assert_eq!(demo_svc[6], "app=demo");
    let table = ok(&["get", "nodes", "-o", "wide"]);
    assert_eq!(
        header(&table),
        "NAME STATUS ROLES AGE VERSION INTERNAL-IP EXTERNAL-IP OS-IMAGE KERNEL-VERSION CONTAINER-RUNTIME"
    );
    let kn1 = row(&table, "kn1");
    assert_eq!(kn1[1..3], ["Ready", "<none>"]);
    assert_eq!(
        kn1[4..],
        ["v1.32.0", "10.0.0.1", "<none>", "Debian", "6.1.0", "containerd://1.7"]
    );
    let table = ok(&["get", "endpointslices"]);
    assert_eq!(row(&table, "demo-abc")[1..4], ["IPv4", "80", "10.244.9.9"]);
    assert_eq!(row(&ok(&["get", "namespaces"]), "default")[1], "Active");
    // Output formats that are not tables still get the objects.
    assert_eq!(
        ok(&["get", "deploy", "demo", "-o", "jsonpath={.spec.replicas}"]).trim(),
        "3"
    );
    assert!(ok(&["get", "deploy", "-o", "yaml"]).contains("kind: List"));

    // A watch prints rows as changes come (a Table per event).
    let watch_out = home.path().join("watch.out");
    let mut watcher = ns.spawn(
        Command::new("timeout")
            .args(["20", "kubectl", "get", "pods", "-w"])
            .env("HOME", home.path())
            .env("KUBECONFIG", &config)
            .stdout(std::fs::File::create(&watch_out).unwrap())
            .stderr(std::process::Stdio::null()),
    );
    let printed = |what: &str| {
        wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(&watch_out).ok().filter(|o| o.contains(what))
        })
    };
    assert!(printed("demo-2").is_some(), "the watch's first list");
    ok(&["run", "late", "--image=nginx"]);
    let seen = printed("late");
    let _ = watcher.kill();
    let _ = watcher.wait();
    let seen = seen.expect("the watch printed the new pod");
    assert_eq!(row(&seen, "late")[1..3], ["0/1", "Pending"], "{seen}");

    // `delete deployment` deletes at once (kubectl asks for background propagation; the stand-in
    // has no garbage collector): pods and the Service stay.
    ok(&["delete", "deployment", "demo"]);
    let (found, out) = run(&["get", "deploy", "demo"]);
    assert!(!found && out.contains("NotFound"), "{out}");
    ok(&["get", "pod", "demo-1"]);
    ok(&["get", "svc", "demo"]);
}
