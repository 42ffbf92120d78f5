#!/usr/bin/env bash
# Runs the README's quick start for real, with `meshsign` on the PATH as the
# README has it: the dev-mode server in one process, `meshsign request` as a
# second "shell", openssl's verdict on the result, then "Poking it with
# grpcurl" (with the pinned grpcurl, installed as the README says when go is
# there; skipped, and said so, when neither grpcurl nor go is).
# The server listens on a free port instead of 15012, so a CA already running
# on this machine does not get in the way.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${MESHSIGN_BIN:-$repo/target/debug/meshsign}
[ -x "$bin" ] || { echo "FAIL quickstart: no $bin (cargo build --bin meshsign)"; exit 1; }
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/bin"
ln -s "$bin" "$work/bin/meshsign"
export PATH=$work/bin:$PATH
cd "$work"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
meshsign serve --listen "127.0.0.1:$port" >serve.out 2>serve.err &
server=$!
for _ in $(seq 100); do
    grep -q "listening on" serve.err 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat serve.err; echo "FAIL quickstart: server exited"; exit 1; }
    sleep 0.1
done
grep -q "Request a workload certificate" serve.out || { echo "FAIL quickstart: no instructions printed"; exit 1; }

meshsign request --addr "localhost:$port" --out workload-certs
openssl verify -CAfile workload-certs/root-cert.pem -untrusted workload-certs/cert-chain.pem workload-certs/cert-chain.pem
meshsign request --addr "localhost:$port" --ecdsa --cert-dir workload-certs --out renewed
openssl verify -CAfile renewed/root-cert.pem -untrusted renewed/cert-chain.pem renewed/cert-chain.pem
openssl x509 -in workload-certs/cert-chain.pem -noout -ext subjectAltName | grep -q "URI:spiffe://cluster.local/ns/default/sa/default"

# A token file as ztunnel reads it: no trailing newline, mode 0600.
meshsign token --out istio-token
[ "$(tail -c 1 istio-token | od -An -c | tr -d ' ')" != '\n' ] || { echo "FAIL quickstart: token file ends in a newline"; exit 1; }
[ "$(stat -c %a istio-token)" = 600 ] || { echo "FAIL quickstart: token file mode $(stat -c %a istio-token)"; exit 1; }
meshsign request --addr "localhost:$port" --token istio-token --out by-token-file

# "Poking it with grpcurl", as written there (the port aside).
grpcurl_version=v1.9.4 # as tests/interop/grpcurl.sh pins it
grpcurl_dir=${INTEROP_BIN_DIR:-$repo/target/interop-bin}/grpcurl-$grpcurl_version
if [ ! -x "$grpcurl_dir/grpcurl" ] && command -v go >/dev/null; then
    mkdir -p "$grpcurl_dir"
    GOBIN=$grpcurl_dir go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@$grpcurl_version"
fi
if [ -x "$grpcurl_dir/grpcurl" ]; then
    export PATH=$grpcurl_dir:$PATH
    grpcurl -cacert .meshsign/root-cert.pem "localhost:$port" list | grep -qx istio.v1.auth.IstioCertificateService
    grpcurl -cacert .meshsign/root-cert.pem "localhost:$port" grpc.health.v1.Health/Check | grep -q SERVING
    TOKEN=$(meshsign token --namespace default --service-account default)
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -subj "/O=" \
        -addext "subjectAltName=critical,URI:spiffe://cluster.local/ns/default/sa/default" -out csr.pem 2>/dev/null
    python3 -c 'import json; print(json.dumps({"csr": open("csr.pem").read(), "validityDuration": 3600}))' |
        grpcurl -cacert .meshsign/root-cert.pem -H "authorization: Bearer $TOKEN" -d @ \
            "localhost:$port" istio.v1.auth.IstioCertificateService/CreateCertificate >answer.json
    grep -q '"certChain"' answer.json || { cat answer.json; echo "FAIL quickstart: grpcurl CreateCertificate"; exit 1; }
else
    echo "SKIP quickstart grpcurl section: neither grpcurl $grpcurl_version nor go found"
fi
echo "PASS quickstart"
