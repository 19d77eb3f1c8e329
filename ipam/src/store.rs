//! The node-local allocation store.
//!
//! Layout, one directory per network under the data dir (all 0700, files 0600):
//!
//! ```text
//! <dataDir>/<network>/
//!   lock                      flock'd by every reader and writer; its content records the boot
//!                             the allocations belong to and the ranges the indexes cover
//!   attachments/<cid>:<if>    one JSON record per (container ID, ifname): the source of truth
//!   ranges/<start>-<end>      one bitmap index per configured range (see `bitmap`)
//!   inflight/<cid>:<if>       flock'd for the whole of one ADD, DEL or CHECK of that attachment
//! ```
//!
//! The store trusts nothing it did not make. Every lock takes the directories through
//! `fsutil::verify_private_dir`: a directory that is a symlink, belongs to another user or is
//! writable by anyone else is refused (so nobody else can swap entries for symlinks), and files
//! are opened without following symlinks. The data dir itself may not be writable by everyone
//! unless it is sticky.
//!
//! Safety rules, each relied on by a test:
//! - Every operation holds the lock, so many plugin processes can run at once.
//! - Records are replaced atomically (temporary file and rename); bitmap words are single stores.
//! - Bits are set before a record is written and cleared after it is removed, so a kill at any
//!   point can only leak an address (GC repairs that), never hand one out twice.
//! - Bitmaps are trusted only for the ranges the lock file records as indexed. When a config
//!   with other ranges comes, the store records "nothing indexed", drops every bitmap and rebuilds
//!   the wanted ones from the records; an interrupted switch just starts over. An address outside
//!   the current ranges is therefore never handed out, and no stale index is ever trusted.
//! - When the boot id differs from the recorded one, every allocation belongs to a previous boot
//!   whose containers are gone: the store reclaims them all before doing anything else.
use std::{
    collections::{BTreeSet, HashSet},
    fs::File,
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ferrynet_cni_protocol::{AttachmentKey, is_valid_name};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    bitmap::Bitmap,
    config::{Range, RangeSet},
    error::{IpamError, Result},
    fsutil::{self, FileLock, TMP_PREFIX},
};

/// How long an operation waits for another process's lock before failing with "try again later".
const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(20);
const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The record file of `key`: `<cid>:<ifname>`, unambiguous because neither part may contain
/// `:`. Container IDs too long for a file name fall back to a digest; the record inside still
/// names the full key.
fn record_file_name(key: &AttachmentKey) -> String {
    let name = format!("{}:{}", key.container_id(), key.ifname());
    if name.len() <= MAX_PLAIN_NAME {
        name
    } else {
        let digest = Sha256::digest(name.as_bytes());
        format!("sha256-{}", hex(&digest))
    }
}

/// File names up to this long are used as they are; longer ones (the spec bounds neither
/// container IDs nor network names, the file system allows 255 bytes) become a digest.
const MAX_PLAIN_NAME: usize = 240;

/// The key a record (or in-flight lock) file is named after, when the name is not a digest.
fn key_of_file_name(name: &str) -> Option<AttachmentKey> {
    let (container_id, ifname) = name.split_once(':')?;
    AttachmentKey::new(container_id, ifname).ok()
}

/// The store directory's name for `network`: the name itself, or a digest of a name too long
/// for a file name.
fn network_dir_name(network: &str) -> String {
    if network.len() <= MAX_PLAIN_NAME {
        network.to_string()
    } else {
        format!("sha256-{}", hex(&Sha256::digest(network.as_bytes())))
    }
}

/// One attachment's allocation, as recorded on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// One address per range set, with the subnet's prefix length.
    pub ips: Vec<IpNet>,
    pub boot_id: String,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The pod's network namespace (`CNI_NETNS`) when the attachment was made: the agent finds
    /// the pods' sockets through it (to terminate those connected to removed backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

impl Attachment {
    pub fn key(&self) -> Result<AttachmentKey> {
        Ok(AttachmentKey::new(&self.container_id, &self.ifname)?)
    }
}

/// Optional inputs to an allocation.
#[derive(Debug, Clone, Default)]
pub struct AllocationRequest {
    /// Specific addresses wanted (at most one per range set), from `runtimeConfig.ips`,
    /// `args.cni.ips` or `CNI_ARGS` `IP=`.
    pub requested: Vec<IpAddr>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
}

/// What GC did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Attachments that were not in the keep set and are now released.
    pub released: Vec<Attachment>,
    /// Index bits that no record backed (leaks from killed processes), now cleared.
    pub leaked_addresses_recovered: u64,
    /// Records that could not be read and belong to attachments in the keep set (or whose file
    /// name does not say whose they are). They are kept (their addresses may be live), and while
    /// any exists leaked bits are not recovered: GC cannot tell them from these records' addresses.
    pub corrupt: Vec<PathBuf>,
    /// Unreadable records of attachments not in the keep set (their file name says whose they
    /// are): removed like any released record, their addresses recovered by the index rebuild.
    pub removed_corrupt: Vec<PathBuf>,
}

/// Free capacity of one range set, for STATUS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSetUsage {
    pub range_set: String,
    pub free: u64,
}

/// A handle on one network's store directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    lock_timeout: Duration,
}

impl Store {
    /// Opens (creating if needed) the store of `network` under `data_dir`.
    pub fn open(data_dir: &Path, network: &str) -> Result<Self> {
        if !is_valid_name(network) {
            return Err(IpamError::InvalidConfig(format!(
                "network name {network:?} is not valid"
            )));
        }
        Ok(Self {
            dir: data_dir.join(network_dir_name(network)),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        })
    }

    /// Makes sure the store directory (and the data dir above it) are safe to use, creating the
    /// store directory if needed.
    fn prepare_dir(&self) -> Result<()> {
        if let Some(data_dir) = self.dir.parent() {
            fsutil::verify_data_dir(data_dir)?;
        }
        fsutil::ensure_private_dir(&self.dir)
    }

    /// Serialises every operation on one attachment for its whole length: an ADD and a DEL of
    /// the same (container ID, ifname) never interleave, even when a runtime runs them at once
    /// (the spec forbids it, kubelet restarts and runtime bugs do it anyway). Interleaved, the DEL
    /// could release the address between the ADD's allocation and its routes, and the address
    /// would be free while still routed.
    ///
    /// The lock is a file in `inflight/`, taken before the store lock and held across the
    /// kernel work. DEL removes it with [`AttachmentLock::remove`]; GC removes leftovers.
    pub fn lock_attachment(&self, key: &AttachmentKey) -> Result<AttachmentLock> {
        self.prepare_dir()?;
        let dir = self.dir.join(INFLIGHT_DIR);
        fsutil::ensure_private_dir(&dir)?;
        let path = dir.join(record_file_name(key));
        let deadline = std::time::Instant::now() + self.lock_timeout;
        // Bounded: each round either returns or saw the file removed by a DEL that held it.
        loop {
            let remaining = deadline.saturating_duration_since(std::time::Instant::now());
            let lock = FileLock::acquire(&path, remaining)?;
            if lock.is_current()? {
                return Ok(AttachmentLock { lock });
            }
            if remaining.is_zero() {
                return Err(IpamError::LockTimeout(self.lock_timeout));
            }
        }
    }

    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the store lock (creating the store on first use). Reclaims a previous boot's
    /// allocations first, if any.
    pub fn lock(&self) -> Result<LockedStore> {
        self.prepare_dir()?;
        let lock = FileLock::acquire(&self.dir.join("lock"), self.lock_timeout)?;
        let state = lock.read_content()?;
        let mut lines = state.lines();
        let recorded_boot = lines.next().unwrap_or("").to_string();
        let indexed_ranges = lines.next().unwrap_or("").to_string();
        let mut locked = LockedStore {
            attachments_dir: self.dir.join("attachments"),
            ranges_dir: self.dir.join("ranges"),
            inflight_dir: self.dir.join(INFLIGHT_DIR),
            boot_id: current_boot_id()?,
            indexed_ranges,
            reclaimed_after_reboot: Vec::new(),
            lock,
        };
        if recorded_boot != locked.boot_id {
            locked.reclaim_previous_boot()?;
        }
        fsutil::verify_private_dir(&locked.attachments_dir)?;
        fsutil::verify_private_dir(&locked.ranges_dir)?;
        Ok(locked)
    }
}

/// Where the per-attachment operation locks live, inside a store directory.
const INFLIGHT_DIR: &str = "inflight";

/// One attachment's operation lock (see [`Store::lock_attachment`]), released when dropped.
#[derive(Debug)]
pub struct AttachmentLock {
    lock: FileLock,
}

impl AttachmentLock {
    /// Removes the lock file and lets go: for the end of a DEL, after which the attachment has
    /// nothing left to protect. A waiting ADD then starts over on a fresh file.
    pub fn remove(self) -> Result<()> {
        self.lock.remove()
    }
}

/// The store with its lock held. Every read and write goes through here.
pub struct LockedStore {
    attachments_dir: PathBuf,
    ranges_dir: PathBuf,
    inflight_dir: PathBuf,
    boot_id: String,
    /// The ranges whose bitmaps exist, as recorded in the lock file (sorted keys, comma-joined).
    indexed_ranges: String,
    /// Attachments of an earlier boot that taking the lock released.
    pub reclaimed_after_reboot: Vec<Attachment>,
    lock: FileLock,
}

impl LockedStore {
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Every allocation belongs to an earlier boot (or the store is new, or lost its state in a
    /// crash): nothing in it is live, so all of it goes.
    fn reclaim_previous_boot(&mut self) -> Result<()> {
        // Also the first use of a store: its subdirectories are made here, under the lock, so
        // that no other process can see the store half-made.
        fsutil::ensure_private_dir(&self.attachments_dir)?;
        fsutil::ensure_private_dir(&self.ranges_dir)?;
        let records = self.read_all_lenient()?;
        for (path, _) in &records {
            fsutil::remove_if_exists(path)?;
        }
        self.reclaimed_after_reboot = records.into_iter().filter_map(|(_, a)| a).collect();
        self.remove_files_in(&self.ranges_dir.clone(), |_| true)?;
        self.remove_files_in(&self.attachments_dir.clone(), |n| n.starts_with(TMP_PREFIX))?;
        self.indexed_ranges.clear();
        self.save_state()
    }

    fn save_state(&self) -> Result<()> {
        self.lock
            .write_content(&format!("{}\n{}\n", self.boot_id, self.indexed_ranges))
    }

    fn record_path(&self, key: &AttachmentKey) -> PathBuf {
        self.attachments_dir.join(record_file_name(key))
    }

    /// The allocation of `key`, if there is one.
    pub fn get(&self, key: &AttachmentKey) -> Result<Option<Attachment>> {
        read_record(&self.record_path(key))
    }

    /// Every allocation in the store.
    pub fn attachments(&self) -> Result<Vec<Attachment>> {
        let mut all = Vec::new();
        for path in self.record_paths()? {
            all.extend(read_record(&path)?);
        }
        Ok(all)
    }

    /// Every allocation that can be read; unreadable records are left out (see [`Self::gc`] for
    /// how they are kept and reported).
    pub fn attachments_lenient(&self) -> Result<Vec<Attachment>> {
        Ok(self.read_all_lenient()?.into_iter().filter_map(|(_, a)| a).collect())
    }

    /// The records that cannot be read, with the attachment each file name says it belongs to
    /// (none for a digest name).
    pub fn unreadable_records(&self) -> Result<Vec<(PathBuf, Option<AttachmentKey>)>> {
        Ok(self
            .read_all_lenient()?
            .into_iter()
            .filter(|(_, a)| a.is_none())
            .map(|(path, _)| {
                let key = path.file_name().and_then(|n| n.to_str()).and_then(key_of_file_name);
                (path, key)
            })
            .collect())
    }

    /// Allocates one address from every range set for `key`. A repeated call for the same key
    /// returns the existing allocation, with its time refreshed: a repeated ADD is about to
    /// replace the attachment's veth, and until it has, the record must look as young as a new
    /// one to a garbage collector that judges by the veth (the agent's).
    pub fn allocate(
        &mut self,
        key: &AttachmentKey,
        sets: &[RangeSet],
        request: &AllocationRequest,
    ) -> Result<Attachment> {
        if let Some(mut existing) = self.get(key)? {
            existing.created_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if request.netns.is_some() {
                existing.netns = request.netns.clone();
            }
            let json = serde_json::to_vec(&existing).expect("attachment serialises");
            fsutil::write_atomic(&self.record_path(key), |f: &mut File| f.write_all(&json))?;
            return Ok(existing);
        }
        let mut bitmaps = self.bitmaps_for(sets)?;
        for ip in &request.requested {
            if !sets.iter().any(|s| s.range_of(*ip).is_some()) {
                return Err(IpamError::RequestedOutOfRange(*ip));
            }
        }
        for set in sets {
            let wanted: Vec<&IpAddr> = request
                .requested
                .iter()
                .filter(|ip| set.range_of(**ip).is_some())
                .collect();
            if wanted.len() > 1 {
                return Err(IpamError::InvalidConfig(format!(
                    "{wanted:?} requested from one range set {set}: an attachment gets one address per set"
                )));
            }
        }

        // Claim the bits first; on any failure, give back what was claimed.
        let mut claimed: Vec<(usize, usize, u64)> = Vec::new();
        let mut ips = Vec::with_capacity(sets.len());
        let result = (|| {
            for (set_index, set) in sets.iter().enumerate() {
                let requested = request.requested.iter().find(|ip| set.range_of(**ip).is_some());
                let (range_index, offset) = match requested {
                    Some(ip) => {
                        let range_index = set.ranges.iter().position(|r| r.contains(*ip)).expect("checked above");
                        let range = &set.ranges[range_index];
                        let offset = range.offset_of(*ip).expect("checked above");
                        if range.is_reserved(*ip) || bitmaps[set_index][range_index].is_set(offset) {
                            let owner = self
                                .owner_of(*ip)?
                                .map_or_else(|| "a reserved address".to_string(), |k| k.to_string());
                            return Err(IpamError::RequestedInUse { addr: *ip, owner });
                        }
                        (range_index, offset)
                    }
                    None => next_free_in_set(set, &bitmaps[set_index])
                        .ok_or_else(|| IpamError::Exhausted(set.to_string()))?,
                };
                let bitmap = &mut bitmaps[set_index][range_index];
                bitmap.set(offset);
                bitmap.set_cursor(offset);
                claimed.push((set_index, range_index, offset));
                let range = &set.ranges[range_index];
                ips.push(range.with_prefix(range.addr_at(offset)));
            }
            let attachment = Attachment {
                container_id: key.container_id().to_string(),
                ifname: key.ifname().to_string(),
                ips: ips.clone(),
                boot_id: self.boot_id.clone(),
                created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                pod_namespace: request.pod_namespace.clone(),
                pod_name: request.pod_name.clone(),
                netns: request.netns.clone(),
            };
            let json = serde_json::to_vec(&attachment).expect("attachment serialises");
            fsutil::write_atomic(&self.record_path(key), |f: &mut File| f.write_all(&json))?;
            Ok(attachment)
        })();
        if result.is_err() {
            for (set_index, range_index, offset) in claimed {
                bitmaps[set_index][range_index].clear(offset);
            }
        }
        result
    }

    /// Releases `key`'s allocation. Releasing something that is not allocated is not an error.
    ///
    /// An unreadable record is removed too, and `Ok(None)` returned: DEL must always be able to
    /// finish, or the runtime retries it forever. Its addresses are unknown, so every index is
    /// then rebuilt from the remaining records (unless another record is unreadable as well; then
    /// they stay taken until GC can rebuild).
    pub fn release(&mut self, key: &AttachmentKey) -> Result<Option<Attachment>> {
        let attachment = match self.get(key) {
            Ok(Some(attachment)) => attachment,
            Ok(None) => return Ok(None),
            Err(IpamError::Corrupt { .. }) => {
                fsutil::remove_if_exists(&self.record_path(key))?;
                self.rebuild_indexes_if_readable()?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        // Record first, bits second: a kill in between leaks, it never duplicates.
        fsutil::remove_if_exists(&self.record_path(key))?;
        let mut bitmaps = self.existing_bitmaps()?;
        for ip in &attachment.ips {
            for bitmap in &mut bitmaps {
                if let Some(offset) = bitmap.offset_of(ip.addr()) {
                    bitmap.clear(offset);
                }
            }
        }
        Ok(Some(attachment))
    }

    /// Rebuilds every index from the records, when all of them can be read. Returns how many
    /// addresses were freed.
    fn rebuild_indexes_if_readable(&mut self) -> Result<u64> {
        let records = self.read_all_lenient()?;
        if records.iter().any(|(_, a)| a.is_none()) {
            return Ok(0);
        }
        let held: Vec<IpAddr> = records
            .iter()
            .flat_map(|(_, a)| a.iter().flat_map(|a| a.ips.iter().map(IpNet::addr)))
            .collect();
        let mut freed = 0;
        for bitmap in self.existing_bitmaps()? {
            let before = bitmap.count_set();
            freed += before.saturating_sub(bitmap.rebuild(held.iter().copied())?.count_set());
        }
        Ok(freed)
    }

    /// Releases every attachment for which `keep` is false, then rebuilds every index exactly from
    /// the remaining records. That recovers addresses leaked by processes killed mid-operation.
    pub fn gc(&mut self, keep: impl Fn(&AttachmentKey) -> bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        self.remove_idle_inflight_locks()?;
        self.remove_files_in(&self.attachments_dir.clone(), |n| n.starts_with(TMP_PREFIX))?;
        self.remove_files_in(&self.ranges_dir.clone(), |n| n.starts_with(TMP_PREFIX))?;
        let mut live = Vec::new();
        for (path, attachment) in self.read_all_lenient()? {
            let Some(attachment) = attachment else {
                // Whose it is, the file name still says (unless it is a digest).
                let owner = path.file_name().and_then(|n| n.to_str()).and_then(key_of_file_name);
                match owner {
                    Some(key) if !keep(&key) => {
                        fsutil::remove_if_exists(&path)?;
                        report.removed_corrupt.push(path);
                    }
                    _ => report.corrupt.push(path),
                }
                continue;
            };
            let key = attachment.key()?;
            if keep(&key) {
                live.push(attachment);
            } else {
                fsutil::remove_if_exists(&self.record_path(&key))?;
                report.released.push(attachment);
            }
        }
        let held: Vec<IpAddr> = live.iter().flat_map(|a| a.ips.iter().map(IpNet::addr)).collect();
        let released: HashSet<IpAddr> = report
            .released
            .iter()
            .flat_map(|a| a.ips.iter().map(IpNet::addr))
            .collect();
        for bitmap in self.existing_bitmaps()? {
            if report.corrupt.is_empty() {
                let before = bitmap.count_set();
                let rebuilt = bitmap.rebuild(held.iter().copied())?;
                let released_here = released.iter().filter(|ip| rebuilt.offset_of(**ip).is_some()).count() as u64;
                report.leaked_addresses_recovered += before.saturating_sub(rebuilt.count_set() + released_here);
            } else {
                // Clear only what was released, as `release` does.
                let mut bitmap = bitmap;
                for ip in &released {
                    if let Some(offset) = bitmap.offset_of(*ip) {
                        bitmap.clear(offset);
                    }
                }
            }
        }
        Ok(report)
    }

    /// Removes the in-flight lock files of attachments that have no record, skipping any that an
    /// operation holds right now: what DELs that were killed (or never came) left behind.
    fn remove_idle_inflight_locks(&self) -> Result<()> {
        match std::fs::symlink_metadata(&self.inflight_dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            _ => fsutil::verify_private_dir(&self.inflight_dir)?,
        }
        let entries = match std::fs::read_dir(&self.inflight_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(IpamError::io(&self.inflight_dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| IpamError::io(&self.inflight_dir, e))?;
            if self.attachments_dir.join(entry.file_name()).exists() {
                continue;
            }
            match FileLock::try_acquire(&entry.path()) {
                Ok(Some(lock)) if lock.is_current()? => lock.remove()?,
                // Held by an operation in progress, or not a lock file the store made.
                Ok(_) | Err(IpamError::UnsafeStore { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Free addresses per range set (reserved addresses excluded), for STATUS.
    pub fn usage(&mut self, sets: &[RangeSet]) -> Result<Vec<RangeSetUsage>> {
        let bitmaps = self.bitmaps_for(sets)?;
        Ok(sets
            .iter()
            .zip(&bitmaps)
            .map(|(set, maps)| {
                let free = set
                    .ranges
                    .iter()
                    .zip(maps)
                    .map(|(range, bitmap)| {
                        // The gateway is never handed out, so its (clear) bit is not free capacity.
                        let gateway_bit_clear = range.offset_of(range.gateway).is_some_and(|o| !bitmap.is_set(o));
                        range.len() - bitmap.count_set() - u64::from(gateway_bit_clear)
                    })
                    .sum();
                RangeSetUsage {
                    range_set: set.to_string(),
                    free,
                }
            })
            .collect())
    }

    /// Which attachment holds `ip`, if any. Scans the records: only for error messages.
    fn owner_of(&self, ip: IpAddr) -> Result<Option<AttachmentKey>> {
        for attachment in self.attachments()? {
            if attachment.ips.iter().any(|n| n.addr() == ip) {
                return attachment.key().map(Some);
            }
        }
        Ok(None)
    }

    /// Opens the bitmaps of exactly the ranges in `sets`, building missing ones from the records,
    /// and drops every other bitmap (see the module docs for why).
    fn bitmaps_for(&mut self, sets: &[RangeSet]) -> Result<Vec<Vec<Bitmap>>> {
        let wanted: BTreeSet<String> = sets.iter().flat_map(|s| s.ranges.iter().map(Range::key)).collect();
        let wanted_list = wanted.iter().map(String::as_str).collect::<Vec<_>>().join(",");
        // Bitmaps are trusted only while the ranges are the ones last indexed. On any change,
        // the store first records that nothing is indexed, then drops every bitmap and rebuilds
        // the wanted ones from the records. A process killed half-way leaves "nothing indexed",
        // so the next one starts over: a bitmap from an interrupted switch is never trusted.
        let changed = self.indexed_ranges != wanted_list;
        if changed {
            self.indexed_ranges.clear();
            self.save_state()?;
            self.remove_files_in(&self.ranges_dir.clone(), |_| true)?;
        }
        let mut held: Option<Vec<IpAddr>> = None;
        let mut out = Vec::with_capacity(sets.len());
        for set in sets {
            let mut maps = Vec::with_capacity(set.ranges.len());
            for range in &set.ranges {
                let path = self.ranges_dir.join(range.key());
                let bitmap = match Bitmap::open(&path)? {
                    Some(b) if b.covers_exactly(range) => b,
                    _ => {
                        if held.is_none() {
                            held = Some(
                                self.attachments()?
                                    .iter()
                                    .flat_map(|a| a.ips.iter().map(IpNet::addr))
                                    .collect(),
                            );
                        }
                        let used = held.as_ref().expect("just filled").iter().copied();
                        // Start just before the range end so the first address handed out is the first.
                        Bitmap::create(&path, range, used, range.len() - 1)?
                    }
                };
                maps.push(bitmap);
            }
            out.push(maps);
        }
        if changed {
            self.indexed_ranges = wanted_list;
            self.save_state()?;
        }
        Ok(out)
    }

    fn existing_bitmaps(&self) -> Result<Vec<Bitmap>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.ranges_dir).map_err(|e| IpamError::io(&self.ranges_dir, e))? {
            let entry = entry.map_err(|e| IpamError::io(&self.ranges_dir, e))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            if let Some(bitmap) = Bitmap::open(&entry.path())? {
                out.push(bitmap);
            }
        }
        Ok(out)
    }

    fn record_paths(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.attachments_dir).map_err(|e| IpamError::io(&self.attachments_dir, e))? {
            let entry = entry.map_err(|e| IpamError::io(&self.attachments_dir, e))?;
            if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Records, tolerating unreadable ones (used only when reclaiming everything anyway).
    fn read_all_lenient(&self) -> Result<Vec<(PathBuf, Option<Attachment>)>> {
        Ok(self
            .record_paths()?
            .into_iter()
            .map(|path| {
                let parsed = read_record(&path).ok().flatten();
                (path, parsed)
            })
            .collect())
    }

    fn remove_files_in(&self, dir: &Path, doomed: impl Fn(&str) -> bool) -> Result<()> {
        for entry in std::fs::read_dir(dir).map_err(|e| IpamError::io(dir, e))? {
            let entry = entry.map_err(|e| IpamError::io(dir, e))?;
            if doomed(&entry.file_name().to_string_lossy()) {
                fsutil::remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// next-fit over the ranges of a set: each range continues after its own cursor.
fn next_free_in_set(set: &RangeSet, bitmaps: &[Bitmap]) -> Option<(usize, u64)> {
    set.ranges
        .iter()
        .zip(bitmaps)
        .enumerate()
        .find_map(|(i, (range, bitmap))| {
            bitmap
                .next_free(bitmap.cursor(), |offset| range.is_reserved(range.addr_at(offset)))
                .map(|offset| (i, offset))
        })
}

/// One record: `None` if there is none, `Corrupt` if it cannot be read as one (a symlink, which
/// the store never writes, included).
fn read_record(path: &Path) -> Result<Option<Attachment>> {
    match fsutil::read_nofollow(path) {
        Ok(bytes) => parse_record(path, &bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if fsutil::is_symlink_refusal(&e) => Err(IpamError::Corrupt {
            path: path.into(),
            reason: "is a symbolic link".into(),
        }),
        Err(e) => Err(IpamError::io(path, e)),
    }
}

fn parse_record(path: &Path, bytes: &[u8]) -> Result<Attachment> {
    serde_json::from_slice(bytes).map_err(|e| IpamError::Corrupt {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// This boot's id. Reading it per operation costs a few microseconds.
pub fn current_boot_id() -> Result<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_string())
        .map_err(|e| IpamError::io(BOOT_ID_PATH, e))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IpamConfig;
    use proptest::prelude::*;
    use serde_json::json;
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    fn sets(ranges: Value) -> Vec<RangeSet> {
        IpamConfig::from_value(&json!({ "ranges": ranges })).unwrap().range_sets
    }
    use serde_json::Value;

    fn key(i: usize) -> AttachmentKey {
        AttachmentKey::new(&format!("c{i}"), "eth0").unwrap()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "net").unwrap();
        (dir, store)
    }

    fn addrs(a: &Attachment) -> Vec<String> {
        a.ips.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn allocates_in_order_and_is_idempotent_per_key() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let mut st = store.lock().unwrap();
        let a = st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        // .1 is the default gateway, so the first address handed out is .2.
        assert_eq!(addrs(&a), ["10.0.0.2/24"]);
        let again = st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        assert_eq!(a.ips, again.ips);
        let b = st.allocate(&key(2), &s, &AllocationRequest::default()).unwrap();
        assert_eq!(addrs(&b), ["10.0.0.3/24"]);
    }

    #[test]
    fn a_repeated_allocation_refreshes_the_record_time_under_the_lock() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let mut st = store.lock().unwrap();
        let first = st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        // The pod has run for an hour.
        let mut old = first.clone();
        old.created_unix -= 3600;
        std::fs::write(st.record_path(&key(1)), serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(st.get(&key(1)).unwrap().unwrap().created_unix, old.created_unix);
        // The runtime repeats ADD: same addresses, and the record is young again, so a GC that
        // runs while the repeated ADD replaces the veth keeps it.
        let again = st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        assert_eq!(again.ips, first.ips);
        assert!(again.created_unix >= first.created_unix, "{again:?}");
        assert_eq!(st.get(&key(1)).unwrap().unwrap(), again);
    }

    #[test]
    fn just_freed_addresses_are_not_reused_at_once() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let mut st = store.lock().unwrap();
        let a = st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        st.release(&key(1)).unwrap();
        let b = st.allocate(&key(2), &s, &AllocationRequest::default()).unwrap();
        assert_ne!(a.ips, b.ips);
        // Releasing twice, or something never allocated, is fine.
        assert!(st.release(&key(1)).unwrap().is_none());
        assert!(st.release(&key(99)).unwrap().is_none());
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_never_hands_out_network_gateway_or_broadcast() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/29"}]])); // .1-.6 usable, .1 is the gateway
        let mut st = store.lock().unwrap();
        let mut seen = Vec::new();
        for i in 0..5 {
            seen.push(
                st.allocate(&key(i), &s, &AllocationRequest::default()).unwrap().ips[0]
                    .addr()
                    .to_string(),
            );
        }
        seen.sort();
        assert_eq!(seen, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        let err = st.allocate(&key(9), &s, &AllocationRequest::default()).unwrap_err();
        assert!(matches!(err, IpamError::Exhausted(_)), "{err}");
        assert!(err.to_string().contains("10.0.0.0/29"), "{err}");
        assert_eq!(st.usage(&s).unwrap()[0].free, 0);
        st.release(&key(3)).unwrap();
        assert_eq!(st.usage(&s).unwrap()[0].free, 1);
        assert_eq!(
            st.allocate(&key(9), &s, &AllocationRequest::default()).unwrap().ips,
            st.get(&key(9)).unwrap().unwrap().ips
        );
    }

    #[test]
    fn dual_stack_gives_one_address_of_each_family() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00:1::/64"}]]));
        let mut st = store.lock().unwrap();
        let a = st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        assert_eq!(addrs(&a), ["10.0.0.2/24", "fd00:1::2/64"]);
    }

    #[test]
    fn failed_second_family_gives_back_the_first() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00:1::/126"}]])); // ::2, ::3 usable
        let mut st = store.lock().unwrap();
        st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        st.allocate(&key(2), &s, &AllocationRequest::default()).unwrap();
        let before = st.usage(&s).unwrap();
        assert!(st.allocate(&key(3), &s, &AllocationRequest::default()).is_err());
        assert_eq!(st.usage(&s).unwrap(), before, "IPv4 claim must be rolled back");
        assert!(st.get(&key(3)).unwrap().is_none());
    }

    #[test]
    fn requested_addresses() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let mut st = store.lock().unwrap();
        let want = |ip: &str| AllocationRequest {
            requested: vec![ip.parse().unwrap()],
            ..Default::default()
        };
        let a = st.allocate(&key(1), &s, &want("10.0.0.77")).unwrap();
        assert_eq!(addrs(&a), ["10.0.0.77/24"]);
        let err = st.allocate(&key(2), &s, &want("10.0.0.77")).unwrap_err();
        assert!(err.to_string().contains("c1/eth0"), "{err}");
        assert!(matches!(
            st.allocate(&key(2), &s, &want("10.0.0.1")),
            Err(IpamError::RequestedInUse { .. })
        ));
        assert!(matches!(
            st.allocate(&key(2), &s, &want("10.9.0.1")),
            Err(IpamError::RequestedOutOfRange(_))
        ));
        // At most one requested address per range set.
        let two = AllocationRequest {
            requested: vec!["10.0.0.80".parse().unwrap(), "10.0.0.81".parse().unwrap()],
            ..Default::default()
        };
        assert!(matches!(
            st.allocate(&key(3), &s, &two),
            Err(IpamError::InvalidConfig(_))
        ));
    }

    #[test]
    fn range_change_never_hands_out_addresses_outside_the_new_range_or_held_ones() {
        let (_d, store) = store();
        let old = sets(json!([[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.2", "rangeEnd": "10.0.0.3"}]]));
        let mut st = store.lock().unwrap();
        st.allocate(&key(1), &old, &AllocationRequest::default()).unwrap(); // .2
        st.allocate(&key(2), &old, &AllocationRequest::default()).unwrap(); // .3
        // Move to a disjoint range: only its addresses come out.
        let moved = sets(json!([[{"subnet": "10.1.0.0/30"}]]));
        let a = st.allocate(&key(3), &moved, &AllocationRequest::default()).unwrap();
        assert_eq!(addrs(&a), ["10.1.0.2/30"]);
        assert!(matches!(
            st.allocate(&key(4), &moved, &AllocationRequest::default()),
            Err(IpamError::Exhausted(_))
        ));
        // Widen to a /29 covering the old range: .2 and .3 are still held, so only .4-.6 are free
        // (.1 is the gateway, .7 the broadcast).
        let wide = sets(json!([[{"subnet": "10.0.0.0/29"}]]));
        let mut got = Vec::new();
        for i in 10..13 {
            got.push(
                st.allocate(&key(i), &wide, &AllocationRequest::default()).unwrap().ips[0]
                    .addr()
                    .to_string(),
            );
        }
        got.sort();
        assert_eq!(got, ["10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        assert!(matches!(
            st.allocate(&key(13), &wide, &AllocationRequest::default()),
            Err(IpamError::Exhausted(_))
        ));
    }

    #[test]
    fn an_interrupted_range_switch_never_leads_to_a_duplicate() {
        let (_d, store) = store();
        let a = sets(json!([[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.2", "rangeEnd": "10.0.0.20"}]]));
        let b = sets(json!([[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.2", "rangeEnd": "10.0.0.30"}]]));
        let mut st = store.lock().unwrap();
        st.allocate(&key(1), &b, &AllocationRequest::default()).unwrap();
        // A process switching to B's ranges was killed after writing B's bitmap and before
        // recording it: B's bitmap lies around while the lock file says A.
        let b_file = store.dir().join("ranges").join(b[0].ranges[0].key());
        let stale = std::fs::read(&b_file).unwrap();
        st.allocate(&key(2), &a, &AllocationRequest::default()).unwrap();
        std::fs::write(&b_file, &stale).unwrap();
        // Served with A, then with B again: every address held stays unique.
        let x = st.allocate(&key(3), &a, &AllocationRequest::default()).unwrap();
        let y = st.allocate(&key(4), &b, &AllocationRequest::default()).unwrap();
        let mut all: Vec<IpAddr> = st
            .attachments()
            .unwrap()
            .iter()
            .flat_map(|r| r.ips.iter().map(IpNet::addr))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "{x:?} {y:?}");
    }

    #[test]
    fn a_previous_boot_is_reclaimed() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        {
            let mut st = store.lock().unwrap();
            for i in 0..3 {
                st.allocate(&key(i), &s, &AllocationRequest::default()).unwrap();
            }
        }
        // The lock file's first line records the boot the allocations belong to.
        std::fs::write(store.dir().join("lock"), "00000000-0000-0000-0000-000000000000\n").unwrap();
        let mut st = store.lock().unwrap();
        assert_eq!(st.reclaimed_after_reboot.len(), 3);
        assert!(st.attachments().unwrap().is_empty());
        assert_eq!(st.usage(&s).unwrap()[0].free, 253);
        let state = std::fs::read_to_string(store.dir().join("lock")).unwrap();
        assert_eq!(state.lines().next().unwrap(), current_boot_id().unwrap());
    }

    #[test]
    fn gc_releases_what_is_not_kept_and_recovers_leaked_bits() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let mut st = store.lock().unwrap();
        for i in 0..4 {
            st.allocate(&key(i), &s, &AllocationRequest::default()).unwrap();
        }
        // A process killed between claiming bits and writing its record leaves bits with no record.
        {
            let mut maps = st.bitmaps_for(&s).unwrap();
            maps[0][0].set(200);
            maps[0][0].set(201);
        }
        std::fs::write(store.dir().join("attachments").join(".tmp-1-2-3"), b"{half").unwrap();
        let report = st.gc(|k| k.container_id() == "c1" || k.container_id() == "c2").unwrap();
        let released: Vec<String> = report.released.iter().map(|a| a.container_id.clone()).collect();
        assert_eq!(released, ["c0", "c3"]);
        assert_eq!(report.leaked_addresses_recovered, 2);
        assert_eq!(st.usage(&s).unwrap()[0].free, 253 - 2);
        assert_eq!(st.attachments().unwrap().len(), 2);
        assert!(!store.dir().join("attachments").join(".tmp-1-2-3").exists());
    }

    #[test]
    fn a_corrupt_record_is_reported_not_ignored() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let mut st = store.lock().unwrap();
        st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        std::fs::write(store.dir().join("attachments").join("c1:eth0"), b"garbage").unwrap();
        let err = st.attachments().unwrap_err();
        assert!(err.to_string().contains("c1:eth0"), "{err}");
    }

    #[test]
    fn gc_keeps_going_past_a_corrupt_record_and_keeps_it_while_it_is_listed() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let mut st = store.lock().unwrap();
        for i in 0..3 {
            st.allocate(&key(i), &s, &AllocationRequest::default()).unwrap();
        }
        let bad = store.dir().join("attachments").join("c1:eth0");
        std::fs::write(&bad, b"garbage").unwrap();
        let report = st.gc(|k| k.container_id() != "c2").unwrap();
        assert_eq!(report.corrupt, vec![bad.clone()]);
        assert!(report.removed_corrupt.is_empty());
        let released: Vec<&str> = report.released.iter().map(|a| a.container_id.as_str()).collect();
        assert_eq!(released, ["c2"]);
        assert!(bad.exists(), "a listed attachment's record may be live: GC keeps it");
        // c1's address stays taken (its record may be live), c2's is free again.
        assert_eq!(st.usage(&s).unwrap()[0].free, 253 - 2);
    }

    #[test]
    fn gc_removes_an_unreadable_record_of_an_attachment_not_listed_and_frees_everything() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let mut st = store.lock().unwrap();
        for i in 0..3 {
            st.allocate(&key(i), &s, &AllocationRequest::default()).unwrap();
        }
        let bad = store.dir().join("attachments").join("c1:eth0");
        std::fs::write(&bad, b"garbage").unwrap();
        let report = st.gc(|k| k.container_id() == "c0").unwrap();
        assert!(report.corrupt.is_empty(), "{report:?}");
        assert_eq!(report.removed_corrupt, vec![bad.clone()]);
        assert!(!bad.exists());
        // With no unreadable record left, the rebuild frees c1's address too.
        assert_eq!(st.usage(&s).unwrap()[0].free, 253 - 1);
        assert_eq!(st.attachments().unwrap().len(), 1);
    }

    #[test]
    fn releasing_an_unreadable_record_removes_it_and_frees_its_address() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/30"}]])); // one usable address besides the gateway
        let mut st = store.lock().unwrap();
        let first = st.allocate(&key(1), &s, &AllocationRequest::default()).unwrap();
        let record = store.dir().join("attachments").join("c1:eth0");
        std::fs::write(&record, b"{not json").unwrap();
        assert!(matches!(st.get(&key(1)), Err(IpamError::Corrupt { .. })));
        assert_eq!(st.release(&key(1)).unwrap(), None);
        assert!(!record.exists());
        // The range's only address is free again, and goes to the next pod.
        let next = st.allocate(&key(2), &s, &AllocationRequest::default()).unwrap();
        assert_eq!(next.ips, first.ips);
        // A record that is a symlink counts as unreadable, and only the link goes.
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), serde_json::to_vec(&next).unwrap()).unwrap();
        let link = store.dir().join("attachments").join("c3:eth0");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        assert!(matches!(st.get(&key(3)), Err(IpamError::Corrupt { .. })));
        assert_eq!(st.release(&key(3)).unwrap(), None);
        assert!(!link.exists() && outside.path().exists());
    }

    #[test]
    fn symlinks_and_foreign_writable_directories_in_the_store_are_refused() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        // The lock file, the ranges directory and the attachments directory as symlinks.
        for entry in ["lock", "ranges", "attachments"] {
            let (dir, store) = store();
            store
                .lock()
                .unwrap()
                .allocate(&key(1), &s, &AllocationRequest::default())
                .unwrap();
            let victim = dir.path().join("victim");
            std::fs::create_dir(&victim).unwrap();
            std::fs::write(victim.join("precious"), b"keep me").unwrap();
            let path = store.dir().join(entry);
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
                symlink(&victim, &path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
                symlink(victim.join("precious"), &path).unwrap();
            }
            let err = store
                .lock()
                .err()
                .unwrap_or_else(|| panic!("{entry}: a symlink was accepted"));
            assert!(matches!(err, IpamError::UnsafeStore { .. }), "{entry}: {err}");
            assert!(err.to_string().contains("symbolic link"), "{entry}: {err}");
            assert_eq!(std::fs::read(victim.join("precious")).unwrap(), b"keep me", "{entry}");
            assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 1, "{entry}");
        }
        // A bitmap that is a symlink is never mapped: it is replaced by a real one.
        let (dir, bitmap_store) = store();
        let store = bitmap_store;
        store
            .lock()
            .unwrap()
            .allocate(&key(1), &s, &AllocationRequest::default())
            .unwrap();
        let bitmap = std::fs::read_dir(store.dir().join("ranges"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let target = dir.path().join("target");
        std::fs::write(&target, std::fs::read(&bitmap).unwrap()).unwrap();
        std::fs::remove_file(&bitmap).unwrap();
        symlink(&target, &bitmap).unwrap();
        let before = std::fs::read(&target).unwrap();
        store
            .lock()
            .unwrap()
            .allocate(&key(2), &s, &AllocationRequest::default())
            .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), before, "the link's target was written");
        assert!(!std::fs::symlink_metadata(&bitmap).unwrap().file_type().is_symlink());
        // A store directory others may write is refused; one they may only read is tightened.
        let (_d, store) = self::store();
        store.lock().unwrap();
        std::fs::set_permissions(store.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = store.lock().err().expect("a world-writable store was accepted");
        assert!(err.to_string().contains("writable by group or others"), "{err}");
        std::fs::set_permissions(store.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        store.lock().unwrap();
        assert_eq!(
            std::fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn operations_on_one_attachment_are_serialised_and_del_leaves_no_lock_file() {
        let (_d, store) = store();
        let store = store.with_lock_timeout(Duration::from_millis(200));
        let held = store.lock_attachment(&key(1)).unwrap();
        // Another attachment is not held up; the same one is, until the holder is done.
        drop(store.lock_attachment(&key(2)).unwrap());
        let err = store.lock_attachment(&key(1)).unwrap_err();
        assert!(matches!(err, IpamError::LockTimeout(_)), "{err}");
        let store = store.with_lock_timeout(Duration::from_secs(10));
        let waiter = std::thread::spawn({
            let store = store.clone();
            move || store.lock_attachment(&key(1)).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(50));
        held.remove().unwrap();
        waiter.join().unwrap().unwrap();
        let inflight = store.dir().join(INFLIGHT_DIR);
        assert!(inflight.join("c1:eth0").exists(), "the waiter made a fresh lock file");
        // GC removes lock files of attachments without a record, unless one is held.
        let held = store.lock_attachment(&key(3)).unwrap();
        store.lock().unwrap().gc(|_| true).unwrap();
        assert!(!inflight.join("c1:eth0").exists() && !inflight.join("c2:eth0").exists());
        assert!(inflight.join("c3:eth0").exists(), "a held lock is not GC's");
        held.remove().unwrap();
        assert_eq!(std::fs::read_dir(&inflight).unwrap().count(), 0);
    }

    #[test]
    fn long_network_names_use_a_digest_directory() {
        let dir = tempfile::tempdir().unwrap();
        let network = "n".repeat(300);
        let store = Store::open(dir.path(), &network).unwrap();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        store
            .lock()
            .unwrap()
            .allocate(&key(1), &s, &AllocationRequest::default())
            .unwrap();
        assert!(
            store
                .dir()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("sha256-")
        );
        assert_ne!(store.dir(), Store::open(dir.path(), &"m".repeat(300)).unwrap().dir());
    }

    #[test]
    fn long_container_ids_use_a_digest_file_name() {
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        let long = "a".repeat(300);
        let k = AttachmentKey::new(&long, "eth0").unwrap();
        let mut st = store.lock().unwrap();
        st.allocate(&k, &s, &AllocationRequest::default()).unwrap();
        assert_eq!(st.get(&k).unwrap().unwrap().container_id, long);
        assert_eq!(st.attachments().unwrap()[0].key().unwrap(), k);
    }

    #[test]
    fn store_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, store) = store();
        let s = sets(json!([[{"subnet": "10.0.0.0/24"}]]));
        store
            .lock()
            .unwrap()
            .allocate(&key(1), &s, &AllocationRequest::default())
            .unwrap();
        for path in [
            store.dir().to_path_buf(),
            store.dir().join("attachments"),
            store.dir().join("ranges"),
        ] {
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o077,
                0,
                "{}",
                path.display()
            );
        }
        for sub in ["attachments", "ranges"] {
            for e in std::fs::read_dir(store.dir().join(sub)).unwrap() {
                let mode = e.unwrap().metadata().unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(usize),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![(0usize..40).prop_map(Op::Allocate), (0usize..40).prop_map(Op::Release)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
        /// Random allocate/release from four threads (each operation a separate lock
        /// acquisition, as separate plugin processes would do) never yields an address held twice.
        /// The range is smaller than the key space, so reuse and exhaustion both happen.
        #[test]
        fn concurrent_random_operations_never_duplicate(ops in proptest::collection::vec(proptest::collection::vec(op(), 200), 4)) {
            let (_d, store) = store();
            let s = sets(json!([[{"subnet": "10.0.0.0/27"}], [{"subnet": "fd00::/123"}]]));
            let holders: Arc<Mutex<HashMap<IpAddr, AttachmentKey>>> = Arc::default();
            std::thread::scope(|scope| {
                for (thread, thread_ops) in ops.iter().enumerate() {
                    let (store, s, holders) = (&store, &s, holders.clone());
                    scope.spawn(move || {
                        for op in thread_ops {
                            let mut st = store.lock().unwrap();
                            match op {
                                Op::Allocate(i) => {
                                    let k = AttachmentKey::new(&format!("t{thread}-c{i}"), "eth0").unwrap();
                                    match st.allocate(&k, s, &AllocationRequest::default()) {
                                        Ok(a) => {
                                            let mut h = holders.lock().unwrap();
                                            for ip in &a.ips {
                                                if let Some(other) = h.insert(ip.addr(), k.clone()) {
                                                    assert_eq!(other, k, "{ip} handed out twice");
                                                }
                                            }
                                        }
                                        Err(IpamError::Exhausted(_)) => {}
                                        Err(e) => panic!("{e}"),
                                    }
                                }
                                Op::Release(i) => {
                                    let k = AttachmentKey::new(&format!("t{thread}-c{i}"), "eth0").unwrap();
                                    if let Some(a) = st.release(&k).unwrap() {
                                        let mut h = holders.lock().unwrap();
                                        for ip in &a.ips {
                                            assert_eq!(h.remove(&ip.addr()).as_ref(), Some(&k));
                                        }
                                    }
                                }
                            }
                        }
                    });
                }
            });
            let mut st = store.lock().unwrap();
            let records = st.attachments().unwrap();
            let mut all: Vec<IpAddr> = records.iter().flat_map(|a| a.ips.iter().map(IpNet::addr)).collect();
            let n = all.len();
            all.sort();
            all.dedup();
            prop_assert_eq!(all.len(), n);
            prop_assert_eq!(n, holders.lock().unwrap().len());
            // The index agrees exactly with the records: nothing leaked without a crash.
            let report = st.gc(|_| true).unwrap();
            prop_assert_eq!(report.leaked_addresses_recovered, 0);
        }
    }
}
