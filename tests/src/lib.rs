//! The harness behind ferrynet's integration tests and benchmarks.
//!
//! Privileged tests build their own world and never touch the machine's: a throwaway network
//! namespace stands for the host (netavark's bats tests work this way), pods are namespaces of
//! their own, and each test gets its own state directories. Plugins run as the real binaries,
//! exactly as a runtime runs them: environment variables, config on stdin, in the host namespace.
pub mod apiserver;
pub mod bench;
pub mod bpffs;
pub mod cni;
pub mod lab;
pub mod netns;
pub mod packets;
pub mod probe;
pub mod tcp;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

/// Fails the test loudly when not root: privileged tests must not pass by skipping.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "ferrynet's integration tests create network namespaces and must run as root"
    );
}

/// The directory holding the workspace's built binaries (`target/<profile>`), found next to the
/// running test executable (`target/<profile>/deps/<test>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("profile dir")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// The Rust target the CNI binaries are built for: static musl, so that the binaries the agent
/// copies onto a host run there whatever its libc (and start fastest).
pub fn cni_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// Where the CNI binaries are: `target/<arch>-unknown-linux-musl/<profile>`.
pub fn cni_bin_dir() -> PathBuf {
    let profile_dir = target_dir();
    let profile = profile_dir.file_name().expect("profile dir name").to_owned();
    profile_dir
        .parent()
        .expect("target dir")
        .join(cni_target())
        .join(profile)
}

/// A built binary of the workspace. `ferrynet` and `ferrynet-ipam` are the static CNI builds
/// (`cargo build --target <arch>-unknown-linux-musl -p ferrynet-cni -p ferrynet-ipam`); the
/// others are host builds (`cargo build --bins`). The README's test command builds both.
pub fn binary(name: &str) -> PathBuf {
    let dir = if matches!(name, "ferrynet" | "ferrynet-ipam") {
        cni_bin_dir()
    } else {
        target_dir()
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (see tests/run.sh)",
        path.display()
    );
    path
}

/// Where Debian's reference CNI plugins live.
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

/// Runs a command, panicking with its output if it fails. For test setup only.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n NS -j ARGS...` parsed as JSON.
pub fn ip_json(ns: &str, args: &[&str]) -> serde_json::Value {
    let out = run(Command::new("ip").args(["-n", ns, "-j"]).args(args));
    if out.trim().is_empty() {
        serde_json::Value::Array(vec![])
    } else {
        serde_json::from_str(&out).expect("ip -j output is JSON")
    }
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes. Every wait in the tests is
/// bounded this way.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A name unique to this process and call, for namespaces, links and directories.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "fnt{}-{}-{tag}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}
