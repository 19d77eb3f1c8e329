//! The agent's view of the cluster: one reflector per watched kind, feeding read-only snapshots
//! to the controllers that depend on them.
//!
//! Node objects change all the time (kubelet's status heartbeats), but the agent cares only about
//! names, creation times, addresses and PodCIDRs. The Node reflector therefore publishes a
//! projection of them ([`NodesView`]), and only when the projection changes: a heartbeat wakes
//! no controller.
use std::{path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::{sync::watch, time::Instant};
use tracing::warn;

use crate::{
    node::topology::{self, NodeInfo},
    status::StatusHandle,
    warning::Warning,
};

/// Why no API client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster config (or pass --kubeconfig): {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("API client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, or the in-cluster service account.
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let read = |source| ClientError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(read)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(read)?
        }
        None => Config::incluster()?,
    };
    Ok(Client::try_from(config)?)
}

/// What the agent knows about the cluster's nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodesView {
    /// The initial list has arrived: until then, nothing may be concluded from absence.
    pub synced: bool,
    /// Every usable node, by name.
    pub nodes: Vec<NodeInfo>,
    /// Problems with Node objects.
    pub warnings: Vec<Warning>,
}

impl NodesView {
    /// The projection of a set of Node objects (pure).
    pub fn of(objects: &[Arc<Node>]) -> Self {
        let mut view = Self {
            synced: true,
            ..Default::default()
        };
        for object in objects {
            let (info, warnings) = topology::node_info(object);
            view.warnings.extend(warnings);
            view.nodes.extend(info);
        }
        view.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        view.warnings.sort();
        view
    }

    pub fn get(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

const PROJECT_DELAY: Duration = Duration::from_millis(20);

/// Watches Nodes and publishes their projection to `tx` whenever it changes. Runs until the
/// watch stream ends (it retries with backoff on its own, so only a bug ends it); the supervisor
/// then restarts it with a fresh list.
pub async fn watch_nodes(
    client: Client,
    tx: watch::Sender<Arc<NodesView>>,
    status: StatusHandle,
) -> Result<(), WatchEnded> {
    let (reader, writer) = reflector::store::<Node>();
    let stream = reflector(
        writer,
        watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff(),
    );
    let mut stream = std::pin::pin!(stream);
    // Events come one at a time; a burst (a relist, many heartbeats) is projected once, 20 ms
    // after its first event, so a steady stream is still projected every 20 ms.
    let mut dirty_since: Option<Instant> = None;
    // Until the initial list is complete, absence means nothing.
    let mut listed = false;
    loop {
        let next = match dirty_since {
            Some(since) => {
                let wait = PROJECT_DELAY.saturating_sub(since.elapsed());
                tokio::time::timeout(wait, stream.next()).await
            }
            None => Ok(stream.next().await),
        };
        match next {
            Ok(Some(Ok(event))) => {
                listed |= matches!(event, watcher::Event::InitDone);
                dirty_since.get_or_insert_with(Instant::now);
            }
            Ok(Some(Err(e))) => {
                warn!("watching nodes (retrying with backoff, keeping the current state): {e}");
                continue;
            }
            Ok(None) => return Err(WatchEnded("nodes")),
            Err(_elapsed) => {}
        }
        if dirty_since.is_some_and(|since| since.elapsed() >= PROJECT_DELAY) {
            dirty_since = None;
            {
                if listed {
                    let view = Arc::new(NodesView::of(&reader.state()));
                    tx.send_if_modified(|current| {
                        if **current == *view {
                            return false;
                        }
                        *current = view;
                        true
                    });
                    status.update(|s| {
                        s.watches.ready = true;
                        s.watches.last_error = None;
                        if !s.watches.details.kinds.iter().any(|k| k == "nodes") {
                            s.watches.details.kinds.push("nodes".into());
                        }
                    });
                }
            }
        }
    }
}

/// A watch stream that ended, which it never should.
#[derive(Debug, thiserror::Error)]
#[error("the watch of {0} ended")]
pub struct WatchEnded(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    fn node(name: &str, heartbeat: &str) -> Arc<Node> {
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(vec!["10.244.1.0/24".into()]),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: "10.0.0.1".into(),
                }]),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    message: Some(heartbeat.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn a_heartbeat_does_not_change_the_view_but_a_pod_cidr_does() {
        let before = NodesView::of(&[node("n1", "beat 1"), node("n2", "beat 1")]);
        let heartbeat = NodesView::of(&[node("n2", "beat 2"), node("n1", "beat 2")]);
        assert_eq!(before, heartbeat);
        let mut changed = (*node("n2", "beat 2")).clone();
        changed.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.2.0/24".into()]);
        assert_ne!(before, NodesView::of(&[node("n1", "beat 2"), Arc::new(changed)]));
    }
}
