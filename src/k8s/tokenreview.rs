//! Bearer tokens checked by the cluster's API server (`TokenReview`), as
//! istiod's `KubeJWTAuthenticator` does, with a cache in front.
//!
//! A review answers more than an offline JWT check: the API server also
//! refuses a token whose pod or service account has been deleted. Asking it
//! for every request would put a renewal storm (or a ztunnel asking for a
//! hundred pods with one token) straight onto the API server, so results are
//! cached:
//!
//! * keyed by the SHA-256 of the token, never the token itself;
//! * until the token's `exp` or `cache_ttl` after the review, whichever is
//!   first: `cache_ttl` is the longest a deleted pod's token keeps working;
//! * refusals too (a forged token is not re-reviewed on every retry);
//! * concurrent requests with the same uncached token share one review;
//! * at most `cache_size` entries: expired ones go first, then those that
//!   expire soonest;
//! * at most `max_concurrent` reviews in flight per cluster, each with a
//!   deadline.
//!
//! When the API server cannot answer (down, slow, or meshsign lacks the
//! `system:auth-delegator` binding), cached tokens keep working until their
//! entry expires and uncached tokens get [`ReviewError::Unavailable`]
//! (`UNAVAILABLE`, which istio-agent and ztunnel retry with backoff), not a
//! refusal: an outage is not the caller's fault. Nothing is cached then.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use tokio::sync::{watch, Semaphore};

use crate::auth::PodInfo;
use crate::clock::Clock;

/// `user.extra` keys a pod-bound token's review carries.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// The group every service account is in.
const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";
/// Longest token sent for review (Kubernetes tokens are ~1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The service account (and pod) a reviewed token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedAccount {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<PodInfo>,
}

/// What the API server said about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReviewOutcome {
    Authenticated(ReviewedAccount),
    /// Not authenticated, or not a service account; the reason is for the log.
    Refused(String),
}

/// Why a token could not be reviewed or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The token is not a JWT that could ever pass (refused without asking).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The token's own `exp` has passed (refused without asking).
    #[error("token expired")]
    Expired,
    /// The API server refused the token.
    #[error("token review refused the token: {0}")]
    Refused(String),
    /// No answer: the API server is unreachable, slow, overloaded or
    /// forbids meshsign to review tokens.
    #[error("token review unavailable: {0}")]
    Unavailable(String),
}

/// A future returned by [`TokenReviewer`].
pub type ReviewFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ReviewOutcome, ReviewError>> + Send + 'a>>;

/// Something that can review a token: the API server, or a test double.
pub trait TokenReviewer: Send + Sync + fmt::Debug + 'static {
    fn review<'a>(&'a self, token: &'a str, audiences: &'a [String]) -> ReviewFuture<'a>;
}

/// Reviews tokens with `POST /apis/authentication.k8s.io/v1/tokenreviews`.
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: kube::Client,
    cluster: String,
}

impl fmt::Debug for KubeTokenReviewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeTokenReviewer")
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client, cluster: String) -> Self {
        Self { client, cluster }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, token: &'a str, audiences: &'a [String]) -> ReviewFuture<'a> {
        Box::pin(async move {
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: Some(audiences.to_vec()),
                },
                ..Default::default()
            };
            match api.create(&PostParams::default(), &review).await {
                Ok(answer) => Ok(outcome_of(answer.status.as_ref())),
                Err(kube::Error::Api(status)) if status.code == 403 => {
                    tracing::error!(
                        cluster = %self.cluster,
                        "TokenReview forbidden: meshsign's service account needs a \
                         ClusterRoleBinding to system:auth-delegator"
                    );
                    Err(ReviewError::Unavailable(format!(
                        "cluster {}: TokenReview forbidden",
                        self.cluster
                    )))
                }
                Err(e) => Err(ReviewError::Unavailable(format!(
                    "cluster {}: {e}",
                    self.cluster
                ))),
            }
        })
    }
}

/// Reads a review's status as istiod does: authenticated, in the service
/// accounts group, username `system:serviceaccount:<ns>:<sa>`, pod from
/// `user.extra`.
pub fn outcome_of(status: Option<&TokenReviewStatus>) -> ReviewOutcome {
    let Some(status) = status else {
        return ReviewOutcome::Refused("the review has no status".into());
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|e| e.chars().take(200).collect::<String>())
            .unwrap_or_else(|| "the token is not authenticated".into());
        return ReviewOutcome::Refused(why);
    }
    let Some(user) = &status.user else {
        return ReviewOutcome::Refused("the review names no user".into());
    };
    let in_group = user
        .groups
        .as_ref()
        .is_some_and(|g| g.iter().any(|g| g == SERVICE_ACCOUNTS_GROUP));
    if !in_group {
        return ReviewOutcome::Refused("the token is not a service account".into());
    }
    let username = user.username.as_deref().unwrap_or_default();
    let parts: Vec<&str> = username.split(':').collect();
    let (namespace, service_account) = match parts.as_slice() {
        ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => {
            ((*ns).to_owned(), (*sa).to_owned())
        }
        _ => {
            return ReviewOutcome::Refused(
                "invalid username field in the token review result".into(),
            )
        }
    };
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let pod = match (extra(EXTRA_POD_NAME), extra(EXTRA_POD_UID)) {
        (Some(name), Some(uid)) => Some(PodInfo { name, uid }),
        _ => None,
    };
    ReviewOutcome::Authenticated(ReviewedAccount {
        namespace,
        service_account,
        pod,
    })
}

/// The counters one cluster's cache updates (see [`crate::metrics`]).
#[derive(Debug, Clone)]
pub struct ReviewCounters {
    pub hit: prometheus::IntCounter,
    pub joined: prometheus::IntCounter,
    pub miss: prometheus::IntCounter,
    pub authenticated: prometheus::IntCounter,
    pub refused: prometheus::IntCounter,
    pub unavailable: prometheus::IntCounter,
}

impl ReviewCounters {
    /// The exported counters of `cluster`.
    pub fn registered(metrics: &crate::metrics::Metrics, cluster: &str) -> Self {
        let cache = |l: &str| metrics.token_review_cache.with_label_values(&[cluster, l]);
        let review = |l: &str| metrics.token_reviews.with_label_values(&[cluster, l]);
        Self {
            hit: cache("hit"),
            joined: cache("joined"),
            miss: cache("miss"),
            authenticated: review("authenticated"),
            refused: review("refused"),
            unavailable: review("unavailable"),
        }
    }

    /// Counters that are not exported (tests).
    pub fn unregistered() -> Self {
        let c = || {
            prometheus::IntCounter::new("unregistered", "unregistered")
                .unwrap_or_else(|_| unreachable!())
        };
        Self {
            hit: c(),
            joined: c(),
            miss: c(),
            authenticated: c(),
            refused: c(),
            unavailable: c(),
        }
    }
}

/// Settings for [`CachedTokenReview`].
#[derive(Debug, Clone)]
pub struct ReviewCacheSettings {
    pub audiences: Vec<String>,
    pub cache_ttl: Duration,
    pub cache_size: usize,
    pub timeout: Duration,
    pub max_concurrent: usize,
}

type TokenHash = [u8; 32];
type Shared = Result<ReviewOutcome, ReviewError>;

enum Slot {
    /// A finished review, valid until `expires` (Unix seconds).
    Done {
        outcome: ReviewOutcome,
        expires: u64,
    },
    /// A review in flight; its result arrives on the channel.
    Pending(watch::Receiver<Option<Shared>>),
}

/// A [`TokenReviewer`] behind the cache described in the module docs.
pub struct CachedTokenReview {
    reviewer: Arc<dyn TokenReviewer>,
    settings: ReviewCacheSettings,
    clock: Arc<dyn Clock>,
    entries: Mutex<HashMap<TokenHash, Slot>>,
    in_flight: Arc<Semaphore>,
    counters: ReviewCounters,
}

impl fmt::Debug for CachedTokenReview {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedTokenReview")
            .field("reviewer", &self.reviewer)
            .field("settings", &self.settings)
            .field("entries", &self.len())
            .finish()
    }
}

impl CachedTokenReview {
    pub fn new(
        reviewer: Arc<dyn TokenReviewer>,
        settings: ReviewCacheSettings,
        clock: Arc<dyn Clock>,
        counters: ReviewCounters,
    ) -> Arc<Self> {
        Arc::new(Self {
            reviewer,
            in_flight: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
            settings,
            clock,
            entries: Mutex::new(HashMap::new()),
            counters,
        })
    }

    /// Entries held (finished and in flight).
    pub fn len(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Authenticates `token`: from the cache, by joining a review in flight,
    /// or by starting one.
    pub async fn authenticate(
        self: &Arc<Self>,
        token: &str,
    ) -> Result<ReviewedAccount, ReviewError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ReviewError::Malformed("token too long"));
        }
        let now = self.clock.now_unix();
        let hash = hash_token(token);
        // A cached or in-flight review answers without reading the token.
        let probe = |entries: &HashMap<TokenHash, Slot>| match entries.get(&hash) {
            Some(Slot::Done { outcome, expires }) if *expires > now => {
                self.counters.hit.inc();
                Some(Err(outcome.clone()))
            }
            Some(Slot::Pending(rx)) => {
                self.counters.joined.inc();
                Some(Ok(rx.clone()))
            }
            _ => None,
        };
        let poisoned = || ReviewError::Unavailable("token cache poisoned".into());
        let found = probe(&*self.entries.lock().map_err(|_| poisoned())?);
        let mut rx = match found {
            Some(Err(outcome)) => return into_result(outcome),
            Some(Ok(rx)) => rx,
            None => {
                // Only a token that could pass is worth a review (outside the lock).
                let exp = precheck(token, now)?;
                let mut entries = self.entries.lock().map_err(|_| poisoned())?;
                match probe(&entries) {
                    Some(Err(outcome)) => return into_result(outcome),
                    Some(Ok(rx)) => rx,
                    None => {
                        self.counters.miss.inc();
                        if entries.len() >= self.settings.cache_size {
                            evict(&mut entries, now, self.settings.cache_size);
                        }
                        let (tx, rx) = watch::channel(None);
                        entries.insert(hash, Slot::Pending(rx.clone()));
                        // The review runs in its own task, so a caller that gives
                        // up (deadline, reset) does not cancel it for the others.
                        let this = Arc::clone(self);
                        let token = token.to_owned();
                        tokio::spawn(async move {
                            let result = this.review_now(&token).await;
                            this.finish(hash, exp, &result);
                            let _ = tx.send(Some(result));
                        });
                        rx
                    }
                }
            }
        };
        let answer = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ReviewError::Unavailable("token review task ended".into()))?
            .clone();
        match answer {
            Some(Ok(outcome)) => into_result(outcome),
            Some(Err(e)) => Err(e),
            None => Err(ReviewError::Unavailable("token review task ended".into())),
        }
    }

    async fn review_now(&self, token: &str) -> Shared {
        let _permit = tokio::time::timeout(self.settings.timeout, self.in_flight.acquire())
            .await
            .map_err(|_| ReviewError::Unavailable("too many token reviews in flight".into()))?
            .map_err(|_| ReviewError::Unavailable("token reviews closed".into()))?;
        let result = tokio::time::timeout(
            self.settings.timeout,
            self.reviewer.review(token, &self.settings.audiences),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ReviewError::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.settings.timeout)
            )))
        });
        match &result {
            Ok(ReviewOutcome::Authenticated(_)) => self.counters.authenticated.inc(),
            Ok(ReviewOutcome::Refused(_)) => self.counters.refused.inc(),
            Err(_) => self.counters.unavailable.inc(),
        }
        result
    }

    /// Stores a finished review; failures to get an answer are not cached.
    fn finish(&self, hash: TokenHash, exp: Option<u64>, result: &Shared) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        match result {
            Ok(outcome) if !self.settings.cache_ttl.is_zero() => {
                let now = self.clock.now_unix();
                let mut expires = now.saturating_add(self.settings.cache_ttl.as_secs());
                if let Some(exp) = exp {
                    expires = expires.min(exp);
                }
                entries.insert(
                    hash,
                    Slot::Done {
                        outcome: outcome.clone(),
                        expires,
                    },
                );
            }
            _ => {
                entries.remove(&hash);
            }
        }
    }
}

fn into_result(outcome: ReviewOutcome) -> Result<ReviewedAccount, ReviewError> {
    match outcome {
        ReviewOutcome::Authenticated(account) => Ok(account),
        ReviewOutcome::Refused(why) => Err(ReviewError::Refused(why)),
    }
}

/// Makes room for one entry: drops expired entries, and if that frees less
/// than a tenth of the cache, also the finished entries that expire soonest
/// (so a full cache is swept once per tenth of its size, not per insert).
fn evict(entries: &mut HashMap<TokenHash, Slot>, now: u64, capacity: usize) {
    entries.retain(|_, slot| !matches!(slot, Slot::Done { expires, .. } if *expires <= now));
    let target = capacity.saturating_sub(capacity / 10 + 1);
    if entries.len() <= target {
        return;
    }
    let mut done: Vec<(u64, TokenHash)> = entries
        .iter()
        .filter_map(|(k, slot)| match slot {
            Slot::Done { expires, .. } => Some((*expires, *k)),
            Slot::Pending(_) => None,
        })
        .collect();
    done.sort_unstable();
    let excess = entries.len() - target;
    for (_, key) in done.into_iter().take(excess) {
        entries.remove(&key);
    }
}

fn hash_token(token: &str) -> TokenHash {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Refuses, without asking the API server, what can never pass: anything
/// that is not a three-part JWT with a JSON payload, and tokens whose own
/// `exp` has passed. Returns the `exp`, which bounds the cache entry. The
/// payload is not trusted for anything else.
fn precheck(token: &str, now: u64) -> Result<Option<u64>, ReviewError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(ReviewError::Malformed("token too long"));
    }
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReviewError::Malformed("not three dot-separated parts"));
    };
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: Option<serde_json::Value>,
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| ReviewError::Malformed("payload is not base64url"))?;
    let claims: Exp = serde_json::from_slice(&bytes)
        .map_err(|_| ReviewError::Malformed("payload is not a JSON object"))?;
    let exp = match claims.exp {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .ok_or(ReviewError::Malformed("exp is not a number"))?,
        ),
    };
    if exp.is_some_and(|exp| exp <= now) {
        return Err(ReviewError::Expired);
    }
    Ok(exp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const NOW: u64 = 1_800_000_000;

    fn token(sub: &str, exp: u64) -> String {
        let b64 = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256"}"#.into()),
            b64(format!(r#"{{"sub":"{sub}","exp":{exp}}}"#))
        )
    }

    /// Answers from the token's `sub`; counts calls; can be made to fail or stall.
    #[derive(Debug, Default)]
    struct FakeReviewer {
        calls: AtomicU64,
        down: AtomicBool,
        delay_ms: AtomicU64,
    }

    impl TokenReviewer for FakeReviewer {
        fn review<'a>(&'a self, token: &'a str, _: &'a [String]) -> ReviewFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let delay = self.delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if self.down.load(Ordering::SeqCst) {
                    return Err(ReviewError::Unavailable("connection refused".into()));
                }
                let payload = token
                    .split('.')
                    .nth(1)
                    .and_then(|p| {
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(p)
                            .ok()
                    })
                    .unwrap_or_default();
                if String::from_utf8_lossy(&payload).contains("forged") {
                    return Ok(ReviewOutcome::Refused("forged".into()));
                }
                Ok(ReviewOutcome::Authenticated(ReviewedAccount {
                    namespace: "default".into(),
                    service_account: "sleep".into(),
                    pod: None,
                }))
            })
        }
    }

    fn cache(
        reviewer: Arc<FakeReviewer>,
        ttl: u64,
        size: usize,
    ) -> (Arc<CachedTokenReview>, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(NOW));
        let c = CachedTokenReview::new(
            reviewer,
            ReviewCacheSettings {
                audiences: vec!["istio-ca".into()],
                cache_ttl: Duration::from_secs(ttl),
                cache_size: size,
                timeout: Duration::from_millis(300),
                max_concurrent: 4,
            },
            clock.clone(),
            ReviewCounters::unregistered(),
        );
        (c, clock)
    }

    #[tokio::test]
    async fn one_review_per_token_until_the_entry_expires() {
        let fake = Arc::new(FakeReviewer::default());
        let (c, clock) = cache(fake.clone(), 60, 100);
        let t = token("system:serviceaccount:default:sleep", NOW + 3600);
        for _ in 0..1000 {
            let account = c.authenticate(&t).await.unwrap();
            assert_eq!(account.service_account, "sleep");
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        clock.advance(59);
        c.authenticate(&t).await.unwrap();
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        clock.advance(1);
        c.authenticate(&t).await.unwrap();
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            2,
            "cache_ttl bounds an entry"
        );
    }

    #[tokio::test]
    async fn entry_never_outlives_the_token() {
        let fake = Arc::new(FakeReviewer::default());
        let (c, clock) = cache(fake.clone(), 60, 100);
        let t = token("system:serviceaccount:default:sleep", NOW + 10);
        c.authenticate(&t).await.unwrap();
        clock.advance(10);
        assert_eq!(c.authenticate(&t).await, Err(ReviewError::Expired));
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_review() {
        let fake = Arc::new(FakeReviewer::default());
        fake.delay_ms.store(50, Ordering::SeqCst);
        let (c, _) = cache(fake.clone(), 60, 100);
        let t = token("system:serviceaccount:default:sleep", NOW + 3600);
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (c, t) = (c.clone(), t.clone());
                tokio::spawn(async move { c.authenticate(&t).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refusals_are_cached_and_outages_are_not() {
        let fake = Arc::new(FakeReviewer::default());
        let (c, _) = cache(fake.clone(), 60, 100);
        let forged = token("forged", NOW + 3600);
        for _ in 0..3 {
            assert!(matches!(
                c.authenticate(&forged).await,
                Err(ReviewError::Refused(_))
            ));
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);

        let good = token("system:serviceaccount:default:sleep", NOW + 3600);
        c.authenticate(&good).await.unwrap();
        fake.down.store(true, Ordering::SeqCst);
        // Cached: keeps working while the API server is down.
        c.authenticate(&good).await.unwrap();
        // New token: unavailable, and not cached.
        let other = token("system:serviceaccount:default:other", NOW + 3600);
        assert!(matches!(
            c.authenticate(&other).await,
            Err(ReviewError::Unavailable(_))
        ));
        fake.down.store(false, Ordering::SeqCst);
        c.authenticate(&other).await.unwrap();
    }

    #[tokio::test]
    async fn slow_api_server_is_unavailable_after_the_timeout() {
        let fake = Arc::new(FakeReviewer::default());
        fake.delay_ms.store(2_000, Ordering::SeqCst);
        let (c, _) = cache(fake.clone(), 60, 100);
        let t = token("system:serviceaccount:default:sleep", NOW + 3600);
        assert!(matches!(
            c.authenticate(&t).await,
            Err(ReviewError::Unavailable(_))
        ));
        assert!(c.is_empty(), "a failed review leaves no entry");
    }

    #[tokio::test]
    async fn garbage_never_reaches_the_api_server() {
        let fake = Arc::new(FakeReviewer::default());
        let (c, _) = cache(fake.clone(), 60, 100);
        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "a.!!!.c",
            "a.bm90IGpzb24.c",
            &token("system:serviceaccount:default:sleep", NOW - 1),
            &"x".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert!(
                matches!(
                    c.authenticate(bad).await,
                    Err(ReviewError::Malformed(_) | ReviewError::Expired)
                ),
                "{bad:.40}"
            );
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn cache_size_is_bounded() {
        let fake = Arc::new(FakeReviewer::default());
        let (c, _) = cache(fake.clone(), 60, 50);
        for i in 0..500 {
            let t = token(&format!("system:serviceaccount:default:sa{i}"), NOW + 3600);
            c.authenticate(&t).await.unwrap();
            assert!(c.len() <= 50, "{} entries", c.len());
        }
        assert_eq!(fake.calls.load(Ordering::SeqCst), 500);
    }

    #[test]
    fn review_status_is_read_as_istiod_reads_it() {
        let status = |authenticated: bool, user: &str, groups: &[&str], pod: bool| {
            let mut extra = std::collections::BTreeMap::new();
            if pod {
                extra.insert(EXTRA_POD_NAME.to_owned(), vec!["sleep-1".to_owned()]);
                extra.insert(EXTRA_POD_UID.to_owned(), vec!["uid-1".to_owned()]);
            }
            TokenReviewStatus {
                authenticated: Some(authenticated),
                user: Some(UserInfo {
                    username: Some(user.into()),
                    groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                    extra: Some(extra),
                    uid: None,
                }),
                ..Default::default()
            }
        };
        let sa = "system:serviceaccount:default:sleep";
        let groups = ["system:serviceaccounts", "system:authenticated"];
        assert_eq!(
            outcome_of(Some(&status(true, sa, &groups, true))),
            ReviewOutcome::Authenticated(ReviewedAccount {
                namespace: "default".into(),
                service_account: "sleep".into(),
                pod: Some(PodInfo {
                    name: "sleep-1".into(),
                    uid: "uid-1".into()
                }),
            })
        );
        assert!(matches!(
            outcome_of(Some(&status(true, sa, &groups, false))),
            ReviewOutcome::Authenticated(ReviewedAccount { pod: None, .. })
        ));
        for refused in [
            status(false, sa, &groups, true),
            status(true, sa, &["system:authenticated"], true),
            status(true, "admin", &groups, true),
            status(true, "system:serviceaccount:default", &groups, true),
            status(true, "system:serviceaccount::sleep", &groups, true),
            status(true, "system:serviceaccount:a:b:c", &groups, true),
        ] {
            assert!(
                matches!(outcome_of(Some(&refused)), ReviewOutcome::Refused(_)),
                "{refused:?}"
            );
        }
        assert!(matches!(outcome_of(None), ReviewOutcome::Refused(_)));
    }
}
