//! The `IstioCertificateService` implementation: one request through
//! auth → csr → policy → ca, and the response in istiod's shape.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::tls::PeerInfo;
use crate::auth::{Authenticator, CallerIdentity, Credentials};
use crate::ca::pool::SigningPool;
use crate::ca::{Ca, LeafSpec, SanEntry};
use crate::csr::{self, KeyPolicy};
use crate::error::RequestError;
use crate::metrics::Metrics;
use crate::pki;
use crate::policy::Policy;
use crate::proto::istio_certificate_service_server::IstioCertificateService;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};

/// Struct key istiod reads for node impersonation (ztunnel).
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Longest Common Name X.509 allows; istiod omits a longer dual-use CN.
const MAX_CN_LEN: usize = 64;

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct CertificateService {
    ca: Arc<ArcSwap<Ca>>,
    authenticator: Authenticator,
    policy: Policy,
    key_policy: KeyPolicy,
    /// Signer threads for slow (RSA) keys, one per core, off the reactor.
    signers: SigningPool,
    allow_plaintext: bool,
    metrics: Arc<Metrics>,
}

impl CertificateService {
    pub fn new(
        ca: Arc<ArcSwap<Ca>>,
        authenticator: Authenticator,
        policy: Policy,
        key_policy: KeyPolicy,
        allow_plaintext: bool,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            ca,
            authenticator,
            policy,
            key_policy,
            signers: SigningPool::new(cores)?,
            allow_plaintext,
            metrics,
        })
    }

    /// Everything that reads the request: authentication, CSR checks, policy
    /// and TTL. Synchronous, so the request (token, CSR PEM, headers) can be
    /// dropped before a request waits for a signing slot.
    pub fn authorize(
        &self,
        peer: Option<&PeerInfo>,
        metadata: &MetadataMap,
        request: &IstioCertificateRequest,
    ) -> Result<(CallerIdentity, SigningJob), RequestError> {
        // A request without connection info is treated as plaintext (fail closed).
        if !peer.is_some_and(|p| p.tls) && !self.allow_plaintext {
            return Err(RequestError::PlaintextRefused);
        }
        let creds = Credentials {
            bearer_token: bearer_token(metadata),
            client_certificate: peer.and_then(|p| p.client_certificate.as_ref()),
        };
        let caller = self.authenticator.authenticate(creds)?;

        if let Some(impersonated) = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s),
                _ => None,
            })
        {
            let shown: String = impersonated.chars().take(120).collect();
            return Err(RequestError::Impersonation(format!(
                "{} asked to impersonate {shown:?}, but no node authorizer is configured",
                caller.id
            )));
        }

        let csr = csr::validate(&request.csr, &self.key_policy)?;
        self.policy.authorize(&caller.id, &csr.identity)?;
        let now = OffsetDateTime::now_utc();
        let (not_before, not_after) = self.policy.validity(request.validity_duration, now)?;
        let uri = csr.identity.to_string();
        let common_name = (csr.wants_common_name && uri.len() <= MAX_CN_LEN).then(|| uri.clone());
        Ok((
            caller,
            SigningJob {
                spki_der: csr.spki_der,
                common_name,
                sans: [SanEntry::Uri(uri)],
                not_before,
                not_after,
            },
        ))
    }

    /// Signs an authorized job and builds the response elements. RSA
    /// signatures run on the blocking pool, at most one per core at a time.
    pub async fn sign(&self, job: SigningJob) -> Result<Vec<String>, RequestError> {
        let ca = self.ca.load_full();
        let sign = move |ca: &Ca| {
            ca.sign(&LeafSpec {
                spki_der: &job.spki_der,
                common_name: job.common_name.as_deref(),
                sans: &job.sans,
                not_before: job.not_before,
                not_after: job.not_after,
            })
        };
        let leaf = if ca.scheme().is_slow() {
            self.signers.sign(ca.clone(), sign).await?
        } else {
            sign(&ca)?
        };

        let tail = ca.response_tail();
        let mut chain = Vec::with_capacity(tail.len() + 1);
        chain.push(pki::cert_pem(&leaf));
        chain.extend(tail.iter().cloned());
        Ok(chain)
    }
}

/// What remains of an authorized request: the leaf to sign.
#[derive(Debug)]
pub struct SigningJob {
    spki_der: Vec<u8>,
    common_name: Option<String>,
    sans: [SanEntry; 1],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// The first `authorization` value with the `Bearer ` prefix, as istiod reads it.
fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    metadata
        .get_all("authorization")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[tonic::async_trait]
impl IstioCertificateService for Arc<CertificateService> {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.metrics.csr_count.inc();
        let started = Instant::now();
        let peer = request.extensions().get::<PeerInfo>();
        let remote = peer.and_then(|p| p.remote);
        let authorized = self.authorize(peer, request.metadata(), request.get_ref());
        // The request (token, CSR, headers) is not needed any more; a request
        // waiting for a signing slot holds only its small SigningJob.
        drop(request);
        let result = match authorized {
            Ok((caller, job)) => self.sign(job).await.map(|chain| (caller, chain)),
            Err(e) => Err(e),
        };
        match result {
            Ok((caller, cert_chain)) => {
                tracing::info!(
                    identity = %caller.id,
                    auth = %caller.source,
                    remote = ?remote,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "issued certificate"
                );
                self.metrics.issued.inc();
                self.metrics.requests_ok.inc();
                self.metrics
                    .duration
                    .observe(started.elapsed().as_secs_f64());
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                let status = e.to_status();
                if status.code() == tonic::Code::Unauthenticated {
                    self.metrics.authn_failures.inc();
                }
                if let Some(kind) = e.istio_error_type() {
                    self.metrics.sign_errors.with_label_values(&[kind]).inc();
                }
                self.metrics
                    .requests
                    .with_label_values(&[&format!("{:?}", status.code())])
                    .inc();
                self.metrics
                    .duration
                    .observe(started.elapsed().as_secs_f64());
                tracing::warn!(
                    code = ?status.code(),
                    remote = ?remote,
                    error = %e,
                    "CreateCertificate refused"
                );
                Err(status)
            }
        }
    }
}
