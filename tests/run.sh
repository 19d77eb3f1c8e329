#!/usr/bin/env bash
# ferrynet's whole test suite, privileged tests included: the README's test command, and what CI
# runs (.ci/run). Run as root on Debian bookworm. It sets the machine up first (bootstrap.sh is
# idempotent and quick when everything is present), then lints, builds and tests.
#
# Privileged tests build their own world (throwaway network namespaces, temporary state dirs,
# their own cgroups) and never touch the machine's network, routes, firewall or root cgroup.
set -euo pipefail
cd "$(dirname "$0")/.."
./bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"
cni_target="$(uname -m)-unknown-linux-musl"

step() { printf '\n==> %s\n' "$*"; }

step "format"
cargo fmt --all -- --check
step "lint (host crates)"
cargo clippy --release --workspace --all-targets -- -D warnings
step "lint (kernel programs, BPF target)"
# Run in the kernel crate's directory, so that its rust-toolchain.toml picks the nightly.
(cd ebpf/ferrynet-ebpf && cargo clippy --release --target bpfel-unknown-none -Z build-std=core -- -D warnings)
step "build: agent, tools, kernel programs (via agent/build.rs), and the CNI plugins (static, $cni_target)"
./tests/build.sh
step "test"
cargo test --release --workspace
