#!/usr/bin/env bash
# Talks to a running meshsign with grpcurl (reflection, health, CreateCertificate
# as JSON), i.e. with a generic gRPC client rather than Istio's.
#
#   tests/interop/grpcurl.sh --addr 127.0.0.1:15012 --cacert ROOT.pem --token TOKENFILE \
#       [--spiffe-id spiffe://cluster.local/ns/default/sa/default] [--authority istiod.istio-system.svc]
#
# Needs go (to install grpcurl once into $INTEROP_BIN_DIR), openssl and jq.
# Prints one PASS/FAIL line per check; exits non-zero if any check failed.
set -uo pipefail

GRPCURL_VERSION=${GRPCURL_VERSION:-v1.9.4}
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin_dir=${INTEROP_BIN_DIR:-$repo_root/target/interop-bin}

addr="" cacert="" token="" authority="istiod.istio-system.svc"
spiffe_id="spiffe://cluster.local/ns/default/sa/default"
while [ $# -gt 0 ]; do
    case "$1" in
    --addr) addr=$2; shift 2 ;;
    --cacert) cacert=$2; shift 2 ;;
    --token) token=$2; shift 2 ;;
    --authority) authority=$2; shift 2 ;;
    --spiffe-id) spiffe_id=$2; shift 2 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "grpcurl.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$addr" ] || [ -z "$cacert" ] || [ -z "$token" ]; then
    echo "grpcurl.sh: --addr, --cacert and --token are required" >&2
    exit 2
fi
for tool in go openssl jq; do
    command -v "$tool" >/dev/null || { echo "FAIL grpcurl: $tool not found"; exit 1; }
done

# Install the pinned grpcurl once; the directory name carries the version.
grpcurl_dir=$bin_dir/grpcurl-$GRPCURL_VERSION
grpcurl=$grpcurl_dir/grpcurl
if [ ! -x "$grpcurl" ]; then
    mkdir -p "$grpcurl_dir"
    if ! GOBIN=$grpcurl_dir go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION"; then
        echo "FAIL grpcurl: go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$GRPCURL_VERSION failed"
        exit 1
    fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=0
pass() { echo "PASS grpcurl/$1"; }
fail() { echo "FAIL grpcurl/$1: $2"; failed=1; }

# -authority is both the :authority header and the TLS server name, like the
# Citadel client's CA_ADDR host (or its localhost -> istiod.istio-system.svc).
gc() { "$grpcurl" -cacert "$cacert" -authority "$authority" -max-time 20 "$@"; }

# 1. Reflection lists the CA service and the health service.
if out=$(gc "$addr" list 2>&1); then
    missing=""
    for svc in istio.v1.auth.IstioCertificateService grpc.health.v1.Health; do
        grep -qx "$svc" <<<"$out" || missing="$missing $svc"
    done
    if [ -z "$missing" ]; then pass list; else fail list "missing:$missing (got: $(tr '\n' ' ' <<<"$out"))"; fi
else
    fail list "$(tr '\n' ' ' <<<"$out")"
fi

# 2. The method's signature, as reflection describes it.
want_sig='rpc CreateCertificate ( .istio.v1.auth.IstioCertificateRequest ) returns ( .istio.v1.auth.IstioCertificateResponse );'
if out=$(gc "$addr" describe istio.v1.auth.IstioCertificateService.CreateCertificate 2>&1) && grep -qF "$want_sig" <<<"$out"; then
    pass describe
else
    fail describe "want '$want_sig', got: $(tr '\n' ' ' <<<"$out")"
fi

# 3. Health: the server as a whole and the CA service are SERVING.
for svc in "" istio.v1.auth.IstioCertificateService; do
    name="health${svc:+/$svc}"
    if out=$(gc -d "{\"service\": \"$svc\"}" "$addr" grpc.health.v1.Health/Check 2>&1) &&
        [ "$(jq -r .status <<<"$out" 2>/dev/null)" = SERVING ]; then
        pass "$name"
    else
        fail "$name" "want SERVING, got: $(tr '\n' ' ' <<<"$out")"
    fi
done

# 4. CreateCertificate with a CSR shaped like ztunnel's (ECDSA P-256, empty
#    subject, critical URI SAN), the bearer token, one hour.
if ! openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/key.pem" \
    -subj "/" -addext "subjectAltName=critical,URI:$spiffe_id" -out "$work/csr.pem" 2>"$work/openssl.err"; then
    fail create-certificate "openssl req: $(cat "$work/openssl.err")"
else
    jq -n --rawfile csr "$work/csr.pem" '{csr: $csr, validityDuration: 3600}' >"$work/req.json"
    if out=$(gc -H "authorization: Bearer $(tr -d '[:space:]' <"$token")" -H "ClusterID: Kubernetes" \
        -d @ "$addr" istio.v1.auth.IstioCertificateService/CreateCertificate <"$work/req.json" 2>&1); then
        n=$(jq '.certChain | length' <<<"$out" 2>/dev/null || echo 0)
        if [ "${n:-0}" -ge 2 ]; then
            jq -r '.certChain[0]' <<<"$out" >"$work/leaf.pem"
            san=$(openssl x509 -in "$work/leaf.pem" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')
            leaf_pub=$(openssl x509 -in "$work/leaf.pem" -noout -pubkey 2>/dev/null)
            csr_pub=$(openssl req -in "$work/csr.pem" -noout -pubkey 2>/dev/null)
            if [ "$san" != "URI:$spiffe_id" ]; then
                fail create-certificate "leaf SAN is '$san', want URI:$spiffe_id"
            elif [ "$leaf_pub" != "$csr_pub" ]; then
                fail create-certificate "leaf public key differs from the CSR's"
            else
                pass "create-certificate ($n certChain elements)"
            fi
        else
            fail create-certificate "certChain has ${n:-0} elements, want >= 2: $(head -c 300 <<<"$out")"
        fi
    else
        fail create-certificate "$(tr '\n' ' ' <<<"$out")"
    fi

    # 5. The same request without a token is refused as Unauthenticated.
    if out=$(gc -d @ "$addr" istio.v1.auth.IstioCertificateService/CreateCertificate <"$work/req.json" 2>&1); then
        fail no-token "want Unauthenticated, got a certificate"
    elif grep -q "Code: Unauthenticated" <<<"$out"; then
        pass no-token
    else
        fail no-token "want Unauthenticated, got: $(tr '\n' ' ' <<<"$out")"
    fi
fi

exit "$failed"
