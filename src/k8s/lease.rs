//! Leader election with a `coordination.k8s.io/v1` Lease: which replica of
//! meshsign may do the cluster-wide writes (the root ConfigMaps) right now.
//!
//! [`LeaderElector::run`] keeps one Lease and reports through a
//! `watch::Receiver<bool>` whether this replica is the leader. The rules are
//! client-go's `leaderelection`, a little stricter:
//!
//! * Every write is optimistic: an update carries the `resourceVersion` it
//!   read, so of two replicas racing for the Lease one gets `409 Conflict`
//!   and stays a follower.
//! * The leader renews every `lease_duration / 3`. A round (read + write)
//!   that fails or takes longer than that makes it step down at once: it
//!   reports `false` before anything else can be written, and takes the
//!   Lease back on the next round if nobody else has. So a leader stops at
//!   most `2/3 × lease_duration` after the start of its last successful
//!   renewal, a third of the duration before anyone else may take over.
//! * A Lease held by another replica counts as expired when this replica
//!   has seen it unchanged (same `resourceVersion`) for the holder's
//!   `leaseDurationSeconds`, measured on this replica's monotonic clock from
//!   the moment it first saw that version. Comparing `renewTime` with our own
//!   wall clock would let a replica whose clock runs ahead steal a live
//!   Lease; `renewTime` and `acquireTime` are still written, for people and
//!   other tools to read. A freshly started replica therefore waits one
//!   duration before taking over a Lease left behind by a dead holder.
//! * A Lease with no holder (released) is taken at once; an absent Lease is
//!   created. `leaseTransitions` counts changes of holder.
//!
//! The decision itself is the pure [`decide`], unit-tested below. Nothing is
//! released on shutdown: the next leader takes over one duration later.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;

/// Which Lease to hold, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity`.
    pub identity: String,
    /// How long the Lease lasts without renewal; written to
    /// `leaseDurationSeconds` rounded up to whole seconds.
    pub duration: Duration,
}

impl LeaseSettings {
    /// How often the leader renews and followers look.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(100))
    }

    fn duration_seconds(&self) -> i32 {
        let secs = self.duration.as_secs() + u64::from(self.duration.subsec_nanos() > 0);
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }
}

/// What to do with a Lease as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free (no holder) or expired: take it over.
    Acquire,
    /// Someone else holds it; it expires after `remaining` more without change.
    Follow { holder: String, remaining: Duration },
}

/// The election rule (see the module docs). `unchanged_for` is how long this
/// replica has seen the Lease at its current `resourceVersion`;
/// `default_duration` applies when the Lease names no valid duration.
pub fn decide(
    spec: Option<&LeaseSpec>,
    identity: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> Decision {
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("");
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == identity {
        return Decision::Renew;
    }
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map_or(default_duration, Duration::from_secs);
    match duration.checked_sub(unchanged_for) {
        Some(remaining) if !remaining.is_zero() => Decision::Follow {
            holder: holder.to_owned(),
            remaining,
        },
        _ => Decision::Acquire,
    }
}

/// The Lease as it should be written after `decision` (`Renew` or
/// `Acquire`), keeping the `resourceVersion` it was read at so that a
/// concurrent writer makes the update fail.
pub fn next_lease(current: &Lease, settings: &LeaseSettings, now: MicroTime) -> Lease {
    let old = current.spec.clone().unwrap_or_default();
    let takeover = old.holder_identity.as_deref() != Some(settings.identity.as_str());
    let transitions = old.lease_transitions.unwrap_or(0);
    let spec = LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(settings.duration_seconds()),
        acquire_time: if takeover {
            Some(now.clone())
        } else {
            old.acquire_time.clone().or_else(|| Some(now.clone()))
        },
        renew_time: Some(now),
        lease_transitions: Some(if takeover {
            transitions.saturating_add(1)
        } else {
            transitions
        }),
        ..old
    };
    Lease {
        metadata: current.metadata.clone(),
        spec: Some(spec),
    }
}

/// A Lease for a replica creating it.
fn new_lease(settings: &LeaseSettings, now: MicroTime) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            namespace: Some(settings.namespace.clone()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "meshsign".to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(settings.identity.clone()),
            lease_duration_seconds: Some(settings.duration_seconds()),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

/// Wall-clock time for `renewTime` / `acquireTime`.
fn wall_now() -> MicroTime {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(micros)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Why a round of the election failed (we are not leader after it).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The cause is in the message, so it is not also the `source()`.
    #[error("lease {namespace}/{name}: {error}")]
    Api {
        namespace: String,
        name: String,
        error: kube::Error,
    },
    #[error("lease {namespace}/{name}: no answer within {timeout:?}")]
    Timeout {
        namespace: String,
        name: String,
        timeout: Duration,
    },
}

/// One replica's side of the election for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    cluster: String,
    settings: LeaseSettings,
    is_leader: watch::Sender<bool>,
    /// The `resourceVersion` last read and when we first saw it.
    observed: Option<(String, Instant)>,
    /// The Lease as we last wrote it, while leader.
    held: Option<Lease>,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("cluster", &self.cluster)
            .field("settings", &self.settings)
            .field("leader", &*self.is_leader.borrow())
            .finish_non_exhaustive()
    }
}

impl LeaderElector {
    /// An elector (not yet running) and the "is leader" signal it drives.
    pub fn new(
        client: kube::Client,
        cluster: String,
        settings: LeaseSettings,
    ) -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        let api = Api::namespaced(client, &settings.namespace);
        (
            Self {
                api,
                cluster,
                settings,
                is_leader: tx,
                observed: None,
                held: None,
            },
            rx,
        )
    }

    /// Takes part in the election for as long as the future is polled; never
    /// returns. Dropping it stops renewing (the Lease then expires).
    pub async fn run(mut self) {
        let period = self.settings.retry_period();
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(period, self.round()).await {
                Ok(r) => r,
                Err(_) => Err(LeaseError::Timeout {
                    namespace: self.settings.namespace.clone(),
                    name: self.settings.name.clone(),
                    timeout: period,
                }),
            };
            let leader = match outcome {
                Ok(leader) => {
                    if failures > 0 {
                        tracing::info!(cluster = %self.cluster, lease = %self.settings.name,
                            "lease reachable again");
                    }
                    failures = 0;
                    leader
                }
                Err(e) => {
                    self.held = None;
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(cluster = %self.cluster, error = %e,
                            "leader election failed; not leader until it works again");
                    } else {
                        tracing::debug!(cluster = %self.cluster, error = %e, failures,
                            "leader election still failing");
                    }
                    false
                }
            };
            self.set_leader(leader);
            // Back off while the API server fails, up to eight periods.
            let wait = period * (1u32 << failures.saturating_sub(1).min(3));
            tokio::time::sleep_until(started + wait).await;
        }
    }

    fn set_leader(&self, leader: bool) {
        let changed = self.is_leader.send_if_modified(|l| {
            let changed = *l != leader;
            *l = leader;
            changed
        });
        if changed {
            if leader {
                tracing::info!(cluster = %self.cluster, lease = %format!("{}/{}", self.settings.namespace, self.settings.name),
                    identity = %self.settings.identity, "became leader");
            } else {
                tracing::info!(cluster = %self.cluster, lease = %format!("{}/{}", self.settings.namespace, self.settings.name),
                    identity = %self.settings.identity, "no longer leader");
            }
        }
    }

    fn api_error(&self, error: kube::Error) -> LeaseError {
        LeaseError::Api {
            namespace: self.settings.namespace.clone(),
            name: self.settings.name.clone(),
            error,
        }
    }

    /// Notes the version read, returning how long it has been unchanged.
    fn observe(&mut self, lease: &Lease) -> Duration {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        match &self.observed {
            Some((v, since)) if *v == version => since.elapsed(),
            _ => {
                self.observed = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// Writes `lease` (an update with the version read); `Ok(false)` when
    /// another writer got there first.
    async fn write(&mut self, lease: Lease) -> Result<bool, LeaseError> {
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                self.held = Some(written);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => {
                tracing::debug!(cluster = %self.cluster, "lost the race for the lease");
                Ok(false)
            }
            Err(e) => Err(self.api_error(e)),
        }
    }

    /// One round: renew, or read and maybe acquire. `Ok(true)` = leader.
    async fn round(&mut self) -> Result<bool, LeaseError> {
        // The leader renews straight from what it last wrote: a conflict
        // means someone else wrote the Lease, and the next round reads it.
        if let Some(held) = self.held.take() {
            let next = next_lease(&held, &self.settings, wall_now());
            return self.write(next).await;
        }
        let current = self
            .api
            .get_opt(&self.settings.name)
            .await
            .map_err(|e| self.api_error(e))?;
        let Some(current) = current else {
            let lease = new_lease(&self.settings, wall_now());
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    self.held = Some(created);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
                Err(e) => Err(self.api_error(e)),
            };
        };
        let unchanged_for = self.observe(&current);
        match decide(
            current.spec.as_ref(),
            &self.settings.identity,
            unchanged_for,
            self.settings.duration,
        ) {
            Decision::Renew | Decision::Acquire => {
                let next = next_lease(&current, &self.settings, wall_now());
                self.write(next).await
            }
            Decision::Follow { holder, remaining } => {
                tracing::trace!(cluster = %self.cluster, %holder, ?remaining, "following");
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, secs: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: secs,
            ..Default::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn free_and_own_leases() {
        assert_eq!(decide(None, "a", Duration::ZERO, D), Decision::Acquire);
        assert_eq!(
            decide(Some(&spec(Some(""), Some(15))), "a", Duration::ZERO, D),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&spec(None, Some(15))), "a", Duration::ZERO, D),
            Decision::Acquire
        );
        // Ours, even long unchanged (e.g. after a restart): renew.
        assert_eq!(
            decide(
                Some(&spec(Some("a"), Some(15))),
                "a",
                Duration::from_secs(999),
                D
            ),
            Decision::Renew
        );
    }

    #[test]
    fn expiry_is_the_holders_duration_seen_unchanged() {
        let held = spec(Some("b"), Some(10));
        assert_eq!(
            decide(Some(&held), "a", Duration::from_secs(4), D),
            Decision::Follow {
                holder: "b".into(),
                remaining: Duration::from_secs(6)
            }
        );
        assert_eq!(
            decide(Some(&held), "a", Duration::from_millis(9_999), D),
            Decision::Follow {
                holder: "b".into(),
                remaining: Duration::from_millis(1)
            }
        );
        assert_eq!(
            decide(Some(&held), "a", Duration::from_secs(10), D),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&held), "a", Duration::from_secs(60), D),
            Decision::Acquire
        );
        // No (or a nonsensical) duration in the Lease: ours applies.
        for secs in [None, Some(0), Some(-5)] {
            let held = spec(Some("b"), secs);
            assert!(matches!(
                decide(Some(&held), "a", Duration::from_secs(14), D),
                Decision::Follow { .. }
            ));
            assert_eq!(decide(Some(&held), "a", D, D), Decision::Acquire);
        }
    }

    fn settings(identity: &str) -> LeaseSettings {
        LeaseSettings {
            namespace: "istio-system".into(),
            name: "l".into(),
            identity: identity.into(),
            duration: Duration::from_millis(2500),
        }
    }

    fn at(secs: i64) -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn renewal_keeps_acquire_time_and_transitions() {
        let s = settings("a");
        assert_eq!(s.retry_period(), Duration::from_millis(2500) / 3);
        let created = new_lease(&s, at(100));
        let mut read = created.clone();
        read.metadata.resource_version = Some("7".into());
        let renewed = next_lease(&read, &s, at(105));
        assert_eq!(renewed.metadata.resource_version.as_deref(), Some("7"));
        let spec = renewed.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.acquire_time, Some(at(100)));
        assert_eq!(spec.renew_time, Some(at(105)));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(3), "rounded up");
    }

    #[test]
    fn takeover_counts_a_transition() {
        let held_by_a = new_lease(&settings("a"), at(100));
        let taken = next_lease(&held_by_a, &settings("b"), at(200));
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.acquire_time, Some(at(200)));
        assert_eq!(spec.renew_time, Some(at(200)));
        assert_eq!(spec.lease_transitions, Some(1));
    }
}
