//! The running server: assembles the CA, the authenticators and the policy
//! from a validated [`Config`], serves gRPC on one listener (the CA service,
//! the standard health service and server reflection), and starts the
//! background loops that keep it current (CA reload, JWKS refresh, serving
//! certificate, health, root publishing), each supervised.
//!
//! Submodules, outside in: [`tls`] (accept, handshake, [`PeerInfo`]),
//! [`conn`] (one HTTP/2 connection's bounds), [`service`] (one
//! `CreateCertificate` call), plus the serving certificate, the JWT issuers'
//! keys and health.

mod coalesce;
pub mod config_reload;
pub mod conn;
mod fair_read;
mod health;
mod issuers;
pub mod service;
mod serving_cert;
#[cfg(test)]
mod test_waker;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::{Authenticator, JwtAuthenticator};
use crate::ca::dev::{self, DevCaState};
use crate::ca::Ca;
use crate::config::{CaSource, Config, ServerTls};
use crate::k8s::node_auth::NodeAuthorizer;
use crate::k8s::TokenCheck;
use crate::proto::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::supervise;

pub use config_reload::{ConfigReloadError, ConfigReloader};
pub use service::CertificateService;
pub use tls::{PeerInfo, ServingCertificate};

/// Why the server could not start. Each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cause is in the message, so it is not also the `source()` (a
    /// chain printer would write it twice).
    #[error("CA bundle: {0}")]
    Bundle(crate::ca::BundleError),
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
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

/// What [`start_with`] can be given besides the configuration.
#[derive(Debug, Default)]
pub struct StartOptions {
    /// Where audit files are written (`None`: the file system). Tests put a
    /// storage here that fails like a full disk.
    pub audit_storage: Option<Arc<dyn crate::audit::AuditStorage>>,
}

impl From<crate::ca::BundleError> for StartError {
    fn from(e: crate::ca::BundleError) -> Self {
        StartError::Bundle(e)
    }
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
    task: JoinHandle<()>,
    audit: Option<Arc<crate::audit::AuditLog>>,
    reloader: Arc<ConfigReloader>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish, and waits (then
    /// writes every queued audit record and logs the last audit anchor).
    pub async fn shutdown(mut self) -> Result<(), String> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = self.wait().await;
        if let Some(audit) = &self.audit {
            audit.close().await;
        }
        result
    }

    /// Applies a configuration read again (see [`config_reload`]).
    pub async fn reload(
        &self,
        next: Result<Config, crate::config::ConfigError>,
    ) -> Result<config_reload::Changed, ConfigReloadError> {
        self.reloader.reload(next).await
    }

    /// What [`Self::reload`] uses, for a signal handler to hold.
    pub fn reloader(&self) -> Arc<ConfigReloader> {
        self.reloader.clone()
    }

    /// The audit trail, when configured.
    pub fn audit(&self) -> Option<&crate::audit::AuditLog> {
        self.audit.as_deref()
    }

    /// Waits until the server stops.
    pub async fn wait(&mut self) -> Result<(), String> {
        (&mut self.task).await.map_err(|e| e.to_string())
    }
}

/// Builds everything from `config` and starts serving.
pub async fn start(config: &Config) -> Result<RunningServer, StartError> {
    start_with(config, StartOptions::default()).await
}

/// [`start`], with `options`.
pub async fn start_with(
    config: &Config,
    options: StartOptions,
) -> Result<RunningServer, StartError> {
    // reqwest (JWKS over HTTPS) uses the process-wide rustls provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let now = OffsetDateTime::now_utc();

    let (ca, dev_state) = match &config.ca {
        CaSource::Dir(dir) => (Ca::load_for(dir, config.trust_domain(), now)?, None),
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
    let audit = match &config.audit {
        Some(a) => {
            let storage = options
                .audit_storage
                .unwrap_or_else(|| Arc::new(crate::audit::FileSystem));
            let log =
                crate::audit::AuditLog::start(a, &config.state_dir, storage, metrics.registry())
                    .await?;
            let on_failure = match a.on_failure {
                crate::config::AuditOnFailure::Refuse => "refuse",
                crate::config::AuditOnFailure::Count => "count",
            };
            tracing::info!(dir = %log.dir().display(), on_failure, "audit trail on");
            Some(Arc::new(log))
        }
        None => None,
    };
    let roots_pem = ca.roots_pem().to_owned();
    let ca = Arc::new(ArcSwap::from_pointee(ca));
    // Counts CA swaps (reloads); followers subscribe.
    let ca_changed = Arc::new(tokio::sync::watch::channel(0u64).0);
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
            let reloads = metrics.reload_counters("ca");
            supervise::spawn("ca-reload", metrics.restarts("ca-reload"), move || {
                crate::ca::reload::watch(
                    dir.clone(),
                    ca.clone(),
                    every,
                    changed.clone(),
                    reloads.clone(),
                )
            });
        }
    }

    let issuer_set = issuers::IssuerSet::build(config, &Default::default(), &metrics).await?;
    let issuers = issuer_set.issuers();
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
    let mut kube_clusters = None;
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
        let clusters = Arc::new(clusters);
        authenticator = authenticator.with_clusters(clusters.clone());
        kube_clusters = Some(clusters);
    }

    let tls = match &config.server_tls {
        ServerTls::InsecurePlaintext => {
            tracing::warn!(
                "serving PLAINTEXT gRPC (server_tls.insecure_plaintext): for debugging only"
            );
            None
        }
        other => {
            let serving = serving_cert::serving_certificate(other, &ca.load())?;
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
                        serving_cert::renew_serving_certificate(
                            serving.clone(),
                            ca.clone(),
                            settings.clone(),
                            changed.clone(),
                        )
                    },
                );
            }
            if let (ServerTls::Files { cert, key }, false) =
                (other, config.ca_reload_interval.is_zero())
            {
                let (serving, cert, key, every) = (
                    serving.clone(),
                    cert.clone(),
                    key.clone(),
                    config.ca_reload_interval,
                );
                let reloads = metrics.reload_counters("serving_certificate");
                supervise::spawn(
                    "serving-files",
                    metrics.restarts("serving-files"),
                    move || {
                        serving_cert::watch_serving_files(
                            serving.clone(),
                            cert.clone(),
                            key.clone(),
                            every,
                            reloads.clone(),
                        )
                    },
                );
            }
            let client_certificates = config.authn.client_certificates;
            let settings = tls_settings(&serving, &ca.load(), client_certificates)
                .map_err(StartError::ServingCertificate)?;
            let settings = Arc::new(ArcSwap::from_pointee(settings));
            // New handshakes follow a change of roots (a root rotation step).
            let (swap, ca, changed) = (settings.clone(), ca.clone(), ca_changed.clone());
            supervise::spawn("tls-roots", metrics.restarts("tls-roots"), move || {
                follow_roots(
                    swap.clone(),
                    serving.clone(),
                    ca.clone(),
                    changed.subscribe(),
                    client_certificates,
                )
            });
            Some(settings)
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
    reserve_descriptor_table(
        &listener,
        config
            .limits
            .max_connections
            .saturating_add(OTHER_DESCRIPTORS),
    );
    let incoming = tls::incoming(
        listener,
        tls,
        tls::ConnLimits {
            handshake_timeout: config.limits.handshake_timeout,
            max_connections: config.limits.max_connections,
            max_handshakes: config.limits.max_concurrent_handshakes,
            refused: metrics.connections_refused.clone(),
        },
        tls::HandshakeThreads::start(config.limits.handshake_threads).map_err(|e| {
            StartError::Listen {
                addr: config.listen,
                reason: format!("cannot start the handshake threads: {e}"),
            }
        })?,
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
        .and_then(|s| s.with_limits(config.limits.max_signing_queue, &config.rate_limits))
        .map_err(|e| StartError::ServingCertificate(format!("cannot start signer threads: {e}")))?
        .with_node_authorizer(node_authorizer)
        .with_audit(audit.clone()),
    );
    let refusal_log = service.refusal_log();
    let service_handle = service.clone();
    let ca_service = IstioCertificateServiceServer::new(service)
        .max_decoding_message_size(config.limits.max_request_bytes);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    {
        let (ca, m) = (ca.clone(), metrics.clone());
        supervise::spawn("health", metrics.restarts("health"), move || {
            health::watch_health(
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
                let mut swaps = changed.subscribe();
                while swaps.changed().await.is_ok() {
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

    let routes = tonic::service::Routes::new(ca_service)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let (conn_settings, conn_settings_rx) =
        tokio::sync::watch::channel(conn::ConnSettings::from_limits(&config.limits));
    let reloader = Arc::new(ConfigReloader::new(
        config.clone(),
        issuer_set,
        service_handle,
        conn_settings,
        kube_clusters,
        metrics.clone(),
    ));
    let task = tokio::spawn(conn::serve(
        incoming,
        routes,
        conn_settings_rx,
        conn::ConnObservers {
            metrics: metrics.clone(),
            refusal_log,
        },
        async {
            let _ = shutdown_rx.await;
        },
    ));
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
        audit,
        reloader,
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

/// Descriptors kept for everything but connections (files, the API
/// servers, the monitoring endpoint's clients).
const OTHER_DESCRIPTORS: usize = 1024;

/// Grows the process's file-descriptor table, now, to `count` descriptors
/// (within the open-file limit; the server asks for what `max_connections`
/// connections need). `reference` is any open descriptor. Linux grows the table by
/// doubling as descriptors are opened, and each growth waits for an RCU
/// grace period inside the `accept4` that crossed it (`expand_files` →
/// `synchronize_rcu`): measured in the abuse suite's idle-h2 attack (10,000
/// connections) as stalls of tens of milliseconds on the worker that
/// accepts, with the CPU idle. The table never shrinks, so growing it once,
/// before serving, takes those waits out of the request path. Costs 8 bytes
/// per descriptor (~256 KiB for the default 20,000 connections).
#[cfg(unix)]
pub fn reserve_descriptor_table(reference: &impl std::os::fd::AsRawFd, count: usize) {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    let wanted = count as u64;
    let highest = wanted.min(soft).saturating_sub(1);
    let Ok(highest) = libc::c_int::try_from(highest) else {
        return;
    };
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own onto the lowest
    // free number >= `highest`; the duplicate is closed at once. Best effort.
    unsafe {
        let dup = libc::fcntl(reference.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest);
        if dup >= 0 {
            libc::close(dup);
        }
    }
}

#[cfg(not(unix))]
pub fn reserve_descriptor_table<T>(_: &T, _: usize) {}

/// The TLS settings for the serving certificate and the CA's current roots.
fn tls_settings(
    serving: &Arc<ServingCertificate>,
    ca: &Ca,
    client_certificates: bool,
) -> Result<tls::TlsSettings, String> {
    let roots = ca.trusted_roots();
    let config = tls::server_config(serving.clone(), roots.certs, client_certificates)?;
    Ok(tls::TlsSettings {
        config: Arc::new(config),
        roots: roots.id,
    })
}

/// Rebuilds the TLS settings whenever a CA swap changes the roots.
async fn follow_roots(
    settings: Arc<ArcSwap<tls::TlsSettings>>,
    serving: Arc<ServingCertificate>,
    ca: Arc<ArcSwap<Ca>>,
    mut swaps: tokio::sync::watch::Receiver<u64>,
    client_certificates: bool,
) {
    // A swap may have happened before this (re)started.
    loop {
        let current = ca.load_full();
        if current.trusted_roots().id != settings.load().roots {
            match tls_settings(&serving, &current, client_certificates) {
                Ok(next) => {
                    settings.store(Arc::new(next));
                    tracing::info!(
                        roots = current.bundle().roots.len(),
                        "trust bundle changed: new connections are verified against it"
                    );
                }
                Err(e) => tracing::error!(error = %e, "cannot use the new trust bundle for TLS"),
            }
        }
        if swaps.changed().await.is_err() {
            return;
        }
    }
}

fn log_bundle(ca: &Ca) {
    let b = ca.bundle();
    tracing::info!(
        dir = %b.dir.display(),
        layout = %b.layout,
        key = %b.key_kind,
        chain = b.chain.len(),
        roots = b.roots.len(),
        signer_expires = %crate::logging::Rfc3339(b.not_after),
        "CA bundle loaded and verified"
    );
    if ca.uri_name_constraints().is_ok_and(|c| !c.is_empty()) {
        tracing::warn!(
            "the CA carries URI name constraints: clients that verify with rustls/webpki \
             (ztunnel, and meshsign's own client-certificate check) refuse every SPIFFE \
             certificate under it, as webpki does not implement URI constraints; \
             renewals must then authenticate with tokens"
        );
    }
    if let Some(warning) = crate::ca::bundle::key_file_exposure(&b.dir, b.layout) {
        tracing::warn!("{warning}");
    }
}
