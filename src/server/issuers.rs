//! The JWT issuers the server trusts: built from the configuration (and, in
//! dev mode, the local token issuer), their JWKS loaded at start-up, and kept
//! fresh by a background refresh.

use std::sync::Arc;
use std::time::Duration;

use super::StartError;
use crate::auth::jwt::JwksSource;
use crate::auth::JwtIssuer;
use crate::config::{CaSource, Config, JwksLocation};
use crate::token::{DevTokenIssuer, DEFAULT_AUDIENCE, DEV_ISSUER};

/// Every configured issuer, with its keys loaded where possible: a JWKS file
/// must load (it is under the operator's control); a URL may be briefly
/// unreachable and is retried in the background.
pub(super) async fn jwt_issuers(config: &Config) -> Result<Vec<Arc<JwtIssuer>>, StartError> {
    let skew = config.authn.clock_skew;
    let mut out = Vec::new();
    if config.ca == CaSource::Dev && !config.authn.jwt.iter().any(|j| j.issuer == DEV_ISSUER) {
        let dev =
            DevTokenIssuer::load_or_create(&config.state_dir).map_err(StartError::DevIssuer)?;
        let issuer = JwtIssuer::new(
            DEV_ISSUER.to_owned(),
            vec![DEFAULT_AUDIENCE.to_owned()],
            JwksSource::File(dev.jwks_path()),
            skew,
        );
        issuer
            .set_jwks(dev.jwks().as_bytes(), None)
            .map_err(StartError::DevIssuer)?;
        tracing::warn!(
            jwks = %dev.jwks_path().display(),
            "dev mode: trusting the local token issuer {DEV_ISSUER:?}, whose key is in the state directory; \
             configure `ca.dir` for anything but development"
        );
        out.push(Arc::new(issuer));
    }
    for j in &config.authn.jwt {
        let source = match &j.jwks {
            JwksLocation::File(path) => JwksSource::File(path.clone()),
            JwksLocation::Uri {
                url,
                ca_file,
                bearer_token_file,
            } => JwksSource::Uri {
                url: url.clone(),
                client: crate::auth::jwt::jwks_http_client(ca_file.as_deref()).map_err(
                    |reason| StartError::Jwks {
                        issuer: j.issuer.clone(),
                        reason,
                    },
                )?,
                bearer_token_file: bearer_token_file.clone(),
            },
        };
        let issuer = JwtIssuer::new(j.issuer.clone(), j.audiences.clone(), source, skew);
        match issuer.refresh().await {
            Ok(n) => tracing::info!(issuer = %j.issuer, keys = n, "JWKS loaded"),
            // A file is under the operator's control: fail fast. A URL may be
            // briefly unreachable: keep trying in the background.
            Err(reason) if matches!(j.jwks, JwksLocation::File(_)) => {
                return Err(StartError::Jwks {
                    issuer: j.issuer.clone(),
                    reason,
                })
            }
            Err(reason) => {
                tracing::error!(issuer = %j.issuer, %reason, "JWKS not loaded yet; retrying")
            }
        }
        out.push(Arc::new(issuer));
    }
    Ok(out)
}

/// Refreshes `issuer`'s keys every `every`, and at once (at most every 10 s)
/// when a token names a key it does not know.
pub(super) async fn refresh_jwks(issuer: Arc<JwtIssuer>, every: Duration) {
    let mut last_forced = tokio::time::Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = issuer.refresh_requested() => {
                // A token named an unknown key: refresh, at most every 10 s.
                if last_forced.elapsed() < Duration::from_secs(10) {
                    continue;
                }
                last_forced = tokio::time::Instant::now();
            }
        }
        if let Err(reason) = issuer.refresh().await {
            tracing::warn!(issuer = %issuer.issuer, %reason, "JWKS refresh failed; keeping the previous keys");
        }
    }
}
