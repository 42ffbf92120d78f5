//! A watch-backed cache of a cluster's pods, indexed by node: what node
//! authorization reads on every impersonated request, so no request makes an
//! API call.
//!
//! For each pod it keeps only what the node authorizer needs (UID, service
//! account, node, whether it has failed), and for each node how many
//! non-failed pods of each `(namespace, service account)` run there. The
//! cache reports itself synced only after the first complete list; until
//! then (and the requests that need it get `UNAVAILABLE`) nothing is
//! answered from a partial view.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

/// What the node authorizer needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub uid: String,
    pub service_account: String,
    pub node: String,
    pub failed: bool,
}

impl PodRecord {
    fn of(pod: &Pod) -> Option<(PodKey, PodRecord)> {
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
    pub fn apply(&self, pod: &Pod) {
        if let (Some((key, record)), Ok(mut index)) = (PodRecord::of(pod), self.index.write()) {
            index.insert(key, record);
        }
    }

    /// Removes a pod.
    pub fn delete(&self, pod: &Pod) {
        if let (Some(ns), Some(name), Ok(mut index)) = (
            pod.metadata.namespace.clone(),
            pod.metadata.name.clone(),
            self.index.write(),
        ) {
            index.remove(&(ns, name));
        }
    }

    /// Replaces everything with a complete list and marks the cache synced.
    pub fn replace_all(&self, pods: &[Pod]) {
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
        let api: kube::Api<Pod> = kube::Api::all(client);
        let config = watcher::Config::default().page_size(500);
        let mut events = watcher::watcher(api, config).boxed();
        let mut relist: Vec<Pod> = Vec::new();
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
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    pub fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
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
