//! Loading and verifying an operator's CA bundle from a directory.
//!
//! Two layouts are understood, as istiod understands them:
//! - Istio's plug-in layout: `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`;
//! - the `kubernetes.io/tls` Secret layout: `tls.crt`, `tls.key`, `ca.crt` (the chain is
//!   then `tls.crt` followed by `ca.crt`).
//!
//! Verification follows istiod (`util.Verify`) and goes a little further: every
//! problem is reported with the file it was found in, and the bundle is refused
//! unless the key matches the certificate, the signing certificate is a CA, the
//! chain file starts with it, and it chains through the chain file to a root in
//! the root file with every certificate on the path currently valid.

use std::fmt;
use std::path::{Path, PathBuf};

use ::time::OffsetDateTime;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::*;

use crate::pki::{self, KeyKind, SignatureScheme};

/// Where each part of a bundle lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`.
    Istio,
    /// `tls.crt`, `tls.key`, `ca.crt`.
    KubernetesTls,
}

impl Layout {
    /// The file holding the trust bundle.
    pub fn root_file(self) -> &'static str {
        self.files().root
    }

    /// The file holding the signing certificate.
    pub fn signing_cert_file(self) -> &'static str {
        self.files().cert
    }

    /// The file holding the signing key.
    pub fn key_file(self) -> &'static str {
        self.files().key
    }

    fn files(self) -> LayoutFiles {
        match self {
            Layout::Istio => LayoutFiles {
                cert: "ca-cert.pem",
                key: "ca-key.pem",
                root: "root-cert.pem",
                chain: &["cert-chain.pem"],
            },
            Layout::KubernetesTls => LayoutFiles {
                cert: "tls.crt",
                key: "tls.key",
                root: "ca.crt",
                chain: &["tls.crt", "ca.crt"],
            },
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Istio => "Istio plug-in CA layout",
            Layout::KubernetesTls => "kubernetes.io/tls layout",
        })
    }
}

struct LayoutFiles {
    cert: &'static str,
    key: &'static str,
    root: &'static str,
    chain: &'static [&'static str],
}

/// A bundle problem, naming the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct BundleError {
    pub file: PathBuf,
    pub reason: String,
}

impl BundleError {
    fn new(file: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            reason: reason.into(),
        }
    }
}

/// The CA's private key. Its `Debug` shows the algorithm only.
pub struct CaKey(pub(crate) rcgen::KeyPair);

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CaKey({:?}, <private>)",
            SignatureScheme::for_key(&self.0)
        )
    }
}

/// A loaded and verified CA bundle.
#[derive(Debug)]
pub struct CaBundle {
    pub dir: PathBuf,
    pub layout: Layout,
    /// The certificate leaves are signed under.
    pub signing_cert: CertificateDer<'static>,
    pub(crate) key: CaKey,
    pub key_kind: KeyKind,
    pub scheme: SignatureScheme,
    /// The chain files' certificates, in file order; starts with `signing_cert`
    /// unless the signing certificate is itself a root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust bundle (one or more roots).
    pub roots: Vec<CertificateDer<'static>>,
    /// Earliest `notAfter` of the signing certificate and the path to its root.
    pub not_after: OffsetDateTime,
}

/// Summary of one certificate, for `ca check` and logs.
#[derive(Debug, Clone)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub key: KeyKind,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
}

impl CertSummary {
    pub fn of(der: &CertificateDer<'_>) -> Option<Self> {
        let cert = pki::parse_cert(der).ok()?;
        Some(Self {
            subject: name_or_empty(cert.subject()),
            issuer: name_or_empty(cert.issuer()),
            key: KeyKind::of_spki(cert.public_key()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            is_ca: cert.is_ca(),
        })
    }
}

fn name_or_empty(name: &X509Name<'_>) -> String {
    let s = name.to_string();
    if s.is_empty() {
        "(empty)".to_owned()
    } else {
        s
    }
}

/// The signing key file is readable by more than its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyExposure {
    pub path: PathBuf,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
}

impl fmt::Display for KeyExposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is readable by group or others (mode {:04o}): restrict it to its owner \
             (chmod 600, or defaultMode: 0400 on the Secret volume)",
            self.path.display(),
            self.mode
        )
    }
}

/// Whether the signing key file in `dir` is readable by anyone but its
/// owner (Kubernetes mounts Secret files `0644` unless the volume sets
/// `defaultMode`). Symlinks (Secret volumes) are followed. `None`: fine, or
/// nothing to say (no key file, not Unix).
pub fn key_file_exposure(dir: &Path, layout: Layout) -> Option<KeyExposure> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(layout.files().key);
        let mode = std::fs::metadata(&path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(KeyExposure { path, mode })
    }
    #[cfg(not(unix))]
    {
        let _ = (dir, layout);
        None
    }
}

impl CaBundle {
    /// Detects the layout of `dir`; `Ok(None)` when the directory holds no
    /// bundle file at all.
    pub fn detect(dir: &Path) -> Result<Option<Layout>, BundleError> {
        let layout = if dir.join("tls.crt").exists() {
            Layout::KubernetesTls
        } else {
            Layout::Istio
        };
        let files = layout.files();
        let wanted: Vec<&str> = [files.cert, files.key, files.root]
            .into_iter()
            .chain(files.chain.iter().copied())
            .collect();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|f| !dir.join(f).exists())
            .collect();
        if missing.len() == wanted.len() {
            return Ok(None);
        }
        if let Some(first) = missing.first() {
            return Err(BundleError::new(
                dir.join(first),
                format!(
                    "incomplete signing CA bundle ({layout}): missing {}",
                    missing.join(", ")
                ),
            ));
        }
        Ok(Some(layout))
    }

    /// Loads and verifies the bundle in `dir` at time `now`.
    pub fn load(dir: &Path, now: OffsetDateTime) -> Result<CaBundle, BundleError> {
        let layout = Self::detect(dir)?.ok_or_else(|| {
            BundleError::new(
                dir,
                "no CA bundle found (expected ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem \
                 or tls.crt, tls.key, ca.crt)",
            )
        })?;
        let files = layout.files();
        let cert_path = dir.join(files.cert);
        let key_path = dir.join(files.key);
        let root_path = dir.join(files.root);

        let signing_cert = read_certs(&cert_path)?.swap_remove(0);
        let key_pem = read_text(&key_path)?;
        let roots = read_certs(&root_path)?;
        let mut chain = Vec::new();
        for name in files.chain {
            let path = dir.join(name);
            let text = read_bytes(&path)?;
            let certs = pki::parse_certificates(&text)
                .map_err(|e| BundleError::new(&path, e.to_string()))?;
            chain.extend(certs);
        }
        Self::verify(
            dir,
            layout,
            signing_cert,
            &key_pem,
            chain,
            roots,
            now,
            &BundlePaths {
                cert: cert_path,
                key: key_path,
                root: root_path,
                chain: dir.join(files.chain[0]),
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn verify(
        dir: &Path,
        layout: Layout,
        signing_cert: CertificateDer<'static>,
        key_pem: &str,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
        now: OffsetDateTime,
        paths: &BundlePaths,
    ) -> Result<CaBundle, BundleError> {
        let key = load_key(key_pem).map_err(|e| BundleError::new(&paths.key, e))?;
        let cert = pki::parse_cert(&signing_cert).map_err(|e| BundleError::new(&paths.cert, e))?;

        // The key must belong to the certificate.
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(BundleError::new(
                &paths.key,
                format!(
                    "the private key does not match the certificate in {}",
                    file_name(&paths.cert)
                ),
            ));
        }
        let key_kind = KeyKind::of_spki(cert.public_key());
        match key_kind {
            KeyKind::Rsa { bits } if !(2048..=8192).contains(&bits) => {
                return Err(BundleError::new(
                    &paths.key,
                    format!("RSA key of {bits} bits is outside the supported 2048..=8192"),
                ))
            }
            KeyKind::Rsa { .. } | KeyKind::EcdsaP256 | KeyKind::EcdsaP384 | KeyKind::Ed25519 => {}
            other => {
                return Err(BundleError::new(
                    &paths.key,
                    format!("{other} keys cannot sign (supported: RSA 2048-8192, ECDSA P-256/P-384, Ed25519)"),
                ))
            }
        }
        let scheme = SignatureScheme::for_key(&key).ok_or_else(|| {
            BundleError::new(&paths.key, "unsupported signature algorithm for this key")
        })?;

        check_is_ca(&cert).map_err(|e| BundleError::new(&paths.cert, e))?;
        check_validity(&cert, now).map_err(|e| BundleError::new(&paths.cert, e))?;

        if roots.is_empty() {
            return Err(BundleError::new(&paths.root, "no certificate found"));
        }
        let signing_is_root = roots.iter().any(|r| r.as_ref() == signing_cert.as_ref());
        match chain.first() {
            Some(first) if first.as_ref() == signing_cert.as_ref() => {}
            None if signing_is_root => {}
            None => {
                return Err(BundleError::new(
                    &paths.chain,
                    format!(
                        "empty, but {} is not a root: the chain must start with it",
                        file_name(&paths.cert)
                    ),
                ))
            }
            Some(_) => {
                return Err(BundleError::new(
                    &paths.chain,
                    format!(
                    "must start with the signing certificate ({}), then its issuers up to the root",
                    file_name(&paths.cert)
                ),
                ))
            }
        }

        let not_after = verify_path(&signing_cert, &chain, &roots, now, paths)?;

        Ok(CaBundle {
            dir: dir.to_path_buf(),
            layout,
            signing_cert,
            key: CaKey(key),
            key_kind,
            scheme,
            chain,
            roots,
            not_after,
        })
    }

    /// Builds a bundle from in-memory PEM (used by dev mode and tests); the
    /// same checks apply, with `label` standing in for file names.
    pub fn from_pem(
        label: &Path,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &str,
        root_pem: &str,
        now: OffsetDateTime,
    ) -> Result<CaBundle, BundleError> {
        let paths = BundlePaths {
            cert: label.join("ca-cert.pem"),
            key: label.join("ca-key.pem"),
            root: label.join("root-cert.pem"),
            chain: label.join("cert-chain.pem"),
        };
        let signing_cert = pki::parse_certificates_nonempty(cert_pem.as_bytes())
            .map_err(|e| BundleError::new(&paths.cert, e.to_string()))?
            .swap_remove(0);
        let chain = pki::parse_certificates(chain_pem.as_bytes())
            .map_err(|e| BundleError::new(&paths.chain, e.to_string()))?;
        let roots = pki::parse_certificates_nonempty(root_pem.as_bytes())
            .map_err(|e| BundleError::new(&paths.root, e.to_string()))?;
        Self::verify(
            label,
            Layout::Istio,
            signing_cert,
            key_pem,
            chain,
            roots,
            now,
            &paths,
        )
    }

    /// Summaries of the signing certificate, the chain and the roots.
    pub fn describe(&self) -> Vec<(String, CertSummary)> {
        let mut out = Vec::new();
        let files = self.layout.files();
        if let Some(s) = CertSummary::of(&self.signing_cert) {
            out.push((files.cert.to_owned(), s));
        }
        for (i, c) in self.chain.iter().enumerate() {
            if let Some(s) = CertSummary::of(c) {
                out.push((format!("{} #{}", files.chain.join("+"), i + 1), s));
            }
        }
        for (i, c) in self.roots.iter().enumerate() {
            if let Some(s) = CertSummary::of(c) {
                out.push((format!("{} #{}", files.root, i + 1), s));
            }
        }
        out
    }
}

struct BundlePaths {
    cert: PathBuf,
    key: PathBuf,
    root: PathBuf,
    chain: PathBuf,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, BundleError> {
    std::fs::read(path).map_err(|e| BundleError::new(path, format!("cannot read: {e}")))
}

fn read_text(path: &Path) -> Result<String, BundleError> {
    String::from_utf8(read_bytes(path)?).map_err(|_| BundleError::new(path, "not UTF-8 text"))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let bytes = read_bytes(path)?;
    pki::parse_certificates_nonempty(&bytes).map_err(|e| BundleError::new(path, e.to_string()))
}

/// Parses a CA private key in PKCS#1, SEC1 or PKCS#8 PEM.
pub fn load_key(pem_text: &str) -> Result<rcgen::KeyPair, String> {
    let block = ::pem::parse(pem_text).map_err(|e| format!("not a PEM private key: {e}"))?;
    match block.tag() {
        "RSA PRIVATE KEY" | "EC PRIVATE KEY" | "PRIVATE KEY" => {}
        "ENCRYPTED PRIVATE KEY" => {
            return Err("encrypted private keys are not supported; decrypt it first".into())
        }
        other => {
            return Err(format!(
                "unexpected PEM block {other:?}, expected a private key"
            ))
        }
    }
    rcgen::KeyPair::from_pem(pem_text).map_err(|e| format!("cannot parse the private key: {e}"))
}

fn check_is_ca(cert: &X509Certificate<'_>) -> Result<(), String> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| format!("invalid BasicConstraints: {e}"))?;
    if !bc.map(|b| b.value.ca).unwrap_or(false) {
        return Err(format!(
            "certificate {} is not authorized to sign other certificates (BasicConstraints CA:TRUE missing)",
            cert.subject()
        ));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| format!("invalid KeyUsage on {}: {e}", cert.subject()))?;
    if let Some(ku) = ku {
        if !ku.value.key_cert_sign() {
            return Err(format!(
                "certificate {} has a KeyUsage without keyCertSign",
                cert.subject()
            ));
        }
    }
    Ok(())
}

fn check_validity(cert: &X509Certificate<'_>, now: OffsetDateTime) -> Result<(), String> {
    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    if now < nb {
        return Err(format!(
            "certificate {} is not valid before {}",
            cert.subject(),
            crate::logging::Rfc3339(nb)
        ));
    }
    if now > na {
        return Err(format!(
            "certificate {} expired at {}",
            cert.subject(),
            crate::logging::Rfc3339(na)
        ));
    }
    Ok(())
}

/// Walks from the signing certificate to a root: each step finds an issuer by
/// name among the chain and the roots whose key verifies the signature.
/// Returns the earliest `notAfter` on the path.
fn verify_path(
    signing_cert: &CertificateDer<'_>,
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    now: OffsetDateTime,
    paths: &BundlePaths,
) -> Result<OffsetDateTime, BundleError> {
    fn parse_all<'a>(
        certs: &'a [CertificateDer<'static>],
        path: &Path,
    ) -> Result<Vec<X509Certificate<'a>>, BundleError> {
        certs
            .iter()
            .map(|c| pki::parse_cert(c).map_err(|e| BundleError::new(path, e)))
            .collect()
    }
    let chain_parsed = parse_all(chain, &paths.chain)?;
    let roots_parsed = parse_all(roots, &paths.root)?;
    let signing = pki::parse_cert(signing_cert).map_err(|e| BundleError::new(&paths.cert, e))?;
    let mut current = &signing;
    let mut earliest = current.validity().not_after.to_datetime();

    for _depth in 0..16 {
        // Reached a trust anchor?
        if roots_parsed.iter().any(|r| r.as_raw() == current.as_raw()) {
            return Ok(earliest);
        }
        if let Some(root) = roots_parsed.iter().find(|r| {
            r.subject().as_raw() == current.issuer().as_raw()
                && current.verify_signature(Some(r.public_key())).is_ok()
        }) {
            check_validity(root, now).map_err(|e| BundleError::new(&paths.root, e))?;
            earliest = earliest.min(root.validity().not_after.to_datetime());
            return Ok(earliest);
        }
        let next = chain_parsed.iter().find(|c| {
            c.as_raw() != current.as_raw()
                && c.subject().as_raw() == current.issuer().as_raw()
                && current.verify_signature(Some(c.public_key())).is_ok()
        });
        let Some(next) = next else {
            let by_name = chain_parsed
                .iter()
                .chain(roots_parsed.iter())
                .any(|c| c.subject().as_raw() == current.issuer().as_raw());
            let why = if by_name {
                "an issuer with that name is present but its key does not verify the signature"
            } else {
                "no certificate with that subject is in the chain or the root file"
            };
            return Err(BundleError::new(
                &paths.chain,
                format!(
                    "cannot verify {} up to a root in {}: issuer {} of {}: {why}",
                    file_name(&paths.cert),
                    file_name(&paths.root),
                    current.issuer(),
                    current.subject(),
                ),
            ));
        };
        check_is_ca(next).map_err(|e| BundleError::new(&paths.chain, e))?;
        check_validity(next, now).map_err(|e| BundleError::new(&paths.chain, e))?;
        earliest = earliest.min(next.validity().not_after.to_datetime());
        current = next;
    }
    Err(BundleError::new(
        &paths.chain,
        "chain longer than 16 certificates or contains a loop",
    ))
}
