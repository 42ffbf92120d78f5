//! Kubernetes: the mesh's clusters and what meshsign asks of their API
//! servers.
//!
//! * [`Clusters`] picks the cluster a request names in its `clusterid`
//!   header, exactly as istiod does: empty, the local cluster's ID or one of
//!   its aliases select the local (first) cluster; another ID or alias selects
//!   that remote cluster; anything else is refused.
//! * [`tokenreview`] authenticates bearer tokens with the cluster's
//!   `TokenReview` API, cached.
//! * [`pods`] and [`node_auth`] let a trusted node agent (ztunnel) ask for
//!   the pods on its own node.
//! * [`roots`] keeps the `istio-ca-root-cert` ConfigMaps equal to the root
//!   bundle, one writer per cluster chosen by a [`lease`].

pub mod lease;
pub mod node_auth;
pub mod pods;
pub mod roots;
pub mod tokenreview;

use std::fmt;
use std::sync::Arc;

use crate::auth::{JwtAuthenticator, JwtIssuer};
use crate::config::{ClusterConfig, ClusterTokens, KubeAccess, KubernetesConfig};

use self::pods::PodCache;
use self::tokenreview::{
    CachedTokenReview, KubeTokenReviewer, ReviewCacheSettings, ReviewCounters,
};

/// Why a cluster client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("kubernetes.clusters[{index}] ({id}): {reason}")]
pub struct ClusterError {
    pub index: usize,
    pub id: String,
    pub reason: String,
}

/// How a cluster's bearer tokens are checked.
#[derive(Debug, Clone)]
pub enum TokenCheck {
    TokenReview(Arc<CachedTokenReview>),
    /// Offline, with the cluster's own issuer only.
    Jwt(Arc<JwtAuthenticator>),
}

/// One cluster of the mesh.
pub struct Cluster {
    pub id: String,
    pub aliases: Vec<String>,
    pub client: kube::Client,
    pub tokens: TokenCheck,
    /// Present when node authorization is configured.
    pub pods: Option<Arc<PodCache>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("aliases", &self.aliases)
            .field("tokens", &self.tokens)
            .field("pods", &self.pods.as_ref().map(|p| p.len()))
            .finish()
    }
}

/// The `clusterid` a request sent named no configured cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client claims to be in cluster {claimed:?}, but we only know about local cluster {local:?} and remote clusters {remote:?}")]
pub struct UnknownCluster {
    pub claimed: String,
    pub local: String,
    pub remote: Vec<String>,
}

/// All configured clusters; the first is the local one.
#[derive(Debug)]
pub struct Clusters {
    list: Vec<Arc<Cluster>>,
}

impl Clusters {
    pub fn new(list: Vec<Arc<Cluster>>) -> Self {
        Self { list }
    }

    pub fn all(&self) -> &[Arc<Cluster>] {
        &self.list
    }

    /// The cluster a `clusterid` header value names (see the module docs).
    pub fn select(&self, cluster_id: &str) -> Result<&Arc<Cluster>, UnknownCluster> {
        let found = if cluster_id.is_empty() {
            self.list.first()
        } else {
            self.list
                .iter()
                .find(|c| c.id == cluster_id || c.aliases.iter().any(|a| a == cluster_id))
        };
        found.ok_or_else(|| UnknownCluster {
            claimed: cluster_id.chars().take(64).collect(),
            local: self.list.first().map(|c| c.id.clone()).unwrap_or_default(),
            remote: self.list.iter().skip(1).map(|c| c.id.clone()).collect(),
        })
    }
}

/// A client for one cluster's API server, speaking HTTP/2 when the server
/// offers it (kube-apiserver does, as client-go uses it).
///
/// kube's default client is HTTP/1.1 only, so every concurrent request
/// (a TokenReview during a storm) needs a connection of its own: measured
/// with `bench/run`'s Kubernetes path, 64 concurrent cold reviews opened 42
/// TLS connections. Over HTTP/2 the reviews, the pod watch and the root
/// publisher share one connection, as istiod's do.
pub async fn client_for(access: &KubeAccess) -> Result<kube::Client, String> {
    let config = match access {
        KubeAccess::InCluster => kube::Config::incluster().map_err(|e| e.to_string())?,
        KubeAccess::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
    };
    http2_client(config)
}

fn http2_client(config: kube::Config) -> Result<kube::Client, String> {
    use kube::client::ConfigExt;

    if config.proxy_url.is_some() {
        // kube's own stack handles proxies (HTTP/1.1).
        return kube::Client::try_from(config).map_err(|e| e.to_string());
    }
    let tls = config.rustls_client_config().map_err(|e| e.to_string())?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    // Small requests (a TokenReview is one short POST) must not wait for
    // Nagle's algorithm and the server's delayed ACK (~40 ms).
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let mut https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = rustls_pki_types::ServerName::try_from(name.clone())
            .map_err(|e| format!("tls-server-name {name:?}: {e}"))?;
        https = https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let connector = https.enable_http1().enable_http2().wrap_connector(http);
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .http2_keep_alive_timeout(std::time::Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(|e| e.to_string())?)
        .layer(config.extra_headers_layer().map_err(|e| e.to_string())?)
        .map_err(
            |e: hyper_util::client::legacy::Error| -> Box<dyn std::error::Error + Send + Sync> {
                Box::new(e)
            },
        )
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// Builds the clusters (clients, token checks, pod caches) and starts their
/// pod watches. `issuers` are the configured JWT issuers.
pub async fn build(
    config: &KubernetesConfig,
    issuers: &[Arc<JwtIssuer>],
    trust_domain: &str,
    clock: Arc<dyn crate::clock::Clock>,
    metrics: &crate::metrics::Metrics,
) -> Result<Clusters, ClusterError> {
    let mut list = Vec::new();
    let node_auth = !config.trusted_node_accounts.is_empty();
    for (index, c) in config.clusters.iter().enumerate() {
        let ClusterConfig {
            id,
            aliases,
            access,
            tokens,
        } = c;
        let err = |reason: String| ClusterError {
            index,
            id: id.clone(),
            reason,
        };
        let client = client_for(access).await.map_err(err)?;
        let tokens = match tokens {
            ClusterTokens::TokenReview => {
                let t = &config.token_review;
                TokenCheck::TokenReview(CachedTokenReview::new(
                    Arc::new(KubeTokenReviewer::new(client.clone(), id.clone())),
                    ReviewCacheSettings {
                        audiences: t.audiences.clone(),
                        cache_ttl: t.cache_ttl,
                        cache_size: t.cache_size,
                        timeout: t.timeout,
                        max_concurrent: t.max_concurrent,
                    },
                    clock.clone(),
                    ReviewCounters::registered(metrics, id),
                ))
            }
            ClusterTokens::Jwt { issuer } => {
                let issuer = issuers
                    .iter()
                    .find(|i| i.issuer == *issuer)
                    .cloned()
                    .ok_or_else(|| err(format!("JWT issuer {issuer:?} is not configured")))?;
                TokenCheck::Jwt(Arc::new(JwtAuthenticator::new(
                    vec![issuer],
                    trust_domain.to_owned(),
                )))
            }
        };
        let pods = node_auth.then(|| {
            let cache = Arc::new(PodCache::new());
            let (c, client, id) = (cache.clone(), client.clone(), id.clone());
            crate::supervise::spawn("pod-watch", metrics.restarts("pod-watch"), move || {
                c.clone().run(client.clone(), id.clone())
            });
            cache
        });
        list.push(Arc::new(Cluster {
            id: id.clone(),
            aliases: aliases.clone(),
            client,
            tokens,
            pods,
        }));
    }
    Ok(Clusters::new(list))
}
