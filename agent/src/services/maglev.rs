//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), for external flows (pure).
//!
//! Each backend gets a permutation of the table's `size` entries (a prime), from two hashes of
//! its identity; the backends take turns claiming the next free entry of their permutation until
//! the table is full. Every backend ends up with `size / n` entries, give or take one, and a
//! change of one backend moves little more than that backend's share. The table depends only on
//! the set of backends, by address and port, never on this node's ids or on the order the
//! endpoints were listed in: every node computes the same table, so a flow that ECMP sends to
//! any of them reaches the same backend.
use super::table::Backend;

/// Whether `size` may be a table's size: a prime within the datapath's bounds.
pub fn valid_table_size(size: u32) -> bool {
    (ferrynet_common::MIN_MAGLEV_TABLE_SIZE..=ferrynet_common::MAX_MAGLEV_TABLE_SIZE).contains(&size) && is_prime(size)
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// 64-bit FNV-1a: fixed by its definition (not by a library's choice that may change between
/// versions), so agents of different versions agree.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits are weak on short inputs: finish with a 64-bit mix.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// A backend's identity as every node sees it.
fn identity(backend: &Backend) -> Vec<u8> {
    let mut out = match backend.addr {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    out.extend_from_slice(&backend.port.to_be_bytes());
    out.push(backend.protocol.number());
    out
}

/// The lookup table: entry `i` holds the index (into `backends`, which must be sorted and
/// without duplicates) of the backend that flows hashing to `i` go to. Empty without backends.
pub fn table(backends: &[Backend], size: u32) -> Vec<u32> {
    debug_assert!(backends.windows(2).all(|w| w[0] < w[1]), "backends sorted and unique");
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    let permutations: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let id = identity(b);
            let offset = fnv1a(0, &id) % m;
            // A skip in 1..m: coprime with the prime m, so the permutation visits every entry.
            let skip = fnv1a(0x5bd1_e995, &id) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    const FREE: u32 = u32::MAX;
    let mut entries = vec![FREE; size as usize];
    let mut next = vec![0u64; backends.len()];
    let mut filled = 0u32;
    loop {
        for (i, (offset, skip)) in permutations.iter().enumerate() {
            let mut candidate = (offset + next[i] * skip) % m;
            while entries[candidate as usize] != FREE {
                next[i] += 1;
                candidate = (offset + next[i] * skip) % m;
            }
            entries[candidate as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size {
                return entries;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::services::table::Protocol;

    fn backends(n: u8) -> Vec<Backend> {
        let mut out: Vec<Backend> = (1..=n)
            .map(|i| Backend {
                addr: IpAddr::from([10, 244, i % 3, i]),
                port: 8080,
                protocol: Protocol::Tcp,
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn sizes_must_be_primes_within_bounds() {
        assert!(valid_table_size(16_381));
        assert!(valid_table_size(251));
        assert!(valid_table_size(131_071));
        assert!(!valid_table_size(16_384));
        assert!(!valid_table_size(16_383));
        assert!(!valid_table_size(13));
        assert!(!valid_table_size(0));
        assert!(!valid_table_size(262_139));
    }

    #[test]
    fn every_backend_gets_its_share() {
        let b = backends(7);
        let t = table(&b, 16_381);
        assert_eq!(t.len(), 16_381);
        let mut counts = [0u32; 7];
        for i in &t {
            counts[*i as usize] += 1;
        }
        // Each round, every backend claims one entry: shares differ by at most one.
        let share = 16_381 / 7;
        for c in counts {
            assert!(c == share || c == share + 1, "{counts:?}");
        }
    }

    #[test]
    fn the_table_depends_only_on_the_set() {
        let b = backends(5);
        assert_eq!(table(&b, 251), table(&b.clone(), 251));
        // Another node holds the same backends under other ids, listed in another order: the
        // caller sorts them, and the table names the same backend for every entry.
        let mut shuffled = b.clone();
        shuffled.reverse();
        shuffled.sort();
        assert_eq!(table(&shuffled, 251), table(&b, 251));
        assert!(table(&[], 251).is_empty());
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_share() {
        for n in [4, 10, 50] {
            removing_one_of(n);
        }
    }

    fn removing_one_of(n: u8) {
        let before_set = backends(n);
        let before = table(&before_set, 16_381);
        let removed = before_set[3];
        let after_set: Vec<Backend> = before_set.iter().copied().filter(|b| *b != removed).collect();
        let after = table(&after_set, 16_381);
        let (mut moved_others, mut others) = (0, 0);
        for (old, new) in before.iter().zip(&after) {
            let old = before_set[*old as usize];
            let new = after_set[*new as usize];
            if old == removed {
                continue;
            }
            others += 1;
            if old != new {
                moved_others += 1;
            }
        }
        // Entries of the backends that stay: Maglev's paper bounds the disruption to a few
        // percent.
        let fraction = f64::from(moved_others) / f64::from(others);
        eprintln!("{n} backends, one removed: {moved_others} of {others} entries of the others moved");
        assert!(
            fraction < 0.02,
            "{moved_others} of {others} entries of kept backends moved"
        );
        // Adding it back restores the first table exactly.
        assert_eq!(table(&before_set, 16_381), before);
    }
}
