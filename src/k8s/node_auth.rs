//! Node authorization: may this caller get a certificate for another
//! workload? ztunnel, in its normal (shared, per-node) mode, asks for every
//! pod on its node with its own token and `ImpersonatedIdentity` metadata.
//!
//! The rules are istiod's (`security/pkg/server/ca/node_auth.go`), in its
//! order:
//! 1. the caller's service account is one of the trusted node accounts;
//! 2. the requested identity is `spiffe://<trust domain>/ns/<ns>/sa/<sa>`
//!    (meshsign also requires the mesh's own trust domain);
//! 3. the caller's pod (from its token) exists,
//! 4. with the UID in the token,
//! 5. and runs as the caller's service account;
//! 6. a non-failed pod of the requested service account runs on the
//!    caller's pod's node.
//!
//! Everything is read from the cluster's [`PodCache`]; no request makes an
//! API call.

use std::collections::HashSet;

use super::pods::PodCache;
use crate::auth::CallerIdentity;
use crate::spiffe::SpiffeId;

/// Why an impersonation was refused. Shown in the log only; the caller sees
/// istiod's fixed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeAuthError {
    #[error("{caller} asked to impersonate {requested:?}, but no node authorizer is configured (kubernetes.trusted_node_accounts)")]
    NotConfigured { caller: String, requested: String },
    #[error("caller {0} is not allowed to impersonate (not a trusted node account)")]
    NotTrusted(String),
    #[error("failed to validate impersonated identity {0:?}")]
    InvalidIdentity(String),
    #[error("impersonated identity {requested} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        requested: String,
        trust_domain: String,
    },
    #[error("caller {0} has no pod in its credentials (a pod-bound token is required)")]
    NoPod(String),
    #[error("cluster {0} has no pod cache (node authorization is not configured for it)")]
    NoPodCache(String),
    #[error("the pod cache of cluster {0} is not synced yet")]
    NotSynced(String),
    #[error("pod {0} not found")]
    PodNotFound(String),
    #[error("pod {pod} found, but UID does not match: {expected} vs {actual}")]
    UidMismatch {
        pod: String,
        expected: String,
        actual: String,
    },
    #[error("pod {pod} found, but ServiceAccount does not match: {expected} vs {actual}")]
    ServiceAccountMismatch {
        pod: String,
        expected: String,
        actual: String,
    },
    #[error("no instances of {identity} found on node {node:?}")]
    NotOnNode { identity: String, node: String },
}

impl NodeAuthError {
    /// True when the answer may change by itself soon (cache still syncing):
    /// `UNAVAILABLE` instead of a refusal.
    pub fn is_transient(&self) -> bool {
        matches!(self, NodeAuthError::NotSynced(_))
    }
}

/// The trusted node accounts.
#[derive(Debug, Clone, Default)]
pub struct NodeAuthorizer {
    trusted: HashSet<(String, String)>,
}

impl NodeAuthorizer {
    pub fn new(trusted: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            trusted: trusted.into_iter().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.trusted.is_empty()
    }

    /// Checks the rules in the module docs; on success returns the identity
    /// to issue.
    pub fn authorize(
        &self,
        caller: &CallerIdentity,
        cluster: &str,
        pods: Option<&PodCache>,
        requested: &str,
        trust_domain: &str,
    ) -> Result<SpiffeId, NodeAuthError> {
        let (ns, sa) = (caller.id.namespace(), caller.id.service_account());
        if !self.trusted.contains(&(ns.to_owned(), sa.to_owned())) {
            return Err(NodeAuthError::NotTrusted(caller.id.to_string()));
        }
        let shown = || requested.chars().take(120).collect::<String>();
        let target =
            SpiffeId::parse(requested).map_err(|_| NodeAuthError::InvalidIdentity(shown()))?;
        if target.trust_domain() != trust_domain {
            return Err(NodeAuthError::ForeignTrustDomain {
                requested: shown(),
                trust_domain: trust_domain.to_owned(),
            });
        }
        let pod = caller
            .pod
            .as_ref()
            .ok_or_else(|| NodeAuthError::NoPod(caller.id.to_string()))?;
        let pods = pods.ok_or_else(|| NodeAuthError::NoPodCache(cluster.to_owned()))?;
        if !pods.is_synced() {
            return Err(NodeAuthError::NotSynced(cluster.to_owned()));
        }
        let pod_name = || format!("{ns}/{}", pod.name);
        let record = pods
            .pod(ns, &pod.name)
            .ok_or_else(|| NodeAuthError::PodNotFound(pod_name()))?;
        if record.uid != pod.uid {
            return Err(NodeAuthError::UidMismatch {
                pod: pod_name(),
                expected: pod.uid.clone(),
                actual: record.uid,
            });
        }
        if record.service_account != sa {
            return Err(NodeAuthError::ServiceAccountMismatch {
                pod: pod_name(),
                expected: sa.to_owned(),
                actual: record.service_account,
            });
        }
        if record.node.is_empty()
            || !pods.account_runs_on_node(
                &record.node,
                target.namespace(),
                target.service_account(),
            )
        {
            return Err(NodeAuthError::NotOnNode {
                identity: target.to_string(),
                node: record.node,
            });
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthSource, PodInfo};
    use crate::k8s::pods::tests::pod;

    const TD: &str = "cluster.local";

    fn ztunnel(pod_name: &str, uid: &str) -> CallerIdentity {
        CallerIdentity {
            id: SpiffeId::new(TD, "istio-system", "ztunnel").unwrap(),
            source: AuthSource::TokenReview {
                cluster: "Kubernetes".into(),
            },
            pod: Some(PodInfo {
                name: pod_name.into(),
                uid: uid.into(),
            }),
            cluster: None,
        }
    }

    fn cache() -> PodCache {
        let c = PodCache::new();
        c.replace_all(&[
            pod(
                "istio-system",
                "ztunnel-a",
                "uid-a",
                "ztunnel",
                "node-a",
                "Running",
            ),
            pod(
                "istio-system",
                "ztunnel-b",
                "uid-b",
                "ztunnel",
                "node-b",
                "Running",
            ),
            pod(
                "istio-system",
                "agent-x",
                "x1",
                "other-agent",
                "node-a",
                "Running",
            ),
            pod("default", "sleep-1", "s1", "sleep", "node-a", "Running"),
            pod("default", "crashed", "c1", "crash", "node-a", "Failed"),
            pod("other", "web-1", "w1", "web", "node-b", "Running"),
        ]);
        c
    }

    fn authorize(
        trusted: &[(&str, &str)],
        caller: &CallerIdentity,
        pods: Option<&PodCache>,
        requested: &str,
    ) -> Result<SpiffeId, NodeAuthError> {
        NodeAuthorizer::new(trusted.iter().map(|(a, b)| (a.to_string(), b.to_string()))).authorize(
            caller,
            "Kubernetes",
            pods,
            requested,
            TD,
        )
    }

    #[test]
    fn istiod_cases() {
        let pods = cache();
        let trusted = [("istio-system", "ztunnel")];
        let me = ztunnel("ztunnel-a", "uid-a");
        let sleep = "spiffe://cluster.local/ns/default/sa/sleep";

        let id = authorize(&trusted, &me, Some(&pods), sleep).unwrap();
        assert_eq!(id.to_string(), sleep);

        // "empty allowed identities"
        assert!(matches!(
            authorize(&[], &me, Some(&pods), sleep),
            Err(NodeAuthError::NotTrusted(_))
        ));
        // "allowed identities, off node": web runs on node-b only.
        assert!(matches!(
            authorize(
                &trusted,
                &me,
                Some(&pods),
                "spiffe://cluster.local/ns/other/sa/web"
            ),
            Err(NodeAuthError::NotOnNode { .. })
        ));
        // ...but ztunnel-b on node-b may.
        authorize(
            &trusted,
            &ztunnel("ztunnel-b", "uid-b"),
            Some(&pods),
            "spiffe://cluster.local/ns/other/sa/web",
        )
        .unwrap();
        // A failed pod does not count.
        assert!(matches!(
            authorize(
                &trusted,
                &me,
                Some(&pods),
                "spiffe://cluster.local/ns/default/sa/crash"
            ),
            Err(NodeAuthError::NotOnNode { .. })
        ));
        // "invalid requested"
        for bad in [
            "spiffe://cluster.local/ns/default",
            "not a uri",
            "spiffe://cluster.local/ns/a/sa/b/c",
        ] {
            assert!(matches!(
                authorize(&trusted, &me, Some(&pods), bad),
                Err(NodeAuthError::InvalidIdentity(_))
            ));
        }
        assert!(matches!(
            authorize(
                &trusted,
                &me,
                Some(&pods),
                "spiffe://evil.example/ns/default/sa/sleep"
            ),
            Err(NodeAuthError::ForeignTrustDomain { .. })
        ));
        // "unknown caller"
        assert!(matches!(
            authorize(&trusted, &ztunnel("ztunnel-x", "uid-a"), Some(&pods), sleep),
            Err(NodeAuthError::PodNotFound(_))
        ));
        // "bad UID"
        assert!(matches!(
            authorize(&trusted, &ztunnel("ztunnel-a", "other"), Some(&pods), sleep),
            Err(NodeAuthError::UidMismatch { .. })
        ));
        // "bad account": a trusted caller whose token names someone else's pod.
        assert!(matches!(
            authorize(&trusted, &ztunnel("agent-x", "x1"), Some(&pods), sleep),
            Err(NodeAuthError::ServiceAccountMismatch { .. })
        ));
        // No pod in the token, no cache, cache not synced.
        let mut no_pod = me.clone();
        no_pod.pod = None;
        assert!(matches!(
            authorize(&trusted, &no_pod, Some(&pods), sleep),
            Err(NodeAuthError::NoPod(_))
        ));
        assert!(matches!(
            authorize(&trusted, &me, None, sleep),
            Err(NodeAuthError::NoPodCache(_))
        ));
        let unsynced = PodCache::new();
        let e = authorize(&trusted, &me, Some(&unsynced), sleep).unwrap_err();
        assert!(e.is_transient(), "{e}");
    }
}
