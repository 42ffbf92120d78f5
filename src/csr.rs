//! What the caller asks for: parsing and checking the PKCS#10 CSR.
//!
//! A CSR is accepted only if its signature verifies (proof of possession), its
//! public key is on the allow-list, and it asks for nothing but one SPIFFE ID:
//! exactly one URI SAN, no DNS/IP/email SANs, no CA rights, no extension
//! outside SAN, KeyUsage, ExtKeyUsage, BasicConstraints and SubjectKeyIdentifier,
//! and no Common Name other than the identity itself. The subject is otherwise
//! ignored (istio-agent sends `O=`; the leaf's subject is empty), exactly as
//! istiod overwrites it. Whether the identity belongs to the caller is the
//! policy's question, not this module's.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::oid_registry::{self, Oid};
use x509_parser::prelude::FromDer;

use crate::pki::KeyKind;
use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Largest PEM CSR accepted (an RSA-8192 CSR is about 2.5 KiB).
pub const MAX_CSR_PEM_BYTES: usize = 16 * 1024;

/// Which CSR public keys are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    pub rsa_min_bits: usize,
    pub rsa_max_bits: usize,
    pub ecdsa_p256: bool,
    pub ecdsa_p384: bool,
    pub ed25519: bool,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            rsa_min_bits: 2048,
            rsa_max_bits: 8192,
            ecdsa_p256: true,
            ecdsa_p384: true,
            ed25519: false,
        }
    }
}

impl KeyPolicy {
    pub fn allows(&self, key: KeyKind) -> bool {
        match key {
            KeyKind::Rsa { bits } => (self.rsa_min_bits..=self.rsa_max_bits).contains(&bits),
            KeyKind::EcdsaP256 => self.ecdsa_p256,
            KeyKind::EcdsaP384 => self.ecdsa_p384,
            KeyKind::Ed25519 => self.ed25519,
            KeyKind::EcdsaP521 | KeyKind::Other => false,
        }
    }

    /// Human description of the allow-list, for error messages.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!(
            "RSA {}-{} bits",
            self.rsa_min_bits, self.rsa_max_bits
        )];
        if self.ecdsa_p256 {
            parts.push("ECDSA P-256".into());
        }
        if self.ecdsa_p384 {
            parts.push("ECDSA P-384".into());
        }
        if self.ed25519 {
            parts.push("Ed25519".into());
        }
        parts.join(", ")
    }
}

/// Why a CSR was refused. Every variant maps to `INVALID_ARGUMENT`.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("certificate signing request is larger than {MAX_CSR_PEM_BYTES} bytes")]
    TooLarge,
    #[error("certificate signing request is not properly encoded")]
    NotPem,
    #[error("failed to parse X.509 certificate signing request: {0}")]
    Der(String),
    #[error("CSR signature algorithm {0} is not accepted")]
    SignatureAlgorithm(String),
    #[error("CSR signature does not verify (no proof of possession of the key)")]
    BadSignature,
    #[error("CSR public key {found} is not allowed (allowed: {allowed})")]
    KeyNotAllowed { found: KeyKind, allowed: String },
    #[error("CSR has no URI SAN: it must carry exactly the caller's SPIFFE ID")]
    NoIdentity,
    #[error("CSR has {0} URI SANs: exactly one SPIFFE ID is allowed")]
    SeveralIdentities(usize),
    #[error("CSR URI SAN {uri:?} is not an Istio SPIFFE ID: {reason}")]
    BadIdentity { uri: String, reason: SpiffeIdError },
    #[error("CSR requests a DNS SAN ({0:?}); only the SPIFFE ID is allowed")]
    DnsSan(String),
    #[error("CSR requests an IP SAN; only the SPIFFE ID is allowed")]
    IpSan,
    #[error("CSR requests an email SAN ({0:?}); only the SPIFFE ID is allowed")]
    EmailSan(String),
    #[error("CSR requests a SAN of an unsupported type ({0}); only the SPIFFE ID is allowed")]
    OtherSan(String),
    #[error("CSR Common Name {0:?} differs from its SPIFFE ID")]
    CommonName(String),
    #[error("CSR requests CA rights ({0})")]
    CaRequested(&'static str),
    #[error("CSR requests extended key usage {0}; only serverAuth and clientAuth are allowed")]
    ExtendedKeyUsage(String),
    #[error("CSR requests extension {0}, which is not allowed")]
    Extension(String),
}

/// A CSR that passed every check.
#[derive(Debug, Clone)]
pub struct ValidatedCsr {
    /// DER SubjectPublicKeyInfo, copied into the leaf verbatim.
    pub spki_der: Vec<u8>,
    pub key: KeyKind,
    pub identity: SpiffeId,
    /// Set when the CSR asks for a dual-use CN (equal to the identity).
    pub wants_common_name: bool,
}

/// Parses a PEM CSR and applies every check listed in the module docs.
pub fn validate(pem_text: &str, keys: &KeyPolicy) -> Result<ValidatedCsr, CsrError> {
    if pem_text.len() > MAX_CSR_PEM_BYTES {
        return Err(CsrError::TooLarge);
    }
    let der = csr_der(pem_text)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Der(der_error(&e)))?;
    if !rest.is_empty() {
        return Err(CsrError::Der("trailing data after the CSR".into()));
    }

    // The key policy comes first: its message is the precise one for weak
    // keys, which the verifier would refuse anyway.
    let info = &csr.certification_request_info;
    let key = KeyKind::of_spki(&info.subject_pki);
    if !keys.allows(key) {
        return Err(CsrError::KeyNotAllowed {
            found: key,
            allowed: keys.describe(),
        });
    }
    check_signature_algorithm(&csr.signature_algorithm.algorithm)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut uris: Vec<&str> = Vec::with_capacity(1);
    // As `requested_extensions()`, with each extension's OID for messages.
    let requested = info
        .iter_attributes()
        .find_map(|attr| match attr.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(r) => Some(&r.extensions),
            _ => None,
        });
    for ext in requested.into_iter().flatten() {
        check_extension(ext, &mut uris)?;
    }
    let uri = match uris.as_slice() {
        [] => return Err(CsrError::NoIdentity),
        [one] => *one,
        many => return Err(CsrError::SeveralIdentities(many.len())),
    };
    let identity = SpiffeId::parse(uri).map_err(|reason| CsrError::BadIdentity {
        uri: uri.to_owned(),
        reason,
    })?;

    let mut wants_common_name = false;
    for cn in info.subject.iter_common_name() {
        let value = cn.as_str().unwrap_or_default();
        if value.is_empty() {
            continue;
        }
        if value != uri {
            return Err(CsrError::CommonName(value.chars().take(120).collect()));
        }
        wants_common_name = true;
    }

    Ok(ValidatedCsr {
        spki_der: info.subject_pki.raw.to_vec(),
        key,
        identity,
        wants_common_name,
    })
}

/// The DER inside a CSR's PEM armour: the first `CERTIFICATE REQUEST` (or
/// `NEW CERTIFICATE REQUEST`) block, its base64 read with any whitespace and
/// line endings; text around the block is ignored. (This is on every
/// request's path; the general `pem` parser reads byte by byte and builds
/// the base64 a `char` at a time, several times slower for a 1.5 KB CSR.)
fn csr_der(text: &str) -> Result<Vec<u8>, CsrError> {
    use base64::Engine as _;
    const BEGIN: &str = "-----BEGIN ";
    const END: &str = "-----END ";
    const DASHES: &str = "-----";
    let after_begin = &text[text.find(BEGIN).ok_or(CsrError::NotPem)? + BEGIN.len()..];
    let label_len = after_begin.find(DASHES).ok_or(CsrError::NotPem)?;
    let label = &after_begin[..label_len];
    if !matches!(label, "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST") {
        return Err(CsrError::NotPem);
    }
    let body_and_end = &after_begin[label_len + DASHES.len()..];
    let body_len = body_and_end.find(END).ok_or(CsrError::NotPem)?;
    let end_label = &body_and_end[body_len + END.len()..];
    if !end_label
        .strip_prefix(label)
        .is_some_and(|rest| rest.starts_with(DASHES))
    {
        return Err(CsrError::NotPem);
    }
    let base64_text: Vec<u8> = body_and_end.as_bytes()[..body_len]
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(base64_text)
        .map_err(|_| CsrError::NotPem)
}

fn check_signature_algorithm(oid: &Oid<'_>) -> Result<(), CsrError> {
    let accepted = [
        oid_registry::OID_PKCS1_SHA256WITHRSA,
        oid_registry::OID_PKCS1_SHA384WITHRSA,
        oid_registry::OID_PKCS1_SHA512WITHRSA,
        oid_registry::OID_SIG_ECDSA_WITH_SHA256,
        oid_registry::OID_SIG_ECDSA_WITH_SHA384,
        oid_registry::OID_SIG_ED25519,
    ];
    if accepted.iter().any(|a| a == oid) {
        Ok(())
    } else {
        Err(CsrError::SignatureAlgorithm(shown_oid(oid)))
    }
}

fn check_extension<'a>(
    ext: &'a X509Extension<'a>,
    uris: &mut Vec<&'a str>,
) -> Result<(), CsrError> {
    match ext.parsed_extension() {
        ParsedExtension::SubjectAlternativeName(san) => {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push(uri),
                    GeneralName::DNSName(dns) => {
                        return Err(CsrError::DnsSan(dns.chars().take(120).collect()))
                    }
                    GeneralName::IPAddress(_) => return Err(CsrError::IpSan),
                    GeneralName::RFC822Name(mail) => {
                        return Err(CsrError::EmailSan(mail.chars().take(120).collect()))
                    }
                    other => return Err(CsrError::OtherSan(general_name_kind(other).into())),
                }
            }
            Ok(())
        }
        ParsedExtension::BasicConstraints(bc) if bc.ca => {
            Err(CsrError::CaRequested("BasicConstraints CA:TRUE"))
        }
        ParsedExtension::BasicConstraints(_) => Ok(()),
        ParsedExtension::KeyUsage(ku) => {
            if ku.key_cert_sign() {
                Err(CsrError::CaRequested("KeyUsage keyCertSign"))
            } else if ku.crl_sign() {
                Err(CsrError::CaRequested("KeyUsage cRLSign"))
            } else {
                Ok(())
            }
        }
        ParsedExtension::ExtendedKeyUsage(eku) => {
            if eku.any {
                return Err(CsrError::ExtendedKeyUsage("anyExtendedKeyUsage".into()));
            }
            if eku.code_signing || eku.email_protection || eku.time_stamping || eku.ocsp_signing {
                return Err(CsrError::ExtendedKeyUsage(
                    "codeSigning/emailProtection/timeStamping/OCSPSigning".into(),
                ));
            }
            if let Some(other) = eku.other.first() {
                return Err(CsrError::ExtendedKeyUsage(shown_oid(other)));
            }
            Ok(())
        }
        ParsedExtension::SubjectKeyIdentifier(_) => Ok(()),
        ParsedExtension::UnsupportedExtension { .. } => {
            Err(CsrError::Extension(extension_name(&ext.oid)))
        }
        ParsedExtension::ParseError { error } => Err(CsrError::Der(format!(
            "malformed extension: {}",
            ber_parse_error(error)
        ))),
        _ => Err(CsrError::Extension(extension_name(&ext.oid))),
    }
}

/// A known extension the CSR may not ask for, by name and OID
/// (`authorityKeyIdentifier (2.5.29.35)`; `Debug` would print its contents).
fn extension_name(oid: &Oid<'_>) -> String {
    match x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry()) {
        Ok(name) => format!("{name} ({})", shown_oid(oid)),
        Err(_) => shown_oid(oid),
    }
}

/// Why the CSR's DER does not parse, in words (x509-parser's `Display`
/// shows nom's and asn1-rs' `Debug`: `Parsing Error: Der(UnexpectedTag {
/// expected: Some(Tag(16)), actual: Tag(2) })`).
fn der_error(e: &x509_parser::nom::Err<x509_parser::error::X509Error>) -> String {
    use x509_parser::error::X509Error;
    use x509_parser::nom::Err;
    let text = match e {
        Err::Incomplete(_) => TRUNCATED.to_owned(),
        Err::Error(x) | Err::Failure(x) => match x {
            X509Error::Der(ber) => ber_error(ber),
            X509Error::NomError(kind) => nom_error(*kind),
            other => other.to_string(),
        },
    };
    text.chars().take(120).collect()
}

const TRUNCATED: &str = "the DER data ends early (truncated?)";

fn ber_parse_error(e: &x509_parser::nom::Err<x509_parser::der_parser::error::BerError>) -> String {
    use x509_parser::nom::Err;
    let text = match e {
        Err::Incomplete(_) => TRUNCATED.to_owned(),
        Err::Error(ber) | Err::Failure(ber) => ber_error(ber),
    };
    text.chars().take(120).collect()
}

fn nom_error(kind: x509_parser::nom::error::ErrorKind) -> String {
    use x509_parser::nom::error::ErrorKind;
    match kind {
        ErrorKind::Eof | ErrorKind::Complete => TRUNCATED.to_owned(),
        other => format!("malformed DER ({})", other.description().to_lowercase()),
    }
}

fn ber_error(e: &x509_parser::der_parser::error::BerError) -> String {
    use x509_parser::der_parser::error::BerError;
    match e {
        BerError::UnexpectedTag { expected, actual } => match expected {
            Some(expected) => format!(
                "expected an ASN.1 {} but found {}",
                tag_name(*expected),
                tag_name(*actual)
            ),
            None => format!("unexpected ASN.1 {}", tag_name(*actual)),
        },
        BerError::UnexpectedClass { actual, .. } => {
            format!("unexpected ASN.1 class {actual}")
        }
        BerError::InvalidValue { tag, msg } => {
            format!("invalid {} value: {msg}", tag_name(*tag))
        }
        BerError::UnknownTag(n) => format!("unknown ASN.1 tag {n}"),
        BerError::DerConstraintFailed(c) => format!("not DER: {c}"),
        BerError::Incomplete(_) => TRUNCATED.to_owned(),
        BerError::NomError(kind) => nom_error(*kind),
        other => other.to_string(),
    }
}

fn tag_name(tag: x509_parser::der_parser::asn1_rs::Tag) -> String {
    let name = match tag.0 {
        1 => "BOOLEAN",
        2 => "INTEGER",
        3 => "BIT STRING",
        4 => "OCTET STRING",
        5 => "NULL",
        6 => "OBJECT IDENTIFIER",
        12 => "UTF8String",
        16 => "SEQUENCE",
        17 => "SET",
        19 => "PrintableString",
        22 => "IA5String",
        23 => "UTCTime",
        24 => "GeneralizedTime",
        n => return format!("tag {n}"),
    };
    name.to_owned()
}

fn general_name_kind(name: &GeneralName<'_>) -> &'static str {
    match name {
        GeneralName::OtherName(..) => "otherName",
        GeneralName::X400Address(_) => "x400Address",
        GeneralName::DirectoryName(_) => "directoryName",
        GeneralName::EDIPartyName(_) => "ediPartyName",
        GeneralName::RegisteredID(_) => "registeredID",
        _ => "unknown",
    }
}

/// An OID for an error message: at most 120 characters (a CSR may carry an
/// OID of thousands of arcs; found by fuzzing).
fn shown_oid(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    oid.to_id_string().chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{make_csr, CsrSubject, WorkloadKeyType};
    use crate::pki::der;

    #[test]
    fn a_huge_oid_makes_a_short_error_message() {
        // Found by fuzzing: a CSR whose signature algorithm is an OID of
        // 10,000 bytes gave a 30,026-character status message.
        let (_, csr_der) = csr_pem();
        let (_, csr) = X509CertificationRequest::from_der(&csr_der).unwrap();
        let mut arcs = vec![0x2a];
        arcs.extend(std::iter::repeat_n(0x81, 9_998));
        arcs.push(0x01);
        // The same request info and signature under that algorithm.
        let mut forged = Vec::new();
        der::nested(&mut forged, der::SEQUENCE, |body| {
            body.extend_from_slice(csr.certification_request_info.raw);
            der::nested(body, der::SEQUENCE, |alg| der::tlv(alg, der::OID, &arcs));
            der::nested(body, der::BIT_STRING, |bits| {
                bits.push(csr.signature_value.unused_bits);
                bits.extend_from_slice(&csr.signature_value.data);
            });
        });
        let pem = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", forged));
        let err =
            validate(&pem, &KeyPolicy::default()).expect_err("an unknown algorithm is refused");
        assert!(matches!(err, CsrError::SignatureAlgorithm(_)), "{err:?}");
        assert!(
            err.to_string().len() < 300,
            "{} characters",
            err.to_string().len()
        );
    }

    /// x509-parser's `Display` is nom's `Debug`; ours is words.
    #[test]
    fn der_errors_are_words_not_debug_output() {
        let (_, der) = csr_pem();
        let mut wrong_version = der.clone();
        wrong_version[5] ^= 0xff;
        let cases: [(Vec<u8>, &str); 4] = [
            (b"garbage".to_vec(), "truncated"),
            (der[..der.len() / 2].to_vec(), "truncated"),
            (
                vec![0x30, 0x03, 0x02, 0x01, 0x01],
                "expected an ASN.1 SEQUENCE but found INTEGER",
            ),
            (wrong_version, "invalid version"),
        ];
        for (bytes, expected) in cases {
            let pem = ::pem::encode(&::pem::Pem::new("CERTIFICATE REQUEST", bytes));
            let err = validate(&pem, &KeyPolicy::default()).expect_err("malformed");
            let text = err.to_string();
            assert!(matches!(err, CsrError::Der(_)), "{err:?}");
            assert!(text.contains(expected), "{text}");
            for debug in ["Parsing", "Error(", "Tag(", "Some(", "NomError", "{"] {
                assert!(!text.contains(debug), "{text}");
            }
        }
    }

    #[test]
    fn a_refused_extension_is_named_not_dumped() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/ns/sa/sa".try_into().unwrap(),
        )];
        // authorityKeyIdentifier { keyIdentifier 01020304 }
        params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 35],
            vec![0x30, 0x06, 0x80, 0x04, 1, 2, 3, 4],
        )];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = validate(&pem, &KeyPolicy::default()).expect_err("AKI refused");
        assert_eq!(
            err.to_string(),
            "CSR requests extension authorityKeyIdentifier (2.5.29.35), which is not allowed"
        );
    }

    fn csr_pem() -> (String, Vec<u8>) {
        let key = WorkloadKeyType::EcdsaP256.generate().unwrap();
        let id = SpiffeId::new("cluster.local", "ns", "sa").unwrap();
        let text = make_csr(&key, &id, CsrSubject::IstioAgent).unwrap();
        let der = ::pem::parse(&text).unwrap().into_contents();
        (text, der)
    }

    #[test]
    fn pem_armour_variants_decode_to_the_same_der() {
        let (text, der) = csr_pem();
        assert_eq!(csr_der(&text).unwrap(), der);
        let crlf = text.replace('\n', "\r\n");
        assert_eq!(csr_der(&crlf).unwrap(), der);
        let framed = format!("a comment line\n{text}\ntrailing text\n");
        assert_eq!(csr_der(&framed).unwrap(), der);
        let old_label = text.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        assert_eq!(csr_der(&old_label).unwrap(), der);
        let one_line: String = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .join("");
        let rewrapped = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{one_line}\n-----END CERTIFICATE REQUEST-----\n"
        );
        assert_eq!(csr_der(&rewrapped).unwrap(), der);
    }

    #[test]
    fn malformed_armour_is_not_pem() {
        let (text, _) = csr_pem();
        let cases = [
            String::new(),
            "MIIB".to_string(),
            text.replace("-----END CERTIFICATE REQUEST-----", ""),
            text.replace("END CERTIFICATE REQUEST", "END CERTIFICATE"),
            text.replace("CERTIFICATE REQUEST", "CERTIFICATE"),
            text.replace("CERTIFICATE REQUEST", "PRIVATE KEY"),
            text.replacen('M', "*", 1),
            text.replace(
                "-----BEGIN CERTIFICATE REQUEST-----",
                "-----BEGIN CERTIFICATE REQUEST",
            ),
        ];
        for (i, case) in cases.iter().enumerate() {
            assert!(
                matches!(csr_der(case), Err(CsrError::NotPem)),
                "case {i} accepted"
            );
        }
    }
}
