package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "istio.io/api/security/v1alpha1"
)

func TestParseCode(t *testing.T) {
	for in, want := range map[string]codes.Code{
		"OK": codes.OK, "Unauthenticated": codes.Unauthenticated, "UNAUTHENTICATED": codes.Unauthenticated,
		"PermissionDenied": codes.PermissionDenied, "PERMISSION_DENIED": codes.PermissionDenied,
		"InvalidArgument": codes.InvalidArgument, "CANCELLED": codes.Canceled, "Canceled": codes.Canceled,
	} {
		got, err := parseCode(in)
		if err != nil || got != want {
			t.Errorf("parseCode(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := parseCode("Nope"); err == nil {
		t.Error("parseCode(Nope) succeeded")
	}
}

func TestGRPCCode(t *testing.T) {
	st := status.Error(codes.PermissionDenied, "no")
	cases := []struct {
		err    error
		want   codes.Code
		wantOK bool
	}{
		{nil, codes.OK, true},
		{st, codes.PermissionDenied, true},
		{fmt.Errorf("create certificate: %w", st), codes.PermissionDenied, true},
		// What the Citadel client really returns: %v loses the chain.
		{fmt.Errorf("create certificate: %v", st), codes.PermissionDenied, true},
		{errors.New("invalid empty CertChain"), codes.Unknown, false},
	}
	for _, c := range cases {
		got, ok := grpcCode(c.err)
		if got != c.want || ok != c.wantOK {
			t.Errorf("grpcCode(%v) = %v, %v; want %v, %v", c.err, got, ok, c.want, c.wantOK)
		}
	}
}

// --- a small fake CA, to check the harness itself -------------------------

type testPKI struct {
	root, inter         *x509.Certificate
	rootKey, interKey   *ecdsa.PrivateKey
	rootPEM, interPEM   string
	rootFile, tokenFile string
	serving             tls.Certificate
}

func mustKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func signCert(tmpl, parent *x509.Certificate, pub any, key *ecdsa.PrivateKey) (*x509.Certificate, string, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, "", err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, "", err
	}
	return c, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), nil
}

func mustSign(t *testing.T, tmpl, parent *x509.Certificate, pub any, key *ecdsa.PrivateKey) (*x509.Certificate, string) {
	t.Helper()
	c, s, err := signCert(tmpl, parent, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	return c, s
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	dir := t.TempDir()
	p := &testPKI{rootKey: mustKey(t), interKey: mustKey(t)}
	now := time.Now()
	caTmpl := func(cn string, serial int64) *x509.Certificate {
		return &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
		}
	}
	rt := caTmpl("test root", 1)
	p.root, p.rootPEM = mustSign(t, rt, rt, &p.rootKey.PublicKey, p.rootKey)
	p.inter, p.interPEM = mustSign(t, caTmpl("test intermediate", 2), p.root, &p.interKey.PublicKey, p.rootKey)

	sk := mustKey(t)
	srv, _ := mustSign(t, &x509.Certificate{
		SerialNumber: big.NewInt(3), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		DNSNames: []string{"istiod.istio-system.svc"}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, p.inter, &sk.PublicKey, p.interKey)
	p.serving = tls.Certificate{Certificate: [][]byte{srv.Raw, p.inter.Raw}, PrivateKey: sk}

	p.rootFile = filepath.Join(dir, "root-cert.pem")
	p.tokenFile = filepath.Join(dir, "istio-token")
	if err := os.WriteFile(p.rootFile, []byte(p.rootPEM), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.tokenFile, []byte("good-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// fakeCA signs like istiod, with knobs to misbehave.
type fakeCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	pki        *testPKI
	td         string // the CA's trust domain; CSR SANs are ignored, like istiod
	extraDNS   bool   // add a DNS SAN to the leaf
	shortChain bool   // return only the leaf and the root
	skewTTL    time.Duration
}

func (f *fakeCA) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if auth := md.Get("authorization"); len(auth) != 1 || auth[0] != "Bearer good-token" {
		return nil, status.Error(codes.Unauthenticated, "request authenticate failure")
	}
	if got := md.Get("clusterid"); len(got) != 1 || got[0] != "Kubernetes" {
		return nil, status.Errorf(codes.InvalidArgument, "clusterid header %q", got)
	}
	b, _ := pem.Decode([]byte(req.GetCsr()))
	if b == nil {
		return nil, status.Error(codes.InvalidArgument, "bad CSR PEM")
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil || csr.CheckSignature() != nil {
		return nil, status.Error(codes.InvalidArgument, "bad CSR")
	}
	ttl := time.Duration(req.GetValidityDuration()) * time.Second
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	if ttl > 48*time.Hour {
		return nil, status.Errorf(codes.InvalidArgument, "CSR signing error (requested TTL %v is greater than the max allowed TTL 48h0m0s)", ttl)
	}
	id, _ := url.Parse(f.td + "/ns/default/sa/sleep")
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()),
		NotBefore:    now.Add(-clockSkewGrace), NotAfter: now.Add(ttl + f.skewTTL),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id},
	}
	if f.extraDNS {
		tmpl.DNSNames = []string{"evil.example"}
	}
	_, leafPEM, err := signCert(tmpl, f.pki.inter, csr.PublicKey, f.pki.interKey)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "CSR signing error (%v)", err)
	}
	chain := []string{leafPEM, f.pki.interPEM, f.pki.rootPEM}
	if f.shortChain {
		chain = []string{leafPEM, f.pki.rootPEM}
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// serve starts the fake CA on a loopback port and returns "localhost:PORT",
// so the Citadel client's localhost -> istiod.istio-system.svc mapping is
// exercised too.
func serve(t *testing.T, ca *fakeCA) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{ca.pki.serving}, MinVersion: tls.VersionTLS12,
	})))
	pb.RegisterIstioCertificateServiceServer(s, ca)
	hs := health.NewServer()
	hs.SetServingStatus(caServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(s, hs)
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	_, port, _ := net.SplitHostPort(lis.Addr().String())
	return "localhost:" + port
}

func TestHarnessAgainstFakeCA(t *testing.T) {
	p := newTestPKI(t)
	base := func(addr string, extra ...string) []string {
		return append([]string{
			"--ca-addr", addr, "--root", p.rootFile, "--namespace", "default", "--service-account", "sleep",
			"--wait-ready", "5s", "--timeout", "20s",
		}, extra...)
	}
	cases := []struct {
		name    string
		ca      fakeCA
		args    []string
		wantErr string // "" = PASS
	}{
		{name: "ok-rsa", args: []string{"--token", p.tokenFile, "--expect-chain-len", "3", "--expect-root", p.rootFile, "--expect-root-certs", "1"}},
		{name: "ok-p384-ttl", args: []string{"--token", p.tokenFile, "--key", "ecdsa-p384", "--ttl", "1h"}},
		{name: "ok-ttl0", args: []string{"--token", p.tokenFile, "--ttl", "0", "--expect-ttl", "24h"}},
		{name: "no-token", args: []string{"--expect-code", "Unauthenticated"}},
		{name: "ttl-over-max", args: []string{"--token", p.tokenFile, "--ttl", "49h", "--expect-code", "InvalidArgument"}},
		{name: "wrong-code", args: []string{"--expect-code", "PermissionDenied"}, wantErr: "expected code PermissionDenied, got Unauthenticated"},
		{name: "unexpected-ok", args: []string{"--token", p.tokenFile, "--expect-code", "Unauthenticated"}, wantErr: "got OK"},
		{name: "unexpected-failure", wantErr: "expected code OK, got Unauthenticated"},
		{name: "extra-dns", ca: fakeCA{extraDNS: true}, args: []string{"--token", p.tokenFile}, wantErr: "want only URI"},
		{name: "wrong-trust-domain", args: []string{"--token", p.tokenFile, "--trust-domain", "example.org"}, wantErr: "want only URI \"spiffe://example.org/ns/default/sa/sleep\""},
		{name: "chain-len", ca: fakeCA{shortChain: true}, args: []string{"--token", p.tokenFile, "--expect-chain-len", "3"}, wantErr: "cert_chain has 2 elements, want 3"},
		{name: "ttl-skew", ca: fakeCA{skewTTL: time.Minute}, args: []string{"--token", p.tokenFile}, wantErr: "want 24h0m0s"},
		{name: "root-count", args: []string{"--token", p.tokenFile, "--expect-root-certs", "2"}, wantErr: "holds 1 root certificates, want 2"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ca := c.ca
			ca.pki, ca.td = p, "spiffe://cluster.local"
			cfg, err := parseFlags(base(serve(t, &ca), c.args...))
			if err != nil {
				t.Fatal(err)
			}
			err = run(cfg)
			switch {
			case c.wantErr == "" && err != nil:
				t.Fatalf("run: %v", err)
			case c.wantErr != "" && err == nil:
				t.Fatalf("run passed, want error containing %q", c.wantErr)
			case c.wantErr != "" && !strings.Contains(err.Error(), c.wantErr):
				t.Fatalf("run: %v\nwant error containing %q", err, c.wantErr)
			}
		})
	}
}

func TestOutDir(t *testing.T) {
	p := newTestPKI(t)
	ca := &fakeCA{pki: p, td: "spiffe://cluster.local"}
	out := filepath.Join(t.TempDir(), "certs")
	cfg, err := parseFlags([]string{"--ca-addr", serve(t, ca), "--root", p.rootFile, "--token", p.tokenFile,
		"--namespace", "default", "--service-account", "sleep", "--out", out, "--timeout", "20s"})
	if err != nil {
		t.Fatal(err)
	}
	if err := run(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := tls.LoadX509KeyPair(filepath.Join(out, "cert-chain.pem"), filepath.Join(out, "key.pem")); err != nil {
		t.Errorf("written key pair: %v", err)
	}
	root, err := os.ReadFile(filepath.Join(out, "root-cert.pem"))
	if err != nil || strings.TrimSpace(string(root)) != strings.TrimSpace(p.rootPEM) {
		t.Errorf("root-cert.pem = %q, %v; want the CA root", root, err)
	}

	// What the agent wrote passes --check-dir, and a foreign root does not.
	check := func(extra ...string) error {
		cfg, err := parseFlags(append([]string{"--check-dir", out, "--namespace", "default", "--service-account", "sleep"}, extra...))
		if err != nil {
			t.Fatal(err)
		}
		return run(cfg)
	}
	if err := check("--expect-chain-len", "3"); err != nil {
		t.Errorf("--check-dir: %v", err)
	}
	other := newTestPKI(t)
	if err := check("--expect-root", other.rootFile); err == nil || !strings.Contains(err.Error(), "differs from") {
		t.Errorf("--check-dir with a foreign --expect-root: %v, want a root mismatch", err)
	}
}

func TestValidate(t *testing.T) {
	for _, args := range [][]string{
		{},                               // no --ca-addr
		{"--ca-addr", "localhost:15012"}, // no --root
		{"--ca-addr", "h:1", "--root", "/nonexistent"},
		{"--ca-addr", "h:15010", "--key", "dsa"},
		{"--ca-addr", "h:15010", "--expect-code", "Bogus"},
		{"--ca-addr", "h:15010", "--expect-chain-len", "1"},
		{"--ca-addr", "h:15010", "--ttl", "-1s"},
	} {
		if _, err := parseFlags(args); err == nil {
			t.Errorf("parseFlags(%q) succeeded, want an error", args)
		}
	}
	if _, err := parseFlags([]string{"--ca-addr", "h:15010"}); err != nil {
		t.Errorf("plaintext port without --root: %v", err)
	}
}
