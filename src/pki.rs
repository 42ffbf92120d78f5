//! Small X.509 building blocks shared by the CA, the CSR checks and the CLI:
//! PEM encoding and decoding of certificate bundles, a minimal DER writer, the
//! signature algorithms meshsign signs with, and key descriptions.
//!
//! Parsing is done by `x509-parser` and signing by `aws-lc-rs` (through
//! `rcgen`'s key loading); only the fixed-shape encoding that no crate does
//! without re-encoding the issuer name lives here.

use std::fmt;

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

/// Why a PEM bundle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("not valid PEM: {0}")]
    Syntax(String),
    #[error("no PEM block found")]
    Empty,
    #[error("unexpected PEM block {found:?} (expected {expected:?})")]
    UnexpectedBlock {
        found: String,
        expected: &'static str,
    },
    #[error("certificate #{index} is not valid X.509: {reason}")]
    BadCertificate { index: usize, reason: String },
}

/// Reads every `CERTIFICATE` block of a PEM bundle, checking that each parses.
pub fn parse_certificates(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let blocks = ::pem::parse_many(text).map_err(|e| PemError::Syntax(e.to_string()))?;
    let mut certs = Vec::with_capacity(blocks.len());
    for (index, block) in blocks.into_iter().enumerate() {
        if block.tag() != "CERTIFICATE" {
            return Err(PemError::UnexpectedBlock {
                found: block.tag().to_owned(),
                expected: "CERTIFICATE",
            });
        }
        let der = block.into_contents();
        if let Err(e) = X509Certificate::from_der(&der) {
            return Err(PemError::BadCertificate {
                index: index + 1,
                reason: e.to_string(),
            });
        }
        certs.push(CertificateDer::from(der));
    }
    Ok(certs)
}

/// Like [`parse_certificates`] but requires at least one certificate.
pub fn parse_certificates_nonempty(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = parse_certificates(text)?;
    if certs.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(certs)
}

/// Encodes DER as one PEM block with 64-column lines and a trailing newline,
/// the exact shape istiod sends.
pub fn pem_encode(tag: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * tag.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(tag);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so each chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(tag);
    out.push_str("-----\n");
    out
}

/// PEM of one certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

/// PEM of several certificates, concatenated.
pub fn certs_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs.into_iter().map(|c| cert_pem(c)).collect()
}

/// Parses a DER certificate that is already known to be valid (it was checked
/// when it was loaded).
pub fn parse_cert<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| e.to_string())
}

/// A public key's algorithm and size, as operators talk about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    Rsa { bits: usize },
    EcdsaP256,
    EcdsaP384,
    EcdsaP521,
    Ed25519,
    Other,
}

impl KeyKind {
    /// Describes the key in a SubjectPublicKeyInfo.
    pub fn of_spki(spki: &SubjectPublicKeyInfo<'_>) -> KeyKind {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => KeyKind::Rsa {
                bits: rsa.key_size(),
            },
            Ok(PublicKey::EC(_)) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok());
                match curve {
                    Some(oid) if oid == oid_registry::OID_EC_P256 => KeyKind::EcdsaP256,
                    Some(oid) if oid == oid_registry::OID_NIST_EC_P384 => KeyKind::EcdsaP384,
                    Some(oid) if oid == oid_registry::OID_NIST_EC_P521 => KeyKind::EcdsaP521,
                    _ => KeyKind::Other,
                }
            }
            _ if spki.algorithm.algorithm == oid_registry::OID_SIG_ED25519 => KeyKind::Ed25519,
            _ => KeyKind::Other,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
            KeyKind::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyKind::EcdsaP521 => f.write_str("ECDSA P-521"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
            KeyKind::Other => f.write_str("unsupported key type"),
        }
    }
}

/// The signature algorithm a CA key signs with, and its DER AlgorithmIdentifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureScheme {
    RsaPkcs1Sha256,
    EcdsaP256Sha256,
    EcdsaP384Sha384,
    Ed25519,
}

impl SignatureScheme {
    /// The scheme Go's `x509.CreateCertificate` would pick for this key (istiod's choice).
    pub fn for_key(key: &rcgen::KeyPair) -> Option<Self> {
        let alg = key.algorithm();
        if alg == &rcgen::PKCS_RSA_SHA256 {
            Some(Self::RsaPkcs1Sha256)
        } else if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
            Some(Self::EcdsaP256Sha256)
        } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
            Some(Self::EcdsaP384Sha384)
        } else if alg == &rcgen::PKCS_ED25519 {
            Some(Self::Ed25519)
        } else {
            None
        }
    }

    /// DER of the `AlgorithmIdentifier` SEQUENCE.
    pub fn algorithm_identifier(self) -> &'static [u8] {
        match self {
            // sha256WithRSAEncryption, NULL parameters
            Self::RsaPkcs1Sha256 => &[
                0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05,
                0x00,
            ],
            // ecdsa-with-SHA256
            Self::EcdsaP256Sha256 => &[
                0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
            ],
            // ecdsa-with-SHA384
            Self::EcdsaP384Sha384 => &[
                0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
            ],
            // id-Ed25519
            Self::Ed25519 => &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70],
        }
    }

    /// RSA signing is two orders of magnitude slower than ECDSA and belongs
    /// off the async reactor.
    pub fn is_slow(self) -> bool {
        matches!(self, Self::RsaPkcs1Sha256)
    }
}

/// A minimal DER writer for the fixed shapes meshsign emits.
pub mod der {
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    pub const INTEGER: u8 = 0x02;
    pub const BIT_STRING: u8 = 0x03;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const BOOLEAN: u8 = 0x01;
    pub const UTF8_STRING: u8 = 0x0c;
    pub const UTC_TIME: u8 = 0x17;
    pub const GENERALIZED_TIME: u8 = 0x18;

    /// Appends a tag-length-value with `content` as value.
    pub fn tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
        out.push(tag);
        length(out, content.len());
        out.extend_from_slice(content);
    }

    /// Appends a DER length.
    pub fn length(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }

    /// Wraps what `body` writes in a constructed TLV with `tag`.
    pub fn nested(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
        let mut inner = Vec::with_capacity(256);
        body(&mut inner);
        tlv(out, tag, &inner);
    }

    /// A non-negative INTEGER from big-endian magnitude bytes.
    pub fn unsigned_integer(out: &mut Vec<u8>, magnitude: &[u8]) {
        let trimmed = match magnitude.iter().position(|b| *b != 0) {
            Some(i) => &magnitude[i..],
            None => &[0u8][..],
        };
        out.push(INTEGER);
        if trimmed[0] & 0x80 != 0 {
            length(out, trimmed.len() + 1);
            out.push(0);
        } else {
            length(out, trimmed.len());
        }
        out.extend_from_slice(trimmed);
    }

    /// A time as RFC 5280 wants it: UTCTime before 2050, GeneralizedTime after.
    pub fn time(out: &mut Vec<u8>, t: ::time::OffsetDateTime) {
        let t = t.to_offset(::time::UtcOffset::UTC);
        let year = t.year();
        let rest = format!(
            "{:02}{:02}{:02}{:02}{:02}Z",
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        if (1950..2050).contains(&year) {
            tlv(
                out,
                UTC_TIME,
                format!("{:02}{rest}", year.rem_euclid(100)).as_bytes(),
            );
        } else {
            tlv(out, GENERALIZED_TIME, format!("{year:04}{rest}").as_bytes());
        }
    }
}

/// Verifies `leaf` up to one of `roots` through `intermediates` with webpki,
/// for both TLS server and TLS client use (a mesh certificate is both).
pub fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    now: ::time::OffsetDateTime,
) -> Result<(), String> {
    verify_for(
        leaf,
        intermediates,
        roots,
        now,
        &[Usage::Server, Usage::Client],
    )
}

/// Verifies a TLS client's chain (`leaf`, then what it presented after it)
/// up to one of `roots`, as the handshake's client verifier does.
pub fn verify_client_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    now: ::time::OffsetDateTime,
) -> Result<(), String> {
    verify_for(leaf, intermediates, roots, now, &[Usage::Client])
}

#[derive(Clone, Copy)]
enum Usage {
    Server,
    Client,
}

fn verify_for(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    now: ::time::OffsetDateTime,
    usages: &[Usage],
) -> Result<(), String> {
    let anchors = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map_err(|e| format!("root: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("leaf: {e}"))?;
    let secs = u64::try_from(now.unix_timestamp()).map_err(|_| "time before 1970".to_owned())?;
    let at = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
    let algs = webpki::ALL_VERIFICATION_ALGS;
    for usage in usages {
        let (usage, what) = match usage {
            Usage::Server => (webpki::KeyUsage::server_auth(), "server"),
            Usage::Client => (webpki::KeyUsage::client_auth(), "client"),
        };
        ee.verify_for_usage(algs, &anchors, intermediates, at, usage, None, None)
            .map_err(|e| format!("not valid as a TLS {what} certificate: {e}"))?;
    }
    Ok(())
}

/// Names a set of trust anchors: SHA-256 over the sorted DER of each root.
/// Two bundles with the same roots, in any order, have the same id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RootsId([u8; 32]);

impl RootsId {
    pub fn of(roots: &[CertificateDer<'_>]) -> RootsId {
        let mut sorted: Vec<&[u8]> = roots.iter().map(|r| r.as_ref()).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for der in sorted {
            ctx.update(&(der.len() as u64).to_be_bytes());
            ctx.update(der);
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(ctx.finish().as_ref());
        RootsId(id)
    }
}

impl fmt::Debug for RootsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootsId(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// The trust anchors in use, with their id.
#[derive(Debug, Clone, Copy)]
pub struct TrustedRoots<'a> {
    pub id: RootsId,
    pub certs: &'a [CertificateDer<'static>],
}

/// The URI name constraints (RFC 5280 §4.2.1.10) of one CA certificate:
/// host patterns, `host` or `.domain`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UriConstraints {
    pub permitted: Vec<String>,
    pub excluded: Vec<String>,
}

impl UriConstraints {
    /// The URI constraints of `cert`; `None` when it has none.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Option<UriConstraints>, String> {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        let parsed = parse_cert(cert)?;
        let mut found = UriConstraints::default();
        for ext in parsed.iter_extensions() {
            if let ParsedExtension::NameConstraints(nc) = ext.parsed_extension() {
                let uris = |subtrees: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| {
                    subtrees
                        .iter()
                        .flatten()
                        .filter_map(|t| match t.base {
                            GeneralName::URI(u) => Some(u.to_ascii_lowercase()),
                            _ => None,
                        })
                        .collect::<Vec<_>>()
                };
                found.permitted.extend(uris(&nc.permitted_subtrees));
                found.excluded.extend(uris(&nc.excluded_subtrees));
            }
        }
        Ok((!found.permitted.is_empty() || !found.excluded.is_empty()).then_some(found))
    }

    /// Whether a URI with host `host` satisfies these constraints: "a.b"
    /// matches that host only, ".b" any host below b (not b itself).
    pub fn permits_host(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let matches = |pattern: &String| match pattern.strip_prefix('.') {
            Some(_) => host.ends_with(pattern.as_str()) && host.len() > pattern.len(),
            None => host == *pattern,
        };
        (self.permitted.is_empty() || self.permitted.iter().any(matches))
            && !self.excluded.iter().any(matches)
    }
}

/// The intersection of the validity periods of a certificate chain, in Unix
/// seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidityWindow {
    pub not_before: i64,
    pub not_after: i64,
}

impl ValidityWindow {
    /// The window of `chain`; `None` if a certificate does not parse.
    pub fn of(chain: &[CertificateDer<'_>]) -> Option<ValidityWindow> {
        let mut window = ValidityWindow {
            not_before: i64::MIN,
            not_after: i64::MAX,
        };
        for der in chain {
            let cert = parse_cert(der).ok()?;
            let v = cert.validity();
            window.not_before = window.not_before.max(v.not_before.timestamp());
            window.not_after = window.not_after.min(v.not_after.timestamp());
        }
        (!chain.is_empty()).then_some(window)
    }

    pub fn contains(&self, unix: i64) -> bool {
        self.not_before <= unix && unix <= self.not_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths() {
        let mut v = Vec::new();
        der::length(&mut v, 5);
        der::length(&mut v, 200);
        der::length(&mut v, 70000);
        assert_eq!(v, [5, 0x81, 200, 0x83, 0x01, 0x11, 0x70]);
    }

    #[test]
    fn der_integers_are_positive_and_minimal() {
        let mut v = Vec::new();
        der::unsigned_integer(&mut v, &[0x00, 0x00, 0x7f]);
        der::unsigned_integer(&mut v, &[0x80]);
        der::unsigned_integer(&mut v, &[0, 0]);
        assert_eq!(v, [2, 1, 0x7f, 2, 2, 0, 0x80, 2, 1, 0]);
    }

    #[test]
    fn pem_round_trip() {
        let der: Vec<u8> = (0..200u8).collect();
        let text = pem_encode("CERTIFICATE", &der);
        assert!(text.ends_with("-----END CERTIFICATE-----\n"));
        assert!(text
            .lines()
            .all(|l| l.len() <= 64 || l.starts_with("-----")));
        let parsed = ::pem::parse(&text).unwrap();
        assert_eq!(parsed.contents(), &der[..]);
    }

    #[test]
    fn rejects_non_certificate_blocks() {
        let text = pem_encode("PRIVATE KEY", b"abc");
        assert!(matches!(
            parse_certificates(text.as_bytes()),
            Err(PemError::UnexpectedBlock { .. })
        ));
        assert!(matches!(
            parse_certificates_nonempty(b""),
            Err(PemError::Empty)
        ));
    }
}
