//! Notes on each frontend for `ferrynet-agent explain`: which Service and port it is, the
//! traffic policy and topology in force, and why each excluded endpoint is excluded. The maps say
//! how traffic is translated; these say why.
//!
//! They live in the agent's state directory, in [`NOTE_BUCKETS`] files (`bucket-{id % 256}.json`,
//! each a JSON object of frontend id → notes): a start with 15,000 frontends writes 256 files
//! rather than 15,000 (a file each cost a create and a rename on the node's disk, seconds of a
//! core after every start), and one frontend's change rewrites one file of a few dozen notes,
//! whatever the number of frontends. A [`NotesWriter`] thread writes them, so that a start
//! programs the maps without waiting for the files.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
};

use tokio::sync::oneshot;
use tracing::warn;

use super::table::PortEntry;

/// How many files the notes are spread over.
pub const NOTE_BUCKETS: u32 = 256;
const BUCKET_PREFIX: &str = "bucket-";

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("service-notes")
}

fn bucket_of(id: u32) -> u32 {
    id % NOTE_BUCKETS
}

fn bucket_file(dir: &Path, bucket: u32) -> PathBuf {
    dir.join(format!("{BUCKET_PREFIX}{bucket}.json"))
}

/// The notes of one bucket, by frontend id.
type Bucket = BTreeMap<u32, PortEntry>;

/// A bucket as the disk holds it: empty when it has no file, or one whose text is not a bucket's
/// (it is rewritten whole at its next change). An error reading it is an error: a bucket written
/// back after a failed read would lose every note in it.
fn read_bucket(dir: &Path, bucket: u32) -> std::io::Result<Bucket> {
    match std::fs::read(bucket_file(dir, bucket)) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_default()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Bucket::new()),
        Err(e) => Err(e),
    }
}

/// Writes a bucket (an empty one: its file goes). Not synced: a start writes hundreds, and a
/// note lost to a power cut costs `explain` its reasons until the frontend next changes,
/// nothing else.
fn write_bucket(dir: &Path, bucket: u32, notes: &Bucket) -> std::io::Result<()> {
    let path = bucket_file(dir, bucket);
    if notes.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_vec(notes).map_err(std::io::Error::other)?;
    // No compare with the file first: a round writes only the buckets its operations touched.
    crate::cni_config::write_atomic(&path, &text, 0o644, crate::cni_config::Durability::Unsynced)
}

/// Writes the notes of frontend `id` (its bucket read, changed and written back; the agent's
/// own writes go through [`NotesWriter`], which writes each bucket once per round).
#[cfg(test)]
pub fn write(dir: &Path, id: u32, entry: &PortEntry) -> std::io::Result<()> {
    let bucket = bucket_of(id);
    let mut notes = read_bucket(dir, bucket)?;
    notes.insert(id, entry.clone());
    write_bucket(dir, bucket, &notes)
}

/// The notes of frontend `id`, if the agent wrote them.
pub fn read(dir: &Path, id: u32) -> Option<PortEntry> {
    read_bucket(dir, bucket_of(id)).ok()?.remove(&id)
}

/// Reads notes by frontend id, each bucket's file once (a listing of every frontend).
pub struct NotesReader {
    dir: PathBuf,
    buckets: HashMap<u32, Bucket>,
}

impl NotesReader {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            buckets: HashMap::new(),
        }
    }

    pub fn get(&mut self, id: u32) -> Option<PortEntry> {
        let bucket = bucket_of(id);
        let dir = &self.dir;
        self.buckets
            .entry(bucket)
            .or_insert_with(|| read_bucket(dir, bucket).unwrap_or_default())
            .get(&id)
            .cloned()
    }
}

/// Moves the notes an agent before the buckets left (one `{id}.json` per frontend) into their
/// buckets, and removes whatever else is not a bucket file. Notes found here are newer than any
/// bucket's: a writer that starts removes them, so an older agent wrote them after it.
fn migrate_strays(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut round = Round::new(dir);
    let mut strays = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_bucket = name
            .strip_prefix(BUCKET_PREFIX)
            .and_then(|rest| rest.strip_suffix(".json"))
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n < NOTE_BUCKETS);
        if is_bucket || name.starts_with('.') {
            continue;
        }
        let old_note = name
            .strip_suffix(".json")
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(|id| Some((id, serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?)));
        if let Some((id, note)) = old_note {
            round.take(NoteOp::Write(id, Box::new(note)));
        }
        strays.push(entry.path());
    }
    if round.finish().is_ok() {
        for stray in strays {
            let _ = std::fs::remove_file(stray);
        }
    }
}

enum NoteOp {
    Write(u32, Box<PortEntry>),
    Remove(u32),
    /// Answered once everything sent before it is on disk.
    Flush(oneshot::Sender<()>),
}

/// Writes and removes notes in order, on a thread of its own (which ends with the writer).
pub struct NotesWriter {
    ops: Option<mpsc::Sender<NoteOp>>,
    /// Operations sent and not yet done.
    pending: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A backlog above this (a start's thousands of notes) is not waited for.
const FLUSH_AT_MOST: usize = 256;

/// The buckets one round of the writer changes: read from disk when first touched, written
/// once at the round's end, then dropped (the writer holds no notes between rounds).
struct Round<'a> {
    dir: &'a Path,
    /// None: the bucket's file could not be read, and is left as it is.
    buckets: HashMap<u32, Option<Bucket>>,
    flushes: Vec<oneshot::Sender<()>>,
    ops: usize,
}

impl<'a> Round<'a> {
    fn new(dir: &'a Path) -> Self {
        Self {
            dir,
            buckets: HashMap::new(),
            flushes: Vec::new(),
            ops: 0,
        }
    }

    fn bucket(&mut self, id: u32) -> Option<&mut Bucket> {
        let bucket = bucket_of(id);
        let dir = self.dir;
        self.buckets
            .entry(bucket)
            .or_insert_with(|| match read_bucket(dir, bucket) {
                Ok(notes) => Some(notes),
                Err(e) => {
                    warn!(
                        "reading service notes ({}), leaving them as they are: {e}",
                        bucket_file(dir, bucket).display()
                    );
                    None
                }
            })
            .as_mut()
    }

    fn take(&mut self, op: NoteOp) {
        self.ops += 1;
        match op {
            NoteOp::Write(id, entry) => {
                if let Some(notes) = self.bucket(id) {
                    notes.insert(id, *entry);
                }
            }
            NoteOp::Remove(id) => {
                if let Some(notes) = self.bucket(id) {
                    notes.remove(&id);
                }
            }
            NoteOp::Flush(done) => self.flushes.push(done),
        }
    }

    /// Writes every bucket the round changed, and returns the flushes to answer: `Ok` when every
    /// bucket it touched was read and written, `Err` when one was not (and was warned of).
    fn finish(self) -> Result<Vec<oneshot::Sender<()>>, Vec<oneshot::Sender<()>>> {
        let mut ok = true;
        for (bucket, notes) in &self.buckets {
            let Some(notes) = notes else {
                ok = false;
                continue;
            };
            if let Err(e) = write_bucket(self.dir, *bucket, notes) {
                ok = false;
                warn!(
                    "writing service notes ({}): {e}",
                    bucket_file(self.dir, *bucket).display()
                );
            }
        }
        if ok { Ok(self.flushes) } else { Err(self.flushes) }
    }
}

impl NotesWriter {
    pub fn start(dir: PathBuf) -> Self {
        let (ops, incoming) = mpsc::channel::<NoteOp>();
        let pending = Arc::new(AtomicUsize::new(0));
        let done_count = pending.clone();
        let thread = std::thread::Builder::new()
            .name("service-notes".into())
            .spawn(move || {
                migrate_strays(&dir);
                let mut since_trim = 0usize;
                // A round takes whatever is queued (a start's thousands of notes at once), so
                // that each bucket is written once for all of them.
                while let Ok(first) = incoming.recv() {
                    let mut round = Round::new(&dir);
                    round.take(first);
                    while let Ok(op) = incoming.try_recv() {
                        round.take(op);
                    }
                    let ops = round.ops;
                    let flushes = round.finish().unwrap_or_else(|flushes| flushes);
                    since_trim += ops;
                    // Done before the flushes are answered: a flush that returns must not see
                    // this round as a backlog still pending.
                    let drained = done_count.fetch_sub(ops, Ordering::Relaxed) == ops;
                    for done in flushes {
                        let _ = done.send(());
                    }
                    // A start's backlog drained: its entries' memory goes back to the system, as
                    // the batch's own does (see `release_freed_memory`).
                    if drained && since_trim > FLUSH_AT_MOST {
                        super::controller::release_freed_memory();
                        since_trim = 0;
                    }
                }
            })
            .expect("spawning the notes thread");
        Self {
            ops: Some(ops),
            pending,
            thread: Some(thread),
        }
    }

    fn send(&self, op: NoteOp) -> bool {
        let Some(ops) = &self.ops else { return false };
        self.pending.fetch_add(1, Ordering::Relaxed);
        if ops.send(op).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn write(&self, id: u32, entry: PortEntry) {
        self.send(NoteOp::Write(id, Box::new(entry)));
    }

    pub fn remove(&self, id: u32) {
        self.send(NoteOp::Remove(id));
    }

    /// Resolves once everything sent so far is written; None when that is a start's backlog
    /// (what waits on it must not wait a second for thousands of other notes), or when the
    /// writer is gone. Nothing blocks: the controller goes on with its next change meanwhile.
    pub fn written(&self) -> Option<oneshot::Receiver<()>> {
        if self.pending.load(Ordering::Relaxed) > FLUSH_AT_MOST {
            return None;
        }
        let (done, written) = oneshot::channel();
        self.send(NoteOp::Flush(done)).then_some(written)
    }

    /// Waits until everything sent so far is written (see [`Self::written`]).
    #[cfg(test)]
    pub fn flush(&self) {
        if let Some(written) = self.written() {
            let _ = written.blocking_recv();
        }
    }
}

/// A restarted controller's writer must not race the old one's backlog (a queued removal of an
/// id the new run reuses would delete the new notes): dropping the writer finishes its work.
impl Drop for NotesWriter {
    fn drop(&mut self) {
        self.ops = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_keeps_the_order_of_writes_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        use crate::services::table::{Frontend, PortNotes, Protocol, Scope, ServiceRef};
        let entry = PortEntry {
            frontend: Frontend {
                addr: "10.96.0.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                scope: Scope::Internal,
            },
            service: ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
            },
            port_name: "http".into(),
            backends: Default::default(),
            retained: Default::default(),
            affinity_timeout_s: None,
            local_backends: Default::default(),
            source_ranges: None,
            drop_when_empty: false,
            maglev: None,
            notes: PortNotes::default(),
        };
        // An earlier agent's one file per frontend moves into its bucket; anything else goes.
        std::fs::create_dir_all(dir.path()).unwrap();
        std::fs::write(dir.path().join("300.json"), serde_json::to_vec_pretty(&entry).unwrap()).unwrap();
        std::fs::write(dir.path().join("301.json"), b"not notes").unwrap();
        let writer = NotesWriter::start(dir.path().to_path_buf());
        writer.write(1, entry.clone());
        writer.write(2, entry.clone());
        // Same bucket as 2: the bucket holds both.
        writer.write(2 + NOTE_BUCKETS, entry.clone());
        writer.remove(1);
        writer.flush();
        assert_eq!(read(dir.path(), 1), None);
        assert_eq!(read(dir.path(), 2), Some(entry.clone()));
        assert_eq!(read(dir.path(), 2 + NOTE_BUCKETS), Some(entry.clone()));
        // Bucket 1 is empty: its file is gone, and so is the stray.
        assert!(!bucket_file(dir.path(), 1).exists());
        assert!(!dir.path().join("300.json").exists());
        assert!(!dir.path().join("301.json").exists());
        assert_eq!(read(dir.path(), 300), Some(entry.clone()));
        let mut reader = NotesReader::new(dir.path().to_path_buf());
        assert_eq!(reader.get(2 + NOTE_BUCKETS), Some(entry.clone()));
        assert_eq!(reader.get(3), None);
        writer.remove(2);
        writer.flush();
        assert_eq!(read(dir.path(), 2), None);
        assert_eq!(read(dir.path(), 2 + NOTE_BUCKETS), Some(entry));
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "the buckets of {} and 300 left", 2 + NOTE_BUCKETS);
    }
}
