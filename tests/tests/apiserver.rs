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
        for i in 0..10 {
            nodes
                .create(&pp, &node(&format!("churn{i}"), "10.250.0.0/24"))
                .await
                .unwrap();
        }
        let mut watch = nodes.watch(&WatchParams::default(), "2").await.unwrap().boxed();
        match tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
        {
            Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
            other => panic!("expected 410 Gone, got {other:?}"),
        }
        // kube-runtime's watcher handles that by listing again: the store still converges.
        nodes.delete("churn0", &Default::default()).await.unwrap();
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
        for i in 0..10 {
            nodes
                .create(&PostParams::default(), &node(&format!("away-{i}"), "10.244.3.0/24"))
                .await
                .unwrap();
        }
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
    // (kubectl's `create service` sends protobuf, which the stand-in refuses with 415: the
    // Services come from manifests.)
    let (ok, out) = run(&["create", "service", "nodeport", "np", "--tcp=80:8080"]);
    assert!(!ok && out.contains("JSON bodies only"), "{out}");
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
    let (ok, out) = node_port_service("np", None);
    assert!(ok, "{out}");
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
