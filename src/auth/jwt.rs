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
//!
//! Each part of a token is decoded and parsed once: the header for `alg` and
//! `kid`, the payload into [`Claims`] (its `iss` picks the issuer before any
//! key is tried), then jsonwebtoken checks the signature over the untouched
//! `header.payload` bytes, and the claims already parsed are validated. (Its
//! all-in-one `decode` parses the header twice and the payload three times,
//! which was most of the non-cryptographic cost of a request.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
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
    #[error("token has no {0} claim")]
    MissingClaim(&'static str),
    #[error("token expired at {}", crate::logging::Rfc3339::unix(*.0))]
    Expired(u64),
    #[error("token is not valid before {}", crate::logging::Rfc3339::unix(*.0))]
    NotYetValid(u64),
    #[error("token audience {0:?} holds none of the accepted audiences")]
    Audience(Vec<String>),
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
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    leeway: u64,
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

/// The JOSE header fields meshsign reads.
#[derive(Deserialize)]
struct JoseHeader {
    alg: Algorithm,
    kid: Option<String>,
    /// Critical extensions must be understood (RFC 7515 §4.1.11); meshsign
    /// understands none, so a token that lists any is refused.
    crit: Option<serde::de::IgnoredAny>,
}

/// The payload, parsed once. A claim given twice is a parse error (serde).
#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    /// NumericDate: seconds, possibly fractional (RFC 7519 §2).
    exp: Option<f64>,
    nbf: Option<f64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

/// `aud` is one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn as_slice(&self) -> &[String] {
        match self {
            Audience::One(one) => std::slice::from_ref(one),
            Audience::Many(many) => many,
        }
    }
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
        Self {
            issuer,
            audiences,
            source,
            keys: ArcSwap::from_pointee(KeySet::default()),
            leeway: leeway.as_secs(),
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

    /// Starts from `previous`'s keys (a reconfigured issuer whose keys come
    /// from the same place): until its own first fetch succeeds it verifies
    /// what its predecessor did, instead of nothing.
    pub fn adopt_keys(&self, previous: &JwtIssuer) {
        self.keys.store(previous.keys.load_full());
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
                let mut resp = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
                let status = resp.status();
                if status.is_redirection() {
                    return Err(format!(
                        "GET {url}: {status}: redirects are not followed (configure the final https:// URL)"
                    ));
                }
                if !status.is_success() {
                    return Err(format!("GET {url}: {status}"));
                }
                if resp
                    .content_length()
                    .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
                {
                    return Err(format!(
                        "GET {url}: body larger than {MAX_JWKS_BYTES} bytes"
                    ));
                }
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return Err(format!(
                            "GET {url}: body larger than {MAX_JWKS_BYTES} bytes"
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                self.set_jwks(&body, None)
                    .map_err(|e| format!("{url}: {e}"))
            }
        }
    }

    /// Checks the signature over `signed` (`header.payload` as sent) with
    /// this issuer's keys, then the time and audience claims.
    fn verify(
        &self,
        signed: &str,
        signature: &str,
        header: &JoseHeader,
        claims: Claims,
    ) -> Result<ServiceAccount, JwtError> {
        let family = header.alg.family();
        let keys = self.keys.load();
        let kid = header.kid.as_deref();
        let mut candidates = keys
            .keys
            .iter()
            .filter(|k| k.family == family && (kid.is_none() || k.kid.as_deref() == kid))
            .peekable();
        if let (Some(kid), None) = (kid, candidates.peek()) {
            self.refresh_wanted.notify_one();
            return Err(JwtError::UnknownKey {
                issuer: self.issuer.clone(),
                kid: truncate(kid),
            });
        }
        // A key of the right family that fails (wrong key, or one aws-lc
        // cannot use for this algorithm) just means: try the next one.
        let verified = candidates.any(|candidate| {
            jsonwebtoken::crypto::verify(signature, signed.as_bytes(), &candidate.key, header.alg)
                .unwrap_or(false)
        });
        if !verified {
            return Err(JwtError::NoMatchingKey(self.issuer.clone()));
        }
        self.validate_claims(&claims, now_unix())?;
        self.identity(claims)
    }

    /// `exp` is required and `nbf` optional, both with the leeway; `aud` is
    /// required and must hold one of the issuer's audiences. (`iss` chose
    /// this issuer, so it already matches.)
    fn validate_claims(&self, claims: &Claims, now: u64) -> Result<(), JwtError> {
        let leeway = self.leeway as f64;
        let now = now as f64;
        let exp = claims.exp.ok_or(JwtError::MissingClaim("exp"))?;
        if exp < now - leeway {
            return Err(JwtError::Expired(exp as u64));
        }
        if let Some(nbf) = claims.nbf {
            if nbf > now + leeway {
                return Err(JwtError::NotYetValid(nbf as u64));
            }
        }
        let aud = claims.aud.as_ref().ok_or(JwtError::MissingClaim("aud"))?;
        if !aud.as_slice().iter().any(|a| self.audiences.contains(a)) {
            return Err(JwtError::Audience(
                aud.as_slice().iter().take(4).map(|a| truncate(a)).collect(),
            ));
        }
        Ok(())
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
#[derive(Debug, Default, Clone)]
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
        let malformed = |what: &str| JwtError::Malformed(what.to_owned());
        // header.payload.signature; the signature is verified over the first two as sent.
        let (signed, signature) = token
            .rsplit_once('.')
            .ok_or_else(|| malformed("not three dot-separated parts"))?;
        let (header_b64, payload_b64) = signed
            .split_once('.')
            .filter(|(_, payload)| !payload.contains('.'))
            .ok_or_else(|| malformed("not three dot-separated parts"))?;
        let header: JoseHeader = decode_part(header_b64)
            .ok_or_else(|| malformed("header is not base64url-encoded JSON"))?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(JwtError::Algorithm(header.alg));
        }
        if header.crit.is_some() {
            return Err(malformed("critical header extensions are not supported"));
        }
        let claims: Claims = decode_part(payload_b64)
            .ok_or_else(|| malformed("payload is not base64url-encoded JSON claims"))?;
        // `iss` (not yet verified) picks the key set, so a foreign token is
        // refused before any key lookup or JWKS refresh. The signature check
        // that follows covers it.
        let iss = claims.iss.as_deref().ok_or(JwtError::MissingClaim("iss"))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| JwtError::UnknownIssuer(truncate(iss)))?;
        let account = issuer.verify(signed, signature, &header, claims)?;
        let id = SpiffeId::new(&self.trust_domain, &account.namespace, &account.name)
            .map_err(|e| JwtError::NoServiceAccount(e.to_string()))?;
        Ok(CallerIdentity {
            id,
            source: AuthSource::Jwt {
                issuer: issuer.issuer.clone(),
            },
            pod: account.pod,
            cluster: None,
        })
    }
}

/// Largest JWKS document accepted (Kubernetes serves a few KiB).
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The HTTP client for `jwks_uri`: https only, no redirects (an `https`
/// URL must not lead to `http`, or to another host that then gets the
/// bearer token), a 5 s connect and a 10 s overall deadline. Bodies are
/// capped at [`MAX_JWKS_BYTES`] when read. Roots: `ca_file`, or Mozilla's.
pub fn jwks_http_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in crate::pki::parse_certificates_nonempty(&pem)
                .map_err(|e| format!("{}: {e}", path.display()))?
            {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())
}

/// One base64url part (no padding, as JWS compact serialization requires)
/// parsed as JSON.
fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Seconds since the Unix epoch. A clock set before 1970 reads as the far
/// future, so every token counts as expired: a broken clock fails closed
/// instead of letting expired tokens through.
fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{DevTokenIssuer, DEV_ISSUER};
    use serde_json::json;

    /// An authenticator trusting a fresh dev issuer (audience `istio-ca`,
    /// 60 s leeway), and that issuer.
    fn setup() -> (JwtAuthenticator, DevTokenIssuer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let dev = DevTokenIssuer::load_or_create(dir.path()).unwrap();
        let issuer = JwtIssuer::new(
            DEV_ISSUER.into(),
            vec!["istio-ca".into()],
            JwksSource::Static,
            Duration::from_secs(60),
        );
        issuer.set_jwks(dev.jwks().as_bytes(), None).unwrap();
        let authn = JwtAuthenticator::new(vec![Arc::new(issuer)], "cluster.local".into());
        (authn, dev, dir)
    }

    /// Claims `mint` would write, valid now, with `edit` applied.
    fn claims(
        edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> serde_json::Value {
        let now = now_unix();
        let mut c = json!({
            "iss": DEV_ISSUER,
            "sub": "system:serviceaccount:default:web",
            "aud": ["istio-ca"],
            "exp": now + 3600,
            "nbf": now,
        });
        edit(c.as_object_mut().unwrap());
        c
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn claims_are_validated_once_the_signature_holds() {
        let (authn, dev, _dir) = setup();
        let now = now_unix();
        let verify = |c: serde_json::Value| authn.verify(&dev.sign_claims(&c).unwrap());

        let ok = verify(claims(|_| {})).unwrap();
        assert_eq!(
            ok.id.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        // `aud` as a single string; extra audiences; fractional dates; no nbf.
        verify(claims(|c| {
            c.insert("aud".into(), json!("istio-ca"));
        }))
        .unwrap();
        verify(claims(|c| {
            c.insert("aud".into(), json!(["kubernetes", "istio-ca"]));
            c.insert("exp".into(), json!(now as f64 + 10.5));
            c.remove("nbf");
        }))
        .unwrap();
        // Inside the 60 s leeway on either side.
        verify(claims(|c| {
            c.insert("exp".into(), json!(now - 30));
            c.insert("nbf".into(), json!(now + 30));
        }))
        .unwrap();

        let err = |c: serde_json::Value| verify(c).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(claims(|c| {
            c.insert("exp".into(), json!(now - 120));
        }))
        .contains("expired"));
        assert!(err(claims(|c| {
            c.insert("nbf".into(), json!(now + 120));
        }))
        .contains("not valid before"));
        assert!(err(claims(|c| {
            c.insert("aud".into(), json!(["kubernetes"]));
        }))
        .contains("audience"));
        for missing in ["exp", "aud", "iss"] {
            assert_eq!(
                err(claims(|c| {
                    c.remove(missing);
                })),
                format!("token has no {missing} claim")
            );
        }
        assert!(err(claims(|c| {
            c.insert("iss".into(), json!("https://elsewhere"));
        }))
        .contains("not configured"));
        assert!(err(claims(|c| {
            c.insert("exp".into(), json!("tomorrow"));
        }))
        .contains("malformed"));
    }

    #[test]
    fn structure_header_and_signature_are_checked() {
        let (authn, dev, _dir) = setup();
        let good = dev.sign_claims(&claims(|_| {})).unwrap();
        let (head, rest) = good.split_once('.').unwrap();
        let (payload, sig) = rest.split_once('.').unwrap();
        let err = |t: &str| {
            authn
                .verify(t)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };

        // Not three parts, padding, junk.
        assert!(err(&format!("{good}.{sig}")).contains("malformed"));
        assert!(err(&format!("{head}.{payload}")).contains("malformed"));
        assert!(err(&format!("{head}=.{payload}.{sig}")).contains("malformed"));
        assert!(err("").contains("malformed"));
        // Another payload under the original signature.
        let other = dev
            .sign_claims(&claims(|c| {
                c.insert("sub".into(), json!("system:serviceaccount:default:admin"));
            }))
            .unwrap();
        let other_payload = other.split('.').nth(1).unwrap();
        assert!(
            err(&format!("{head}.{other_payload}.{sig}")).contains("no key in its JWKS verifies")
        );
        // A claim given twice.
        let dup = b64(
            br#"{"iss":"meshsign-dev","iss":"meshsign-dev","aud":"istio-ca","exp":9999999999}"#,
        );
        assert!(err(&format!("{head}.{dup}.{sig}")).contains("malformed"));
        // Unknown key id, HMAC, `none`, critical extensions.
        let header = |h: &str| format!("{}.{payload}.{sig}", b64(h.as_bytes()));
        assert!(err(&header(r#"{"alg":"ES256","kid":"nope"}"#)).contains("no key \"nope\""));
        assert!(err(&header(r#"{"alg":"HS256"}"#)).contains("not accepted"));
        assert!(err(&header(r#"{"alg":"none"}"#)).contains("malformed"));
        assert!(err(&header(r#"{"alg":"ES256","crit":["exp"],"exp":1}"#)).contains("critical"));
        // The untouched token still passes.
        authn.verify(&good).unwrap();
    }

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
