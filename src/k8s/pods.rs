//! A watch-backed cache of a cluster's pods, indexed by node: what node
//! authorization reads on every impersonated request, so no request makes an
//! API call.
//!
//! The watch decodes only what the node authorizer needs ([`PodView`]: name,
//! namespace, UID, service account, node, phase), not the whole Pod: less
//! work per event, and none of the Pod type's decoding code in the binary.
//! For each pod it keeps those fields, and for each node how many
//! non-failed pods of each `(namespace, service account)` run there. The
//! cache reports itself synced only after the first complete list; until
//! then (and the requests that need it get `UNAVAILABLE`) nothing is
//! answered from a partial view.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::ObjectMeta;
use kube::runtime::watcher;
use serde::Deserialize;

/// A Pod as the watch decodes it: the fields node authorization reads,
/// every other field skipped.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodView {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PodViewSpec>,
    #[serde(default)]
    pub status: Option<PodViewStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewSpec {
    pub node_name: Option<String>,
    pub service_account_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodViewStatus {
    pub phase: Option<String>,
}

impl k8s_openapi::Resource for PodView {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PodView {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What the node authorizer needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub uid: String,
    pub service_account: String,
    pub node: String,
    pub failed: bool,
}

impl PodRecord {
    fn of(pod: &PodView) -> Option<(PodKey, PodRecord)> {
        let namespace = pod.metadata.namespace.clone()?;
        let name = pod.metadata.name.clone()?;
        let spec = pod.spec.as_ref();
        let record = PodRecord {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            failed: pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Failed"),
        };
        Some(((namespace, name), record))
    }
}

type PodKey = (String, String);

#[derive(Debug, Default)]
struct PodIndex {
    pods: HashMap<PodKey, PodRecord>,
    /// node → (namespace, service account) → non-failed pods.
    by_node: HashMap<String, HashMap<(String, String), u32>>,
}

impl PodIndex {
    fn insert(&mut self, key: PodKey, record: PodRecord) {
        self.remove(&key);
        if !record.failed && !record.node.is_empty() {
            *self
                .by_node
                .entry(record.node.clone())
                .or_default()
                .entry((key.0.clone(), record.service_account.clone()))
                .or_default() += 1;
        }
        self.pods.insert(key, record);
    }

    fn remove(&mut self, key: &PodKey) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        if old.failed || old.node.is_empty() {
            return;
        }
        if let Some(accounts) = self.by_node.get_mut(&old.node) {
            let account = (key.0.clone(), old.service_account);
            if let Some(n) = accounts.get_mut(&account) {
                *n -= 1;
                if *n == 0 {
                    accounts.remove(&account);
                }
            }
            if accounts.is_empty() {
                self.by_node.remove(&old.node);
            }
        }
    }
}

/// The pods of one cluster.
#[derive(Debug, Default)]
pub struct PodCache {
    index: RwLock<PodIndex>,
    synced: AtomicBool,
}

impl PodCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the first complete list has been applied.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The pod `namespace/name`, if it exists.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodRecord> {
        let index = self.index.read().ok()?;
        index
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Whether a non-failed pod running as `namespace/service_account` is on `node`.
    pub fn account_runs_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let Ok(index) = self.index.read() else {
            return false;
        };
        index.by_node.get(node).is_some_and(|accounts| {
            accounts.contains_key(&(namespace.to_owned(), service_account.to_owned()))
        })
    }

    /// Number of pods held.
    pub fn len(&self) -> usize {
        self.index.read().map_or(0, |i| i.pods.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds or updates a pod.
    pub fn apply(&self, pod: &PodView) {
        if let (Some((key, record)), Ok(mut index)) = (PodRecord::of(pod), self.index.write()) {
            index.insert(key, record);
        }
    }

    /// Removes a pod.
    pub fn delete(&self, pod: &PodView) {
        if let (Some(ns), Some(name), Ok(mut index)) = (
            pod.metadata.namespace.clone(),
            pod.metadata.name.clone(),
            self.index.write(),
        ) {
            index.remove(&(ns, name));
        }
    }

    /// Replaces everything with a complete list and marks the cache synced.
    pub fn replace_all(&self, pods: &[PodView]) {
        let mut fresh = PodIndex::default();
        for pod in pods {
            if let Some((key, record)) = PodRecord::of(pod) {
                fresh.insert(key, record);
            }
        }
        if let Ok(mut index) = self.index.write() {
            *index = fresh;
        }
        self.synced.store(true, Ordering::Release);
    }

    /// Keeps the cache in step with the cluster for as long as the task runs:
    /// a list, then a watch, re-listed (with backoff) whenever the watch
    /// breaks. While re-listing, the previous view keeps answering.
    pub async fn run(self: std::sync::Arc<Self>, client: kube::Client, cluster: String) {
        let api: kube::Api<PodView> = kube::Api::all(client);
        let config = watcher::Config::default().page_size(500);
        let mut events = watcher::watcher(api, config).boxed();
        let mut relist: Vec<PodView> = Vec::new();
        let mut failures = 0u32;
        loop {
            match events.next().await {
                Some(Ok(event)) => {
                    failures = 0;
                    match event {
                        watcher::Event::Apply(pod) => self.apply(&pod),
                        watcher::Event::Delete(pod) => self.delete(&pod),
                        watcher::Event::Init => relist.clear(),
                        watcher::Event::InitApply(pod) => relist.push(pod),
                        watcher::Event::InitDone => {
                            self.replace_all(&relist);
                            tracing::debug!(cluster = %cluster, pods = relist.len(), "pod cache synced");
                            relist = Vec::new();
                        }
                    }
                }
                Some(Err(e)) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(cluster = %cluster, error = %e, "pod watch failed; retrying");
                    let secs = 1u64 << failures.min(5);
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
                None => {
                    tracing::error!(cluster = %cluster, "pod watch ended");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> PodView {
        PodView {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodViewSpec {
                service_account_name: Some(sa.into()),
                node_name: Some(node.into()),
            }),
            status: Some(PodViewStatus {
                phase: Some(phase.into()),
            }),
        }
    }

    #[test]
    fn a_pod_from_the_api_decodes_into_the_view() {
        let json = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"n","uid":"u","labels":{"a":"b"}},
            "spec":{"containers":[{"name":"c","image":"i","ports":[{"containerPort":80}]}],"nodeName":"node-1","serviceAccountName":"sa","volumes":[{"name":"v","emptyDir":{}}]},
            "status":{"phase":"Failed","conditions":[{"type":"Ready","status":"False"}]}}"#;
        let pod: PodView = serde_json::from_str(json).unwrap();
        let (key, record) = PodRecord::of(&pod).unwrap();
        assert_eq!(key, ("n".to_owned(), "p".to_owned()));
        assert_eq!(
            record,
            PodRecord {
                uid: "u".into(),
                service_account: "sa".into(),
                node: "node-1".into(),
                failed: true
            }
        );
        // No spec (a partial object): the "default" account, no node.
        let bare: PodView =
            serde_json::from_str(r#"{"metadata":{"name":"p","namespace":"n"}}"#).unwrap();
        let (_, record) = PodRecord::of(&bare).unwrap();
        assert_eq!(
            (record.service_account.as_str(), record.node.as_str()),
            ("default", "")
        );
    }

    #[test]
    fn node_index_follows_updates_and_deletes() {
        let cache = PodCache::new();
        assert!(!cache.is_synced());
        cache.replace_all(&[pod("a", "p1", "u1", "web", "n1", "Running")]);
        assert!(cache.is_synced());
        assert!(cache.account_runs_on_node("n1", "a", "web"));
        assert!(!cache.account_runs_on_node("n2", "a", "web"));

        // A second replica on the same node, then the first one fails.
        cache.apply(&pod("a", "p2", "u2", "web", "n1", "Running"));
        cache.apply(&pod("a", "p1", "u1", "web", "n1", "Failed"));
        assert!(cache.account_runs_on_node("n1", "a", "web"));
        cache.delete(&pod("a", "p2", "u2", "web", "n1", "Running"));
        assert!(
            !cache.account_runs_on_node("n1", "a", "web"),
            "only a failed pod left"
        );
        assert_eq!(cache.pod("a", "p1").map(|p| p.failed), Some(true));

        // Moving a pod's record (e.g. re-created on another node) moves the count.
        cache.apply(&pod("a", "p1", "u3", "web", "n2", "Pending"));
        assert!(cache.account_runs_on_node("n2", "a", "web"));
        assert!(!cache.account_runs_on_node("n1", "a", "web"));

        // A relist replaces everything.
        cache.replace_all(&[]);
        assert!(cache.is_empty());
        assert!(!cache.account_runs_on_node("n2", "a", "web"));
    }
}
