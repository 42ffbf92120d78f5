#!/usr/bin/env bash
# shellcheck disable=SC2030,SC2031 # the Go builds export their settings in subshells, on purpose
# Checks the Helm chart (deploy/helm/meshsign), the Istio values (deploy/istio)
# and the Dockerfile:
#   0. the Dockerfile with BuildKit's own checks (those of `docker build
#      --check`; tests/helm/dockerfile-lint, BuildKit pinned, built once), and
#      every COPY source exists and is in the build context (.dockerignore);
#      no image is built (no container engine here);
#   1. every value is described in values.yaml and the chart's README;
#      helm lint --strict, for every value set in deploy/helm/meshsign/ci/;
#   2. helm template for each value set; the meshsign configuration each one
#      renders is started with the real meshsign binary (below);
#   3. against a real kube-apiserver (tests/kube/apiserver.sh): the namespace
#      and CRDs (ServiceMonitor from prometheus-operator's module, Istio's from
#      its base chart) are created, then every rendered manifest, ours and
#      Istio's own charts rendered with deploy/istio/*.yaml, goes through
#      `kubectl apply --dry-run=server`;
#   4. for each value set, its ServiceAccount and RBAC are created for real, and
#      meshsign runs with the rendered configuration as that service account
#      (a token of it, nothing more): it must become ready (pod watch listed),
#      publish istio-ca-root-cert into a namespace, hold the Lease, and issue a
#      certificate through a TokenReview, and log no error or `forbidden`.
#      ambient and multi-cluster also serve ztunnel's request for a pod on its
#      node, ha writes the ClusterTrustBundle; multi-cluster gets a second API
#      server as cluster2, with the remote value set's RBAC;
#   5. the install commands of docs/istio.md (sections 1, 2, 4: helm install of
#      meshsign and Istio's charts, istiod-tls, the rotation's Secret updates)
#      in order against a fresh API server (objects stored; nothing runs pods).
# helm and the Dockerfile linter are built from the Go module proxy (pinned)
# once and cached in ${MESHSIGN_TEST_CACHE:-~/.cache/meshsign-test}/
# helm-<version>/helm and dockerfile-lint-buildkit-<version>/dockerfile-lint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD

HELM_VERSION=v3.19.5
# The same istio.io/istio the interop tests and the benchmark pin.
ISTIO_VERSION=v0.0.0-20260827124520-eed52ebb66ad
PROM_OPERATOR_VERSION=v0.85.0
BUILDKIT_VERSION=v0.30.0
KUBE_VERSION=v1.34.4   # tests/kube/apiserver.sh's
CACHE_ROOT=${MESHSIGN_TEST_CACHE:-$HOME/.cache/meshsign-test}
HELM_DIR=$CACHE_ROOT/helm-$HELM_VERSION
LINT_DIR=$CACHE_ROOT/dockerfile-lint-buildkit-$BUILDKIT_VERSION
CHART=deploy/helm/meshsign
NS=istio-system
VALUE_SETS=(default ha ambient multi-cluster remote)

log() { printf 'check.sh: %s\n' "$*" >&2; }
fail() { printf 'check.sh: FAIL: %s\n' "$*" >&2; exit 1; }

build_helm() {
    if [ -x "$HELM_DIR/helm" ]; then return; fi
    command -v go >/dev/null || fail "go is needed to build helm"
    log "building helm $HELM_VERSION from the Go module proxy (once)"
    local work
    work=$(mktemp -d)
    (
        cd "$work"
        export GOFLAGS=-mod=mod GOTOOLCHAIN=local GOCACHE=$CACHE_ROOT/gocache
        printf 'module helmbin\n\ngo 1.24.0\n' > go.mod
        go get "helm.sh/helm/v3@$HELM_VERSION"
        # As helm's Makefile: the default Kubernetes version helm assumes is
        # its client-go's (v0.X -> 1.X); the version string is the tag.
        local minor ld
        minor=$(go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)
        ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
        for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
            ld="$ld -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$minor"
        done
        mkdir -p "$HELM_DIR.tmp"
        go build -trimpath -ldflags "$ld" -o "$HELM_DIR.tmp/helm" helm.sh/helm/v3/cmd/helm
    )
    rm -rf "$work" "$HELM_DIR"
    mv "$HELM_DIR.tmp" "$HELM_DIR"
}

build_dockerfile_lint() {
    if [ -x "$LINT_DIR/dockerfile-lint" ] && cmp -s tests/helm/dockerfile-lint/main.go "$LINT_DIR/main.go"; then return; fi
    log "building dockerfile-lint (BuildKit $BUILDKIT_VERSION) from the Go module proxy (once)"
    local work
    work=$(mktemp -d)
    cp tests/helm/dockerfile-lint/main.go "$work/"
    (
        cd "$work"
        export GOFLAGS=-mod=mod GOTOOLCHAIN=local GOCACHE=$CACHE_ROOT/gocache
        printf 'module dockerfilelint\n\ngo 1.24.0\n' > go.mod
        go get "github.com/moby/buildkit@$BUILDKIT_VERSION"
        mkdir -p "$LINT_DIR.tmp"
        go build -trimpath -ldflags "-s -w" -o "$LINT_DIR.tmp/dockerfile-lint" .
        cp main.go "$LINT_DIR.tmp/"
    )
    rm -rf "$work" "$LINT_DIR"
    mv "$LINT_DIR.tmp" "$LINT_DIR"
}

module_dir() { # MODULE@VERSION -> its directory in the module cache (downloaded once)
    GOFLAGS=-mod=mod go mod download -json "$1" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error")))'
}

command -v go >/dev/null || fail "go is needed (helm, the Dockerfile linter, Istio's charts and CRDs come from the Go module proxy)"

# ---------------------------------------------------------------- 0: Dockerfile
build_dockerfile_lint
"$LINT_DIR/dockerfile-lint" Dockerfile >&2 || fail "Dockerfile: BuildKit's checks (above)"
python3 - <<'PY' || fail "Dockerfile: a COPY source is missing or excluded by .dockerignore"
import fnmatch, os, re, shlex, sys
ignore = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
def ignored(path):
    out = False
    for pat in ignore:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            out = not neg
    return out
bad = []
for line in open("Dockerfile"):
    m = re.match(r"\s*COPY\s+(.*)", line)
    if not m or "--from=" in line:
        continue
    srcs = [a for a in shlex.split(m.group(1)) if not a.startswith("--")][:-1]
    for src in srcs:
        if not os.path.exists(src):
            bad.append(f"{src}: not in the repository")
        elif ignored(src.rstrip("/")):
            bad.append(f"{src}: excluded by .dockerignore")
for b in bad:
    print("Dockerfile: COPY " + b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY
log "Dockerfile: BuildKit $BUILDKIT_VERSION checks pass; COPY sources present and in the build context"

build_helm
HELM=$HELM_DIR/helm
"$HELM" version --short >&2
ISTIO_CHARTS=$(module_dir "istio.io/istio@$ISTIO_VERSION")/manifests/charts
PROM_CRDS=$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROM_OPERATOR_VERSION")/example/prometheus-operator-crd
[ -d "$ISTIO_CHARTS/istio-control/istio-discovery" ] || fail "no Istio charts in $ISTIO_CHARTS"
[ -f "$PROM_CRDS/monitoring.coreos.com_servicemonitors.yaml" ] || fail "no ServiceMonitor CRD in $PROM_CRDS"

if [ -x target/debug/meshsign ] && [ -z "$(find src Cargo.toml build.rs proto -newer target/debug/meshsign -print -quit)" ]; then
    MESHSIGN=$ROOT/target/debug/meshsign
else
    log "building meshsign (cargo build --bin meshsign)"
    cargo build --quiet --bin meshsign
    MESHSIGN=$ROOT/target/debug/meshsign
fi

OUT=$(mktemp -d)
KUBE1=$OUT/kube1 KUBE2=$OUT/kube2 KUBE3=$OUT/kube3
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    tests/kube/apiserver.sh stop "$KUBE1" 2>/dev/null || true
    tests/kube/apiserver.sh stop "$KUBE2" 2>/dev/null || true
    tests/kube/apiserver.sh stop "$KUBE3" 2>/dev/null || true
    if [ -n "${KEEP_OUT:-}" ]; then log "output kept in $OUT"; else rm -rf "$OUT"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- 1, 2: lint, template
# Every value is described in values.yaml (a comment right above it) and has
# a row in the chart's README.
python3 - "$CHART/values.yaml" "$CHART/README.md" <<'PY' || fail "values not documented (above)"
import re, sys
# Maps whose keys are meshsign's or Kubernetes' own: documented as one value.
STOP = {"policy", "resources", "podSecurityContext", "securityContext", "updateStrategy", "audit.volume", "audit.settings"}
lines = open(sys.argv[1]).read().split("\n")
readme = open(sys.argv[2]).read()
stack, bad, n = [], [], 0
for i, line in enumerate(lines):
    m = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
    if not m:
        continue
    ind = len(m.group(1))
    while stack and stack[-1][0] >= ind:
        stack.pop()
    parent = ".".join(k for _, k in stack)
    if any(parent == s or parent.startswith(s + ".") for s in STOP):
        continue
    path = (parent + "." if parent else "") + m.group(2)
    rest = m.group(3).split("#")[0].strip()
    leaf = True
    if rest == "":
        nxt = next((l for l in lines[i + 1:] if l.strip() and not l.strip().startswith("#")), "")
        is_list = nxt.strip().startswith("- ")
        if not is_list:
            stack.append((ind, m.group(2)))
        leaf = is_list or path in STOP
    if not leaf:
        continue
    n += 1
    if not (i > 0 and lines[i - 1].strip().startswith("#")):
        bad.append(f"values.yaml: {path} has no comment")
    if f"| `{path}` |" not in readme:
        bad.append(f"README.md: no row for {path}")
for b in bad:
    print(b, file=sys.stderr)
if bad:
    sys.exit(1)
print(f"check.sh: all {n} values described in values.yaml and README.md", file=sys.stderr)
PY
for set in "${VALUE_SETS[@]}"; do
    values=$CHART/ci/$set-values.yaml
    [ -f "$values" ] || fail "missing $values"
    log "helm lint --strict ($set)"
    "$HELM" lint --strict "$CHART" -f "$values" --namespace "$NS" >"$OUT/lint-$set.txt" 2>&1 ||
        { cat "$OUT/lint-$set.txt" >&2; fail "helm lint ($set)"; }
    "$HELM" template meshsign "$CHART" -n "$NS" --kube-version "$KUBE_VERSION" -f "$values" \
        >"$OUT/meshsign-$set.yaml" || fail "helm template ($set)"
    log "helm template ($set): $(grep -c '^kind:' "$OUT/meshsign-$set.yaml") objects"
done

# Istio's own charts with deploy/istio's values: base (CRDs), istiod (sidecar,
# ambient, primary and remote of two clusters), ztunnel, istio-cni, a gateway.
render_istio() { # NAME CHART-DIR VALUES...
    local name=$1 dir=$2; shift 2
    local args=()
    for v in "$@"; do args+=(-f "$v"); done
    "$HELM" template "$name" "$ISTIO_CHARTS/$dir" -n "$NS" --kube-version "$KUBE_VERSION" "${args[@]}" \
        >"$OUT/istio-$name.yaml" || fail "helm template Istio $dir with $*"
    log "helm template Istio $dir ($name): $(grep -c '^kind:' "$OUT/istio-$name.yaml") objects"
}
render_istio base base deploy/istio/base-values.yaml
render_istio istiod istio-control/istio-discovery deploy/istio/istiod-values.yaml
render_istio istiod-ambient istio-control/istio-discovery deploy/istio/istiod-values.yaml deploy/istio/istiod-ambient-values.yaml
render_istio istiod-cluster1 istio-control/istio-discovery deploy/istio/istiod-values.yaml deploy/istio/istiod-ambient-values.yaml deploy/istio/istiod-cluster1-values.yaml
render_istio istiod-cluster2 istio-control/istio-discovery deploy/istio/istiod-cluster2-remote-values.yaml
render_istio ztunnel ztunnel deploy/istio/ztunnel-values.yaml
render_istio istio-cni istio-cni deploy/istio/cni-values.yaml
render_istio istio-ingressgateway gateway deploy/istio/gateway-values.yaml
# The values must reach the manifests: istiod's CA server off, the CA address everywhere.
grep -A1 'name: ENABLE_CA_SERVER' "$OUT/istio-istiod.yaml" | grep -q 'value: "false"' || fail "istiod: ENABLE_CA_SERVER is not false"
grep -q 'meshsign.istio-system.svc:15012' "$OUT/istio-istiod.yaml" || fail "istiod: caAddress not in the injection templates"
grep -A1 'name: CA_ADDRESS' "$OUT/istio-ztunnel.yaml" | grep -q 'meshsign.istio-system.svc:15012' || fail "ztunnel: CA_ADDRESS is not meshsign"
grep -A1 'name: CA_TRUSTED_NODE_ACCOUNTS' "$OUT/istio-istiod-ambient.yaml" | grep -q 'istio-system/ztunnel' || fail "istiod ambient: no CA_TRUSTED_NODE_ACCOUNTS"

# ---------------------------------------------------------------- 3: server-side dry run
tests/kube/apiserver.sh start "$KUBE1" $$
# shellcheck disable=SC1091
. "$KUBE1/env"
KUBECTL=$KUBE_BIN_DIR/kubectl
k1() { "$KUBECTL" --kubeconfig "$KUBE1/kubeconfig" "$@"; }
k1 create namespace "$NS" >/dev/null
log "CRDs: ServiceMonitor (prometheus-operator $PROM_OPERATOR_VERSION), Istio's (base chart)"
k1 apply --server-side -f "$PROM_CRDS/monitoring.coreos.com_servicemonitors.yaml" >/dev/null
python3 - "$OUT/istio-base.yaml" "$OUT/istio-base-crds.yaml" "$OUT/istio-base-rest.yaml" <<'PY'
import sys
docs = open(sys.argv[1]).read().split("\n---")
crds = [d for d in docs if "\nkind: CustomResourceDefinition" in "\n" + d]
rest = [d for d in docs if d not in crds and d.strip()]
open(sys.argv[2], "w").write("\n---".join(crds))
open(sys.argv[3], "w").write("\n---".join(rest))
PY
k1 apply --server-side -f "$OUT/istio-base-crds.yaml" >/dev/null
k1 wait --for condition=established --timeout=60s crd --all >/dev/null

dry_run() { # FILE
    local f=$1 n
    n=$(grep -c '^kind:' "$f" || true)
    [ "$n" -gt 0 ] || return 0
    if ! k1 apply --dry-run=server -f "$f" >"$f.dry-run" 2>&1; then
        cat "$f.dry-run" >&2
        fail "kubectl apply --dry-run=server -f $(basename "$f")"
    fi
    log "dry-run=server $(basename "$f"): $n objects accepted"
}
for set in "${VALUE_SETS[@]}"; do dry_run "$OUT/meshsign-$set.yaml"; done
for f in istio-base-rest istio-istiod istio-istiod-ambient istio-istiod-cluster1 istio-istiod-cluster2 istio-ztunnel istio-istio-cni istio-istio-ingressgateway; do
    dry_run "$OUT/$f.yaml"
done

# ---------------------------------------------------------------- 4: meshsign with the chart's config and RBAC
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
# The meshsign.yaml of the rendered ConfigMap (no YAML library needed: it is
# the block literal under `meshsign.yaml: |`).
extract_config() { # RENDERED-FILE
    python3 - "$1" <<'PY'
import sys
lines = open(sys.argv[1]).read().split("\n")
out, inside = [], False
for line in lines:
    if line.strip() == "meshsign.yaml: |":
        inside = True
        continue
    if inside:
        if line.startswith("    ") or line == "":
            out.append(line[4:])
        else:
            break
if not out:
    sys.exit("no meshsign.yaml in " + sys.argv[1])
print("\n".join(out))
PY
}
# Only the ServiceAccount and RBAC of a rendered file (what gets created for real).
rbac_only() { # RENDERED-FILE
    python3 - "$1" <<'PY'
import sys, re
docs = open(sys.argv[1]).read().split("\n---")
keep = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
print("\n---".join(d for d in docs if (m := re.search(r"^kind: (\S+)", d, re.M)) and m.group(1) in keep))
PY
}
sa_kubeconfig() { # KUBEDIR NAMESPACE SA OUT: a kubeconfig with nothing but that service account's token
    local dir=$1 ns=$2 sa=$3 out=$4 server token
    server=$(grep '^KUBE_SERVER=' "$dir/env" | cut -d= -f2-)
    token=$("$KUBECTL" --kubeconfig "$dir/kubeconfig" create token "$sa" -n "$ns" --duration 1h)
    cat >"$out" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "$server", certificate-authority: "$dir/ca.crt"}
users:
- name: u
  user: {token: "$token"}
contexts:
- name: c
  context: {cluster: c, user: u}
current-context: c
KCFG
}
wait_ready() { # URL PID LOG
    for _ in $(seq 1 150); do
        if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
        kill -0 "$2" 2>/dev/null || { cat "$3" >&2; fail "meshsign exited"; }
        sleep 0.2
    done
    cat "$3" >&2
    fail "meshsign not ready at $1 after 30 s"
}

"$MESHSIGN" ca init --out "$OUT/ca" --clusters cluster1,cluster2 >/dev/null
k1 create namespace app >/dev/null
k1 create serviceaccount sleep -n app >/dev/null
k1 create token sleep -n app --audience istio-ca --duration 1h >"$OUT/token-cluster1"
# For ambient: ztunnel's pod and a workload's pod on one node (nothing runs
# them; the pod watch only needs them to exist), and ztunnel's pod-bound token.
k1 create serviceaccount ztunnel -n "$NS" >/dev/null
while read -r pod_ns pod_name pod_sa; do
    k1 apply -f - >/dev/null <<POD
apiVersion: v1
kind: Pod
metadata: {name: $pod_name, namespace: $pod_ns}
spec:
  nodeName: node-1
  serviceAccountName: $pod_sa
  containers: [{name: c, image: example.invalid/none}]
POD
done <<PODS
$NS ztunnel-node1 ztunnel
app sleep-node1 sleep
PODS
k1 create token ztunnel -n "$NS" --audience istio-ca --duration 1h \
    --bound-object-kind Pod --bound-object-name ztunnel-node1 >"$OUT/token-ztunnel"

for set in default ha ambient multi-cluster; do
    run=$OUT/run-$set
    mkdir -p "$run"
    rendered=$OUT/meshsign-$set.yaml
    rbac_only "$rendered" >"$run/rbac.yaml"
    k1 apply -f "$run/rbac.yaml" >/dev/null
    sa_kubeconfig "$KUBE1" "$NS" meshsign "$run/kubeconfig"
    remote_kubeconfig=/nonexistent
    if [ "$set" = multi-cluster ]; then
        # cluster2: a second API server with the remote value set's objects.
        tests/kube/apiserver.sh start "$KUBE2" $$
        k2() { "$KUBECTL" --kubeconfig "$KUBE2/kubeconfig" "$@"; }
        k2 create namespace "$NS" >/dev/null
        k2 create namespace app >/dev/null
        k2 create serviceaccount sleep -n app >/dev/null
        # The token Secret stays empty here: kube-controller-manager's token
        # controller fills it in a real cluster; a TokenRequest stands in.
        k2 apply -f "$OUT/meshsign-remote.yaml" >/dev/null
        sa_kubeconfig "$KUBE2" "$NS" meshsign "$run/remote-kubeconfig"
        remote_kubeconfig=$run/remote-kubeconfig
        k2 create token sleep -n app --audience istio-ca --duration 1h >"$OUT/token-cluster2"
    fi
    port=$(free_port) mport=$(free_port)
    extract_config "$rendered" |
        sed -e "s|/etc/cacerts|$OUT/ca/cluster1|" \
            -e "s|in_cluster: true|kubeconfig: $run/kubeconfig|" \
            -e "s|/etc/meshsign/remote/cluster2/kubeconfig|$remote_kubeconfig|" \
            -e "s|/var/lib/meshsign|$run/state|" \
            -e "s|0.0.0.0:15012|127.0.0.1:$port|" -e "s|0.0.0.0:15014|127.0.0.1:$mport|" >"$run/meshsign.yaml"
    grep -q '/etc/\|0\.0\.0\.0' "$run/meshsign.yaml" && { cat "$run/meshsign.yaml" >&2; fail "$set: a path or address was not mapped"; }
    mkdir -p "$run/state"
    MESHSIGN_LOG=info HOSTNAME=meshsign-$set "$MESHSIGN" serve --config "$run/meshsign.yaml" >"$run/log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_ready "http://127.0.0.1:$mport/healthz/ready" "$pid" "$run/log"
    curl -fsS "http://127.0.0.1:$mport/healthz/live" >/dev/null || fail "$set: /healthz/live"
    # The root ConfigMap, written by the Lease holder.
    for _ in $(seq 1 100); do
        k1 get configmap istio-ca-root-cert -n app -o jsonpath='{.data.root-cert\.pem}' >"$run/published.pem" 2>/dev/null && [ -s "$run/published.pem" ] && break
        sleep 0.2
    done
    cmp -s <(openssl x509 -in "$run/published.pem" -noout -fingerprint) <(openssl x509 -in "$OUT/ca/root-cert.pem" -noout -fingerprint) ||
        { cat "$run/log" >&2; fail "$set: istio-ca-root-cert in namespace app is not the root"; }
    holder=$(k1 get lease meshsign-root-publisher -n "$NS" -o jsonpath='{.spec.holderIdentity}')
    case "$holder" in meshsign-$set-*) ;; *) fail "$set: Lease holder is '$holder'";; esac
    # A certificate through a TokenReview (as the local cluster's agents call).
    clusterid=Kubernetes
    "$MESHSIGN" request --addr "127.0.0.1:$port" --server-name meshsign.istio-system.svc \
        --root "$OUT/ca/root-cert.pem" --token "$OUT/token-cluster1" --namespace app --service-account sleep \
        --cluster-id "$clusterid" --ecdsa --out "$run/certs" >"$run/request.txt" 2>&1 ||
        { cat "$run/request.txt" "$run/log" >&2; fail "$set: certificate request (cluster $clusterid)"; }
    case "$set" in ha)
        # ClusterTrustBundle on (ha-values.yaml): written with the chart's RBAC (attest on the signer).
        for _ in $(seq 1 100); do
            k1 get clustertrustbundle istio.io:istiod-ca:root-cert >/dev/null 2>&1 && break
            sleep 0.2
        done
        k1 get clustertrustbundle istio.io:istiod-ca:root-cert >/dev/null || { cat "$run/log" >&2; fail "ha: no ClusterTrustBundle"; }
        k1 delete clustertrustbundle istio.io:istiod-ca:root-cert >/dev/null ;;
    esac
    if [ "$set" = ambient ] || [ "$set" = multi-cluster ]; then
        # ztunnel asking for the pod on its node (node authorization from the pod watch).
        "$MESHSIGN" request --addr "127.0.0.1:$port" --server-name meshsign.istio-system.svc \
            --root "$OUT/ca/root-cert.pem" --token "$OUT/token-ztunnel" --namespace "$NS" --service-account ztunnel \
            --impersonate spiffe://cluster.local/ns/app/sa/sleep --cluster-id "$clusterid" --ecdsa \
            --out "$run/certs-ztunnel" >"$run/request-ztunnel.txt" 2>&1 ||
            { cat "$run/request-ztunnel.txt" "$run/log" >&2; fail "$set: ztunnel's request for a pod on its node"; }
    fi
    if [ "$set" = multi-cluster ]; then
        "$MESHSIGN" request --addr "127.0.0.1:$port" --server-name meshsign.cluster1.example.internal \
            --root "$OUT/ca/root-cert.pem" --token "$OUT/token-cluster2" --namespace app --service-account sleep \
            --cluster-id cluster2 --ecdsa --out "$run/certs2" >"$run/request2.txt" 2>&1 ||
            { cat "$run/request2.txt" "$run/log" >&2; fail "$set: certificate request (cluster2)"; }
        for _ in $(seq 1 100); do
            k2 get configmap istio-ca-root-cert -n app >/dev/null 2>&1 && break
            sleep 0.2
        done
        k2 get configmap istio-ca-root-cert -n app >/dev/null || { cat "$run/log" >&2; fail "multi-cluster: no root ConfigMap in cluster2"; }
    fi
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    PIDS=()
    if grep -qiE 'forbidden|ERROR' "$run/log"; then
        grep -iE 'forbidden|ERROR' "$run/log" >&2
        fail "$set: meshsign logged an error (RBAC?)"
    fi
    what="ready, root ConfigMap published, Lease held, certificate issued after a TokenReview"
    [ "$set" = ha ] && what="$what, ClusterTrustBundle written"
    [ "$set" = ambient ] || [ "$set" = multi-cluster ] && what="$what, ztunnel's request for a pod on its node allowed"
    [ "$set" = multi-cluster ] && what="$what, cluster2's token reviewed by cluster2 and its root ConfigMap written"
    log "meshsign with the $set configuration, as its service account: $what"
    # Next set starts from nothing: its own RBAC only, no Lease, no ConfigMap.
    k1 delete -f "$run/rbac.yaml" --wait=true >/dev/null
    k1 delete lease meshsign-root-publisher -n "$NS" --ignore-not-found >/dev/null
    k1 delete configmap istio-ca-root-cert -n app --ignore-not-found >/dev/null
done

# ---------------------------------------------------------------- 5: docs/istio.md's commands
# The guide's install commands, in its order, against a fresh API server
# (helm install for real; nothing runs the pods): sections 1, 2 and 4.
tests/kube/apiserver.sh start "$KUBE3" $$
G=$OUT/guide
mkdir -p "$G"
(
    export KUBECONFIG=$KUBE3/kubeconfig
    kubectl() { "$KUBECTL" "$@"; }
    helm() { "$HELM" "$@"; }
    C=$ISTIO_CHARTS
    set -x
    cd "$G"
    # 1.1, 1.2
    "$MESHSIGN" ca init --out certs --clusters cluster1 >/dev/null
    "$MESHSIGN" ca check certs/cluster1 >/dev/null
    kubectl create namespace istio-system
    kubectl create secret generic cacerts -n istio-system --from-file=certs/cluster1/
    cd "$ROOT"
    # 1.3, 1.4
    helm install istio-base "$C/base" -n istio-system -f deploy/istio/base-values.yaml
    helm install meshsign deploy/helm/meshsign -n istio-system \
      --set image.repository=registry.example.com/meshsign --set image.tag=0.1.0
    # 1.5
    cd "$G"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout istiod-key.pem \
      -subj "/O=cluster.local" -out istiod.csr 2>/dev/null
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' \
      'extendedKeyUsage=serverAuth,clientAuth' \
      'subjectAltName=DNS:istiod.istio-system.svc,DNS:istiod.istio-system.svc.cluster.local,DNS:istiod-remote.istio-system.svc' >istiod.ext
    openssl x509 -req -in istiod.csr -CA certs/cluster1/ca-cert.pem -CAkey certs/cluster1/ca-key.pem \
      -CAcreateserial -days 90 -sha256 -extfile istiod.ext -out istiod-cert.pem 2>/dev/null
    cat istiod-cert.pem certs/cluster1/cert-chain.pem > istiod-tls.crt
    openssl verify -purpose sslserver -CAfile certs/root-cert.pem -untrusted certs/cluster1/cert-chain.pem istiod-cert.pem
    kubectl create secret generic istiod-tls -n istio-system \
      --from-file=tls.crt=istiod-tls.crt --from-file=tls.key=istiod-key.pem --from-file=ca.crt=certs/root-cert.pem
    cd "$ROOT"
    # 1.6, 1.7
    helm install istiod "$C/istio-control/istio-discovery" -n istio-system -f deploy/istio/istiod-values.yaml
    kubectl -n istio-system get deploy istiod -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="ENABLE_CA_SERVER")].value}' | grep -qx false
    kubectl -n istio-system get deploy istiod -o jsonpath='{.spec.template.spec.volumes[?(@.name=="istio-csr-dns-cert")].secret.secretName}' | grep -qx istiod-tls
    kubectl create namespace istio-ingress
    helm install istio-ingressgateway "$C/gateway" -n istio-ingress -f deploy/istio/gateway-values.yaml
    # 2 (as upgrades of the same installation)
    helm upgrade meshsign deploy/helm/meshsign -n istio-system \
      --set image.repository=registry.example.com/meshsign --set image.tag=0.1.0 \
      -f deploy/helm/meshsign/ci/ambient-values.yaml
    helm upgrade istiod "$C/istio-control/istio-discovery" -n istio-system \
      -f deploy/istio/istiod-values.yaml -f deploy/istio/istiod-ambient-values.yaml
    helm install istio-cni "$C/istio-cni" -n istio-system -f deploy/istio/cni-values.yaml
    helm install ztunnel "$C/ztunnel" -n istio-system -f deploy/istio/ztunnel-values.yaml
    kubectl -n istio-system get ds ztunnel -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="CA_ADDRESS")].value}' | grep -qx meshsign.istio-system.svc:15012
    kubectl label namespace default istio.io/dataplane-mode=ambient
    # 4
    cd "$G"
    "$MESHSIGN" ca rotate-root --current certs/cluster1 --out rotation >/dev/null
    for S in step-2-both-roots step-3-new-intermediate step-4-new-root-only; do
      "$MESHSIGN" ca check "rotation/$S/cluster1" >/dev/null
      kubectl create secret generic cacerts -n istio-system --from-file="rotation/$S/cluster1/" \
        --dry-run=client -o yaml | kubectl replace -f -
    done
    kubectl -n istio-system get secret cacerts -o jsonpath='{.data.root-cert\.pem}' | base64 -d | cmp - rotation/step-4-new-root-only/cluster1/root-cert.pem
    helm list -A
) >"$G.log" 2>&1 || { cat "$G.log" >&2; fail "docs/istio.md's commands (log above)"; }
log "docs/istio.md sections 1, 2 and 4: every command ran against a fresh API server ($(grep -c '^+ helm' "$G.log") helm commands)"
log "OK"
