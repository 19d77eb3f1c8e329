//! The per-range allocation index: one bit per address, memory-mapped from a file.
//!
//! The bitmap is an index, not the record of who owns what (that is the attachment records). The
//! store keeps one invariant: the bits are a superset of the addresses the records hold. A set bit
//! with no record is a leak that GC repairs by rebuilding the bitmap from the records. A clear bit
//! for a held address would be a duplicate, and no ordering of writes can produce one.
//!
//! Updates are single aligned 8-byte stores into the mapping, so a process killed at any moment
//! leaves every word either old or new. The file is created whole, through a temporary file and a
//! rename, so a partial bitmap never becomes visible.
//!
//! Finding a free address scans words from the cursor, so its cost is bounded by the range size
//! divided by 64 (1024 word loads for a full /16) and does not grow with the addresses in use.
use std::{
    fs::{File, OpenOptions},
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use std::os::unix::fs::OpenOptionsExt;

use memmap2::MmapMut;

use crate::{
    config::Range,
    error::{IpamError, Result},
    fsutil,
};

const MAGIC: &[u8; 8] = b"FNIPAM\x00\x01";
const HEADER_LEN: usize = 64;
const OFF_SIZE: usize = 8;
const OFF_CURSOR: usize = 16;
const OFF_START: usize = 24;
const OFF_FAMILY: usize = 40;

pub struct Bitmap {
    path: PathBuf,
    map: MmapMut,
    start: IpAddr,
    len: u64,
}

impl Bitmap {
    /// Writes a new bitmap for `range` with exactly `used` set, replacing any existing file.
    pub fn create(path: &Path, range: &Range, used: impl IntoIterator<Item = IpAddr>, cursor: u64) -> Result<Self> {
        Self::write(path, range.start, range.len(), used, cursor)
    }

    /// Rewrites this bitmap, same range and cursor, with exactly `used` set.
    pub fn rebuild(self, used: impl IntoIterator<Item = IpAddr>) -> Result<Self> {
        let (path, start, len, cursor) = (self.path.clone(), self.start, self.len, self.cursor());
        drop(self);
        Self::write(&path, start, len, used, cursor)
    }

    fn write(
        path: &Path,
        start: IpAddr,
        len: u64,
        used: impl IntoIterator<Item = IpAddr>,
        cursor: u64,
    ) -> Result<Self> {
        let words = len.div_ceil(64) as usize;
        let mut bytes = vec![0u8; HEADER_LEN + words * 8];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[OFF_SIZE..OFF_SIZE + 8].copy_from_slice(&len.to_le_bytes());
        bytes[OFF_CURSOR..OFF_CURSOR + 8].copy_from_slice(&cursor.to_le_bytes());
        bytes[OFF_START..OFF_START + 16].copy_from_slice(&start_bytes(start));
        bytes[OFF_FAMILY] = if start.is_ipv4() { 4 } else { 6 };
        for ip in used {
            if let Some(offset) = offset_in(start, len, ip) {
                let at = HEADER_LEN + (offset / 64) as usize * 8;
                let mut word = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
                word |= 1 << (offset % 64);
                bytes[at..at + 8].copy_from_slice(&word.to_le_bytes());
            }
        }
        fsutil::write_atomic(path, |f: &mut File| f.write_all(&bytes))?;
        match Self::open(path)? {
            Some(bitmap) if bitmap.start == start && bitmap.len == len => Ok(bitmap),
            _ => Err(IpamError::Corrupt {
                path: path.into(),
                reason: "bitmap unreadable right after it was written".into(),
            }),
        }
    }

    /// Maps an existing bitmap, whatever range it was written for (the header says).
    /// `Ok(None)` means there is no usable bitmap at `path`: absent, or not a whole bitmap file.
    pub fn open(path: &Path) -> Result<Option<Self>> {
        // A symlink is not a bitmap the store wrote: mapping it would write into whatever it
        // points at. It counts as absent, and rebuilding replaces the link itself.
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || fsutil::is_symlink_refusal(&e) => return Ok(None),
            Err(e) => return Err(IpamError::io(path, e)),
        };
        // SAFETY: the file is only ever modified through mappings like this one, by processes that
        // hold the store lock, and its length never changes after creation.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| IpamError::io(path, e))?;
        let actual = map.len() as u64;
        if actual < HEADER_LEN as u64 || &map[..8] != MAGIC {
            return Ok(None);
        }
        let len = u64::from_le_bytes(map[OFF_SIZE..OFF_SIZE + 8].try_into().expect("8 bytes"));
        let raw: [u8; 16] = map[OFF_START..OFF_START + 16].try_into().expect("16 bytes");
        let start = match (map[OFF_FAMILY], std::net::Ipv6Addr::from(raw)) {
            (4, v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return Ok(None),
            },
            (6, v6) => IpAddr::V6(v6),
            _ => return Ok(None),
        };
        if actual != HEADER_LEN as u64 + len.div_ceil(64) * 8 {
            return Ok(None);
        }
        Ok(Some(Self {
            path: path.into(),
            map,
            start,
            len,
        }))
    }

    /// Whether this bitmap indexes exactly `range`'s addresses.
    pub fn covers_exactly(&self, range: &Range) -> bool {
        self.start == range.start && self.len == range.len()
    }

    /// Position of `ip` in this bitmap, if it indexes that address.
    pub fn offset_of(&self, ip: IpAddr) -> Option<u64> {
        offset_in(self.start, self.len, ip)
    }

    fn word(&self, index: usize) -> u64 {
        let at = HEADER_LEN + index * 8;
        u64::from_le_bytes(self.map[at..at + 8].try_into().expect("8 bytes"))
    }

    fn set_word(&mut self, index: usize, value: u64) {
        let at = HEADER_LEN + index * 8;
        // One aligned 8-byte store: a kill leaves the old or the new word, never a mix.
        let slot: &mut [u8; 8] = (&mut self.map[at..at + 8]).try_into().expect("8 bytes");
        *slot = value.to_le_bytes();
    }

    pub fn is_set(&self, offset: u64) -> bool {
        offset < self.len && self.word((offset / 64) as usize) & (1 << (offset % 64)) != 0
    }

    pub fn set(&mut self, offset: u64) {
        let index = (offset / 64) as usize;
        let word = self.word(index);
        self.set_word(index, word | (1 << (offset % 64)));
    }

    pub fn clear(&mut self, offset: u64) {
        let index = (offset / 64) as usize;
        let word = self.word(index);
        self.set_word(index, word & !(1 << (offset % 64)));
    }

    /// The offset most recently handed out; allocation continues after it.
    pub fn cursor(&self) -> u64 {
        u64::from_le_bytes(self.map[OFF_CURSOR..OFF_CURSOR + 8].try_into().expect("8 bytes"))
    }

    pub fn set_cursor(&mut self, offset: u64) {
        let slot: &mut [u8; 8] = (&mut self.map[OFF_CURSOR..OFF_CURSOR + 8]).try_into().expect("8 bytes");
        *slot = offset.to_le_bytes();
    }

    /// The first clear bit strictly after `after`, wrapping around once, for which `skip` is
    /// false. Starting after the previous allocation (next-fit) means a just-freed address is the
    /// last candidate, not the first: it is reused only after the whole range has been cycled.
    pub fn next_free(&self, after: u64, skip: impl Fn(u64) -> bool) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let start = (after.wrapping_add(1)) % self.len;
        let words = self.len.div_ceil(64) as usize;
        let first_word = (start / 64) as usize;
        // Visit words first_word..words, then 0..=first_word (the last visit covers the bits of
        // first_word below `start`).
        for step in 0..=words {
            let index = (first_word + step) % words;
            let mut free = !self.word(index);
            if step == 0 {
                free &= u64::MAX << (start % 64);
            } else if step == words {
                free &= !(u64::MAX << (start % 64));
            }
            while free != 0 {
                let bit = u64::from(free.trailing_zeros());
                let offset = index as u64 * 64 + bit;
                if offset >= self.len {
                    break;
                }
                if !skip(offset) {
                    return Some(offset);
                }
                free &= free - 1;
            }
        }
        None
    }

    pub fn count_set(&self) -> u64 {
        let words = self.len.div_ceil(64) as usize;
        (0..words).map(|i| u64::from(self.word(i).count_ones())).sum()
    }
}

fn offset_in(start: IpAddr, len: u64, ip: IpAddr) -> Option<u64> {
    let distance = match (start, ip) {
        (IpAddr::V4(s), IpAddr::V4(i)) => u64::from(u32::from(i).checked_sub(u32::from(s))?),
        (IpAddr::V6(s), IpAddr::V6(i)) => u64::try_from(u128::from(i).checked_sub(u128::from(s))?).ok()?,
        _ => return None,
    };
    (distance < len).then_some(distance)
}

/// The range start as 16 bytes (IPv4 mapped into IPv6), to recognise a bitmap of another range.
fn start_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IpamConfig;
    use serde_json::json;

    fn range(subnet: &str) -> Range {
        IpamConfig::from_value(&json!({"ranges": [[{"subnet": subnet}]]}))
            .unwrap()
            .range_sets[0]
            .ranges[0]
    }

    #[test]
    fn create_open_set_clear() {
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.0.0.0/24");
        let path = dir.path().join("b");
        let used = [
            "10.0.0.3".parse().unwrap(),
            "10.0.0.200".parse().unwrap(),
            "10.9.9.9".parse().unwrap(),
        ];
        let mut b = Bitmap::create(&path, &r, used, 7).unwrap();
        assert_eq!(b.count_set(), 2);
        assert_eq!(b.cursor(), 7);
        let off = r.offset_of("10.0.0.3".parse().unwrap()).unwrap();
        assert!(b.is_set(off));
        b.clear(off);
        b.set(0);
        drop(b);
        let b = Bitmap::open(&path).unwrap().unwrap();
        assert!(!b.is_set(off));
        assert!(b.is_set(0));
        assert!(b.covers_exactly(&r));
        assert!(!b.covers_exactly(&range("10.0.1.0/24")));
        assert_eq!(b.offset_of("10.0.0.3".parse().unwrap()), Some(off));
        assert_eq!(b.offset_of("10.0.1.3".parse().unwrap()), None);
        assert_eq!(b.offset_of("::1".parse().unwrap()), None);
        assert!(Bitmap::open(&dir.path().join("absent")).unwrap().is_none());
        std::fs::write(
            dir.path().join("junk"),
            b"not a bitmap at all, just some bytes that are long enough to pass",
        )
        .unwrap();
        assert!(Bitmap::open(&dir.path().join("junk")).unwrap().is_none());
    }

    #[test]
    fn next_free_is_next_fit_and_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.0.0.0/24"); // 254 addresses
        let mut b = Bitmap::create(&dir.path().join("b"), &r, [], 0).unwrap();
        assert_eq!(b.next_free(0, |_| false), Some(1));
        assert_eq!(b.next_free(252, |_| false), Some(253));
        assert_eq!(b.next_free(253, |_| false), Some(0));
        for i in 0..r.len() {
            b.set(i);
        }
        assert_eq!(b.next_free(10, |_| false), None);
        b.clear(5);
        assert_eq!(b.next_free(10, |_| false), Some(5));
        assert_eq!(b.next_free(4, |_| false), Some(5));
        assert_eq!(b.next_free(5, |_| false), Some(5));
        assert_eq!(b.next_free(5, |o| o == 5), None);
    }

    #[test]
    fn next_free_crosses_word_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let r = range("10.0.0.0/16");
        let mut b = Bitmap::create(&dir.path().join("b"), &r, [], 0).unwrap();
        for i in 0..r.len() {
            if i != 40_000 {
                b.set(i);
            }
        }
        assert_eq!(b.next_free(50_000, |_| false), Some(40_000));
        assert_eq!(b.next_free(39_999, |_| false), Some(40_000));
        assert_eq!(b.count_set(), r.len() - 1);
    }
}
