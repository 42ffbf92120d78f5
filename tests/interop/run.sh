#!/usr/bin/env bash
# Interop suite: runs meshsign servers on loopback and asks them for workload
# certificates with Istio's own client code (tests/interop/istio-agent), the
# real pilot-agent binary in proxyless mode, and grpcurl.
#
#   MESHSIGN_BIN=target/debug/meshsign tests/interop/run.sh [SCENARIO_GLOB]
#
# Environment:
#   MESHSIGN_BIN         meshsign binary (default: <repo>/target/debug/meshsign)
#   INTEROP_BIN_DIR      cache for the Go binaries (default: <repo>/target/interop-bin)
#   ISTIO_SAMPLES_DIR    Istio's samples/certs bundle (default: <repo>/tests/testdata/istio-samples)
#   INTEROP_PILOT_AGENT  0 skips the pilot-agent scenario (default: 1)
#   INTEROP_KEEP         1 keeps the scratch directory (server logs, configs);
#                        it is always kept when a check failed
#
# Prints one PASS/FAIL line per check and "interop: N passed, M failed"; exits
# non-zero if any check failed. Without go it prints "SKIP: go not found" and
# exits 0.
set -uo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
only=${1:-*}

if ! command -v go >/dev/null; then
    echo "SKIP: go not found"
    exit 0
fi

meshsign=${MESHSIGN_BIN:-$repo_root/target/debug/meshsign}
case $meshsign in /*) ;; *) meshsign=$PWD/$meshsign ;; esac
bin_dir=${INTEROP_BIN_DIR:-$repo_root/target/interop-bin}
samples=${ISTIO_SAMPLES_DIR:-$repo_root/tests/testdata/istio-samples}
with_pilot_agent=${INTEROP_PILOT_AGENT:-1}
export INTEROP_BIN_DIR=$bin_dir

if [ ! -x "$meshsign" ]; then
    echo "FAIL interop: meshsign binary not found at $meshsign (build it or set MESHSIGN_BIN)"
    exit 1
fi

# --- build the Go side once ---------------------------------------------------
mkdir -p "$bin_dir"
harness=$bin_dir/istio-agent
pilot_agent=$bin_dir/pilot-agent
echo "building the Istio client harness into $bin_dir"
if ! (cd "$repo_root/tests/interop/istio-agent" && go build -o "$harness" .); then
    echo "FAIL interop: go build of tests/interop/istio-agent failed"
    exit 1
fi
if [ "$with_pilot_agent" != 0 ]; then
    # The pilot-agent tool is pinned by the same go.mod as the harness.
    if ! (cd "$repo_root/tests/interop/istio-agent" && go build -o "$pilot_agent" istio.io/istio/pilot/cmd/pilot-agent); then
        echo "FAIL interop: go build of istio.io/istio/pilot/cmd/pilot-agent failed"
        exit 1
    fi
fi

# The harness's own tests (against an in-process fake CA) first: a harness
# that cannot tell a bad answer from a good one proves nothing.
if ! selftest=$(cd "$repo_root/tests/interop/istio-agent" && go test -count=1 . 2>&1); then
    echo "$selftest"
    echo "FAIL interop: the harness's self-test failed"
    exit 1
fi
echo "harness self-test: $selftest"

work=$(mktemp -d "${TMPDIR:-/tmp}/meshsign-interop.XXXXXX")
passed=0 failed=0
server_pid=""
agent_pid=""
cleanup() {
    for pid in $agent_pid $server_pid; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    if [ "${INTEROP_KEEP:-0}" = 1 ] || [ "$failed" != 0 ]; then
        echo "scratch directory (configs, server logs) kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

results=()
record() { # record PASS|FAIL name [why]
    local line="$1 $2${3:+: $3}"
    echo "$line"
    results+=("$line")
    if [ "$1" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local p
    for _ in $(seq 1 100); do
        # Below the kernel's ephemeral range (32768+): an outgoing connection
        # (to the API server, etcd...) cannot take the port before meshsign binds it.
        p=$((20000 + RANDOM % 12000))
        if ! port_open "$p"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# --- per-scenario server ------------------------------------------------------
# new_scenario NAME: sets $dir, $state, $port for the scenario.
new_scenario() {
    scenario=$1
    dir=$work/$scenario
    state=$dir/state
    mkdir -p "$state"
    port=$(free_port) || { echo "no free port" >&2; return 1; }
}

# write_config [CA_DIR]: dev mode without CA_DIR, plugged CA with it.
write_config() {
    local ca_dir=${1:-}
    {
        echo "listen: \"127.0.0.1:$port\""
        echo "trust_domain: \"cluster.local\""
        echo "state_dir: \"$state\""
        if [ -n "$ca_dir" ]; then
            echo "ca: { dir: \"$ca_dir\" }"
            echo "authn:"
            echo "  client_certificates: true"
            echo "  jwt:"
            echo "    - issuer: \"meshsign-dev\""
            echo "      audiences: [\"istio-ca\"]"
            echo "      jwks_file: \"$state/jwks.json\""
        else
            echo "authn: { client_certificates: true }"
        fi
        echo "policy: { default_ttl: \"24h\", max_ttl: \"2160h\" }"
    } >"$dir/config.yaml"
}

# token NAME ARGS...: mints $dir/NAME with `meshsign token` (before the server
# starts, so the server finds the dev signing key and jwks.json).
token() {
    local name=$1
    shift
    if ! "$meshsign" token --state-dir "$state" "$@" >"$dir/$name" 2>"$dir/$name.err" || [ ! -s "$dir/$name" ]; then
        echo "meshsign token $* failed: $(tr '\n' ' ' <"$dir/$name.err")" >&2
        return 1
    fi
}

start_server() {
    "$meshsign" serve --config "$dir/config.yaml" >"$dir/meshsign.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 300); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            wait "$server_pid"
            echo "meshsign serve exited with $? before listening; log: $(tail -n 5 "$dir/meshsign.log" | tr '\n' ' ')" >&2
            server_pid=""
            return 1
        fi
        if port_open "$port"; then return 0; fi
        sleep 0.1
    done
    echo "meshsign serve did not listen on 127.0.0.1:$port within 30s" >&2
    return 1
}

stop_server() {
    [ -n "$server_pid" ] || return 0
    kill "$server_pid" 2>/dev/null
    for _ in $(seq 1 50); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
    server_pid=""
}

# agent NAME ARGS...: one harness run against the current server. CA_ADDR is
# localhost:PORT, so the client's localhost -> istiod.istio-system.svc server
# name mapping is part of the test.
agent() {
    local name=$1
    shift
    local out
    out=$("$harness" --scenario "$name" --ca-addr "localhost:$port" --wait-ready 30s --timeout 60s "$@" 2>"$dir/$name.stderr")
    local rc=$?
    local line
    line=$(grep -E '^(PASS|FAIL) ' <<<"$out" | tail -n 1)
    case "$line" in
    PASS*) record PASS "$name" ;;
    FAIL*) record FAIL "$name" "${line#FAIL "$name": } (server log: $dir/meshsign.log)" ;;
    *) record FAIL "$name" "harness exited $rc without a verdict: $(tail -n 3 "$dir/$name.stderr" | tr '\n' ' ')" ;;
    esac
}

# shellcheck disable=SC2053 # $only is a glob on purpose
selected() { [[ $1 == $only ]]; }

# setup_dev NAME: dev-mode server with a token for default/sleep.
setup_dev() {
    new_scenario "$1" && write_config &&
        token token-sleep --namespace default --service-account sleep &&
        start_server
}

# setup_plugged NAME CA_DIR: plugged-CA server with a token for default/sleep.
setup_plugged() {
    new_scenario "$1" && write_config "$2" &&
        token token-sleep --namespace default --service-account sleep &&
        start_server
}

# run_scenario NAME SETUP... -- BODY...: runs SETUP then BODY, records a FAIL
# if SETUP fails, always stops the server.
run_scenario() {
    local name=$1
    shift
    selected "$name" || return 0
    local setup=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do setup+=("$1"); shift; done
    shift
    if "${setup[@]}" 2>"$work/$name.setup.err"; then
        "$@"
    else
        record FAIL "$name" "setup: $(tr '\n' ' ' <"$work/$name.setup.err")"
    fi
    stop_server
}

sa_args=(--namespace default --service-account sleep)

# --- dev mode: root and intermediate made by meshsign -------------------------
body_dev_rsa() {
    agent dev-rsa-2048 --root "$state/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --key rsa --ttl 24h --expect-root "$state/root-cert.pem" --expect-root-certs 1 --out "$dir/certs"
    # PROV_CERT-style (VM) mTLS: the certificate just issued authenticates the
    # next request; no token is sent.
    agent dev-mtls-client-cert --root "$state/root-cert.pem" "${sa_args[@]}" --prov-cert "$dir/certs" \
        --expect-root "$state/root-cert.pem"
    local out rc line
    out=$("$repo_root/tests/interop/grpcurl.sh" --addr "127.0.0.1:$port" --cacert "$state/root-cert.pem" \
        --token "$dir/token-sleep" --spiffe-id spiffe://cluster.local/ns/default/sa/sleep 2>&1)
    rc=$?
    while IFS= read -r line; do echo "  $line"; done <<<"$out"
    if [ $rc = 0 ]; then
        record PASS grpcurl
    else
        record FAIL grpcurl "$(grep -E '^FAIL' <<<"$out" | head -n 3 | tr '\n' ' ')"
    fi
}
run_scenario dev-rsa-2048 setup_dev dev-rsa-2048 -- body_dev_rsa

# Bodies are functions so that $state, $dir and $port are those of the
# scenario's own server when they run.
body_ecdsa() { # body_ecdsa CURVE
    agent "dev-ecdsa-$1" --root "$state/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --key "ecdsa-$1" --expect-root "$state/root-cert.pem"
}
run_scenario dev-ecdsa-p256 setup_dev dev-ecdsa-p256 -- body_ecdsa p256
run_scenario dev-ecdsa-p384 setup_dev dev-ecdsa-p384 -- body_ecdsa p384

body_ttl() {
    agent dev-ttl-0-default-24h --root "$state/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --ttl 0 --expect-ttl 24h
}
run_scenario dev-ttl-0-default-24h setup_dev dev-ttl-0-default-24h -- body_ttl

body_ttl_max() {
    agent dev-ttl-2160h-max --root "$state/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --ttl 2160h
}
run_scenario dev-ttl-2160h-max setup_dev dev-ttl-2160h-max -- body_ttl_max

body_ttl_over() {
    agent dev-ttl-2161h-over-max --root "$state/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --ttl 2161h --expect-code InvalidArgument
}
run_scenario dev-ttl-2161h-over-max setup_dev dev-ttl-2161h-over-max -- body_ttl_over

body_no_token() {
    agent dev-no-token --root "$state/root-cert.pem" "${sa_args[@]}" --expect-code Unauthenticated
}
run_scenario dev-no-token setup_dev dev-no-token -- body_no_token

setup_other_sa() {
    setup_dev "$1" && token token-other --namespace default --service-account other
}
body_other_sa() {
    # Token for default/other, CSR for default/sleep.
    agent dev-token-other-sa --root "$state/root-cert.pem" --token "$dir/token-other" "${sa_args[@]}" \
        --expect-code PermissionDenied
}
run_scenario dev-token-other-sa setup_other_sa dev-token-other-sa -- body_other_sa

setup_bad_tokens() {
    new_scenario "$1" && write_config &&
        token token-expired --namespace default --service-account sleep --expired &&
        token token-wrong-aud --namespace default --service-account sleep --audience not-istio-ca &&
        start_server
}
body_bad_tokens() {
    agent dev-token-expired --root "$state/root-cert.pem" --token "$dir/token-expired" "${sa_args[@]}" \
        --expect-code Unauthenticated
    agent dev-token-wrong-audience --root "$state/root-cert.pem" --token "$dir/token-wrong-aud" "${sa_args[@]}" \
        --expect-code Unauthenticated
}
run_scenario dev-bad-tokens setup_bad_tokens dev-bad-tokens -- body_bad_tokens

# --- plugged CAs ----------------------------------------------------------------
# copy_bundle DEST CA_CERT CA_KEY CERT_CHAIN ROOT_CERT: an istiod-style cacerts dir.
copy_bundle() {
    mkdir -p "$1" && cp "$2" "$1/ca-cert.pem" && cp "$3" "$1/ca-key.pem" &&
        cp "$4" "$1/cert-chain.pem" && cp "$5" "$1/root-cert.pem"
}

setup_samples() {
    new_scenario "$1" || return 1
    [ -f "$samples/ca-cert.pem" ] || { echo "Istio sample bundle not found in $samples" >&2; return 1; }
    copy_bundle "$dir/cacerts" "$samples/ca-cert.pem" "$samples/ca-key.pem" "$samples/cert-chain.pem" \
        "$samples/root-cert.pem" && setup_plugged "$1" "$dir/cacerts"
}
body_samples() {
    # samples/certs: cert-chain.pem == ca-cert.pem -> [leaf, ca-cert, root].
    agent samples-plugin-ca --root "$dir/cacerts/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --expect-chain-len 3 --expect-root "$dir/cacerts/root-cert.pem" --expect-root-certs 1
}
run_scenario samples-plugin-ca setup_samples samples-plugin-ca -- body_samples

setup_tools_certs() {
    new_scenario "$1" &&
        "$meshsign" ca init --out "$dir/ca" --clusters cluster1 >"$dir/ca-init.log" 2>&1 &&
        setup_plugged "$1" "$dir/ca/cluster1"
}
body_tools_certs() {
    # tools/certs: cert-chain.pem = ca-cert.pem + root-cert.pem, so the root
    # comes twice: [leaf, intermediate, root, root bundle].
    agent tools-certs-bundle --root "$dir/ca/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --expect-chain-len 4 --expect-root "$dir/ca/cluster1/root-cert.pem" --expect-root-certs 1
}
run_scenario tools-certs-bundle setup_tools_certs tools-certs-bundle -- body_tools_certs

setup_multi_root() {
    new_scenario "$1" || return 1
    [ -f "$samples/root-cert-combined.pem" ] || { echo "Istio sample bundle not found in $samples" >&2; return 1; }
    copy_bundle "$dir/cacerts" "$samples/ca-cert.pem" "$samples/ca-key.pem" "$samples/cert-chain.pem" \
        "$samples/root-cert-combined.pem" && setup_plugged "$1" "$dir/cacerts"
}
body_multi_root() {
    # root-cert.pem holds two roots: they come back as ONE last element.
    agent multi-root --root "$dir/cacerts/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --expect-chain-len 3 --expect-root "$samples/root-cert-combined.pem" --expect-root-certs 2
}
run_scenario multi-root setup_multi_root multi-root -- body_multi_root

# --- inside Kubernetes: tokens from a real kube-apiserver, checked by TokenReview --
# tests/kube/apiserver.sh starts kube-apiserver + etcd (built once, cached);
# the namespace, service account, pod and pod-bound tokens come from its API.
kube_dir=""
setup_kube() {
    new_scenario "$1" || return 1
    kube_dir=$dir/kube
    "$repo_root/tests/kube/apiserver.sh" start "$kube_dir" $$ >/dev/null || return 1
    local kubectl
    kubectl="$(sed -n 's/^KUBE_BIN_DIR=//p' "$kube_dir/env")/kubectl --kubeconfig $kube_dir/kubeconfig"
    $kubectl create namespace default >/dev/null 2>&1
    $kubectl -n default create serviceaccount sleep >/dev/null || return 1
    printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: sleep-1, namespace: default}\nspec: {serviceAccountName: sleep, nodeName: node-1, containers: [{name: app, image: example.invalid/app}]}\n' |
        $kubectl create -f - >/dev/null || return 1
    $kubectl -n default create token sleep --audience istio-ca --duration 1h \
        --bound-object-kind Pod --bound-object-name sleep-1 >"$dir/token-sleep" || return 1
    $kubectl -n default create token sleep --audience not-istio-ca --duration 1h \
        --bound-object-kind Pod --bound-object-name sleep-1 >"$dir/token-wrong-aud" || return 1
    # ztunnel on node-1, for the ambient (impersonation) checks.
    $kubectl -n default create serviceaccount ztunnel >/dev/null || return 1
    printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: ztunnel-1, namespace: default}\nspec: {serviceAccountName: ztunnel, nodeName: node-1, containers: [{name: app, image: example.invalid/app}]}\n' |
        $kubectl create -f - >/dev/null || return 1
    $kubectl -n default create token ztunnel --audience istio-ca --duration 1h \
        --bound-object-kind Pod --bound-object-name ztunnel-1 >"$dir/token-ztunnel" || return 1
    {
        echo "listen: \"127.0.0.1:$port\""
        echo "state_dir: \"$state\""
        echo "kubernetes:"
        echo "  clusters:"
        echo "    - { id: Kubernetes, kubeconfig: \"$kube_dir/kubeconfig\" }"
        echo "  trusted_node_accounts: [\"default/ztunnel\"]"
    } >"$dir/config.yaml"
    start_server
}
body_kube() {
    agent kube-tokenreview --root "$state/root-cert.pem" --token "$dir/token-sleep" "${sa_args[@]}" \
        --key ecdsa-p256 --expect-root "$state/root-cert.pem"
    agent kube-tokenreview-wrong-audience --root "$state/root-cert.pem" --token "$dir/token-wrong-aud" \
        "${sa_args[@]}" --expect-code Unauthenticated
    # ztunnel's request shape from the mock workload: its own token,
    # ImpersonatedIdentity, an empty-subject P-256 CSR.
    if "$meshsign" request --addr "localhost:$port" --root "$state/root-cert.pem" \
        --token "$dir/token-ztunnel" --ecdsa --impersonate spiffe://cluster.local/ns/default/sa/sleep \
        --out "$dir/ambient" >"$dir/ambient.log" 2>&1; then
        record PASS kube-ambient-impersonation
    else
        record FAIL kube-ambient-impersonation "$(tail -n 2 "$dir/ambient.log" | tr '\n' ' ')"
    fi
    if "$meshsign" request --addr "localhost:$port" --root "$state/root-cert.pem" \
        --token "$dir/token-ztunnel" --ecdsa --impersonate spiffe://cluster.local/ns/default/sa/elsewhere \
        --out "$dir/ambient-refused" >"$dir/ambient-refused.log" 2>&1; then
        record FAIL kube-ambient-off-node "an identity with no pod on node-1 was issued"
    elif grep -q "Unauthenticated" "$dir/ambient-refused.log"; then
        record PASS kube-ambient-off-node
    else
        record FAIL kube-ambient-off-node "$(tail -n 2 "$dir/ambient-refused.log" | tr '\n' ' ')"
    fi
    # The real pilot-agent with the API server's pod-bound token.
    if [ "$with_pilot_agent" != 0 ]; then
        body_pilot_agent pilot-agent-kube-tokenreview
    fi
}
teardown_kube() {
    [ -n "$kube_dir" ] && "$repo_root/tests/kube/apiserver.sh" stop "$kube_dir"
    kube_dir=""
}

# --- the real pilot-agent, proxyless (DISABLE_ENVOY=true) ----------------------
body_pilot_agent() { # body_pilot_agent [CHECK-NAME]
    local name=${1:-pilot-agent-proxyless} cwd=$dir/agent-cwd status_port
    status_port=$(free_port) || { record FAIL "$name" "no free port"; return; }
    # The agent reads its token from ./var/run/secrets/tokens/istio-token.
    mkdir -p "$cwd/var/run/secrets/tokens" "$dir/agent-out"
    cp "$dir/token-sleep" "$cwd/var/run/secrets/tokens/istio-token"
    (
        cd "$cwd" && exec env -i PATH="$PATH" HOME="$cwd" \
            DISABLE_ENVOY=true \
            CA_ADDR="localhost:$port" CA_ROOT_CA="$state/root-cert.pem" XDS_ROOT_CA="$state/root-cert.pem" \
            OUTPUT_CERTS="$dir/agent-out" POD_NAMESPACE=default SERVICE_ACCOUNT=sleep \
            ISTIO_META_CLUSTER_ID=Kubernetes SECRET_TTL=12h \
            PROXY_CONFIG="{\"discoveryAddress\":\"localhost:$port\",\"statusPort\":$status_port}" \
            "$pilot_agent" proxy sidecar
    ) >"$dir/pilot-agent.log" 2>&1 &
    agent_pid=$!
    local ok=""
    for _ in $(seq 1 600); do
        if [ -s "$dir/agent-out/key.pem" ] && [ -s "$dir/agent-out/cert-chain.pem" ] && [ -s "$dir/agent-out/root-cert.pem" ]; then
            ok=1
            break
        fi
        kill -0 "$agent_pid" 2>/dev/null || break
        sleep 0.1
    done
    sleep 0.5 # let the agent finish writing all three files
    kill "$agent_pid" 2>/dev/null
    wait "$agent_pid" 2>/dev/null
    agent_pid=""
    if [ -z "$ok" ]; then
        record FAIL "$name" "pilot-agent wrote no certificates within 60s: $(grep -E 'error|warn' "$dir/pilot-agent.log" | tail -n 3 | tr '\n' ' ')"
        return
    fi
    local out line
    out=$("$harness" --scenario "$name" --check-dir "$dir/agent-out" "${sa_args[@]}" --ttl 12h \
        --expect-root "$state/root-cert.pem" 2>"$dir/$name.stderr")
    line=$(grep -E '^(PASS|FAIL) ' <<<"$out" | tail -n 1)
    case "$line" in
    PASS*) record PASS "$name" ;;
    *) record FAIL "$name" "${line#FAIL "$name": }" ;;
    esac
}
if [ "$with_pilot_agent" != 0 ]; then
    run_scenario pilot-agent-proxyless setup_dev pilot-agent-proxyless -- body_pilot_agent
fi

# Runs after the pilot-agent section: body_kube uses body_pilot_agent.
run_scenario kube-tokenreview setup_kube kube-tokenreview -- body_kube
teardown_kube

# --- summary ----------------------------------------------------------------------
echo
echo "interop summary:"
for line in "${results[@]}"; do echo "  $line"; done
echo "interop: $passed passed, $failed failed"
if [ $((passed + failed)) = 0 ]; then
    echo "no scenario matched '$only'"
    exit 1
fi
[ "$failed" = 0 ]
