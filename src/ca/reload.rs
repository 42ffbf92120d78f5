//! Hot reload of a plug-in CA directory, as istiod does for `cacerts`.
//!
//! The directory is polled (Kubernetes Secret volumes update through symlink
//! swaps, which polling sees reliably). When any file changes, the bundle is
//! loaded and verified exactly as at start-up and test-signed; only then does
//! it replace the running CA, atomically, for every later request. A bundle
//! that fails any check is refused with the file and the reason, and the
//! running CA keeps signing.
//!
//! The roots may change at run time by the safe steps of a root rotation
//! ([`super::rotation`]); any other change of roots would strand workloads
//! and is refused. The server follows a change of roots everywhere: responses carry
//! the new bundle, new TLS handshakes and every request on an older
//! connection are checked against it, and the serving certificate is re-issued.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::rotation::{check_step, StepError};
use super::Ca;

/// What the directory looked like: (file name, size, modification time) of
/// each entry, sorted. Symlinks are followed.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Reads the fingerprint of `dir`; `None` when the directory cannot be read.
pub fn fingerprint(dir: &Path) -> Option<Fingerprint> {
    let mut out: Fingerprint = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let meta = std::fs::metadata(e.path()).ok()?;
            meta.is_file()
                .then(|| (e.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    out.sort();
    Some(out)
}

/// Why a changed bundle was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Bundle(#[from] super::BundleError),
    /// A change of roots that is not a safe rotation step.
    #[error(transparent)]
    Step(#[from] StepError),
}

/// Loads `dir` and returns the new CA if it passes every start-up check and
/// is a safe step from `current` ([`super::rotation::check_step`]).
pub fn reload(dir: &Path, current: &Ca, now: OffsetDateTime) -> Result<Ca, ReloadError> {
    let next = Ca::load_for(dir, current.test_trust_domain(), now)?;
    check_step(current, &next, dir, now)?;
    Ok(next)
}

/// How the roots differ between two bundles: (added, removed) counts.
pub fn roots_delta(old: &Ca, new: &Ca) -> (usize, usize) {
    let (old, new) = (&old.bundle().roots, &new.bundle().roots);
    let added = new.iter().filter(|r| !old.contains(r)).count();
    let removed = old.iter().filter(|r| !new.contains(r)).count();
    (added, removed)
}

/// Longest wait between retries of a refused bundle whose files did not change.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Polls `dir` every `every` and swaps `ca` when a changed bundle passes
/// every check; `changed` counts the swaps (a watch channel, so a follower
/// that is busy when a swap happens still sees it). A refused bundle is
/// tried again even if its files do not change (a certificate that is not
/// valid yet, a permission fixed with `chmod`, which changes no size or
/// modification time), first after `every`, then backing off to 5 minutes.
pub async fn watch(
    dir: PathBuf,
    ca: Arc<ArcSwap<Ca>>,
    every: Duration,
    changed: Arc<watch::Sender<u64>>,
    reloads: crate::metrics::ReloadCounters,
) {
    let mut seen = fingerprint(&dir);
    // After a refusal: when to try the same files again, and the wait after that.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        tokio::time::sleep(every).await;
        let now_seen = fingerprint(&dir);
        // A directory that cannot be read (removed, made unreadable) is a
        // change too: loading it fails with the reason, the refusal is
        // logged and counted and retried like any other, and the running CA
        // keeps signing. Readable again, it is loaded as a change.
        let files_changed = now_seen != seen;
        let retry_due = retry.is_some_and(|(at, _)| tokio::time::Instant::now() >= at);
        if !files_changed && !retry_due {
            continue;
        }
        if files_changed {
            seen = now_seen;
        }
        let current = ca.load_full();
        let d = dir.clone();
        let result =
            tokio::task::spawn_blocking(move || reload(&d, &current, OffsetDateTime::now_utc()))
                .await
                .map_err(|e| e.to_string());
        match result {
            Ok(Ok(next)) => {
                let b = next.bundle();
                let (roots_added, roots_removed) = roots_delta(&ca.load(), &next);
                tracing::info!(
                    dir = %dir.display(),
                    key = %b.key_kind,
                    signer_expires = %crate::logging::Rfc3339(b.not_after),
                    roots = b.roots.len(),
                    roots_added,
                    roots_removed,
                    "CA bundle changed: new signing CA verified and in use"
                );
                ca.store(Arc::new(next));
                changed.send_modify(|generation| *generation += 1);
                reloads.ok.inc();
                retry = None;
            }
            Ok(Err(e)) => {
                reloads.refused.inc();
                let wait = match retry {
                    Some((_, wait)) if !files_changed => (wait * 2).min(MAX_RETRY),
                    _ => every,
                };
                retry = Some((tokio::time::Instant::now() + wait, wait));
                tracing::error!(
                    dir = %dir.display(),
                    error = %e,
                    retry_in = %humantime::format_duration(wait),
                    "CA bundle changed but was refused; still signing with the previous CA"
                )
            }
            Err(e) => tracing::error!(error = %e, "CA reload task failed"),
        }
    }
}
