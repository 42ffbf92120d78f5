//! Root distribution: keeps the current root bundle published in one
//! cluster, for workloads and proxies that read it from the API server
//! (what istiod's namespace controller does).
//!
//! * ConfigMap `istio-ca-root-cert`, key `root-cert.pem`, in every
//!   namespace that matches `namespace_selector` (all when empty) and is not
//!   terminating (`status.phase: Terminating` or a `deletionTimestamp`):
//!   created in new namespaces, restored when deleted or when its
//!   `root-cert.pem` is edited, rewritten when the roots change. Other keys
//!   and labels people add are left alone.
//! * Optionally a `ClusterTrustBundle` `istio.io:istiod-ca:root-cert`
//!   (signer `istio.io/istiod-ca`, the name Istio reads), when the API
//!   server serves `certificates.k8s.io/v1beta1` `clustertrustbundles`. Its
//!   `trustBundle` is the roots' certificate blocks only, deduplicated (the
//!   API server refuses anything else). A server that does not serve the
//!   type, or refuses the object, is logged once and otherwise ignored.
//!
//! Only the leader of the Lease `lease_namespace/lease_name` ([`super::lease`])
//! reads or writes any of this; followers only take part in the election.
//! While leader, one task watches namespaces (with the label selector), the
//! root ConfigMaps of all namespaces (field selector
//! `metadata.name=istio-ca-root-cert`) and the trust bundle, keeps what it
//! saw, and writes only where that differs from the wanted state: after the
//! first complete list, on every change, when the roots change, every
//! `resync` (from what was seen; the watches themselves re-list after
//! errors), and again with backoff (1 s to 60 s) after failed writes. Losing
//! the leadership drops the watches and cancels writes in flight.
//!
//! Writes are server-side apply with field manager `meshsign`, forced: one
//! idempotent request creates or updates, takes `root-cert.pem` (and the
//! labels `istio.io/config: "true"` and `app.kubernetes.io/managed-by:
//! meshsign`) back from whoever edited them, and never touches other fields.
//! A ConfigMap that cannot be updated in place (`immutable: true`, or
//! `root-cert.pem` under `binaryData`) is deleted, with its UID and
//! `resourceVersion` as preconditions, and created again.
//!
//! RBAC needed: `namespaces` list/watch; `configmaps` list/watch/create/
//! patch/delete in all namespaces; `leases` get/create/update in the lease
//! namespace; for the trust bundle, `clustertrustbundles` list/watch/create/
//! patch and `attest` on `signers` `istio.io/istiod-ca`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::certificates::v1beta1::{ClusterTrustBundle, ClusterTrustBundleSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, Preconditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;

use super::lease::{LeaderElector, LeaseSettings};
use crate::config::RootPublisherConfig;

/// The ConfigMap istio-agent and ztunnel read the roots from.
pub const CONFIGMAP_NAME: &str = "istio-ca-root-cert";
/// Its key holding the PEM bundle.
pub const CONFIGMAP_KEY: &str = "root-cert.pem";
/// The server-side apply field manager of every write.
pub const FIELD_MANAGER: &str = "meshsign";
/// The signer the trust bundle belongs to (Istio's name for its CA).
pub const TRUST_BUNDLE_SIGNER: &str = "istio.io/istiod-ca";
/// The trust bundle's name: the signer with `/` as `:`, then `root-cert`.
pub const TRUST_BUNDLE_NAME: &str = "istio.io:istiod-ca:root-cert";
/// Labels on everything written here.
pub const MANAGED_LABELS: [(&str, &str); 2] = [
    ("istio.io/config", "true"),
    ("app.kubernetes.io/managed-by", "meshsign"),
];

/// Writes in flight at once.
const WRITE_CONCURRENCY: usize = 8;
/// Longest one write (or discovery request) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// What should be there (pure).

fn managed_labels() -> BTreeMap<String, String> {
    MANAGED_LABELS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn has_managed_labels(meta: &ObjectMeta) -> bool {
    MANAGED_LABELS.iter().all(|(k, v)| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(*k))
            .is_some_and(|x| x == v)
    })
}

/// Whether roots should be published into this namespace (not terminating).
pub fn namespace_active(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_none()
        && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
}

/// The root ConfigMap as applied to `namespace`: only the fields meshsign owns.
pub fn desired_configmap(namespace: &str, roots: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        data: Some([(CONFIGMAP_KEY.to_owned(), roots.to_owned())].into()),
        ..Default::default()
    }
}

/// What a namespace's root ConfigMap needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigMapAction {
    /// Nothing: up to date (or being deleted, to be created again once gone).
    Keep,
    /// Create or update it (server-side apply).
    Apply,
    /// It cannot be updated in place: delete this exact object, then apply.
    Recreate {
        uid: Option<String>,
        resource_version: Option<String>,
    },
}

/// Compares the ConfigMap seen (if any) with the one wanted for `roots`.
pub fn configmap_action(existing: Option<&ConfigMap>, roots: &str) -> ConfigMapAction {
    let Some(cm) = existing else {
        return ConfigMapAction::Apply;
    };
    if cm.metadata.deletion_timestamp.is_some() {
        return ConfigMapAction::Keep;
    }
    let data_ok = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIGMAP_KEY))
        .is_some_and(|v| v == roots);
    if data_ok && has_managed_labels(&cm.metadata) {
        return ConfigMapAction::Keep;
    }
    let stuck = (!data_ok && cm.immutable == Some(true))
        || cm
            .binary_data
            .as_ref()
            .is_some_and(|b| b.contains_key(CONFIGMAP_KEY));
    if stuck {
        ConfigMapAction::Recreate {
            uid: cm.metadata.uid.clone(),
            resource_version: cm.metadata.resource_version.clone(),
        }
    } else {
        ConfigMapAction::Apply
    }
}

/// The roots as a `trustBundle`: each certificate once, as plain PEM
/// blocks, in order; anything else (keys, comments, headers) dropped.
pub fn trust_bundle_pem(roots: &str) -> Result<String, crate::pki::PemError> {
    let certs = crate::pki::parse_certificates_nonempty(roots.as_bytes())?;
    let mut seen = HashSet::new();
    Ok(certs
        .iter()
        .filter(|c| seen.insert(c.as_ref().to_vec()))
        .map(|c| crate::pki::pem_encode("CERTIFICATE", c))
        .collect())
}

/// The trust bundle as applied, for a `trustBundle` from [`trust_bundle_pem`].
pub fn desired_trust_bundle(bundle_pem: &str) -> ClusterTrustBundle {
    ClusterTrustBundle {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE_NAME.to_owned()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        spec: ClusterTrustBundleSpec {
            signer_name: Some(TRUST_BUNDLE_SIGNER.to_owned()),
            trust_bundle: bundle_pem.to_owned(),
        },
    }
}

/// Whether the trust bundle seen is the one wanted.
pub fn trust_bundle_up_to_date(existing: &ClusterTrustBundle, bundle_pem: &str) -> bool {
    existing.metadata.deletion_timestamp.is_none()
        && existing.spec.trust_bundle == bundle_pem
        && existing.spec.signer_name.as_deref() == Some(TRUST_BUNDLE_SIGNER)
        && has_managed_labels(&existing.metadata)
}

// ---------------------------------------------------------------------------
// The task.

/// Keeps the root bundle published in one cluster for as long as it runs
/// (see the module docs). Never returns unless there is nothing to publish.
pub async fn run(
    client: kube::Client,
    cluster: String,
    settings: RootPublisherConfig,
    roots: watch::Receiver<String>,
) {
    if !settings.configmap && !settings.cluster_trust_bundle {
        tracing::info!(cluster = %cluster, "root publishing: neither ConfigMaps nor a ClusterTrustBundle enabled");
        return;
    }
    let mut identity = settings.holder_identity.clone();
    if identity.is_empty() {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        identity = format!("meshsign-{random:016x}");
        tracing::warn!(cluster = %cluster, %identity, "no holder identity configured for the root publisher lease; using a random one");
    }
    let lease = LeaseSettings {
        namespace: settings.lease_namespace.clone(),
        name: settings.lease_name.clone(),
        identity,
        duration: settings.lease_duration,
    };
    let (elector, mut leader) = LeaderElector::new(client.clone(), cluster.clone(), lease);
    let notes = Arc::new(Notes::default());
    let publish = async move {
        loop {
            if leader.wait_for(|l| *l).await.is_err() {
                return;
            }
            let term = Term::new(
                client.clone(),
                cluster.clone(),
                settings.clone(),
                roots.clone(),
                notes.clone(),
            );
            tokio::select! {
                () = term.run() => {}
                _ = leader.wait_for(|l| !*l) => {
                    tracing::info!(cluster = %cluster, "stopped publishing roots (no longer leader)");
                }
            }
        }
    };
    tokio::select! {
        () = elector.run() => {}
        () = publish => {}
    }
}

/// Things logged once per `run`, not once per leadership term.
#[derive(Debug, Default)]
struct Notes {
    trust_bundle_unserved: AtomicBool,
    trust_bundle_refused: AtomicBool,
    trust_bundle_unusable_roots: AtomicBool,
    empty_roots: AtomicBool,
}

impl Notes {
    /// True the first time `flag` is raised.
    fn first(flag: &AtomicBool) -> bool {
        !flag.swap(true, Ordering::Relaxed)
    }
}

/// Objects kept by one watch, by key; replaced at the end of every (re)list
/// so that deletions missed while the watch was down disappear too.
#[derive(Debug)]
struct Mirror<V> {
    items: HashMap<String, Seen<V>>,
    relist: Option<HashMap<String, Seen<V>>>,
    synced: bool,
}

/// What was kept of one object, and which object it was.
#[derive(Debug)]
struct Seen<V> {
    uid: Option<String>,
    value: V,
}

impl<V> Default for Mirror<V> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            relist: None,
            synced: false,
        }
    }
}

/// What a watch event changed.
#[derive(Debug, PartialEq, Eq)]
enum Changed {
    Nothing,
    One(String),
    All,
}

impl<V> Mirror<V> {
    fn get(&self, key: &str) -> Option<&V> {
        self.items.get(key).map(|s| &s.value)
    }

    /// Records an object as written (ahead of its watch event).
    fn insert(&mut self, key: String, uid: Option<String>, value: V) {
        self.items.insert(key, Seen { uid, value });
    }

    fn handle<K: kube::Resource>(
        &mut self,
        event: watcher::Event<K>,
        key: impl Fn(&K) -> Option<String>,
        value: impl Fn(K) -> V,
    ) -> Changed {
        let seen = |obj: K| Seen {
            uid: obj.meta().uid.clone(),
            value: value(obj),
        };
        match event {
            watcher::Event::Apply(obj) => match key(&obj) {
                Some(k) => {
                    self.items.insert(k.clone(), seen(obj));
                    Changed::One(k)
                }
                None => Changed::Nothing,
            },
            watcher::Event::Delete(obj) => match key(&obj) {
                Some(k) => {
                    // The deletion of an object already replaced (by a
                    // write of ours) changes nothing.
                    let replaced = match (self.items.get(&k), obj.meta().uid.as_deref()) {
                        (Some(s), Some(uid)) => s.uid.as_deref().is_some_and(|u| u != uid),
                        _ => false,
                    };
                    if replaced {
                        return Changed::Nothing;
                    }
                    self.items.remove(&k);
                    Changed::One(k)
                }
                None => Changed::Nothing,
            },
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                Changed::Nothing
            }
            watcher::Event::InitApply(obj) => {
                if let Some(k) = key(&obj) {
                    self.relist
                        .get_or_insert_with(HashMap::new)
                        .insert(k, seen(obj));
                }
                Changed::Nothing
            }
            watcher::Event::InitDone => {
                self.items = self.relist.take().unwrap_or_default();
                self.synced = true;
                Changed::All
            }
        }
    }
}

/// What needs looking at.
#[derive(Debug, Default)]
struct Dirty {
    all: bool,
    namespaces: BTreeSet<String>,
    trust_bundle: bool,
}

/// Failed writes waiting for another try.
#[derive(Debug)]
struct Retry {
    namespaces: BTreeSet<String>,
    trust_bundle: bool,
    at: Option<Instant>,
    delay: Duration,
}

impl Retry {
    fn new() -> Self {
        Self {
            namespaces: BTreeSet::new(),
            trust_bundle: false,
            at: None,
            delay: RETRY_MIN,
        }
    }

    /// Arms the timer if anything failed, with exponential backoff; resets
    /// the backoff once everything went through.
    fn schedule(&mut self) {
        if self.namespaces.is_empty() && !self.trust_bundle {
            self.delay = RETRY_MIN;
            self.at = None;
        } else if self.at.is_none() {
            self.at = Some(Instant::now() + self.delay);
            self.delay = (self.delay * 2).min(RETRY_MAX);
        }
    }

    fn fire(&mut self, dirty: &mut Dirty) {
        self.at = None;
        dirty
            .namespaces
            .extend(std::mem::take(&mut self.namespaces));
        dirty.trust_bundle |= std::mem::take(&mut self.trust_bundle);
    }
}

/// Whether the trust bundle is published in this term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrustBundleState {
    /// Disabled, or not served by this API server.
    Off,
    /// Discovery failed; asked again at the next resync.
    Unchecked,
    Served,
}

/// How one ConfigMap write ended.
#[derive(Debug)]
enum WriteResult {
    Written(Box<ConfigMap>),
    /// Nothing to do after all (the namespace is gone or terminating).
    Skipped(&'static str),
    Failed(String),
}

type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// One leadership term: the watches, what they saw, and the writes.
struct Term {
    client: kube::Client,
    cluster: String,
    settings: RootPublisherConfig,
    roots: watch::Receiver<String>,
    roots_open: bool,
    notes: Arc<Notes>,
    namespaces: Mirror<bool>,
    configmaps: Mirror<ConfigMap>,
    trust_bundle: Mirror<ClusterTrustBundle>,
    trust_bundle_state: TrustBundleState,
    dirty: Dirty,
    retry: Retry,
}

impl Term {
    fn new(
        client: kube::Client,
        cluster: String,
        settings: RootPublisherConfig,
        mut roots: watch::Receiver<String>,
        notes: Arc<Notes>,
    ) -> Self {
        // A term starts from the current roots: changes before it are not news.
        roots.borrow_and_update();
        Self {
            client,
            cluster,
            settings,
            roots,
            roots_open: true,
            notes,
            namespaces: Mirror::default(),
            configmaps: Mirror::default(),
            trust_bundle: Mirror::default(),
            trust_bundle_state: TrustBundleState::Off,
            dirty: Dirty::default(),
            retry: Retry::new(),
        }
    }

    /// Publishes until dropped.
    async fn run(mut self) {
        tracing::info!(cluster = %self.cluster, configmaps = self.settings.configmap,
            selector = %self.settings.namespace_selector,
            cluster_trust_bundle = self.settings.cluster_trust_bundle, "publishing roots (leader)");
        let (mut ns_events, mut cm_events): (Events<Namespace>, Events<ConfigMap>) =
            if self.settings.configmap {
                let mut ns_config = watcher::Config::default().page_size(500);
                if !self.settings.namespace_selector.is_empty() {
                    ns_config = ns_config.labels(&self.settings.namespace_selector);
                }
                let cm_config = watcher::Config::default()
                    .page_size(500)
                    .fields(&format!("metadata.name={CONFIGMAP_NAME}"));
                (
                    watcher::watcher(Api::all(self.client.clone()), ns_config)
                        .default_backoff()
                        .boxed(),
                    watcher::watcher(Api::all(self.client.clone()), cm_config)
                        .default_backoff()
                        .boxed(),
                )
            } else {
                (stream::pending().boxed(), stream::pending().boxed())
            };
        let mut ctb_events = self.trust_bundle_events().await;
        let period = self.settings.resync.max(Duration::from_secs(1));
        let mut resync = tokio::time::interval_at(Instant::now() + period, period);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.dirty.trust_bundle = true;
        loop {
            let retry_at = self.retry.at;
            tokio::select! {
                Some(event) = ns_events.next() => match event {
                    Ok(event) => {
                        let changed = self.namespaces.handle(
                            event,
                            |ns: &Namespace| ns.metadata.name.clone(),
                            |ns| namespace_active(&ns),
                        );
                        self.dirty.mark(changed);
                    }
                    Err(e) => tracing::warn!(cluster = %self.cluster, error = %e, "namespace watch failed; retrying"),
                },
                Some(event) = cm_events.next() => match event {
                    Ok(event) => {
                        let changed = self.configmaps.handle(
                            event,
                            |cm: &ConfigMap| {
                                (cm.metadata.name.as_deref() == Some(CONFIGMAP_NAME))
                                    .then(|| cm.metadata.namespace.clone())
                                    .flatten()
                            },
                            |cm| cm,
                        );
                        self.dirty.mark(changed);
                    }
                    Err(e) => tracing::warn!(cluster = %self.cluster, error = %e, "root ConfigMap watch failed; retrying"),
                },
                Some(event) = ctb_events.next() => match event {
                    Ok(event) => {
                        let changed = self.trust_bundle.handle(
                            event,
                            |b: &ClusterTrustBundle| b.metadata.name.clone(),
                            |b| b,
                        );
                        if changed != Changed::Nothing {
                            self.dirty.trust_bundle = true;
                        }
                    }
                    Err(e) => tracing::warn!(cluster = %self.cluster, error = %e, "ClusterTrustBundle watch failed; retrying"),
                },
                changed = self.roots.changed(), if self.roots_open => {
                    if changed.is_ok() {
                        tracing::info!(cluster = %self.cluster, "roots changed; republishing");
                        self.dirty.all = true;
                        self.dirty.trust_bundle = true;
                    } else {
                        // The CA is gone; keep the last roots published.
                        self.roots_open = false;
                    }
                }
                _ = resync.tick() => {
                    self.dirty.all = true;
                    self.dirty.trust_bundle = true;
                    if self.trust_bundle_state == TrustBundleState::Unchecked {
                        ctb_events = self.trust_bundle_events().await;
                    }
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    self.retry.fire(&mut self.dirty);
                }
            }
            self.reconcile().await;
        }
    }

    /// Starts the trust bundle watch if it is wanted and served.
    async fn trust_bundle_events(&mut self) -> Events<ClusterTrustBundle> {
        self.trust_bundle_state = TrustBundleState::Off;
        if !self.settings.cluster_trust_bundle {
            return stream::pending().boxed();
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, trust_bundles_served(&self.client)).await {
            Ok(Ok(true)) => {
                self.trust_bundle_state = TrustBundleState::Served;
                let config = watcher::Config::default()
                    .fields(&format!("metadata.name={TRUST_BUNDLE_NAME}"));
                watcher::watcher(Api::all(self.client.clone()), config)
                    .default_backoff()
                    .boxed()
            }
            Ok(Ok(false)) => {
                if Notes::first(&self.notes.trust_bundle_unserved) {
                    tracing::warn!(cluster = %self.cluster,
                        "the API server does not serve ClusterTrustBundle (certificates.k8s.io/v1beta1); not publishing one");
                }
                stream::pending().boxed()
            }
            Ok(Err(e)) => {
                tracing::warn!(cluster = %self.cluster, error = %e,
                    "could not tell whether ClusterTrustBundle is served; asking again later");
                self.trust_bundle_state = TrustBundleState::Unchecked;
                stream::pending().boxed()
            }
            Err(_) => {
                tracing::warn!(cluster = %self.cluster,
                    "API discovery timed out; asking again later whether ClusterTrustBundle is served");
                self.trust_bundle_state = TrustBundleState::Unchecked;
                stream::pending().boxed()
            }
        }
    }

    async fn reconcile(&mut self) {
        let roots = self.roots.borrow().clone();
        if roots.trim().is_empty() {
            if Notes::first(&self.notes.empty_roots) {
                tracing::warn!(cluster = %self.cluster, "the root bundle is empty; publishing nothing");
            }
            return;
        }
        self.notes.empty_roots.store(false, Ordering::Relaxed);
        self.reconcile_configmaps(&roots).await;
        self.reconcile_trust_bundle(&roots).await;
        self.retry.schedule();
    }

    async fn reconcile_configmaps(&mut self, roots: &str) {
        if !self.settings.configmap || !self.namespaces.synced || !self.configmaps.synced {
            return;
        }
        let candidates: Vec<String> = if std::mem::take(&mut self.dirty.all) {
            self.dirty.namespaces.clear();
            self.namespaces.items.keys().cloned().collect()
        } else {
            std::mem::take(&mut self.dirty.namespaces)
                .into_iter()
                .collect()
        };
        let jobs: Vec<(String, ConfigMapAction)> = candidates
            .into_iter()
            .filter(|ns| self.namespaces.get(ns).copied().unwrap_or(false))
            .filter_map(
                |ns| match configmap_action(self.configmaps.get(&ns), roots) {
                    ConfigMapAction::Keep => None,
                    action => Some((ns, action)),
                },
            )
            .collect();
        if jobs.is_empty() {
            return;
        }
        let client = &self.client;
        let results: Vec<(String, WriteResult)> = stream::iter(jobs)
            .map(|(ns, action)| async move {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
                let result = match tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    write_configmap(&api, &ns, roots, &action),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => WriteResult::Failed(format!("no answer within {REQUEST_TIMEOUT:?}")),
                };
                (ns, result)
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        let mut written = Vec::new();
        let mut failed = Vec::new();
        for (ns, result) in results {
            match result {
                WriteResult::Written(cm) => {
                    tracing::debug!(cluster = %self.cluster, namespace = %ns, "root ConfigMap written");
                    self.configmaps
                        .insert(ns.clone(), cm.metadata.uid.clone(), *cm);
                    written.push(ns);
                }
                WriteResult::Skipped(why) => {
                    tracing::debug!(cluster = %self.cluster, namespace = %ns, why, "root ConfigMap not written");
                }
                WriteResult::Failed(e) => {
                    self.retry.namespaces.insert(ns.clone());
                    failed.push((ns, e));
                }
            }
        }
        if !written.is_empty() {
            written.sort();
            tracing::info!(cluster = %self.cluster, count = written.len(),
                namespaces = %preview(&written), "root ConfigMaps written");
        }
        if let Some((ns, e)) = failed.first() {
            tracing::warn!(cluster = %self.cluster, count = failed.len(), first_namespace = %ns,
                error = %e, "root ConfigMaps not written; retrying");
        }
    }

    async fn reconcile_trust_bundle(&mut self, roots: &str) {
        if self.trust_bundle_state != TrustBundleState::Served
            || !self.trust_bundle.synced
            || !std::mem::take(&mut self.dirty.trust_bundle)
        {
            return;
        }
        let bundle = match trust_bundle_pem(roots) {
            Ok(b) => b,
            Err(e) => {
                if Notes::first(&self.notes.trust_bundle_unusable_roots) {
                    tracing::warn!(cluster = %self.cluster, error = %e,
                        "the roots cannot be published as a ClusterTrustBundle");
                }
                return;
            }
        };
        self.notes
            .trust_bundle_unusable_roots
            .store(false, Ordering::Relaxed);
        if self
            .trust_bundle
            .get(TRUST_BUNDLE_NAME)
            .is_some_and(|b| trust_bundle_up_to_date(b, &bundle))
        {
            return;
        }
        let api: Api<ClusterTrustBundle> = Api::all(self.client.clone());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let desired = desired_trust_bundle(&bundle);
        let result = tokio::time::timeout(
            REQUEST_TIMEOUT,
            api.patch(TRUST_BUNDLE_NAME, &params, &Patch::Apply(&desired)),
        )
        .await;
        match result {
            Ok(Ok(written)) => {
                tracing::info!(cluster = %self.cluster, name = TRUST_BUNDLE_NAME, "ClusterTrustBundle written");
                self.notes
                    .trust_bundle_refused
                    .store(false, Ordering::Relaxed);
                let uid = written.metadata.uid.clone();
                self.trust_bundle
                    .insert(TRUST_BUNDLE_NAME.to_owned(), uid, written);
            }
            // Refused (RBAC, validation): no point retrying before the
            // next resync or roots change.
            Ok(Err(kube::Error::Api(s))) if s.is_forbidden() || s.is_invalid() => {
                if Notes::first(&self.notes.trust_bundle_refused) {
                    tracing::warn!(cluster = %self.cluster, name = TRUST_BUNDLE_NAME, error = %s.message,
                        "the API server refused the ClusterTrustBundle; carrying on without it");
                } else {
                    tracing::debug!(cluster = %self.cluster, error = %s.message, "ClusterTrustBundle still refused");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(cluster = %self.cluster, error = %e, "ClusterTrustBundle not written; retrying");
                self.retry.trust_bundle = true;
            }
            Err(_) => {
                tracing::warn!(cluster = %self.cluster, "ClusterTrustBundle write timed out; retrying");
                self.retry.trust_bundle = true;
            }
        }
    }
}

impl Dirty {
    fn mark(&mut self, changed: Changed) {
        match changed {
            Changed::Nothing => {}
            Changed::One(k) => {
                self.namespaces.insert(k);
            }
            Changed::All => self.all = true,
        }
    }
}

/// Up to five names, for a log line.
fn preview(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(",");
    if names.len() > 5 {
        s.push_str(",…");
    }
    s
}

/// Whether the API server serves `ClusterTrustBundle` at the version meshsign speaks.
async fn trust_bundles_served(client: &kube::Client) -> Result<bool, kube::Error> {
    use k8s_openapi::Resource as _;
    match client
        .list_api_group_resources(ClusterTrustBundle::API_VERSION)
        .await
    {
        Ok(list) => Ok(list
            .resources
            .iter()
            .any(|r| r.name == ClusterTrustBundle::URL_PATH_SEGMENT)),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Carries out one ConfigMap action.
async fn write_configmap(
    api: &Api<ConfigMap>,
    namespace: &str,
    roots: &str,
    action: &ConfigMapAction,
) -> WriteResult {
    if let ConfigMapAction::Recreate {
        uid,
        resource_version,
    } = action
    {
        tracing::info!(
            namespace,
            "root ConfigMap cannot be updated in place; replacing it"
        );
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: uid.clone(),
                resource_version: resource_version.clone(),
            }),
            ..Default::default()
        };
        match api.delete(CONFIGMAP_NAME, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return classify(e),
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api
        .patch(
            CONFIGMAP_NAME,
            &params,
            &Patch::Apply(&desired_configmap(namespace, roots)),
        )
        .await
    {
        Ok(cm) => WriteResult::Written(Box::new(cm)),
        Err(e) => classify(e),
    }
}

fn classify(e: kube::Error) -> WriteResult {
    match &e {
        kube::Error::Api(s) if s.is_not_found() => WriteResult::Skipped("namespace not found"),
        // NamespaceLifecycle: "unable to create new content in namespace X
        // because it is being terminated".
        kube::Error::Api(s) if s.is_forbidden() && s.message.contains("being terminated") => {
            WriteResult::Skipped("namespace terminating")
        }
        _ => WriteResult::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NamespaceStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const ROOTS: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn existing(data: Option<&str>) -> ConfigMap {
        let mut cm = desired_configmap("a", ROOTS);
        cm.metadata.uid = Some("u1".into());
        cm.metadata.resource_version = Some("9".into());
        cm.data = data.map(|d| {
            [
                (CONFIGMAP_KEY.to_owned(), d.to_owned()),
                ("extra".to_owned(), "kept".to_owned()),
            ]
            .into()
        });
        cm
    }

    fn deleted_at() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())
    }

    #[test]
    fn desired_configmap_holds_the_roots_and_labels() {
        let cm = desired_configmap("ns1", ROOTS);
        assert_eq!(cm.metadata.name.as_deref(), Some(CONFIGMAP_NAME));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("ns1"));
        assert_eq!(cm.data.as_ref().unwrap()[CONFIGMAP_KEY], ROOTS);
        assert_eq!(cm.data.as_ref().unwrap().len(), 1);
        let labels = cm.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["istio.io/config"], "true");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "meshsign");
        // Server-side apply needs apiVersion and kind in the body.
        let json = serde_json::to_value(&cm).unwrap();
        assert_eq!(json["apiVersion"], "v1");
        assert_eq!(json["kind"], "ConfigMap");
    }

    #[test]
    fn configmap_actions() {
        assert_eq!(configmap_action(None, ROOTS), ConfigMapAction::Apply);
        // Up to date, with someone else's extra key: left alone.
        assert_eq!(
            configmap_action(Some(&existing(Some(ROOTS))), ROOTS),
            ConfigMapAction::Keep
        );
        // Edited, emptied, or roots changed: apply.
        assert_eq!(
            configmap_action(Some(&existing(Some("x"))), ROOTS),
            ConfigMapAction::Apply
        );
        assert_eq!(
            configmap_action(Some(&existing(None)), ROOTS),
            ConfigMapAction::Apply
        );
        assert_eq!(
            configmap_action(Some(&existing(Some(ROOTS))), "new roots"),
            ConfigMapAction::Apply
        );
        // Our labels removed: apply.
        let mut unlabeled = existing(Some(ROOTS));
        unlabeled.metadata.labels = None;
        assert_eq!(
            configmap_action(Some(&unlabeled), ROOTS),
            ConfigMapAction::Apply
        );
        // Being deleted: wait for it to go.
        let mut deleting = existing(Some("x"));
        deleting.metadata.deletion_timestamp = Some(deleted_at());
        assert_eq!(
            configmap_action(Some(&deleting), ROOTS),
            ConfigMapAction::Keep
        );
        // Immutable with other roots: delete that exact object, then create.
        let mut frozen = existing(Some("x"));
        frozen.immutable = Some(true);
        assert_eq!(
            configmap_action(Some(&frozen), ROOTS),
            ConfigMapAction::Recreate {
                uid: Some("u1".into()),
                resource_version: Some("9".into())
            }
        );
        // Immutable but right: keep; only labels missing: labels can be applied.
        frozen.data = existing(Some(ROOTS)).data;
        assert_eq!(
            configmap_action(Some(&frozen), ROOTS),
            ConfigMapAction::Keep
        );
        frozen.metadata.labels = None;
        assert_eq!(
            configmap_action(Some(&frozen), ROOTS),
            ConfigMapAction::Apply
        );
        // The key under binaryData: data cannot hold it too.
        let mut binary = existing(None);
        binary.binary_data = Some(
            [(
                CONFIGMAP_KEY.to_owned(),
                k8s_openapi::ByteString(b"x".to_vec()),
            )]
            .into(),
        );
        assert!(matches!(
            configmap_action(Some(&binary), ROOTS),
            ConfigMapAction::Recreate { .. }
        ));
    }

    #[test]
    fn terminating_namespaces_are_skipped() {
        let mut ns = Namespace::default();
        assert!(namespace_active(&ns));
        ns.status = Some(NamespaceStatus {
            phase: Some("Active".into()),
            ..Default::default()
        });
        assert!(namespace_active(&ns));
        ns.status = Some(NamespaceStatus {
            phase: Some("Terminating".into()),
            ..Default::default()
        });
        assert!(!namespace_active(&ns));
        let mut deleting = Namespace::default();
        deleting.metadata.deletion_timestamp = Some(deleted_at());
        assert!(!namespace_active(&deleting));
    }

    fn root_pem(cn: &str) -> String {
        let spec = crate::ca::generate::CaSpec {
            organization: "test".into(),
            common_name: cn.into(),
            locality: None,
            key_type: crate::ca::generate::KeyType::EcdsaP256,
            validity: ::time::Duration::days(1),
            path_len: None,
        };
        crate::ca::generate::root(&spec, ::time::OffsetDateTime::now_utc())
            .unwrap()
            .cert_pem
    }

    #[test]
    fn trust_bundle_is_plain_deduplicated_certificates() {
        let (a, b) = (root_pem("a"), root_pem("b"));
        let messy = format!("# comment\n{a}\r\n{b}{a}");
        let bundle = trust_bundle_pem(&messy).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(!bundle.contains('#') && !bundle.contains('\r'));
        assert_eq!(
            crate::pki::parse_certificates(bundle.as_bytes()).unwrap(),
            crate::pki::parse_certificates(format!("{a}{b}").as_bytes()).unwrap()
        );
        assert!(trust_bundle_pem("").is_err());
        assert!(
            trust_bundle_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .is_err()
        );

        let desired = desired_trust_bundle(&bundle);
        assert_eq!(desired.metadata.name.as_deref(), Some(TRUST_BUNDLE_NAME));
        assert_eq!(
            desired.spec.signer_name.as_deref(),
            Some(TRUST_BUNDLE_SIGNER)
        );
        // The API server wants the name prefixed by the signer, '/' as ':'.
        assert!(
            TRUST_BUNDLE_NAME.starts_with(&format!("{}:", TRUST_BUNDLE_SIGNER.replace('/', ":")))
        );
        assert!(trust_bundle_up_to_date(&desired, &bundle));
        assert!(!trust_bundle_up_to_date(
            &desired,
            &trust_bundle_pem(&a).unwrap()
        ));
        let mut other_signer = desired.clone();
        other_signer.spec.signer_name = None;
        assert!(!trust_bundle_up_to_date(&other_signer, &bundle));
    }

    fn named(name: &str, uid: &str) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.name = (!name.is_empty()).then(|| name.to_owned());
        ns.metadata.uid = Some(uid.to_owned());
        ns
    }

    #[test]
    fn mirror_replaces_everything_at_each_list() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut m: Mirror<String> = Mirror::default();
        let key = |ns: &Namespace| ns.metadata.name.clone();
        let value = |ns: Namespace| ns.metadata.uid.unwrap_or_default();
        assert_eq!(m.handle(Init, key, value), Changed::Nothing);
        assert_eq!(
            m.handle(InitApply(named("a", "1")), key, value),
            Changed::Nothing
        );
        assert!(!m.synced && m.get("a").is_none());
        assert_eq!(m.handle(InitDone, key, value), Changed::All);
        assert!(m.synced);
        assert_eq!(m.get("a").map(String::as_str), Some("1"));
        assert_eq!(
            m.handle(Apply(named("b", "2")), key, value),
            Changed::One("b".into())
        );
        assert_eq!(
            m.handle(Delete(named("a", "1")), key, value),
            Changed::One("a".into())
        );
        assert!(m.get("a").is_none());
        assert_eq!(
            m.handle(Apply(named("", "3")), key, value),
            Changed::Nothing
        );

        // Written by us (a new object), then the old one's deletion arrives.
        m.insert("b".into(), Some("4".into()), "4".into());
        assert_eq!(
            m.handle(Delete(named("b", "2")), key, value),
            Changed::Nothing
        );
        assert_eq!(m.get("b").map(String::as_str), Some("4"));

        // A re-list drops what it no longer contains.
        m.handle(Init, key, value);
        m.handle(InitApply(named("c", "5")), key, value);
        assert!(
            m.get("b").is_some(),
            "the old view answers until the list is complete"
        );
        m.handle(InitDone, key, value);
        assert_eq!(m.items.keys().collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn retry_backs_off_and_resets() {
        let mut r = Retry::new();
        let mut dirty = Dirty::default();
        r.schedule();
        assert!(r.at.is_none());
        r.namespaces.insert("a".into());
        r.schedule();
        assert!(r.at.is_some());
        assert_eq!(r.delay, Duration::from_secs(2));
        r.fire(&mut dirty);
        assert!(dirty.namespaces.contains("a") && r.namespaces.is_empty() && r.at.is_none());
        for _ in 0..10 {
            r.trust_bundle = true;
            r.schedule();
            r.fire(&mut dirty);
        }
        assert_eq!(r.delay, RETRY_MAX);
        r.schedule();
        assert_eq!(r.delay, RETRY_MIN);
    }
}
