#!/usr/bin/env bash
# Load-test a CreateCertificate server (meshsign, or the istiod-ca peer in
# bench/peers/istiod-ca) with ghz.
#
#   bench/ghz.sh --addr 127.0.0.1:15012 --cacert root-cert.pem \
#       --token istio-token --csr csr.pem [-n 2000] [-c 50] [--json out.json]
#
# Installs ghz (pinned, from the Go module proxy) into target/bench-bin on first
# use, sends N unary calls to istio.v1.auth.IstioCertificateService/
# CreateCertificate over TLS with "authorization: Bearer <token>" metadata and
# the body {"csr": <csr file>, "validityDuration": <ttl>}, then prints a summary
# (count, rps, latency percentiles, status codes, errors). The machine-readable
# ghz report (-O json) goes to --json OUT (a temp file otherwise).
#
# Exit status: 0 if every call returned OK, 1 on usage/setup errors or if any
# call failed (use --allow-errors to get 0 as long as ghz itself ran).
set -euo pipefail

GHZ_MODULE=github.com/bojand/ghz
GHZ_VERSION=v0.93.0 # newest version the Go module proxy has (2021-02-20)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${BENCH_BIN_DIR:-$REPO_ROOT/target/bench-bin}
GHZ=$BIN_DIR/ghz
METHOD=istio.v1.auth.IstioCertificateService/CreateCertificate

usage() {
	cat <<EOF
usage: $(basename "$0") --addr HOST:PORT --cacert ROOT.pem --token FILE --csr FILE [options] [-- ghz args...]

required:
  --addr HOST:PORT        server to load
  --cacert FILE           PEM roots that verify the server's certificate
  --token FILE            bearer JWT, sent as "authorization: Bearer <token>"
  --csr FILE              PEM CSR sent in every request

options:
  --authority NAME        TLS server name to verify (ghz --cname)
                          [default: istiod.istio-system.svc]
  -n N                    total calls [default: 2000]
  -c C                    concurrent workers [default: 50]
  --connections K         gRPC connections the workers share [default: 1]
  -z DURATION             run for a duration (e.g. 30s) instead of N calls
  --ttl SECONDS           validityDuration in the request [default: 86400]
  --json OUT              write ghz's JSON report here
  --proto FILE            proto for the request [default: $REPO_ROOT/proto/ca.proto]
  --reflect               use server reflection instead of --proto
  --allow-errors          exit 0 even if some calls failed
  --install-only          install ghz $GHZ_VERSION into $BIN_DIR and exit
  -h, --help              this text
anything after -- is passed to ghz unchanged (e.g. -- --skipFirst 100)
EOF
}

die() {
	echo "ghz.sh: $*" >&2
	exit 1
}

need_file() { # flag path
	[[ -n $2 ]] || die "$1 is required (see --help)"
	[[ -f $2 && -r $2 ]] || die "$1: cannot read file '$2'"
}

install_ghz() {
	local have=""
	if [[ -x $GHZ ]]; then
		have=$(go version -m "$GHZ" 2>/dev/null | awk '$1 == "mod" { print $3; exit }') || true
	fi
	if [[ $have == "$GHZ_VERSION" ]]; then
		return
	fi
	command -v go >/dev/null || die "go is not on PATH; needed to install ghz"
	echo "ghz.sh: installing $GHZ_MODULE/cmd/ghz@$GHZ_VERSION into $BIN_DIR" >&2
	mkdir -p "$BIN_DIR"
	# Outside any module so the repo's go.mod files play no part.
	(cd / && GOBIN=$BIN_DIR GOFLAGS=-mod=mod go install "$GHZ_MODULE/cmd/ghz@$GHZ_VERSION") ||
		die "go install $GHZ_MODULE/cmd/ghz@$GHZ_VERSION failed"
}

addr="" cacert="" token="" csr="" authority=istiod.istio-system.svc
total=2000 conc=50 connections=1 duration="" ttl=86400 json_out=""
proto=$REPO_ROOT/proto/ca.proto reflect=0 allow_errors=0 install_only=0
extra=()
while (($#)); do
	case $1 in
	--addr) addr=${2-} && shift 2 ;;
	--cacert) cacert=${2-} && shift 2 ;;
	--token) token=${2-} && shift 2 ;;
	--csr) csr=${2-} && shift 2 ;;
	--authority) authority=${2-} && shift 2 ;;
	-n) total=${2-} && shift 2 ;;
	-c) conc=${2-} && shift 2 ;;
	--connections) connections=${2-} && shift 2 ;;
	-z) duration=${2-} && shift 2 ;;
	--ttl) ttl=${2-} && shift 2 ;;
	--json) json_out=${2-} && shift 2 ;;
	--proto) proto=${2-} && shift 2 ;;
	--reflect) reflect=1 && shift ;;
	--allow-errors) allow_errors=1 && shift ;;
	--install-only) install_only=1 && shift ;;
	-h | --help) usage && exit 0 ;;
	--) shift && extra=("$@") && break ;;
	*) usage >&2 && die "unknown argument '$1'" ;;
	esac
done

install_ghz
if ((install_only)); then
	echo "$GHZ ($GHZ_VERSION)"
	exit 0
fi

[[ -n $addr ]] || die "--addr is required (see --help)"
[[ $addr == *:* ]] || die "--addr must be HOST:PORT, got '$addr'"
need_file --cacert "$cacert"
need_file --token "$token"
need_file --csr "$csr"
for v in total conc connections ttl; do
	[[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
grep -q -- '-----BEGIN CERTIFICATE REQUEST-----' "$csr" || die "--csr: '$csr' holds no PEM CERTIFICATE REQUEST"
command -v python3 >/dev/null || die "python3 is required"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
keep_json=1
if [[ -z $json_out ]]; then
	json_out=$work/report.json keep_json=0
fi
mkdir -p "$(dirname "$json_out")"

# Body and metadata go through files: the token stays off the command line.
python3 - "$csr" "$ttl" "$token" "$work/data.json" "$work/metadata.json" <<'EOF'
import json, sys
csr_file, ttl, token_file, data_out, md_out = sys.argv[1:]
csr = open(csr_file).read()
token = open(token_file).read().strip()
if not token:
    sys.exit("ghz.sh: --token file is empty")
json.dump({"csr": csr, "validityDuration": int(ttl)}, open(data_out, "w"))
json.dump({"authorization": "Bearer " + token}, open(md_out, "w"))
EOF

args=(
	--call "$METHOD"
	--cacert "$cacert" --cname "$authority"
	-D "$work/data.json" -M "$work/metadata.json"
	-c "$conc" --connections "$connections"
	-O json -o "$json_out"
)
if ((reflect)); then
	: # ghz asks the server's reflection service for the descriptors
else
	need_file --proto "$proto"
	args+=(--proto "$proto" -i "$(dirname "$proto")")
fi
if [[ -n $duration ]]; then
	args+=(-z "$duration")
else
	args+=(-n "$total")
fi

echo "ghz.sh: $GHZ ${args[*]} ${extra[*]:-} $addr" >&2
"$GHZ" "${args[@]}" ${extra[@]+"${extra[@]}"} "$addr" || die "ghz failed (exit $?)"
[[ -s $json_out ]] || die "ghz wrote no report to $json_out"

python3 - "$json_out" "$addr" "$allow_errors" "$keep_json" <<'EOF'
import json, sys
path, addr = sys.argv[1], sys.argv[2]
allow_errors, keep_json = sys.argv[3] == "1", sys.argv[4] == "1"
r = json.load(open(path))
ms = lambda ns: f"{ns / 1e6:.2f} ms"
opts = r.get("options", {})
print(f"ghz summary for {addr} ({opts.get('call', '')})")
print(f"  count:     {r['count']}  (concurrency {opts.get('concurrency')}, connections {opts.get('connections')})")
print(f"  total:     {r['total'] / 1e9:.2f} s")
print(f"  rps:       {r['rps']:.1f}")
print(f"  latency:   avg {ms(r['average'])}, fastest {ms(r['fastest'])}, slowest {ms(r['slowest'])}")
pct = "  ".join(f"p{d['percentage']} {ms(d['latency'])}" for d in (r.get("latencyDistribution") or []))
print(f"  percentiles: {pct or 'n/a'}")
codes = r.get("statusCodeDistribution") or {}
print("  status codes: " + (", ".join(f"{k} {v}" for k, v in sorted(codes.items())) or "none"))
errs = r.get("errorDistribution") or {}
for msg, n in sorted(errs.items(), key=lambda kv: -kv[1]):
    print(f"  error x{n}: {msg}")
if keep_json:
    print(f"  json report: {path}")
failed = sum(v for k, v in codes.items() if k != "OK")
if failed and not allow_errors:
    sys.exit(f"ghz.sh: {failed} of {r['count']} calls did not return OK")
EOF
