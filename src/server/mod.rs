//! The running server: assembles the CA, the authenticators and the policy
//! from a validated [`Config`], serves gRPC on one listener (the CA service,
//! the standard health service and server reflection), and keeps the serving
//! certificate and the health status fresh in the background.
//!
//! Health is real: the CA service reports `SERVING` only while a test signing
//! verifies against the roots (checked at start and every 30 seconds).

mod coalesce;
pub mod service;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;

use crate::auth::jwt::JwksSource;
use crate::auth::{Authenticator, JwtAuthenticator, JwtIssuer};
use crate::ca::dev::{self, DevCaState};
use crate::ca::{Ca, LeafSpec, SanEntry};
use crate::config::{CaSource, Config, JwksLocation, ServerTls};
use crate::k8s::node_auth::NodeAuthorizer;
use crate::k8s::TokenCheck;
use crate::proto::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::supervise;
use crate::token::{DevTokenIssuer, DEFAULT_AUDIENCE, DEV_ISSUER};

pub use service::CertificateService;
pub use tls::{PeerInfo, ServingCertificate};

/// Why the server could not start. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("CA bundle: {0}")]
    Bundle(#[from] crate::ca::BundleError),
    #[error("dev token issuer: {0}")]
    DevIssuer(String),
    #[error("JWT issuer {issuer}: {reason}")]
    Jwks { issuer: String, reason: String },
    #[error("serving certificate: {0}")]
    ServingCertificate(String),
    #[error("metrics: {0}")]
    Monitoring(String),
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::ClusterError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    pub local_addr: SocketAddr,
    /// The monitoring endpoint, when configured.
    pub monitoring_addr: Option<SocketAddr>,
    /// The trust bundle clients must use.
    pub roots_pem: String,
    pub dev: Option<DevCaState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn shutdown(mut self) -> Result<(), String> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Waits until the server stops.
    pub async fn wait(&mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Builds everything from `config` and starts serving.
pub async fn start(config: &Config) -> Result<RunningServer, StartError> {
    // reqwest (JWKS over HTTPS) uses the process-wide rustls provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let now = OffsetDateTime::now_utc();

    let (ca, dev_state) = match &config.ca {
        CaSource::Dir(dir) => (Ca::load(dir, now)?, None),
        CaSource::Dev => {
            let (ca, state) = dev::ensure(&config.state_dir, config.trust_domain(), now)?;
            (ca, Some(state))
        }
    };
    log_bundle(&ca);
    let metrics = Arc::new(
        crate::metrics::Metrics::new().map_err(|e| StartError::Monitoring(e.to_string()))?,
    );
    metrics.record_ca(&ca);
    let roots_pem = ca.roots_pem().to_owned();
    let client_roots = ca.bundle().roots.clone();
    let ca = Arc::new(ArcSwap::from_pointee(ca));
    let ca_changed = Arc::new(tokio::sync::Notify::new());
    // The current root bundle, for whoever publishes it (root ConfigMaps).
    let roots_tx = Arc::new(tokio::sync::watch::channel(roots_pem.clone()).0);
    if let CaSource::Dir(dir) = &config.ca {
        if !config.ca_reload_interval.is_zero() {
            let (dir, ca, every, changed) = (
                dir.clone(),
                ca.clone(),
                config.ca_reload_interval,
                ca_changed.clone(),
            );
            supervise::spawn("ca-reload", metrics.restarts("ca-reload"), move || {
                crate::ca::reload::watch(dir.clone(), ca.clone(), every, changed.clone())
            });
        }
    }

    let issuers = jwt_issuers(config).await?;
    let mut trust_domains = vec![config.policy.trust_domain.clone()];
    trust_domains.extend(config.policy.trust_domain_aliases.iter().cloned());
    let mut authenticator = Authenticator::new(
        config.authn.client_certificates,
        trust_domains,
        JwtAuthenticator::new(issuers.clone(), config.policy.trust_domain.clone()),
    );
    let mut node_authorizer = NodeAuthorizer::default();
    // Readiness waits for every pod watch's first list, as istiod waits for
    // its informers: a replica that cannot answer ztunnel yet takes no traffic.
    let mut pod_caches = Vec::new();
    if let Some(k) = &config.kubernetes {
        let clusters = crate::k8s::build(
            k,
            &issuers,
            config.trust_domain(),
            Arc::new(crate::clock::SystemClock),
            &metrics,
        )
        .await?;
        for c in clusters.all() {
            tracing::info!(
                cluster = %c.id,
                aliases = ?c.aliases,
                tokens = match c.tokens { TokenCheck::TokenReview(_) => "tokenreview", TokenCheck::Jwt(_) => "jwt" },
                node_authorization = c.pods.is_some(),
                "kubernetes cluster configured"
            );
        }
        if let Some(publisher) = &k.root_publisher {
            for c in clusters.all() {
                let (client, id, publisher, roots) = (
                    c.client.clone(),
                    c.id.clone(),
                    publisher.clone(),
                    roots_tx.clone(),
                );
                supervise::spawn(
                    "root-publisher",
                    metrics.restarts("root-publisher"),
                    move || {
                        crate::k8s::roots::run(
                            client.clone(),
                            id.clone(),
                            publisher.clone(),
                            roots.subscribe(),
                        )
                    },
                );
            }
        }
        pod_caches = clusters
            .all()
            .iter()
            .filter_map(|c| c.pods.clone().map(|p| (c.id.clone(), p)))
            .collect();
        node_authorizer = NodeAuthorizer::new(k.trusted_node_accounts.iter().cloned());
        authenticator = authenticator.with_clusters(Arc::new(clusters));
    }
    for issuer in issuers {
        let refresh = config
            .authn
            .jwt
            .iter()
            .find(|j| j.issuer == issuer.issuer)
            .map_or(Duration::from_secs(300), |j| j.refresh);
        supervise::spawn(
            "jwks-refresh",
            metrics.restarts("jwks-refresh"),
            move || refresh_jwks(issuer.clone(), refresh),
        );
    }

    let tls = match &config.server_tls {
        ServerTls::InsecurePlaintext => {
            tracing::warn!(
                "serving PLAINTEXT gRPC (server_tls.insecure_plaintext): for debugging only"
            );
            None
        }
        other => {
            let serving = serving_certificate(other, &ca.load())?;
            if let ServerTls::Issued { .. } = other {
                let (serving, ca, settings, changed) = (
                    serving.clone(),
                    ca.clone(),
                    other.clone(),
                    ca_changed.clone(),
                );
                supervise::spawn(
                    "serving-certificate",
                    metrics.restarts("serving-certificate"),
                    move || {
                        renew_serving_certificate(
                            serving.clone(),
                            ca.clone(),
                            settings.clone(),
                            changed.clone(),
                        )
                    },
                );
            }
            let cfg = tls::server_config(serving, &client_roots, config.authn.client_certificates)
                .map_err(StartError::ServingCertificate)?;
            Some(Arc::new(cfg))
        }
    };
    let plaintext = tls.is_none();

    let listener =
        listen(config.listen, config.limits.listen_backlog).map_err(|e| StartError::Listen {
            addr: config.listen,
            reason: e.to_string(),
        })?;
    let local_addr = listener.local_addr().map_err(|e| StartError::Listen {
        addr: config.listen,
        reason: e.to_string(),
    })?;
    let incoming = tls::incoming(
        listener,
        tls,
        tls::ConnLimits {
            handshake_timeout: config.limits.handshake_timeout,
            max_connections: config.limits.max_connections,
            max_handshakes: config.limits.max_concurrent_handshakes,
            refused: metrics.connections_refused.clone(),
        },
    );

    let service = Arc::new(
        CertificateService::new(
            ca.clone(),
            authenticator,
            config.policy.clone(),
            config.key_policy.clone(),
            plaintext,
            metrics.clone(),
        )
        .map_err(|e| StartError::ServingCertificate(format!("cannot start signer threads: {e}")))?
        .with_node_authorizer(node_authorizer),
    );
    let ca_service = IstioCertificateServiceServer::new(service)
        .max_decoding_message_size(config.limits.max_request_bytes);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    {
        let (ca, m) = (ca.clone(), metrics.clone());
        supervise::spawn("health", metrics.restarts("health"), move || {
            watch_health(
                health_reporter.clone(),
                ca.clone(),
                m.clone(),
                pod_caches.clone(),
            )
        });
    }
    {
        // Expiry gauges and the published roots follow CA reloads.
        let (ca, m, changed) = (ca.clone(), metrics.clone(), ca_changed.clone());
        supervise::spawn("ca-gauges", metrics.restarts("ca-gauges"), move || {
            let (ca, metrics, changed, roots_tx) =
                (ca.clone(), m.clone(), changed.clone(), roots_tx.clone());
            async move {
                loop {
                    changed.notified().await;
                    let current = ca.load();
                    metrics.record_ca(&current);
                    roots_tx.send_if_modified(|roots| {
                        let changed = roots.as_str() != current.roots_pem();
                        if changed {
                            *roots = current.roots_pem().to_owned();
                        }
                        changed
                    });
                }
            }
        });
    }
    let monitoring_addr = match config.monitoring_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Listen {
                    addr,
                    reason: e.to_string(),
                })?;
            let bound = listener.local_addr().ok();
            let (listener, m) = (Arc::new(listener), metrics.clone());
            supervise::spawn("monitoring", metrics.restarts("monitoring"), move || {
                crate::metrics::serve(listener.clone(), m.clone())
            });
            if let Some(a) = bound {
                tracing::info!(addr = %a, "metrics and health on http://{a}/metrics, /healthz/ready");
            }
            bound
        }
        None => None,
    };

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::ServingCertificate(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| StartError::ServingCertificate(format!("reflection: {e}")))?;

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if !config.limits.max_connection_age.is_zero() {
        // Bounds how long one handshake's identity, roots and settings live
        // on; gRPC clients reconnect transparently after the GOAWAY.
        builder = builder
            .max_connection_age(config.limits.max_connection_age)
            .max_connection_age_grace(config.limits.max_connection_age_grace);
    }
    let router = builder
        .max_concurrent_streams(config.limits.max_concurrent_streams)
        .timeout(config.limits.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(ca_service)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = shutdown_rx.await;
    }));
    tracing::info!(
        addr = %local_addr,
        tls = !plaintext,
        trust_domain = config.trust_domain(),
        "listening on {local_addr}"
    );
    Ok(RunningServer {
        local_addr,
        monitoring_addr,
        roots_pem,
        dev: dev_state,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// A listener with a listen queue of `backlog` (tokio's `bind` asks for
/// 1024; a renewal storm's connects must not overflow the kernel's queue).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

fn log_bundle(ca: &Ca) {
    let b = ca.bundle();
    tracing::info!(
        dir = %b.dir.display(),
        layout = %b.layout,
        key = %b.key_kind,
        chain = b.chain.len(),
        roots = b.roots.len(),
        signer_expires = %b.not_after,
        "CA bundle loaded and verified"
    );
    if let Some(warning) = crate::ca::bundle::key_file_exposure(&b.dir, b.layout) {
        tracing::warn!("{warning}");
    }
}

async fn jwt_issuers(config: &Config) -> Result<Vec<Arc<JwtIssuer>>, StartError> {
    let skew = config.authn.clock_skew;
    let mut out = Vec::new();
    if config.ca == CaSource::Dev && !config.authn.jwt.iter().any(|j| j.issuer == DEV_ISSUER) {
        let dev =
            DevTokenIssuer::load_or_create(&config.state_dir).map_err(StartError::DevIssuer)?;
        let issuer = JwtIssuer::new(
            DEV_ISSUER.to_owned(),
            vec![DEFAULT_AUDIENCE.to_owned()],
            JwksSource::File(dev.jwks_path()),
            skew,
        );
        issuer
            .set_jwks(dev.jwks().as_bytes(), None)
            .map_err(StartError::DevIssuer)?;
        tracing::warn!(
            jwks = %dev.jwks_path().display(),
            "dev mode: trusting the local token issuer {DEV_ISSUER:?}, whose key is in the state directory; \
             configure `ca.dir` for anything but development"
        );
        out.push(Arc::new(issuer));
    }
    for j in &config.authn.jwt {
        let source = match &j.jwks {
            JwksLocation::File(path) => JwksSource::File(path.clone()),
            JwksLocation::Uri {
                url,
                ca_file,
                bearer_token_file,
            } => JwksSource::Uri {
                url: url.clone(),
                client: crate::auth::jwt::jwks_http_client(ca_file.as_deref()).map_err(
                    |reason| StartError::Jwks {
                        issuer: j.issuer.clone(),
                        reason,
                    },
                )?,
                bearer_token_file: bearer_token_file.clone(),
            },
        };
        let issuer = JwtIssuer::new(j.issuer.clone(), j.audiences.clone(), source, skew);
        match issuer.refresh().await {
            Ok(n) => tracing::info!(issuer = %j.issuer, keys = n, "JWKS loaded"),
            // A file is under the operator's control: fail fast. A URL may be
            // briefly unreachable: keep trying in the background.
            Err(reason) if matches!(j.jwks, JwksLocation::File(_)) => {
                return Err(StartError::Jwks {
                    issuer: j.issuer.clone(),
                    reason,
                })
            }
            Err(reason) => {
                tracing::error!(issuer = %j.issuer, %reason, "JWKS not loaded yet; retrying")
            }
        }
        out.push(Arc::new(issuer));
    }
    Ok(out)
}

async fn refresh_jwks(issuer: Arc<JwtIssuer>, every: Duration) {
    let mut last_forced = tokio::time::Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = issuer.refresh_requested() => {
                // A token named an unknown key: refresh, at most every 10 s.
                if last_forced.elapsed() < Duration::from_secs(10) {
                    continue;
                }
                last_forced = tokio::time::Instant::now();
            }
        }
        if let Err(reason) = issuer.refresh().await {
            tracing::warn!(issuer = %issuer.issuer, %reason, "JWKS refresh failed; keeping the previous keys");
        }
    }
}

/// Issues (or loads) the serving certificate for the configured mode.
fn serving_certificate(mode: &ServerTls, ca: &Ca) -> Result<Arc<ServingCertificate>, StartError> {
    let key = match mode {
        ServerTls::Issued { .. } => issue_serving_key(mode, ca).map(|(key, _)| key),
        ServerTls::Files { cert, key } => load_serving_files(cert, key),
        ServerTls::InsecurePlaintext => Err("plaintext has no certificate".into()),
    }
    .map_err(StartError::ServingCertificate)?;
    Ok(ServingCertificate::new(key))
}

fn load_serving_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::sign::CertifiedKey, String> {
    let chain_pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let chain = crate::pki::parse_certificates_nonempty(&chain_pem)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key_pem = std::fs::read_to_string(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let block = ::pem::parse(&key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
    let der = match block.tag() {
        "PRIVATE KEY" => PrivateKeyDer::Pkcs8(block.into_contents().into()),
        "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(block.into_contents().into()),
        "EC PRIVATE KEY" => PrivateKeyDer::Sec1(block.into_contents().into()),
        other => return Err(format!("{}: unexpected PEM block {other:?}", key.display())),
    };
    tls::certified_key(chain, der)
}

/// A fresh P-256 key and a certificate for the configured names, signed by the
/// CA and presented with the chain up to (not including) the root.
fn issue_serving_key(
    mode: &ServerTls,
    ca: &Ca,
) -> Result<(rustls::sign::CertifiedKey, OffsetDateTime), String> {
    let ServerTls::Issued {
        dns_names,
        ip_addresses,
        ttl,
    } = mode
    else {
        return Err("not an issued serving certificate".into());
    };
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let sans: Vec<SanEntry> = dns_names
        .iter()
        .cloned()
        .map(SanEntry::Dns)
        .chain(ip_addresses.iter().copied().map(SanEntry::Ip))
        .collect();
    let now = OffsetDateTime::now_utc();
    let leaf = ca
        .sign(&LeafSpec {
            spki_der: &spki,
            common_name: None,
            sans: &sans,
            not_before: now - time::Duration::minutes(5),
            not_after: now + *ttl,
        })
        .map_err(|e| e.to_string())?;
    let roots = &ca.bundle().roots;
    let mut chain: Vec<CertificateDer<'static>> = vec![leaf];
    chain.extend(
        ca.bundle()
            .chain
            .iter()
            .filter(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()))
            .cloned(),
    );
    let not_after = crate::pki::parse_cert(&chain[0])?
        .validity()
        .not_after
        .to_datetime();
    let key = tls::certified_key(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))?;
    Ok((key, not_after))
}

/// Re-issues the serving certificate at half its remaining lifetime (which
/// may be shorter than `cert_ttl` when the CA itself expires sooner), and as
/// soon as a new signing CA is loaded.
async fn renew_serving_certificate(
    serving: Arc<ServingCertificate>,
    ca: Arc<ArcSwap<Ca>>,
    mode: ServerTls,
    ca_changed: Arc<tokio::sync::Notify>,
) {
    let ServerTls::Issued { ttl, .. } = &mode else {
        return;
    };
    let half_life = |not_after: OffsetDateTime| {
        let left = (not_after - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        Duration::try_from(left / 2)
            .unwrap_or_default()
            .max(Duration::from_secs(60))
    };
    let mut wait = *ttl / 2;
    if let Some(leaf) = serving.current().cert.first() {
        if let Ok(cert) = crate::pki::parse_cert(leaf) {
            wait = half_life(cert.validity().not_after.to_datetime());
        }
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ca_changed.notified() => {}
        }
        let current = ca.load_full();
        let mode = mode.clone();
        let issued = tokio::task::spawn_blocking(move || issue_serving_key(&mode, &current))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match issued {
            Ok((key, not_after)) => {
                serving.replace(key);
                wait = half_life(not_after);
                tracing::info!(expires = %not_after, "serving certificate renewed");
            }
            Err(e) => {
                tracing::error!(error = %e, "serving certificate renewal failed; retrying in 1m");
                wait = Duration::from_secs(60);
            }
        }
    }
}

async fn watch_health(
    reporter: tonic_health::server::HealthReporter,
    ca: Arc<ArcSwap<Ca>>,
    metrics: Arc<crate::metrics::Metrics>,
    pod_caches: Vec<(String, Arc<crate::k8s::pods::PodCache>)>,
) {
    let mut last = None;
    loop {
        let unsynced: Vec<&str> = pod_caches
            .iter()
            .filter(|(_, cache)| !cache.is_synced())
            .map(|(id, _)| id.as_str())
            .collect();
        // A test signing is a real signature (RSA: ~1 ms): off the reactor.
        let current = ca.load_full();
        let result =
            tokio::task::spawn_blocking(move || current.self_test(OffsetDateTime::now_utc()))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        let status = match result {
            Ok(()) if unsynced.is_empty() => ServingStatus::Serving,
            Ok(()) => {
                tracing::info!(clusters = ?unsynced, "waiting for the pod watch's first list before reporting SERVING");
                ServingStatus::NotServing
            }
            Err(e) => {
                tracing::error!(error = %e, "CA self-test failed: reporting NOT_SERVING");
                ServingStatus::NotServing
            }
        };
        metrics.set_ready(status == ServingStatus::Serving);
        if last != Some(status) {
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(crate::proto::SERVICE_NAME, status)
                .await;
            last = Some(status);
        }
        // Pod watches usually sync within a second: look again soon.
        let pause = if unsynced.is_empty() { 30_000 } else { 500 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
