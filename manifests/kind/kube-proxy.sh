#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Takes kube-proxy off a kind cluster, or puts it back.
#
#   kube-proxy.sh down      no kube-proxy pod on any node, and none of its rules left behind
#   kube-proxy.sh restore   kube-proxy back on every node
#
# kube-proxy is a DaemonSet (kube-system/kube-proxy), not a Deployment: `kubectl scale deployment
# kube-proxy --replicas=0` is a common mistake that fails with NotFound, and a DaemonSet has no
# replica count to scale at all. It runs one pod on every node its pod template's nodeSelector
# matches; a nodeSelector that matches no node removes every pod, and keeps the DaemonSet (and
# its configuration) for the restore. Deleting the DaemonSet would work too, but kind (kubeadm)
# would not give it back.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

# What a stopped kube-proxy leaves in every node's kernel: its iptables chains (KUBE-SERVICES,
# KUBE-SVC-*, KUBE-SEP-*, KUBE-NODEPORTS, ...), or in nftables mode its `kube-proxy` tables. It
# does not remove them when it stops, by design (a restarted kube-proxy must not interrupt
# Services), so a scaled-down or deleted kube-proxy leaves every Service translated as it was
# when it stopped, to endpoints that go stale. Only `kube-proxy --cleanup` removes them; kind's
# node image has no kube-proxy binary, so this does the same by hand: every rule and chain that
# mentions KUBE goes (the kubelet recreates its own few KUBE-* chains, which hold no Service),
# and the nftables tables go whole.
# shellcheck disable=SC2016 # expanded in the node, not here
FLUSH='
for t in iptables ip6tables; do
    if command -v "$t-save" >/dev/null 2>&1; then
        "$t-save" | grep -v KUBE | "$t-restore"
    fi
done
for family in ip ip6; do
    nft delete table "$family" kube-proxy 2>/dev/null || true
done
'

# Succeeds if a node has none of kube-proxy's Service rules.
no_kube_proxy_rules() {
    node_sh "$1" '! (iptables-save; ip6tables-save; nft list ruleset) 2>/dev/null | grep -q -e KUBE-SERVICES -e "table ip kube-proxy"'
}

down() {
    log "kube-proxy off every node: a nodeSelector no node matches"
    show k patch daemonset kube-proxy -n kube-system -p '{"spec":{"template":{"spec":{"nodeSelector":{"non-existing":"true"}}}}}'
    k wait --for=delete pod -n kube-system -l k8s-app=kube-proxy --timeout=180s
    show k get daemonset kube-proxy -n kube-system
    log "flushing the rules kube-proxy left on every node"
    local node
    for node in $(nodes); do
        node_sh "$node" "$FLUSH"
        no_kube_proxy_rules "$node" || {
            echo "$node: kube-proxy's rules are still there" >&2
            return 1
        }
        echo "    $node: no KUBE-* rules, no kube-proxy nftables table"
    done
}

restore() {
    log "kube-proxy back on every node"
    show k patch daemonset kube-proxy -n kube-system -p '{"spec":{"template":{"spec":{"nodeSelector":{"non-existing":null}}}}}'
    k rollout status daemonset/kube-proxy -n kube-system --timeout=300s
    show k get daemonset kube-proxy -n kube-system
}

case ${1:-} in
down | restore) "$1" ;;
*)
    echo "usage: $0 down|restore" >&2
    exit 2
    ;;
esac
