//! Request budgets: token buckets keyed by who is asking.
//!
//! Three budgets, each switched off by `per_second: 0`:
//!
//! - **per caller**, after authentication: keyed by the caller's SPIFFE
//!   identity, its cluster, and the instance when the credential names one:
//!   the pod of a bound service-account token, or the client certificate an
//!   mTLS renewal presents (each replica holds its own). So the replicas of
//!   one Deployment, which share an identity, do not share a budget; and
//!   keying by identity, never by IP, means callers behind one load balancer
//!   do not share one either.
//! - **per node agent** (the trusted node accounts, i.e. ztunnel): the same
//!   key, so one budget per ztunnel pod, which is one per node. ztunnel asks
//!   for every pod on its node under its own identity, so its budget is sized
//!   for a node's pods (Kubernetes' default is at most 110 per node), not for
//!   one workload.
//! - **failed authentications per remote address** (IPv6 per /64, so one host
//!   cannot dodge it by rotating addresses): every failed authentication takes
//!   a token; while the address has none left, its requests are refused before
//!   any token is checked (no TokenReview is spent on them). A caller with a
//!   verified client certificate has proved itself at the handshake and is not
//!   held to it.
//!
//! Memory is bounded: at most `max_tracked` keys per budget. A bucket that has
//! refilled to its burst carries no information and is dropped first; if a
//! budget is still full, an eighth of it is dropped at once (those callers
//! start again with a full burst: the bound fails open, never closed).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::auth::CallerIdentity;
use crate::config::{Budget, RateLimits};

/// Milliseconds on a monotonic clock since the first call (the time base the
/// buckets use; tests pass their own).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Token buckets under one budget, keyed by a 64-bit hash.
#[derive(Debug)]
pub struct Buckets {
    budget: Budget,
    shards: Box<[Mutex<HashMap<u64, Bucket>>]>,
    per_shard: usize,
    hasher: RandomState,
}

impl Buckets {
    pub fn new(budget: Budget, max_tracked: usize) -> Self {
        Self {
            budget,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_tracked.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// The bucket key of `value` (keyed SipHash: callers cannot aim at one shard).
    pub fn key<T: Hash + ?Sized>(&self, value: &T) -> u64 {
        self.hasher.hash_one(value)
    }

    /// The tokens `b` holds at `now_ms`: refilled at the budget's rate since
    /// it was last updated, never more than the burst.
    fn tokens_at(&self, b: &Bucket, now_ms: u64) -> f64 {
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        (b.tokens + elapsed * self.budget.per_second).min(f64::from(self.budget.burst))
    }

    /// The locked shard of `key`; `None` when its lock is poisoned, and then
    /// the caller lets the request through (a poisoned lock must not take the
    /// service down).
    fn shard(&self, key: u64) -> Option<MutexGuard<'_, HashMap<u64, Bucket>>> {
        self.shards[(key as usize) % SHARDS].lock().ok()
    }

    /// The bucket of `key` in its shard `map`, refilled up to `now_ms`;
    /// `None` when the key is not tracked (a full bucket).
    fn refilled<'m>(
        &self,
        map: &'m mut HashMap<u64, Bucket>,
        key: u64,
        now_ms: u64,
    ) -> Option<&'m mut Bucket> {
        let b = map.get_mut(&key)?;
        b.tokens = self.tokens_at(b, now_ms);
        b.at_ms = now_ms;
        Some(b)
    }

    /// Takes a token for `key` at `now_ms`; false when the budget is spent.
    pub fn take(&self, key: u64, now_ms: u64) -> bool {
        let Some(mut map) = self.shard(key) else {
            return true;
        };
        if let Some(b) = self.refilled(&mut map, key, now_ms) {
            if b.tokens < 1.0 {
                return false;
            }
            b.tokens -= 1.0;
            return true;
        }
        if map.len() >= self.per_shard {
            self.make_room(&mut map, now_ms);
        }
        map.insert(
            key,
            Bucket {
                tokens: f64::from(self.budget.burst) - 1.0,
                at_ms: now_ms,
            },
        );
        true
    }

    /// Whether `key` has a token left, without taking it.
    pub fn has_token(&self, key: u64, now_ms: u64) -> bool {
        let Some(mut map) = self.shard(key) else {
            return true;
        };
        self.refilled(&mut map, key, now_ms)
            .is_none_or(|b| b.tokens >= 1.0)
    }

    fn make_room(&self, map: &mut HashMap<u64, Bucket>, now_ms: u64) {
        // A bucket back at its burst says nothing a new one would not.
        let burst = f64::from(self.budget.burst);
        map.retain(|_, b| self.tokens_at(b, now_ms) < burst);
        if map.len() >= self.per_shard {
            let drop: Vec<u64> = map.keys().take(self.per_shard / 8 + 1).copied().collect();
            for k in drop {
                map.remove(&k);
            }
        }
    }

    /// Keys tracked now (tests and metrics).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

/// The three budgets of [`RateLimits`].
#[derive(Debug)]
pub struct RateLimiter {
    callers: Option<Buckets>,
    node_agents: Option<Buckets>,
    failed_auth: Option<Buckets>,
}

/// Which budget refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    Caller,
    NodeAgent,
    FailedAuthentications,
}

impl Spent {
    pub fn label(self) -> &'static str {
        match self {
            Spent::Caller => "per_caller",
            Spent::NodeAgent => "per_node_agent",
            Spent::FailedAuthentications => "failed_auth_per_address",
        }
    }
}

impl RateLimiter {
    pub fn new(limits: &RateLimits) -> Self {
        let make = |b: Budget| b.is_enabled().then(|| Buckets::new(b, limits.max_tracked));
        Self {
            callers: make(limits.per_caller),
            node_agents: make(limits.per_node_agent),
            failed_auth: make(limits.failed_auth_per_address),
        }
    }

    /// No budget at all.
    pub fn disabled() -> Self {
        Self {
            callers: None,
            node_agents: None,
            failed_auth: None,
        }
    }

    /// Before authentication: is `addr` still allowed to try?
    pub fn address_may_try(&self, addr: IpAddr, now_ms: u64) -> bool {
        match &self.failed_auth {
            Some(b) => b.has_token(b.key(&address_key(addr)), now_ms),
            None => true,
        }
    }

    /// After a failed authentication from `addr`.
    pub fn failed_authentication(&self, addr: IpAddr, now_ms: u64) {
        if let Some(b) = &self.failed_auth {
            b.take(b.key(&address_key(addr)), now_ms);
        }
    }

    /// After authentication: takes a token from the caller's budget
    /// (`node_agent`: the trusted node account's budget instead).
    /// `client_certificate`: the certificate the caller authenticated with,
    /// which tells replicas apart when no pod is named.
    pub fn admit(
        &self,
        caller: &CallerIdentity,
        client_certificate: Option<&[u8]>,
        node_agent: bool,
        now_ms: u64,
    ) -> Result<(), Spent> {
        let (buckets, spent) = if node_agent {
            (&self.node_agents, Spent::NodeAgent)
        } else {
            (&self.callers, Spent::Caller)
        };
        let Some(b) = buckets else { return Ok(()) };
        let key = b.key(&(
            &caller.id,
            caller.cluster.as_deref().map(|c| c.id.as_str()),
            caller.pod.as_ref().map(|p| p.name.as_str()),
            client_certificate,
        ));
        if b.take(key, now_ms) {
            Ok(())
        } else {
            Err(spent)
        }
    }
}

/// IPv4 as is (and IPv4-mapped IPv6 as IPv4); IPv6 by its /64.
fn address_key(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            None => (u128::from(v6) >> 64 << 64) | 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthSource, PodInfo};
    use crate::spiffe::SpiffeId;

    fn budget(per_second: f64, burst: u32) -> Budget {
        Budget { per_second, burst }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let b = Buckets::new(budget(2.0, 3), 100);
        let k = b.key("a");
        assert!(b.take(k, 0) && b.take(k, 0) && b.take(k, 0));
        assert!(!b.take(k, 0));
        assert!(!b.take(k, 400), "0.8 of a token after 400 ms");
        assert!(b.take(k, 500), "a whole token after 500 ms at 2/s");
        assert!(!b.take(k, 500));
        // Never more than the burst, however long it rested.
        for _ in 0..3 {
            assert!(b.take(k, 1_000_000));
        }
        assert!(!b.take(k, 1_000_000));
        // Another key has its own bucket.
        assert!(b.take(b.key("b"), 500));
    }

    #[test]
    fn has_token_refills_like_take_but_takes_nothing() {
        let b = Buckets::new(budget(2.0, 1), 100);
        let k = b.key("a");
        assert!(b.has_token(k, 0), "an untracked key has its burst");
        assert!(b.has_token(k, 0) && b.take(k, 0));
        assert!(!b.has_token(k, 0));
        assert!(!b.has_token(k, 250), "half a token after 250 ms");
        assert!(b.has_token(k, 500) && b.has_token(k, 500));
        assert!(b.take(k, 500));
        assert!(!b.has_token(k, 500));
    }

    #[test]
    fn tracked_keys_stay_bounded_and_full_buckets_go_first() {
        let b = Buckets::new(budget(1.0, 2), 64);
        let hot = b.key("hot");
        assert!(b.take(hot, 0) && b.take(hot, 0));
        assert!(!b.take(hot, 0));
        for i in 0..10_000u32 {
            b.take(b.key(&i), 0);
            assert!(b.tracked() <= 64 + SHARDS, "tracked {}", b.tracked());
        }
        // Much later every bucket has refilled: the sweep drops them all
        // rather than keeping stale state.
        for i in 10_000..10_100u32 {
            b.take(b.key(&i), 1_000_000);
        }
        assert!(b.tracked() <= 64 + SHARDS);
    }

    #[test]
    fn ipv6_addresses_share_a_budget_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            address_key(mapped),
            address_key("10.0.0.1".parse().unwrap())
        );
    }

    fn caller(pod: Option<&str>) -> CallerIdentity {
        CallerIdentity {
            id: SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            source: AuthSource::Jwt {
                issuer: "test".into(),
            },
            pod: pod.map(|name| PodInfo {
                name: name.into(),
                uid: "uid".into(),
            }),
            cluster: None,
        }
    }

    #[test]
    fn replicas_sharing_an_identity_have_a_budget_each() {
        let limits = RateLimits {
            per_caller: budget(0.001, 2),
            per_node_agent: budget(0.001, 1),
            failed_auth_per_address: budget(0.001, 1),
            max_tracked: 100,
        };
        let r = RateLimiter::new(&limits);
        let (p1, p2) = (caller(Some("web-1")), caller(Some("web-2")));
        assert_eq!(r.admit(&p1, None, false, 0), Ok(()));
        assert_eq!(r.admit(&p1, None, false, 0), Ok(()));
        assert_eq!(r.admit(&p1, None, false, 0), Err(Spent::Caller));
        assert_eq!(r.admit(&p2, None, false, 0), Ok(()));
        // Without a pod, each client certificate is its own instance.
        let shared = caller(None);
        assert_eq!(r.admit(&shared, Some(b"cert-1"), false, 0), Ok(()));
        assert_eq!(r.admit(&shared, Some(b"cert-1"), false, 0), Ok(()));
        assert_eq!(
            r.admit(&shared, Some(b"cert-1"), false, 0),
            Err(Spent::Caller)
        );
        assert_eq!(r.admit(&shared, Some(b"cert-2"), false, 0), Ok(()));
        // The node-agent budget is separate from the caller budget.
        assert_eq!(r.admit(&p2, None, true, 0), Ok(()));
        assert_eq!(r.admit(&p2, None, true, 0), Err(Spent::NodeAgent));
        // Failed authentications: one allowed, then the address waits.
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(r.address_may_try(ip, 0));
        r.failed_authentication(ip, 0);
        assert!(!r.address_may_try(ip, 0));
        assert!(r.address_may_try("192.0.2.8".parse().unwrap(), 0));
    }

    #[test]
    fn disabled_budgets_refuse_nothing() {
        let r = RateLimiter::disabled();
        for _ in 0..1000 {
            assert_eq!(r.admit(&caller(None), None, false, 0), Ok(()));
            r.failed_authentication("192.0.2.1".parse().unwrap(), 0);
        }
        assert!(r.address_may_try("192.0.2.1".parse().unwrap(), 0));
    }
}
