//! Prometheus metrics and the monitoring HTTP endpoint.
//!
//! istiod's CA metrics are exported under istiod's exact names (no `_total`
//! suffix, as istiod's OpenTelemetry exporter writes them), so dashboards and
//! alerts built for istiod keep working: `citadel_server_csr_count`,
//! `citadel_server_authentication_failure_count`,
//! `citadel_server_csr_sign_err_count{error}`,
//! `citadel_server_success_cert_issuance_count` and the root and chain expiry
//! gauges. meshsign adds `meshsign_requests_total{code}` and the
//! `meshsign_request_duration_seconds` histogram.
//!
//! The endpoint serves `/metrics`, `/healthz/live` and `/healthz/ready`
//! (200 only while the CA's test signing passes, like the gRPC health service).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use time::OffsetDateTime;

use crate::ca::Ca;

/// `meshsign_reloads_total{what}`, taken and refused.
#[derive(Debug, Clone)]
pub struct ReloadCounters {
    pub ok: IntCounter,
    pub refused: IntCounter,
}

/// Every metric meshsign exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub csr_count: IntCounter,
    pub authn_failures: IntCounter,
    pub sign_errors: IntCounterVec,
    pub issued: IntCounter,
    pub requests: IntCounterVec,
    /// `requests{code="OK"}`, resolved once: the hot path only increments.
    pub requests_ok: IntCounter,
    pub duration: Histogram,
    /// `meshsign_token_reviews_total{cluster, result}`: TokenReviews sent.
    pub token_reviews: IntCounterVec,
    /// `meshsign_token_review_cache_total{cluster, lookup}`: hit, miss, joined.
    pub token_review_cache: IntCounterVec,
    /// `meshsign_background_restarts_total{task}`: supervised loops restarted.
    pub background_restarts: IntCounterVec,
    /// `meshsign_reloads_total{what, result}`: reloads of the CA directory,
    /// the serving certificate files and the configuration, taken or refused.
    pub reloads: IntCounterVec,
    /// `meshsign_log_lines_suppressed_total`: refusal log lines over budget.
    pub log_suppressed: IntCounter,
    /// `meshsign_connections_refused_total{reason}`: closed at accept by a limit.
    pub connections_refused: IntCounterVec,
    /// `meshsign_connections_closed_total{reason}`: GOAWAYs meshsign sent
    /// (max_age, idle, stream_budget, reset_budget, refusal_budget, shutdown) and connections
    /// closed when their grace ran out (forced).
    pub connections_closed: IntCounterVec,
    /// `meshsign_requests_refused_early_total{reason}`: calls refused before
    /// the CA service read them (calls_in_flight, body_timeout, too_large, decode,
    /// unimplemented, deadline).
    pub refused_early: IntCounterVec,
    /// `meshsign_requests_shed_total{reason}`: calls refused by a rate limit
    /// or a full signing queue.
    pub shed: IntCounterVec,
    root_expiry: Gauge,
    root_expiry_seconds: Gauge,
    chain_expiry: Gauge,
    chain_expiry_seconds: Gauge,
    ready: Arc<AtomicBool>,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| register(&registry, IntCounter::new(name, help)?);
        let gauge = |name: &str, help: &str| register(&registry, Gauge::new(name, help)?);
        let sign_errors = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "citadel_server_csr_sign_err_count",
                    "The number of errors occurred when signing the CSR.",
                ),
                &["error"],
            )?,
        )?;
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "meshsign_requests_total",
                    "CreateCertificate calls by gRPC status code.",
                ),
                &["code"],
            )?,
        )?;
        let duration = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "meshsign_request_duration_seconds",
                    "Time to answer a CreateCertificate call, from receipt to response.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )?,
        )?;
        let token_reviews = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "meshsign_token_reviews_total",
                    "TokenReviews sent to a cluster's API server, by result \
                     (authenticated, refused, unavailable).",
                ),
                &["cluster", "result"],
            )?,
        )?;
        let token_review_cache = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "meshsign_token_review_cache_total",
                    "Token checks by how the review cache answered: hit (cached result), \
                     joined (a review already in flight), miss (a new review).",
                ),
                &["cluster", "lookup"],
            )?,
        )?;
        let background_restarts = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "meshsign_background_restarts_total",
                    "Background loops (CA reload, JWKS refresh, health, pod watch, ...) that \
                     panicked or ended and were restarted.",
                ),
                &["task"],
            )?,
        )?;
        let reloads = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "meshsign_reloads_total",
                    "Reloads of the CA directory (what=\"ca\"), the serving certificate files \
                     (\"serving_certificate\") and the configuration (\"config\"): \
                     result=\"ok\" taken, \"refused\" kept the previous one.",
                ),
                &["what", "result"],
            )?,
        )?;
        let connections_refused = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "meshsign_connections_refused_total",
                    "Connections accepted and closed at once because a limit was reached \
                     (max_connections, max_handshakes).",
                ),
                &["reason"],
            )?,
        )?;
        let labelled = |name: &str, help: &str, label: &str| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label])?,
            )
        };
        let connections_closed = labelled(
            "meshsign_connections_closed_total",
            "Connections sent a GOAWAY by meshsign, by reason (max_age, idle, stream_budget, refusal_budget, \
             reset_budget, shutdown), and connections closed because their grace ran out (forced).",
            "reason",
        )?;
        let refused_early = labelled(
            "meshsign_requests_refused_early_total",
            "Calls refused before the CA service read them, by reason (calls_in_flight, body_timeout, too_large, \
             decode, unimplemented, deadline).",
            "reason",
        )?;
        let shed = labelled(
            "meshsign_requests_shed_total",
            "CreateCertificate calls refused with RESOURCE_EXHAUSTED, by reason (per_caller, \
             per_node_agent, failed_auth_per_address, signing_queue).",
            "reason",
        )?;
        Ok(Metrics {
            connections_closed,
            refused_early,
            shed,
            connections_refused,
            log_suppressed: counter(
                "meshsign_log_lines_suppressed_total",
                "Refused-request log lines not written because more than the budget (100 a second) came in.",
            )?,
            background_restarts,
            reloads,
            token_reviews,
            token_review_cache,
            csr_count: counter(
                "citadel_server_csr_count",
                "The number of CSRs received by Citadel server.",
            )?,
            authn_failures: counter(
                "citadel_server_authentication_failure_count",
                "The number of authentication failures.",
            )?,
            issued: counter(
                "citadel_server_success_cert_issuance_count",
                "The number of certificates issuances that have succeeded.",
            )?,
            root_expiry: gauge(
                "citadel_server_root_cert_expiry_timestamp",
                "The unix timestamp, in seconds, when the root cert will expire.",
            )?,
            root_expiry_seconds: gauge(
                "citadel_server_root_cert_expiry_seconds",
                "The time remaining, in seconds, before the root cert will expire.",
            )?,
            chain_expiry: gauge(
                "citadel_server_cert_chain_expiry_timestamp",
                "The unix timestamp, in seconds, when the cert chain will expire.",
            )?,
            chain_expiry_seconds: gauge(
                "citadel_server_cert_chain_expiry_seconds",
                "The time remaining, in seconds, before the cert chain will expire.",
            )?,
            sign_errors,
            requests_ok: requests.with_label_values(&["OK"]),
            requests,
            duration,
            registry,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The registry, for modules that register their own metrics (the audit trail).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The restart counter of the supervised task `task`.
    pub fn restarts(&self, task: &str) -> IntCounter {
        self.background_restarts.with_label_values(&[task])
    }

    /// The two reload counters of `what`.
    pub fn reload_counters(&self, what: &str) -> ReloadCounters {
        ReloadCounters {
            ok: self.reloads.with_label_values(&[what, "ok"]),
            refused: self.reloads.with_label_values(&[what, "refused"]),
        }
    }

    /// Records the expiry of `ca`'s first root and of the first certificate
    /// of its chain (what istiod's `RecordCertsExpiry` records).
    pub fn record_ca(&self, ca: &Ca) {
        let first_expiry = |certs: &[rustls_pki_types::CertificateDer<'static>]| {
            certs
                .first()
                .and_then(|c| crate::pki::parse_cert(c).ok())
                .map(|c| c.validity().not_after.timestamp())
        };
        if let Some(t) = first_expiry(&ca.bundle().roots) {
            self.root_expiry.set(t as f64);
        }
        let chain = &ca.bundle().chain;
        if let Some(t) = first_expiry(chain) {
            self.chain_expiry.set(t as f64);
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The exposition, with the derived "seconds left" gauges brought up to date.
    pub fn render(&self) -> String {
        let now = OffsetDateTime::now_utc().unix_timestamp() as f64;
        self.root_expiry_seconds.set(self.root_expiry.get() - now);
        if self.chain_expiry.get() > 0.0 {
            self.chain_expiry_seconds.set(self.chain_expiry.get() - now);
        }
        let mut out = Vec::with_capacity(4096);
        // Encoding our own registry into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves the monitoring endpoint on `listener` until the process ends.
pub async fn serve(listener: Arc<tokio::net::TcpListener>, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MONITORING_MAX_CONNECTIONS));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        // Over the limit: accepted and closed at once, never left hanging.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&req, &metrics)) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(MONITORING_HEADER_TIMEOUT);
            // A scrape takes milliseconds; nothing may hold a connection for long.
            let _ = tokio::time::timeout(
                MONITORING_CONNECTION_LIFETIME,
                http.serve_connection(TokioIo::new(tcp), service),
            )
            .await;
        });
    }
}

/// Connections the monitoring endpoint serves at once.
pub const MONITORING_MAX_CONNECTIONS: usize = 64;
/// Deadline for a request's headers (also while a kept-alive connection idles).
pub const MONITORING_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest life of one monitoring connection.
pub const MONITORING_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

fn route(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz/live" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/healthz/ready" if metrics.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", "ok\n".to_owned())
        }
        "/healthz/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "CA self-test failing or not run yet\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Registers `metric` in `registry` and hands it back.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}
