//! Builds the kernel programs (`ebpf/ferrynet-ebpf`) for the BPF target, so a plain `cargo build`
//! produces an agent with its programs embedded (aya-template's approach).
//!
//! The toolchain is the one `ebpf/ferrynet-ebpf/rust-toolchain.toml` names. The inner cargo's
//! output is shown only when the kernel build fails, or with `FERRYNET_EBPF_BUILD_VERBOSE=1`:
//! relaying it on success (as aya-build does, as `cargo:warning` lines) would bury a first build
//! under hundreds of warnings that are not warnings.
use std::{
    env,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const PACKAGE: &str = "ferrynet-ebpf";
const BINARY: &str = "ferrynet-programs";
const VERBOSE: &str = "FERRYNET_EBPF_BUILD_VERBOSE";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_dir = manifest_dir.join("../ebpf/ferrynet-ebpf");
    let common_dir = manifest_dir.join("../ebpf/ferrynet-common");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    for path in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed={VERBOSE}");
    let verbose = env::var(VERBOSE).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));

    let toolchain = toolchain_channel(&toolchain_file);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("set by cargo");
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &toolchain,
        "cargo",
        "build",
        "--package",
        PACKAGE,
        "--bins",
        "--release",
    ])
    .args([
        "--target",
        target,
        "-Z",
        "build-std=core",
        "--message-format=json-render-diagnostics",
    ])
    .arg("--target-dir")
    .arg(out_dir.join("ebpf-target"))
    .current_dir(&ebpf_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
    // The outer cargo's compiler settings are for the host target, not this one.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTFLAGS")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e} (run ./bootstrap.sh to install the toolchains)"));
    let mut stderr = child.stderr.take().expect("piped");
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut executable = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("reading cargo's output");
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["target"]["name"] == BINARY
            && let Some(path) = message["executable"].as_str()
        {
            executable = Some(PathBuf::from(path));
        }
    }
    let status = child.wait().expect("waiting for cargo");
    let log = stderr_reader.join().unwrap_or_default();
    if verbose || !status.success() {
        for line in log.lines() {
            println!("cargo:warning={line}");
        }
    }
    if !status.success() {
        panic!("building the kernel programs ({PACKAGE}, {target}, {toolchain}) failed: {status}; its output is above");
    }
    let executable = executable.unwrap_or_else(|| panic!("cargo built no {BINARY} for {target}"));
    std::fs::copy(&executable, out_dir.join(BINARY))
        .unwrap_or_else(|e| panic!("copying {}: {e}", executable.display()));
}

/// The `channel` that `rust-toolchain.toml` names.
fn toolchain_channel(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_string())
        .next()
        .unwrap_or_else(|| panic!("{} names no channel", file.display()))
}
