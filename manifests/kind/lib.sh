# shellcheck shell=bash disable=SC2034 # the variables are for the scripts that source this
# Shared by the kind scripts (sourced, not run).
#
# Conventions the test (tests/tests/kind_scripts.rs) relies on:
#   - every kubectl call is the word `k` (below), so that the test finds each one and checks it
#     with the installed kubectl; nothing calls kubectl directly but `k` itself;
#   - a `k` call's arguments hold no command substitution: values are put in variables first;
#   - every command in a kind node's container goes through `node_sh`.

KIND_CLUSTER=${KIND_CLUSTER:-ferrynet}
KUBE_CONTEXT=kind-$KIND_CLUSTER
# kind runs its nodes as containers of this engine (kind's own KIND_EXPERIMENTAL_PROVIDER picks
# podman instead; set ENGINE=podman along with it).
ENGINE=${ENGINE:-docker}
IMAGE=${FERRYNET_IMAGE:-ghcr.io/ferrynet/ferrynet-agent:0.1.0}
AGENT_LABELS=app.kubernetes.io/name=ferrynet,app.kubernetes.io/component=agent
# The label that takes the agent off a node (the DaemonSet's node affinity excludes it).
PAUSE_LABEL=ferrynet.io/agent
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MANIFESTS=$REPO/manifests

# kubectl, against the kind cluster's context whatever the current one is.
k() {
    kubectl --context "$KUBE_CONTEXT" "$@"
}

# Runs a shell command in a kind node's container (kind nodes are containers named as the nodes).
node_sh() {
    "$ENGINE" exec "$1" sh -c "$2"
}

# The cluster's nodes (their containers' names).
nodes() {
    kind get nodes --name "$KIND_CLUSTER"
}

log() {
    printf '\n==> %s\n' "$*"
}

# Prints a command as a user would type it (`k` shown as `kubectl`), then runs it.
show() {
    local words=() arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
            words+=("$arg")
        else
            words+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    [[ ${words[0]} == "k" ]] && words[0]=kubectl
    [[ ${words[0]} == node_sh ]] && words[0]="$ENGINE exec ${2:-} sh -c" && unset 'words[1]'
    printf '\n  $ %s\n' "${words[*]}"
    "$@" 2>&1 | sed 's/^/    /'
    return "${PIPESTATUS[0]}"
}

# Retries a command every second until it succeeds, for at most SECONDS.
eventually() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

# Succeeds if a command fails every time it is tried, every second for SECONDS.
never() {
    local deadline=$((SECONDS + $1))
    shift
    while ((SECONDS < deadline)); do
        if "$@" >/dev/null 2>&1; then
            return 1
        fi
        sleep 1
    done
}

# The agent's pod on a node (empty if it has none).
agent_pod() {
    k get pods -n kube-system -l "$AGENT_LABELS" --field-selector "spec.nodeName=$1" -o jsonpath='{.items[*].metadata.name}'
}

# Succeeds when every node has a ready agent pod.
agents_ready() {
    local want ready
    want=$(nodes | wc -l)
    ready=$(k get pods -n kube-system -l "$AGENT_LABELS" -o jsonpath='{.items[*].status.containerStatuses[*].ready}')
    [[ $(grep -o true <<<"$ready" | wc -l) -eq $want ]]
}

wait_agents() {
    eventually 300 agents_ready || {
        show k get pods -n kube-system -l "$AGENT_LABELS" -o wide
        return 1
    }
}

# Turns ferrynet's service translation on or off (`true`/`false`) on every node: an explicit
# FERRYNET_SERVICE_PROXY in the DaemonSet's pod template, which beats the ConfigMap's, and a
# rolling restart of the agents (the template changed). Off, each agent removes the service
# datapath at start; on, it builds it again.
service_proxy() {
    show k set env daemonset/ferrynet-agent -n kube-system "FERRYNET_SERVICE_PROXY=$1"
    k rollout status daemonset/ferrynet-agent -n kube-system --timeout=600s
    wait_agents
}

# Whether an IPv4 address is in a CIDR.
ip_in_cidr() {
    local ip=$1 net=${2%/*} len=${2#*/} a b c d n1 n2 n3 n4
    IFS=. read -r a b c d <<<"$ip"
    IFS=. read -r n1 n2 n3 n4 <<<"$net"
    local x=$(((a << 24) | (b << 16) | (c << 8) | d)) y=$(((n1 << 24) | (n2 << 16) | (n3 << 8) | n4))
    local mask=$(((0xffffffff << (32 - len)) & 0xffffffff))
    (((x & mask) == (y & mask)))
}
