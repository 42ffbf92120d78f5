#!/usr/bin/env bash
# Runs the README's quick start for real: the dev-mode server in one process,
# `meshsign request` as a second "shell", and openssl's verdict on the result.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${MESHSIGN_BIN:-$repo/target/debug/meshsign}
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" serve --listen "127.0.0.1:$port" >serve.out 2>serve.err &
server=$!
for _ in $(seq 100); do
    grep -q "listening on" serve.err 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat serve.err; echo "FAIL quickstart: server exited"; exit 1; }
    sleep 0.1
done
grep -q "Request a workload certificate" serve.out || { echo "FAIL quickstart: no instructions printed"; exit 1; }

"$bin" request --addr "localhost:$port" --out workload-certs
openssl verify -CAfile workload-certs/root-cert.pem -untrusted workload-certs/cert-chain.pem workload-certs/cert-chain.pem
"$bin" request --addr "localhost:$port" --ecdsa --cert-dir workload-certs --out renewed
openssl verify -CAfile renewed/root-cert.pem -untrusted renewed/cert-chain.pem renewed/cert-chain.pem
openssl x509 -in workload-certs/cert-chain.pem -noout -ext subjectAltName | grep -q "URI:spiffe://cluster.local/ns/default/sa/default"
echo "PASS quickstart"
