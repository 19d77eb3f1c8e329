//! A lab for one test: a name no other test uses, taken down when dropped (also on failure).
use std::time::{Duration, Instant};

use super::{Lab, LabOptions};

/// A lab that is taken down when dropped, also when a test fails.
pub struct LabGuard(pub Lab);

impl LabGuard {
    /// A lab with a name no other test uses, on one underlay segment.
    pub fn up(nodes: u8, mode: &str) -> Self {
        Self::up_segmented(nodes, mode, 1)
    }

    /// A lab with a name no other test uses, its nodes dealt out over `segments` routed L2
    /// segments.
    pub fn up_segmented(nodes: u8, mode: &str, segments: u8) -> Self {
        Self::up_with(nodes, mode, segments, false)
    }

    /// A lab that also runs the cluster DNS (see [`super::dns`]).
    pub fn up_with_dns(nodes: u8, mode: &str) -> Self {
        Self::up_with(nodes, mode, 1, true)
    }

    fn up_with(nodes: u8, mode: &str, segments: u8, dns: bool) -> Self {
        crate::require_root();
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        Self(
            Lab::up(&LabOptions {
                name,
                nodes,
                mode: mode.into(),
                segments,
                dns,
            })
            .expect("lab up"),
        )
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.0
    }
}

impl std::ops::DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.0
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.0.state.name) {
            eprintln!("lab down: {e:#}");
        }
    }
}

/// Waits until `f` returns true (bounded), for the CLI's and tests' convenience.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
