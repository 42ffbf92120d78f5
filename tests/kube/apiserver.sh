#!/usr/bin/env bash
# A real Kubernetes API server for meshsign's tests: kube-apiserver, etcd and
# kubectl built from the Go module proxy (pinned versions, cached outside the
# checkout), started on free loopback ports, stopped by PID.
#
#   tests/kube/apiserver.sh build          build once; prints the binary directory
#   tests/kube/apiserver.sh start DIR [OWNER_PID]
#                                          start etcd + kube-apiserver with state in DIR;
#                                          writes DIR/kubeconfig, DIR/admin-token, DIR/env;
#                                          with OWNER_PID, both are stopped when that process exits
#   tests/kube/apiserver.sh stop DIR       stop both (by the PIDs in DIR)
#
# Cache: ${MESHSIGN_TEST_CACHE:-~/.cache/meshsign-test}/kube-<version>/{kube-apiserver,kubectl,etcd}.
set -euo pipefail

K8S_VERSION=v1.34.4
STAGING_VERSION=v0.34.4
CACHE_ROOT=${MESHSIGN_TEST_CACHE:-$HOME/.cache/meshsign-test}
BIN_DIR=$CACHE_ROOT/kube-$K8S_VERSION

log() { printf 'apiserver.sh: %s\n' "$*" >&2; }

build() {
    if [ -x "$BIN_DIR/kube-apiserver" ] && [ -x "$BIN_DIR/kubectl" ] && [ -x "$BIN_DIR/etcd" ]; then
        echo "$BIN_DIR"
        return
    fi
    command -v go >/dev/null || { log "go is needed to build kube-apiserver"; exit 1; }
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    log "building kube-apiserver, kubectl and etcd $K8S_VERSION from the Go module proxy (once; minutes)"
    (
        cd "$work"
        export GOFLAGS=-mod=mod GOTOOLCHAIN=local
        export GOCACHE=${MESHSIGN_KUBE_GOCACHE:-$CACHE_ROOT/gocache}
        local upstream
        upstream=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
        {
            echo "module k8sbins"
            echo
            echo "go 1.24.0"
            echo
            echo "require k8s.io/kubernetes $K8S_VERSION"
            echo
            # Every staging module the upstream go.mod replaces with a local path
            # comes from the proxy at the matching v0 version instead.
            grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$upstream" | awk '{print $1}' |
                grep -v -E 'k8s.io/(sample-cli-plugin|sample-controller)$' |
                while read -r m; do echo "replace $m => $m $STAGING_VERSION"; done
        } > go.mod
        go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION"
        local etcd_version
        etcd_version=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
        go get "go.etcd.io/etcd/server/v3@$etcd_version"
        local minor=${K8S_VERSION#v1.}
        minor=${minor%%.*}
        local ld="-s -w"
        for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        done
        mkdir -p "$BIN_DIR.tmp"
        go build -trimpath -ldflags "$ld" -o "$BIN_DIR.tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
        go build -trimpath -ldflags "-s -w" -o "$BIN_DIR.tmp/etcd" go.etcd.io/etcd/server/v3
    )
    rm -rf "$BIN_DIR"
    mv "$BIN_DIR.tmp" "$BIN_DIR"
    echo "$BIN_DIR"
}

free_port() {
    python3 -c 'import random,socket
# Below the kernel ephemeral range (32768+), so outgoing connections cannot take it before we bind it.
for _ in range(200):
    p = random.randint(20000, 32000); s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try: s.bind(("127.0.0.1", p)); print(p); break
    except OSError: pass
    finally: s.close()
else: raise SystemExit("no free port")'
}

wait_for() { # URL CURL-ARGS... ; up to 60 s
    local url=$1; shift
    for _ in $(seq 1 300); do
        if curl -fsS -o /dev/null "$@" "$url" 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    return 1
}

start() {
    local dir=$1
    build >/dev/null
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local etcd_port etcd_peer api_port
    etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
    (
        cd "$dir"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=meshsign-test-kube-ca" \
            -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key \
            -out apiserver.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' > san.ext
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
            -extfile san.ext -out apiserver.crt 2>/dev/null
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        head -c 24 /dev/urandom | base64 | tr -d '/+=' > admin-token
        echo "$(cat admin-token),admin,admin-uid,system:masters" > tokens.csv
    )
    "$BIN_DIR/etcd" --name=test --data-dir="$dir/etcd" \
        --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
        --listen-peer-urls="http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
        --initial-cluster="test=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level=warn \
        >"$dir/etcd.log" 2>&1 &
    echo $! > "$dir/etcd.pid"
    wait_for "http://127.0.0.1:$etcd_port/health" || { log "etcd did not start (see $dir/etcd.log)"; stop "$dir"; exit 1; }
    "$BIN_DIR/kube-apiserver" --etcd-servers="http://127.0.0.1:$etcd_port" \
        --bind-address=127.0.0.1 --secure-port="$api_port" --advertise-address=127.0.0.1 \
        --endpoint-reconciler-type=none \
        --tls-cert-file="$dir/apiserver.crt" --tls-private-key-file="$dir/apiserver.key" \
        --client-ca-file="$dir/ca.crt" --token-auth-file="$dir/tokens.csv" \
        --service-account-issuer="https://127.0.0.1:$api_port" \
        --service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
        --api-audiences="https://127.0.0.1:$api_port" --service-cluster-ip-range=10.0.0.0/24 \
        --authorization-mode=RBAC --disable-admission-plugins=ServiceAccount \
        --runtime-config=certificates.k8s.io/v1beta1/clustertrustbundles=true \
        --feature-gates=ClusterTrustBundle=true \
        >"$dir/apiserver.log" 2>&1 &
    echo $! > "$dir/apiserver.pid"
    wait_for "https://127.0.0.1:$api_port/readyz" --cacert "$dir/ca.crt" ||
        { log "kube-apiserver did not become ready (see $dir/apiserver.log)"; stop "$dir"; exit 1; }
    cat > "$dir/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $dir/ca.crt
users:
- name: admin
  user:
    token: $(cat "$dir/admin-token")
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
KCFG
    cat > "$dir/env" <<ENV
KUBE_BIN_DIR=$BIN_DIR
KUBECONFIG=$dir/kubeconfig
KUBE_SERVER=https://127.0.0.1:$api_port
ENV
    if [ -n "${2:-}" ]; then
        # A watchdog: the test process that owns this API server may exit
        # without stopping it (a panic, a static that is never dropped).
        local owner=$2 self
        self=$(realpath "$0")
        nohup bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; '$self' stop '$dir'" \
            >/dev/null 2>&1 &
    fi
    log "kube-apiserver ready at https://127.0.0.1:$api_port (state in $dir)"
}

stop() {
    local dir=$1
    for name in apiserver etcd; do
        if [ -f "$dir/$name.pid" ]; then
            local pid
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
}

case "${1:-}" in
    build) build ;;
    start) start "${2:?usage: $0 start DIR [OWNER_PID]}" "${3:-}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 build | start DIR | stop DIR" >&2; exit 2 ;;
esac
