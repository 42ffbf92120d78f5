//! Every way a `CreateCertificate` call can fail, and the one place where
//! failures become gRPC statuses.
//!
//! Codes and messages follow istiod where istiod has a case (§2.4 of the
//! protocol notes): authentication failures are `UNAUTHENTICATED` with the
//! fixed message `request authenticate failure` (the reason goes to the log
//! only), CSR and TTL problems are `INVALID_ARGUMENT` with `CSR signing error
//! (<reason>)`, signing failures are `INTERNAL`. meshsign adds
//! `PERMISSION_DENIED` for an authenticated caller asking for an identity that
//! is not its own or that policy forbids.

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::ca::SignError;
use crate::csr::CsrError;
use crate::k8s::node_auth::NodeAuthError;
use crate::policy::PolicyError;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The cause is in the message, so it is not also the `source()`.
    #[error("authentication failed: {0}")]
    Unauthenticated(AuthError),
    #[error("plaintext connection refused (TLS is required)")]
    PlaintextRefused,
    #[error("authentication unavailable: {0}")]
    AuthUnavailable(AuthError),
    #[error("impersonation refused: {0}")]
    Impersonation(NodeAuthError),
    #[error("impersonation cannot be checked yet: {0}")]
    ImpersonationUnavailable(NodeAuthError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("signing task failed: {0}")]
    Internal(String),
    #[error("rate limit {} spent", .0.label())]
    RateLimited(crate::ratelimit::Spent),
    #[error("overloaded: {0}")]
    Overloaded(SignError),
    #[error("audit trail: {0}")]
    Audit(#[from] crate::audit::AuditUnavailable),
}

impl RequestError {
    /// The gRPC code for this failure.
    pub fn code(&self) -> Code {
        match self {
            RequestError::Unauthenticated(_)
            | RequestError::PlaintextRefused
            | RequestError::Impersonation(_) => Code::Unauthenticated,
            RequestError::AuthUnavailable(_)
            | RequestError::ImpersonationUnavailable(_)
            | RequestError::Audit(_) => Code::Unavailable,
            RequestError::Csr(_) => Code::InvalidArgument,
            RequestError::Policy(p) if p.is_invalid_argument() => Code::InvalidArgument,
            RequestError::Policy(_) => Code::PermissionDenied,
            RequestError::Sign(_) | RequestError::Internal(_) => Code::Internal,
            RequestError::RateLimited(_) | RequestError::Overloaded(_) => Code::ResourceExhausted,
        }
    }

    /// Counted in istiod's `citadel_server_authentication_failure_count`
    /// (impersonation failures included, as istiod counts them).
    pub fn is_authentication_failure(&self) -> bool {
        matches!(
            self,
            RequestError::Unauthenticated(_)
                | RequestError::PlaintextRefused
                | RequestError::Impersonation(_)
        )
    }

    /// istiod's `citadel_server_csr_sign_err_count` label, where one applies.
    pub fn istio_error_type(&self) -> Option<&'static str> {
        match self {
            RequestError::Csr(_) => Some("CSR_ERROR"),
            RequestError::Policy(p) if p.is_invalid_argument() => Some("TTL_ERROR"),
            RequestError::Sign(_) => Some("CERT_GEN_ERROR"),
            RequestError::Internal(_) => Some("UNKNOWN"),
            _ => None,
        }
    }

    /// The status the caller sees. Authentication details never leave the server.
    pub fn to_status(&self) -> Status {
        let message = match self {
            RequestError::Unauthenticated(_) | RequestError::PlaintextRefused => {
                "request authenticate failure".to_owned()
            }
            RequestError::Impersonation(_) => {
                "request impersonation authentication failure".to_owned()
            }
            RequestError::AuthUnavailable(_) => {
                "request authenticate failure: token review unavailable, retry".to_owned()
            }
            RequestError::ImpersonationUnavailable(_) => {
                "request impersonation authentication failure: pod cache not synced, retry"
                    .to_owned()
            }
            RequestError::Csr(e) => format!("CSR signing error ({e})"),
            RequestError::Policy(e) if e.is_invalid_argument() => {
                format!("CSR signing error ({e})")
            }
            RequestError::Policy(e) => e.to_string(),
            RequestError::Sign(e) => format!("CSR signing error ({e})"),
            RequestError::Internal(_) => "CSR signing error (internal error)".to_owned(),
            RequestError::RateLimited(spent) => {
                format!("rate limit exceeded ({}), retry later", spent.label())
            }
            RequestError::Overloaded(_) => "CA overloaded, retry later".to_owned(),
            RequestError::Audit(_) => "audit trail unavailable, retry later".to_owned(),
        };
        Status::new(self.code(), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_details_stay_private() {
        let e = RequestError::Unauthenticated(AuthError {
            reasons: vec!["bearer token: issuer \"x\" is not configured".into()],
            unavailable: false,
        });
        let s = e.to_status();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.message(), "request authenticate failure");
    }

    #[test]
    fn shed_load_is_resource_exhausted_which_agents_retry() {
        for e in [
            RequestError::RateLimited(crate::ratelimit::Spent::Caller),
            RequestError::RateLimited(crate::ratelimit::Spent::NodeAgent),
            RequestError::RateLimited(crate::ratelimit::Spent::FailedAuthentications),
            RequestError::Overloaded(SignError::Overloaded { queued: 4096 }),
        ] {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
            assert!(!e.is_authentication_failure());
            assert_eq!(e.istio_error_type(), None);
        }
    }

    #[test]
    fn csr_errors_are_invalid_argument_with_istiod_wrapping() {
        let s = RequestError::Csr(CsrError::NotPem).to_status();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "CSR signing error (certificate signing request is not properly encoded)"
        );
    }
}
