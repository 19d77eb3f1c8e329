//! Notes on each frontend for `ferrynet-agent explain`: which Service and port it is, the
//! traffic policy and topology in force, and why each excluded endpoint is excluded. The maps say
//! how traffic is translated; these say why. One small file per frontend id in the agent's state
//! directory, written when the frontend changes (so a change costs one file, not all of them).
use std::path::{Path, PathBuf};

use super::table::PortEntry;

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("service-notes")
}

fn file(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Writes the notes of frontend `id`.
pub fn write(dir: &Path, id: u32, entry: &PortEntry) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
    crate::cni_config::write_if_changed(&file(dir, id), &text, 0o644).map(|_| ())
}

pub fn remove(dir: &Path, id: u32) {
    let _ = std::fs::remove_file(file(dir, id));
}

/// The notes of frontend `id`, if the agent wrote them.
pub fn read(dir: &Path, id: u32) -> Option<PortEntry> {
    serde_json::from_slice(&std::fs::read(file(dir, id)).ok()?).ok()
}
