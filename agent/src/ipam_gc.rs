//! The agent's own IPAM garbage collection. containerd 2.x calls CNI STATUS but never GC, so
//! allocations whose pods vanished without a DEL would leak. The agent releases an allocation
//! when local state says it is dead: its host veth is gone, and it is older than a grace period
//! (an ADD writes its record just before creating the veth).
use std::{collections::HashSet, path::Path, time::Duration};

use anyhow::{Context, Result};
use ferrynet_cni::{
    names::HostVeth,
    netlink::{Netlink, inspect},
};
use ferrynet_ipam::{Attachment, AttachmentKey, Store};

/// The shortest grace period accepted: the time between an ADD writing its record and creating
/// its veth is milliseconds; this leaves a wide margin.
pub const MIN_GRACE: Duration = Duration::from_secs(2);

/// Releases dead allocations of `network`; returns them.
pub fn collect(data_dir: &Path, network: &str, grace: Duration) -> Result<Vec<Attachment>> {
    let grace = grace.max(MIN_GRACE);
    let store = Store::open(data_dir, network)?;
    let mut locked = store.lock()?;
    // The links are looked at only once the lock is held (which may have taken a while), so
    // that every record written before the snapshot has had its chance to get its veth.
    let links: HashSet<String> = Netlink::current()
        .context("netlink socket")?
        .links()?
        .iter()
        .filter_map(|l| inspect::link_name(l).map(str::to_string))
        .collect();
    let now = crate::status::now_unix();
    let mut keep: HashSet<AttachmentKey> = HashSet::new();
    for attachment in locked.attachments()? {
        let key = attachment.key()?;
        let young = now.saturating_sub(attachment.created_unix) < grace.as_secs();
        if young || links.contains(&HostVeth::for_key(&key).name) {
            keep.insert(key);
        }
    }
    let report = locked.gc(|key| keep.contains(key))?;
    for path in &report.corrupt {
        tracing::warn!("IPAM GC: {} cannot be read; kept (repair or remove it)", path.display());
    }
    Ok(report.released)
}
