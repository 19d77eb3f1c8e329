//! The agent: its configuration, and the supervised tasks it runs.
//!
//! Data flows one way. Reflectors ([`crate::watch`]) publish read-only views of the cluster; each
//! controller turns the view it depends on into a desired state (pure), diffs it against what the
//! kernel or disk holds (pure), and applies the difference. When the API server goes away the
//! watchers retry with backoff and the node keeps its state: nothing is torn down for lack of
//! news. SIGTERM stops the agent and leaves the datapath as it is, so pods keep their
//! connectivity across agent restarts and upgrades.
use std::{path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tokio::signal::unix::SignalKind;
use tracing::{info, warn};

use crate::{
    cni_config::{self, CniConfigConfig, CniConfigError},
    ipam_gc::{self, IpamGcConfig},
    node::{
        controller::{self as node_controller, NodeNetworkingConfig, NodeNetworkingError},
        topology,
    },
    services::{
        controller::{self as services_controller, ServicesConfig},
        http::Health,
        metrics::ServiceMetrics,
    },
    status::{SectionName, StatusHandle},
    supervisor::Supervisor,
    warning::ErrorList,
    watch::{self, ClientError, NodesView},
};

/// Everything the agent is configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub node: NodeNetworkingConfig,
    pub cni: CniConfigConfig,
    pub ipam_gc: IpamGcConfig,
    pub services: ServicesConfig,
}

/// Why the agent could not run (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("creating {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    CniConfig(#[from] CniConfigError),
    #[error("node {node} has no podCIDR after {waited:?}")]
    NoPodCidr { node: String, waited: Duration },
    #[error("uninstall: {0}")]
    Uninstall(String),
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    match cni_config::install_binaries(&cfg.cni.paths) {
        Ok(installed) if !installed.is_empty() => {
            info!("installed {installed:?} into {}", cfg.cni.paths.bin_dir.display())
        }
        Ok(_) => {}
        Err(e) => warn!("installing CNI binaries: {e}"),
    }
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;

    let status = StatusHandle::new(&cfg.node_name);
    // Who held which PodCIDR, as the last run recorded it: a PodCIDR conflict that began before
    // this restart is still decided for the node that held it then.
    if let Ok(last) = crate::status::read(&cfg.state_dir) {
        let held = last.node_networking.details;
        status.update(|s| {
            s.node_networking.details.peers = held.peers;
            s.node_networking.details.disputes = held.disputes;
        });
    }
    let writer = tokio::spawn(status.clone().write_changes(cfg.state_dir.clone()));
    let client = watch::client(cfg.kubeconfig.as_ref()).await?;
    let service_client = client.clone();
    let (nodes_tx, nodes_rx) = tokio::sync::watch::channel(Arc::new(NodesView::default()));

    let mut supervisor = Supervisor::new(status.clone());
    {
        let status = status.clone();
        supervisor.spawn(SectionName::Watches, move || {
            watch::watch_nodes(client.clone(), nodes_tx.clone(), status.clone())
        });
    }
    {
        let (cfg, nodes, status) = (Arc::new(cfg.node.clone()), nodes_rx.clone(), status.clone());
        supervisor.spawn(SectionName::NodeNetworking, move || {
            node_controller::run(cfg.clone(), nodes.clone(), status.clone())
        });
    }
    {
        let (cfg, nodes, status) = (Arc::new(cfg.cni.clone()), nodes_rx.clone(), status.clone());
        supervisor.spawn(SectionName::CniConfig, move || {
            cni_config::run(cfg.clone(), nodes.clone(), status.clone())
        });
    }
    {
        let (cfg, status) = (Arc::new(cfg.ipam_gc.clone()), status.clone());
        supervisor.spawn(SectionName::IpamGc, move || ipam_gc::run(cfg.clone(), status.clone()));
    }
    {
        let (cfg, nodes, status, client) = (
            Arc::new(cfg.services.clone()),
            nodes_rx.clone(),
            status.clone(),
            service_client,
        );
        let metrics = Arc::new(ServiceMetrics::default());
        let health = Arc::new(Health::new(cfg.resync.max(Duration::from_secs(30)) * 2));
        supervisor.spawn(SectionName::Services, move || {
            services_controller::run(
                cfg.clone(),
                client.clone(),
                nodes.clone(),
                status.clone(),
                metrics.clone(),
                health.clone(),
            )
        });
    }
    info!("agent for node {} started", cfg.node_name);
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
        () = supervisor.join_next() => {}
    }
    info!("stopping; the datapath stays as it is");
    drop(supervisor);
    drop(status);
    // The writer ends once every handle is gone; give it a moment to write the last change.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    Ok(())
}

/// Writes the CNI's binaries and conflist once and returns (the init container's job). Needs the
/// API for the node's PodCIDRs; waits for them for at most `wait`. Touches nothing else: during
/// an upgrade the node's routes stay exactly as the running datapath has them.
pub async fn install_cni(cfg: &AgentConfig, wait: Duration) -> Result<(), AgentError> {
    let installed = cni_config::install_binaries(&cfg.cni.paths)?;
    info!("installed {installed:?} into {}", cfg.cni.paths.bin_dir.display());
    let client = watch::client(cfg.kubeconfig.as_ref()).await?;
    let nodes: Api<Node> = Api::all(client);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match nodes.get_opt(&cfg.node_name).await {
            Ok(Some(node)) => {
                let (info, warnings) = topology::node_info(&node);
                warnings.iter().for_each(|w| warn!("{w}"));
                if let Some(local) = info.filter(|i| !i.pod_cidrs.is_empty()) {
                    let cni = cfg.cni.clone();
                    let conflist = tokio::task::spawn_blocking(move || {
                        let mtu = cni_config::pod_mtu(cni.uplink.as_deref(), cni.mode, &local)?;
                        Ok::<_, CniConfigError>(cni_config::conflist(
                            &local,
                            &cni.network,
                            mtu,
                            &cni.ipam_data_dir,
                            cni.datapath_pins.as_deref(),
                        ))
                    })
                    .await
                    .map_err(CniConfigError::from)??;
                    if let Some(conflist) = conflist {
                        cni_config::install_conflist(&cfg.cni.paths, &conflist)?;
                        info!("wrote {}", cfg.cni.paths.conflist().display());
                        return Ok(());
                    }
                }
                warn!("node {} has no podCIDR yet", cfg.node_name);
            }
            Ok(None) => warn!("node {} is not in the API yet", cfg.node_name),
            Err(e) => warn!("getting node {}: {e}", cfg.node_name),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(AgentError::NoPodCidr {
                node: cfg.node_name.clone(),
                waited: wait,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Removes everything service translation made (links, programs, maps and their pins, the
/// notes), reporting each failure: `ferrynet-agent cleanup`.
pub fn cleanup(cfg: &AgentConfig) -> Result<(), ErrorList<UninstallError>> {
    let mut errors = ErrorList::default();
    if let Err(e) = crate::datapath::cleanup(&cfg.services.bpf_pin_path) {
        errors.push(UninstallError::Datapath(e));
    }
    match std::fs::remove_dir_all(crate::services::notes::dir(&cfg.state_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => errors.push(UninstallError::Status(e)),
        _ => {}
    }
    errors.into_result()
}

/// One failure of an uninstall.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("CNI: {0}")]
    Cni(#[from] CniConfigError),
    #[error("node networking: {0}")]
    NodeNetworking(#[from] ErrorList<NodeNetworkingError>),
    #[error("status file: {0}")]
    Status(std::io::Error),
    #[error("service datapath: {0}")]
    Datapath(ErrorList<crate::datapath::DatapathError>),
}

/// Removes what the agent installed: conflist and binaries, its routes, VXLAN device and
/// firewall table, the service datapath, and its status. Pod veths and IPAM state are left to
/// the pods' own DELs. Keeps going past failures and reports them all.
pub fn uninstall(cfg: &AgentConfig) -> Result<(), ErrorList<UninstallError>> {
    let mut errors = ErrorList::default();
    if let Err(e) = cleanup(cfg) {
        errors.0.extend(e.0);
    }
    if let Err(e) = cni_config::uninstall(&cfg.cni.paths) {
        errors.push(e);
    }
    if let Err(e) = node_controller::teardown() {
        errors.push(e);
    }
    match std::fs::remove_file(crate::status::path(&cfg.state_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => errors.push(UninstallError::Status(e)),
        _ => {}
    }
    errors.into_result()
}
