//! Notes on each frontend for `ferrynet-agent explain`: which Service and port it is, the
//! traffic policy and topology in force, and why each excluded endpoint is excluded. The maps say
//! how traffic is translated; these say why. One small file per frontend id in the agent's state
//! directory, written when the frontend changes (so a change costs one file, not all of them).
//! A [`NotesWriter`] thread writes them, so that a start with thousands of frontends programs
//! the maps without waiting for thousands of files.
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
};

use tracing::warn;

use super::table::PortEntry;

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("service-notes")
}

fn file(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Writes the notes of frontend `id`. Not synced: a start writes thousands (a sync each made a
/// start with 15,000 frontends take seconds), and a note lost to a power cut costs `explain` its
/// reasons until the frontend next changes, nothing else.
pub fn write(dir: &Path, id: u32, entry: &PortEntry) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
    crate::cni_config::write_if_changed_with(&file(dir, id), &text, 0o644, crate::cni_config::Durability::Unsynced)
        .map(|_| ())
}

pub fn remove(dir: &Path, id: u32) {
    let _ = std::fs::remove_file(file(dir, id));
}

/// The notes of frontend `id`, if the agent wrote them.
pub fn read(dir: &Path, id: u32) -> Option<PortEntry> {
    serde_json::from_slice(&std::fs::read(file(dir, id)).ok()?).ok()
}

enum NoteOp {
    Write(u32, Box<PortEntry>),
    Remove(u32),
    /// Answered once everything sent before it is on disk.
    Flush(mpsc::Sender<()>),
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

impl NotesWriter {
    pub fn start(dir: PathBuf) -> Self {
        let (ops, incoming) = mpsc::channel::<NoteOp>();
        let pending = Arc::new(AtomicUsize::new(0));
        let done_count = pending.clone();
        let thread = std::thread::Builder::new()
            .name("service-notes".into())
            .spawn(move || {
                let mut since_trim = 0usize;
                for op in incoming {
                    since_trim += 1;
                    match op {
                        NoteOp::Write(id, entry) => {
                            if let Err(e) = write(&dir, id, &entry) {
                                warn!("writing service notes {id}: {e}");
                            }
                        }
                        NoteOp::Remove(id) => remove(&dir, id),
                        NoteOp::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                    // A start's backlog drained: its entries' memory goes back to the system, as
                    // the batch's own does (see `release_freed_memory`).
                    if done_count.fetch_sub(1, Ordering::Relaxed) == 1 && since_trim > FLUSH_AT_MOST {
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

    /// Waits until everything sent so far is written, unless that is a start's backlog (a
    /// change must not wait a second for thousands of other notes).
    pub fn flush(&self) {
        if self.pending.load(Ordering::Relaxed) > FLUSH_AT_MOST {
            return;
        }
        let (done, wait) = mpsc::channel();
        if self.send(NoteOp::Flush(done)) {
            let _ = wait.recv();
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
        let writer = NotesWriter::start(dir.path().to_path_buf());
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
        writer.write(1, entry.clone());
        writer.write(2, entry.clone());
        writer.remove(1);
        writer.flush();
        assert_eq!(read(dir.path(), 1), None);
        assert_eq!(read(dir.path(), 2), Some(entry));
    }
}
