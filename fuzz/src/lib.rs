//! Shared pieces of the fuzz targets: the fixed TEST-ONLY keys in `keys/`,
//! the JWT issuer built from them, signing of fuzzer-chosen token parts and
//! CSR bodies (so mutated inputs still pass signature checks and reach the
//! code behind them), and splitting an input into fields.
//!
//! Every key here is a throw-away test key, committed on purpose and trusted
//! by nothing but these harnesses.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use meshsign::auth::jwt::JwksSource;
use meshsign::auth::{JwtAuthenticator, JwtIssuer};
use meshsign::pki::der;

/// TEST-ONLY private keys (PKCS#8 PEM) and the JWKS of the token keys.
pub mod keys {
    pub const JWT_RSA2048: &str = include_str!("../keys/jwt-rsa2048.pem");
    pub const JWT_P256: &str = include_str!("../keys/jwt-p256.pem");
    pub const JWT_P384: &str = include_str!("../keys/jwt-p384.pem");
    pub const JWT_ED25519: &str = include_str!("../keys/jwt-ed25519.pem");
    /// The HMAC secret of the `oct` key in `jwks.json` (which must be ignored).
    pub const JWT_HMAC_SECRET: &[u8] = b"not-a-real-secret-fuzz-only";
    /// Public keys of the four token keys (kids `fuzz-rsa`, `fuzz-p256`,
    /// `fuzz-p384`, `fuzz-ed25519`) plus an `oct` key.
    pub const JWKS: &str = include_str!("../keys/jwks.json");

    pub const CSR_ED25519: &str = include_str!("../keys/csr-ed25519.pem");
    pub const CSR_RSA2048: &str = include_str!("../keys/csr-rsa2048.pem");
    pub const CSR_P256: &str = include_str!("../keys/csr-p256.pem");
}

/// The issuer the tokens in the seeds name.
pub const ISSUER: &str = "https://fuzz.meshsign.test";
/// A second configured issuer with the same keys (issuer selection by `iss`).
pub const ISSUER_2: &str = "meshsign-fuzz-2";
pub const AUDIENCE: &str = "istio-ca";
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The trust domain of tests/testdata/istio-samples/workload-foo-cert.pem,
/// configured as an alias.
pub const ALIAS_TRUST_DOMAIN: &str = "trust-domain-foo";
/// `exp` of the long-lived tokens in the seeds (2100-01-01).
pub const FAR_FUTURE: u64 = 4_102_444_800;

/// The configured JWT issuers, keyed with [`keys::JWKS`].
pub fn jwt_issuers() -> Vec<Arc<JwtIssuer>> {
    [
        (ISSUER, vec![AUDIENCE.to_owned()]),
        (ISSUER_2, vec!["other".to_owned(), AUDIENCE.to_owned()]),
    ]
    .into_iter()
    .map(|(name, audiences)| {
        let issuer = JwtIssuer::new(
            name.to_owned(),
            audiences,
            JwksSource::Static,
            Duration::from_secs(60),
        );
        issuer
            .set_jwks(keys::JWKS.as_bytes(), None)
            .expect("fuzz/keys/jwks.json loads");
        Arc::new(issuer)
    })
    .collect()
}

pub fn jwt_authenticator() -> JwtAuthenticator {
    JwtAuthenticator::new(jwt_issuers(), TRUST_DOMAIN.to_owned())
}

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The JWS signing keys, parsed once.
pub struct TokenSigner {
    rsa: EncodingKey,
    p256: EncodingKey,
    p384: EncodingKey,
    ed25519: EncodingKey,
    hmac: EncodingKey,
}

impl Default for TokenSigner {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenSigner {
    pub fn new() -> Self {
        Self {
            rsa: EncodingKey::from_rsa_pem(keys::JWT_RSA2048.as_bytes()).expect("RSA test key"),
            p256: EncodingKey::from_ec_pem(keys::JWT_P256.as_bytes()).expect("P-256 test key"),
            p384: EncodingKey::from_ec_pem(keys::JWT_P384.as_bytes()).expect("P-384 test key"),
            ed25519: EncodingKey::from_ed_pem(keys::JWT_ED25519.as_bytes())
                .expect("Ed25519 test key"),
            hmac: EncodingKey::from_secret(keys::JWT_HMAC_SECRET),
        }
    }

    /// `b64(header).b64(payload).signature`, signed with the test key for the
    /// header's `alg` (ES256 when it names none the keys can make), so a
    /// token whose header and claims are anything still has a signature that
    /// verifies, and the claim checks behind it are reached.
    pub fn sign(&self, header: &[u8], payload: &[u8]) -> String {
        let alg = serde_json::from_slice::<serde_json::Value>(header)
            .ok()
            .and_then(|h| h.get("alg")?.as_str()?.parse::<Algorithm>().ok())
            .unwrap_or(Algorithm::ES256);
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => &self.hmac,
            Algorithm::ES256 => &self.p256,
            Algorithm::ES384 => &self.p384,
            Algorithm::EdDSA => &self.ed25519,
            _ => &self.rsa,
        };
        let signed = format!("{}.{}", b64url(header), b64url(payload));
        let signature = jsonwebtoken::crypto::sign(signed.as_bytes(), key, alg).unwrap_or_default();
        format!("{signed}.{signature}")
    }
}

/// Which test key signs a CSR body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrKey {
    /// Deterministic signatures: the same input always gives the same CSR.
    Ed25519,
    /// sha256WithRSAEncryption (PKCS#1 v1.5, deterministic).
    Rsa2048,
    /// ecdsa-with-SHA256 (randomised signatures).
    P256,
}

/// The CSR signing keys, parsed once.
pub struct CsrSigner {
    ed25519: aws_lc_rs::signature::Ed25519KeyPair,
    rsa: aws_lc_rs::signature::RsaKeyPair,
    p256: aws_lc_rs::signature::EcdsaKeyPair,
    rng: aws_lc_rs::rand::SystemRandom,
}

impl Default for CsrSigner {
    fn default() -> Self {
        Self::new()
    }
}

impl CsrSigner {
    pub fn new() -> Self {
        use aws_lc_rs::signature::{
            EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
        };
        Self {
            ed25519: Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pem_der(keys::CSR_ED25519))
                .expect("Ed25519 CSR test key"),
            rsa: RsaKeyPair::from_pkcs8(&pem_der(keys::CSR_RSA2048)).expect("RSA CSR test key"),
            p256: EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_ASN1_SIGNING,
                &pem_der(keys::CSR_P256),
            )
            .expect("P-256 CSR test key"),
            rng: aws_lc_rs::rand::SystemRandom::new(),
        }
    }

    /// A complete CSR (DER) around `info`, taken as the DER of a
    /// CertificationRequestInfo as it is (whatever it holds), signed with
    /// `key`. The signature verifies whenever `info` carries that key's
    /// SubjectPublicKeyInfo, so the checks after proof of possession
    /// (extensions, SANs, Common Name) see mutated contents.
    pub fn sign_info(&self, info: &[u8], key: CsrKey) -> Vec<u8> {
        // AlgorithmIdentifier DER of each signature algorithm.
        const ED25519: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
        const SHA256_RSA: &[u8] = &[
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05,
            0x00,
        ];
        const ECDSA_SHA256: &[u8] = &[
            0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
        ];
        let (alg, signature) = match key {
            CsrKey::Ed25519 => (ED25519, self.ed25519.sign(info).as_ref().to_vec()),
            CsrKey::Rsa2048 => {
                let mut sig = vec![0; self.rsa.public_modulus_len()];
                self.rsa
                    .sign(
                        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                        &self.rng,
                        info,
                        &mut sig,
                    )
                    .expect("RSA signing");
                (SHA256_RSA, sig)
            }
            CsrKey::P256 => {
                let sig = self.p256.sign(&self.rng, info).expect("ECDSA signing");
                (ECDSA_SHA256, sig.as_ref().to_vec())
            }
        };
        let mut bit_string = Vec::with_capacity(signature.len() + 1);
        bit_string.push(0); // no unused bits
        bit_string.extend_from_slice(&signature);
        let mut body = Vec::with_capacity(info.len() + alg.len() + bit_string.len() + 8);
        body.extend_from_slice(info);
        body.extend_from_slice(alg);
        der::tlv(&mut body, der::BIT_STRING, &bit_string);
        let mut out = Vec::with_capacity(body.len() + 4);
        der::tlv(&mut out, der::SEQUENCE, &body);
        out
    }
}

/// The first element (whole TLV) inside the outer SEQUENCE of `der`: the
/// CertificationRequestInfo of a CSR. `None` if `der` is not that shape.
pub fn first_inner_element(der: &[u8]) -> Option<&[u8]> {
    fn header(data: &[u8]) -> Option<(usize, usize)> {
        // (header length, content length)
        let first = *data.get(1)?;
        if first < 0x80 {
            return Some((2, first as usize));
        }
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let len = data
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        Some((2 + n, len))
    }
    let (outer_header, _) = header(der)?;
    let inner = der.get(outer_header..)?;
    let (h, len) = header(inner)?;
    inner.get(..h + len)
}

/// PEM armour around DER, 64 columns.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block of `text` (test keys and data only).
pub fn pem_der(text: &str) -> Vec<u8> {
    let b64: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END "))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .expect("test PEM decodes")
}

/// Splits `data` at `0x00` bytes into exactly `n` fields: missing ones are
/// empty, the last takes the rest (separators included).
pub fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.splitn(n, |b| *b == 0).collect();
    out.resize(n, &[]);
    out
}

/// The field separator of the `request` target: binary fields (DER) hold
/// `0x00`, and neither PEM, base64 nor compact JSON holds this.
pub const FIELD_SEPARATOR: &[u8] = b"\n|\n";

/// Splits `data` at [`FIELD_SEPARATOR`] into exactly `n` fields, as [`fields`].
pub fn binary_fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest
            .windows(FIELD_SEPARATOR.len())
            .position(|w| w == FIELD_SEPARATOR)
        {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + FIELD_SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[]);
    out
}

#[cfg(fuzzing)]
extern "C" {
    /// AFL++'s runtime (linked by `cargo afl build`): clears the coverage
    /// collected so far in this iteration.
    fn __afl_coverage_discard();
}

/// Runs `warm_up` the first time it is called in this process, then throws
/// away the coverage it produced. Lazy initialisation (the harness itself,
/// statics in meshsign and its dependencies) happens in the first iteration
/// of each fuzzed process, after AFL++'s fork server has forked it; without
/// this its edges would show up in that iteration only, and AFL++ would count
/// them as unstable. Call it at the start of every iteration, with the
/// harness run on a few seeds.
pub fn warm_up_once(warm_up: impl FnOnce()) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        warm_up();
        #[cfg(fuzzing)]
        // SAFETY: a plain function of the AFL++ runtime, callable at any time.
        unsafe {
            __afl_coverage_discard()
        };
    });
}

/// True when `FUZZ_DEBUG` is set: the targets then print each outcome to
/// stderr (for checking seeds and triaging; never set while fuzzing).
pub fn debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

/// Input bytes as text; invalid UTF-8 becomes U+FFFD (the library takes `&str`).
pub fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}
