package main

// Glue, not istiod code: a loopback HTTP server that plays the token issuer's
// public endpoints, so Istio's OIDC JwtAuthenticator (which only knows how to
// fetch keys over HTTP) can verify meshsign's dev tokens.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

const (
	wellKnownPath = "/.well-known/openid-configuration"
	jwksPath      = "/jwks.json"
)

// jwk is the part of a JSON Web Key this program looks at.
type jwk struct {
	Kty string `json:"kty"`
	Crv string `json:"crv"`
	Alg string `json:"alg"`
	Kid string `json:"kid"`
}

// readJWKS reads and sanity-checks a JWKS file and returns the signature
// algorithms its keys are for (from "alg", or guessed from kty/crv).
func readJWKS(path string) ([]byte, []string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("reading JWKS: %w", err)
	}
	var set struct {
		Keys []jwk `json:"keys"`
	}
	if err := json.Unmarshal(raw, &set); err != nil {
		return nil, nil, fmt.Errorf("JWKS %s is not valid JSON: %w", path, err)
	}
	if len(set.Keys) == 0 {
		return nil, nil, fmt.Errorf("JWKS %s has no keys", path)
	}
	seen := map[string]bool{}
	var algs []string
	for i, k := range set.Keys {
		alg := k.Alg
		if alg == "" {
			switch {
			case k.Kty == "EC" && k.Crv == "P-256":
				alg = "ES256"
			case k.Kty == "EC" && k.Crv == "P-384":
				alg = "ES384"
			case k.Kty == "EC" && k.Crv == "P-521":
				alg = "ES512"
			case k.Kty == "RSA":
				alg = "RS256"
			case k.Kty == "OKP" && k.Crv == "Ed25519":
				alg = "EdDSA"
			default:
				return nil, nil, fmt.Errorf("JWKS %s: key %d (kid %q) has no alg and an unknown kty/crv %q/%q", path, i, k.Kid, k.Kty, k.Crv)
			}
		}
		if !seen[alg] {
			seen[alg] = true
			algs = append(algs, alg)
		}
	}
	return raw, algs, nil
}

// issuerServer serves the JWKS file and an OIDC discovery document for it on
// a loopback port.
type issuerServer struct {
	issuer   string
	jwksFile string
	algs     []string
	baseURL  string // http://127.0.0.1:PORT
	srv      *http.Server
}

func startIssuerServer(issuer, jwksFile string) (*issuerServer, error) {
	_, algs, err := readJWKS(jwksFile)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("JWKS server: %w", err)
	}
	s := &issuerServer{
		issuer:   issuer,
		jwksFile: jwksFile,
		algs:     algs,
		baseURL:  "http://" + ln.Addr().String(),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+jwksPath, s.serveJWKS)
	mux.HandleFunc("GET "+wellKnownPath, s.serveDiscovery)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Fprintf(os.Stderr, "JWKS server stopped: %v\n", err)
		}
	}()
	return s, nil
}

func (s *issuerServer) jwksURI() string { return s.baseURL + jwksPath }

// serveJWKS re-reads the file on every fetch so a rotated key is picked up
// (go-oidc caches keys and only refetches on an unknown kid).
func (s *issuerServer) serveJWKS(w http.ResponseWriter, _ *http.Request) {
	raw, _, err := readJWKS(s.jwksFile)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(raw)
}

// serveDiscovery answers like a Kubernetes API server's
// /.well-known/openid-configuration: the issuer, where its keys are, and
// which algorithms they sign with.
func (s *issuerServer) serveDiscovery(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"issuer":                                s.issuer,
		"jwks_uri":                              s.jwksURI(),
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": s.algs,
	})
}

// discoveryTransport makes go-oidc's discovery request for the configured
// issuer land on the loopback server. go-oidc fetches
// "<issuer>/.well-known/openid-configuration" with http.DefaultClient; for an
// issuer that is not a URL (meshsign's "meshsign-dev") that request has no
// scheme or host, so it is rewritten here. Every other request passes through.
type discoveryTransport struct {
	discoveryURL string   // what go-oidc asks for
	target       *url.URL // where it is served
	next         http.RoundTripper
}

func (t *discoveryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.String() != t.discoveryURL {
		return t.next.RoundTrip(req)
	}
	r := req.Clone(req.Context())
	u := *t.target
	r.URL = &u
	r.Host = u.Host
	return t.next.RoundTrip(r)
}

// routeDiscoveryToLoopback installs discoveryTransport on http.DefaultClient.
func (s *issuerServer) routeDiscoveryToLoopback() error {
	target, err := url.Parse(s.baseURL + wellKnownPath)
	if err != nil {
		return err
	}
	next := http.DefaultClient.Transport
	if next == nil {
		next = http.DefaultTransport
	}
	http.DefaultClient.Transport = &discoveryTransport{
		discoveryURL: strings.TrimSuffix(s.issuer, "/") + wellKnownPath,
		target:       target,
		next:         next,
	}
	return nil
}
