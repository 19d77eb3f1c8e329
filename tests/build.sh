#!/usr/bin/env bash
# Builds everything: the agent (whose build.rs compiles the kernel programs on the pinned
# nightly), the tools, and the CNI plugins as static musl binaries. Expects ./bootstrap.sh to have
# run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --workspace --bins
cargo build --release --target "$(uname -m)-unknown-linux-musl" -p ferrynet-cni -p ferrynet-ipam
