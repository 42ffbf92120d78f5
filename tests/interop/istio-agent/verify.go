package main

import (
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"istio.io/istio/pkg/spiffe"
)

// clockSkewGrace is istiod's back-dating of NotBefore
// (security/pkg/pki/util ClockSkewGracePeriod).
const clockSkewGrace = 2 * time.Minute

// ttlTolerance absorbs the time between the CA reading its clock for
// NotBefore and for NotAfter, and second rounding.
const ttlTolerance = 5 * time.Second

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// expectation is what a successful answer must look like.
type expectation struct {
	spiffeID   string
	ttl        time.Duration // 0: not checked
	chainLen   int           // 0: any >= 2
	rootCerts  int           // 0: any >= 1
	rootPEM    []byte        // nil: not checked
	rootSource string
}

func expectations(c *config) (*expectation, error) {
	e := &expectation{
		// Built exactly like secretcache.go generateNewSecret builds the CSR host.
		spiffeID: (&spiffe.Identity{
			TrustDomain:    c.trustDomain,
			Namespace:      c.namespace,
			ServiceAccount: c.serviceAccount,
		}).String(),
		ttl:       c.expectTTL,
		chainLen:  c.expectChainLen,
		rootCerts: c.expectRootCerts,
	}
	if e.ttl == 0 {
		e.ttl = c.ttl
	}
	if c.expectRoot != "" {
		b, err := os.ReadFile(c.expectRoot)
		if err != nil {
			return nil, err
		}
		e.rootPEM, e.rootSource = b, c.expectRoot
	}
	return e, nil
}

// parseCerts decodes every PEM block of s; all must be CERTIFICATE blocks and
// there must be at least one.
func parseCerts(s []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := s
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%d bytes of trailing non-PEM data", len(bytes.TrimSpace(rest)))
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate")
	}
	return out, nil
}

func sameCertSet(a, b []*x509.Certificate) bool {
	key := func(cs []*x509.Certificate) []string {
		out := make([]string, len(cs))
		for i, c := range cs {
			out[i] = string(c.Raw)
		}
		slices.Sort(out)
		return slices.Compact(out)
	}
	return slices.Equal(key(a), key(b))
}

// verifyIssued checks a successful exchange. It returns all violations found,
// joined.
func verifyIssued(e *expectation, x *exchange, now time.Time) error {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	// --- what istio-agent itself requires --------------------------------
	n := len(x.response)
	if n < 2 {
		return fmt.Errorf("cert_chain has %d elements, istio-agent requires >= 2", n)
	}
	if e.chainLen != 0 && n != e.chainLen {
		fail("cert_chain has %d elements, want %d", n, e.chainLen)
	}
	elems := make([][]*x509.Certificate, n)
	for i, s := range x.response {
		certs, err := parseCerts([]byte(s))
		if err != nil {
			return errors.Join(append(errs, fmt.Errorf("cert_chain[%d]: %v", i, err))...)
		}
		elems[i] = certs
		// istiod >= 1.24.6 sends one certificate per element except the
		// root bundle (ztunnel relies on it).
		if i < n-1 && len(certs) != 1 {
			fail("cert_chain[%d] holds %d certificates, want 1 (only the last element may be a bundle)", i, len(certs))
		}
	}
	leaf, roots := elems[0][0], elems[n-1]

	// The agent takes the whole last element as the root (ROOTCA resource).
	if x.rootCA == nil {
		fail("no ROOTCA secret from the agent's secret cache")
	} else if got, err := parseCerts(x.rootCA.RootCert); err != nil {
		fail("ROOTCA secret: %v", err)
	} else if !sameCertSet(got, roots) {
		fail("ROOTCA secret holds %d certificates, not the %d of the last cert_chain element", len(got), len(roots))
	}
	if e.rootCerts != 0 && len(roots) != e.rootCerts {
		fail("last cert_chain element holds %d root certificates, want %d", len(roots), e.rootCerts)
	}
	if e.rootPEM != nil {
		want, err := parseCerts(e.rootPEM)
		if err != nil {
			fail("--expect-root %s: %v", e.rootSource, err)
		} else if !sameCertSet(want, roots) {
			fail("last cert_chain element (%d certificates) differs from %s (%d certificates)", len(roots), e.rootSource, len(want))
		}
	}
	for i, r := range roots {
		if !r.IsCA || !bytes.Equal(r.RawSubject, r.RawIssuer) || r.CheckSignatureFrom(r) != nil {
			fail("last cert_chain element, certificate %d (%q) is not a self-signed CA certificate", i, r.Subject)
		}
	}

	// --- the chain verifies, in order, for both TLS roles ----------------
	rootPool, interPool := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	for _, el := range elems[1 : n-1] {
		for _, c := range el {
			interPool.AddCert(c)
		}
	}
	for _, eku := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{
			Roots: rootPool, Intermediates: interPool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{eku},
		}); err != nil {
			fail("leaf does not verify to the last element's roots for %s: %v", ekuName(eku), err)
		}
	}
	for i := 0; i+1 < n-1; i++ {
		if err := elems[i][0].CheckSignatureFrom(elems[i+1][0]); err != nil {
			fail("cert_chain[%d] is not signed by cert_chain[%d]: %v", i, i+1, err)
		}
	}
	if n > 2 {
		last := elems[n-2][0]
		if !slices.ContainsFunc(roots, func(r *x509.Certificate) bool { return last.CheckSignatureFrom(r) == nil }) {
			fail("cert_chain[%d] is not signed by any root of the last element", n-2)
		}
	}

	// --- the leaf profile ----------------------------------------------
	if len(leaf.Subject.Names) != 0 || !bytes.Equal(leaf.RawSubject, []byte{0x30, 0x00}) {
		fail("leaf subject is %q, want empty", leaf.Subject)
	}
	var sanCritical, sanSeen bool
	for _, ext := range leaf.Extensions {
		if ext.Id.Equal(oidSubjectAltName) {
			sanSeen, sanCritical = true, ext.Critical
		}
	}
	switch {
	case !sanSeen:
		fail("leaf has no subjectAltName extension")
	case !sanCritical:
		fail("leaf subjectAltName is not critical (required with an empty subject)")
	}
	var uris []string
	for _, u := range leaf.URIs {
		uris = append(uris, u.String())
	}
	if len(uris) != 1 || uris[0] != e.spiffeID || len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
		fail("leaf SANs are URI%q DNS%q IP%v email%q, want only URI %q",
			uris, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses, e.spiffeID)
	}
	if leaf.IsCA {
		fail("leaf is a CA certificate")
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		fail("leaf key usage %#x lacks digitalSignature", leaf.KeyUsage)
	}

	// The certificate is for the key in the CSR the agent sent (unknown
	// with --check-dir) ...
	if x.csrPEM != nil {
		if csrKey, err := csrPublicKey(x.csrPEM); err != nil {
			fail("recorded CSR: %v", err)
		} else if !csrKey.Equal(leaf.PublicKey) {
			fail("leaf public key differs from the CSR's public key")
		}
	}
	// ... and loads with the agent's private key, as Envoy would load the
	// SDS "default" secret.
	if x.workload == nil {
		fail("no workload secret from the agent's secret cache")
	} else if _, err := tls.X509KeyPair(x.workload.CertificateChain, x.workload.PrivateKey); err != nil {
		fail("workload secret (cert chain + key) does not load as a TLS key pair: %v", err)
	}

	// --- validity -------------------------------------------------------
	if e.ttl > 0 {
		got := leaf.NotAfter.Sub(leaf.NotBefore) - clockSkewGrace
		if d := got - e.ttl; d < -ttlTolerance || d > ttlTolerance {
			fail("leaf lifetime NotAfter-NotBefore-2m = %v, want %v (±%v)", got, e.ttl, ttlTolerance)
		}
	}
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		fail("leaf not valid now (%v .. %v)", leaf.NotBefore, leaf.NotAfter)
	}
	return errors.Join(errs...)
}

func csrPublicKey(csrPEM []byte) (interface{ Equal(crypto.PublicKey) bool }, error) {
	b, _ := pem.Decode(csrPEM)
	if b == nil {
		return nil, errors.New("not PEM")
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, err
	}
	k, ok := csr.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok {
		return nil, fmt.Errorf("unsupported CSR key type %T", csr.PublicKey)
	}
	return k, nil
}

func ekuName(u x509.ExtKeyUsage) string {
	switch u {
	case x509.ExtKeyUsageServerAuth:
		return "serverAuth"
	case x509.ExtKeyUsageClientAuth:
		return "clientAuth"
	}
	return fmt.Sprint(u)
}
