//! Where the service datapath pins what it makes, under the agent's `--bpf-pin-path`: the agent
//! pins there, and the CNI attaches the pinned pod programs to new pods' veths from there.
use std::{
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use ferrynet_common::SCHEMA_VERSION;

/// The pinned layout, versioned: `<pin root>/v<SCHEMA_VERSION>/{maps,programs,links}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(pin_root: &Path) -> Self {
        Self {
            root: pin_root.join(format!("v{SCHEMA_VERSION}")),
        }
    }

    /// `<pin root>/v<SCHEMA_VERSION>`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn cgroup_link(&self, program: &str) -> PathBuf {
        self.links().join("cgroup").join(program)
    }

    pub fn pod_links(&self) -> PathBuf {
        self.links().join("pods")
    }

    /// The link of a pod veth's hook: `<veth>-from` (ingress) or `<veth>-to` (egress). (bpffs
    /// refuses names with dots.)
    pub fn pod_link(&self, veth: &str, hook: &str) -> PathBuf {
        self.pod_links().join(format!("{veth}-{hook}"))
    }

    pub fn uplink_links(&self) -> PathBuf {
        self.links().join("uplinks")
    }

    /// The link of an uplink's ingress hook, by interface index (interface names may hold dots,
    /// which bpffs refuses).
    pub fn uplink_link(&self, ifindex: u32) -> PathBuf {
        self.uplink_links().join(ifindex.to_string())
    }

    /// Makes the directories (owner only). Says which one could not be made, if any.
    pub fn create(&self) -> Result<(), (PathBuf, std::io::Error)> {
        for dir in [
            self.maps(),
            self.programs(),
            self.links().join("cgroup"),
            self.pod_links(),
            self.uplink_links(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| (dir.clone(), e))?;
        }
        Ok(())
    }
}
