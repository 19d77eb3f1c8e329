#!/usr/bin/env bash
# The lab demo, the README's second command: sets the machine up, builds, and runs a 3-node
# ferrynet cluster inside network namespaces on this machine (`ferrynet-lab demo`), showing pods
# on different nodes talking, then takes it down again. Run as root. `--keep` leaves it up;
# `--mode native|vxlan|auto` picks the routing.
set -euo pipefail
cd "$(dirname "$0")/.."
./bootstrap.sh
./tests/build.sh
exec ./target/release/ferrynet-lab demo "$@"
