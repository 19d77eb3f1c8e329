//! Where the service datapath pins what it makes, under the agent's `--bpf-pin-path`: the agent
//! pins there, and the CNI attaches the pinned pod programs to new pods' veths from there.
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::DirBuilderExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ferrynet_common::SCHEMA_VERSION;

/// The pinned layout, versioned: `<pin root>/v<SCHEMA_VERSION>/{maps,programs,links}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(pin_root: &Path) -> Self {
        Self {
            root: pin_root.join(format!("v{SCHEMA_VERSION}")),
        }
    }

    /// `<pin root>/v<SCHEMA_VERSION>`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn cgroup_link(&self, program: &str) -> PathBuf {
        self.links().join("cgroup").join(program)
    }

    pub fn pod_links(&self) -> PathBuf {
        self.links().join("pods")
    }

    /// The link of a pod veth's hook: `<veth>-from` (ingress) or `<veth>-to` (egress). (bpffs
    /// refuses names with dots.)
    pub fn pod_link(&self, veth: &str, hook: &str) -> PathBuf {
        self.pod_links().join(format!("{veth}-{hook}"))
    }

    pub fn uplink_links(&self) -> PathBuf {
        self.links().join("uplinks")
    }

    /// The link of an uplink's ingress hook, by interface index (interface names may hold dots,
    /// which bpffs refuses).
    pub fn uplink_link(&self, ifindex: u32) -> PathBuf {
        self.uplink_links().join(ifindex.to_string())
    }

    /// Locks the pod links' directory, waiting at most `wait` for another holder. The CNI (at the
    /// veth it is making) and the agent (at veths it finds without links, and at the links of
    /// veths that are gone) both attach the pod programs and pin the links; each holds this
    /// while it looks at a veth's hooks and pins and changes them, so neither ever sees the
    /// other half done: a program on a hook with its pin not yet made, or a pin it is about to
    /// remove as stale just replaced by a live one. Released when the guard drops (or the
    /// holder dies: it is an `flock`).
    pub fn lock_pod_links(&self, wait: Duration) -> std::io::Result<PodLinksLock> {
        let dir = File::open(self.pod_links())?;
        let deadline = Instant::now() + wait;
        // Polled, not blocking: the CNI never waits on an agent that hangs holding it.
        let mut pause = Duration::from_micros(200);
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(PodLinksLock { _dir: dir });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{} stayed locked for {wait:?}", self.pod_links().display()),
                ));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Makes the directories (owner only). Says which one could not be made, if any.
    pub fn create(&self) -> Result<(), (PathBuf, std::io::Error)> {
        for dir in [
            self.maps(),
            self.programs(),
            self.links().join("cgroup"),
            self.pod_links(),
            self.uplink_links(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| (dir.clone(), e))?;
        }
        Ok(())
    }
}

/// The pod links' lock, held until dropped; see [`PinLayout::lock_pod_links`].
#[derive(Debug)]
pub struct PodLinksLock {
    _dir: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_links_lock_has_one_holder_at_a_time() {
        let root = std::env::temp_dir().join(format!("ferrynet-pins-lock-{}", std::process::id()));
        let pins = PinLayout::new(&root);
        pins.create().expect("pin directories");
        let held = pins.lock_pod_links(Duration::ZERO).expect("a free lock");
        let waited = Instant::now();
        let busy = pins
            .lock_pod_links(Duration::from_millis(50))
            .expect_err("a second holder while the first holds it");
        assert_eq!(busy.kind(), std::io::ErrorKind::TimedOut);
        assert!(waited.elapsed() >= Duration::from_millis(50), "gave up before the wait");
        drop(held);
        pins.lock_pod_links(Duration::ZERO).expect("free again once dropped");
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
