//! What the agent writes for the CNI: the conflist (pure) and its installation (atomic files).
use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::topology::NodeInfo;

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
pub fn conflist(local: &NodeInfo, network: &str, mtu: u32, ipam_data_dir: &Path) -> Option<Value> {
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
    Some(json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": network,
        "plugins": [{
            "type": "ferrynet",
            "mtu": mtu,
            "ipam": {"type": "ferrynet-ipam", "ranges": ranges, "dataDir": ipam_data_dir},
        }],
    }))
}

/// Writes `content` to `path` atomically (temporary file in the same directory, then rename),
/// unless it is already there. Returns whether it wrote.
pub fn write_if_changed(path: &Path, content: &[u8], mode: u32) -> Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let dir = path.parent().context("path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
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
        file.sync_all()?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// Copies the plugin binaries into the runtime's bin dir (atomically, skipping unchanged ones).
pub fn install_binaries(paths: &CniPaths) -> Result<Vec<String>> {
    let mut installed = Vec::new();
    for plugin in PLUGINS {
        let source = paths.source_dir.join(plugin);
        let bytes = std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
        if write_if_changed(&paths.bin_dir.join(plugin), &bytes, 0o755)? {
            installed.push(plugin.to_string());
        }
    }
    Ok(installed)
}

/// Writes the conflist (readable by the runtime, writable by root only).
pub fn install_conflist(paths: &CniPaths, conflist: &Value) -> Result<bool> {
    let mut text = serde_json::to_vec_pretty(conflist).expect("conflist serialises");
    text.push(b'\n');
    write_if_changed(&paths.conflist(), &text, 0o644)
}

/// Removes what the install wrote. Missing files are fine.
pub fn uninstall(paths: &CniPaths) -> Result<()> {
    let mut targets = vec![paths.conflist()];
    targets.extend(PLUGINS.iter().map(|p| paths.bin_dir.join(p)));
    for target in targets {
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", target.display())),
        }
    }
    Ok(())
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
        }
    }

    #[test]
    fn conflist_carries_the_pod_cidrs_and_mtu() {
        let c = conflist(
            &node(&["10.244.1.0/24", "fd00:244:1::/64"]),
            "ferrynet",
            1450,
            Path::new("/var/lib/ferrynet/ipam"),
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
        assert!(conflist(&node(&[]), "ferrynet", 1450, Path::new("/x")).is_none());
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
        let c = conflist(&node(&["10.244.1.0/24"]), "ferrynet", 1400, Path::new("/d")).unwrap();
        assert!(install_conflist(&paths, &c).unwrap());
        assert!(!install_conflist(&paths, &c).unwrap());
        let changed = conflist(&node(&["10.244.1.0/24"]), "ferrynet", 1350, Path::new("/d")).unwrap();
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
