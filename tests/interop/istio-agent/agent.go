package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	istiogrpc "istio.io/istio/pilot/pkg/grpc"
	"istio.io/istio/pkg/log"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher"
	"istio.io/istio/security/pkg/nodeagent/cache"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	pkiutil "istio.io/istio/security/pkg/pki/util"
)

// caServiceName is the gRPC service istio-agent calls.
const caServiceName = "istio.v1.auth.IstioCertificateService"

// securityOptions fills security.Options the way pilot-agent's
// options.NewSecurityOptions/SetupSecurityOptions do from the environment,
// with the flag values in place of the environment variables.
func securityOptions(c *config) (*security.Options, error) {
	o := &security.Options{
		CAEndpoint:                           c.caAddr,
		CAEndpointSAN:                        c.caSAN,
		CAProviderName:                       "Citadel", // CA_PROVIDER default
		PilotCertProvider:                    "istiod",  // PILOT_CERT_PROVIDER default
		OutputKeyCertToDir:                   c.outDir,
		ProvCert:                             c.provCert,
		ClusterID:                            c.clusterID,
		WorkloadNamespace:                    c.namespace,
		ServiceAccount:                       c.serviceAccount,
		TrustDomain:                          c.trustDomain,
		WorkloadRSAKeySize:                   c.rsaKeySize,
		Pkcs8Keys:                            c.pkcs8,
		SecretTTL:                            c.ttl,
		SecretRotationGracePeriodRatio:       0.5,  // SECRET_GRACE_PERIOD_RATIO default
		SecretRotationGracePeriodRatioJitter: 0.01, // SECRET_GRACE_PERIOD_RATIO_JITTER default
		FileDebounceDuration:                 100 * time.Millisecond,
		CertSigner:                           c.certSigner,
		CAHeaders:                            map[string]string{},
		// CertChainFilePath/KeyFilePath/RootCertFilePath stay empty: the
		// agent's defaults (./etc/certs/...) only matter when such files are
		// mounted, and then no CSR is sent at all.
	}
	for k, v := range c.caHeaders {
		o.CAHeaders[k] = v
	}
	switch c.key {
	case "ecdsa-p256":
		o.ECCSigAlg, o.ECCCurve = string(pkiutil.EcdsaSigAlg), string(pkiutil.P256Curve)
	case "ecdsa-p384":
		o.ECCSigAlg, o.ECCCurve = string(pkiutil.EcdsaSigAlg), string(pkiutil.P384Curve)
	default:
		o.ECCCurve = string(pkiutil.P256Curve) // ECC_CURVE default, unused for RSA
	}
	// Same call as SetupSecurityOptions, with the token path from --token in
	// place of ./var/run/secrets/tokens/istio-token. An empty path gives a
	// nil fetcher: no authorization header, exactly like an agent without a
	// projected token.
	fetcher, err := credentialfetcher.NewCredFetcher(security.JWT, o.TrustDomain, c.token, "")
	if err != nil {
		return nil, fmt.Errorf("credential fetcher: %w", err)
	}
	o.CredFetcher = fetcher
	return o, nil
}

func isPlaintextCAAddr(addr string) bool {
	return strings.HasSuffix(addr, ":15010")
}

// citadelTLSOptions mirrors pkg/istio-agent/plugins.go createCitadel with
// CA_ROOT_CA=<--root> and PROV_CERT=<--prov-cert>.
func citadelTLSOptions(c *config) *citadel.TLSOptions {
	if isPlaintextCAAddr(c.caAddr) {
		return nil // "Debug mode or IP-secure network"
	}
	t := &citadel.TLSOptions{RootCert: c.root}
	if c.provCert != "" {
		t.Key = path.Join(c.provCert, "key.pem")
		t.Cert = path.Join(c.provCert, "cert-chain.pem")
	}
	return t
}

// recordingClient wraps the real Citadel client and keeps what went over the
// wire, so the checks can look at the CSR and at the raw cert_chain elements
// (the secret cache only keeps their concatenation).
type recordingClient struct {
	inner security.Client

	mu       sync.Mutex
	calls    int
	csrPEM   []byte
	ttlSecs  int64
	response []string
	err      error
}

var _ security.Client = (*recordingClient)(nil)

func (r *recordingClient) CSRSign(csrPEM []byte, certValidTTLInSec int64) ([]string, error) {
	resp, err := r.inner.CSRSign(csrPEM, certValidTTLInSec)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	r.csrPEM = append([]byte(nil), csrPEM...)
	r.ttlSecs = certValidTTLInSec
	r.response = append([]string(nil), resp...)
	r.err = err
	return resp, err
}

func (r *recordingClient) GetRootCertBundle() ([]string, error) { return r.inner.GetRootCertBundle() }
func (r *recordingClient) Close()                               { r.inner.Close() }

// exchange is the result of one agent-style certificate fetch.
type exchange struct {
	csrPEM   []byte
	ttlSecs  int64
	response []string
	calls    int
	workload *security.SecretItem // SDS resource "default"
	rootCA   *security.SecretItem // SDS resource "ROOTCA"
	err      error
}

func configureLogging(verbose bool) error {
	o := log.DefaultOptions()
	level := log.ErrorLevel
	if verbose {
		level = log.InfoLevel
	}
	o.SetDefaultOutputLevel(log.DefaultScopeName, level)
	for _, s := range []string{"cache", "citadelclient", "ca", "sds"} {
		o.SetDefaultOutputLevel(s, level)
	}
	// Negative scenarios make the client log its (expected) failures at
	// error level; keep stdout for the single PASS/FAIL line.
	o.OutputPaths = []string{"stderr"}
	return log.Configure(o)
}

// fetch runs what istio-agent runs when Envoy first asks SDS for the
// "default" and "ROOTCA" resources: the Citadel client behind the agent's
// SecretManagerClient.
func fetch(ctx context.Context, c *config) (*exchange, error) {
	opts, err := securityOptions(c)
	if err != nil {
		return nil, err
	}
	tlsOpts := citadelTLSOptions(c)
	if c.waitReady > 0 {
		if err := waitServing(ctx, c, opts, tlsOpts); err != nil {
			return nil, err
		}
	}
	cc, err := citadel.NewCitadelClient(opts, tlsOpts)
	if err != nil {
		return nil, fmt.Errorf("NewCitadelClient: %w", err)
	}
	rec := &recordingClient{inner: cc}
	sm, err := cache.NewSecretManagerClient(rec, opts)
	if err != nil {
		cc.Close()
		return nil, fmt.Errorf("NewSecretManagerClient: %w", err)
	}
	defer sm.Close() // also closes the CA client

	if c.outDir != "" {
		if err := os.MkdirAll(c.outDir, 0o755); err != nil {
			return nil, err
		}
	}

	done := make(chan *exchange, 1)
	go func() {
		x := &exchange{}
		x.workload, x.err = sm.GenerateSecret(security.WorkloadKeyCertResourceName)
		if x.err == nil {
			x.rootCA, x.err = sm.GenerateSecret(security.RootCertReqResourceName)
		}
		done <- x
	}()
	var x *exchange
	select {
	case x = <-done:
	case <-ctx.Done():
		return nil, fmt.Errorf("no answer from the CA within --timeout %v", c.timeout)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	x.csrPEM, x.ttlSecs, x.response, x.calls = rec.csrPEM, rec.ttlSecs, rec.response, rec.calls
	if rec.err != nil {
		// The Citadel client's own error is the one carrying the RPC status;
		// the secret cache only adds a prefix.
		x.err = rec.err
	}
	return x, nil
}

// loadOutputDir rebuilds an exchange from the files an agent writes with
// OUTPUT_CERTS: cert-chain.pem is the concatenation of all cert_chain
// elements (the root element included) and root-cert.pem the last element.
// The wire-level split is lost, so every certificate in front of the root
// bundle becomes its own element; the CSR is unknown, so the key check
// relies on key.pem.
func loadOutputDir(dir string) (*exchange, error) {
	read := func(name string) ([]byte, error) { return os.ReadFile(path.Join(dir, name)) }
	key, err := read("key.pem")
	if err != nil {
		return nil, err
	}
	chainPEM, err := read("cert-chain.pem")
	if err != nil {
		return nil, err
	}
	rootPEM, err := read("root-cert.pem")
	if err != nil {
		return nil, err
	}
	chain, err := parseCerts(chainPEM)
	if err != nil {
		return nil, fmt.Errorf("cert-chain.pem: %w", err)
	}
	roots, err := parseCerts(rootPEM)
	if err != nil {
		return nil, fmt.Errorf("root-cert.pem: %w", err)
	}
	// Drop the trailing root bundle from the concatenated chain.
	end := len(chain)
	for end > 1 && slices.ContainsFunc(roots, func(r *x509.Certificate) bool { return r.Equal(chain[end-1]) }) {
		end--
	}
	if len(chain)-end != len(roots) {
		return nil, fmt.Errorf("cert-chain.pem does not end with the %d certificates of root-cert.pem", len(roots))
	}
	x := &exchange{
		workload: &security.SecretItem{CertificateChain: chainPEM, PrivateKey: key},
		rootCA:   &security.SecretItem{RootCert: rootPEM},
	}
	for _, c := range chain[:end] {
		x.response = append(x.response, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	x.response = append(x.response, string(rootPEM))
	return x, nil
}

// waitServing polls the standard health service over the same TLS settings
// the Citadel client uses.
func waitServing(ctx context.Context, c *config, opts *security.Options, tlsOpts *citadel.TLSOptions) error {
	var itls *istiogrpc.TLSOptions
	if tlsOpts != nil {
		itls = &istiogrpc.TLSOptions{
			RootCert: tlsOpts.RootCert, Key: tlsOpts.Key, Cert: tlsOpts.Cert,
			ServerAddress: opts.CAEndpoint, SAN: opts.CAEndpointSAN,
		}
	}
	dialOpts, err := istiogrpc.ClientOptions(nil, itls)
	if err != nil {
		return fmt.Errorf("health check dial options: %w", err)
	}
	conn, err := grpc.NewClient(opts.CAEndpoint, dialOpts...)
	if err != nil {
		return fmt.Errorf("health check dial: %w", err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(c.waitReady)
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := hc.Check(cctx, &healthpb.HealthCheckRequest{Service: caServiceName})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("status %v", resp.GetStatus())
		}
		last = err
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("CA not SERVING after --wait-ready %v: %v", c.waitReady, last)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// rpcErrorRE matches the text of a gRPC status error. The Citadel client
// wraps RPC errors with fmt.Errorf("create certificate: %v", err), which
// drops the status from the error chain, so the code has to be read back
// from the message when errors.As finds nothing.
var rpcErrorRE = regexp.MustCompile(`rpc error: code = (\w+) desc = `)

// grpcCode returns the gRPC code carried by err; ok is false when err does
// not come from a gRPC status at all (e.g. "invalid empty CertChain").
func grpcCode(err error) (code codes.Code, ok bool) {
	if err == nil {
		return codes.OK, true
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		return se.GRPCStatus().Code(), true
	}
	m := rpcErrorRE.FindStringSubmatch(err.Error())
	if m == nil {
		return codes.Unknown, false
	}
	code, perr := parseCode(m[1])
	if perr != nil {
		// "Code(17)" and the like.
		return codes.Unknown, false
	}
	return code, true
}

func run(c *config) error {
	if err := configureLogging(c.verbose); err != nil {
		return fmt.Errorf("configure logging: %w", err)
	}
	if c.checkDir != "" {
		x, err := loadOutputDir(c.checkDir)
		if err != nil {
			return err
		}
		exp, err := expectations(c)
		if err != nil {
			return err
		}
		return verifyIssued(exp, x, time.Now())
	}
	want, _ := parseCode(c.expectCode) // validated in parseFlags
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout+c.waitReady)
	defer cancel()

	x, err := fetch(ctx, c)
	if err != nil {
		return err
	}
	if x.err != nil {
		got, isRPC := grpcCode(x.err)
		switch {
		case !isRPC:
			return fmt.Errorf("expected code %v, got a non-RPC error: %v", want, x.err)
		case got != want:
			return fmt.Errorf("expected code %v, got %v: %v", want, got, x.err)
		}
		return nil
	}
	if want != codes.OK {
		return fmt.Errorf("expected code %v, got OK (cert_chain with %d elements)", want, len(x.response))
	}
	if x.calls != 1 {
		return fmt.Errorf("expected exactly one CSRSign call, saw %d", x.calls)
	}
	if wantSecs := int64(c.ttl.Seconds()); x.ttlSecs != wantSecs {
		return fmt.Errorf("client sent validity_duration %d, want %d", x.ttlSecs, wantSecs)
	}
	exp, err := expectations(c)
	if err != nil {
		return err
	}
	return verifyIssued(exp, x, time.Now())
}
