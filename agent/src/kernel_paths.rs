//! The kernel filesystems the eBPF datapath hangs off: the bpffs directory its maps are pinned
//! in (pinned maps outlive the agent, so a restart keeps flows), and the cgroup v2 directory its
//! socket programs attach to (the root in production; a cgroup of their own for the lab's nodes
//! and the tests, never the machine's root). Checked at every pass, so that `status` says plainly
//! when a node lacks them.
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, fs::DirBuilderExt},
    path::Path,
};

use anyhow::{Context, Result, bail};

/// `statfs(2)` `f_type` of a BPF filesystem.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
/// `statfs(2)` `f_type` of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

fn fs_type(path: &Path) -> std::io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: struct statfs is plain integers, for which all-zero is a valid value.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs(2) with a NUL-terminated path and a buffer of the right type it fills in.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The field's C type differs between architectures.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    Ok(buf.f_type as u64)
}

/// Makes sure `pin_path` is a directory on a bpffs, creating it (root only) if needed. Never
/// creates directories on another filesystem: maps pinned there would not be pinned at all.
pub fn prepare_pin_path(pin_path: &Path) -> Result<()> {
    let existing = pin_path
        .ancestors()
        .find(|p| p.exists())
        .context("the pin path has no existing ancestor")?;
    let fs = fs_type(existing).with_context(|| format!("statfs {}", existing.display()))?;
    if fs != BPF_FS_MAGIC {
        bail!(
            "BPF pin path {}: {} is not on a bpffs (mount one: mount -t bpf bpf {})",
            pin_path.display(),
            existing.display(),
            existing.display()
        );
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_path)
        .with_context(|| format!("creating BPF pin path {}", pin_path.display()))
}

/// Checks that `cgroup` is a directory of a cgroup v2 hierarchy.
pub fn check_cgroup2(cgroup: &Path) -> Result<()> {
    let fs = fs_type(cgroup).with_context(|| format!("cgroup path {}", cgroup.display()))?;
    if fs != CGROUP2_SUPER_MAGIC {
        bail!(
            "cgroup path {} is not in a cgroup v2 hierarchy (where it is mounted: grep cgroup2 /proc/mounts)",
            cgroup.display()
        );
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
