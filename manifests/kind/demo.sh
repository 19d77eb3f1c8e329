#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The four myths, on a real cluster: kind, ferrynet as the CNI, kube-proxy taken down.
#
# NOT RUN HERE: these scripts have not been run against a real cluster on the machines ferrynet
# is built on, which have no container engine that can run kind. What is tested there
# (tests/tests/kind_scripts.rs): every script passes `bash -n`, every kubectl call in them parses
# with the real kubectl (client-side dry run where that needs no server, the request itself
# otherwise), and every manifest they apply parses into typed Kubernetes objects. The same four
# demos run for real in the lab (tests/demo.sh).
#
#   demo.sh [--myth N] [--skip-build] [--restore-kube-proxy] [--delete-cluster]
#
# Creates the kind cluster if it does not exist (manifests/kind-config.yaml: no default CNI,
# kube-proxy present), builds and loads the agent image and installs ferrynet from the manifests
# (cluster.sh), takes kube-proxy down and flushes its rules (kube-proxy.sh), then runs the demos
# with the kubectl commands a user types. Each step prints the command, its output, what changed,
# and PASS or FAIL; a summary table ends the run, whose exit status is 1 if anything failed.
#   --myth N               run only demo N (1-4)
#   --skip-build           use the image already built (it is still loaded into the nodes)
#   --restore-kube-proxy   at the end, kube-proxy back, and ferrynet's service translation off
#                          (Services are kube-proxy's again; ferrynet stays the CNI)
#   --delete-cluster       at the end, delete the cluster
#
# Needs kind, kubectl and docker; pulls nginx and curlimages/curl from Docker Hub.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

ONLY=
RESTORE_KUBE_PROXY=0
DELETE_CLUSTER=0
while (($#)); do
    case $1 in
    --myth)
        ONLY=${2:?--myth needs a number}
        [[ $ONLY =~ ^[1-4]$ ]] || {
            echo "--myth takes 1 to 4" >&2
            exit 2
        }
        shift
        ;;
    --skip-build) export SKIP_BUILD=1 ;;
    --restore-kube-proxy) RESTORE_KUBE_PROXY=1 ;;
    --delete-cluster) DELETE_CLUSTER=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument $1 (see --help)" >&2
        exit 2
        ;;
    esac
    shift
done

RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
MYTH=0

pass() {
    printf '  PASS  %s\n' "$1"
    printf '%s\tPASS\t%s\n' "$MYTH" "$1" >>"$RESULTS"
}
fail() {
    printf '  FAIL  %s\n' "$1"
    printf '%s\tFAIL\t%s\n' "$MYTH" "$1" >>"$RESULTS"
}
# check "what must hold" command...: PASS if the command succeeds.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
changed() {
    printf '  what changed: %s\n' "$*"
}

# The page a client pod fetches (its title line, or the error).
fetch() {
    k exec client -- curl -sS -m 5 "http://$1" 2>&1 | grep -o '<title>.*</title>' || return 1
}
welcome() {
    [[ $(fetch "$1") == '<title>Welcome to nginx!</title>' ]]
}
# A fetch as the user types it, shown with its output.
show_fetch() {
    show_grep '<title>|curl:' k exec client -- curl -sS -m 5 "http://$1"
}

# Shows a command's output lines that match a pattern (and the command itself).
show_grep() {
    local pattern=$1
    shift
    show "$@" | grep -E -e '^  [$] ' -e "$pattern" || true
}

has_ip() {
    test -n "$(pod_ip "$1")"
}

no_kube_proxy_pod() {
    test -z "$(k get pods -n kube-system -l k8s-app=kube-proxy -o name)"
}

# The client pod the demos fetch from (curl in a pod of the cluster network).
client() {
    if ! k get pod client >/dev/null 2>&1; then
        show k run client --image=curlimages/curl --restart=Never --command -- sleep 86400
    fi
    k wait --for=condition=Ready pod/client --timeout=300s
}

# Whether anything on a node mentions an address: a listening socket, an interface address, an
# iptables or nftables rule.
mentions() {
    local node=$1 ip=$2
    node_sh "$node" "(ss -ltnH; ss -lunH; ip -o addr; iptables-save; ip6tables-save; nft list ruleset) 2>/dev/null" | grep -qwF -- "$ip"
}
nothing_mentions() {
    ! mentions "$@"
}

pod_ip() {
    k get pod "$1" -o jsonpath='{.status.podIP}'
}

# Demo 1: kube-proxy does not assign pod IPs.
myth1() {
    log "Myth 1: kube-proxy assigns pod IPs. It does not: the CNI does, with no service proxy anywhere."
    k delete pod test-pod no-cni --ignore-not-found --wait=true
    log "no service proxy at all: kube-proxy has no pod, and ferrynet's service translation is off"
    service_proxy false
    show k get daemonset kube-proxy -n kube-system
    local node agent
    for node in $(nodes); do
        agent=$(agent_pod "$node")
        show_grep 'services:|bpf pins:' k exec -n kube-system "$agent" -- ferrynet-agent status
    done
    check "no kube-proxy pod runs" no_kube_proxy_pod
    check "no node translates Services (no kube-proxy rule, no ferrynet service datapath)" no_service_proxy

    log "a pod gets its IP from the CNI all the same"
    show k run test-pod --image=nginx --restart=Never
    k wait --for=condition=Ready pod/test-pod --timeout=300s
    show k get pods -o wide
    local ip cidr
    ip=$(pod_ip test-pod)
    node=$(k get pod test-pod -o jsonpath='{.spec.nodeName}')
    cidr=$(k get node "$node" -o jsonpath='{.spec.podCIDR}')
    show node_sh "$node" 'cat /etc/cni/net.d/*ferrynet*'
    changed "test-pod got $ip on $node, whose PodCIDR is $cidr (ferrynet-ipam's range in the conflist above)"
    check "test-pod has an IP ($ip) with no service proxy running" test -n "$ip"
    check "$ip is in $node's PodCIDR $cidr" ip_in_cidr "$ip" "$cidr"
    show k delete pod test-pod

    log "the reverse: a service proxy running, and a node without the CNI's conflist"
    service_proxy true
    node=$(nodes | grep -v control-plane | head -n 1)
    # The agent rewrites the conflist on every pass (and its init container at every start), so
    # it must be off this node while the conflist is away: the DaemonSet's node affinity
    # excludes nodes with this label, and the DaemonSet controller removes the pod there.
    show k label node "$node" "$PAUSE_LABEL=paused" --overwrite
    k wait --for=delete pod -n kube-system -l "$AGENT_LABELS" --field-selector "spec.nodeName=$node" --timeout=120s
    show node_sh "$node" 'mkdir -p /root/cni-off && mv /etc/cni/net.d/*ferrynet* /root/cni-off/ && ls -A /etc/cni/net.d'
    show k run no-cni --image=nginx --restart=Never --overrides='{"apiVersion":"v1","spec":{"nodeName":"'"$node"'"}}'
    check "with no conflist on $node, no-cni gets no IP (watched for 45 s)" never 45 has_ip no-cni
    show k get pod no-cni -o wide
    show k get events --field-selector involvedObject.name=no-cni
    changed "nothing: the pod is scheduled to $node and stays without an IP; a service proxy does not make one"

    log "restoring the conflist and the agent on $node"
    show node_sh "$node" 'mv /root/cni-off/* /etc/cni/net.d/ && ls -A /etc/cni/net.d'
    show k label node "$node" "$PAUSE_LABEL-"
    wait_agents
    check "with the conflist back, no-cni gets an IP" eventually 180 has_ip no-cni
    show k get pod no-cni -o wide
    changed "no-cni got $(pod_ip no-cni) once the CNI was back"
    show k delete pod no-cni
}

# Succeeds if no node has a kube-proxy rule or a ferrynet service datapath.
no_service_proxy() {
    local node
    for node in $(nodes); do
        node_sh "$node" '! (iptables-save; nft list ruleset) 2>/dev/null | grep -q KUBE-SERVICES' || return 1
        # shellcheck disable=SC2016 # expanded in the node
        node_sh "$node" 'test -z "$(ls -A /sys/fs/bpf/ferrynet 2>/dev/null)"' || return 1
    done
}

# Demo 2: a cluster works without kube-proxy.
myth2() {
    log "Myth 2: a cluster needs kube-proxy. It does not: ferrynet translates Services."
    k delete pod nginx --ignore-not-found --wait=true
    k delete service nginx --ignore-not-found
    service_proxy true
    show k get daemonset kube-proxy -n kube-system
    check "no kube-proxy pod runs" no_kube_proxy_pod
    show k run nginx --image=nginx --port=80 --expose
    k wait --for=condition=Ready pod/nginx --timeout=300s
    client
    local cip
    cip=$(k get service nginx -o jsonpath='{.spec.clusterIP}')
    show k get service nginx
    eventually 60 welcome nginx || true
    show_fetch nginx
    check "the client fetches the welcome page by the Service's name (DNS is a Service too)" welcome nginx
    show_fetch "$cip"
    check "the client fetches it by the ClusterIP $cip" welcome "$cip"
    changed "nothing of kube-proxy's: its DaemonSet has no pod and no node has its rules"
}

# Demo 3: how Service routing works.
myth3() {
    log "Myth 3: a Service is something that runs. It is a translation, from its IP to pod IPs."
    k delete deployment demo --ignore-not-found --wait=true
    k delete service demo --ignore-not-found
    service_proxy true
    client
    show k create deployment demo --image=nginx
    show k expose deployment demo --port=80
    k rollout status deployment/demo --timeout=300s
    show k get pods -l app=demo -o wide
    local pod ip cip node agent
    pod=$(k get pods -l app=demo -o jsonpath='{.items[*].metadata.name}')
    ip=$(pod_ip "$pod")
    cip=$(k get service demo -o jsonpath='{.spec.clusterIP}')
    show k get service demo
    show k get endpoints demo
    show_fetch "$ip"
    check "the client reaches the pod by its IP $ip" welcome "$ip"
    eventually 60 welcome "$cip" || true
    show_fetch "$cip"
    check "the client reaches it by the Service IP $cip" welcome "$cip"
    check "the pod's IP did not change ($ip)" test "$(pod_ip "$pod")" = "$ip"
    changed "nothing about the pod: the Service IP is another name for its address, not a new one"

    log "nothing on any node holds $cip: no socket, no interface address, no iptables or nftables rule"
    for node in $(nodes); do
        show node_sh "$node" "ss -ltnH | grep -F $cip || echo 'no socket listens on $cip'"
        show node_sh "$node" "(iptables-save; nft list ruleset) 2>/dev/null | grep -cF $cip || true"
        check "$node: no socket, address or rule mentions $cip" nothing_mentions "$node" "$cip"
    done

    log "the translation, as the agent on the client's node has it in its maps"
    node=$(k get pod client -o jsonpath='{.spec.nodeName}')
    agent=$(agent_pod "$node")
    show k exec -n kube-system "$agent" -- ferrynet-agent explain "$cip:80"
    check "explain $cip:80 on $node shows the backend $ip:80" explains "$agent" "$cip" "$ip"

    show k scale deployment demo --replicas=3
    k rollout status deployment/demo --timeout=300s
    show k get pods -l app=demo -o wide
    local ips
    read -ra ips <<<"$(k get pods -l app=demo -o jsonpath='{.items[*].status.podIP}')"
    check "the explanation follows: all three backends (${ips[*]})" eventually 60 explains "$agent" "$cip" "${ips[@]}"
    show k exec -n kube-system "$agent" -- ferrynet-agent explain "$cip:80"
    check "the first pod kept its IP $ip" test "$(pod_ip "$pod")" = "$ip"
    changed "two backends joined the translation; the Service IP and the first pod's IP stayed"
}

# Succeeds if `ferrynet-agent explain CLUSTER_IP:80` in AGENT lists every given backend.
explains() {
    local agent=$1 cip=$2 out ip
    shift 2
    out=$(k exec -n kube-system "$agent" -- ferrynet-agent explain "$cip:80")
    for ip in "$@"; do
        grep -qF "$ip:80" <<<"$out" || return 1
    done
}

# Demo 4: what breaks without the service proxy.
myth4() {
    log "Myth 4: what breaks without the service proxy. Not the pods; the Services."
    k delete deployment web --ignore-not-found --wait=true
    k delete service web --ignore-not-found
    service_proxy true
    client
    show k create deployment web --image=nginx
    show k expose deployment web --port=80
    k rollout status deployment/web --timeout=300s
    local pod ip cip
    pod=$(k get pods -l app=web -o jsonpath='{.items[*].metadata.name}')
    ip=$(pod_ip "$pod")
    cip=$(k get service web -o jsonpath='{.spec.clusterIP}')
    check "before: the Service answers at $cip" eventually 60 welcome "$cip"

    log "the agent stopped on every node: its pods go, its pinned datapath stays"
    show k label nodes --all "$PAUSE_LABEL=paused" --overwrite
    k wait --for=delete pod -n kube-system -l "$AGENT_LABELS" --timeout=180s
    show k get pods -n kube-system -l "$AGENT_LABELS"
    show_fetch "$cip"
    check "with no agent running, the Service still answers at $cip" welcome "$cip"
    check "and by name (the DNS Service is translated too)" welcome web
    changed "no agent process on any node; Services kept working from the pinned maps and programs"
    show k label nodes --all "$PAUSE_LABEL-"
    wait_agents

    log "service translation removed: every agent restarted with --service-proxy=false"
    service_proxy false
    show_fetch "$cip"
    check "the ClusterIP $cip stops answering" never 15 welcome "$cip"
    show_fetch "$ip"
    check "the pod IP $ip still answers" welcome "$ip"
    changed "the translation is gone, and with it every Service (DNS too); pods and their IPs are untouched"

    log "service translation back on, timed until the Service answers"
    local start ms
    start=$(date +%s%N)
    show k set env daemonset/ferrynet-agent -n kube-system FERRYNET_SERVICE_PROXY=true
    if eventually 600 welcome "$cip"; then
        ms=$((($(date +%s%N) - start) / 1000000))
        pass "the Service answers again, $((ms / 1000)).$(printf %03d $((ms % 1000))) s after the set env"
    else
        fail "the Service answers again within 600 s"
    fi
    k rollout status daemonset/ferrynet-agent -n kube-system --timeout=600s
    wait_agents
    show_fetch "$cip"
    changed "the agents rebuilt the datapath from the API, and the Service answered again"
}

summary() {
    local n status passed failed
    printf '\n%-6s %-60s %-6s %s\n' MYTH "" RESULT "CHECKS (passed/failed)"
    local names=("" "kube-proxy does not assign pod IPs" "a cluster works without kube-proxy" "how Service routing works" "what breaks without the service proxy")
    for n in 1 2 3 4; do
        [[ -n $ONLY && $ONLY != "$n" ]] && continue
        passed=$(awk -F'\t' -v n="$n" '$1 == n && $2 == "PASS"' "$RESULTS" | wc -l)
        failed=$(awk -F'\t' -v n="$n" '$1 == n && $2 == "FAIL"' "$RESULTS" | wc -l)
        status=PASS
        ((failed == 0 && passed > 0)) || status=FAIL
        printf '%-6s %-60s %-6s %s/%s\n' "$n" "${names[$n]}" "$status" "$passed" "$failed"
    done
    awk -F'\t' '$2 == "FAIL" { printf "  failed (myth %s): %s\n", $1, $3 }' "$RESULTS"
    ! grep -q "	FAIL	" "$RESULTS"
}

"$HERE/cluster.sh" create
"$HERE/cluster.sh" install
"$HERE/kube-proxy.sh" down
for MYTH in 1 2 3 4; do
    [[ -n $ONLY && $ONLY != "$MYTH" ]] && continue
    # Each demo runs in a subshell with errexit on: an unexpected failure ends that demo (as a
    # FAIL) and the next one still runs.
    set +e
    (
        set -e
        "myth$MYTH"
    )
    rc=$?
    set -e
    ((rc == 0)) || fail "demo $MYTH stopped at an unexpected error (exit status $rc)"
done
if ((RESTORE_KUBE_PROXY)); then
    "$HERE/kube-proxy.sh" restore
    log "Services are kube-proxy's again: ferrynet's service translation off"
    service_proxy false
fi
if ((DELETE_CLUSTER)); then
    "$HERE/cluster.sh" delete
fi
summary
