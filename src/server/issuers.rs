//! The JWT issuers the server trusts: built from the configuration (and, in
//! dev mode, the local token issuer), their JWKS loaded before first use, and
//! kept fresh by a background refresh that lives as long as the issuer is
//! configured.

use std::sync::Arc;
use std::time::Duration;

use super::StartError;
use crate::auth::jwt::JwksSource;
use crate::auth::JwtIssuer;
use crate::config::{CaSource, Config, JwksLocation, JwtIssuerConfig};
use crate::metrics::Metrics;
use crate::supervise;
use crate::token::{DevTokenIssuer, DEFAULT_AUDIENCE, DEV_ISSUER};

/// What makes one issuer: its configuration (`None`: dev mode's local
/// issuer) and the clock skew its tokens are checked with.
#[derive(Debug, Clone, PartialEq)]
struct IssuerKey {
    config: Option<JwtIssuerConfig>,
    skew: Duration,
}

/// One issuer in use, and the handle that keeps its refresh loop running.
#[derive(Debug, Clone)]
struct IssuerEntry {
    key: IssuerKey,
    issuer: Arc<JwtIssuer>,
    /// Shared by every set that holds this issuer; the loop ends with the last.
    _refresh: Arc<supervise::Retire>,
}

/// The JWT issuers in use, each kept fresh by its own supervised loop. A
/// configuration reload builds the next set from the previous one: an issuer
/// configured the same way is kept as it is (keys, loop and all); one that
/// is gone stops refreshing when the last set holding it is dropped.
#[derive(Debug, Clone, Default)]
pub(super) struct IssuerSet {
    entries: Vec<IssuerEntry>,
}

impl IssuerSet {
    /// The issuers themselves, in configuration order (dev issuer first).
    pub(super) fn issuers(&self) -> Vec<Arc<JwtIssuer>> {
        self.entries.iter().map(|e| e.issuer.clone()).collect()
    }

    /// The issuers `config` asks for, reusing those of `previous` that are
    /// configured the same way. A new issuer's keys are loaded before it is
    /// used: a JWKS file must load (it is under the operator's control), a
    /// URL may be briefly unreachable and is retried in the background.
    pub(super) async fn build(
        config: &Config,
        previous: &IssuerSet,
        metrics: &Metrics,
    ) -> Result<IssuerSet, StartError> {
        let skew = config.authn.clock_skew;
        let mut wanted = Vec::new();
        if config.ca == CaSource::Dev && !config.authn.jwt.iter().any(|j| j.issuer == DEV_ISSUER) {
            wanted.push(IssuerKey { config: None, skew });
        }
        wanted.extend(config.authn.jwt.iter().map(|j| IssuerKey {
            config: Some(j.clone()),
            skew,
        }));
        let mut entries = Vec::with_capacity(wanted.len());
        for key in wanted {
            if let Some(kept) = previous.entries.iter().find(|e| e.key == key) {
                entries.push(kept.clone());
                continue;
            }
            let (issuer, refresh) = match &key.config {
                None => (dev_issuer(config, skew)?, DEFAULT_REFRESH),
                Some(j) => {
                    // The same issuer reconfigured (audiences, refresh, skew)
                    // with its keys from the same place keeps them while its
                    // own first fetch is pending or failing.
                    let predecessor = previous.entries.iter().find(|e| {
                        e.key
                            .config
                            .as_ref()
                            .is_some_and(|p| p.issuer == j.issuer && p.jwks == j.jwks)
                    });
                    let fresh = configured_issuer(j, skew, predecessor.map(|e| &*e.issuer)).await?;
                    (fresh, j.refresh)
                }
            };
            let issuer = Arc::new(issuer);
            let looped = issuer.clone();
            let retire = supervise::spawn_until(
                "jwks-refresh",
                metrics.restarts("jwks-refresh"),
                move || refresh_jwks(looped.clone(), refresh),
            );
            entries.push(IssuerEntry {
                key,
                issuer,
                _refresh: Arc::new(retire),
            });
        }
        Ok(IssuerSet { entries })
    }
}

/// How often the dev issuer's key file is looked at.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// Dev mode's local token issuer, whose key is in the state directory.
fn dev_issuer(config: &Config, skew: Duration) -> Result<JwtIssuer, StartError> {
    let dev = DevTokenIssuer::load_or_create(&config.state_dir).map_err(StartError::DevIssuer)?;
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
    Ok(issuer)
}

/// A configured issuer, its keys loaded where possible (starting from
/// `predecessor`'s, when it replaces one that read the same JWKS).
async fn configured_issuer(
    j: &JwtIssuerConfig,
    skew: Duration,
    predecessor: Option<&JwtIssuer>,
) -> Result<JwtIssuer, StartError> {
    let source = match &j.jwks {
        JwksLocation::File(path) => JwksSource::File(path.clone()),
        JwksLocation::Uri {
            url,
            ca_file,
            bearer_token_file,
        } => JwksSource::Uri {
            url: url.clone(),
            client: crate::auth::jwt::jwks_http_client(ca_file.as_deref()).map_err(|reason| {
                StartError::Jwks {
                    issuer: j.issuer.clone(),
                    reason,
                }
            })?,
            bearer_token_file: bearer_token_file.clone(),
        },
    };
    let issuer = JwtIssuer::new(j.issuer.clone(), j.audiences.clone(), source, skew);
    if let Some(p) = predecessor {
        issuer.adopt_keys(p);
    }
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
    Ok(issuer)
}

/// Refreshes `issuer`'s keys every `every`, and at once (at most every 10 s)
/// when a token names a key it does not know.
async fn refresh_jwks(issuer: Arc<JwtIssuer>, every: Duration) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(audience: &str) -> Config {
        // A JWKS URL nothing answers on: every fetch fails at once.
        let yaml = format!(
            "ca: {{ dir: /etc/cacerts }}\n\
             authn: {{ jwt: [ {{ issuer: example, audiences: [{audience}], \
             jwks_uri: \"https://127.0.0.1:1/jwks\" }} ] }}\n"
        );
        Config::from_yaml(&yaml).unwrap()
    }

    #[tokio::test]
    async fn a_reconfigured_issuer_keeps_its_keys_while_its_own_fetch_fails() {
        let metrics = Metrics::new().unwrap();
        let first = IssuerSet::build(&config("a"), &IssuerSet::default(), &metrics)
            .await
            .unwrap();
        assert_eq!(first.issuers()[0].key_count(), 0, "the URL does not answer");
        // Keys it had fetched before the endpoint went down.
        let dir = tempfile::tempdir().unwrap();
        let dev = DevTokenIssuer::load_or_create(dir.path()).unwrap();
        first.issuers()[0]
            .set_jwks(dev.jwks().as_bytes(), None)
            .unwrap();

        // Another audience, same JWKS URL: a new issuer, with the old keys.
        let second = IssuerSet::build(&config("b"), &first, &metrics)
            .await
            .unwrap();
        let (old, new) = (&first.issuers()[0], &second.issuers()[0]);
        assert!(!Arc::ptr_eq(old, new), "reconfigured, not reused");
        assert_eq!(new.audiences, ["b"]);
        assert_eq!(new.key_count(), old.key_count());
    }
}
