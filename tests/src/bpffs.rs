//! A bpffs instance of a test's own, for pins that must not touch anything else: nothing the
//! machine has pinned is visible in it, and unmounting it (on drop) removes everything pinned.
use std::path::{Path, PathBuf};

/// A private bpffs, unmounted when dropped.
pub struct TestBpfFs {
    dir: tempfile::TempDir,
}

impl TestBpfFs {
    pub fn mount() -> Self {
        crate::require_root();
        let dir = tempfile::tempdir().expect("temp dir");
        crate::run(
            std::process::Command::new("mount")
                .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
                .arg(dir.path()),
        );
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A directory in it (for an agent's `--bpf-pin-path`).
    pub fn pin_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TestBpfFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}
