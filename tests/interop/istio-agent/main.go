// Command istio-agent is meshsign's interop harness: it requests a workload
// certificate from a CA the way an unmodified istio-agent does, using Istio's
// own client code (the Citadel CA client, the credential fetcher and the
// agent's secret cache, which generates the CSR with pkiutil.GenCSR), and then
// checks the answer.
//
// Usage (from this directory; it is its own Go module):
//
//	go run . --ca-addr 127.0.0.1:15012 --root root-cert.pem --token istio-token \
//	    --namespace default --service-account sleep
//
// It prints exactly one line "PASS <scenario>" or "FAIL <scenario>: <why>" on
// stdout and exits non-zero on FAIL.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
)

// config is the parsed command line.
type config struct {
	scenario       string
	caAddr         string
	caSAN          string
	root           string
	token          string
	provCert       string
	clusterID      string
	trustDomain    string
	namespace      string
	serviceAccount string
	key            string
	rsaKeySize     int
	pkcs8          bool
	ttl            time.Duration
	certSigner     string
	caHeaders      headerFlags
	outDir         string
	checkDir       string

	expectCode      string
	expectTTL       time.Duration
	expectChainLen  int
	expectRootCerts int
	expectRoot      string

	waitReady time.Duration
	timeout   time.Duration
	verbose   bool
}

// headerFlags collects repeated --ca-header NAME=VALUE flags (the agent's
// CA_HEADER_<NAME> environment variables).
type headerFlags map[string]string

func (h headerFlags) String() string {
	parts := make([]string, 0, len(h))
	for k, v := range h {
		parts = append(parts, k+"="+v)
	}
	return strings.Join(parts, ",")
}

func (h headerFlags) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want NAME=VALUE, got %q", s)
	}
	h[k] = v
	return nil
}

func parseFlags(args []string) (*config, error) {
	c := &config{caHeaders: headerFlags{}}
	fs := flag.NewFlagSet("istio-agent", flag.ContinueOnError)
	fs.StringVar(&c.scenario, "scenario", "istio-agent", "scenario name printed in the PASS/FAIL line")
	fs.StringVar(&c.caAddr, "ca-addr", "", "CA address HOST:PORT (CA_ADDR); required")
	fs.StringVar(&c.caSAN, "ca-san", "", "TLS server name override (ISTIOD_SAN); default: the CA_ADDR host, localhost -> istiod.istio-system.svc")
	fs.StringVar(&c.root, "root", "", "PEM roots used to verify the CA's serving certificate (CA_ROOT_CA); required unless the port is 15010 (plaintext)")
	fs.StringVar(&c.token, "token", "", "file holding the bearer JWT, read on every RPC like ./var/run/secrets/tokens/istio-token; empty = no token")
	fs.StringVar(&c.provCert, "prov-cert", "", "directory with key.pem and cert-chain.pem presented as TLS client certificate (PROV_CERT)")
	fs.StringVar(&c.clusterID, "cluster-id", "Kubernetes", "sent as the ClusterID header (ISTIO_META_CLUSTER_ID)")
	fs.StringVar(&c.trustDomain, "trust-domain", "cluster.local", "trust domain of the CSR's SPIFFE ID (TRUST_DOMAIN)")
	fs.StringVar(&c.namespace, "namespace", "default", "namespace of the CSR's SPIFFE ID (POD_NAMESPACE)")
	fs.StringVar(&c.serviceAccount, "service-account", "default", "service account of the CSR's SPIFFE ID (SERVICE_ACCOUNT)")
	fs.StringVar(&c.key, "key", "rsa", "workload key type: rsa | ecdsa-p256 | ecdsa-p384 (ECC_SIGNATURE_ALGORITHM/ECC_CURVE)")
	fs.IntVar(&c.rsaKeySize, "rsa-key-size", 2048, "RSA key size (WORKLOAD_RSA_KEY_SIZE)")
	fs.BoolVar(&c.pkcs8, "pkcs8", false, "encode the private key as PKCS#8 (PKCS8_KEY)")
	fs.DurationVar(&c.ttl, "ttl", 24*time.Hour, "requested certificate lifetime (SECRET_TTL); 0 lets the CA choose its default")
	fs.StringVar(&c.certSigner, "cert-signer", "", "CertSigner request metadata (ISTIO_META_CERT_SIGNER)")
	fs.Var(c.caHeaders, "ca-header", "extra gRPC header NAME=VALUE (CA_HEADER_<NAME>); repeatable")
	fs.StringVar(&c.outDir, "out", "", "write key.pem, cert-chain.pem and root-cert.pem here (OUTPUT_CERTS)")
	fs.StringVar(&c.checkDir, "check-dir", "", "request nothing: check key.pem, cert-chain.pem and root-cert.pem that an agent wrote to OUTPUT_CERTS=DIR")
	fs.StringVar(&c.expectCode, "expect-code", "OK", "expected gRPC status code name (OK, Unauthenticated, PermissionDenied, InvalidArgument, ...)")
	fs.DurationVar(&c.expectTTL, "expect-ttl", 0, "expected NotAfter-NotBefore-2m of the leaf (default: --ttl when it is > 0)")
	fs.IntVar(&c.expectChainLen, "expect-chain-len", 0, "expected number of cert_chain elements (0 = any >= 2)")
	fs.IntVar(&c.expectRootCerts, "expect-root-certs", 0, "expected number of certificates in the last cert_chain element (0 = any >= 1)")
	fs.StringVar(&c.expectRoot, "expect-root", "", "PEM file whose certificates the last cert_chain element must hold exactly")
	fs.DurationVar(&c.waitReady, "wait-ready", 0, "first poll grpc.health.v1.Health/Check over the same TLS settings until SERVING, up to this long")
	fs.DurationVar(&c.timeout, "timeout", time.Minute, "overall deadline for the certificate request")
	fs.BoolVar(&c.verbose, "v", false, "show Istio's client logs at info level (default: errors only)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() != 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	return c, c.validate()
}

func (c *config) validate() error {
	var errs []error
	if c.checkDir != "" {
		if c.caAddr != "" || c.expectCode != "OK" || c.outDir != "" {
			errs = append(errs, errors.New("--check-dir excludes --ca-addr, --out and --expect-code"))
		}
	} else if c.caAddr == "" {
		errs = append(errs, errors.New("--ca-addr is required"))
	} else if c.root == "" && !isPlaintextCAAddr(c.caAddr) {
		errs = append(errs, errors.New("--root is required (the agent refuses to dial a TLS CA without CA_ROOT_CA)"))
	}
	for name, f := range map[string]string{"--root": c.root, "--token": c.token, "--expect-root": c.expectRoot} {
		if f == "" {
			continue
		}
		// The agent silently sends no token when the file is missing; a
		// typo here would silently change the scenario, so refuse it.
		if _, err := os.Stat(f); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	switch c.key {
	case "rsa", "ecdsa-p256", "ecdsa-p384":
	default:
		errs = append(errs, fmt.Errorf("--key %q: want rsa, ecdsa-p256 or ecdsa-p384", c.key))
	}
	if c.ttl < 0 {
		errs = append(errs, errors.New("--ttl must not be negative"))
	}
	if _, err := parseCode(c.expectCode); err != nil {
		errs = append(errs, fmt.Errorf("--expect-code: %w", err))
	}
	if c.expectChainLen != 0 && c.expectChainLen < 2 {
		errs = append(errs, errors.New("--expect-chain-len must be >= 2 (the agent rejects shorter chains)"))
	}
	return errors.Join(errs...)
}

// parseCode accepts a gRPC code name in either spelling: "PermissionDenied"
// (Go's String form) or "PERMISSION_DENIED" (the canonical proto name).
func parseCode(name string) (codes.Code, error) {
	norm := strings.ToLower(strings.ReplaceAll(name, "_", ""))
	if norm == "cancelled" {
		norm = "canceled"
	}
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if strings.ToLower(c.String()) == norm {
			return c, nil
		}
	}
	return 0, fmt.Errorf("unknown gRPC code %q", name)
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		scenario := "istio-agent"
		if cfg != nil {
			scenario = cfg.scenario
		}
		fmt.Printf("FAIL %s: bad arguments: %v\n", scenario, oneLine(err))
		os.Exit(2)
	}
	if err := run(cfg); err != nil {
		fmt.Printf("FAIL %s: %s\n", cfg.scenario, oneLine(err))
		os.Exit(1)
	}
	fmt.Printf("PASS %s\n", cfg.scenario)
}

func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", "; ")
}
