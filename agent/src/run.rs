//! The agent's main loop: watch Nodes, compute the desired state (pure), apply the differences.
//!
//! Data flows one way: the reflector's store of Node objects, then `topology` and `cniconf`
//! (pure), then `routing`, `cniconf` and `masquerade` applying differences to the node. When the
//! API server goes away the watcher retries with backoff and the node keeps its current state:
//! nothing is torn down for lack of news. SIGTERM stops the agent and leaves the data path as it
//! is, so pods keep their connectivity across agent restarts and upgrades.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::{signal::unix::SignalKind, sync::Notify};
use tracing::{info, warn};

use crate::{
    cniconf::{self, CniPaths},
    ipam_gc, kernel_paths, masquerade,
    routing::{self, Router, VxlanSettings},
    status::{self, AgentStatus},
    topology::{self, NodeInfo, RoutingMode},
};

/// Everything the agent is configured with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub cni: CniPaths,
    pub network: String,
    pub ipam_data_dir: PathBuf,
    pub state_dir: PathBuf,
    pub mode: RoutingMode,
    pub uplink: Option<String>,
    pub vxlan: VxlanSettings,
    pub masquerade: bool,
    pub cluster_cidrs: Vec<IpNet>,
    pub resync: Duration,
    pub ipam_gc_interval: Duration,
    pub ipam_gc_grace: Duration,
    /// Where the node's `/proc/sys/net` is writable (for IP forwarding).
    pub proc_sys_net: PathBuf,
    /// The bpffs directory the datapath pins its maps in.
    pub bpf_pin_path: PathBuf,
    /// The cgroup v2 directory the datapath's socket programs attach to.
    pub cgroup_path: PathBuf,
}

/// A client from `--kubeconfig`, or the in-cluster service account.
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::incluster().context("in-cluster config (or pass --kubeconfig)")?,
    };
    Ok(Client::try_from(config)?)
}

/// Turns the Node objects into the node's desired state and applies it.
pub struct Reconciler {
    cfg: AgentConfig,
    router: Router,
    applied_ruleset: Option<String>,
}

impl Reconciler {
    pub fn new(cfg: AgentConfig) -> Result<Self> {
        let router = Router::new(cfg.vxlan.clone())?;
        Ok(Self {
            cfg,
            router,
            applied_ruleset: None,
        })
    }

    /// One pass. Never panics on what the API server says; problems become warnings.
    pub fn reconcile(&mut self, objects: &[Arc<Node>]) -> AgentStatus {
        let mut st = AgentStatus {
            node: self.cfg.node_name.clone(),
            conflist: self.cfg.cni.conflist(),
            mode: Some(self.cfg.mode),
            last_sync_unix: status::now_unix(),
            ..Default::default()
        };
        let mut nodes: Vec<NodeInfo> = Vec::new();
        for object in objects {
            let (info, warnings) = topology::node_info(object);
            st.warnings.extend(warnings);
            nodes.extend(info);
        }
        if let Err(e) = self.reconcile_nodes(&nodes, &mut st) {
            warn!("reconcile: {e:#}");
            st.last_error = Some(format!("{e:#}"));
        }
        st.cni_ready = st.conflist.exists();
        match kernel_paths::prepare_pin_path(&self.cfg.bpf_pin_path) {
            Ok(()) => st.bpf_pin_path = Some(self.cfg.bpf_pin_path.clone()),
            Err(e) => st.warnings.push(format!("{e:#}")),
        }
        match kernel_paths::check_cgroup2(&self.cfg.cgroup_path) {
            Ok(()) => st.cgroup_path = Some(self.cfg.cgroup_path.clone()),
            Err(e) => st.warnings.push(format!("{e:#}")),
        }
        for w in &st.warnings {
            warn!("{w}");
        }
        if let Err(e) = status::write(&self.cfg.state_dir, &st) {
            warn!("writing status: {e:#}");
        }
        st
    }

    fn reconcile_nodes(&mut self, nodes: &[NodeInfo], st: &mut AgentStatus) -> Result<()> {
        let local = nodes.iter().find(|n| n.name == self.cfg.node_name).with_context(|| {
            format!(
                "node {} is not (yet) in the API; keeping the current state",
                self.cfg.node_name
            )
        })?;
        st.pod_cidrs = local.pod_cidrs.clone();
        // Without its own address the node cannot place itself: change nothing until it has one.
        if local.internal_ips.is_empty() {
            anyhow::bail!("node {} has no InternalIP (yet); keeping the current state", local.name);
        }
        let uplink = self.router.uplink(self.cfg.uplink.as_deref(), &local.internal_ips)?;
        let underlay_v6 = local.internal_ip(true).is_none() && local.internal_ip(false).is_some();
        let mtu = topology::pod_mtu(uplink.mtu, self.cfg.mode, underlay_v6);
        st.pod_mtu = Some(mtu);

        // The CNI first: pods on this node need it whatever happens to the routes.
        if let Some(conflist) = cniconf::conflist(local, &self.cfg.network, mtu, &self.cfg.ipam_data_dir)
            && cniconf::install_conflist(&self.cfg.cni, &conflist)?
        {
            info!(
                "wrote {} (podCIDRs {:?}, mtu {mtu})",
                self.cfg.cni.conflist().display(),
                local.pod_cidrs
            );
        }
        if let Err(e) = routing::enable_forwarding(
            &self.cfg.proc_sys_net,
            local.pod_cidrs.iter().any(|c| c.addr().is_ipv6()),
        ) {
            st.warnings.push(format!("{e:#}"));
        }

        let plan = topology::plan_routes(local, nodes, self.cfg.mode, &uplink.connected);
        st.warnings.extend(plan.warnings.iter().cloned());
        let (changes, warnings) = self.router.apply(&plan, &uplink)?;
        st.warnings.extend(warnings);
        if changes.total() > 0 {
            info!("applied {changes:?} for {} peers", plan.peers.len());
        }
        st.last_changes = changes;
        st.peers = plan.peers.clone();
        st.vxlan = plan.vxlan.clone();
        st.uplink = Some(uplink);

        if self.cfg.masquerade {
            let cluster = topology::cluster_cidrs(&self.cfg.cluster_cidrs, local, &plan);
            let ruleset = masquerade::ruleset(&cluster);
            if self.applied_ruleset.as_deref() != Some(ruleset.as_str()) {
                masquerade::apply(&ruleset)?;
                info!("masquerading egress from {cluster:?}");
                self.applied_ruleset = Some(ruleset);
            }
            st.masquerade = Some(cluster);
        } else if self.applied_ruleset.as_deref() != Some("") {
            // Turned off: a table an earlier run left would go on masquerading.
            masquerade::remove()?;
            info!("not masquerading egress (removed any table inet {})", masquerade::TABLE);
            self.applied_ruleset = Some(String::new());
        }
        Ok(())
    }
}

/// Writes the CNI's binaries and conflist once and returns (the init container's job). Needs the
/// API for the node's PodCIDRs; waits for them for at most `wait`. Touches nothing else: during
/// an upgrade the node's routes stay exactly as the running data path has them.
pub async fn install_cni(cfg: &AgentConfig, wait: Duration) -> Result<()> {
    let installed = cniconf::install_binaries(&cfg.cni)?;
    info!("installed {installed:?} into {}", cfg.cni.bin_dir.display());
    let client = client(cfg.kubeconfig.as_ref()).await?;
    let nodes: Api<Node> = Api::all(client);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match nodes.get_opt(&cfg.node_name).await {
            Ok(Some(node)) => {
                let (info, warnings) = topology::node_info(&node);
                warnings.iter().for_each(|w| warn!("{w}"));
                if let Some(local) = info.filter(|i| !i.pod_cidrs.is_empty()) {
                    let conflist = tokio::task::block_in_place(|| conflist_for(cfg, &local))?;
                    cniconf::install_conflist(&cfg.cni, &conflist)?;
                    info!("wrote {}", cfg.cni.conflist().display());
                    return Ok(());
                }
                warn!("node {} has no podCIDR yet", cfg.node_name);
            }
            Ok(None) => warn!("node {} is not in the API yet", cfg.node_name),
            Err(e) => warn!("getting node {}: {e}", cfg.node_name),
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("node {} has no podCIDR after {wait:?}", cfg.node_name);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The conflist for `local`, with the pod MTU from the uplink (looked up, not changed).
fn conflist_for(cfg: &AgentConfig, local: &NodeInfo) -> Result<serde_json::Value> {
    let uplink = Router::new(cfg.vxlan.clone())?.uplink(cfg.uplink.as_deref(), &local.internal_ips)?;
    let underlay_v6 = local.internal_ip(true).is_none() && local.internal_ip(false).is_some();
    let mtu = topology::pod_mtu(uplink.mtu, cfg.mode, underlay_v6);
    cniconf::conflist(local, &cfg.network, mtu, &cfg.ipam_data_dir).context("the node has no podCIDR")
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    match cniconf::install_binaries(&cfg.cni) {
        Ok(installed) if !installed.is_empty() => info!("installed {installed:?} into {}", cfg.cni.bin_dir.display()),
        Ok(_) => {}
        Err(e) => warn!("installing CNI binaries: {e:#}"),
    }
    let client = client(cfg.kubeconfig.as_ref()).await?;
    let api: Api<Node> = Api::all(client);
    let (reader, writer) = reflector::store::<Node>();
    let changed = Arc::new(Notify::new());
    let notify = changed.clone();
    let watch = reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
    let watch_task = tokio::spawn(async move {
        let mut watch = std::pin::pin!(watch);
        while let Some(event) = watch.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!("watching nodes (retrying with backoff, keeping the current state): {e}"),
            }
        }
    });

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    info!("waiting for the first list of nodes from the API server");
    tokio::select! {
        ready = reader.wait_until_ready() => ready?,
        _ = sigterm.recv() => return Ok(()),
        _ = sigint.recv() => return Ok(()),
    }
    let mut reconciler = Reconciler::new(cfg.clone())?;
    let mut resync = tokio::time::interval(cfg.resync);
    let mut gc = tokio::time::interval(cfg.ipam_gc_interval);
    gc.tick().await;
    let mut gc_task: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = changed.notified() => {
                // Let a burst of events settle into one reconcile.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = resync.tick() => {}
            _ = gc.tick() => {
                // In the background: the store lock may be held for a while, and neither syncs
                // nor SIGTERM should wait for it. One collection at a time.
                if gc_task.as_ref().is_none_or(|t| t.is_finished()) {
                    let (dir, net, grace) = (cfg.ipam_data_dir.clone(), cfg.network.clone(), cfg.ipam_gc_grace);
                    gc_task = Some(tokio::task::spawn_blocking(move || match ipam_gc::collect(&dir, &net, grace) {
                        Ok(released) if !released.is_empty() => {
                            let who: Vec<String> = released.iter().map(|a| format!("{}/{}", a.container_id, a.ifname)).collect();
                            info!("IPAM GC released addresses of vanished pods: {who:?}");
                        }
                        Ok(_) => {}
                        Err(e) => warn!("IPAM GC: {e:#}"),
                    }));
                }
                continue;
            }
        }
        let nodes = reader.state();
        tokio::task::block_in_place(|| reconciler.reconcile(&nodes));
    }
    info!("stopping; the data path stays as it is");
    watch_task.abort();
    Ok(())
}

/// Removes what the agent installed: conflist and binaries, its routes and VXLAN device, and its
/// nftables table. Pod veths and IPAM state are left to the pods' own DELs.
pub fn uninstall(cfg: &AgentConfig) -> Result<()> {
    let mut errors = Vec::new();
    if let Err(e) = cniconf::uninstall(&cfg.cni) {
        errors.push(format!("{e:#}"));
    }
    match Router::new(cfg.vxlan.clone()) {
        Ok(mut router) => {
            if let Err(e) = router.teardown() {
                errors.push(format!("{e:#}"));
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    if let Err(e) = masquerade::remove() {
        errors.push(format!("{e:#}"));
    }
    let _ = std::fs::remove_file(status::path(&cfg.state_dir));
    if !errors.is_empty() {
        anyhow::bail!("uninstall: {}", errors.join("; "));
    }
    Ok(())
}
