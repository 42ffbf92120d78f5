//! The `IstioCertificateService` implementation: one request through
//! auth → csr → policy → ca, and the response in istiod's shape.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::tls::PeerInfo;
use crate::auth::{Authenticator, CallerIdentity, Credentials};
use crate::ca::{Ca, LeafSpec, SanEntry};
use crate::csr::{self, KeyPolicy};
use crate::error::RequestError;
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
    /// Bounds concurrent slow (RSA) signings to the number of cores, off the reactor.
    slow_signing: Arc<Semaphore>,
    allow_plaintext: bool,
}

impl CertificateService {
    pub fn new(
        ca: Arc<ArcSwap<Ca>>,
        authenticator: Authenticator,
        policy: Policy,
        key_policy: KeyPolicy,
        allow_plaintext: bool,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            ca,
            authenticator,
            policy,
            key_policy,
            slow_signing: Arc::new(Semaphore::new(cores)),
            allow_plaintext,
        }
    }

    /// Handles one request after the transport: the whole pipeline.
    pub async fn issue(
        &self,
        peer: Option<&PeerInfo>,
        metadata: &MetadataMap,
        request: &IstioCertificateRequest,
    ) -> Result<(CallerIdentity, Vec<String>), RequestError> {
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

        let ca = self.ca.load_full();
        let uri = csr.identity.to_string();
        let common_name = (csr.wants_common_name && uri.len() <= MAX_CN_LEN).then(|| uri.clone());
        let sans = [SanEntry::Uri(uri)];
        let sign = move |ca: &Ca| {
            ca.sign(&LeafSpec {
                spki_der: &csr.spki_der,
                common_name: common_name.as_deref(),
                sans: &sans,
                not_before,
                not_after,
            })
        };
        let leaf = if ca.scheme().is_slow() {
            // The permit travels with the signing itself, so a cancelled
            // request cannot free its slot while the signature still runs.
            let permit = self
                .slow_signing
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| RequestError::Internal(e.to_string()))?;
            let ca = ca.clone();
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                sign(&ca)
            })
            .await
            .map_err(|e| RequestError::Internal(e.to_string()))??
        } else {
            sign(&ca)?
        };

        let tail = ca.response_tail();
        let mut chain = Vec::with_capacity(tail.len() + 1);
        chain.push(pki::cert_pem(&leaf));
        chain.extend(tail.iter().cloned());
        Ok((caller, chain))
    }
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
        let started = Instant::now();
        let peer = request.extensions().get::<PeerInfo>();
        let remote = peer.and_then(|p| p.remote);
        match self
            .issue(peer, request.metadata(), request.get_ref())
            .await
        {
            Ok((caller, cert_chain)) => {
                tracing::info!(
                    identity = %caller.id,
                    auth = %caller.source,
                    remote = ?remote,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "issued certificate"
                );
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                let status = e.to_status();
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
