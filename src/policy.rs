//! Whether a request is allowed, and for how long the certificate lives.
//!
//! The rules, in the order they are applied:
//! 1. the requested SPIFFE ID's trust domain is the mesh's or one of its aliases;
//! 2. it is the caller's own identity (the proto requires the CA to authorise
//!    every SAN; istio-csr's rule), or the same workload moved from an alias
//!    into the primary trust domain; never from the primary into an alias;
//! 3. no `deny` rule matches it and at least one `allow` rule does (globs on
//!    namespace and service account);
//! 4. the TTL: a non-positive request gets the default; a request above the
//!    maximum is refused with istiod's message; `notBefore` is back-dated for
//!    clock skew. (The CA clamps `notAfter` to its own expiry.)

use std::time::Duration;

use globset::{Glob, GlobMatcher};
use time::OffsetDateTime;

use crate::spiffe::SpiffeId;

/// One allow or deny rule.
#[derive(Debug, Clone)]
pub struct Rule {
    namespace: GlobMatcher,
    service_account: GlobMatcher,
    text: String,
}

impl Rule {
    pub fn new(namespace: &str, service_account: &str) -> Result<Rule, globset::Error> {
        Ok(Rule {
            namespace: Glob::new(namespace)?.compile_matcher(),
            service_account: Glob::new(service_account)?.compile_matcher(),
            text: format!("{namespace}/{service_account}"),
        })
    }

    fn matches(&self, id: &SpiffeId) -> bool {
        self.namespace.is_match(id.namespace())
            && self.service_account.is_match(id.service_account())
    }
}

/// Two rules are the same when written the same (their matchers are compiled from the text).
impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// The validated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub backdate: Duration,
}

/// Why a request is not allowed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("trust domain of {requested} is not {trust_domain} or one of its aliases")]
    ForeignTrustDomain {
        requested: SpiffeId,
        trust_domain: String,
    },
    #[error("CSR identity {requested} does not match the caller's identity {caller}")]
    IdentityMismatch {
        requested: Box<SpiffeId>,
        caller: Box<SpiffeId>,
    },
    #[error("identity {identity} is denied by policy rule {rule}")]
    Denied { identity: SpiffeId, rule: String },
    #[error("identity {identity} is not allowed by any policy rule")]
    NotAllowed { identity: SpiffeId },
    /// istiod's exact wording (`requested TTL 3h0m0s is greater than the max allowed TTL 2h0m0s`).
    #[error("requested TTL {} is greater than the max allowed TTL {}", go_duration(*.requested_secs), go_duration(.max.as_secs()))]
    TtlTooLong { requested_secs: u64, max: Duration },
}

impl PolicyError {
    /// TTL errors are the caller's input; the others are authorisation.
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, PolicyError::TtlTooLong { .. })
    }
}

impl Policy {
    /// A permissive policy for `trust_domain` with istiod's TTL defaults.
    pub fn new(trust_domain: &str) -> Policy {
        Policy {
            trust_domain: trust_domain.to_owned(),
            trust_domain_aliases: Vec::new(),
            allow: vec![Rule::new("*", "*").unwrap_or_else(|_| unreachable!())],
            deny: Vec::new(),
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
            backdate: Duration::from_secs(120),
        }
    }

    /// True for the mesh's trust domain and its aliases.
    pub fn is_local_trust_domain(&self, td: &str) -> bool {
        td == self.trust_domain || self.trust_domain_aliases.iter().any(|a| a == td)
    }

    /// Checks rules 1–3 for a caller asking for `requested`.
    pub fn authorize(&self, caller: &SpiffeId, requested: &SpiffeId) -> Result<(), PolicyError> {
        if !self.is_local_trust_domain(requested.trust_domain()) {
            return Err(PolicyError::ForeignTrustDomain {
                requested: requested.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        // The caller's own identity, or (trust-domain migration) the same
        // workload in the mesh's primary trust domain. Never into an alias.
        let own = requested == caller
            || (caller.same_workload(requested)
                && requested.trust_domain() == self.trust_domain
                && self.is_local_trust_domain(caller.trust_domain()));
        if !own {
            return Err(PolicyError::IdentityMismatch {
                requested: Box::new(requested.clone()),
                caller: Box::new(caller.clone()),
            });
        }
        if let Some(rule) = self.deny.iter().find(|r| r.matches(requested)) {
            return Err(PolicyError::Denied {
                identity: requested.clone(),
                rule: rule.text.clone(),
            });
        }
        if !self.allow.iter().any(|r| r.matches(requested)) {
            return Err(PolicyError::NotAllowed {
                identity: requested.clone(),
            });
        }
        Ok(())
    }

    /// Computes `(notBefore, notAfter)` for a requested `validity_duration` in seconds.
    pub fn validity(
        &self,
        requested_secs: i64,
        now: OffsetDateTime,
    ) -> Result<(OffsetDateTime, OffsetDateTime), PolicyError> {
        let ttl = if requested_secs <= 0 {
            self.default_ttl
        } else {
            let requested = requested_secs.unsigned_abs();
            if requested > self.max_ttl.as_secs() {
                return Err(PolicyError::TtlTooLong {
                    requested_secs: requested,
                    max: self.max_ttl,
                });
            }
            Duration::from_secs(requested)
        };
        // Both durations are bounded by validated configuration (max_ttl), so
        // the conversions cannot overflow.
        let not_before = now - self.backdate;
        let not_after = now + ttl;
        Ok((not_before, not_after))
    }
}

/// Formats seconds as Go's `time.Duration.String()` does for whole seconds
/// (`24h0m0s`, `1m30s`, `45s`, `0s`).
pub fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(45), "45s");
        assert_eq!(go_duration(90), "1m30s");
        assert_eq!(go_duration(3 * 3600), "3h0m0s");
        assert_eq!(go_duration(2160 * 3600), "2160h0m0s");
    }

    #[test]
    fn ttl_rules() {
        let p = Policy::new("cluster.local");
        let now = OffsetDateTime::now_utc();
        let (nb, na) = p.validity(0, now).unwrap();
        assert_eq!(now - nb, time::Duration::minutes(2));
        assert_eq!(na - now, time::Duration::hours(24));
        let (_, na) = p.validity(-5, now).unwrap();
        assert_eq!(na - now, time::Duration::hours(24));
        let (_, na) = p.validity(3600, now).unwrap();
        assert_eq!(na - now, time::Duration::hours(1));
        let err = p.validity(2161 * 3600, now).unwrap_err();
        assert_eq!(
            err.to_string(),
            "requested TTL 2161h0m0s is greater than the max allowed TTL 2160h0m0s"
        );
        assert!(p.validity(i64::MAX, now).is_err());
    }

    #[test]
    fn identity_must_match_caller() {
        let mut p = Policy::new("cluster.local");
        p.trust_domain_aliases.push("old.local".into());
        let caller = id("spiffe://cluster.local/ns/a/sa/b");
        p.authorize(&caller, &id("spiffe://cluster.local/ns/a/sa/b"))
            .unwrap();
        // Not from the primary domain into an alias...
        assert!(matches!(
            p.authorize(&caller, &id("spiffe://old.local/ns/a/sa/b")),
            Err(PolicyError::IdentityMismatch { .. })
        ));
        // ...but an alias-domain caller may renew as itself or move to the primary.
        let old = id("spiffe://old.local/ns/a/sa/b");
        p.authorize(&old, &old).unwrap();
        p.authorize(&old, &caller).unwrap();
        assert!(matches!(
            p.authorize(&caller, &id("spiffe://cluster.local/ns/a/sa/c")),
            Err(PolicyError::IdentityMismatch { .. })
        ));
        assert!(matches!(
            p.authorize(&caller, &id("spiffe://evil.org/ns/a/sa/b")),
            Err(PolicyError::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn allow_and_deny_globs() {
        let mut p = Policy::new("cluster.local");
        p.allow = vec![Rule::new("team-*", "*").unwrap()];
        p.deny = vec![Rule::new("team-x", "admin*").unwrap()];
        let ok = id("spiffe://cluster.local/ns/team-a/sa/web");
        p.authorize(&ok, &ok).unwrap();
        let denied = id("spiffe://cluster.local/ns/team-x/sa/admin-bot");
        assert!(matches!(
            p.authorize(&denied, &denied),
            Err(PolicyError::Denied { .. })
        ));
        let outside = id("spiffe://cluster.local/ns/default/sa/web");
        assert!(matches!(
            p.authorize(&outside, &outside),
            Err(PolicyError::NotAllowed { .. })
        ));
    }
}
