//! Configuration: the YAML file, parsed once at start-up and validated into
//! typed settings. Unknown keys are errors, and every validation error names
//! the key it concerns (`policy.max_ttl: ...`). Nothing else in meshsign reads
//! configuration files or environment variables.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::csr::KeyPolicy;
use crate::policy::{Policy, Rule};
use crate::spiffe;

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path}: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// The file, as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    /// `None`: [`DEV_LISTEN`] in dev mode, [`PLUGIN_CA_LISTEN`] with `ca.dir`.
    listen: Option<String>,
    trust_domain: String,
    trust_domain_aliases: Vec<String>,
    state_dir: PathBuf,
    server_tls: FileServerTls,
    ca: Option<FileCa>,
    authn: FileAuthn,
    policy: FilePolicy,
    limits: FileLimits,
    rate_limits: FileRateLimits,
    monitoring: FileMonitoring,
    kubernetes: Option<FileKubernetes>,
    audit: Option<FileAudit>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct FileMonitoring {
    listen: Option<String>,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            listen: None,
            trust_domain: "cluster.local".into(),
            trust_domain_aliases: Vec::new(),
            state_dir: PathBuf::from(".meshsign"),
            server_tls: FileServerTls::default(),
            ca: None,
            authn: FileAuthn::default(),
            policy: FilePolicy::default(),
            limits: FileLimits::default(),
            rate_limits: FileRateLimits::default(),
            monitoring: FileMonitoring::default(),
            kubernetes: None,
            audit: None,
        }
    }
}

/// The `audit` section as written; present (even `audit: {}`) = on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileAudit {
    dir: Option<PathBuf>,
    max_file_bytes: u64,
    max_files: u64,
    on_failure: String,
    fsync: String,
    max_queue: usize,
    anchor_interval: String,
    unauthenticated_refusals_per_second: u32,
}

impl Default for FileAudit {
    fn default() -> Self {
        Self {
            dir: None,
            max_file_bytes: 64 * 1024 * 1024,
            max_files: 0,
            on_failure: "refuse".into(),
            fsync: "batch".into(),
            max_queue: 10_000,
            anchor_interval: "60s".into(),
            unauthenticated_refusals_per_second: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileServerTls {
    dns_names: Vec<String>,
    ip_addresses: Vec<String>,
    cert_ttl: String,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    insecure_plaintext: bool,
}

impl Default for FileServerTls {
    fn default() -> Self {
        Self {
            dns_names: DEFAULT_DNS_NAMES.iter().map(|s| s.to_string()).collect(),
            ip_addresses: vec!["127.0.0.1".into(), "::1".into()],
            cert_ttl: "24h".into(),
            cert_file: None,
            key_file: None,
            insecure_plaintext: false,
        }
    }
}

/// `listen` in dev mode (no `ca.dir`) when the file does not set it.
pub const DEV_LISTEN: &str = "127.0.0.1:15012";
/// `listen` with a plug-in CA (`ca.dir`) when the file does not set it: istiod's.
pub const PLUGIN_CA_LISTEN: &str = "0.0.0.0:15012";

/// The serving certificate's DNS names by default. `istiod.istio-system.svc`
/// is what istio-agent asks for when `CA_ADDR` points at `localhost`.
pub const DEFAULT_DNS_NAMES: &[&str] = &[
    "meshsign.istio-system.svc",
    "istiod.istio-system.svc",
    "localhost",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCa {
    dir: PathBuf,
    #[serde(default = "default_reload")]
    reload_interval: String,
}

fn default_reload() -> String {
    "10s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileAuthn {
    client_certificates: bool,
    clock_skew: String,
    jwt: Vec<FileJwt>,
}

impl Default for FileAuthn {
    fn default() -> Self {
        Self {
            client_certificates: true,
            clock_skew: "60s".into(),
            jwt: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJwt {
    issuer: String,
    #[serde(default = "default_audiences")]
    audiences: Vec<String>,
    jwks_file: Option<PathBuf>,
    jwks_uri: Option<String>,
    jwks_ca_file: Option<PathBuf>,
    jwks_bearer_token_file: Option<PathBuf>,
    #[serde(default = "default_refresh")]
    jwks_refresh: String,
}

fn default_audiences() -> Vec<String> {
    vec![crate::token::DEFAULT_AUDIENCE.to_owned()]
}

fn default_refresh() -> String {
    "5m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FilePolicy {
    default_ttl: String,
    max_ttl: String,
    backdate: String,
    allow: Vec<FileRule>,
    deny: Vec<FileRule>,
    csr_keys: FileKeyPolicy,
}

impl Default for FilePolicy {
    fn default() -> Self {
        Self {
            default_ttl: "24h".into(),
            max_ttl: "2160h".into(),
            backdate: "2m".into(),
            allow: vec![FileRule::default()],
            deny: Vec::new(),
            csr_keys: FileKeyPolicy::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileRule {
    namespace: String,
    service_account: String,
}

impl Default for FileRule {
    fn default() -> Self {
        Self {
            namespace: "*".into(),
            service_account: "*".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileKeyPolicy {
    rsa_min_bits: usize,
    rsa_max_bits: usize,
    ecdsa_p256: bool,
    ecdsa_p384: bool,
    ed25519: bool,
}

impl Default for FileKeyPolicy {
    fn default() -> Self {
        let k = KeyPolicy::default();
        Self {
            rsa_min_bits: k.rsa_min_bits,
            rsa_max_bits: k.rsa_max_bits,
            ecdsa_p256: k.ecdsa_p256,
            ecdsa_p384: k.ecdsa_p384,
            ed25519: k.ed25519,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileLimits {
    max_request_bytes: usize,
    max_concurrent_streams: u32,
    handshake_timeout: String,
    request_timeout: String,
    max_connection_age: String,
    max_connection_age_grace: String,
    max_connections: usize,
    max_concurrent_handshakes: usize,
    handshake_threads: usize,
    listen_backlog: u32,
    max_header_list_bytes: u32,
    idle_timeout: String,
    body_timeout: String,
    drain_timeout: String,
    stream_budget: FileBudget,
    reset_budget: FileBudget,
    refusal_budget: FileBudget,
    max_signing_queue: usize,
    max_calls_in_flight: usize,
}

/// A token bucket as written: `{ per_second, burst }`.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct FileBudget {
    per_second: f64,
    #[serde(default)]
    burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileRateLimits {
    /// `None`: the default, which depends on the CA (see `validate`).
    per_caller: Option<FileBudget>,
    per_node_agent: FileBudget,
    failed_auth_per_address: FileBudget,
    max_tracked: usize,
}

impl Default for FileRateLimits {
    fn default() -> Self {
        Self {
            per_caller: None,
            per_node_agent: FileBudget {
                per_second: 100.0,
                burst: 1000,
            },
            failed_auth_per_address: FileBudget {
                per_second: 10.0,
                burst: 100,
            },
            max_tracked: 100_000,
        }
    }
}

impl Default for FileLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: 32 * 1024,
            max_concurrent_streams: 16,
            handshake_timeout: "10s".into(),
            request_timeout: "30s".into(),
            max_connection_age: "30m".into(),
            max_connection_age_grace: "10s".into(),
            max_connections: 20_000,
            max_concurrent_handshakes: 1024,
            handshake_threads: 0,
            listen_backlog: 4096,
            max_header_list_bytes: 32 * 1024,
            idle_timeout: "60s".into(),
            body_timeout: "5s".into(),
            drain_timeout: "15s".into(),
            stream_budget: FileBudget {
                per_second: 2000.0,
                burst: 4000,
            },
            reset_budget: FileBudget {
                per_second: 10.0,
                burst: 200,
            },
            refusal_budget: FileBudget {
                per_second: 20.0,
                burst: 200,
            },
            max_signing_queue: 4096,
            max_calls_in_flight: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKubernetes {
    clusters: Vec<FileCluster>,
    #[serde(default)]
    token_review: FileTokenReview,
    #[serde(default)]
    trusted_node_accounts: Vec<String>,
    #[serde(default)]
    root_certificates: Option<FileRootPublisher>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    id: String,
    #[serde(default)]
    aliases: Vec<String>,
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    in_cluster: bool,
    #[serde(default = "default_tokens")]
    tokens: String,
    jwt_issuer: Option<String>,
}

fn default_tokens() -> String {
    "tokenreview".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileTokenReview {
    audiences: Vec<String>,
    cache_ttl: String,
    cache_size: usize,
    timeout: String,
    max_concurrent: usize,
}

impl Default for FileTokenReview {
    fn default() -> Self {
        Self {
            audiences: default_audiences(),
            cache_ttl: "60s".into(),
            cache_size: 100_000,
            timeout: "5s".into(),
            max_concurrent: 32,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileRootPublisher {
    configmap: bool,
    namespace_selector: String,
    cluster_trust_bundle: bool,
    lease_namespace: String,
    lease_name: String,
    lease_duration: String,
    holder_identity: Option<String>,
    resync: String,
}

impl Default for FileRootPublisher {
    fn default() -> Self {
        Self {
            configmap: true,
            namespace_selector: String::new(),
            cluster_trust_bundle: false,
            lease_namespace: "istio-system".into(),
            lease_name: "meshsign-root-publisher".into(),
            lease_duration: "15s".into(),
            holder_identity: None,
            resync: "5m".into(),
        }
    }
}

// ---------------------------------------------------------------------------
// The validated settings.

/// How a cluster's bearer tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterTokens {
    /// A `TokenReview` against the cluster's API server (istiod's way).
    TokenReview,
    /// Offline, with the `authn.jwt` issuer of this name.
    Jwt { issuer: String },
}

/// How to reach a cluster's API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeAccess {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

/// One cluster of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The `clusterid` agents of this cluster send (`ISTIO_META_CLUSTER_ID`).
    pub id: String,
    pub aliases: Vec<String>,
    pub access: KubeAccess,
    pub tokens: ClusterTokens,
}

/// TokenReview settings, shared by every cluster that uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReviewConfig {
    pub audiences: Vec<String>,
    /// Longest a review result is reused (also bounded by the token's `exp`);
    /// the bound on how long a deleted pod's or service account's token
    /// keeps working.
    pub cache_ttl: Duration,
    pub cache_size: usize,
    pub timeout: Duration,
    /// Reviews in flight at once, per cluster.
    pub max_concurrent: usize,
}

/// Publishing the root bundle into the clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPublisherConfig {
    /// Keep ConfigMap `istio-ca-root-cert` in every namespace.
    pub configmap: bool,
    /// Only namespaces matching this label selector (empty: all).
    pub namespace_selector: String,
    /// Also publish a `ClusterTrustBundle` `istio.io:istiod-ca:root-cert`.
    pub cluster_trust_bundle: bool,
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// This replica's name in the Lease.
    pub holder_identity: String,
    /// Whether the file named it (otherwise it is made up, differently at
    /// every read: a reload must not take that for a change).
    pub holder_identity_configured: bool,
    /// Full re-check of every namespace this often, on top of the watches.
    pub resync: Duration,
}

/// Everything Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The first is the local cluster (selected by an empty `clusterid`).
    pub clusters: Vec<ClusterConfig>,
    pub token_review: TokenReviewConfig,
    /// `(namespace, service account)` pairs allowed to impersonate pods on
    /// their own node (istiod's `CA_TRUSTED_NODE_ACCOUNTS`).
    pub trusted_node_accounts: Vec<(String, String)>,
    pub root_publisher: Option<RootPublisherConfig>,
}

/// Where the CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// A plug-in bundle directory.
    Dir(PathBuf),
    /// Dev mode: a root and intermediate created in (and reused from) the state directory.
    Dev,
}

/// How the server presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTls {
    /// A serving certificate issued by the CA itself, renewed at half-life.
    Issued {
        dns_names: Vec<String>,
        ip_addresses: Vec<IpAddr>,
        ttl: Duration,
    },
    /// An operator-provided certificate and key (PEM), re-read on renewal ticks.
    Files { cert: PathBuf, key: PathBuf },
    /// No TLS at all. Debugging only.
    InsecurePlaintext,
}

/// Where a JWT issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksLocation {
    File(PathBuf),
    Uri {
        url: String,
        ca_file: Option<PathBuf>,
        bearer_token_file: Option<PathBuf>,
    },
}

/// One trusted JWT issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIssuerConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: JwksLocation,
    pub refresh: Duration,
}

/// Authentication settings.
#[derive(Debug, Clone)]
pub struct Authn {
    pub client_certificates: bool,
    pub clock_skew: Duration,
    pub jwt: Vec<JwtIssuerConfig>,
}

/// Resource limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_concurrent_streams: u32,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
    /// After this a connection gets a graceful GOAWAY (its calls finish,
    /// the client reconnects with a fresh handshake); zero = never.
    pub max_connection_age: Duration,
    /// How long calls may still run after that GOAWAY before the connection is closed.
    pub max_connection_age_grace: Duration,
    /// Open connections; past it new ones are accepted and closed at once.
    pub max_connections: usize,
    /// TLS handshakes in progress; past it likewise.
    pub max_concurrent_handshakes: usize,
    /// Threads that run TLS handshakes, apart from the request workers
    /// (0 in the file: half the CPUs, at least one).
    pub handshake_threads: usize,
    /// The listen queue length asked of the kernel (capped by `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Largest HTTP/2 header list a request may send (decoded size).
    pub max_header_list_bytes: u32,
    /// A connection with no call in flight for this long gets a graceful
    /// GOAWAY; PINGs do not count as activity. Zero = never.
    pub idle_timeout: Duration,
    /// How long a request's body may take to arrive after its headers.
    pub body_timeout: Duration,
    /// On shutdown, how long in-flight calls may run before connections close.
    pub drain_timeout: Duration,
    /// Streams one connection may open (a client over it is sent a GOAWAY and reconnects).
    pub stream_budget: Budget,
    /// Streams one connection may abandon (RST_STREAM before its answer); over it: GOAWAY.
    pub reset_budget: Budget,
    /// Calls one connection may have refused for the client's fault
    /// (unauthenticated, denied, invalid, over a rate limit); over it: GOAWAY.
    pub refusal_budget: Budget,
    /// Signatures waiting for a signer thread; past it requests get `RESOURCE_EXHAUSTED`.
    pub max_signing_queue: usize,
    /// Calls in progress across all connections (from their headers to their
    /// answer); past it new calls get `RESOURCE_EXHAUSTED` at once.
    pub max_calls_in_flight: usize,
}

/// A token bucket: `burst` at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub per_second: f64,
    pub burst: u32,
}

impl Budget {
    /// A budget with `per_second: 0` is switched off.
    pub fn is_enabled(&self) -> bool {
        self.per_second > 0.0
    }
}

/// Per-identity and per-address request budgets (over one: `RESOURCE_EXHAUSTED`).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimits {
    /// Requests per authenticated caller: its identity, and its pod when the
    /// credential names one (bound service-account tokens do).
    pub per_caller: Budget,
    /// Requests per trusted node agent (ztunnel) instance, i.e. per node:
    /// it asks for every pod on its node under one identity.
    pub per_node_agent: Budget,
    /// Failed authentications per remote address (IPv6: per /64); while it is
    /// spent, that address's requests without a verified client certificate
    /// are refused before any token is checked.
    pub failed_auth_per_address: Budget,
    /// Callers and addresses tracked at once (memory bound).
    pub max_tracked: usize,
}

/// What the audit trail does when a record cannot be queued or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOnFailure {
    /// No certificate leaves without its record: a request is refused with
    /// `UNAVAILABLE` (before signing when the queue is full or the writer is
    /// failing; after signing, the certificate discarded, when its write fails).
    Refuse,
    /// Issue anyway; the loss is counted (`meshsign_audit_records_lost_total`)
    /// and recorded in the trail once writing works again.
    Count,
}

/// When audit files are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditFsync {
    /// After every batch the writer thread writes (group commit); with
    /// `on_failure: refuse` a certificate is returned only after that.
    Batch,
    /// Only when a file is closed (rotation, shutdown): records reach the
    /// page cache at once (a crash of meshsign loses none) but a power loss
    /// can lose the newest.
    Rotation,
}

/// The tamper-evident audit trail (`audit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Where the files go; `None`: `<state_dir>/audit`.
    pub dir: Option<PathBuf>,
    /// A file is closed and the next begun before it would grow past this.
    pub max_file_bytes: u64,
    /// Files kept (the oldest are deleted); 0 = every file is kept.
    pub max_files: u64,
    pub on_failure: AuditOnFailure,
    pub fsync: AuditFsync,
    /// Records waiting for the writer thread at most.
    pub max_queue: usize,
    /// How often the newest record's hash is logged (an anchor outside the
    /// files); zero = never.
    pub anchor_interval: Duration,
    /// Records per second for refusals of callers that did not authenticate
    /// (the rest are counted, and the count recorded); 0 = no budget.
    pub unauthenticated_refusals_per_second: u32,
}

impl AuditConfig {
    /// The directory, `<state_dir>/audit` unless set.
    pub fn dir_in(&self, state_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| state_dir.join("audit"))
    }
}

/// Everything meshsign needs to run, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub server_tls: ServerTls,
    pub ca: CaSource,
    /// How often a plug-in CA directory is checked for changes; zero = never.
    pub ca_reload_interval: Duration,
    pub authn: Authn,
    pub policy: Policy,
    pub key_policy: KeyPolicy,
    pub limits: Limits,
    pub rate_limits: RateLimits,
    /// Where `/metrics` and `/healthz/*` are served; `None` = not at all.
    pub monitoring_listen: Option<SocketAddr>,
    /// Kubernetes clusters (TokenReview, node authorization, root
    /// publishing); `None` = no Kubernetes API access at all.
    pub kubernetes: Option<KubernetesConfig>,
    /// The tamper-evident audit trail; `None` = off.
    pub audit: Option<AuditConfig>,
}

impl Config {
    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Syntax { reason, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                reason,
            },
            other => other,
        })
    }

    /// Parses and validates YAML text. An empty document is the default
    /// (dev-mode) configuration.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax {
                path: PathBuf::from("<config>"),
                reason: e.to_string(),
            })?
        };
        file.validate()
    }

    /// The dev-mode defaults, as `meshsign serve` without `--config` runs.
    pub fn dev_default() -> Config {
        // The defaults are valid by construction (and tested).
        FileConfig::default()
            .validate()
            .unwrap_or_else(|e| panic!("built-in default configuration is invalid: {e}"))
    }

    pub fn trust_domain(&self) -> &str {
        &self.policy.trust_domain
    }

    /// What is valid but probably not meant, for `serve` to log at WARN
    /// before it starts: a configuration that leaves a new workload no way
    /// to get its first certificate (no JWT issuer, no Kubernetes cluster,
    /// not dev mode: only client certificates, which it has yet to get).
    pub fn startup_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let no_clusters = self
            .kubernetes
            .as_ref()
            .is_none_or(|k| k.clusters.is_empty());
        // (Validation already refuses a configuration with no authenticator.)
        if self.ca != CaSource::Dev && self.authn.jwt.is_empty() && no_clusters {
            warnings.push(
                "no way to get a first certificate: no JWT issuer (authn.jwt) and no \
                 kubernetes clusters, so only client certificates are accepted, and a new \
                 workload has none yet. Add an authn.jwt issuer (e.g. with jwks_file, see \
                 config/plugin-ca.yaml) or a kubernetes section (see \
                 config/plugin-ca-kubernetes.yaml)"
                    .to_owned(),
            );
        }
        warnings
    }
}

fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        invalid(
            key,
            format!("invalid duration {value:?}: {e} (examples: 90s, 2m, 24h, 2160h)"),
        )
    })
}

/// `rate_limits.per_caller` for a plug-in CA: a pod needs one or two
/// certificates at start and one per renewal.
pub const DEFAULT_PER_CALLER: Budget = Budget {
    per_second: 1.0,
    burst: 5,
};

/// A token bucket: `per_second` 0 switches it off; otherwise `burst` ≥ 1.
fn budget(key: &str, b: FileBudget) -> Result<Budget, ConfigError> {
    if !b.per_second.is_finite() || b.per_second < 0.0 || b.per_second > 1e9 {
        return Err(invalid(
            &format!("{key}.per_second"),
            "must be between 0 (off) and 1e9",
        ));
    }
    if b.per_second > 0.0 && b.burst == 0 {
        return Err(invalid(
            &format!("{key}.burst"),
            "must be at least 1 (or set per_second: 0 to switch the budget off)",
        ));
    }
    Ok(Budget {
        per_second: b.per_second,
        burst: b.burst,
    })
}

/// Upper bound on any certificate lifetime we accept in configuration.
const MAX_CONFIG_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl FileConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        // A dev CA trusts a token issuer whose key sits in its state
        // directory: loopback unless the file says otherwise (as Vault's dev
        // server). A plug-in CA listens where istiod does.
        let listen_text = self.listen.as_deref().unwrap_or(match self.ca {
            None => DEV_LISTEN,
            Some(_) => PLUGIN_CA_LISTEN,
        });
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|e| invalid("listen", format!("{listen_text:?} is not host:port: {e}")))?;
        spiffe::validate_trust_domain(&self.trust_domain)
            .map_err(|e| invalid("trust_domain", e.to_string()))?;
        for (i, alias) in self.trust_domain_aliases.iter().enumerate() {
            spiffe::validate_trust_domain(alias)
                .map_err(|e| invalid(&format!("trust_domain_aliases[{i}]"), e.to_string()))?;
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must not be empty"));
        }

        let tls = &self.server_tls;
        let server_tls = if tls.insecure_plaintext {
            ServerTls::InsecurePlaintext
        } else {
            match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => ServerTls::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                },
                (Some(_), None) => {
                    return Err(invalid("server_tls.key_file", "required with cert_file"))
                }
                (None, Some(_)) => {
                    return Err(invalid("server_tls.cert_file", "required with key_file"))
                }
                (None, None) => {
                    if tls.dns_names.is_empty() && tls.ip_addresses.is_empty() {
                        return Err(invalid(
                            "server_tls.dns_names",
                            "the serving certificate needs at least one DNS name or IP address",
                        ));
                    }
                    for (i, name) in tls.dns_names.iter().enumerate() {
                        let ok = !name.is_empty()
                            && name.len() <= 253
                            && name.split('.').all(|l| {
                                !l.is_empty()
                                    && l.len() <= 63
                                    && l.bytes().all(|b| {
                                        b.is_ascii_alphanumeric() || b == b'-' || b == b'*'
                                    })
                            });
                        if !ok {
                            return Err(invalid(
                                &format!("server_tls.dns_names[{i}]"),
                                format!("{name:?} is not a DNS name"),
                            ));
                        }
                    }
                    let ip_addresses = tls
                        .ip_addresses
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            s.parse::<IpAddr>().map_err(|e| {
                                invalid(
                                    &format!("server_tls.ip_addresses[{i}]"),
                                    format!("{s:?}: {e}"),
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let ttl = duration("server_tls.cert_ttl", &tls.cert_ttl)?;
                    if ttl < Duration::from_secs(600) || ttl > Duration::from_secs(366 * 24 * 3600)
                    {
                        return Err(invalid(
                            "server_tls.cert_ttl",
                            "must be between 10m and 8784h",
                        ));
                    }
                    ServerTls::Issued {
                        dns_names: tls.dns_names.clone(),
                        ip_addresses,
                        ttl,
                    }
                }
            }
        };

        let (ca, ca_reload_interval) = match self.ca {
            Some(FileCa { dir, .. }) if dir.as_os_str().is_empty() => {
                return Err(invalid(
                    "ca.dir",
                    "must not be empty (omit `ca` for dev mode)",
                ))
            }
            Some(FileCa {
                dir,
                reload_interval,
            }) => {
                let every = duration("ca.reload_interval", &reload_interval)?;
                if !every.is_zero() && every < Duration::from_secs(1) {
                    return Err(invalid(
                        "ca.reload_interval",
                        "must be 0s (off) or at least 1s",
                    ));
                }
                (CaSource::Dir(dir), every)
            }
            None => (CaSource::Dev, Duration::ZERO),
        };

        let clock_skew = duration("authn.clock_skew", &self.authn.clock_skew)?;
        let mut jwt = Vec::new();
        for (i, j) in self.authn.jwt.into_iter().enumerate() {
            let key = |k: &str| format!("authn.jwt[{i}].{k}");
            if j.issuer.trim().is_empty() {
                return Err(invalid(&key("issuer"), "must not be empty"));
            }
            if j.audiences.is_empty() || j.audiences.iter().any(|a| a.is_empty()) {
                return Err(invalid(
                    &key("audiences"),
                    "at least one non-empty audience is required",
                ));
            }
            let jwks = match (j.jwks_file, j.jwks_uri) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &key("jwks_uri"),
                        "set either jwks_file or jwks_uri, not both",
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        &key("jwks_file"),
                        "one of jwks_file or jwks_uri is required",
                    ))
                }
                (Some(file), None) => {
                    if j.jwks_ca_file.is_some() || j.jwks_bearer_token_file.is_some() {
                        return Err(invalid(
                            &key("jwks_ca_file"),
                            "only meaningful with jwks_uri",
                        ));
                    }
                    JwksLocation::File(file)
                }
                (None, Some(url)) => {
                    // Over plain HTTP anyone on the path could substitute the keys
                    // (and read the bearer token sent to fetch them).
                    if !url.starts_with("https://") {
                        return Err(invalid(
                            &key("jwks_uri"),
                            format!("{url:?} is not an https:// URL"),
                        ));
                    }
                    JwksLocation::Uri {
                        url,
                        ca_file: j.jwks_ca_file,
                        bearer_token_file: j.jwks_bearer_token_file,
                    }
                }
            };
            let refresh = duration(&key("jwks_refresh"), &j.jwks_refresh)?;
            if refresh < Duration::from_secs(10) {
                return Err(invalid(&key("jwks_refresh"), "must be at least 10s"));
            }
            if jwt.iter().any(|o: &JwtIssuerConfig| o.issuer == j.issuer) {
                return Err(invalid(
                    &key("issuer"),
                    format!("issuer {:?} is listed twice", j.issuer),
                ));
            }
            jwt.push(JwtIssuerConfig {
                issuer: j.issuer,
                audiences: j.audiences,
                jwks,
                refresh,
            });
        }
        let kubernetes = match self.kubernetes {
            None => None,
            Some(k) => Some(validate_kubernetes(k, &jwt)?),
        };
        if ca != CaSource::Dev
            && jwt.is_empty()
            && !self.authn.client_certificates
            && kubernetes.is_none()
        {
            return Err(invalid(
                "authn",
                "no authenticator is enabled: configure authn.jwt or enable client_certificates",
            ));
        }

        let p = &self.policy;
        let default_ttl = duration("policy.default_ttl", &p.default_ttl)?;
        let max_ttl = duration("policy.max_ttl", &p.max_ttl)?;
        let backdate = duration("policy.backdate", &p.backdate)?;
        if default_ttl < Duration::from_secs(60) || default_ttl > MAX_CONFIG_TTL {
            return Err(invalid(
                "policy.default_ttl",
                "must be between 1m and 100 years",
            ));
        }
        if max_ttl < Duration::from_secs(60) || max_ttl > MAX_CONFIG_TTL {
            return Err(invalid(
                "policy.max_ttl",
                "must be between 1m and 100 years",
            ));
        }
        if default_ttl > max_ttl {
            return Err(invalid(
                "policy.default_ttl",
                format!(
                    "{} is longer than policy.max_ttl ({}): a request asking for the default would be refused",
                    humantime::format_duration(default_ttl),
                    humantime::format_duration(max_ttl)
                ),
            ));
        }
        if backdate > Duration::from_secs(24 * 3600) {
            return Err(invalid("policy.backdate", "must be at most 24h"));
        }
        let rules = |name: &str, list: &[FileRule]| {
            list.iter()
                .enumerate()
                .map(|(i, r)| {
                    Rule::new(&r.namespace, &r.service_account)
                        .map_err(|e| invalid(&format!("policy.{name}[{i}]"), e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let policy = Policy {
            trust_domain: self.trust_domain,
            trust_domain_aliases: self.trust_domain_aliases,
            allow: rules("allow", &p.allow)?,
            deny: rules("deny", &p.deny)?,
            default_ttl,
            max_ttl,
            backdate,
        };
        let k = &p.csr_keys;
        if k.rsa_min_bits < 2048 {
            return Err(invalid(
                "policy.csr_keys.rsa_min_bits",
                "must be at least 2048",
            ));
        }
        if k.rsa_max_bits < k.rsa_min_bits || k.rsa_max_bits > 16384 {
            return Err(invalid(
                "policy.csr_keys.rsa_max_bits",
                "must be between rsa_min_bits and 16384",
            ));
        }
        let key_policy = KeyPolicy {
            rsa_min_bits: k.rsa_min_bits,
            rsa_max_bits: k.rsa_max_bits,
            ecdsa_p256: k.ecdsa_p256,
            ecdsa_p384: k.ecdsa_p384,
            ed25519: k.ed25519,
        };

        let l = &self.limits;
        if !(4096..=4 * 1024 * 1024).contains(&l.max_request_bytes) {
            return Err(invalid(
                "limits.max_request_bytes",
                "must be between 4096 and 4194304",
            ));
        }
        if l.max_concurrent_streams == 0 {
            return Err(invalid("limits.max_concurrent_streams", "must be positive"));
        }
        let limits = Limits {
            max_request_bytes: l.max_request_bytes,
            max_concurrent_streams: l.max_concurrent_streams,
            handshake_timeout: duration("limits.handshake_timeout", &l.handshake_timeout)?,
            request_timeout: duration("limits.request_timeout", &l.request_timeout)?,
            max_connection_age: duration("limits.max_connection_age", &l.max_connection_age)?,
            max_connection_age_grace: duration(
                "limits.max_connection_age_grace",
                &l.max_connection_age_grace,
            )?,
            max_connections: l.max_connections,
            max_concurrent_handshakes: l.max_concurrent_handshakes,
            handshake_threads: match l.handshake_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
                n => n,
            },
            listen_backlog: l.listen_backlog,
            max_header_list_bytes: l.max_header_list_bytes,
            idle_timeout: duration("limits.idle_timeout", &l.idle_timeout)?,
            body_timeout: duration("limits.body_timeout", &l.body_timeout)?,
            drain_timeout: duration("limits.drain_timeout", &l.drain_timeout)?,
            stream_budget: budget("limits.stream_budget", l.stream_budget)?,
            reset_budget: budget("limits.reset_budget", l.reset_budget)?,
            refusal_budget: budget("limits.refusal_budget", l.refusal_budget)?,
            max_signing_queue: l.max_signing_queue,
            max_calls_in_flight: l.max_calls_in_flight,
        };
        if !(1..=10_000_000).contains(&limits.max_calls_in_flight) {
            return Err(invalid(
                "limits.max_calls_in_flight",
                "must be between 1 and 10000000",
            ));
        }
        if !(4096..=1024 * 1024).contains(&limits.max_header_list_bytes) {
            return Err(invalid(
                "limits.max_header_list_bytes",
                "must be between 4096 and 1048576",
            ));
        }
        if !limits.idle_timeout.is_zero() && limits.idle_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "limits.idle_timeout",
                "must be 0s (never) or at least 1s",
            ));
        }
        if !(Duration::from_millis(100)..=limits.request_timeout).contains(&limits.body_timeout) {
            return Err(invalid(
                "limits.body_timeout",
                "must be between 100ms and limits.request_timeout",
            ));
        }
        if limits.drain_timeout > Duration::from_secs(600) {
            return Err(invalid("limits.drain_timeout", "must be at most 10m"));
        }
        if !(1..=1_000_000).contains(&limits.max_signing_queue) {
            return Err(invalid(
                "limits.max_signing_queue",
                "must be between 1 and 1000000",
            ));
        }
        let r = &self.rate_limits;
        let rate_limits = RateLimits {
            // A dev CA (its own token issuer, a developer or a test suite
            // hammering it) has no per-caller budget unless one is set.
            per_caller: match (r.per_caller, &ca) {
                (Some(b), _) => budget("rate_limits.per_caller", b)?,
                (None, CaSource::Dev) => Budget {
                    per_second: 0.0,
                    burst: 0,
                },
                (None, CaSource::Dir(_)) => DEFAULT_PER_CALLER,
            },
            per_node_agent: budget("rate_limits.per_node_agent", r.per_node_agent)?,
            failed_auth_per_address: budget(
                "rate_limits.failed_auth_per_address",
                r.failed_auth_per_address,
            )?,
            max_tracked: r.max_tracked,
        };
        if !(1..=10_000_000).contains(&rate_limits.max_tracked) {
            return Err(invalid(
                "rate_limits.max_tracked",
                "must be between 1 and 10000000",
            ));
        }
        if l.handshake_threads > 64 {
            return Err(invalid(
                "limits.handshake_threads",
                "must be between 0 (half the CPUs) and 64",
            ));
        }
        if !(1..=1_000_000).contains(&limits.max_connections) {
            return Err(invalid(
                "limits.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=100_000).contains(&limits.max_concurrent_handshakes) {
            return Err(invalid(
                "limits.max_concurrent_handshakes",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=65_535).contains(&limits.listen_backlog) {
            return Err(invalid(
                "limits.listen_backlog",
                "must be between 1 and 65535",
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(300))
            .contains(&limits.handshake_timeout)
        {
            return Err(invalid(
                "limits.handshake_timeout",
                "must be between 100ms and 5m",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&limits.request_timeout) {
            return Err(invalid(
                "limits.request_timeout",
                "must be between 1s and 10m",
            ));
        }
        if !limits.max_connection_age.is_zero()
            && limits.max_connection_age < Duration::from_secs(1)
        {
            return Err(invalid(
                "limits.max_connection_age",
                "must be 0s (never) or at least 1s",
            ));
        }
        if limits.max_connection_age_grace > Duration::from_secs(3600) {
            return Err(invalid(
                "limits.max_connection_age_grace",
                "must be at most 1h",
            ));
        }

        let monitoring_listen = match &self.monitoring.listen {
            None => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|e| {
                invalid("monitoring.listen", format!("{s:?} is not host:port: {e}"))
            })?),
        };

        let audit = match self.audit {
            None => None,
            Some(a) => Some(validate_audit(a)?),
        };

        Ok(Config {
            audit,
            kubernetes,
            monitoring_listen,
            listen,
            state_dir: self.state_dir,
            server_tls,
            ca,
            ca_reload_interval,
            authn: Authn {
                client_certificates: self.authn.client_certificates,
                clock_skew,
                jwt,
            },
            policy,
            key_policy,
            limits,
            rate_limits,
        })
    }
}

fn validate_audit(a: FileAudit) -> Result<AuditConfig, ConfigError> {
    if a.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
        return Err(invalid(
            "audit.dir",
            "must not be empty (omit it for <state_dir>/audit)",
        ));
    }
    if !(1024..=1 << 40).contains(&a.max_file_bytes) {
        return Err(invalid(
            "audit.max_file_bytes",
            "must be between 1024 and 1099511627776",
        ));
    }
    if a.max_files == 1 || a.max_files > 1_000_000 {
        return Err(invalid(
            "audit.max_files",
            "must be 0 (keep every file) or between 2 and 1000000",
        ));
    }
    let on_failure = match a.on_failure.as_str() {
        "refuse" => AuditOnFailure::Refuse,
        "count" => AuditOnFailure::Count,
        other => {
            return Err(invalid(
                "audit.on_failure",
                format!("{other:?} is not refuse or count"),
            ))
        }
    };
    let fsync = match a.fsync.as_str() {
        "batch" => AuditFsync::Batch,
        "rotation" => AuditFsync::Rotation,
        other => {
            return Err(invalid(
                "audit.fsync",
                format!("{other:?} is not batch or rotation"),
            ))
        }
    };
    if !(1..=1_000_000).contains(&a.max_queue) {
        return Err(invalid("audit.max_queue", "must be between 1 and 1000000"));
    }
    let anchor_interval = duration("audit.anchor_interval", &a.anchor_interval)?;
    if !anchor_interval.is_zero()
        && !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&anchor_interval)
    {
        return Err(invalid(
            "audit.anchor_interval",
            "must be 0s (never) or between 1s and 24h",
        ));
    }
    if a.unauthenticated_refusals_per_second > 1_000_000 {
        return Err(invalid(
            "audit.unauthenticated_refusals_per_second",
            "must be between 0 (no budget) and 1000000",
        ));
    }
    Ok(AuditConfig {
        dir: a.dir,
        max_file_bytes: a.max_file_bytes,
        max_files: a.max_files,
        on_failure,
        fsync,
        max_queue: a.max_queue,
        anchor_interval,
        unauthenticated_refusals_per_second: a.unauthenticated_refusals_per_second,
    })
}

/// A Kubernetes object name (DNS-1123 label, as namespaces and service
/// accounts are in practice).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn validate_kubernetes(
    k: FileKubernetes,
    jwt: &[JwtIssuerConfig],
) -> Result<KubernetesConfig, ConfigError> {
    if k.clusters.is_empty() {
        return Err(invalid(
            "kubernetes.clusters",
            "list at least one cluster (the first is the local one)",
        ));
    }
    let mut clusters: Vec<ClusterConfig> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, c) in k.clusters.into_iter().enumerate() {
        let key = |k: &str| format!("kubernetes.clusters[{i}].{k}");
        if c.id.trim().is_empty() {
            return Err(invalid(&key("id"), "must not be empty"));
        }
        for (j, name) in std::iter::once(&c.id).chain(&c.aliases).enumerate() {
            let field = if j == 0 { "id" } else { "aliases" };
            if name.is_empty() {
                return Err(invalid(&key(field), "must not contain an empty name"));
            }
            if !seen.insert(name.clone()) {
                return Err(invalid(
                    &key(field),
                    format!("cluster name {name:?} is used twice"),
                ));
            }
        }
        let access = match (c.kubeconfig, c.in_cluster) {
            (Some(_), true) => {
                return Err(invalid(
                    &key("kubeconfig"),
                    "set either kubeconfig or in_cluster, not both",
                ))
            }
            (Some(path), false) => KubeAccess::Kubeconfig(path),
            (None, true) => KubeAccess::InCluster,
            (None, false) => {
                return Err(invalid(
                    &key("kubeconfig"),
                    "one of kubeconfig or in_cluster: true is required",
                ))
            }
        };
        let tokens = match (c.tokens.as_str(), c.jwt_issuer) {
            ("tokenreview", None) => ClusterTokens::TokenReview,
            ("tokenreview", Some(_)) => {
                return Err(invalid(
                    &key("jwt_issuer"),
                    "only meaningful with tokens: jwt",
                ))
            }
            ("jwt", Some(issuer)) => {
                if !jwt.iter().any(|j| j.issuer == issuer) {
                    return Err(invalid(
                        &key("jwt_issuer"),
                        format!("{issuer:?} is not an authn.jwt issuer"),
                    ));
                }
                ClusterTokens::Jwt { issuer }
            }
            ("jwt", None) => {
                return Err(invalid(
                    &key("jwt_issuer"),
                    "tokens: jwt needs the authn.jwt issuer to use",
                ))
            }
            (other, _) => {
                return Err(invalid(
                    &key("tokens"),
                    format!("{other:?} is not tokenreview or jwt"),
                ))
            }
        };
        clusters.push(ClusterConfig {
            id: c.id,
            aliases: c.aliases,
            access,
            tokens,
        });
    }
    for (i, j) in jwt.iter().enumerate() {
        let used = clusters
            .iter()
            .any(|c| matches!(&c.tokens, ClusterTokens::Jwt { issuer } if *issuer == j.issuer));
        if !used {
            return Err(invalid(
                &format!("authn.jwt[{i}].issuer"),
                "with `kubernetes` configured, every JWT issuer must belong to a cluster \
                 (kubernetes.clusters[].tokens: jwt, jwt_issuer)",
            ));
        }
    }

    let t = k.token_review;
    if t.audiences.is_empty() || t.audiences.iter().any(|a| a.is_empty()) {
        return Err(invalid(
            "kubernetes.token_review.audiences",
            "at least one non-empty audience is required",
        ));
    }
    let cache_ttl = duration("kubernetes.token_review.cache_ttl", &t.cache_ttl)?;
    if cache_ttl > Duration::from_secs(3600) {
        return Err(invalid(
            "kubernetes.token_review.cache_ttl",
            "must be at most 1h (0s: no cache)",
        ));
    }
    let timeout = duration("kubernetes.token_review.timeout", &t.timeout)?;
    if timeout < Duration::from_millis(100) || timeout > Duration::from_secs(60) {
        return Err(invalid(
            "kubernetes.token_review.timeout",
            "must be between 100ms and 60s",
        ));
    }
    if !(1..=10_000_000).contains(&t.cache_size) {
        return Err(invalid(
            "kubernetes.token_review.cache_size",
            "must be between 1 and 10000000",
        ));
    }
    if !(1..=1024).contains(&t.max_concurrent) {
        return Err(invalid(
            "kubernetes.token_review.max_concurrent",
            "must be between 1 and 1024",
        ));
    }

    let mut trusted_node_accounts = Vec::new();
    for (i, a) in k.trusted_node_accounts.iter().enumerate() {
        match a.split_once('/') {
            Some((ns, sa)) if is_dns_label(ns) && !sa.is_empty() && !sa.contains('/') => {
                trusted_node_accounts.push((ns.to_owned(), sa.to_owned()))
            }
            _ => {
                return Err(invalid(
                    &format!("kubernetes.trusted_node_accounts[{i}]"),
                    format!("{a:?} is not <namespace>/<service account>"),
                ))
            }
        }
    }

    let root_publisher = match k.root_certificates {
        None => None,
        Some(r) => {
            let key = |k: &str| format!("kubernetes.root_certificates.{k}");
            if !is_dns_label(&r.lease_namespace) {
                return Err(invalid(&key("lease_namespace"), "not a namespace name"));
            }
            if r.lease_name.is_empty() || r.lease_name.len() > 253 {
                return Err(invalid(&key("lease_name"), "not an object name"));
            }
            let lease_duration = duration(&key("lease_duration"), &r.lease_duration)?;
            if lease_duration < Duration::from_secs(2) || lease_duration > Duration::from_secs(600)
            {
                return Err(invalid(
                    &key("lease_duration"),
                    "must be between 2s and 10m",
                ));
            }
            let resync = duration(&key("resync"), &r.resync)?;
            if resync < Duration::from_secs(1) {
                return Err(invalid(&key("resync"), "must be at least 1s"));
            }
            if !r.configmap && !r.cluster_trust_bundle {
                return Err(invalid(
                    &key("configmap"),
                    "enable configmap or cluster_trust_bundle (or omit root_certificates)",
                ));
            }
            let holder_identity_configured = r.holder_identity.is_some();
            let holder_identity = match r.holder_identity {
                Some(h) if !h.is_empty() => h,
                Some(_) => return Err(invalid(&key("holder_identity"), "must not be empty")),
                None => default_holder_identity(),
            };
            Some(RootPublisherConfig {
                configmap: r.configmap,
                namespace_selector: r.namespace_selector,
                cluster_trust_bundle: r.cluster_trust_bundle,
                lease_namespace: r.lease_namespace,
                lease_name: r.lease_name,
                lease_duration,
                holder_identity,
                holder_identity_configured,
                resync,
            })
        }
    };

    Ok(KubernetesConfig {
        clusters,
        token_review: TokenReviewConfig {
            audiences: t.audiences,
            cache_ttl,
            cache_size: t.cache_size,
            timeout,
            max_concurrent: t.max_concurrent,
        },
        trusted_node_accounts,
        root_publisher,
    })
}

/// `<pod name (HOSTNAME)>-<random>`: unique per process, so two replicas (or
/// two processes on one machine) never share a Lease identity.
fn default_holder_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "meshsign".into());
    let mut random = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut random);
    let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{host}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_dev_mode() {
        let c = Config::dev_default();
        assert_eq!(c.ca, CaSource::Dev);
        assert_eq!(c.listen.port(), 15012);
        assert_eq!(c.trust_domain(), "cluster.local");
        assert_eq!(c.policy.max_ttl, Duration::from_secs(2160 * 3600));
        assert!(matches!(c.server_tls, ServerTls::Issued { .. }));
        assert_eq!(c.limits.max_connection_age, Duration::from_secs(1800));
        assert_eq!(c.limits.max_connection_age_grace, Duration::from_secs(10));
        // The abuse limits are on by default.
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.body_timeout, Duration::from_secs(5));
        assert!(c.limits.stream_budget.is_enabled() && c.limits.reset_budget.is_enabled());
        assert_eq!(c.limits.max_calls_in_flight, 10_000);
        // Dev mode: no per-caller budget unless set; a plug-in CA has one.
        assert!(!c.rate_limits.per_caller.is_enabled());
        let plugged = Config::from_yaml("ca: { dir: /etc/cacerts }").unwrap();
        assert_eq!(plugged.rate_limits.per_caller, DEFAULT_PER_CALLER);
        assert!(c.rate_limits.per_node_agent.is_enabled());
        assert!(c.rate_limits.failed_auth_per_address.is_enabled());
        // A budget switched off needs no burst.
        let off = Config::from_yaml("rate_limits: { per_caller: { per_second: 0 } }").unwrap();
        assert!(!off.rate_limits.per_caller.is_enabled());
    }

    #[test]
    fn issue_example_parses() {
        let c = Config::from_yaml(
            r#"
listen: "0.0.0.0:15012"
trust_domain: "cluster.local"
server_tls: { dns_names: ["meshsign.istio-system.svc", "localhost"] }
ca: { dir: "/etc/cacerts" }
authn:
  client_certificates: true
  jwt:
    - issuer: "https://kubernetes.default.svc.cluster.local"
      audiences: ["istio-ca"]
      jwks_file: "/etc/meshsign/jwks.json"
policy: { default_ttl: "24h", max_ttl: "2160h" }
"#,
        )
        .unwrap();
        assert_eq!(c.ca, CaSource::Dir("/etc/cacerts".into()));
        assert_eq!(c.authn.jwt.len(), 1);
        assert_eq!(
            c.authn.jwt[0].jwks,
            JwksLocation::File("/etc/meshsign/jwks.json".into())
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("policy: { max_ttl: \"90 parsecs\" }", "policy.max_ttl"),
            ("listen: nowhere", "listen"),
            ("trust_domain: \"Bad Domain\"", "trust_domain"),
            (
                "authn: { jwt: [ { issuer: x } ] }",
                "authn.jwt[0].jwks_file",
            ),
            (
                "policy: { deny: [ { namespace: \"[\" } ] }",
                "policy.deny[0]",
            ),
            (
                "server_tls: { dns_names: [\"a b\"] }",
                "server_tls.dns_names[0]",
            ),
            (
                "policy: { default_ttl: 48h, max_ttl: 24h }",
                "policy.default_ttl",
            ),
            (
                "limits: { handshake_timeout: 0s }",
                "limits.handshake_timeout",
            ),
            ("limits: { request_timeout: 0s }", "limits.request_timeout"),
            ("limits: { request_timeout: 1h }", "limits.request_timeout"),
            (
                "limits: { max_connection_age: 500ms }",
                "limits.max_connection_age",
            ),
            (
                "limits: { max_connection_age_grace: 2h }",
                "limits.max_connection_age_grace",
            ),
            ("limits: { idle_timeout: 10ms }", "limits.idle_timeout"),
            ("limits: { body_timeout: 0s }", "limits.body_timeout"),
            (
                "limits: { body_timeout: 1m, request_timeout: 30s }",
                "limits.body_timeout",
            ),
            ("limits: { drain_timeout: 1h }", "limits.drain_timeout"),
            (
                "limits: { max_header_list_bytes: 100 }",
                "limits.max_header_list_bytes",
            ),
            (
                "limits: { max_signing_queue: 0 }",
                "limits.max_signing_queue",
            ),
            (
                "limits: { max_calls_in_flight: 0 }",
                "limits.max_calls_in_flight",
            ),
            (
                "limits: { stream_budget: { per_second: 5 } }",
                "limits.stream_budget.burst",
            ),
            (
                "limits: { reset_budget: { per_second: -1, burst: 1 } }",
                "limits.reset_budget.per_second",
            ),
            (
                "limits: { refusal_budget: { per_second: 1, burst: -1 } }",
                "limits.refusal_budget",
            ),
            (
                "limits: { handshake_threads: 65 }",
                "limits.handshake_threads",
            ),
            (
                "rate_limits: { per_caller: { per_second: .nan, burst: 1 } }",
                "rate_limits.per_caller.per_second",
            ),
            (
                "rate_limits: { per_node_agent: { per_second: 1, burst: 0 } }",
                "rate_limits.per_node_agent.burst",
            ),
            (
                "rate_limits: { failed_auth_per_address: { per_second: 1e12, burst: 1 } }",
                "rate_limits.failed_auth_per_address.per_second",
            ),
            ("rate_limits: { max_tracked: 0 }", "rate_limits.max_tracked"),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
        let err = Config::from_yaml("polcy: {}").unwrap_err().to_string();
        assert!(err.contains("unknown field `polcy`"), "{err}");
    }

    #[test]
    fn audit_is_off_by_default_and_errors_name_the_key() {
        assert!(Config::dev_default().audit.is_none());
        let a = Config::from_yaml("audit: {}").unwrap().audit.unwrap();
        assert_eq!(a.dir_in(Path::new("/s")), PathBuf::from("/s/audit"));
        assert_eq!(a.max_file_bytes, 64 * 1024 * 1024);
        assert_eq!(a.max_files, 0);
        assert_eq!(a.on_failure, AuditOnFailure::Refuse);
        assert_eq!(a.fsync, AuditFsync::Batch);
        assert_eq!(a.anchor_interval, Duration::from_secs(60));
        let cases = [
            ("audit: { dir: \"\" }", "audit.dir"),
            ("audit: { max_file_bytes: 100 }", "audit.max_file_bytes"),
            ("audit: { max_files: 1 }", "audit.max_files"),
            ("audit: { on_failure: ignore }", "audit.on_failure"),
            ("audit: { fsync: always }", "audit.fsync"),
            ("audit: { max_queue: 0 }", "audit.max_queue"),
            ("audit: { anchor_interval: 10ms }", "audit.anchor_interval"),
            ("audit: { anchor_interval: 2d }", "audit.anchor_interval"),
            (
                "audit: { unauthenticated_refusals_per_second: 2000000 }",
                "audit.unauthenticated_refusals_per_second",
            ),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn kubernetes_errors_name_the_key() {
        let k = |body: &str| format!("kubernetes:\n{body}");
        let cases = [
            (k("  clusters: []\n"), "kubernetes.clusters"),
            (
                k("  clusters: [ { id: a } ]\n"),
                "kubernetes.clusters[0].kubeconfig",
            ),
            (
                k("  clusters: [ { id: a, in_cluster: true }, { id: b, aliases: [a], in_cluster: true } ]\n"),
                "kubernetes.clusters[1].aliases",
            ),
            (
                k("  clusters: [ { id: a, in_cluster: true, kubeconfig: x } ]\n"),
                "kubernetes.clusters[0].kubeconfig",
            ),
            (
                k("  clusters: [ { id: a, in_cluster: true, tokens: oidc } ]\n"),
                "kubernetes.clusters[0].tokens",
            ),
            (
                k("  clusters: [ { id: a, in_cluster: true, tokens: jwt, jwt_issuer: nope } ]\n"),
                "kubernetes.clusters[0].jwt_issuer",
            ),
            (
                format!(
                    "authn: {{ jwt: [ {{ issuer: x, jwks_file: j }} ] }}\n{}",
                    k("  clusters: [ { id: a, in_cluster: true } ]\n")
                ),
                "authn.jwt[0].issuer",
            ),
            (
                k("  clusters: [ { id: a, in_cluster: true } ]\n  trusted_node_accounts: [ztunnel]\n"),
                "kubernetes.trusted_node_accounts[0]",
            ),
            (
                k("  clusters: [ { id: a, in_cluster: true } ]\n  token_review: { cache_ttl: 2h }\n"),
                "kubernetes.token_review.cache_ttl",
            ),
            (
                k("  clusters: [ { id: a, in_cluster: true } ]\n  root_certificates: { lease_duration: 1s }\n"),
                "kubernetes.root_certificates.lease_duration",
            ),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml(&yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
        let ok = Config::from_yaml(&k(
            "  clusters: [ { id: a, aliases: [Kubernetes], in_cluster: true }, { id: b, kubeconfig: /k } ]\n  root_certificates: {}\n",
        ))
        .unwrap();
        let kube = ok.kubernetes.unwrap();
        assert_eq!(kube.token_review.cache_ttl, Duration::from_secs(60));
        let roots = kube.root_publisher.unwrap();
        assert!(roots.configmap && !roots.cluster_trust_bundle);
        assert!(!roots.holder_identity.is_empty());
    }
}
