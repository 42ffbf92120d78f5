//! Shared helpers for the integration tests: start a real meshsign server on
//! a loopback port, mint tokens, and act as workloads against it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshsign::client::{
    self, CaEndpoint, CertificateRequest, CsrSubject, IssuedCertificate, WorkloadKeyType,
};
use meshsign::config::Config;
use meshsign::pki;
use meshsign::server::{self, RunningServer};
use meshsign::spiffe::SpiffeId;
use meshsign::token::{DevTokenIssuer, TokenRequest};
use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tonic::Code;

/// A CA certificate spec for tests: O=test, the given CN, key type and lifetime.
pub fn ca_spec(
    cn: &str,
    key_type: meshsign::ca::generate::KeyType,
    validity: ::time::Duration,
) -> meshsign::ca::generate::CaSpec {
    meshsign::ca::generate::CaSpec {
        organization: "test".into(),
        common_name: cn.into(),
        locality: None,
        key_type,
        validity,
        path_len: None,
    }
}

/// A P-256 root + intermediate (`intermediate_cn`) bundle written to `dir`
/// in Istio's layout, and a serving certificate for `localhost` signed by it
/// (chain PEM, key PEM): for test HTTPS servers such as a JWKS endpoint.
pub fn bundle_and_serving_cert(dir: &Path, intermediate_cn: &str) -> (String, String) {
    let now = ::time::OffsetDateTime::now_utc();
    let root = meshsign::ca::generate::root(
        &ca_spec(
            "root",
            meshsign::ca::generate::KeyType::EcdsaP256,
            ::time::Duration::days(10),
        ),
        now,
    )
    .unwrap();
    let inter = meshsign::ca::generate::intermediate(
        &root,
        &ca_spec(
            intermediate_cn,
            meshsign::ca::generate::KeyType::EcdsaP256,
            ::time::Duration::days(10),
        ),
        now,
    )
    .unwrap();
    meshsign::ca::generate::write_istio_layout(dir, &inter, &inter.cert_pem, &root.cert_pem)
        .unwrap();
    let ca = meshsign::ca::Ca::load(dir, now).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let leaf = ca
        .sign(&meshsign::ca::LeafSpec {
            spki_der: &spki,
            common_name: None,
            sans: &[meshsign::ca::SanEntry::Dns("localhost".into())],
            not_before: now - ::time::Duration::minutes(1),
            not_after: now + ::time::Duration::hours(1),
        })
        .unwrap();
    (pki::cert_pem(&leaf) + &inter.cert_pem, key.serialize_pem())
}

/// The Istio sample plug-in bundle, checked into tests/testdata.
pub fn istio_samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/istio-samples")
}

/// A server under test plus what clients need to reach it.
pub struct TestServer {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
    pub issuer: DevTokenIssuer,
    pub roots: Vec<CertificateDer<'static>>,
    /// The configuration without the test's extra YAML, and whether it is
    /// a plug-in CA's (for [`TestServer::reload_with`]).
    base_yaml: String,
    plugin_ca: bool,
}

impl TestServer {
    /// Dev mode (self-made CA) with `extra_yaml` appended to the config.
    pub async fn dev(extra_yaml: &str) -> TestServer {
        Self::start(None, extra_yaml).await
    }

    /// A plug-in CA directory, trusting a fresh dev token issuer through `authn.jwt`.
    pub async fn with_ca_dir(ca_dir: &Path, extra_yaml: &str) -> TestServer {
        Self::start(Some(ca_dir), extra_yaml).await
    }

    /// A plug-in CA directory watched for changes every `interval`.
    pub async fn with_ca_dir_and_reload(ca_dir: &Path, interval: &str) -> TestServer {
        Self::start_with(Some(ca_dir), "", Some(interval)).await
    }

    /// [`TestServer::with_ca_dir_and_reload`] with `extra_yaml` appended to the config.
    pub async fn with_ca_dir_reload_and(
        ca_dir: &Path,
        interval: &str,
        extra_yaml: &str,
    ) -> TestServer {
        Self::start_with(Some(ca_dir), extra_yaml, Some(interval)).await
    }

    async fn start(ca_dir: Option<&Path>, extra_yaml: &str) -> TestServer {
        Self::start_with(ca_dir, extra_yaml, None).await
    }

    /// Dev mode with `extra_yaml`, started with `options`.
    pub async fn dev_with_options(extra_yaml: &str, options: server::StartOptions) -> TestServer {
        Self::start_full(None, extra_yaml, None, options).await
    }

    async fn start_with(
        ca_dir: Option<&Path>,
        extra_yaml: &str,
        reload: Option<&str>,
    ) -> TestServer {
        Self::start_full(ca_dir, extra_yaml, reload, server::StartOptions::default()).await
    }

    async fn start_full(
        ca_dir: Option<&Path>,
        extra_yaml: &str,
        reload: Option<&str>,
        options: server::StartOptions,
    ) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let issuer = DevTokenIssuer::load_or_create(&state).expect("dev issuer");
        let mut yaml = format!(
            "listen: \"127.0.0.1:0\"\nmonitoring: {{ listen: \"127.0.0.1:0\" }}\nstate_dir: {:?}\n",
            state.display().to_string()
        );
        if let Some(ca) = ca_dir {
            yaml.push_str(&format!(
                "ca: {{ dir: {:?}, reload_interval: {:?} }}\n",
                ca.display().to_string(),
                reload.unwrap_or("10s"),
            ));
            // With Kubernetes clusters, tokens are the clusters' own.
            if !extra_yaml.contains("kubernetes:") {
                yaml.push_str(&format!(
                    "authn:\n  jwt:\n    - issuer: meshsign-dev\n      jwks_file: {:?}\n",
                    issuer.jwks_path().display().to_string()
                ));
            }
        }
        let base_yaml = yaml;
        let yaml = compose(&base_yaml, ca_dir.is_some(), extra_yaml);
        let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("config {yaml}: {e}"));
        let server = server::start_with(&config, options)
            .await
            .expect("server starts");
        let roots = pki::parse_certificates_nonempty(server.roots_pem.as_bytes()).expect("roots");
        TestServer {
            server,
            dir,
            issuer,
            roots,
            base_yaml,
            plugin_ca: ca_dir.is_some(),
        }
    }

    /// Reloads the server's configuration with `extra_yaml` in place of the
    /// extra YAML it started with (what `SIGHUP` does with the file).
    pub async fn reload_with(
        &self,
        extra_yaml: &str,
    ) -> Result<Vec<&'static str>, server::ConfigReloadError> {
        let yaml = compose(&self.base_yaml, self.plugin_ca, extra_yaml);
        self.server.reload(Config::from_yaml(&yaml)).await
    }

    pub fn addr(&self) -> String {
        format!("localhost:{}", self.server.local_addr.port())
    }

    pub fn endpoint(&self) -> CaEndpoint {
        CaEndpoint {
            addr: self.addr(),
            server_name: None,
            roots: self.roots.clone(),
            client_identity: None,
        }
    }

    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.issuer.mint(&TokenRequest::new(ns, sa)).expect("mint")
    }

    pub fn token_with(&self, req: &TokenRequest<'_>) -> String {
        self.issuer.mint(req).expect("mint")
    }

    /// The value of the first `/metrics` line starting with `line_start`
    /// (0 when there is none yet).
    pub async fn metric(&self, line_start: &str) -> f64 {
        let addr = self.server.monitoring_addr.expect("monitoring configured");
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("scrape body");
        text.lines()
            .find(|l| l.starts_with(line_start))
            .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
    }

    /// Waits until `/healthz/ready` answers 200 (with Kubernetes: the pod
    /// watches have listed every pod), for at most `within`.
    pub async fn wait_ready(&self, within: std::time::Duration) {
        let addr = self.server.monitoring_addr.expect("monitoring configured");
        let ready = format!("http://{addr}/healthz/ready");
        eventually("ready", within, || async {
            reqwest::get(&ready).await.unwrap().status() == 200
        })
        .await;
    }
}

/// The issuer CN of the leaf in a response (which CA signed it).
pub fn leaf_issuer_cn(elements: &[String]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = pki::parse_certificates_nonempty(elements[0].as_bytes()).expect("leaf PEM");
    let (_, leaf) = X509Certificate::from_der(&der[0]).expect("leaf DER");
    let cn = leaf
        .issuer()
        .iter_common_name()
        .next()
        .expect("issuer CN")
        .as_str()
        .expect("issuer CN text")
        .to_owned();
    cn
}

/// A test server's configuration: `base` plus `extra_yaml`.
fn compose(base: &str, plugin_ca: bool, extra_yaml: &str) -> String {
    let mut yaml = base.to_owned();
    if plugin_ca && !extra_yaml.contains("rate_limits") {
        // Test workloads ask again and again with one token that names no
        // pod, which a real pod would not: the plug-in CA's per-caller
        // budget is off here, and tests/limits.rs tests it.
        yaml.push_str("rate_limits: { per_caller: { per_second: 0 } }\n");
    }
    yaml.push_str(extra_yaml);
    yaml
}

/// Polls `check` every 100 ms until it is true; panics with `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Polls `check` every 100 ms until it returns `Some`, and returns that;
/// panics with `what` after `within`.
pub async fn eventually_some<T, F, Fut>(what: &str, within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A TLS connection to `addr` made with `tls`, for the server name
/// `localhost` (the test server's certificate names it).
pub async fn tls_connect(
    addr: impl tokio::net::ToSocketAddrs,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a DNS name");
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

/// A workload: a key, its identity, and what it was issued.
pub struct Workload {
    pub id: SpiffeId,
    pub key: KeyPair,
}

impl Workload {
    pub fn new(ns: &str, sa: &str, key_type: WorkloadKeyType) -> Workload {
        Workload {
            id: SpiffeId::new("cluster.local", ns, sa).expect("id"),
            key: key_type.generate().expect("key"),
        }
    }

    pub fn csr(&self) -> String {
        client::make_csr(&self.key, &self.id, CsrSubject::IstioAgent).expect("csr")
    }

    /// Requests a certificate with a bearer token and verifies the answer.
    pub async fn obtain(
        &self,
        ep: &CaEndpoint,
        token: Option<&str>,
        ttl: i64,
    ) -> Result<(Vec<String>, IssuedCertificate), (Code, String)> {
        let mut ca = client::connect(ep)
            .await
            .map_err(|e| (Code::Unavailable, e))?;
        let elements = client::create_certificate(
            &mut ca,
            &CertificateRequest {
                csr_pem: self.csr(),
                ttl_seconds: ttl,
                token,
                cluster_id: "Kubernetes",
                impersonate: None,
            },
        )
        .await
        .map_err(|s| (s.code(), s.message().to_owned()))?;
        let issued =
            client::verify_response(&elements, &self.key, &self.id, OffsetDateTime::now_utc())
                .map_err(|e| (Code::Internal, format!("response does not verify: {e}")))?;
        Ok((elements, issued))
    }

    /// One request for this workload's identity over an existing channel
    /// (istio-agent's shape); the answer is not verified.
    pub async fn send_on(
        &self,
        channel: &tonic::transport::Channel,
        token: Option<&str>,
    ) -> Result<(), Code> {
        let mut ca =
            meshsign::proto::istio_certificate_service_client::IstioCertificateServiceClient::new(
                channel.clone(),
            );
        client::create_certificate(
            &mut ca,
            &CertificateRequest {
                csr_pem: self.csr(),
                ttl_seconds: 600,
                token,
                cluster_id: "Kubernetes",
                impersonate: None,
            },
        )
        .await
        .map(|_| ())
        .map_err(|s| s.code())
    }

    /// mTLS identity for renewal: chain (leaf + intermediates) and key PEM.
    pub fn client_identity(
        &self,
        issued: &IssuedCertificate,
    ) -> (Vec<CertificateDer<'static>>, String) {
        let chain = pki::parse_certificates_nonempty(issued.chain_pem.as_bytes()).expect("chain");
        (chain, self.key.serialize_pem())
    }
}

/// Sends a raw CSR and returns the outcome code and message.
pub async fn send(
    ep: &CaEndpoint,
    csr_pem: String,
    token: Option<&str>,
    ttl: i64,
) -> (Code, String, Vec<String>) {
    let mut ca = client::connect(ep).await.expect("connect");
    match client::create_certificate(
        &mut ca,
        &CertificateRequest {
            csr_pem,
            ttl_seconds: ttl,
            token,
            cluster_id: "Kubernetes",
            impersonate: None,
        },
    )
    .await
    {
        Ok(chain) => (Code::Ok, String::new(), chain),
        Err(s) => (s.code(), s.message().to_owned(), Vec::new()),
    }
}

/// rustls verifiers that check a peer's chain against the mesh root and its
/// SPIFFE ID, as an Istio sidecar does (no DNS names involved).
pub mod kube;

pub mod spiffe_tls {
    use super::*;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
    use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
    use rustls_pki_types::{ServerName, UnixTime};

    #[derive(Debug)]
    pub struct SpiffePeerVerifier {
        pub roots: Vec<CertificateDer<'static>>,
        pub expected: SpiffeId,
        pub trust_domains: Vec<String>,
    }

    impl SpiffePeerVerifier {
        fn check(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
        ) -> Result<(), rustls::Error> {
            let inter: Vec<CertificateDer<'static>> = intermediates
                .iter()
                .map(|c| c.clone().into_owned())
                .collect();
            pki::verify_chain(end_entity, &inter, &self.roots, OffsetDateTime::now_utc())
                .map_err(rustls::Error::General)?;
            let id = meshsign::auth::identity_from_certificate(end_entity, &self.trust_domains)
                .map_err(rustls::Error::General)?;
            if id != self.expected {
                return Err(rustls::Error::General(format!(
                    "peer is {id}, expected {}",
                    self.expected
                )));
            }
            Ok(())
        }

        fn provider() -> rustls::crypto::CryptoProvider {
            rustls::crypto::aws_lc_rs::default_provider()
        }

        fn tls12(
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &Self::provider().signature_verification_algorithms,
            )
        }

        fn tls13(
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &Self::provider().signature_verification_algorithms,
            )
        }
    }

    impl ServerCertVerifier for SpiffePeerVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            self.check(end_entity, intermediates)?;
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Self::tls12(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Self::tls13(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            Self::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    impl ClientCertVerifier for SpiffePeerVerifier {
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            &[]
        }
        fn verify_client_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _now: UnixTime,
        ) -> Result<ClientCertVerified, rustls::Error> {
            self.check(end_entity, intermediates)?;
            Ok(ClientCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Self::tls12(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Self::tls13(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            Self::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    fn pem_key(pem: &str) -> rustls_pki_types::PrivateKeyDer<'static> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key PEM")
    }

    /// Builds `(server_config, client_config)` for two workloads that
    /// authenticate each other by SPIFFE ID.
    pub fn mutual_configs(
        server: (&Workload, &IssuedCertificate),
        client: (&Workload, &IssuedCertificate),
        roots: &[CertificateDer<'static>],
    ) -> (rustls::ServerConfig, rustls::ClientConfig) {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (s_chain, s_key) = server.0.client_identity(server.1);
        let (c_chain, c_key) = client.0.client_identity(client.1);
        let td = vec!["cluster.local".to_owned()];
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(Arc::new(SpiffePeerVerifier {
                roots: roots.to_vec(),
                expected: client.0.id.clone(),
                trust_domains: td.clone(),
            }))
            .with_single_cert(s_chain, pem_key(&s_key))
            .expect("server cert");
        let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffePeerVerifier {
                roots: roots.to_vec(),
                expected: server.0.id.clone(),
                trust_domains: td,
            }))
            .with_client_auth_cert(c_chain, pem_key(&c_key))
            .expect("client cert");
        (server_cfg, client_cfg)
    }
}
