#!/usr/bin/env bash
# Takes a fresh Debian bookworm machine (root, stable Rust via rustup) to a full build and test
# setup for ferrynet. Idempotent: every step checks first, so a second run takes seconds.
# `./bootstrap.sh --build-only` sets up building alone (the image's build stage uses it).
set -euo pipefail
cd "$(dirname "$0")"

# The kernel programs' nightly is named once, in the kernel crate's rust-toolchain.toml.
NIGHTLY="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' ebpf/ferrynet-ebpf/rust-toolchain.toml)"
BPF_LINKER_VERSION=0.13.0
LLVM_PREFIX=/usr/lib/llvm-22

BUILD_PACKAGES=(
  # bpf-linker links against Debian's LLVM 22.
  llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev
)
TEST_PACKAGES=(
  # Network plumbing used by the tests and the lab.
  iproute2 nftables iptables iperf3 procps psmisc util-linux kmod ethtool
  # Real clients for the tests and the README's examples (Debian's static busybox wget crashes
  # on some machines: never use it).
  curl wget wrk
  # Real servers behind Services in the tests and demos: a UDP DNS server and an HTTP server.
  # Installed as programs only: nothing is started (see policy-rc.d below).
  dnsmasq-base bind9-dnsutils nginx-light
  # Inspecting kernel programs, maps and cgroup attachments.
  bpftool
  # The reference CNI plugins (bridge, host-local, portmap, bandwidth) used as anchors and chains.
  containernetworking-plugins
  # podman as a real CNI client (see the README's Tests section).
  podman buildah catatonit runc busybox-static
)
build_only=
case "${1:-}" in
  --build-only) build_only=1 ;;
  "") ;;
  *) echo "usage: $0 [--build-only]" >&2; exit 2 ;;
esac
APT_PACKAGES=("${BUILD_PACKAGES[@]}")
if [ -z "$build_only" ]; then APT_PACKAGES+=("${TEST_PACKAGES[@]}"); fi

log() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (it installs packages and the tests create network namespaces)"
  exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  apt-get update -qq
  # A package that ships a daemon (nginx) must not start it on this machine: the tests start
  # their own servers inside their own namespaces. policy-rc.d refusing (101) stops that; one the
  # machine already had is left alone.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  status=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ "$status" -eq 0 ] || { log "apt-get install failed ($status)"; exit "$status"; }
fi
# kubectl for the demos and the lab's kubeconfig: the machine image has a current one; Debian's
# kubernetes-client is the fallback where it does not.
if [ -z "$build_only" ] && ! command -v kubectl >/dev/null; then
  log "installing kubectl (Debian's kubernetes-client)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! rustup toolchain list | grep -q "^${NIGHTLY}"; then
  log "installing ${NIGHTLY}"
  rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
elif ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src'; then
  rustup component add rust-src --toolchain "$NIGHTLY"
fi
for comp in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^${comp}"; then
    rustup component add "$comp"
  fi
done
if ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^clippy'; then
  rustup component add clippy --toolchain "$NIGHTLY"
fi
# The CNI plugins are static musl binaries: they are copied onto hosts whose libc we do not know.
CNI_TARGET="$(uname -m)-unknown-linux-musl"
if ! rustup target list --installed | grep -q "^${CNI_TARGET}$"; then
  rustup target add "$CNI_TARGET"
fi

if ! bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"; then
  log "building bpf-linker ${BPF_LINKER_VERSION} against LLVM 22"
  LLVM_PREFIX="$LLVM_PREFIX" cargo install "bpf-linker@${BPF_LINKER_VERSION}" --locked \
    --no-default-features --features llvm-22
fi

log "ready"
