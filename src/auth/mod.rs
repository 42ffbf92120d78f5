//! Who is calling: turning a request's credentials into a [`CallerIdentity`].
//!
//! Authenticators are tried in istiod's order and the first success wins:
//! 1. a client certificate, already verified against the mesh roots by the TLS
//!    layer, whose single SPIFFE URI SAN is in the mesh's trust domain (or an
//!    alias): this is how workloads renew;
//! 2. a `Bearer` token: without `kubernetes` clusters, a JWT from one of the
//!    configured issuers (verified offline against a JWKS); with them, the
//!    cluster named by the `clusterid` header checks it, by `TokenReview`
//!    (istiod's way) or offline with that cluster's own issuer.
//!
//! Every failure becomes one [`AuthError`] that lists why each authenticator
//! declined, for the log. The caller only ever sees
//! `UNAUTHENTICATED: request authenticate failure`; tokens are never logged.

pub mod client_chain;
pub mod jwt;

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::k8s::tokenreview::ReviewError;
use crate::k8s::{Cluster, Clusters, TokenCheck};
use crate::pki::TrustedRoots;
use crate::spiffe::SpiffeId;

pub use client_chain::{ClientChain, ClientChainError};
pub use jwt::{JwtAuthenticator, JwtError, JwtIssuer};

/// How the caller proved its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthSource {
    ClientCertificate,
    Jwt { issuer: String },
    TokenReview { cluster: String },
}

impl fmt::Display for AuthSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthSource::ClientCertificate => f.write_str("client certificate"),
            AuthSource::Jwt { issuer } => write!(f, "JWT from {issuer}"),
            AuthSource::TokenReview { cluster } => write!(f, "TokenReview in cluster {cluster}"),
        }
    }
}

/// Kubernetes pod details carried by projected service-account tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub uid: String,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct CallerIdentity {
    pub id: SpiffeId,
    pub source: AuthSource,
    pub pod: Option<PodInfo>,
    /// The cluster whose token authenticated the caller, when clusters are
    /// configured (node authorization reads its pods).
    pub cluster: Option<Arc<Cluster>>,
}

/// The credentials a request arrived with, as the transport saw them.
/// `Debug` never shows the token.
#[derive(Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The value of the first `authorization: Bearer …` header, without the prefix.
    pub bearer_token: Option<&'a str>,
    /// The client's certificate chain, if it presented one (verified at the
    /// handshake; checked again against `roots` and the time on every request).
    pub client_chain: Option<&'a ClientChain>,
    /// The trust anchors in use now (`None`: no client certificate is trusted).
    pub roots: Option<TrustedRoots<'a>>,
    /// The `clusterid` header ("" when absent or sent more than once).
    pub cluster_id: &'a str,
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer_token", &self.bearer_token.map(|_| "<redacted>"))
            .field("client_chain", &self.client_chain.is_some())
            .field("cluster_id", &self.cluster_id)
            .finish()
    }
}

/// Why no authenticator accepted the request. `Display` is safe to log.
#[derive(Debug, Default)]
pub struct AuthError {
    pub reasons: Vec<String>,
    /// A token could not be checked because its checker (the API server)
    /// did not answer: retryable (`UNAVAILABLE`), not a refusal.
    pub unavailable: bool,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reasons.is_empty() {
            f.write_str("no credentials: neither a client certificate nor a bearer token")
        } else {
            f.write_str(&self.reasons.join("; "))
        }
    }
}

impl std::error::Error for AuthError {}

/// Where bearer tokens are checked.
#[derive(Debug, Clone)]
enum TokenAuth {
    /// Every configured issuer, `clusterid` ignored.
    Issuers(JwtAuthenticator),
    /// The cluster `clusterid` names.
    Clusters(Arc<Clusters>),
}

/// The configured authenticators.
#[derive(Debug, Clone)]
pub struct Authenticator {
    client_certificates: bool,
    trust_domains: Vec<String>,
    tokens: TokenAuth,
}

impl Authenticator {
    /// `trust_domains` is the mesh's trust domain followed by its aliases.
    pub fn new(
        client_certificates: bool,
        trust_domains: Vec<String>,
        jwt: JwtAuthenticator,
    ) -> Self {
        Self {
            client_certificates,
            trust_domains,
            tokens: TokenAuth::Issuers(jwt),
        }
    }

    /// Bearer tokens are checked by the cluster each request names instead.
    pub fn with_clusters(mut self, clusters: Arc<Clusters>) -> Self {
        self.tokens = TokenAuth::Clusters(clusters);
        self
    }

    /// Authenticates a request; see the module docs for the order.
    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<CallerIdentity, AuthError> {
        let mut err = AuthError::default();
        if let Some(chain) = creds.client_chain {
            // The handshake checked the chain then; the connection (or a
            // resumed session) may have outlived its validity or its root.
            let checked = match creds.roots {
                Some(roots) => chain.check(roots, OffsetDateTime::now_utc()),
                None => Err(ClientChainError::UntrustedRoot),
            };
            if let Err(e) = checked {
                err.reasons.push(format!("client certificate: {e}"));
            } else if self.client_certificates {
                match identity_from_certificate(chain.leaf(), &self.trust_domains) {
                    Ok(id) => {
                        return Ok(CallerIdentity {
                            id,
                            source: AuthSource::ClientCertificate,
                            pod: None,
                            cluster: None,
                        })
                    }
                    Err(e) => err.reasons.push(format!("client certificate: {e}")),
                }
            } else {
                err.reasons.push(
                    "client certificate: client-certificate authentication is disabled".into(),
                );
            }
        }
        match creds.bearer_token {
            Some(token) => match self.check_token(token, creds.cluster_id).await {
                Ok(caller) => return Ok(caller),
                Err((reason, unavailable)) => {
                    err.reasons.push(format!("bearer token: {reason}"));
                    err.unavailable = unavailable;
                }
            },
            None if creds.client_chain.is_some() => err.reasons.push("no bearer token".into()),
            None => {}
        }
        Err(err)
    }

    /// Checks a bearer token; on failure, the reason and whether it is
    /// retryable.
    async fn check_token(
        &self,
        token: &str,
        cluster_id: &str,
    ) -> Result<CallerIdentity, (String, bool)> {
        let clusters = match &self.tokens {
            TokenAuth::Issuers(jwt) => {
                return jwt.verify(token).map_err(|e| (e.to_string(), false))
            }
            TokenAuth::Clusters(clusters) => clusters,
        };
        let cluster = clusters
            .select(cluster_id)
            .map_err(|e| (e.to_string(), false))?;
        let mut caller = match &cluster.tokens {
            TokenCheck::Jwt(jwt) => jwt.verify(token).map_err(|e| {
                (
                    format!(
                        "failed to validate the JWT from cluster {:?}: {e}",
                        cluster.id
                    ),
                    false,
                )
            })?,
            TokenCheck::TokenReview(review) => {
                let account = review.authenticate(token).await.map_err(|e| {
                    (
                        format!(
                            "failed to validate the JWT from cluster {:?}: {e}",
                            cluster.id
                        ),
                        matches!(e, ReviewError::Unavailable(_)),
                    )
                })?;
                let trust_domain = self.trust_domains.first().map_or("", String::as_str);
                let id = SpiffeId::new(trust_domain, &account.namespace, &account.service_account)
                    .map_err(|e| (format!("service account: {e}"), false))?;
                CallerIdentity {
                    id,
                    source: AuthSource::TokenReview {
                        cluster: cluster.id.clone(),
                    },
                    pod: account.pod,
                    cluster: None,
                }
            }
        };
        caller.cluster = Some(cluster.clone());
        Ok(caller)
    }
}

/// Extracts the caller's SPIFFE ID from a verified client certificate: exactly
/// one URI SAN, an Istio SPIFFE ID in one of `trust_domains`.
pub fn identity_from_certificate(
    cert: &CertificateDer<'_>,
    trust_domains: &[String],
) -> Result<SpiffeId, String> {
    let parsed = crate::pki::parse_cert(cert)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("invalid SAN extension: {e}"))?
        .ok_or("the SAN extension does not exist")?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or("no URI SAN")?;
    if uris.next().is_some() {
        return Err("more than one URI SAN".into());
    }
    let id = SpiffeId::parse(uri).map_err(|e| format!("URI SAN {uri:?}: {e}"))?;
    if !trust_domains.iter().any(|td| td == id.trust_domain()) {
        return Err(format!(
            "{id} is not in trust domain {}",
            trust_domains.join(" or ")
        ));
    }
    Ok(id)
}
