#!/usr/bin/env bash
# The demo, the README's main command: on a fresh Debian machine, installs what it needs
# (./bootstrap.sh: kubectl, nginx, dnsmasq, dig, curl, ...), builds (./tests/build.sh), and runs
# `ferrynet-lab demo`: the four myths about kube-proxy and the CNI, each settled by the kubectl
# commands a user types against a 3-node cluster in network namespaces on this machine (no
# cluster, no container engine). Every step prints its command, its real output and PASS or
# FAIL; the run ends with a summary table and exits non-zero if any myth failed. The lab is
# taken down at the end, also on failure.
#
#   sudo ./tests/demo.sh              all four myths
#   sudo ./tests/demo.sh --myth 3     one of them (still on a fresh lab)
#   sudo ./tests/demo.sh --keep       leave the lab up afterwards, to explore it with kubectl
#
# `--mode native|vxlan|auto` picks the routing between nodes, `--segments N` the underlay's L2
# segments.
set -euo pipefail
cd "$(dirname "$0")/.."
./bootstrap.sh
./tests/build.sh
exec ./target/release/ferrynet-lab demo "$@"
