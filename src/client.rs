//! A mock workload: what istio-agent does against the CA, in Rust. It makes a
//! key and a CSR the way the agent does, dials the CA over TLS (optionally
//! with the certificate it already holds, for renewal), sends the request with
//! a bearer token and the `ClusterID` header, and checks the answer as the
//! agent does (at least two elements, root last) and more strictly (the chain
//! verifies to the root, the SAN is the identity, the key is ours).
//!
//! `meshsign request` and the integration tests use it.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, DnType, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use x509_parser::extensions::GeneralName;

use crate::pki::{self, der};
use crate::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::IstioCertificateRequest;
use crate::spiffe::SpiffeId;

/// Key types a workload may use, as istio-agent offers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKeyType {
    Rsa2048,
    EcdsaP256,
    EcdsaP384,
}

impl WorkloadKeyType {
    pub fn generate(self) -> Result<KeyPair, String> {
        match self {
            WorkloadKeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
            WorkloadKeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            WorkloadKeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        }
        .map_err(|e| format!("key generation failed: {e}"))
    }
}

/// The subject a CSR carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrSubject {
    /// `O=` with an empty string, as Go's `pkiutil.GenCSR` (istio-agent) writes it.
    IstioAgent,
    /// An empty subject, as ztunnel writes it.
    Empty,
}

/// Encodes a SubjectAltName extension value holding one URI.
fn san_uri_value(uri: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(uri.len() + 4);
    der::nested(&mut out, der::SEQUENCE, |names| {
        der::tlv(names, 0x86, uri.as_bytes())
    });
    out
}

/// Makes a PEM CSR for `identity`: one critical URI SAN, nothing else.
pub fn make_csr(key: &KeyPair, identity: &SpiffeId, subject: CsrSubject) -> Result<String, String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if subject == CsrSubject::IstioAgent {
        dn.push(DnType::OrganizationName, "");
    }
    params.distinguished_name = dn;
    let mut san =
        CustomExtension::from_oid_content(&[2, 5, 29, 17], san_uri_value(&identity.to_string()));
    san.set_criticality(true);
    params.custom_extensions = vec![san];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("CSR encoding failed: {e}"))
}

/// How to reach the CA.
#[derive(Debug, Clone)]
pub struct CaEndpoint {
    /// `host:port`.
    pub addr: String,
    /// TLS server name; defaults to the host part of `addr`.
    pub server_name: Option<String>,
    /// Roots that the CA's serving certificate must chain to. Empty = plaintext.
    pub roots: Vec<CertificateDer<'static>>,
    /// Client certificate chain and its private key (PEM: PKCS#8, PKCS#1 or SEC1) for mTLS renewal.
    pub client_identity: Option<(Vec<CertificateDer<'static>>, String)>,
}

/// Connects to the CA. Plaintext when `roots` is empty.
pub async fn connect(ep: &CaEndpoint) -> Result<IstioCertificateServiceClient<Channel>, String> {
    Ok(IstioCertificateServiceClient::new(channel(ep).await?))
}

/// The gRPC endpoint for `ep`, with the client's connect and call deadlines.
fn endpoint(ep: &CaEndpoint) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(format!("http://{}", ep.addr))
        .map_err(|e| format!("bad address {:?}: {e}", ep.addr))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30)))
}

/// Opens a gRPC channel to the CA (for any of its services).
pub async fn channel(ep: &CaEndpoint) -> Result<Channel, String> {
    if ep.roots.is_empty() {
        let channel = endpoint(ep)?
            .connect()
            .await
            .map_err(|e| format!("connect {}: {}", ep.addr, error_chain(&e)))?;
        return Ok(channel);
    }
    channel_with_tls(ep, Arc::new(client_tls_config(ep)?)).await
}

/// Opens a TLS channel with a prepared client configuration (reused across
/// many connections by load generators).
pub async fn channel_with_tls(
    ep: &CaEndpoint,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, String> {
    let endpoint = endpoint(ep)?;
    let host = ep
        .addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .ok_or_else(|| format!("address {:?} has no port", ep.addr))?;
    let name = ep.server_name.clone().unwrap_or(host);
    let server_name =
        ServerName::try_from(name.clone()).map_err(|e| format!("server name {name:?}: {e}"))?;
    let addr = ep.addr.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        let server_name = server_name.clone();
        let addr = addr.clone();
        async move {
            let tcp = TcpStream::connect(addr.as_str()).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            let mut message = format!("connect {}: {}", ep.addr, error_chain(&e));
            if is_unknown_ca(&e) {
                message.push_str(WRONG_CA_HINT);
            }
            message
        })
}

/// Said when the server's certificate does not chain to the roots given.
pub const WRONG_CA_HINT: &str = " (the server's certificate is not signed by the roots given: \
    this is a different CA than those roots; pass the root-cert.pem of the CA serving \
    this address, e.g. --root or the --state-dir it runs with)";

/// `e` and its causes, each once: `transport error: Connection refused (os
/// error 111)`. Some wrappers (tonic's, hyper's) repeat their cause in their
/// own message and also return it as `source()`, so a cause already written
/// is not written again.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    append_causes(&mut s, e.source());
    s
}

/// Appends `first` and its sources to `s`, each `: `-separated, leaving out
/// any whose message `s` already holds.
fn append_causes(s: &mut String, first: Option<&dyn std::error::Error>) {
    let mut cur = first;
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !text.is_empty() && !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
}

/// A failed call for a person: the code, the message and, when the call
/// failed below gRPC (TLS, the connection), that cause once, with a hint
/// when the server refused our client certificate.
pub fn describe_status(s: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(cause) = s.source() {
        append_causes(&mut text, Some(cause));
        if client_certificate_refused(cause) {
            text.push_str(CLIENT_CERT_REFUSED_HINT);
        }
    }
    text
}

/// Said when the server refuses the client certificate at the handshake.
pub const CLIENT_CERT_REFUSED_HINT: &str = " (the server refused the client certificate: \
    it is not issued under the roots this CA trusts, i.e. by a different CA)";

/// Whether a TLS alert says the server did not accept our certificate
/// (tokio-rustls hands some alerts over as text only).
fn client_certificate_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    const REFUSALS: [A; 4] = [
        A::UnknownCA,
        A::BadCertificate,
        A::DecryptError,
        A::CertificateUnknown,
    ];
    let typed = tls_errors(e)
        .any(|tls| matches!(tls, rustls::Error::AlertReceived(a) if REFUSALS.contains(a)));
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if REFUSALS
            .iter()
            .any(|a| text.contains(&format!("received fatal alert: {a:?}")))
        {
            return true;
        }
        cur = err.source();
    }
    typed
}

/// The rustls errors in `e`'s chain (also inside `io::Error`s).
fn tls_errors<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a rustls::Error> {
    std::iter::successors(Some(e), |err| err.source()).filter_map(|err| {
        err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })
    })
}

/// Whether the handshake failed because the server's certificate does not
/// chain to our roots (an unknown issuer, or one of the same name whose key
/// does not verify the signature: another CA with the same subject).
fn is_unknown_ca(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::{CertificateError, Error as TlsError};
    tls_errors(e).any(|tls| {
        matches!(
            tls,
            TlsError::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature
            )
        )
    })
}

/// The rustls client configuration: TLS 1.2+, ALPN h2, the CA roots, and the
/// client certificate when renewing.
pub fn client_tls_config(ep: &CaEndpoint) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for r in &ep.roots {
        roots
            .add(r.clone())
            .map_err(|e| format!("bad root certificate: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut config = match &ep.client_identity {
        Some((chain, key_pem)) => {
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| format!("bad client key: {e}"))?;
            builder
                .with_client_auth_cert(chain.clone(), key)
                .map_err(|e| format!("bad client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// One certificate request, as istio-agent sends it.
#[derive(Debug, Clone)]
pub struct CertificateRequest<'a> {
    pub csr_pem: String,
    pub ttl_seconds: i64,
    pub token: Option<&'a str>,
    pub cluster_id: &'a str,
    /// `ImpersonatedIdentity` metadata, as ztunnel sends it for the pods on its node.
    pub impersonate: Option<&'a str>,
}

/// Sends `CreateCertificate` and returns the PEM elements.
pub async fn create_certificate(
    client: &mut IstioCertificateServiceClient<Channel>,
    req: &CertificateRequest<'_>,
) -> Result<Vec<String>, tonic::Status> {
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "CertSigner".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(String::new())),
        },
    );
    if let Some(identity) = req.impersonate {
        metadata.fields.insert(
            "ImpersonatedIdentity".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())),
            },
        );
    }
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: req.csr_pem.clone(),
        validity_duration: req.ttl_seconds,
        metadata: Some(metadata),
    });
    if let Some(token) = req.token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    if let Ok(v) = req.cluster_id.parse() {
        request.metadata_mut().insert("clusterid", v);
    }
    Ok(client
        .create_certificate(request)
        .await?
        .into_inner()
        .cert_chain)
}

/// An answer that passed every check.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// Leaf and intermediates (every element but the last), PEM.
    pub chain_pem: String,
    /// The root bundle (the last element), PEM.
    pub root_pem: String,
    pub leaf: CertificateDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub serial_hex: String,
}

/// Checks a response the way a careful agent would, including that the leaf
/// carries our key.
pub fn verify_response(
    elements: &[String],
    key: &KeyPair,
    identity: &SpiffeId,
    now: OffsetDateTime,
) -> Result<IssuedCertificate, String> {
    let issued = verify_issued(elements, identity, now)?;
    let parsed = pki::parse_cert(&issued.leaf)?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("leaf public key is not the key we sent".into());
    }
    Ok(issued)
}

/// Checks a response's shape, chain and SAN (everything but the key).
pub fn verify_issued(
    elements: &[String],
    identity: &SpiffeId,
    now: OffsetDateTime,
) -> Result<IssuedCertificate, String> {
    if elements.len() < 2 {
        return Err(format!(
            "invalid empty CertChain: {} element(s)",
            elements.len()
        ));
    }
    if let Some(bad) = elements.iter().position(|e| !e.ends_with('\n')) {
        return Err(format!("element {bad} does not end with a newline"));
    }
    let (root_pem, rest) = elements.split_last().ok_or("empty chain")?;
    let roots = pki::parse_certificates_nonempty(root_pem.as_bytes())
        .map_err(|e| format!("root element: {e}"))?;
    let mut chain = Vec::new();
    for (i, e) in rest.iter().enumerate() {
        let certs = pki::parse_certificates_nonempty(e.as_bytes())
            .map_err(|err| format!("element {i}: {err}"))?;
        if certs.len() != 1 {
            return Err(format!(
                "element {i} holds {} certificates, expected one",
                certs.len()
            ));
        }
        chain.extend(certs);
    }
    let leaf = chain.remove(0);
    pki::verify_chain(&leaf, &chain, &roots, now)?;
    let parsed = pki::parse_cert(&leaf)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("leaf has no SAN")?;
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => (*u).to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    if names != [identity.to_string()] {
        return Err(format!(
            "leaf SANs are {names:?}, expected exactly [{identity}]"
        ));
    }
    let (not_before, not_after) = (
        parsed.validity().not_before.to_datetime(),
        parsed.validity().not_after.to_datetime(),
    );
    let serial_hex = parsed.raw_serial_as_string();
    Ok(IssuedCertificate {
        chain_pem: rest.concat(),
        root_pem: root_pem.clone(),
        not_before,
        not_after,
        serial_hex,
        leaf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that writes its cause into its own message and also
    /// returns it as `source()`, as tonic's and hyper's wrappers do.
    #[derive(Debug)]
    struct Repeats(std::io::Error);

    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}", self.0)
        }
    }

    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_written_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = Repeats(refused);
        let text = error_chain(&e);
        assert_eq!(text.matches("refused").count(), 1, "{text}");

        // Ours name their cause in the message and do not also return it.
        let start = crate::server::StartError::Bundle(crate::ca::BundleError {
            file: "/x/ca-cert.pem".into(),
            reason: "missing".into(),
        });
        assert!(std::error::Error::source(&start).is_none());
        assert_eq!(error_chain(&start), "CA bundle: /x/ca-cert.pem: missing");
        let refused = crate::error::RequestError::Unauthenticated(Default::default());
        assert!(std::error::Error::source(&refused).is_none());
    }

    #[test]
    fn a_server_under_another_root_is_called_a_different_ca() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert!(is_unknown_ca(&io));
        let other = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_unknown_ca(&other));
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: DecryptError",
        );
        assert!(client_certificate_refused(&alert));
        assert!(!client_certificate_refused(&other));
    }
}
