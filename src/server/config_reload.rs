//! Reloading the configuration while serving (`SIGHUP`): what may change
//! without a restart, and the validate-then-swap rule.
//!
//! The new file is parsed and validated like at start-up. Then:
//!
//! * If it changes anything only a restart can apply (the listener, the
//!   CA, the serving certificate, the audit trail, the Kubernetes clusters,
//!   the trust domain, limits baked into the listener or the signer
//!   threads: [`restart_only_changes`]), nothing is applied and the error
//!   names every such key. Applying half a file would leave a server that
//!   matches neither the old file nor the new one.
//! * Otherwise the new rules are built first (a new JWT issuer's keys are
//!   loaded; a JWKS file that does not load refuses the reload) and then
//!   swapped in at once: the policy, the key policy, the rate limits, the
//!   JWT issuers and clock skew, the trusted node accounts and the
//!   per-connection limits. Requests in progress finish under the rules they
//!   started with; connections keep the limits they were accepted with.
//!
//! Either way the outcome is counted in
//! `meshsign_reloads_total{what="config",result}` and logged; a refused
//! reload changes nothing else.

use std::sync::Arc;

use tokio::sync::{watch, Mutex};

use super::conn::ConnSettings;
use super::issuers::IssuerSet;
use super::service::{CertificateService, Rules};
use super::StartError;
use crate::auth::{Authenticator, JwtAuthenticator};
use crate::config::{Authn, Config, ConfigError, KubernetesConfig, Limits};
use crate::k8s::node_auth::NodeAuthorizer;
use crate::k8s::Clusters;
use crate::metrics::{Metrics, ReloadCounters};
use crate::ratelimit::RateLimiter;

/// Why a configuration reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigReloadError {
    /// The file could not be read, parsed or validated.
    #[error("{0}")]
    Invalid(ConfigError),
    /// The file changes keys that only a restart applies.
    #[error("{} changed, which only a restart applies; nothing was reloaded", .keys.join(", "))]
    RestartNeeded { keys: Vec<&'static str> },
    /// A new JWT issuer's keys could not be loaded.
    #[error("JWT issuer {issuer}: {reason}; nothing was reloaded")]
    Issuer { issuer: String, reason: String },
}

/// What a reload changed (configuration sections), for the log.
pub type Changed = Vec<&'static str>;

/// The keys that differ between `running` and `next` and take a restart to apply.
pub fn restart_only_changes(running: &Config, next: &Config) -> Vec<&'static str> {
    // Every field is named, so a new one does not compile until it is
    // classified here: restart-only (compared) or reloadable (`_`).
    let Config {
        listen,
        state_dir,
        server_tls,
        ca,
        ca_reload_interval,
        authn,
        policy,
        key_policy: _,
        limits,
        rate_limits: _,
        monitoring_listen,
        kubernetes,
        audit,
    } = running;
    let mut keys = Vec::new();
    let mut differs = |key: &'static str, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    differs("listen", *listen != next.listen);
    differs("state_dir", *state_dir != next.state_dir);
    differs("server_tls", *server_tls != next.server_tls);
    differs("ca.dir", *ca != next.ca);
    differs(
        "ca.reload_interval",
        *ca_reload_interval != next.ca_reload_interval,
    );
    differs(
        "monitoring.listen",
        *monitoring_listen != next.monitoring_listen,
    );
    differs("audit", *audit != next.audit);
    differs(
        "trust_domain",
        policy.trust_domain != next.policy.trust_domain,
    );
    let Authn {
        client_certificates,
        clock_skew,
        jwt,
    } = authn;
    // The TLS layer asks for client certificates or not.
    differs(
        "authn.client_certificates",
        *client_certificates != next.authn.client_certificates,
    );
    differs(
        "kubernetes",
        restart_view(kubernetes.as_ref()) != restart_view(next.kubernetes.as_ref()),
    );
    // The pod watches node authorization reads are started only when there
    // are trusted node accounts: from none to some (or back) takes a restart;
    // one list for another does not.
    let node_accounts =
        |c: Option<&KubernetesConfig>| c.is_some_and(|k| !k.trusted_node_accounts.is_empty());
    differs(
        "kubernetes.trusted_node_accounts (empty or not)",
        node_accounts(kubernetes.as_ref()) != node_accounts(next.kubernetes.as_ref()),
    );
    // The clusters' offline verifiers hold the issuers they were built with.
    if kubernetes.is_some() && next.kubernetes.is_some() {
        differs("authn.jwt", *jwt != next.authn.jwt);
        differs("authn.clock_skew", *clock_skew != next.authn.clock_skew);
    }
    let Limits {
        max_request_bytes,
        handshake_timeout,
        max_connections,
        max_concurrent_handshakes,
        handshake_threads,
        listen_backlog,
        max_signing_queue,
        // Per connection, from the next one accepted (`ConnSettings`).
        max_concurrent_streams: _,
        max_header_list_bytes: _,
        request_timeout: _,
        max_connection_age: _,
        max_connection_age_grace: _,
        idle_timeout: _,
        body_timeout: _,
        drain_timeout: _,
        stream_budget: _,
        reset_budget: _,
        refusal_budget: _,
        max_calls_in_flight: _,
    } = limits;
    let b = &next.limits;
    differs(
        "limits.max_request_bytes",
        *max_request_bytes != b.max_request_bytes,
    );
    differs(
        "limits.handshake_timeout",
        *handshake_timeout != b.handshake_timeout,
    );
    differs(
        "limits.max_connections",
        *max_connections != b.max_connections,
    );
    differs(
        "limits.max_concurrent_handshakes",
        *max_concurrent_handshakes != b.max_concurrent_handshakes,
    );
    differs(
        "limits.handshake_threads",
        *handshake_threads != b.handshake_threads,
    );
    differs("limits.listen_backlog", *listen_backlog != b.listen_backlog);
    differs(
        "limits.max_signing_queue",
        *max_signing_queue != b.max_signing_queue,
    );
    keys
}

/// The Kubernetes section as a restart would see it: without its one
/// reloadable key, and without a Lease holder identity the file leaves to
/// be made up (a new one at every read).
fn restart_view(k: Option<&KubernetesConfig>) -> Option<KubernetesConfig> {
    k.map(|k| {
        let mut k = KubernetesConfig {
            trusted_node_accounts: Vec::new(),
            ..k.clone()
        };
        if let Some(p) = k
            .root_publisher
            .as_mut()
            .filter(|p| !p.holder_identity_configured)
        {
            p.holder_identity.clear();
        }
        k
    })
}

/// The running configuration and what a reload swaps.
#[derive(Debug)]
pub struct ConfigReloader {
    /// The configuration in force and the issuers built from it; the lock
    /// also makes reloads one at a time.
    current: Mutex<(Config, IssuerSet)>,
    service: Arc<CertificateService>,
    conn_settings: watch::Sender<ConnSettings>,
    /// The clusters built at start (restart-only), kept across reloads.
    clusters: Option<Arc<Clusters>>,
    metrics: Arc<Metrics>,
    counters: ReloadCounters,
}

impl ConfigReloader {
    pub(super) fn new(
        config: Config,
        issuers: IssuerSet,
        service: Arc<CertificateService>,
        conn_settings: watch::Sender<ConnSettings>,
        clusters: Option<Arc<Clusters>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let counters = metrics.reload_counters("config");
        Self {
            current: Mutex::new((config, issuers)),
            service,
            conn_settings,
            clusters,
            metrics,
            counters,
        }
    }

    /// Applies `next` (the file as read again, or why it could not be) if
    /// all of it can be applied now; otherwise changes nothing. Logs and
    /// counts the outcome either way.
    pub async fn reload(
        &self,
        next: Result<Config, ConfigError>,
    ) -> Result<Changed, ConfigReloadError> {
        let result = match next {
            Ok(next) => self.apply(next).await,
            Err(e) => Err(ConfigReloadError::Invalid(e)),
        };
        match &result {
            Ok(changed) if changed.is_empty() => {
                self.counters.ok.inc();
                tracing::info!("configuration reloaded: nothing changed");
            }
            Ok(changed) => {
                self.counters.ok.inc();
                tracing::info!(changed = %changed.join(", "), "configuration reloaded");
            }
            Err(e) => {
                self.counters.refused.inc();
                tracing::error!(error = %e, "configuration not reloaded; the previous one stays in force");
            }
        }
        result
    }

    async fn apply(&self, next: Config) -> Result<Changed, ConfigReloadError> {
        let mut current = self.current.lock().await;
        let (running, issuers) = &mut *current;
        let restart = restart_only_changes(running, &next);
        if !restart.is_empty() {
            return Err(ConfigReloadError::RestartNeeded { keys: restart });
        }
        let next_issuers = IssuerSet::build(&next, issuers, &self.metrics)
            .await
            .map_err(|e| match e {
                StartError::Jwks { issuer, reason } => ConfigReloadError::Issuer { issuer, reason },
                other => ConfigReloadError::Issuer {
                    issuer: "dev".into(),
                    reason: other.to_string(),
                },
            })?;

        let mut changed = Vec::new();
        if running.policy != next.policy {
            changed.push("policy");
        }
        if running.key_policy != next.key_policy {
            changed.push("key_policy");
        }
        if running.authn.jwt != next.authn.jwt {
            changed.push("authn.jwt");
        }
        if running.authn.clock_skew != next.authn.clock_skew {
            changed.push("authn.clock_skew");
        }
        if running.rate_limits != next.rate_limits {
            changed.push("rate_limits");
        }
        let node_accounts = |c: &Config| {
            c.kubernetes
                .as_ref()
                .map(|k| k.trusted_node_accounts.clone())
        };
        if node_accounts(running) != node_accounts(&next) {
            changed.push("kubernetes.trusted_node_accounts");
        }
        let settings = ConnSettings::from_limits(&next.limits);
        if *self.conn_settings.borrow() != settings {
            changed.push("limits");
        }

        let before = self.service.rules();
        // Unchanged rate limits keep their buckets: a reload is no way to
        // reset one. Any change to them starts every budget full.
        let limiter = if running.rate_limits == next.rate_limits {
            before.limiter.clone()
        } else {
            Arc::new(RateLimiter::new(&next.rate_limits))
        };
        let mut trust_domains = vec![next.policy.trust_domain.clone()];
        trust_domains.extend(next.policy.trust_domain_aliases.iter().cloned());
        let mut authenticator = Authenticator::new(
            next.authn.client_certificates,
            trust_domains,
            JwtAuthenticator::new(next_issuers.issuers(), next.policy.trust_domain.clone()),
        );
        if let Some(clusters) = &self.clusters {
            authenticator = authenticator.with_clusters(clusters.clone());
        }
        let node_authorizer = next
            .kubernetes
            .as_ref()
            .map(|k| NodeAuthorizer::new(k.trusted_node_accounts.iter().cloned()))
            .filter(|a| !a.is_empty());
        self.service.set_rules(Rules {
            authenticator,
            node_authorizer,
            policy: next.policy.clone(),
            key_policy: next.key_policy.clone(),
            limiter,
        });
        self.conn_settings.send_if_modified(|s| {
            let modified = *s != settings;
            *s = settings;
            modified
        });
        for warning in next.startup_warnings() {
            tracing::warn!("{warning}");
        }
        *running = next;
        *issuers = next_issuers;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Config {
        let yaml = format!(
            "ca: {{ dir: /etc/cacerts }}\n\
             kubernetes:\n  clusters: [ {{ id: c1, in_cluster: true }} ]\n{extra}"
        );
        Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
    }

    #[test]
    fn the_same_file_read_twice_is_no_change_even_with_a_made_up_lease_identity() {
        let publishing = "  root_certificates: {}\n";
        let (running, next) = (parse(publishing), parse(publishing));
        // Each read makes up its own identity...
        let identity = |c: &Config| {
            c.kubernetes
                .as_ref()
                .unwrap()
                .root_publisher
                .as_ref()
                .unwrap()
                .holder_identity
                .clone()
        };
        assert_ne!(identity(&running), identity(&next));
        // ...which a restart would make up again: not a change.
        assert_eq!(restart_only_changes(&running, &next), Vec::<&str>::new());
        // One the file names is compared.
        let named = parse("  root_certificates: { holder_identity: replica-a }\n");
        assert_eq!(restart_only_changes(&running, &named), vec!["kubernetes"]);
    }

    #[test]
    fn trusted_node_accounts_from_none_to_some_takes_a_restart_one_list_for_another_does_not() {
        let none = parse("");
        let one = parse("  trusted_node_accounts: [ istio-system/ztunnel ]\n");
        let other = parse("  trusted_node_accounts: [ kube-system/ztunnel ]\n");
        assert_eq!(
            restart_only_changes(&none, &one),
            vec!["kubernetes.trusted_node_accounts (empty or not)"]
        );
        assert_eq!(restart_only_changes(&one, &none).len(), 1);
        assert_eq!(restart_only_changes(&one, &other), Vec::<&str>::new());
    }
}
