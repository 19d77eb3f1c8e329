//! The kernel filesystems the eBPF datapath hangs off: the bpffs directory its maps are pinned
//! in (pinned maps outlive the agent, so a restart keeps flows), and the cgroup v2 directory its
//! socket programs attach to (the root in production; a cgroup of their own for the lab's nodes
//! and the tests, never the machine's root). Checked at every pass, so that `status` says plainly
//! when a node lacks them.
use std::{os::unix::fs::DirBuilderExt, path::Path};

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, FsType, statfs};

/// Why a kernel filesystem path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelPathError {
    #[error("the pin path {0} has no existing ancestor")]
    NoAncestor(std::path::PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("BPF pin path {pin}: {existing} is not on a bpffs (mount one: mount -t bpf bpf {existing})")]
    NotBpffs { pin: String, existing: String },
    #[error("cgroup path {0} is not in a cgroup v2 hierarchy (where it is mounted: grep cgroup2 /proc/mounts)")]
    NotCgroup2(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KernelPathError + '_ {
    move |source| KernelPathError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `statfs(2)` `f_type` of a BPF filesystem.
const BPF_FS_MAGIC: FsType = FsType(0xcafe_4a11);

fn fs_type(path: &Path) -> std::io::Result<FsType> {
    Ok(statfs(path)?.filesystem_type())
}

/// Makes sure `pin_path` is a directory on a bpffs, creating it (root only) if needed. Never
/// creates directories on another filesystem: maps pinned there would not be pinned at all.
pub fn prepare_pin_path(pin_path: &Path) -> Result<(), KernelPathError> {
    let existing = pin_path
        .ancestors()
        .find(|p| p.exists())
        .ok_or_else(|| KernelPathError::NoAncestor(pin_path.to_path_buf()))?;
    let fs = fs_type(existing).map_err(io(existing))?;
    if fs != BPF_FS_MAGIC {
        return Err(KernelPathError::NotBpffs {
            pin: pin_path.display().to_string(),
            existing: existing.display().to_string(),
        });
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_path)
        .map_err(io(pin_path))
}

/// Checks that `cgroup` is a directory of a cgroup v2 hierarchy.
pub fn check_cgroup2(cgroup: &Path) -> Result<(), KernelPathError> {
    let fs = fs_type(cgroup).map_err(io(cgroup))?;
    if fs != CGROUP2_SUPER_MAGIC {
        return Err(KernelPathError::NotCgroup2(cgroup.display().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_path_off_bpffs_is_refused_and_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("ferrynet/pins");
        let err = prepare_pin_path(&pin).unwrap_err().to_string();
        assert!(err.contains("is not on a bpffs"), "{err}");
        assert!(!dir.path().join("ferrynet").exists());
    }

    #[test]
    fn a_directory_that_is_no_cgroup2_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_cgroup2(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not in a cgroup v2 hierarchy"), "{err}");
        let err = check_cgroup2(&dir.path().join("missing")).unwrap_err();
        assert!(format!("{err:#}").contains("No such file"), "{err:#}");
    }
}
