// Command istiod-ca serves istiod's certificate authority, and nothing else,
// as a benchmark peer for meshsign.
//
// The gRPC service, the CA, the authenticators, the server options and the
// TLS set-up are Istio's own code (istio.io/istio, used as a Go module); this
// file only wires them together the way pilot/pkg/bootstrap does for istiod's
// secure gRPC port 15012. Without --kubeconfig there is no Kubernetes (JWTs
// are checked offline against --jwks); with it, bearer tokens go to the API
// server's TokenReview (istiod's KubeJWTAuthenticator) and
// CA_TRUSTED_NODE_ACCOUNTS enables istiod's node authorizer (kube.go). See
// README.md for the split between Istio's code and glue.
//
// Usage:
//
//	istiod-ca --listen 127.0.0.1:15012 --ca-dir DIR --jwks jwks.json \
//	    [--issuer meshsign-dev] [--audience istio-ca] [--trust-domain cluster.local]
//	CA_TRUSTED_NODE_ACCOUNTS=istio-system/ztunnel \
//	    istiod-ca --listen 127.0.0.1:15012 --ca-dir DIR --kubeconfig FILE [--cluster-id Kubernetes]
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"istio.io/api/security/v1beta1"
	"istio.io/istio/pilot/pkg/features"
	istiogrpc "istio.io/istio/pilot/pkg/grpc"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/config/mesh/meshwatcher"
	"istio.io/istio/pkg/keepalive"
	"istio.io/istio/pkg/kube/krt"
	"istio.io/istio/pkg/log"
	istiomodel "istio.io/istio/pkg/model"
	"istio.io/istio/pkg/monitoring"
	"istio.io/istio/pkg/security"
	"istio.io/istio/pkg/spiffe"
	xdspkg "istio.io/istio/pkg/xds"
	"istio.io/istio/security/pkg/cmd"
	"istio.io/istio/security/pkg/pki/ca"
	caserver "istio.io/istio/security/pkg/server/ca"
	"istio.io/istio/security/pkg/server/ca/authenticate"
)

// caRSAKeySize is istiod's CITADEL_SELF_SIGNED_CA_RSA_KEY_SIZE default; for a
// plugged CA it only sizes the RSA keys the CA generates itself (its own
// serving key when the CA key is RSA).
const caRSAKeySize = 2048

type options struct {
	listen         string
	caDir          string
	jwksFile       string
	issuer         string
	audience       string
	trustDomain    string
	jwtRuleMode    string
	dnsNames       string
	defaultTTL     time.Duration
	maxTTL         time.Duration
	maxConnAge     time.Duration
	monitoringAddr string
	logLevel       string

	kubeconfig      string
	clusterID       string
	systemNamespace string
	kubeQPS         float32
	kubeBurst       int
}

func parseFlags() *options {
	o := &options{}
	flag.StringVar(&o.listen, "listen", "127.0.0.1:15012", "gRPC listen address (host:port; port 0 picks one)")
	flag.StringVar(&o.caDir, "ca-dir", "", "plug-in CA directory: ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem (or tls.crt, tls.key, ca.crt) (required)")
	flag.StringVar(&o.jwksFile, "jwks", "", "JWKS file of the token issuer, served on a loopback HTTP port for Istio's JWT authenticator "+
		"(required without --kubeconfig; with it, optional: istiod's JWT_RULE)")
	flag.StringVar(&o.issuer, "issuer", "meshsign-dev", "JWT issuer (JWT_RULE issuer)")
	flag.StringVar(&o.audience, "audience", "istio-ca", "accepted JWT audience (JWT_RULE audiences)")
	flag.StringVar(&o.trustDomain, "trust-domain", "cluster.local", "mesh trust domain (meshConfig.trustDomain)")
	flag.StringVar(&o.jwtRuleMode, "jwt-rule", "discovery",
		"how the JWT_RULE points at the keys: \"discovery\" = {issuer, audiences}, go-oidc discovers the JWKS and its algorithms "+
			"(accepts ES256); \"jwks_uri\" = {issuer, jwks_uri, audiences}, go-oidc then only accepts RS256")
	flag.StringVar(&o.dnsNames, "dns-names", "istiod.istio-system.svc,localhost", "DNS SANs of the serving certificate the CA issues for itself")
	flag.DurationVar(&o.defaultTTL, "default-ttl", cmd.DefaultWorkloadCertTTL, "DEFAULT_WORKLOAD_CERT_TTL")
	flag.DurationVar(&o.maxTTL, "max-ttl", cmd.DefaultMaxWorkloadCertTTL, "MAX_WORKLOAD_CERT_TTL")
	flag.DurationVar(&o.maxConnAge, "keepalive-max-server-connection-age", keepalive.Infinity,
		"istiod's --keepaliveMaxServerConnectionAge (binary default: infinite; the Helm chart passes 30m)")
	flag.StringVar(&o.monitoringAddr, "monitoring-addr", "", "if set, serve Prometheus /metrics here, like istiod's :15014 (metrics are recorded either way)")
	flag.StringVar(&o.logLevel, "log-level", "info", "Istio log level for all scopes: debug, info, warn, error, none")
	flag.StringVar(&o.kubeconfig, "kubeconfig", "", "if set, istiod's Kubernetes authenticator (TokenReview) and, with CA_TRUSTED_NODE_ACCOUNTS, "+
		"its node authorizer, against this API server")
	flag.StringVar(&o.clusterID, "cluster-id", "Kubernetes", "istiod's --clusterID (CLUSTER_ID): the clusterid header that selects this API server")
	flag.StringVar(&o.systemNamespace, "system-namespace", "istio-system", "istiod's namespace (POD_NAMESPACE): where the multicluster controller watches remote secrets")
	var qps float64
	flag.Float64Var(&qps, "kubernetes-api-qps", 80, "istiod's --kubernetesApiQPS: client-side rate limit of its kube client (TokenReviews included)")
	flag.IntVar(&o.kubeBurst, "kubernetes-api-burst", 160, "istiod's --kubernetesApiBurst")
	flag.Parse()
	o.kubeQPS = float32(qps)
	return o
}

func main() {
	o := parseFlags()
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "istiod-ca: %v\n", err)
		os.Exit(1)
	}
}

func run(o *options) error {
	if o.caDir == "" || (o.jwksFile == "" && o.kubeconfig == "") {
		return errors.New("--ca-dir and --jwks (or --kubeconfig) are required (see --help)")
	}
	if flag.NArg() != 0 {
		return fmt.Errorf("unexpected arguments: %q", flag.Args())
	}
	if err := configureLogging(o.logLevel); err != nil {
		return err
	}
	if len(features.CATrustedNodeAccounts) > 0 && o.kubeconfig == "" {
		// caserver.New would build a node authorizer from Kubernetes informers.
		return errors.New("CA_TRUSTED_NODE_ACCOUNTS is set, but impersonation needs Kubernetes: set --kubeconfig or unset it")
	}

	// istiod registers its Prometheus exporter first thing in NewServer, so the
	// CA's OTel counters are live (and cost what they cost) from the start.
	metricsHandler, err := monitoring.RegisterPrometheusExporter(nil, nil)
	if err != nil {
		return fmt.Errorf("registering the Prometheus exporter: %w", err)
	}
	grpcprom.EnableHandlingTimeHistogram()

	stop := make(chan struct{})
	defer close(stop)

	// The CA: plugged-cert IstioCA, as pilot/pkg/bootstrap createIstioCA does
	// when the cacerts bundle is complete.
	fileBundle, err := signingCAFileBundle(o.caDir)
	if err != nil {
		return err
	}
	caOpts, err := ca.NewPluggedCertIstioCAOptions(fileBundle, o.defaultTTL, o.maxTTL, caRSAKeySize)
	if err != nil {
		return fmt.Errorf("failed to create an istiod CA: %v", err)
	}
	istioCA, err := ca.NewIstioCA(caOpts)
	if err != nil {
		return fmt.Errorf("failed to create an istiod CA: %v", err)
	}
	istioCA.Run(stop)

	// istiod's own serving certificate, issued by its CA (initDNSCertsIstiod).
	dnsNames := splitList(o.dnsNames)
	certChain, keyPEM, err := istioCA.GenKeyCert(dnsNames, cmd.DefaultSelfSignedCACertTTL, false)
	if err != nil {
		return fmt.Errorf("failed generating istiod key cert %v", err)
	}
	servingCert, err := tls.X509KeyPair(certChain, keyPEM)
	if err != nil {
		return fmt.Errorf("istiod loading x509 key pairs failed: %v", err)
	}
	if leaf, err := x509.ParseCertificate(servingCert.Certificate[0]); err == nil {
		log.Infof("serving cert: DNS %v, issuer %q, chain of %d, expires %s",
			leaf.DNSNames, leaf.Issuer, len(servingCert.Certificate), leaf.NotAfter.Format(time.RFC3339))
	}

	// Client-certificate trust: the CA's root bundle, keyed by trust domain
	// (createPeerCertVerifier).
	peerCertVerifier := spiffe.NewPeerCertVerifier()
	if err := peerCertVerifier.AddMappingFromPEM(o.trustDomain, istioCA.GetCAKeyCertBundle().GetRootCertPem()); err != nil {
		return fmt.Errorf("add root CAs into peerCertVerifier failed: %v", err)
	}

	// Mesh config holder for the JWT authenticator's trust domain.
	meshCfg := mesh.DefaultMeshConfig()
	meshCfg.TrustDomain = o.trustDomain
	meshWatcher := meshwatcher.ConfigAdapter(krt.NewStatic(&meshwatcher.MeshConfigResource{MeshConfig: meshCfg}, true))

	// "Notice that the order of authenticators matters" (NewServer):
	// client certificate, JWT_RULE (if any), Kubernetes (if any).
	authenticators := []security.Authenticator{
		&authenticate.ClientCertAuthenticator{},
	}
	if o.jwksFile != "" {
		// The token issuer's public endpoints on loopback, then Istio's OIDC
		// authenticator from a JWT_RULE, exactly as initOIDC parses it.
		iss, err := startIssuerServer(o.issuer, o.jwksFile)
		if err != nil {
			return err
		}
		defer iss.srv.Close()
		rule := map[string]any{"issuer": o.issuer, "audiences": []string{o.audience}}
		switch o.jwtRuleMode {
		case "discovery":
			if err := iss.routeDiscoveryToLoopback(); err != nil {
				return err
			}
		case "jwks_uri":
			rule["jwks_uri"] = iss.jwksURI()
		default:
			return fmt.Errorf("--jwt-rule must be discovery or jwks_uri, not %q", o.jwtRuleMode)
		}
		jwtRuleJSON, _ := json.Marshal(rule)
		jwtAuthn, err := initOIDC(string(jwtRuleJSON), meshWatcher)
		if err != nil {
			return err
		}
		authenticators = append(authenticators, jwtAuthn)
	}
	var kube *kubeSetup
	if o.kubeconfig != "" {
		kube, err = newKube(o, meshWatcher)
		if err != nil {
			return err
		}
		authenticators = append(authenticators, kube.authn)
	}

	// istiod passes its multicluster controller; caserver.New builds the
	// node authorizer from it when CA_TRUSTED_NODE_ACCOUNTS is set.
	var caServer *caserver.Server
	if kube != nil {
		caServer, err = caserver.New(istioCA, o.maxTTL, authenticators, kube.multicluster)
	} else {
		caServer, err = caserver.New(istioCA, o.maxTTL, authenticators, nil)
	}
	if err != nil {
		return fmt.Errorf("failed to create istio ca server: %v", err)
	}
	if kube != nil {
		if len(features.CATrustedNodeAccounts) > 0 {
			log.Infof("node authorizer: trusted node accounts %v", features.CATrustedNodeAccounts.UnsortedList())
		}
		if err := kube.start(stop); err != nil {
			return err
		}
	}

	// The secure gRPC server (initSecureDiscoveryService).
	cfg := &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &servingCert, nil },
		ClientAuth:     tls.VerifyClientCertIfGiven,
		ClientCAs:      peerCertVerifier.GetGeneralCertPool(),
		VerifyPeerCertificate: func(rawCerts [][]byte, verifiedChains [][]*x509.Certificate) error {
			err := peerCertVerifier.VerifyPeerCert(rawCerts, verifiedChains)
			if err != nil {
				log.Infof("Could not verify certificate: %v", err)
			}
			return err
		},
		MinVersion: tls.VersionTLS12,
	}
	istiomodel.EnforceGoCompliance(cfg)

	keepaliveOpts := keepalive.DefaultOption()
	keepaliveOpts.MaxServerConnectionAge = o.maxConnAge
	grpcOpts := istiogrpc.ServerOptions(keepaliveOpts, xdspkg.RecordRecvSize, grpcprom.UnaryServerInterceptor)
	grpcOpts = append(grpcOpts, grpc.Creds(credentials.NewTLS(cfg)))
	grpcServer := grpc.NewServer(grpcOpts...)
	caServer.Register(grpcServer)
	reflection.Register(grpcServer)
	// Not on istiod's port: a health service so callers can wait for readiness.
	healthServer := health.NewServer()
	healthpb.RegisterHealthServer(grpcServer, healthServer)

	lis, err := net.Listen("tcp", o.listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", o.listen, err)
	}

	if o.monitoringAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", metricsHandler)
		mlis, err := net.Listen("tcp", o.monitoringAddr)
		if err != nil {
			return fmt.Errorf("listen %s: %w", o.monitoringAddr, err)
		}
		msrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = msrv.Serve(mlis) }()
		defer msrv.Close()
		fmt.Fprintf(os.Stderr, "metrics on http://%s/metrics\n", mlis.Addr())
	}

	healthServer.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthServer.SetServingStatus("istio.v1.auth.IstioCertificateService", healthpb.HealthCheckResponse_SERVING)

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	go func() {
		<-ctx.Done()
		healthServer.Shutdown()
		done := make(chan struct{})
		go func() { grpcServer.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			grpcServer.Stop()
		}
	}()

	fmt.Fprintf(os.Stderr, "listening on %s\n", lis.Addr())
	if err := grpcServer.Serve(lis); err != nil {
		return fmt.Errorf("gRPC server: %w", err)
	}
	return nil
}

// initOIDC mirrors pilot/pkg/bootstrap initOIDC: JWT_RULE JSON → JWTRule →
// authenticate.NewJwtAuthenticator.
func initOIDC(jwtRuleJSON string, meshWatcher mesh.Watcher) (security.Authenticator, error) {
	jwtRule := &v1beta1.JWTRule{}
	if err := json.Unmarshal([]byte(jwtRuleJSON), jwtRule); err != nil {
		return nil, fmt.Errorf("failed to unmarshal JWT rule: %v", err)
	}
	log.Infof("Istiod authenticating using JWTRule: %v", jwtRuleJSON)
	jwtAuthn, err := authenticate.NewJwtAuthenticator(jwtRule, meshWatcher)
	if err != nil {
		return nil, fmt.Errorf("failed to create the JWT authenticator: %v", err)
	}
	return jwtAuthn, nil
}

// signingCAFileBundle mirrors pilot/pkg/bootstrap detectSigningCABundleAndCRL
// and checkCABundleCompleteness for a plug-in directory, with the file-name
// constants from Istio's ca package. Unlike istiod, an empty directory is an
// error (istiod would fall back to a self-signed root kept in Kubernetes).
func signingCAFileBundle(dir string) (ca.SigningCAFileBundle, error) {
	var b ca.SigningCAFileBundle
	if _, err := os.Stat(filepath.Join(dir, ca.TLSSecretCACertFile)); err == nil {
		log.Info("Using kubernetes.io/tls secret type for signing ca files")
		b = ca.SigningCAFileBundle{
			RootCertFile:    filepath.Join(dir, ca.TLSSecretRootCertFile),
			CertChainFiles:  []string{filepath.Join(dir, ca.TLSSecretCACertFile), filepath.Join(dir, ca.TLSSecretRootCertFile)},
			SigningCertFile: filepath.Join(dir, ca.TLSSecretCACertFile),
			SigningKeyFile:  filepath.Join(dir, ca.TLSSecretCAPrivateKeyFile),
		}
	} else {
		log.Info("Using istiod file format for signing ca files")
		b = ca.SigningCAFileBundle{
			RootCertFile:    filepath.Join(dir, ca.RootCertFile),
			CertChainFiles:  []string{filepath.Join(dir, ca.CertChainFile)},
			SigningCertFile: filepath.Join(dir, ca.CACertFile),
			SigningKeyFile:  filepath.Join(dir, ca.CAPrivateKeyFile),
		}
		if features.EnableCACRL {
			if crl := filepath.Join(dir, ca.CACRLFile); fileExists(crl) {
				b.CRLFile = crl
			}
		}
	}
	var missing []string
	for _, f := range append([]string{b.SigningKeyFile, b.SigningCertFile, b.RootCertFile}, b.CertChainFiles...) {
		if !fileExists(f) {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return b, fmt.Errorf("incomplete signing CA bundle in %s: missing %s", dir, strings.Join(missing, ", "))
	}
	return b, nil
}

func fileExists(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// configureLogging sends Istio's scoped logs to stderr at the given level.
func configureLogging(level string) error {
	opts := log.DefaultOptions()
	opts.OutputPaths = []string{"stderr"}
	opts.ErrorOutputPaths = []string{"stderr"}
	lvl, ok := map[string]log.Level{
		"debug": log.DebugLevel, "info": log.InfoLevel, "warn": log.WarnLevel,
		"error": log.ErrorLevel, "none": log.NoneLevel,
	}[level]
	if !ok {
		return fmt.Errorf("--log-level must be debug, info, warn, error or none, not %q", level)
	}
	for name := range log.Scopes() {
		if name != "grpc" { // gRPC's own chatter stays off, as in istiod's defaults
			opts.SetDefaultOutputLevel(name, lvl)
		}
	}
	return log.Configure(opts)
}
