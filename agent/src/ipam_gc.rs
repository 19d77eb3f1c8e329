//! The agent's own IPAM garbage collection. containerd 2.x calls CNI STATUS but never GC, so
//! allocations whose pods vanished without a DEL would leak. The agent releases an allocation
//! when local state says it is dead: its host veth is gone, and it is older than a grace period
//! (an ADD writes its record just before creating the veth, and a repeated ADD refreshes the
//! record's time under the store lock before it replaces the veth).
use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use ferrynet_ipam::{Attachment, AttachmentKey, IpamError, Store};
use ferrynet_kernel::{
    names::HostVeth,
    netlink::{Netlink, NetlinkError, inspect},
};
use tracing::info;

use crate::{
    status::{StatusHandle, now_unix},
    warning::{Warning, WarningKind},
};

/// The shortest grace period accepted: the time between an ADD writing its record and creating
/// its veth is milliseconds; this leaves a wide margin.
pub const MIN_GRACE: Duration = Duration::from_secs(2);

/// Why a collection failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamGcError {
    #[error("IPAM store: {0}")]
    Store(#[from] IpamError),
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("the collection was lost: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What one collection did.
#[derive(Debug, Default)]
pub struct Collection {
    pub released: Vec<Attachment>,
    /// Records that cannot be read: kept, and reported.
    pub corrupt: Vec<PathBuf>,
}

/// Releases the dead allocations of `network`.
pub fn collect(data_dir: &std::path::Path, network: &str, grace: Duration) -> Result<Collection, IpamGcError> {
    let grace = grace.max(MIN_GRACE);
    let store = Store::open(data_dir, network)?;
    let mut locked = store.lock()?;
    // The links are looked at only once the lock is held (which may have taken a while), so
    // that every record written before the snapshot has had its chance to get its veth, and a
    // repeated ADD's refresh is seen.
    let links: HashSet<String> = Netlink::current()
        .map_err(IpamGcError::Socket)?
        .links()?
        .iter()
        .filter_map(|l| inspect::link_name(l).map(str::to_string))
        .collect();
    let now = now_unix();
    let mut keep: HashSet<AttachmentKey> = HashSet::new();
    for attachment in locked.attachments_lenient()? {
        let key = attachment.key()?;
        let young = now.saturating_sub(attachment.created_unix) < grace.as_secs();
        if young || links.contains(&HostVeth::new(key.container_id(), key.ifname()).name) {
            keep.insert(key);
        }
    }
    // A record that cannot be read may be a live pod's: kept (and reported), never released on
    // a guess.
    keep.extend(locked.unreadable_records()?.into_iter().filter_map(|(_, key)| key));
    let report = locked.gc(|key| keep.contains(key))?;
    Ok(Collection {
        released: report.released,
        corrupt: report.corrupt,
    })
}

/// What the IPAM GC controller is configured with.
#[derive(Debug, Clone)]
pub struct IpamGcConfig {
    pub data_dir: PathBuf,
    pub network: String,
    pub interval: Duration,
    pub grace: Duration,
}

/// Collects every `interval`, in the background of the runtime (the store lock may be held for
/// a while, and nothing else should wait for it).
pub async fn run(cfg: Arc<IpamGcConfig>, status: StatusHandle) -> Result<(), IpamGcError> {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    status.update(|s| s.ipam_gc.ready = true);
    loop {
        tick.tick().await;
        let pass_cfg = cfg.clone();
        let outcome =
            tokio::task::spawn_blocking(move || collect(&pass_cfg.data_dir, &pass_cfg.network, pass_cfg.grace)).await?;
        status.update(|s| {
            let section = &mut s.ipam_gc;
            match &outcome {
                Ok(collection) => {
                    section.last_error = None;
                    section.warnings = collection
                        .corrupt
                        .iter()
                        .map(|p| {
                            Warning::new(
                                WarningKind::IpamCorruptRecord,
                                format!("IPAM GC: {} cannot be read; kept (repair or remove it)", p.display()),
                            )
                        })
                        .collect();
                    if !collection.released.is_empty() {
                        section.details.last_released = collection
                            .released
                            .iter()
                            .map(|a| format!("{}/{}", a.container_id, a.ifname))
                            .collect();
                        section.last_change_unix = Some(now_unix());
                    }
                }
                // A store that does not exist yet (no pod ever ran here) has nothing to collect.
                Err(IpamGcError::Store(IpamError::Io { source, .. }))
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    section.last_error = None;
                }
                Err(e) => section.last_error = Some(e.to_string()),
            }
        });
        if let Ok(collection) = &outcome
            && !collection.released.is_empty()
        {
            let who: Vec<String> = collection
                .released
                .iter()
                .map(|a| format!("{}/{}", a.container_id, a.ifname))
                .collect();
            info!("IPAM GC released addresses of vanished pods: {who:?}");
        }
    }
}
