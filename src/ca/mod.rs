//! The certificate authority: the loaded bundle, the signing key and the one
//! operation that matters, signing a leaf.
//!
//! Everything about the issuer that does not change between requests (its raw
//! subject name, its AuthorityKeyIdentifier extension, the PEM elements of the
//! response chain) is computed once when the CA is built, so signing is one
//! TBSCertificate encoding and one signature. A CA is also able to test itself:
//! [`Ca::self_test`] signs a throwaway leaf and verifies it with webpki against
//! the roots, exactly as a client would; health and start-up use it.

pub mod bundle;
pub mod dev;
pub mod generate;
pub mod leaf;
pub mod pool;
pub mod reload;
pub mod rotation;

use std::path::Path;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rcgen::SigningKey as _;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

pub use bundle::{BundleError, CaBundle, CertSummary, Layout};
pub use leaf::{LeafSpec, SanEntry};

use crate::pki::{self, SignatureScheme};

/// Why a leaf could not be signed. All of these are server-side failures.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("signing certificate has expired at {}", crate::logging::Rfc3339(*.0))]
    SignerExpired(OffsetDateTime),
    #[error("requested validity ends before it starts")]
    EmptyValidity,
    #[error("serial number generation failure")]
    Serial,
    #[error("signing failed: {0}")]
    Signature(String),
    #[error("{queued} signatures already queued (limits.max_signing_queue)")]
    Overloaded { queued: usize },
}

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A CA ready to sign.
#[derive(Debug)]
pub struct Ca {
    bundle: CaBundle,
    issuer_name: Vec<u8>,
    authority_key_id: Option<Vec<u8>>,
    /// `[chain certs..., root bundle]`: every response element after the leaf.
    response_tail: Vec<String>,
    roots_pem: String,
    rng: SystemRandom,
    /// Names `bundle.roots`.
    roots_id: pki::RootsId,
    /// The trust domain the start-up and health test signings are for.
    trust_domain: String,
}

impl Ca {
    /// Prepares a verified bundle for signing and proves it by a test signing
    /// of a workload identity in `trust_domain` (so an intermediate whose URI
    /// name constraints permit only that domain passes).
    pub fn new(
        bundle: CaBundle,
        trust_domain: &str,
        now: OffsetDateTime,
    ) -> Result<Ca, BundleError> {
        let cert = pki::parse_cert(&bundle.signing_cert).map_err(|e| BundleError {
            file: bundle.dir.clone(),
            reason: e,
        })?;
        let issuer_name = cert.subject().as_raw().to_vec();
        let authority_key_id =
            cert.iter_extensions()
                .find_map(|ext| match ext.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(ski) => {
                        Some(leaf::authority_key_id_extension(ski.0))
                    }
                    _ => None,
                });
        let roots_pem = pki::certs_pem(&bundle.roots);
        let bundle_roots = bundle.roots.clone();
        let mut response_tail: Vec<String> =
            bundle.chain.iter().map(|c| pki::cert_pem(c)).collect();
        response_tail.push(roots_pem.clone());
        let ca = Ca {
            bundle,
            issuer_name,
            authority_key_id,
            response_tail,
            roots_pem,
            rng: SystemRandom::new(),
            roots_id: pki::RootsId::of(&bundle_roots),
            trust_domain: trust_domain.to_owned(),
        };
        ca.self_test(now).map_err(|reason| BundleError {
            file: ca.bundle.dir.clone(),
            reason: format!("test signing failed: {reason}"),
        })?;
        Ok(ca)
    }

    /// Loads, verifies and test-signs the bundle in `dir`, in Istio's
    /// default trust domain `cluster.local`.
    pub fn load(dir: &Path, now: OffsetDateTime) -> Result<Ca, BundleError> {
        Ca::load_for(dir, DEFAULT_TRUST_DOMAIN, now)
    }

    /// Loads, verifies and test-signs the bundle in `dir` for `trust_domain`.
    pub fn load_for(
        dir: &Path,
        trust_domain: &str,
        now: OffsetDateTime,
    ) -> Result<Ca, BundleError> {
        Ca::new(CaBundle::load(dir, now)?, trust_domain, now)
    }

    /// The URI name constraints on the signing path (the chain, which starts
    /// with the signing certificate), one entry per certificate that has any.
    pub fn uri_name_constraints(&self) -> Result<Vec<pki::UriConstraints>, String> {
        let mut out = Vec::new();
        for cert in &self.bundle.chain {
            if let Some(c) = pki::UriConstraints::of(cert)? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// The trust domain the test signings use.
    pub fn test_trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchors, with the id that names them.
    pub fn trusted_roots(&self) -> pki::TrustedRoots<'_> {
        pki::TrustedRoots {
            id: self.roots_id,
            certs: &self.bundle.roots,
        }
    }

    pub fn bundle(&self) -> &CaBundle {
        &self.bundle
    }

    pub fn scheme(&self) -> SignatureScheme {
        self.bundle.scheme
    }

    /// Latest `notAfter` a leaf may have: the earliest expiry on the signing path.
    pub fn not_after(&self) -> OffsetDateTime {
        self.bundle.not_after
    }

    /// PEM elements that follow the leaf in every response.
    pub fn response_tail(&self) -> &[String] {
        &self.response_tail
    }

    /// The trust bundle as PEM (one or more roots).
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }

    /// Signs one leaf. `spec.not_after` must already be clamped by policy;
    /// it is clamped again here to the signer's own expiry.
    pub fn sign(&self, spec: &LeafSpec<'_>) -> Result<CertificateDer<'static>, SignError> {
        let now_limit = self.bundle.not_after;
        if OffsetDateTime::now_utc() >= now_limit {
            return Err(SignError::SignerExpired(now_limit));
        }
        let mut spec = spec.clone();
        if spec.not_after > now_limit {
            spec.not_after = now_limit;
        }
        if spec.not_after <= spec.not_before {
            return Err(SignError::EmptyValidity);
        }
        let mut serial = [0u8; 16];
        self.rng.fill(&mut serial).map_err(|_| SignError::Serial)?;
        if serial == [0u8; 16] {
            return Err(SignError::Serial);
        }
        let alg = self.bundle.scheme.algorithm_identifier();
        let tbs = leaf::encode_tbs(
            &spec,
            &serial,
            alg,
            &self.issuer_name,
            self.authority_key_id.as_deref(),
        );
        let signature = self
            .bundle
            .key
            .0
            .sign(&tbs)
            .map_err(|e| SignError::Signature(e.to_string()))?;
        Ok(CertificateDer::from(leaf::encode_certificate(
            &tbs, alg, &signature,
        )))
    }

    /// Signs a throwaway leaf for a fresh P-256 key and verifies it as a
    /// client and as a server would, against the roots, at `now`.
    ///
    /// The leaf is for a workload in the configured trust domain. When the
    /// signing path carries URI name constraints, the trust domain is checked
    /// against them here (webpki, which verifies the chain, does not implement
    /// URI constraints and refuses every URI name under one), and the chain is
    /// verified with a second leaf that has no name.
    pub fn self_test(&self, now: OffsetDateTime) -> Result<(), String> {
        let sans = [SanEntry::Uri(format!(
            "spiffe://{}/ns/istio-system/sa/meshsign-self-test",
            self.trust_domain
        ))];
        let leaf = self.test_leaf(&sans, now)?;
        let constraints = self.uri_name_constraints()?;
        if constraints.is_empty() {
            pki::verify_chain(&leaf, &self.bundle.chain, &self.bundle.roots, now)
                .map_err(|e| format!("a test leaf does not verify against the roots: {e}"))?;
        } else {
            let host = self.test_trust_domain();
            if let Some(c) = constraints.iter().find(|c| !c.permits_host(host)) {
                return Err(format!(
                    "the trust domain {host:?} is outside the CA's URI name constraints \
                     (permitted {:?}, excluded {:?})",
                    c.permitted, c.excluded
                ));
            }
            self.verifies_under(&self.bundle.roots, now)?;
        }
        let parsed = pki::parse_cert(&leaf)?;
        if parsed.issuer().as_raw() != self.issuer_name.as_slice() {
            return Err("issuer name of the test leaf differs from the CA subject".into());
        }
        Ok(())
    }

    /// Whether a leaf signed now verifies against `roots` alone (a test leaf
    /// without names, so URI name constraints do not get in the way).
    pub fn verifies_under(
        &self,
        roots: &[CertificateDer<'static>],
        now: OffsetDateTime,
    ) -> Result<(), String> {
        let nameless = self.test_leaf(&[], now)?;
        pki::verify_chain(&nameless, &self.bundle.chain, roots, now)
            .map_err(|e| format!("a test leaf does not verify against the roots: {e}"))
    }

    /// A throwaway leaf for a fresh P-256 key, valid for a few minutes.
    fn test_leaf(
        &self,
        sans: &[SanEntry],
        now: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("cannot generate a test key: {e}"))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        self.sign(&LeafSpec {
            spki_der: &spki,
            common_name: None,
            sans,
            not_before: now - Duration::minutes(1),
            not_after: now + Duration::minutes(5),
        })
        .map_err(|e| e.to_string())
    }
}
