//! The port gates' bookkeeping: which ports frontends (backends) use, and the words of the
//! datapath's bitmap of the ports none uses ([`PORTS_WITHOUT_FRONTENDS_MAP`]).
//!
//! A packet to a port no frontend has skips the service map's lookup, and one from a port no
//! backend has skips the conntrack lookups of replies. So a port's bit is cleared (in the map)
//! before the first entry that uses it is written, and set again only after the last one went:
//! the map never claims a port unused while an entry uses it. Pure: the caller writes the words.
use std::collections::{BTreeMap, BTreeSet};

use ferrynet_common::PORT_GATE_WORDS;
#[cfg(doc)]
use ferrynet_common::PORTS_WITHOUT_FRONTENDS_MAP;

/// One word of the bitmap to write: (index, value).
pub type Word = (u32, u64);

fn word_of(port: u16) -> (usize, u64) {
    (usize::from(port >> 6), 1 << (port & 63))
}

/// One gate: the ports in use, counted, and the map's words as last written.
#[derive(Debug, Clone)]
pub struct PortGate {
    users: BTreeMap<u16, usize>,
    /// The map's words (a set bit: no user).
    words: Vec<u64>,
    /// Ports whose last user went (or that were opened) since [`PortGate::close_unused`] ran.
    released: BTreeSet<u16>,
}

impl PortGate {
    /// A gate over a map holding `words` (as read at adoption; missing words read as zero),
    /// with no users counted yet.
    pub fn new(mut words: Vec<u64>) -> Self {
        words.resize(PORT_GATE_WORDS as usize, 0);
        Self {
            users: BTreeMap::new(),
            words,
            released: BTreeSet::new(),
        }
    }

    /// Counts a user of `port` (an entry that holds it).
    pub fn count(&mut self, port: u16) {
        *self.users.entry(port).or_default() += 1;
    }

    /// The word to write before an entry with `port` is, when the map marks the port unused.
    /// Until a user is counted, the port stays a candidate for [`PortGate::close_unused`] (an
    /// entry that failed to be written leaves no open port behind).
    pub fn open(&mut self, port: u16) -> Option<Word> {
        let (index, bit) = word_of(port);
        if self.words[index] & bit == 0 {
            return None;
        }
        self.released.insert(port);
        Some((index as u32, self.words[index] & !bit))
    }

    /// A user of `port` went (its entry is deleted).
    pub fn release(&mut self, port: u16) {
        if let Some(n) = self.users.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(&port);
                self.released.insert(port);
            }
        }
    }

    /// The words that mark the ports released since the last call, and still unused, as unused.
    pub fn close_unused(&mut self) -> Vec<Word> {
        let mut changed: BTreeMap<usize, u64> = BTreeMap::new();
        for port in std::mem::take(&mut self.released) {
            if self.users.contains_key(&port) {
                continue;
            }
            let (index, bit) = word_of(port);
            *changed.entry(index).or_insert(self.words[index]) |= bit;
        }
        changed
            .into_iter()
            .filter(|(index, word)| self.words[*index] != *word)
            .map(|(index, word)| (index as u32, word))
            .collect()
    }

    /// Every word that differs from what the counted users make it (at adoption).
    pub fn settle(&mut self) -> Vec<Word> {
        self.released.clear();
        let mut wanted = vec![u64::MAX; PORT_GATE_WORDS as usize];
        for port in self.users.keys() {
            let (index, bit) = word_of(*port);
            wanted[index] &= !bit;
        }
        wanted
            .into_iter()
            .enumerate()
            .filter(|(index, word)| self.words[*index] != *word)
            .map(|(index, word)| (index as u32, word))
            .collect()
    }

    /// Records that `word` was written.
    pub fn written(&mut self, (index, value): Word) {
        self.words[index as usize] = value;
    }

    /// Whether the map (as last written) marks `port` unused.
    #[cfg(test)]
    pub fn is_closed(&self, port: u16) -> bool {
        let (index, bit) = word_of(port);
        self.words[index] & bit != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(gate: &mut PortGate, words: Vec<Word>) {
        for w in words {
            gate.written(w);
        }
    }

    fn settle(gate: &mut PortGate) {
        let words = gate.settle();
        apply(gate, words);
    }

    #[test]
    fn a_fresh_map_gates_nothing_until_settled_and_then_only_unused_ports() {
        let mut gate = PortGate::new(Vec::new());
        gate.count(80);
        gate.count(80);
        gate.count(9000);
        assert!(!gate.is_closed(443), "all zeros promise nothing");
        let words = gate.settle();
        assert_eq!(
            words.len(),
            PORT_GATE_WORDS as usize,
            "every word of a zeroed map changes"
        );
        apply(&mut gate, words);
        assert!(!gate.is_closed(80));
        assert!(!gate.is_closed(9000));
        assert!(gate.is_closed(81));
        assert!(gate.is_closed(0));
        assert!(gate.is_closed(65535));
        assert!(gate.settle().is_empty(), "settled: nothing more to write");
    }

    #[test]
    fn a_port_opens_before_its_first_user_and_closes_after_its_last() {
        let mut gate = PortGate::new(Vec::new());
        settle(&mut gate);
        // First user: the word is written before the entry.
        let word = gate.open(8080).expect("closed port opens");
        assert_eq!(word.0, 8080 / 64);
        assert_eq!(word.1 & (1 << (8080 % 64)), 0);
        apply(&mut gate, vec![word]);
        gate.count(8080);
        assert!(!gate.is_closed(8080));
        // Second user: nothing to write.
        assert_eq!(gate.open(8080), None);
        gate.count(8080);
        gate.release(8080);
        assert!(gate.close_unused().is_empty(), "one user left");
        gate.release(8080);
        let words = gate.close_unused();
        assert_eq!(words.len(), 1);
        apply(&mut gate, words);
        assert!(gate.is_closed(8080));
        assert!(gate.close_unused().is_empty(), "closed once");
    }

    #[test]
    fn a_port_released_and_reused_in_one_batch_stays_open() {
        let mut gate = PortGate::new(Vec::new());
        gate.count(53);
        settle(&mut gate);
        gate.release(53);
        assert_eq!(gate.open(53), None, "still open in the map");
        gate.count(53);
        assert!(gate.close_unused().is_empty());
        assert!(!gate.is_closed(53));
    }

    #[test]
    fn a_word_shared_by_several_released_ports_is_written_once() {
        let mut gate = PortGate::new(Vec::new());
        for port in [64, 65, 66, 200] {
            gate.count(port);
        }
        settle(&mut gate);
        for port in [64, 65, 200] {
            gate.release(port);
        }
        let words = gate.close_unused();
        assert_eq!(words.iter().map(|w| w.0).collect::<Vec<_>>(), vec![1, 3]);
        apply(&mut gate, words);
        assert!(gate.is_closed(64) && gate.is_closed(65) && gate.is_closed(200));
        assert!(!gate.is_closed(66));
    }

    #[test]
    fn a_port_opened_for_an_entry_that_was_never_written_closes_again() {
        let mut gate = PortGate::new(Vec::new());
        settle(&mut gate);
        let word = gate.open(30080).expect("closed port opens");
        apply(&mut gate, vec![word]);
        // The entry's write failed: no user was counted.
        let words = gate.close_unused();
        assert_eq!(words.len(), 1);
        apply(&mut gate, words);
        assert!(gate.is_closed(30080));
    }

    #[test]
    fn releasing_an_uncounted_port_changes_nothing() {
        let mut gate = PortGate::new(Vec::new());
        gate.release(7);
        assert!(gate.close_unused().is_empty());
        assert!(!gate.is_closed(7));
    }
}
