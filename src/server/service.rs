//! The `IstioCertificateService` implementation: one request through
//! auth → csr → policy → ca, and the response in istiod's shape.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::conn::ReachedService;
use super::tls::PeerInfo;
use crate::audit::{AuditLog, AuditUnavailable, Decision, Outcome};
use crate::auth::{Authenticator, CallerIdentity, Credentials};
use crate::ca::pool::SigningPool;
use crate::ca::{Ca, LeafSpec, SanEntry};
use crate::clock::{Clock, SystemClock};
use crate::csr::{self, KeyPolicy};
use crate::error::RequestError;
use crate::k8s::node_auth::{NodeAuthError, NodeAuthorizer};
use crate::logging::LineBudget;
use crate::metrics::Metrics;
use crate::pki;
use crate::policy::Policy;
use crate::proto::istio_certificate_service_server::IstioCertificateService;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse};
use crate::ratelimit::{self, RateLimiter, Spent};
use crate::spiffe::SpiffeId;

/// Struct key istiod reads for node impersonation (ztunnel).
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Header istio-agent and ztunnel name their cluster with (`ClusterID`, lower-cased by gRPC).
const CLUSTER_ID: &str = "clusterid";
/// Longest Common Name X.509 allows; istiod omits a longer dual-use CN.
const MAX_CN_LEN: usize = 64;

/// What a request is judged by: who may authenticate how, what may be
/// asked for, and how often. A configuration reload (`SIGHUP`) swaps it
/// whole; each request reads it once, so a request is judged by one
/// version from start to end.
#[derive(Debug, Clone)]
pub struct Rules {
    pub authenticator: Authenticator,
    /// Trusted node accounts (ztunnel); `None`: impersonation is refused.
    pub node_authorizer: Option<NodeAuthorizer>,
    pub policy: Policy,
    pub key_policy: KeyPolicy,
    /// Per-caller, per-node-agent and failed-authentication budgets.
    pub limiter: Arc<RateLimiter>,
}

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct CertificateService {
    ca: Arc<ArcSwap<Ca>>,
    rules: ArcSwap<Rules>,
    /// Signer threads for slow (RSA) keys, one per core, off the reactor.
    signers: SigningPool,
    allow_plaintext: bool,
    metrics: Arc<Metrics>,
    /// Refusals are caused by strangers: their log lines have a budget
    /// (shared with the connection layer's refusals).
    refusal_log: Arc<LineBudget>,
    /// The audit trail: one record per decision (`None`: off).
    audit: Option<Arc<AuditLog>>,
}

/// Signatures that may wait for a signer thread unless configured otherwise.
const DEFAULT_SIGNING_QUEUE: usize = 4096;

/// Refused-request log lines written per second at most.
pub const REFUSAL_LOG_PER_SECOND: u32 = 100;

impl CertificateService {
    pub fn new(
        ca: Arc<ArcSwap<Ca>>,
        authenticator: Authenticator,
        policy: Policy,
        key_policy: KeyPolicy,
        allow_plaintext: bool,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            ca,
            rules: ArcSwap::from_pointee(Rules {
                authenticator,
                node_authorizer: None,
                policy,
                key_policy,
                limiter: Arc::new(RateLimiter::disabled()),
            }),
            signers: SigningPool::new(signer_threads(), DEFAULT_SIGNING_QUEUE)?,
            allow_plaintext,
            metrics,
            refusal_log: Arc::new(LineBudget::new(REFUSAL_LOG_PER_SECOND)),
            audit: None,
        })
    }

    /// Records every decision in `audit`.
    pub fn with_audit(mut self, audit: Option<Arc<AuditLog>>) -> Self {
        self.audit = audit;
        self
    }

    /// Applies the configured signing queue bound and rate limits.
    pub fn with_limits(
        mut self,
        max_signing_queue: usize,
        rate_limits: &crate::config::RateLimits,
    ) -> std::io::Result<Self> {
        self.signers = SigningPool::new(signer_threads(), max_signing_queue)?;
        let limiter = Arc::new(RateLimiter::new(rate_limits));
        self.update_rules(|r| r.limiter = limiter);
        Ok(self)
    }

    /// The rules requests are judged by now.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// Judges every request that starts from now on by `rules` (requests
    /// in progress finish under the rules they started with).
    pub fn set_rules(&self, rules: Rules) {
        self.rules.store(Arc::new(rules));
    }

    fn update_rules(&mut self, change: impl FnOnce(&mut Rules)) {
        let mut rules = Rules::clone(&self.rules.load());
        change(&mut rules);
        self.set_rules(rules);
    }

    /// The refusal-log budget, for the connection layer to share.
    pub fn refusal_log(&self) -> Arc<LineBudget> {
        self.refusal_log.clone()
    }

    /// Lets the trusted node accounts impersonate pods on their node.
    pub fn with_node_authorizer(mut self, authorizer: NodeAuthorizer) -> Self {
        self.update_rules(|r| r.node_authorizer = (!authorizer.is_empty()).then_some(authorizer));
        self
    }

    /// Everything that reads the request: authentication, node
    /// authorization, CSR checks, policy and TTL. Returns only what signing
    /// needs, so the request (token, CSR PEM, headers) can be dropped before
    /// a request waits for a signing slot.
    pub async fn authorize(
        &self,
        peer: Option<&PeerInfo>,
        metadata: &MetadataMap,
        request: &IstioCertificateRequest,
    ) -> Result<(CallerIdentity, Option<SpiffeId>, SigningJob), RequestError> {
        self.authorize_noting(peer, metadata, request, &mut RefusalFacts::default())
            .await
    }

    /// [`Self::authorize`], noting in `refusal` what a refusal's audit
    /// record needs (the caller once authenticated, the identity asked for).
    pub async fn authorize_noting(
        &self,
        peer: Option<&PeerInfo>,
        metadata: &MetadataMap,
        request: &IstioCertificateRequest,
        refusal: &mut RefusalFacts,
    ) -> Result<(CallerIdentity, Option<SpiffeId>, SigningJob), RequestError> {
        // A request without connection info is treated as plaintext (fail closed).
        if !peer.is_some_and(|p| p.tls) && !self.allow_plaintext {
            return Err(RequestError::PlaintextRefused);
        }
        let rules = self.rules.load_full();
        let now_ms = ratelimit::now_ms();
        // An address that keeps failing to authenticate waits before any
        // token of its is checked again; a verified client certificate has
        // already proved itself at the handshake.
        if let Some(ip) = peer.and_then(|p| p.remote).map(|a| a.ip()) {
            let has_certificate = peer.is_some_and(|p| p.client_chain.is_some());
            if !has_certificate && !rules.limiter.address_may_try(ip, now_ms) {
                return Err(RequestError::RateLimited(Spent::FailedAuthentications));
            }
        }
        let client_chain = peer.and_then(|p| p.client_chain.as_deref());
        // The roots in use now, for a client chain verified under older ones.
        let ca = client_chain.map(|_| self.ca.load_full());
        let creds = Credentials {
            bearer_token: bearer_token(metadata),
            client_chain,
            roots: ca.as_deref().map(Ca::trusted_roots),
            cluster_id: cluster_id(metadata),
        };
        let caller = match rules.authenticator.authenticate(creds).await {
            Ok(caller) => caller,
            Err(e) if e.unavailable => return Err(RequestError::AuthUnavailable(e)),
            Err(e) => return Err(RequestError::Unauthenticated(e)),
        };
        match authorize_caller(&rules, &caller, client_chain, request, now_ms, refusal) {
            Ok((impersonated, job)) => Ok((caller, impersonated, job)),
            Err(e) => {
                refusal.caller = Some(caller);
                Err(e)
            }
        }
    }

    /// Signs an authorized job and builds the response elements. RSA
    /// signatures run on the blocking pool, at most one per core at a time.
    pub async fn sign(&self, job: SigningJob) -> Result<Vec<String>, RequestError> {
        self.sign_leaf(job).await.map(|(chain, _)| chain)
    }

    /// [`Self::sign`], also returning the leaf (for its audit record).
    async fn sign_leaf(
        &self,
        job: SigningJob,
    ) -> Result<(Vec<String>, rustls_pki_types::CertificateDer<'static>), RequestError> {
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
            match self.signers.sign(ca.clone(), sign).await {
                Err(e @ crate::ca::SignError::Overloaded { .. }) => {
                    return Err(RequestError::Overloaded(e))
                }
                other => other?,
            }
        } else {
            sign(&ca)?
        };

        let tail = ca.response_tail();
        let mut chain = Vec::with_capacity(tail.len() + 1);
        chain.push(pki::cert_pem(&leaf));
        chain.extend(tail.iter().cloned());
        Ok((chain, leaf))
    }

    /// Signs, and records the issuance. With `audit.on_failure: refuse` a
    /// queue slot is reserved before signing and the certificate is
    /// returned only once its record is written.
    async fn issue(
        &self,
        caller: CallerIdentity,
        impersonated: Option<SpiffeId>,
        job: SigningJob,
        remote: Option<std::net::SocketAddr>,
    ) -> Result<(CallerIdentity, Option<SpiffeId>, Vec<String>), (RequestError, RefusalFacts)> {
        let slot = match self.audit.as_deref() {
            Some(audit) if audit.refuses() => match audit.reserve() {
                Ok(slot) => Some(slot),
                Err(e) => return Err((e.into(), RefusalFacts::of(caller, impersonated))),
            },
            _ => None,
        };
        let (chain, leaf) = match self.sign_leaf(job).await {
            Ok(signed) => signed,
            Err(e) => return Err((e, RefusalFacts::of(caller, impersonated))),
        };
        if let Some(audit) = &self.audit {
            let decision = Decision {
                time: SystemTime::now(),
                outcome: Outcome::Issued { leaf },
                code: tonic::Code::Ok,
                reason: None,
                caller: Some(caller.id.to_string()),
                auth: Some(caller.source.clone()),
                pod: caller.pod.clone(),
                remote,
                requested: Some(impersonated.as_ref().unwrap_or(&caller.id).to_string()),
                impersonated: impersonated.is_some(),
            };
            match slot {
                Some(slot) => {
                    if !audit.commit(slot, decision).await {
                        let e = AuditUnavailable::WriteFailed.into();
                        return Err((e, RefusalFacts::of(caller, impersonated)));
                    }
                }
                None => audit.record(decision, false),
            }
        }
        Ok((caller, impersonated, chain))
    }

    /// The audit record of a refusal (without waiting for it).
    fn record_refusal(
        &self,
        e: &RequestError,
        code: tonic::Code,
        facts: RefusalFacts,
        remote: Option<std::net::SocketAddr>,
    ) {
        let Some(audit) = &self.audit else {
            return;
        };
        let caller = facts.caller.as_ref();
        audit.record(
            Decision {
                time: SystemTime::now(),
                outcome: Outcome::Refused,
                code,
                reason: Some(crate::audit::record::scrub_reason(&e.to_string())),
                caller: caller.map(|c| c.id.to_string()),
                auth: caller.map(|c| c.source.clone()),
                pod: caller.and_then(|c| c.pod.clone()),
                remote,
                requested: facts.requested,
                impersonated: facts.impersonated,
            },
            caller.is_none(),
        );
    }
}

/// [`CertificateService::authorize`] once the caller is known.
fn authorize_caller(
    rules: &Rules,
    caller: &CallerIdentity,
    client_chain: Option<&crate::auth::ClientChain>,
    request: &IstioCertificateRequest,
    now_ms: u64,
    refusal: &mut RefusalFacts,
) -> Result<(Option<SpiffeId>, SigningJob), RequestError> {
    let requested = impersonated_identity(request);
    let instance = match caller.source {
        crate::auth::AuthSource::ClientCertificate => client_chain.map(|c| c.leaf().as_ref()),
        _ => None,
    };
    rules
        .limiter
        .admit(caller, instance, requested.is_some(), now_ms)
        .map_err(RequestError::RateLimited)?;

    // The identity the leaf is for: the caller's own, or (ztunnel) the
    // pod identity it impersonates. Either way the CSR must ask for
    // exactly it, and the policy rules apply to it.
    let impersonated = match requested {
        None => None,
        Some(requested) => Some(authorize_impersonation(rules, caller, requested)?),
    };
    let subject = impersonated.as_ref().unwrap_or(&caller.id);

    let csr = csr::validate(&request.csr, &rules.key_policy)?;
    rules
        .policy
        .authorize(subject, &csr.identity)
        .inspect_err(|_| refusal.requested = Some(csr.identity.to_string()))?;
    let now = OffsetDateTime::now_utc();
    let (not_before, not_after) = rules.policy.validity(request.validity_duration, now)?;
    let uri = csr.identity.to_string();
    let common_name = (csr.wants_common_name && uri.len() <= MAX_CN_LEN).then(|| uri.clone());
    Ok((
        impersonated,
        SigningJob {
            spki_der: csr.spki_der,
            common_name,
            sans: [SanEntry::Uri(uri)],
            not_before,
            not_after,
        },
    ))
}

/// Node authorization for an `ImpersonatedIdentity` request.
fn authorize_impersonation(
    rules: &Rules,
    caller: &CallerIdentity,
    requested: &str,
) -> Result<SpiffeId, RequestError> {
    let Some(authorizer) = &rules.node_authorizer else {
        let shown: String = requested.chars().take(120).collect();
        return Err(RequestError::Impersonation(NodeAuthError::NotConfigured {
            caller: caller.id.to_string(),
            requested: shown,
        }));
    };
    let cluster = caller.cluster.as_deref();
    authorizer
        .authorize(
            caller,
            cluster.map_or("", |c| c.id.as_str()),
            cluster.and_then(|c| c.pods.as_deref()),
            requested,
            &rules.policy.trust_domain,
        )
        .map_err(|e| {
            if e.is_transient() {
                RequestError::ImpersonationUnavailable(e)
            } else {
                RequestError::Impersonation(e)
            }
        })
}

/// What is known of a refused request, for its audit record.
#[derive(Debug, Default)]
pub struct RefusalFacts {
    /// Set once the caller authenticated.
    pub caller: Option<CallerIdentity>,
    /// The identity asked for, when known.
    pub requested: Option<String>,
    pub impersonated: bool,
}

impl RefusalFacts {
    fn of(caller: CallerIdentity, impersonated: Option<SpiffeId>) -> Self {
        Self {
            requested: Some(impersonated.as_ref().unwrap_or(&caller.id).to_string()),
            impersonated: impersonated.is_some(),
            caller: Some(caller),
        }
    }
}

/// One signer thread per core.
fn signer_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
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

/// The non-empty `ImpersonatedIdentity` string in the request metadata.
fn impersonated_identity(request: &IstioCertificateRequest) -> Option<&str> {
    request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str()),
            _ => None,
        })
}

/// The `clusterid` header as istiod reads it: exactly one value, else "".
fn cluster_id(metadata: &MetadataMap) -> &str {
    let mut values = metadata.get_all(CLUSTER_ID).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().unwrap_or(""),
        _ => "",
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
        self.metrics.csr_count.inc();
        let started = Instant::now();
        let reached = request.extensions().get::<ReachedService>().cloned();
        if let Some(r) = &reached {
            r.mark();
        }
        let peer = request.extensions().get::<Arc<PeerInfo>>().map(|p| &**p);
        let remote = peer.and_then(|p| p.remote);
        let mut refusal = RefusalFacts::default();
        let authorized = self
            .authorize_noting(peer, request.metadata(), request.get_ref(), &mut refusal)
            .await;
        if authorized.is_err() && self.audit.is_some() {
            if let Some(id) = impersonated_identity(request.get_ref()) {
                refusal.impersonated = true;
                refusal.requested = Some(id.chars().take(120).collect());
            }
        }
        // The request (token, CSR, headers) is not needed any more; a request
        // waiting for a signing slot holds only its small SigningJob.
        drop(request);
        let result = match authorized {
            Ok((caller, impersonated, job)) => self.issue(caller, impersonated, job, remote).await,
            Err(e) => Err((e, refusal)),
        };
        match result {
            Ok((caller, impersonated, cert_chain)) => {
                // For ztunnel: the identity issued, and who asked for it.
                tracing::info!(
                    identity = %impersonated.as_ref().unwrap_or(&caller.id),
                    impersonated_by = impersonated.is_some().then_some(&caller.id).map(tracing::field::display),
                    auth = %caller.source,
                    pod = caller.pod.as_ref().map(|p| p.name.as_str()),
                    remote = remote.map(tracing::field::display),
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
            Err((e, refusal)) => {
                let status = e.to_status();
                self.record_refusal(&e, status.code(), refusal, remote);
                if e.is_authentication_failure() {
                    self.metrics.authn_failures.inc();
                    if let Some(addr) = remote {
                        self.rules
                            .load()
                            .limiter
                            .failed_authentication(addr.ip(), ratelimit::now_ms());
                    }
                }
                match &e {
                    RequestError::RateLimited(spent) => {
                        self.metrics.shed.with_label_values(&[spent.label()]).inc()
                    }
                    RequestError::Overloaded(_) => {
                        if let Some(r) = &reached {
                            r.mark_overloaded();
                        }
                        self.metrics
                            .shed
                            .with_label_values(&["signing_queue"])
                            .inc()
                    }
                    _ => {}
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
                match self.refusal_log.admit(SystemClock.now_unix()) {
                    Some(suppressed) => tracing::warn!(
                        code = ?status.code(),
                        remote = remote.map(tracing::field::display),
                        error = %e,
                        suppressed_before = suppressed,
                        "CreateCertificate refused"
                    ),
                    None => self.metrics.log_suppressed.inc(),
                }
                Err(status)
            }
        }
    }
}
