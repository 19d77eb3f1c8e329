//! Purging the flows of removed backends and frontends, off the controller's thread.
//!
//! A purge walks the conntrack and affinity maps from userspace, two syscalls per entry: on a
//! node whose conntrack map is full, the better part of a second. The controller hands each
//! batch's removals to this worker and goes on programming; the worker reports back, and only
//! then does the controller free the removed ids ([`ServiceMaps::release_removed`]), so that no
//! new backend or frontend takes an id whose old flows are still in the maps. Meanwhile the
//! removed backends stay marked in the pinned doomed map: an agent killed mid-purge finds them
//! there when it starts again, and purges them before their ids are reused.
//!
//! [`ServiceMaps::release_removed`]: super::maps::ServiceMaps::release_removed
use std::{collections::BTreeSet, sync::mpsc, thread::JoinHandle};

use aya::maps::{HashMap, Map, MapData, MapError};
use ferrynet_common::*;
use ferrynet_kernel::pins::PinLayout;
use tokio::sync::mpsc::UnboundedSender;

use super::maps::ServiceMapError;
use crate::warning::ErrorList;

/// One batch's removals: the ids of backends and frontends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removals {
    pub backends: BTreeSet<u32>,
    pub frontends: BTreeSet<u32>,
}

impl Removals {
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty() && self.frontends.is_empty()
    }
}

/// A finished purge: what it was for, how many entries went, and what failed.
#[derive(Debug)]
pub struct Purged {
    pub removals: Removals,
    pub entries: usize,
    pub errors: ErrorList<ServiceMapError>,
}

/// The worker thread, fed through a queue: purges run one after another, in the order the
/// batches removed things.
pub struct Purger {
    jobs: Option<mpsc::Sender<Removals>>,
    thread: Option<JoinHandle<()>>,
}

impl Purger {
    /// Starts the worker on the maps pinned under `pins`; each finished purge goes to `done`.
    pub fn start(pins: PinLayout, done: UnboundedSender<Purged>) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Removals>();
        let thread = std::thread::Builder::new().name("purge".into()).spawn(move || {
            for removals in queue {
                if done.send(run(&pins, removals)).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues a purge. Err gives the removals back when the worker is gone.
    pub fn submit(&self, removals: Removals) -> Result<(), Removals> {
        match &self.jobs {
            Some(jobs) => jobs.send(removals).map_err(|e| e.0),
            None => Err(removals),
        }
    }
}

/// The queued purges finish before the worker goes (a restarted controller must not race the
/// old one's walks).
impl Drop for Purger {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open<K: aya::Pod, V: aya::Pod>(
    pins: &PinLayout,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, ServiceMapError> {
    let error = |source: MapError| ServiceMapError::Map { map: name, source };
    let data = MapData::from_pin(pins.map(name)).map_err(error)?;
    let map = Map::from_map_data(data).map_err(error)?;
    HashMap::try_from(map).map_err(error)
}

/// Purges `removals` on this thread (the worker's job, and the controller's when the worker is
/// gone).
pub fn run(pins: &PinLayout, removals: Removals) -> Purged {
    let (entries, errors) = match purge(pins, &removals) {
        Ok(entries) => (entries, ErrorList::default()),
        Err(errors) => (0, errors),
    };
    Purged {
        removals,
        entries,
        errors,
    }
}

/// Removes the conntrack and affinity entries of `removals` from the maps pinned under `pins`;
/// returns how many went.
pub fn purge(pins: &PinLayout, removals: &Removals) -> Result<usize, ErrorList<ServiceMapError>> {
    let mut errors = ErrorList::default();
    let mut purged = 0;
    if removals.is_empty() {
        return Ok(0);
    }
    let gone =
        |backend: u32, service: u32| removals.backends.contains(&backend) || removals.frontends.contains(&service);
    // Keys are collected first: removing while walking would restart the kernel's iteration.
    macro_rules! purge_map {
        ($name:expr, $k:ty, $v:ty, $is_gone:expr) => {
            match open::<$k, $v>(pins, $name) {
                Ok(mut map) => {
                    let doomed: Vec<$k> = map
                        .iter()
                        .filter_map(Result::ok)
                        .filter(|(k, v)| $is_gone(k, v))
                        .map(|(k, _)| k)
                        .collect();
                    for key in doomed {
                        if map.remove(&key).is_ok() {
                            purged += 1;
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        };
    }
    purge_map!(CT4_MAP, CtKey4, CtValue, |_: &CtKey4, v: &CtValue| gone(
        v.backend, v.service
    ));
    purge_map!(CT6_MAP, CtKey6, CtValue, |_: &CtKey6, v: &CtValue| gone(
        v.backend, v.service
    ));
    purge_map!(
        AFFINITY4_MAP,
        AffinityKey4,
        AffinityValue,
        |k: &AffinityKey4, v: &AffinityValue| gone(v.backend, k.service)
    );
    purge_map!(
        AFFINITY6_MAP,
        AffinityKey6,
        AffinityValue,
        |k: &AffinityKey6, v: &AffinityValue| gone(v.backend, k.service)
    );
    errors.into_result().map(|()| purged)
}
