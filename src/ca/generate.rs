//! Creating CA hierarchies: a root and intermediates, written in Istio's
//! plug-in layout. This is what `meshsign ca init` (the equivalent of Istio's
//! `tools/certs` Makefiles) and dev mode use; `rcgen` does the encoding.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::str::FromStr;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Key algorithms meshsign can generate CA keys for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
    Ed25519,
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ecdsa-p256" | "p256" | "ecdsa" => KeyType::EcdsaP256,
            "ecdsa-p384" | "p384" => KeyType::EcdsaP384,
            "rsa-2048" | "rsa" => KeyType::Rsa2048,
            "rsa-3072" => KeyType::Rsa3072,
            "rsa-4096" => KeyType::Rsa4096,
            "ed25519" => KeyType::Ed25519,
            _ => {
                return Err(format!(
                    "unknown key type {s:?} (ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096, ed25519)"
                ))
            }
        })
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
            KeyType::Ed25519 => "ed25519",
        })
    }
}

impl KeyType {
    /// Generates a fresh key of this type.
    pub fn generate(self) -> Result<KeyPair, rcgen::Error> {
        use rcgen::RsaKeySize;
        match self {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
            }
            KeyType::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)
            }
            KeyType::Rsa4096 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)
            }
        }
    }
}

/// A CA certificate with its key and the parameters it was made from.
pub struct GeneratedCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

impl GeneratedCa {
    /// The private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

impl fmt::Debug for GeneratedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedCa")
            .field("cert_pem", &self.cert_pem)
            .field("key", &"<private>")
            .finish()
    }
}

/// Subject and lifetime of a CA certificate to create.
#[derive(Debug, Clone)]
pub struct CaSpec {
    pub organization: String,
    pub common_name: String,
    /// Optional `L=`, as tools/certs sets it to the cluster name.
    pub locality: Option<String>,
    pub key_type: KeyType,
    pub validity: Duration,
    /// `pathLenConstraint`; `None` = unconstrained.
    pub path_len: Option<u8>,
}

fn random_serial() -> Result<SerialNumber, rcgen::Error> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // non-zero, positive
    Ok(SerialNumber::from_slice(&bytes))
}

fn ca_params(spec: &CaSpec, now: OffsetDateTime) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, spec.organization.as_str());
    dn.push(DnType::CommonName, spec.common_name.as_str());
    if let Some(l) = &spec.locality {
        dn.push(DnType::LocalityName, l.as_str());
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match spec.path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + spec.validity;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Creates a self-signed root.
pub fn root(spec: &CaSpec, now: OffsetDateTime) -> Result<GeneratedCa, rcgen::Error> {
    let key = spec.key_type.generate()?;
    let mut params = ca_params(spec, now)?;
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key)?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        not_after: params.not_after,
        issuer: Issuer::new(params, key),
    })
}

/// Creates an intermediate signed by `parent`.
pub fn intermediate(
    parent: &GeneratedCa,
    spec: &CaSpec,
    now: OffsetDateTime,
) -> Result<GeneratedCa, rcgen::Error> {
    let key = spec.key_type.generate()?;
    let mut params = ca_params(spec, now)?;
    // Never outlive the parent.
    if params.not_after > parent.not_after {
        params.not_after = parent.not_after;
    }
    let cert = params.signed_by(&key, &parent.issuer)?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        not_after: params.not_after,
        issuer: Issuer::new(params, key),
    })
}

/// Re-creates a [`GeneratedCa`] from a certificate and key on disk, so it can
/// issue again (dev mode re-issues its intermediate this way).
pub fn reload(cert_pem: &str, key_pem: &str) -> Result<GeneratedCa, String> {
    let key = super::bundle::load_key(key_pem)?;
    let der = crate::pki::parse_certificates_nonempty(cert_pem.as_bytes())
        .map_err(|e| e.to_string())?
        .swap_remove(0);
    let not_after = crate::pki::parse_cert(&der)?
        .validity()
        .not_after
        .to_datetime();
    let issuer = Issuer::from_ca_cert_der(&der, key)
        .map_err(|e| format!("cannot reuse the CA certificate: {e}"))?;
    Ok(GeneratedCa {
        cert_pem: cert_pem.to_owned(),
        issuer,
        not_after,
    })
}

/// Writes `contents` to `path` atomically (a temporary file in the same
/// directory, synced, then renamed over `path`), readable by the owner only
/// when `private`. A crash never leaves a half-written file, and replacing an
/// existing file also replaces its permissions.
pub fn write_file(path: &Path, contents: &str, private: bool) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a signing CA in Istio's plug-in layout into `dir`.
pub fn write_istio_layout(
    dir: &Path,
    signing: &GeneratedCa,
    chain_pem: &str,
    root_pem: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_file(&dir.join("ca-key.pem"), &signing.key_pem(), true)?;
    write_file(&dir.join("ca-cert.pem"), &signing.cert_pem, false)?;
    write_file(&dir.join("cert-chain.pem"), chain_pem, false)?;
    write_file(&dir.join("root-cert.pem"), root_pem, false)
}
