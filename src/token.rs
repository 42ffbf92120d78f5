//! The dev-mode token issuer: mints Kubernetes-service-account-shaped JWTs so
//! that a local setup exercises the real JWT authentication path.
//!
//! Its ES256 key lives in the state directory (`jwt-signing-key.pem`, owner
//! read-only) next to the public `jwks.json`, which any meshsign configuration
//! can trust with `authn.jwt[].jwks_file`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::ca::generate::write_file;

/// The `iss` of dev tokens.
pub const DEV_ISSUER: &str = "meshsign-dev";
/// The audience istio-agent's projected token carries.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";

const KEY_FILE: &str = "jwt-signing-key.pem";
const JWKS_FILE: &str = "jwks.json";

/// A local JWT issuer.
pub struct DevTokenIssuer {
    key: EncodingKey,
    kid: String,
    jwks: String,
    dir: PathBuf,
}

impl std::fmt::Debug for DevTokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevTokenIssuer")
            .field("kid", &self.kid)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What to put in a token.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub audience: &'a str,
    pub issuer: &'a str,
    pub ttl: Duration,
    /// Mint a token that expired an hour ago (for testing rejection).
    pub expired: bool,
}

impl<'a> TokenRequest<'a> {
    pub fn new(namespace: &'a str, service_account: &'a str) -> Self {
        Self {
            namespace,
            service_account,
            audience: DEFAULT_AUDIENCE,
            issuer: DEV_ISSUER,
            ttl: Duration::from_secs(3600),
            expired: false,
        }
    }
}

impl DevTokenIssuer {
    /// Loads the issuer from `dir`, creating its key and JWKS on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, String> {
        let key_path = dir.join(KEY_FILE);
        let key = if key_path.exists() {
            let pem = std::fs::read_to_string(&key_path)
                .map_err(|e| format!("{}: {e}", key_path.display()))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", key_path.display()))?
        } else {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| e.to_string())?;
            write_file(&key_path, &key.serialize_pem(), true)
                .map_err(|e| format!("{}: {e}", key_path.display()))?;
            key
        };
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(format!(
                "{}: expected an ECDSA P-256 key",
                key_path.display()
            ));
        }
        let point = key.public_key_raw();
        if point.len() != 65 || point[0] != 4 {
            return Err(format!(
                "{}: unexpected public key encoding",
                key_path.display()
            ));
        }
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, point);
        let kid = b64.encode(&digest.as_ref()[..12]);
        let jwks = serde_json::to_string_pretty(&json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "alg": "ES256",
                "use": "sig",
                "kid": kid,
                "x": b64.encode(&point[1..33]),
                "y": b64.encode(&point[33..65]),
            }]
        }))
        .map_err(|e| e.to_string())?;
        let jwks_path = dir.join(JWKS_FILE);
        if std::fs::read_to_string(&jwks_path).ok().as_deref() != Some(jwks.as_str()) {
            write_file(&jwks_path, &jwks, false)
                .map_err(|e| format!("{}: {e}", jwks_path.display()))?;
        }
        Ok(Self {
            key: EncodingKey::from_ec_der(&key.serialize_der()),
            kid,
            jwks,
            dir: dir.to_path_buf(),
        })
    }

    /// Path of the public JWKS file.
    pub fn jwks_path(&self) -> PathBuf {
        self.dir.join(JWKS_FILE)
    }

    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// Mints a token shaped like a projected Kubernetes service-account token.
    pub fn mint(&self, req: &TokenRequest<'_>) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        let (iat, exp) = if req.expired {
            (now - 7200, now - 3600)
        } else {
            (now, now + req.ttl.as_secs())
        };
        let pod = format!("{}-dev", req.service_account);
        let claims = json!({
            "iss": req.issuer,
            "sub": format!("system:serviceaccount:{}:{}", req.namespace, req.service_account),
            "aud": [req.audience],
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "kubernetes.io": {
                "namespace": req.namespace,
                "serviceaccount": { "name": req.service_account, "uid": "00000000-0000-0000-0000-000000000001" },
                "pod": { "name": pod, "uid": "00000000-0000-0000-0000-000000000002" },
            },
        });
        self.sign_claims(&claims)
    }

    /// Signs arbitrary claims (ES256, with this issuer's `kid`): for tests
    /// that need a token `mint` would not write.
    pub fn sign_claims(&self, claims: &serde_json::Value) -> Result<String, String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| e.to_string())
    }
}
