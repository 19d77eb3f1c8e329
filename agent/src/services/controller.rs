//! The service controller. It checks, at every resync, that the datapath's kernel filesystems are
//! usable, and says so in its status section.
use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    kernel_paths,
    status::StatusHandle,
    warning::{Warning, WarningKind},
};

/// What the service controller is configured with.
#[derive(Debug, Clone)]
pub struct ServicesConfig {
    /// `--service-proxy`: translate Services at all.
    pub enabled: bool,
    /// The bpffs directory the datapath pins its maps, programs and links in.
    pub bpf_pin_path: PathBuf,
    /// The cgroup v2 directory the socket programs attach to.
    pub cgroup_path: PathBuf,
    pub resync: Duration,
}

/// Why the service controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {}

/// Runs until aborted.
pub async fn run(cfg: Arc<ServicesConfig>, status: StatusHandle) -> Result<(), ServicesError> {
    let mut resync = tokio::time::interval(cfg.resync);
    loop {
        resync.tick().await;
        let mut warnings = Vec::new();
        let pin_path = match kernel_paths::prepare_pin_path(&cfg.bpf_pin_path) {
            Ok(()) => Some(cfg.bpf_pin_path.clone()),
            Err(e) => {
                warnings.push(Warning::new(WarningKind::BpfPinPath, e.to_string()));
                None
            }
        };
        let cgroup = match kernel_paths::check_cgroup2(&cfg.cgroup_path) {
            Ok(()) => Some(cfg.cgroup_path.clone()),
            Err(e) => {
                warnings.push(Warning::new(WarningKind::CgroupPath, e.to_string()));
                None
            }
        };
        status.update(|s| {
            let section = &mut s.services;
            section.ready = true;
            section.warnings = warnings;
            section.details.enabled = false;
            section.details.bpf_pin_path = pin_path;
            section.details.cgroup_path = cgroup;
        });
    }
}
