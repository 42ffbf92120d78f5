#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/seeds/ (committed; re-run only to
# change them). CSRs come from openssl with the TEST-ONLY keys in fuzz/keys
# (plus throw-away keys for the weak/unsupported ones); tokens, request
# seeds and the re-signable CSR bodies come from `gen-seeds`, which signs
# with the same test keys the harnesses trust. Config seeds are copies of
# config/*.yaml plus a few hand-written shapes (seeds/config/*.yaml are kept).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
keys=../keys
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
id="spiffe://cluster.local/ns/default/sa/web"

# csr NAME KEYFILE SUBJECT [openssl req options...]
csr() {
    local name=$1 key=$2 subj=$3
    shift 3
    openssl req -new -key "$key" -subj "$subj" -out "$tmp/$name.pem" "$@"
}
san() { printf 'subjectAltName=%s' "$1"; }

csr rsa2048-istio-agent "$keys/csr-rsa2048.pem" "/O=" -addext "$(san "critical,URI:$id")"
csr p256-istio-agent "$keys/csr-p256.pem" "/O=" -addext "$(san "critical,URI:$id")"
csr p384 "$keys/csr-p384.pem" "/O=" -addext "$(san "critical,URI:$id")"
csr ed25519 "$keys/csr-ed25519.pem" "/O=" -addext "$(san "critical,URI:$id")"
csr ed25519-ztunnel "$keys/csr-ed25519.pem" "/" -addext "$(san "critical,URI:$id")"
csr p256-cn-is-id "$keys/csr-p256.pem" "/CN=${id//\//\\/}" -addext "$(san "URI:$id")"
csr p256-cn-other "$keys/csr-p256.pem" "/O=acme/CN=web" -addext "$(san "URI:$id")"
csr p256-two-uris "$keys/csr-p256.pem" "/O=" -addext "$(san "URI:$id,URI:spiffe://cluster.local/ns/default/sa/other")"
csr p256-dns-and-uri "$keys/csr-p256.pem" "/O=" -addext "$(san "DNS:web.default.svc,URI:$id")"
csr p256-ip-email "$keys/csr-p256.pem" "/O=" -addext "$(san "URI:$id,IP:10.0.0.1,email:a@b.c")"
csr p256-othername-rid "$keys/csr-p256.pem" "/O=" -addext "$(san "URI:$id,otherName:1.2.3.4;UTF8:x,RID:1.2.3.4")"
csr p256-critical-unknown-ext "$keys/csr-p256.pem" "/O=" -addext "$(san "URI:$id")" -addext "1.2.3.4.5.6.7=critical,DER:0500"
csr p256-no-san "$keys/csr-p256.pem" "/O="
csr p256-ca-true "$keys/csr-p256.pem" "/O=" -addext "$(san "URI:$id")" -addext "basicConstraints=critical,CA:TRUE,pathlen:0"
csr p256-keycertsign "$keys/csr-p256.pem" "/O=" -addext "$(san "URI:$id")" -addext "keyUsage=critical,digitalSignature,keyCertSign,cRLSign"
csr p256-eku-codesigning "$keys/csr-p256.pem" "/O=" -addext "$(san "URI:$id")" -addext "extendedKeyUsage=serverAuth,codeSigning,1.2.3.4"
csr p256-allowed-exts "$keys/csr-p256.pem" "/O=" -addext "$(san "critical,URI:$id")" -addext "basicConstraints=critical,CA:FALSE" -addext "keyUsage=critical,digitalSignature,keyEncipherment" -addext "extendedKeyUsage=serverAuth,clientAuth" -addext "subjectKeyIdentifier=hash"
csr p256-alias-trust-domain "$keys/csr-p256.pem" "/O=" -addext "$(san "critical,URI:spiffe://trust-domain-foo/ns/foo/sa/foo")"
csr p256-foo-migrated "$keys/csr-p256.pem" "/O=" -addext "$(san "critical,URI:spiffe://cluster.local/ns/foo/sa/foo")"
csr p256-kube-system "$keys/csr-p256.pem" "/O=" -addext "$(san "critical,URI:spiffe://cluster.local/ns/kube-system/sa/default")"
csr p256-ztunnel "$keys/csr-p256.pem" "/O=" -addext "$(san "critical,URI:spiffe://cluster.local/ns/istio-system/sa/ztunnel")"
csr p256-not-istio-path "$keys/csr-p256.pem" "/O=" -addext "$(san "URI:spiffe://cluster.local/workload/web")"
csr rsa2048-sha1 "$keys/csr-rsa2048.pem" "/O=" -sha1 -addext "$(san "URI:$id")"
csr p256-sha512 "$keys/csr-p256.pem" "/O=" -sha512 -addext "$(san "URI:$id")"
uris="URI:$id"
for i in $(seq 1 120); do uris="$uris,URI:spiffe://cluster.local/ns/n$i/sa/s$i"; done
csr p256-huge-san "$keys/csr-p256.pem" "/O=" -addext "$(san "$uris")"
# Throw-away keys: a weak RSA key, RSA-4096, P-521 (refused kinds).
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out "$tmp/rsa1024.key" 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out "$tmp/rsa4096.key" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out "$tmp/p521.key"
csr rsa1024-weak "$tmp/rsa1024.key" "/O=" -addext "$(san "critical,URI:$id")"
csr rsa4096 "$tmp/rsa4096.key" "/O=" -addext "$(san "critical,URI:$id")"
csr p521 "$tmp/p521.key" "/O=" -addext "$(san "critical,URI:$id")"

rm -f csr/* jwt/* request/*
mkdir -p csr jwt request config
# csr target, mode '0' (PEM text as sent) for each, mode '1' (DER) for a few,
# mode '8' (PEM, default key policy) for the Ed25519 one.
for f in "$tmp"/*.pem; do
    n=$(basename "$f" .pem)
    { printf 0; cat "$f"; } >"csr/$n"
done
for n in rsa2048-istio-agent p256-allowed-exts ed25519-ztunnel p256-huge-san; do
    { printf 1; openssl req -in "$tmp/$n.pem" -outform DER; } >"csr/$n.der"
done
{ printf 8; cat "$tmp/ed25519.pem"; } >csr/ed25519.default-policy
# A CRLF, re-wrapped, framed CSR (armour variants).
{ printf 0; echo "leading text"; sed 's/$/\r/' "$tmp/p256-istio-agent.pem"; echo trailing; } >csr/p256-crlf-framed

# GEN_SEEDS: an already built gen-seeds (e.g. fuzz/target/release/gen-seeds from fuzz/run).
${GEN_SEEDS:-cargo run -q --release --bin gen-seeds --} "$tmp"
for d in csr jwt config request; do printf "%s: %s seeds\n" "$d" "$(find "$d" -type f | wc -l)"; done
