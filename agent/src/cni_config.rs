//! The CNI configuration: the plugin binaries and the conflist the runtime reads. The conflist
//! is computed from the local node's PodCIDRs and the uplink's MTU (pure), and installed
//! atomically whenever it changes. The controller task runs a pass when the local node's
//! projection changes and on every resync (an uplink MTU change has no API event).
use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ferrynet_kernel::netlink::Netlink;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::info;

use crate::{
    node::{
        routing::{self, UplinkError},
        topology::{self, NodeInfo, RoutingMode},
    },
    status::{StatusHandle, now_unix},
    watch::NodesView,
};

/// The CNI plugin binaries the agent installs.
pub const PLUGINS: [&str; 2] = ["ferrynet", "ferrynet-ipam"];
/// The conflist's file name: sorts before the usual `10-*` of other plugins' leftovers.
pub const CONFLIST_NAME: &str = "05-ferrynet.conflist";

/// Where the CNI lives on the node.
#[derive(Debug, Clone)]
pub struct CniPaths {
    /// The runtime's plugin directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The runtime's config directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// Where the agent finds the plugin binaries to install (inside its image).
    pub source_dir: PathBuf,
}

impl CniPaths {
    pub fn conflist(&self) -> PathBuf {
        self.conf_dir.join(CONFLIST_NAME)
    }
}

/// The conflist for a node: its PodCIDRs as IPAM ranges, and the MTU. `None` while the node has
/// no PodCIDR (the node is then not ready for pods, and the runtime says so).
pub fn conflist(
    local: &NodeInfo,
    network: &str,
    mtu: u32,
    ipam_data_dir: &Path,
    datapath_pins: Option<&Path>,
) -> Option<Value> {
    if local.pod_cidrs.is_empty() {
        return None;
    }
    let ranges: Vec<Value> = local
        .pod_cidrs
        .iter()
        .map(|c| json!([{ "subnet": c.to_string() }]))
        .collect();
    // Runtimes on libcni 1.2 or later run the newest version of `cniVersions` they know (1.1.0:
    // STATUS and GC). Older ones (containerd 1.6/1.7, podman 4) read only `cniVersion`, and must
    // find one they can parse the result of. The list is ferrynet alone, so no chained plugin
    // limits it.
    let mut plugin = json!({
        "type": "ferrynet",
        "mtu": mtu,
        "ipam": {"type": "ferrynet-ipam", "ranges": ranges, "dataDir": ipam_data_dir},
    });
    // With the per-packet service path on, new pods' veths get its pinned programs at ADD.
    if let Some(pins) = datapath_pins {
        plugin["datapath"] = json!({ "pinPath": pins });
    }
    Some(json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": network,
        "plugins": [plugin],
    }))
}

/// Why the CNI could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CniConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("uplink: {0}")]
    Uplink(#[from] UplinkError),
    #[error("the pass was lost: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("the nodes' view is gone")]
    ViewClosed,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CniConfigError + '_ {
    move |source| CniConfigError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How much a write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced before the rename: after a crash or power loss the file is the old or the new one
    /// (what the runtime and the kubelet read).
    Synced,
    /// Not synced: the file is never torn for readers, but a power loss may leave it empty. For
    /// notes the agent can do without, written by the thousand.
    Unsynced,
}

/// Writes `content` to `path` atomically and synced (see [`write_atomic`]), unless it is already
/// there. Returns whether it wrote.
pub fn write_if_changed(path: &Path, content: &[u8], mode: u32) -> std::io::Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    write_atomic(path, content, mode, Durability::Synced)?;
    Ok(true)
}

/// Writes `content` to `path` atomically: a temporary file in the same directory, then a rename,
/// so a reader sees the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32, durability: Durability) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    // A name nobody else uses, opened with O_EXCL: a file or symlink planted in a host
    // directory is never written through.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(
        ".{}.ferrynet-tmp-{}-{}-{nanos}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(content)?;
        if durability == Durability::Synced {
            file.sync_all()?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Copies the plugin binaries into the runtime's bin dir (atomically, skipping unchanged ones).
pub fn install_binaries(paths: &CniPaths) -> Result<Vec<String>, CniConfigError> {
    let mut installed = Vec::new();
    for plugin in PLUGINS {
        let source = paths.source_dir.join(plugin);
        let bytes = std::fs::read(&source).map_err(io_error(&source))?;
        let target = paths.bin_dir.join(plugin);
        if write_if_changed(&target, &bytes, 0o755).map_err(io_error(&target))? {
            installed.push(plugin.to_string());
        }
    }
    Ok(installed)
}

/// Writes the conflist (readable by the runtime, writable by root only).
pub fn install_conflist(paths: &CniPaths, conflist: &Value) -> Result<bool, CniConfigError> {
    let mut text = serde_json::to_vec_pretty(conflist).expect("conflist serialises");
    text.push(b'\n');
    let target = paths.conflist();
    write_if_changed(&target, &text, 0o644).map_err(io_error(&target))
}

/// Removes what the install wrote. Missing files are fine.
pub fn uninstall(paths: &CniPaths) -> Result<(), CniConfigError> {
    let mut targets = vec![paths.conflist()];
    targets.extend(PLUGINS.iter().map(|p| paths.bin_dir.join(p)));
    for target in targets {
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&target)(e)),
        }
    }
    Ok(())
}

/// What the CNI configuration controller is configured with.
#[derive(Debug, Clone)]
pub struct CniConfigConfig {
    pub node_name: String,
    pub paths: CniPaths,
    pub network: String,
    pub ipam_data_dir: PathBuf,
    pub mode: RoutingMode,
    pub uplink: Option<String>,
    pub resync: Duration,
    /// The service datapath's pin path, when new pods' veths get its programs at ADD.
    pub datapath_pins: Option<PathBuf>,
}

/// The pod MTU for `local` on this node: the uplink's, less the overlay's overhead.
pub fn pod_mtu(uplink_name: Option<&str>, mode: RoutingMode, local: &NodeInfo) -> Result<u32, CniConfigError> {
    let mut netlink = Netlink::current().map_err(CniConfigError::Socket)?;
    let uplink = routing::find_uplink(&mut netlink, uplink_name, &local.internal_ips)?;
    let underlay_v6 = local.internal_ip(true).is_none() && local.internal_ip(false).is_some();
    Ok(topology::pod_mtu(uplink.mtu, mode, underlay_v6))
}

/// Keeps the conflist in step with the local node. Runs until its input is gone.
pub async fn run(
    cfg: Arc<CniConfigConfig>,
    mut nodes: watch::Receiver<Arc<NodesView>>,
    status: StatusHandle,
) -> Result<(), CniConfigError> {
    let mut resync = tokio::time::interval(cfg.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status.update(|s| s.cni_config.details.conflist = cfg.paths.conflist());
    let mut last_local: Option<NodeInfo> = None;
    let mut resync_due = true;
    loop {
        let view = nodes.borrow_and_update().clone();
        let local = view.get(&cfg.node_name).cloned();
        // Other nodes' changes do not concern the conflist.
        if view.synced && (resync_due || local != last_local) {
            let pass_cfg = cfg.clone();
            let pass_local = local.clone();
            let outcome = tokio::task::spawn_blocking(move || pass(&pass_cfg, pass_local.as_ref())).await?;
            status.update(|s| {
                let section = &mut s.cni_config;
                section.ready = cfg.paths.conflist().exists();
                match &outcome {
                    Ok(written) => {
                        section.last_error = None;
                        if let Some((cidrs, mtu, changed)) = written {
                            section.details.pod_cidrs = cidrs.clone();
                            section.details.pod_mtu = Some(*mtu);
                            if *changed {
                                section.last_change_unix = Some(now_unix());
                            }
                        }
                    }
                    Err(e) => section.last_error = Some(e.to_string()),
                }
            });
            last_local = local;
        }
        tokio::select! {
            changed = nodes.changed() => {
                changed.map_err(|_| CniConfigError::ViewClosed)?;
                resync_due = false;
            }
            _ = resync.tick() => resync_due = true,
        }
    }
}

/// Installs the conflist for `local`, if it has a PodCIDR. Returns the PodCIDRs and MTU written,
/// and whether the file changed.
fn pass(
    cfg: &CniConfigConfig,
    local: Option<&NodeInfo>,
) -> Result<Option<(Vec<ipnet::IpNet>, u32, bool)>, CniConfigError> {
    let Some(local) = local.filter(|l| !l.pod_cidrs.is_empty()) else {
        // No PodCIDR yet: no conflist, and the runtime reports the node's network not ready.
        return Ok(None);
    };
    let mtu = pod_mtu(cfg.uplink.as_deref(), cfg.mode, local)?;
    let Some(list) = conflist(
        local,
        &cfg.network,
        mtu,
        &cfg.ipam_data_dir,
        cfg.datapath_pins.as_deref(),
    ) else {
        return Ok(None);
    };
    let changed = install_conflist(&cfg.paths, &list)?;
    if changed {
        info!(
            "wrote {} (podCIDRs {:?}, mtu {mtu})",
            cfg.paths.conflist().display(),
            local.pod_cidrs
        );
    }
    Ok(Some((local.pod_cidrs.clone(), mtu, changed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            created: None,
            internal_ips: vec!["10.0.0.1".parse().unwrap()],
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            zone: None,
        }
    }

    #[test]
    fn conflist_carries_the_pod_cidrs_and_mtu() {
        let c = conflist(
            &node(&["10.244.1.0/24", "fd00:244:1::/64"]),
            "ferrynet",
            1450,
            Path::new("/var/lib/ferrynet/ipam"),
            None,
        )
        .unwrap();
        assert_eq!(c["plugins"][0]["mtu"], 1450);
        assert_eq!(
            c["plugins"][0]["ipam"]["ranges"],
            json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:244:1::/64"}]])
        );
        assert_eq!(c["name"], "ferrynet");
        assert_eq!(c["cniVersion"], "1.0.0", "what runtimes before libcni 1.2 can use");
        assert_eq!(c["cniVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        // The conflist is valid ferrynet IPAM config.
        ferrynet_ipam::IpamConfig::from_value(&c["plugins"][0]["ipam"]).unwrap();
        assert!(conflist(&node(&[]), "ferrynet", 1450, Path::new("/x"), None).is_none());
        assert!(c["plugins"][0].get("datapath").is_none());
        let with = conflist(
            &node(&["10.244.1.0/24"]),
            "ferrynet",
            1450,
            Path::new("/x"),
            Some(Path::new("/sys/fs/bpf/ferrynet")),
        )
        .unwrap();
        assert_eq!(
            with["plugins"][0]["datapath"],
            json!({"pinPath": "/sys/fs/bpf/ferrynet"})
        );
    }

    #[test]
    fn install_is_atomic_idempotent_and_uninstall_removes_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CniPaths {
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            source_dir: dir.path().join("src"),
        };
        std::fs::create_dir_all(&paths.source_dir).unwrap();
        for p in PLUGINS {
            std::fs::write(paths.source_dir.join(p), format!("binary {p}")).unwrap();
        }
        assert_eq!(install_binaries(&paths).unwrap(), vec!["ferrynet", "ferrynet-ipam"]);
        assert!(
            install_binaries(&paths).unwrap().is_empty(),
            "unchanged binaries are not rewritten"
        );
        let mode = std::fs::metadata(paths.bin_dir.join("ferrynet"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let c = conflist(&node(&["10.244.1.0/24"]), "ferrynet", 1400, Path::new("/d"), None).unwrap();
        assert!(install_conflist(&paths, &c).unwrap());
        assert!(!install_conflist(&paths, &c).unwrap());
        let changed = conflist(&node(&["10.244.1.0/24"]), "ferrynet", 1350, Path::new("/d"), None).unwrap();
        assert!(
            install_conflist(&paths, &changed).unwrap(),
            "an MTU change rewrites the conflist"
        );
        let mode = std::fs::metadata(paths.conflist()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(&paths.conf_dir).unwrap().count(), 1);
        uninstall(&paths).unwrap();
        uninstall(&paths).unwrap();
        assert!(!paths.conflist().exists() && !paths.bin_dir.join("ferrynet").exists());
        assert!(
            paths.source_dir.join("ferrynet").exists(),
            "the sources are not ours to remove"
        );
    }
}
