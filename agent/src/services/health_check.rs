//! `healthCheckNodePort`s. A LoadBalancer Service with `externalTrafficPolicy: Local` tells the
//! cloud's load balancer which nodes have its endpoints: each node answers on the Service's
//! health check port, as kube-proxy does, `200` with the number of local endpoints when it has
//! some and `503` when it has none (or its service datapath is stale), with kube-proxy's JSON body
//! `{"service": {"namespace", "name"}, "localEndpoints", "serviceProxyHealthy"}`.
//!
//! [`wanted`] (pure) says which port a Service needs and its local endpoint count;
//! [`HealthCheckServers`] starts a server per port on the node's InternalIPs, updates its count in
//! place, and stops it when the Service no longer needs it. A server that could not bind (the
//! port held by another process, an address not yet up) is started again at the next sync.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse};
use tokio::task::AbortHandle;
use tracing::warn;

use super::{
    http::Health,
    objects::{EndpointSlice, Service},
    table::ServiceRef,
};

/// What one health check port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceRef,
    pub local_endpoints: usize,
}

/// The health check port `service` needs on `node`, and what it reports (pure): none unless it is
/// a LoadBalancer Service with `externalTrafficPolicy: Local` and a `healthCheckNodePort`. Local
/// endpoints are this node's ready ones, each address counted once.
pub fn wanted(
    svc: &ServiceRef,
    service: &Service,
    slices: &[Arc<EndpointSlice>],
    node: &str,
) -> Option<(u16, HealthCheck)> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") || spec.external_traffic_policy.as_deref() != Some("Local") {
        return None;
    }
    let port = u16::try_from(spec.health_check_node_port?).ok().filter(|p| *p != 0)?;
    // A dual-stack pod is one endpoint in each family's slices: counted per family (as
    // kube-proxy's per-family proxiers do), the larger count is the answer.
    let count = |family: &str| {
        slices
            .iter()
            .filter(|s| s.address_type == family)
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.node_name.as_deref() == Some(node))
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().map(String::as_str))
            .collect::<BTreeSet<&str>>()
            .len()
    };
    Some((
        port,
        HealthCheck {
            service: svc.clone(),
            local_endpoints: count("IPv4").max(count("IPv6")),
        },
    ))
}

/// kube-proxy's answer for `check` (pure): the status and the JSON body.
pub fn answer(check: &HealthCheck, proxy_healthy: bool) -> (StatusCode, serde_json::Value) {
    let body = serde_json::json!({
        "service": {"namespace": check.service.namespace, "name": check.service.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let code = if check.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

struct Running {
    check: Arc<Mutex<HealthCheck>>,
    /// The server on each address.
    servers: BTreeMap<IpAddr, AbortHandle>,
}

impl Running {
    fn stop(&self) {
        for server in self.servers.values() {
            server.abort();
        }
    }
}

/// The running health check servers, by port.
#[derive(Default)]
pub struct HealthCheckServers {
    running: BTreeMap<u16, Running>,
}

impl HealthCheckServers {
    /// Makes the servers match `wanted`: each port gets a server on each of `addresses` (the
    /// node's InternalIPs), known ones their new count, gone ones stop; a server that ended (it
    /// could not bind) is started again, and one on an address the node no longer has stops.
    /// Must run inside the agent's runtime.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>, addresses: &[IpAddr], health: &Arc<Health>) {
        self.running.retain(|port, running| {
            let keep = wanted.contains_key(port);
            if !keep {
                running.stop();
            }
            keep
        });
        for (port, check) in wanted {
            let running = self.running.entry(*port).or_insert_with(|| Running {
                check: Arc::new(Mutex::new(check.clone())),
                servers: BTreeMap::new(),
            });
            if let Ok(mut current) = running.check.lock()
                && *current != *check
            {
                *current = check.clone();
            }
            running.servers.retain(|ip, server| {
                let keep = addresses.contains(ip) && !server.is_finished();
                if !keep {
                    server.abort();
                }
                keep
            });
            for ip in addresses {
                if running.servers.contains_key(ip) {
                    continue;
                }
                let addr = SocketAddr::new(*ip, *port);
                let state = (running.check.clone(), health.clone());
                let server = tokio::spawn(async move {
                    if let Err(e) = serve(addr, state).await {
                        warn!("health check port {addr}: {e} (tried again at the next sync)");
                    }
                })
                .abort_handle();
                running.servers.insert(*ip, server);
            }
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> BTreeSet<u16> {
        self.running.keys().copied().collect()
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.stop();
        }
    }
}

type ServerState = (Arc<Mutex<HealthCheck>>, Arc<Health>);

async fn respond(State((check, health)): State<ServerState>) -> impl IntoResponse {
    let check = check.lock().map(|c| c.clone()).ok();
    let Some(check) = check else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "application/json")],
            String::new(),
        );
    };
    let (code, body) = answer(&check, health.healthy());
    (code, [("content-type", "application/json")], body.to_string())
}

async fn serve(addr: SocketAddr, state: ServerState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // Any path, as kube-proxy's server answers.
    let app = Router::new().fallback(respond).with_state(state);
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::EndpointConditions;

    use super::*;
    use crate::services::objects::{Endpoint, Meta as ObjectMeta, ServiceSpec};

    fn lb(policy: &str, port: Option<i32>) -> Service {
        Service {
            metadata: ObjectMeta::default(),
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                external_traffic_policy: Some(policy.into()),
                health_check_node_port: port,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn endpoint(addr: &str, node: &str, ready: bool) -> Endpoint {
        Endpoint {
            addresses: vec![addr.into()],
            node_name: Some(node.into()),
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn local_ready_endpoints_are_counted_once_and_answered_as_kube_proxy_does() {
        let svc = ServiceRef {
            namespace: "default".into(),
            name: "lb".into(),
        };
        let slice = |family: &str, endpoints: Vec<Endpoint>| {
            Arc::new(EndpointSlice {
                address_type: family.into(),
                endpoints,
                ..Default::default()
            })
        };
        let slices = [
            slice(
                "IPv4",
                vec![
                    endpoint("10.244.1.2", "n1", true),
                    endpoint("10.244.1.3", "n1", false),
                    endpoint("10.244.2.2", "n2", true),
                ],
            ),
            slice("IPv4", vec![endpoint("10.244.1.2", "n1", true)]),
            // The same pod's IPv6 address: the same endpoint.
            slice("IPv6", vec![endpoint("fd00:244:1::2", "n1", true)]),
        ];
        let (port, check) = wanted(&svc, &lb("Local", Some(31000)), &slices, "n1").unwrap();
        assert_eq!((port, check.local_endpoints), (31000, 1));
        let (code, body) = answer(&check, true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "default", "name": "lb"}, "localEndpoints": 1, "serviceProxyHealthy": true})
        );
        assert_eq!(answer(&check, false).0, StatusCode::SERVICE_UNAVAILABLE);
        let (_, none) = wanted(&svc, &lb("Local", Some(31000)), &slices, "n3").unwrap();
        assert_eq!(answer(&none, true).0, StatusCode::SERVICE_UNAVAILABLE);
        // Cluster policy, no port, or not a LoadBalancer: no server.
        assert!(wanted(&svc, &lb("Cluster", Some(31000)), &slices, "n1").is_none());
        assert!(wanted(&svc, &lb("Local", None), &slices, "n1").is_none());
        let mut node_port = lb("Local", Some(31000));
        node_port.spec.as_mut().unwrap().type_ = Some("NodePort".into());
        assert!(wanted(&svc, &node_port, &slices, "n1").is_none());
    }

    /// The status line of a GET to `addr`, or the error.
    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok(text.lines().next().unwrap_or_default().to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_port_that_could_not_be_bound_is_served_once_it_is_free() {
        // Another process holds the port: the server cannot bind.
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = squatter.local_addr().unwrap();
        let check = HealthCheck {
            service: ServiceRef {
                namespace: "default".into(),
                name: "lb".into(),
            },
            local_endpoints: 2,
        };
        let wanted: BTreeMap<u16, HealthCheck> = [(addr.port(), check)].into();
        let health = Arc::new(Health::new(std::time::Duration::from_secs(60)));
        health.updated();
        let mut servers = HealthCheckServers::default();
        servers.sync(&wanted, &[addr.ip()], &health);
        // The squatter answers nothing: its connection is accepted by the kernel, never served.
        let first = tokio::time::timeout(std::time::Duration::from_millis(300), get(addr)).await;
        assert!(!matches!(first, Ok(Ok(ref line)) if line.contains("200")), "{first:?}");
        drop(squatter);
        // Each sync after the port is free tries again, until the server answers.
        let mut answered = String::new();
        for _ in 0..50 {
            servers.sync(&wanted, &[addr.ip()], &health);
            if let Ok(Ok(line)) = tokio::time::timeout(std::time::Duration::from_millis(200), get(addr)).await {
                answered = line;
                if answered.contains("200") {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(answered.contains("200 OK"), "{answered:?}");
        // An address the node no longer has: its server stops.
        servers.sync(&wanted, &[], &health);
        let gone = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while get(addr).await.is_ok() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(gone.is_ok(), "the server on a removed address kept answering");
    }
}
