#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# A kind cluster with ferrynet as its CNI (and, once kube-proxy is down, its service proxy).
#
#   cluster.sh create    kind cluster from manifests/kind-config.yaml (no default CNI; kube-proxy
#                        is there, as kind installs it), with a bpffs in every node
#   cluster.sh install   builds the agent image (manifests/Dockerfile), loads it into the nodes,
#                        applies the manifests and waits until every node is Ready
#   cluster.sh delete    deletes the cluster
#
# Needs kind, kubectl and docker (or podman: ENGINE=podman). KIND_CLUSTER names the cluster
# (default ferrynet). See demo.sh for the note on where these scripts have been run.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

create() {
    if kind get clusters | grep -qx "$KIND_CLUSTER"; then
        log "kind cluster $KIND_CLUSTER exists"
    else
        log "creating kind cluster $KIND_CLUSTER (no default CNI, kube-proxy present)"
        kind create cluster --name "$KIND_CLUSTER" --config "$MANIFESTS/kind-config.yaml"
    fi
    local node
    for node in $(nodes); do
        # The agent pins its maps, programs and links under /sys/fs/bpf/ferrynet and refuses a
        # pin path that is not on a bpffs. A kind node is a container: mount one in it if its
        # /sys/fs/bpf is a plain directory (each node gets its own, so their pins do not mix).
        node_sh "$node" 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf'
        # The socket programs attach to the node's cgroup v2 root: kind needs a cgroup v2 host
        # for that (a kind node on cgroup v2 has its own cgroup namespace, rooted at the node).
        # shellcheck disable=SC2016 # expanded in the node
        node_sh "$node" 'test "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs' || {
            echo "$node: /sys/fs/cgroup is not cgroup v2; ferrynet's socket LB needs a cgroup v2 host" >&2
            return 1
        }
    done
}

install() {
    if [[ ${SKIP_BUILD:-} != 1 ]]; then
        log "building $IMAGE (manifests/Dockerfile)"
        "$ENGINE" build -f "$MANIFESTS/Dockerfile" -t "$IMAGE" "$REPO"
    fi
    log "loading $IMAGE into the nodes"
    kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
    log "installing ferrynet"
    show k apply -f "$MANIFESTS/rbac.yaml" -f "$MANIFESTS/configmap.yaml" -f "$MANIFESTS/daemonset.yaml"
    k rollout status daemonset/ferrynet-agent -n kube-system --timeout=600s
    # Nodes are NotReady until a CNI conflist exists; the agent's init container writes it.
    k wait --for=condition=Ready nodes --all --timeout=300s
    # CoreDNS's pods are the first to get addresses from ferrynet's IPAM.
    k rollout status deployment/coredns -n kube-system --timeout=300s
    show k get nodes -o wide
    show k get pods -n kube-system -o wide
}

delete() {
    log "deleting kind cluster $KIND_CLUSTER"
    kind delete cluster --name "$KIND_CLUSTER"
}

case ${1:-} in
create | install | delete) "$1" ;;
*)
    echo "usage: $0 create|install|delete" >&2
    exit 2
    ;;
esac
