//! Health that means something: the CA service reports `SERVING` only while
//! a real test signing verifies against the roots (checked at start and every
//! 30 seconds) and, with Kubernetes node authorization, once every pod watch
//! has listed (as istiod waits for its informers). The gRPC health service and
//! `/healthz/ready` report the same answer.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tonic_health::ServingStatus;

use crate::ca::Ca;

/// Keeps `reporter` (and the readiness gauge) up to date, for ever.
pub(super) async fn watch_health(
    reporter: tonic_health::server::HealthReporter,
    ca: Arc<ArcSwap<Ca>>,
    metrics: Arc<crate::metrics::Metrics>,
    pod_caches: Vec<(String, Arc<crate::k8s::pods::PodCache>)>,
) {
    let mut last = None;
    loop {
        let unsynced: Vec<&str> = pod_caches
            .iter()
            .filter(|(_, cache)| !cache.is_synced())
            .map(|(id, _)| id.as_str())
            .collect();
        // A test signing is a real signature (RSA: ~1 ms): off the reactor.
        let current = ca.load_full();
        let result =
            tokio::task::spawn_blocking(move || current.self_test(OffsetDateTime::now_utc()))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        let status = match result {
            Ok(()) if unsynced.is_empty() => ServingStatus::Serving,
            Ok(()) => {
                tracing::info!(clusters = ?unsynced, "waiting for the pod watch's first list before reporting SERVING");
                ServingStatus::NotServing
            }
            Err(e) => {
                tracing::error!(error = %e, "CA self-test failed: reporting NOT_SERVING");
                ServingStatus::NotServing
            }
        };
        metrics.set_ready(status == ServingStatus::Serving);
        if last != Some(status) {
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(crate::proto::SERVICE_NAME, status)
                .await;
            last = Some(status);
        }
        // Pod watches usually sync within a second: look again soon.
        let pause = if unsynced.is_empty() { 30_000 } else { 500 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
