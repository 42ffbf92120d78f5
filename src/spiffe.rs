//! SPIFFE identities as Istio uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! `SpiffeId` is the one representation of a workload identity in meshsign: the
//! authenticator produces one for the caller, the CSR carries one, the policy
//! compares them and the CA writes one into the leaf.

use std::fmt;

/// The URI scheme prefix of every SPIFFE ID.
pub const SCHEME: &str = "spiffe://";

/// Longest URI accepted. SPIFFE limits IDs to 2048 bytes.
const MAX_LEN: usize = 2048;

/// An Istio workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not an Istio SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("not a spiffe:// URI")]
    NotSpiffe,
    #[error("longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("invalid trust domain {0:?}")]
    TrustDomain(String),
    #[error("path must be /ns/<namespace>/sa/<service-account>")]
    Path,
    #[error("invalid {what} {value:?}: {why}")]
    Name {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_k8s_name("namespace", namespace)?;
        validate_k8s_name("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://td/ns/X/sa/Y`, exactly five path segments as Istio's
    /// `spiffe.ParseIdentity` requires.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        if uri.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = uri.strip_prefix(SCHEME).ok_or(SpiffeIdError::NotSpiffe)?;
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or_default();
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SpiffeIdError::Path);
        };
        Self::new(td, ns, sa)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// True when both name the same namespace and service account.
    pub fn same_workload(&self, other: &SpiffeId) -> bool {
        self.namespace == other.namespace && self.service_account == other.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Validates a SPIFFE trust domain name: lowercase letters, digits, `.`, `-`, `_`.
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain(td.to_owned()))
    }
}

/// Kubernetes namespaces are DNS labels and service accounts DNS subdomains;
/// SPIFFE path segments must also avoid `.` and `..`. We accept the union that
/// Kubernetes can produce: lowercase alphanumerics, `-` and `.`, at most 253.
fn validate_k8s_name(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    let why = if value.is_empty() {
        Some("empty")
    } else if value.len() > 253 {
        Some("longer than 253 characters")
    } else if value == "." || value == ".." {
        Some("dot segment")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
    {
        Some("only lowercase letters, digits, '-' and '.' are allowed")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(SpiffeIdError::Name {
            what,
            value: value.to_owned(),
            why,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo-ratings").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-ratings");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/namespace/a/sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be rejected");
        }
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(3000));
        assert_eq!(SpiffeId::parse(&long), Err(SpiffeIdError::TooLong));
    }
}
