//! The difference between what the datapath's maps hold and what the Services ask for (pure).
//!
//! The maps hold, per frontend, a service id, flags and `count` slots of backend ids. A change
//! rewrites only what changed: a new backend takes a new slot at the end; a removed one's slot is
//! filled by the last slot's backend, and the last slot goes. One endpoint change therefore
//! writes a handful of entries, whatever the number of Services or backends.
use std::collections::{BTreeMap, BTreeSet};

use super::table::{Backend, BackendState, Frontend, PortEntry};

/// One frontend as the maps hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFrontend {
    pub id: u32,
    /// Backends by slot.
    pub slots: Vec<Backend>,
    pub states: BTreeMap<Backend, BackendState>,
    /// Backends kept in the backend table for established flows, though in no slot.
    pub retained: BTreeSet<Backend>,
    pub affinity_timeout_s: Option<u32>,
    /// [`PortEntry::drop_when_empty`].
    pub drop_when_empty: bool,
    /// Its backends the backend table marks as on this node.
    pub local: BTreeSet<Backend>,
    /// [`PortEntry::source_ranges`].
    pub source_ranges: Option<BTreeSet<ipnet::IpNet>>,
    /// [`PortEntry::maglev`]: the size of its Maglev table.
    pub maglev: Option<u32>,
    /// [`PortEntry::notes_digest`] of the notes last written for it. None when not known (a
    /// frontend adopted from an earlier agent's maps): the first sync rewrites its notes.
    pub notes_digest: Option<u64>,
}

impl AppliedFrontend {
    /// Every backend this frontend keeps in the backend table.
    pub fn referenced(&self) -> impl Iterator<Item = &Backend> {
        self.slots.iter().chain(&self.retained)
    }
}

/// What to do to one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendOp {
    /// A frontend the maps do not hold.
    Create(PortEntry),
    /// A frontend whose backends, states or affinity changed.
    Update {
        // Boxed: the frontend as the maps hold it is the largest part of an op.
        old: Box<AppliedFrontend>,
        new: PortEntry,
        slots: SlotPlan,
    },
    /// A frontend no Service asks for any more.
    Delete(Frontend, AppliedFrontend),
    /// A frontend the maps hold as asked, whose notes for `explain` changed (or are not known).
    Notes { id: u32, entry: PortEntry },
}

/// How a frontend's slots change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// The slots afterwards.
    pub slots: Vec<Backend>,
    /// (slot, backend) to write.
    pub writes: Vec<(u32, Backend)>,
    /// Slots to delete (past the new end).
    pub deletes: Vec<u32>,
}

/// Stable slots: kept backends stay where they are; a removed backend's slot takes the last
/// slot's backend; new backends are appended (pure).
pub fn plan_slots(old: &[Backend], wanted: &BTreeSet<Backend>) -> SlotPlan {
    let mut slots: Vec<Backend> = old.to_vec();
    let mut writes: BTreeMap<u32, Backend> = BTreeMap::new();
    let mut i = 0;
    while i < slots.len() {
        if wanted.contains(&slots[i]) {
            i += 1;
            continue;
        }
        let last = slots.pop().expect("not empty");
        if i < slots.len() {
            slots[i] = last;
            writes.insert(i as u32, last);
        } else {
            writes.remove(&(i as u32));
        }
    }
    let kept: BTreeSet<Backend> = slots.iter().copied().collect();
    for backend in wanted.difference(&kept) {
        writes.insert(slots.len() as u32, *backend);
        slots.push(*backend);
    }
    let deletes = (slots.len()..old.len()).map(|s| s as u32).collect();
    SlotPlan {
        writes: writes.into_iter().collect(),
        slots,
        deletes,
    }
}

/// The operations that make `current` (the frontends under consideration, as the maps hold them)
/// into `desired` (pure). Frontends in `current` that no desired entry names are deleted.
pub fn diff(current: &BTreeMap<Frontend, AppliedFrontend>, desired: &[PortEntry]) -> Vec<FrontendOp> {
    let mut ops = Vec::new();
    let wanted: BTreeSet<Frontend> = desired.iter().map(|e| e.frontend).collect();
    for (frontend, applied) in current {
        if !wanted.contains(frontend) {
            ops.push(FrontendOp::Delete(*frontend, applied.clone()));
        }
    }
    for entry in desired {
        match current.get(&entry.frontend) {
            None => ops.push(FrontendOp::Create(entry.clone())),
            Some(old) => {
                let backends: BTreeSet<Backend> = entry.backends.keys().copied().collect();
                let same = old.slots.iter().copied().collect::<BTreeSet<_>>() == backends
                    && old.states == entry.backends
                    && old.retained == entry.retained
                    && old.affinity_timeout_s == entry.affinity_timeout_s
                    && old.drop_when_empty == entry.drop_when_empty
                    && old.local == entry.local_backends
                    && old.source_ranges == entry.source_ranges
                    && old.maglev == entry.maglev;
                if !same {
                    ops.push(FrontendOp::Update {
                        old: Box::new(old.clone()),
                        new: entry.clone(),
                        slots: plan_slots(&old.slots, &backends),
                    });
                } else if old.notes_digest != Some(entry.notes_digest()) {
                    ops.push(FrontendOp::Notes {
                        id: old.id,
                        entry: entry.clone(),
                    });
                }
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::services::table::{Exclusion, PortNotes, Protocol, Scope, ServiceRef};

    fn b(last: u8) -> Backend {
        Backend {
            addr: IpAddr::from([10, 244, 1, last]),
            port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    fn set(backends: &[u8]) -> BTreeSet<Backend> {
        backends.iter().map(|n| b(*n)).collect()
    }

    fn frontend(last: u8) -> Frontend {
        Frontend {
            addr: IpAddr::from([10, 96, 0, last]),
            port: 80,
            protocol: Protocol::Tcp,
            scope: Scope::Internal,
        }
    }

    fn entry(f: u8, backends: &[u8]) -> PortEntry {
        PortEntry {
            frontend: frontend(f),
            service: ServiceRef {
                namespace: "default".into(),
                name: format!("s{f}"),
            },
            port_name: String::new(),
            backends: backends.iter().map(|n| (b(*n), BackendState::Active)).collect(),
            retained: BTreeSet::new(),
            affinity_timeout_s: None,
            local_backends: BTreeSet::new(),
            source_ranges: None,
            drop_when_empty: false,
            maglev: None,
            notes: PortNotes::default(),
        }
    }

    fn applied(id: u32, slots: &[u8]) -> AppliedFrontend {
        AppliedFrontend {
            id,
            slots: slots.iter().map(|n| b(*n)).collect(),
            states: slots.iter().map(|n| (b(*n), BackendState::Active)).collect(),
            retained: BTreeSet::new(),
            affinity_timeout_s: None,
            drop_when_empty: false,
            local: BTreeSet::new(),
            source_ranges: None,
            maglev: None,
            // As written for `entry(id, ..)`.
            notes_digest: Some(entry(id as u8, &[]).notes_digest()),
        }
    }

    #[test]
    fn slots_change_only_where_backends_changed() {
        // One backend added: one write, at the end.
        let plan = plan_slots(&[b(1), b(2), b(3)], &set(&[1, 2, 3, 4]));
        assert_eq!(plan.slots, [b(1), b(2), b(3), b(4)]);
        assert_eq!(plan.writes, [(3, b(4))]);
        assert!(plan.deletes.is_empty());
        // One removed from the middle: the last fills its slot, the last slot goes.
        let plan = plan_slots(&[b(1), b(2), b(3), b(4)], &set(&[1, 3, 4]));
        assert_eq!(plan.slots, [b(1), b(4), b(3)]);
        assert_eq!(plan.writes, [(1, b(4))]);
        assert_eq!(plan.deletes, [3]);
        // The last one removed: no write, one delete.
        let plan = plan_slots(&[b(1), b(2)], &set(&[1]));
        assert_eq!((plan.writes.len(), plan.deletes.as_slice()), (0, &[1][..]));
        // Everything replaced.
        let plan = plan_slots(&[b(1), b(2)], &set(&[5, 6, 7]));
        assert_eq!(plan.slots.len(), 3);
        assert_eq!(plan.writes.len(), 3);
        assert!(plan.deletes.is_empty());
        // All gone.
        let plan = plan_slots(&[b(1), b(2)], &set(&[]));
        assert_eq!(
            (plan.slots.len(), plan.writes.len(), plan.deletes.as_slice()),
            (0, 0, &[0, 1][..])
        );
    }

    #[test]
    fn slot_plans_always_end_with_exactly_the_wanted_backends() {
        // Every subset of 1..=5 to every subset: the result is the wanted set, in at most
        // |added| + |removed| writes.
        for old_mask in 0u32..32 {
            for new_mask in 0u32..32 {
                let old: Vec<Backend> = (0..5)
                    .filter(|i| old_mask & (1 << i) != 0)
                    .map(|i| b(i as u8))
                    .collect();
                let wanted: BTreeSet<Backend> = (0..5)
                    .filter(|i| new_mask & (1 << i) != 0)
                    .map(|i| b(i as u8))
                    .collect();
                let plan = plan_slots(&old, &wanted);
                assert_eq!(plan.slots.iter().copied().collect::<BTreeSet<_>>(), wanted);
                assert_eq!(plan.slots.len(), wanted.len());
                let changed = (old_mask ^ new_mask).count_ones() as usize;
                assert!(plan.writes.len() <= changed, "{old:?} -> {wanted:?}: {plan:?}");
                // Replaying the plan on the old slots gives the new ones.
                let mut replay: Vec<Option<Backend>> = old.iter().copied().map(Some).collect();
                replay.resize(old.len().max(plan.slots.len()), None);
                for (slot, backend) in &plan.writes {
                    replay[*slot as usize] = Some(*backend);
                }
                for slot in &plan.deletes {
                    replay[*slot as usize] = None;
                }
                let replayed: Vec<Backend> = replay.into_iter().flatten().collect();
                assert_eq!(replayed, plan.slots);
            }
        }
    }

    #[test]
    fn diff_creates_updates_and_deletes_only_what_changed() {
        let current: BTreeMap<Frontend, AppliedFrontend> = [
            (frontend(1), applied(1, &[1, 2])),
            (frontend(2), applied(2, &[3])),
            (frontend(3), applied(3, &[4])),
        ]
        .into();
        let desired = [entry(1, &[1, 2]), entry(2, &[3, 5]), entry(4, &[6])];
        let ops = diff(&current, &desired);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(&ops[0], FrontendOp::Delete(f, a) if *f == frontend(3) && a.id == 3));
        assert!(matches!(&ops[1], FrontendOp::Update { old, slots, .. } if old.id == 2 && slots.writes == [(1, b(5))]));
        assert!(matches!(&ops[2], FrontendOp::Create(e) if e.frontend == frontend(4)));
        // Converged: nothing.
        let current: BTreeMap<Frontend, AppliedFrontend> = [(frontend(1), applied(1, &[1, 2]))].into();
        assert!(diff(&current, &[entry(1, &[2, 1])]).is_empty());
        // A state or affinity change alone is an update with no slot writes.
        let mut terminating = entry(1, &[1, 2]);
        terminating.backends.insert(b(2), BackendState::Terminating);
        let ops = diff(&current, &[terminating]);
        assert!(matches!(&ops[0], FrontendOp::Update { slots, .. } if slots.writes.is_empty()));
        let mut sticky = entry(1, &[1, 2]);
        sticky.affinity_timeout_s = Some(30);
        assert_eq!(diff(&current, &[sticky]).len(), 1);
        // So is a change of the drop policy, or of which backends are on this node (maps an
        // earlier agent wrote without the mark get it, in place).
        let mut dropping = entry(1, &[1, 2]);
        dropping.drop_when_empty = true;
        assert_eq!(diff(&current, &[dropping]).len(), 1);
        let mut guarded = entry(1, &[1, 2]);
        guarded.source_ranges = Some(BTreeSet::new());
        assert_eq!(diff(&current, &[guarded]).len(), 1);
        let mut local = entry(1, &[1, 2]);
        local.local_backends.insert(b(1));
        let ops = diff(&current, &[local]);
        assert!(matches!(&ops[0], FrontendOp::Update { slots, .. } if slots.writes.is_empty()));
        // And of the load balancing (Maglev on, or another table size).
        let mut consistent = entry(1, &[1, 2]);
        consistent.maglev = Some(251);
        assert_eq!(diff(&current, &[consistent.clone()]).len(), 1);
        let hashed: BTreeMap<Frontend, AppliedFrontend> = [(
            frontend(1),
            AppliedFrontend {
                maglev: Some(251),
                ..applied(1, &[1, 2])
            },
        )]
        .into();
        assert!(diff(&hashed, &[consistent.clone()]).is_empty());
        consistent.maglev = Some(257);
        assert_eq!(diff(&hashed, &[consistent]).len(), 1);
    }

    #[test]
    fn notes_that_change_alone_are_rewritten_without_touching_the_maps() {
        let current: BTreeMap<Frontend, AppliedFrontend> = [(frontend(1), applied(1, &[1, 2]))].into();
        // An endpoint that is not ready joins: the backends stay, `explain` must name it.
        let mut excluded = entry(1, &[1, 2]);
        excluded.notes.excluded.push((b(3), Exclusion::NotReady));
        let ops = diff(&current, std::slice::from_ref(&excluded));
        assert_eq!(ops, [FrontendOp::Notes { id: 1, entry: excluded }]);
        // So does a renamed port.
        let mut renamed = entry(1, &[1, 2]);
        renamed.port_name = "web".into();
        assert!(matches!(
            &diff(&current, &[renamed])[..],
            [FrontendOp::Notes { id: 1, .. }]
        ));
        // Notes not known (a frontend adopted from an earlier agent): written once.
        let adopted: BTreeMap<Frontend, AppliedFrontend> = [(
            frontend(1),
            AppliedFrontend {
                notes_digest: None,
                ..applied(1, &[1, 2])
            },
        )]
        .into();
        assert!(matches!(
            &diff(&adopted, &[entry(1, &[1, 2])])[..],
            [FrontendOp::Notes { id: 1, .. }]
        ));
        // A change to the maps writes the notes with it: one update, no notes op besides.
        let mut both = entry(1, &[1]);
        both.notes.excluded.push((b(2), Exclusion::NotReady));
        assert!(matches!(&diff(&current, &[both])[..], [FrontendOp::Update { .. }]));
    }
}
