//! A client certificate chain as the TLS handshake verified it, and what it
//! must still prove on every request that uses it: that every certificate in
//! it is valid now, and that it chains to the roots in use now. Both can stop
//! being true on a connection that stays open, or a TLS session that is
//! resumed, long after the handshake: a certificate expires, a root rotation
//! removes the root it was issued under.
//!
//! The validity check is two integer comparisons. The roots check is free
//! while the roots are those of the handshake (compared by [`RootsId`]); after
//! a change the chain is verified again, once per connection and root set.

use std::fmt;
use std::sync::Mutex;

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::pki::{self, RootsId, TrustedRoots, ValidityWindow};

/// Why a client chain that passed its handshake cannot authenticate a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientChainError {
    #[error("expired or not yet valid (checked on every request)")]
    OutsideValidity,
    #[error("no longer chains to the roots in use (the trust bundle changed since the handshake)")]
    UntrustedRoot,
}

/// The certificates a TLS client presented (leaf first), verified at the
/// handshake against the roots named `verified_under`.
pub struct ClientChain {
    certs: Vec<CertificateDer<'static>>,
    validity: Option<ValidityWindow>,
    verified_under: RootsId,
    /// The last verification against other roots: which roots, and whether
    /// the chain passed.
    recheck: Mutex<Option<(RootsId, bool)>>,
}

impl fmt::Debug for ClientChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientChain")
            .field("certificates", &self.certs.len())
            .field("validity", &self.validity)
            .field("verified_under", &self.verified_under)
            .finish()
    }
}

impl ClientChain {
    /// `None` when the client presented no certificate.
    pub fn new(certs: Vec<CertificateDer<'static>>, verified_under: RootsId) -> Option<Self> {
        if certs.is_empty() {
            return None;
        }
        Some(Self {
            validity: ValidityWindow::of(&certs),
            certs,
            verified_under,
            recheck: Mutex::new(None),
        })
    }

    /// The client's own certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certs[0]
    }

    /// Whether the chain may authenticate a request at `now`, with `roots`
    /// being the trust anchors in use.
    pub fn check(
        &self,
        roots: TrustedRoots<'_>,
        now: OffsetDateTime,
    ) -> Result<(), ClientChainError> {
        if !self
            .validity
            .is_some_and(|w| w.contains(now.unix_timestamp()))
        {
            return Err(ClientChainError::OutsideValidity);
        }
        if roots.id == self.verified_under {
            return Ok(());
        }
        let cached = self
            .recheck
            .lock()
            .ok()
            .and_then(|c| *c)
            .filter(|(id, _)| *id == roots.id);
        let trusted = match cached {
            Some((_, trusted)) => trusted,
            None => {
                let trusted =
                    pki::verify_client_chain(&self.certs[0], &self.certs[1..], roots.certs, now)
                        .is_ok();
                if let Ok(mut c) = self.recheck.lock() {
                    *c = Some((roots.id, trusted));
                }
                trusted
            }
        };
        if trusted {
            Ok(())
        } else {
            Err(ClientChainError::UntrustedRoot)
        }
    }
}
