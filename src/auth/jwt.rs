//! Kubernetes service-account JWTs, verified offline against each issuer's JWKS.
//!
//! A token is accepted when its `iss` is a configured issuer, its signature
//! verifies with one of that issuer's keys (asymmetric algorithms only), its
//! `aud` contains one of the issuer's audiences, and `exp`/`nbf` hold (with a
//! small leeway). The identity comes from the `kubernetes.io` claim
//! (`namespace`, `serviceaccount.name`) or, failing that, from
//! `sub = system:serviceaccount:<ns>:<sa>`; when both exist they must agree.
//!
//! Key sets come from a file or an HTTPS URL; [`JwtIssuer::refresh`] reloads
//! them and the server runs it periodically and whenever a token names an
//! unknown key id. Verification never waits for the network.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Notify;

use super::{AuthSource, CallerIdentity, PodInfo};
use crate::spiffe::SpiffeId;

/// Longest token accepted.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Algorithms a service-account token may be signed with. Never `none` or HMAC.
const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a token was refused. `Display` never includes the token.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(Algorithm),
    #[error("issuer {0:?} is not configured")]
    UnknownIssuer(String),
    #[error("issuer {issuer}: no key {kid:?} in its JWKS")]
    UnknownKey { issuer: String, kid: String },
    #[error("issuer {0}: no key in its JWKS verifies the signature")]
    NoMatchingKey(String),
    #[error("token rejected: {0}")]
    Invalid(jsonwebtoken::errors::Error),
    #[error("token does not name a service account: {0}")]
    NoServiceAccount(String),
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    Uri {
        url: String,
        client: reqwest::Client,
        bearer_token_file: Option<PathBuf>,
    },
    /// Keys set in memory with `set_jwks` and never refreshed (benchmarks, tests).
    Static,
}

#[derive(Clone)]
struct VerifyKey {
    kid: Option<String>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<VerifyKey>,
    loaded_at: Option<Instant>,
    file_modified: Option<SystemTime>,
}

/// One trusted token issuer.
pub struct JwtIssuer {
    pub issuer: String,
    pub audiences: Vec<String>,
    source: JwksSource,
    keys: ArcSwap<KeySet>,
    /// One per algorithm family: jsonwebtoken requires every algorithm of a
    /// `Validation` to share the key's family.
    validations: [(AlgorithmFamily, Validation); 3],
    refresh_wanted: Notify,
}

impl std::fmt::Debug for JwtIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtIssuer")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("source", &self.source)
            .field("keys", &self.keys.load().keys.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct IssuerOnly {
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    serviceaccount: Option<NamedObject>,
    pod: Option<NamedObject>,
}

#[derive(Deserialize)]
struct NamedObject {
    name: Option<String>,
    uid: Option<String>,
}

impl JwtIssuer {
    /// A new issuer with no keys yet; call [`JwtIssuer::refresh`] or
    /// [`JwtIssuer::set_jwks`] before use.
    pub fn new(
        issuer: String,
        audiences: Vec<String>,
        source: JwksSource,
        leeway: Duration,
    ) -> Self {
        let validation = |family: AlgorithmFamily| {
            let mut v = Validation::new(Algorithm::RS256);
            v.algorithms = ASYMMETRIC
                .iter()
                .copied()
                .filter(|a| a.family() == family)
                .collect();
            v.set_issuer(&[&issuer]);
            v.set_audience(&audiences);
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = true;
            v.leeway = leeway.as_secs();
            v.required_spec_claims = ["exp", "iss", "aud"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            (family, v)
        };
        let validations = [
            validation(AlgorithmFamily::Rsa),
            validation(AlgorithmFamily::Ec),
            validation(AlgorithmFamily::Ed),
        ];
        Self {
            issuer,
            audiences,
            source,
            keys: ArcSwap::from_pointee(KeySet::default()),
            validations,
            refresh_wanted: Notify::new(),
        }
    }

    /// Replaces the key set from JWKS JSON. Keys that cannot be used are
    /// skipped; an error is returned only if none can.
    pub fn set_jwks(
        &self,
        json: &[u8],
        file_modified: Option<SystemTime>,
    ) -> Result<usize, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("invalid JWKS: {e}"))?;
        let keys: Vec<VerifyKey> = set
            .keys
            .iter()
            .filter_map(|jwk: &Jwk| {
                let family = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
                    AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
                    AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
                    // Symmetric keys never verify service-account tokens.
                    AlgorithmParameters::OctetKey(_) => return None,
                };
                DecodingKey::from_jwk(jwk).ok().map(|key| VerifyKey {
                    kid: jwk.common.key_id.clone(),
                    family,
                    key,
                })
            })
            .collect();
        if keys.is_empty() {
            return Err("JWKS holds no usable public key".into());
        }
        let n = keys.len();
        self.keys.store(Arc::new(KeySet {
            keys,
            loaded_at: Some(Instant::now()),
            file_modified,
        }));
        Ok(n)
    }

    pub fn key_count(&self) -> usize {
        self.keys.load().keys.len()
    }

    /// Resolves when a token named a key id this issuer does not have.
    pub async fn refresh_requested(&self) {
        self.refresh_wanted.notified().await
    }

    /// Reloads the key set from its source (a file only if it changed).
    /// Returns the number of keys now loaded.
    pub async fn refresh(&self) -> Result<usize, String> {
        match &self.source {
            JwksSource::Static => Ok(self.key_count()),
            JwksSource::File(path) => {
                let modified = tokio::fs::metadata(path)
                    .await
                    .and_then(|m| m.modified())
                    .ok();
                let current = self.keys.load();
                if current.loaded_at.is_some()
                    && modified.is_some()
                    && current.file_modified == modified
                {
                    return Ok(current.keys.len());
                }
                let json = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                self.set_jwks(&json, modified)
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
            JwksSource::Uri {
                url,
                client,
                bearer_token_file,
            } => {
                let mut req = client.get(url.as_str());
                if let Some(file) = bearer_token_file {
                    let token = tokio::fs::read_to_string(file)
                        .await
                        .map_err(|e| format!("{}: {e}", file.display()))?;
                    req = req.bearer_auth(token.trim());
                }
                let resp = req
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| format!("GET {url}: {e}"))?;
                let body = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
                self.set_jwks(&body, None)
                    .map_err(|e| format!("{url}: {e}"))
            }
        }
    }

    fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<ServiceAccount, JwtError> {
        let family = alg.family();
        let validation = self
            .validations
            .iter()
            .find(|(f, _)| *f == family)
            .map(|(_, v)| v)
            .ok_or(JwtError::Algorithm(alg))?;
        let keys = self.keys.load();
        let candidates: Vec<&VerifyKey> = match kid {
            Some(kid) => {
                let found: Vec<&VerifyKey> = keys
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid) && k.family == family)
                    .collect();
                if found.is_empty() {
                    self.refresh_wanted.notify_one();
                    return Err(JwtError::UnknownKey {
                        issuer: self.issuer.clone(),
                        kid: truncate(kid),
                    });
                }
                found
            }
            None => keys.keys.iter().filter(|k| k.family == family).collect(),
        };
        let mut last_err = None;
        for candidate in candidates {
            match jsonwebtoken::decode::<Claims>(token, &candidate.key, validation) {
                Ok(data) => return self.identity(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    // A wrong key for this token: try the next one.
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidAlgorithm
                            | ErrorKind::InvalidKeyFormat
                    ) {
                        last_err = Some(e);
                        continue;
                    }
                    return Err(JwtError::Invalid(e));
                }
            }
        }
        match last_err {
            Some(e) => Err(JwtError::Invalid(e)),
            None => Err(JwtError::NoMatchingKey(self.issuer.clone())),
        }
    }

    fn identity(&self, claims: Claims) -> Result<ServiceAccount, JwtError> {
        let from_sub = claims.sub.as_deref().map(parse_service_account_subject);
        let from_k8s = claims.kubernetes.as_ref().and_then(|k| {
            Some((
                k.namespace.clone()?,
                k.serviceaccount.as_ref()?.name.clone()?,
            ))
        });
        let (ns, sa) = match (from_k8s, from_sub) {
            (Some(k8s), Some(Ok(sub))) if k8s != sub => {
                return Err(JwtError::NoServiceAccount(format!(
                    "kubernetes.io claim names {}/{} but sub names {}/{}",
                    k8s.0, k8s.1, sub.0, sub.1
                )))
            }
            (Some(k8s), _) => k8s,
            (None, Some(Ok(sub))) => sub,
            (None, Some(Err(e))) => return Err(JwtError::NoServiceAccount(e)),
            (None, None) => {
                return Err(JwtError::NoServiceAccount(
                    "neither a kubernetes.io claim nor a sub claim".into(),
                ))
            }
        };
        let pod = claims.kubernetes.and_then(|k| k.pod).map(|p| PodInfo {
            name: p.name.unwrap_or_default(),
            uid: p.uid.unwrap_or_default(),
        });
        Ok(ServiceAccount {
            namespace: ns,
            name: sa,
            pod,
        })
    }
}

/// The service account a token names, before the trust domain is applied.
struct ServiceAccount {
    namespace: String,
    name: String,
    pod: Option<PodInfo>,
}

/// Parses `system:serviceaccount:<ns>:<sa>`.
fn parse_service_account_subject(sub: &str) -> Result<(String, String), String> {
    let parts: Vec<&str> = sub.split(':').collect();
    match parts.as_slice() {
        ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => {
            Ok(((*ns).to_owned(), (*sa).to_owned()))
        }
        _ => Err(format!(
            "sub {:?} is not system:serviceaccount:<namespace>:<name>",
            truncate(sub)
        )),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// All configured issuers.
#[derive(Debug, Default)]
pub struct JwtAuthenticator {
    issuers: Vec<Arc<JwtIssuer>>,
    trust_domain: String,
}

impl JwtAuthenticator {
    pub fn new(issuers: Vec<Arc<JwtIssuer>>, trust_domain: String) -> Self {
        Self {
            issuers,
            trust_domain,
        }
    }

    pub fn issuers(&self) -> &[Arc<JwtIssuer>] {
        &self.issuers
    }

    /// Verifies a bearer token and returns the caller it names.
    pub fn verify(&self, token: &str) -> Result<CallerIdentity, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLong);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(JwtError::Algorithm(header.alg));
        }
        // `iss` (unverified) picks the key set, so a foreign token is refused
        // before any key lookup or JWKS refresh; the issuer's validation then
        // checks it again on the verified claims.
        let iss = peek_issuer(token)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| JwtError::UnknownIssuer(truncate(&iss)))?;
        let account = issuer.verify(token, header.alg, header.kid.as_deref())?;
        let id = SpiffeId::new(&self.trust_domain, &account.namespace, &account.name)
            .map_err(|e| JwtError::NoServiceAccount(e.to_string()))?;
        Ok(CallerIdentity {
            id,
            source: AuthSource::Jwt {
                issuer: issuer.issuer.clone(),
            },
            pod: account.pod,
        })
    }
}

/// Reads `iss` from an unverified payload, only to pick the issuer's keys.
fn peek_issuer(token: &str) -> Result<String, JwtError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| JwtError::Malformed("not three dot-separated parts".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed("payload is not base64url".into()))?;
    let claims: IssuerOnly = serde_json::from_slice(&bytes)
        .map_err(|_| JwtError::Malformed("payload is not a JSON object".into()))?;
    claims
        .iss
        .ok_or_else(|| JwtError::Malformed("no iss claim".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_subjects() {
        assert_eq!(
            parse_service_account_subject("system:serviceaccount:default:web").unwrap(),
            ("default".into(), "web".into())
        );
        for bad in [
            "system:serviceaccount:default",
            "system:serviceaccount::web",
            "system:node:x:y",
            "admin",
        ] {
            assert!(parse_service_account_subject(bad).is_err(), "{bad}");
        }
    }
}
