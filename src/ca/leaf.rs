//! The leaf certificate profile and its DER encoding.
//!
//! The profile is istiod's (`genCertTemplateFromCSR` + Go's `x509.CreateCertificate`):
//! version 3, random 128-bit serial, the issuer name copied byte for byte from
//! the signing certificate, empty subject (or the identity as CN for dual-use
//! requests), the CSR's SubjectPublicKeyInfo copied verbatim, and the
//! extensions in Go's order: KeyUsage (critical, digitalSignature +
//! keyEncipherment), ExtKeyUsage (serverAuth + clientAuth), BasicConstraints
//! (critical, CA:FALSE), AuthorityKeyIdentifier (= issuer SKI, when the issuer
//! has one) and SubjectAltName (always critical, as istiod builds it). No
//! Subject Key Identifier, as Go omits it on leaves.
//!
//! Encoding it here rather than through `rcgen` keeps the issuer name exact
//! (rcgen re-encodes names, collapsing repeated attributes) and keeps the hot
//! path to a handful of small copies.

use std::net::IpAddr;

use time::OffsetDateTime;

use crate::pki::der;

/// One subjectAltName entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanEntry {
    Uri(String),
    Dns(String),
    Ip(IpAddr),
}

/// What goes into one leaf certificate; everything else comes from the issuer.
#[derive(Debug, Clone)]
pub struct LeafSpec<'a> {
    /// DER SubjectPublicKeyInfo, copied from the CSR.
    pub spki_der: &'a [u8],
    /// Subject CN; `None` gives the empty subject istiod uses.
    pub common_name: Option<&'a str>,
    pub sans: &'a [SanEntry],
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

// Pre-encoded extensions that never change.
const EXT_KEY_USAGE: &[u8] = &[
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x05, 0xa0,
];
const EXT_EXTENDED_KEY_USAGE: &[u8] = &[
    0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x25, 0x04, 0x16, 0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01,
    0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
const EXT_BASIC_CONSTRAINTS_NOT_CA: &[u8] = &[
    0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
const OID_AUTHORITY_KEY_ID: &[u8] = &[0x55, 0x1d, 0x23];
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// `[0] INTEGER 2`: X.509 version 3.
const VERSION_3: &[u8] = &[0xa0, 0x03, 0x02, 0x01, 0x02];

/// Encodes the AuthorityKeyIdentifier extension for an issuer SKI.
pub fn authority_key_id_extension(issuer_ski: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(issuer_ski.len() + 16);
    der::nested(&mut out, der::SEQUENCE, |ext| {
        der::tlv(ext, der::OID, OID_AUTHORITY_KEY_ID);
        der::nested(ext, der::OCTET_STRING, |os| {
            der::nested(os, der::SEQUENCE, |aki| {
                // keyIdentifier [0] IMPLICIT OCTET STRING
                der::tlv(aki, 0x80, issuer_ski);
            });
        });
    });
    out
}

/// Encodes the TBSCertificate of a leaf.
///
/// `issuer_name` is the raw DER Name of the signing certificate's subject,
/// `signature_algorithm` the DER AlgorithmIdentifier the CA key signs with.
pub fn encode_tbs(
    spec: &LeafSpec<'_>,
    serial: &[u8; 16],
    signature_algorithm: &[u8],
    issuer_name: &[u8],
    authority_key_id: Option<&[u8]>,
) -> Vec<u8> {
    let mut tbs = Vec::with_capacity(
        512 + spec.spki_der.len()
            + issuer_name.len()
            + spec.sans.iter().map(san_len).sum::<usize>(),
    );
    der::nested(&mut tbs, der::SEQUENCE, |t| {
        t.extend_from_slice(VERSION_3);
        der::unsigned_integer(t, serial);
        t.extend_from_slice(signature_algorithm);
        t.extend_from_slice(issuer_name);
        der::nested(t, der::SEQUENCE, |v| {
            der::time(v, spec.not_before);
            der::time(v, spec.not_after);
        });
        encode_subject(t, spec.common_name);
        t.extend_from_slice(spec.spki_der);
        // extensions [3] EXPLICIT SEQUENCE OF Extension
        der::nested(t, 0xa3, |e| {
            der::nested(e, der::SEQUENCE, |exts| {
                exts.extend_from_slice(EXT_KEY_USAGE);
                exts.extend_from_slice(EXT_EXTENDED_KEY_USAGE);
                exts.extend_from_slice(EXT_BASIC_CONSTRAINTS_NOT_CA);
                if let Some(aki) = authority_key_id {
                    exts.extend_from_slice(aki);
                }
                if !spec.sans.is_empty() {
                    // istiod's BuildSubjectAltNameExtension always marks it critical.
                    encode_san_extension(exts, spec.sans);
                }
            });
        });
    });
    tbs
}

/// Wraps a TBSCertificate and its signature into a Certificate.
pub fn encode_certificate(tbs: &[u8], signature_algorithm: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut cert = Vec::with_capacity(tbs.len() + signature_algorithm.len() + signature.len() + 16);
    der::nested(&mut cert, der::SEQUENCE, |c| {
        c.extend_from_slice(tbs);
        c.extend_from_slice(signature_algorithm);
        c.push(der::BIT_STRING);
        der::length(c, signature.len() + 1);
        c.push(0); // no unused bits
        c.extend_from_slice(signature);
    });
    cert
}

fn san_len(san: &SanEntry) -> usize {
    match san {
        SanEntry::Uri(s) | SanEntry::Dns(s) => s.len() + 4,
        SanEntry::Ip(_) => 20,
    }
}

fn encode_subject(out: &mut Vec<u8>, common_name: Option<&str>) {
    der::nested(out, der::SEQUENCE, |name| {
        if let Some(cn) = common_name {
            der::nested(name, der::SET, |rdn| {
                der::nested(rdn, der::SEQUENCE, |atv| {
                    der::tlv(atv, der::OID, OID_COMMON_NAME);
                    der::tlv(atv, der::UTF8_STRING, cn.as_bytes());
                });
            });
        }
    });
}

fn encode_san_extension(out: &mut Vec<u8>, sans: &[SanEntry]) {
    der::nested(out, der::SEQUENCE, |ext| {
        der::tlv(ext, der::OID, OID_SUBJECT_ALT_NAME);
        ext.extend_from_slice(&[der::BOOLEAN, 0x01, 0xff]);
        der::nested(ext, der::OCTET_STRING, |os| {
            der::nested(os, der::SEQUENCE, |names| {
                for san in sans {
                    match san {
                        // GeneralName: dNSName [2] IA5String, uniformResourceIdentifier [6] IA5String,
                        // iPAddress [7] OCTET STRING
                        SanEntry::Dns(name) => der::tlv(names, 0x82, name.as_bytes()),
                        SanEntry::Uri(uri) => der::tlv(names, 0x86, uri.as_bytes()),
                        SanEntry::Ip(IpAddr::V4(ip)) => der::tlv(names, 0x87, &ip.octets()),
                        SanEntry::Ip(IpAddr::V6(ip)) => der::tlv(names, 0x87, &ip.octets()),
                    }
                }
            });
        });
    });
}
