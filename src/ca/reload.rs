//! Hot reload of a plug-in CA directory, as istiod does for `cacerts`.
//!
//! The directory is polled (Kubernetes Secret volumes update through symlink
//! swaps, which polling sees reliably). When any file changes, the bundle is
//! loaded and verified exactly as at start-up and test-signed; only then does
//! it replace the running CA, atomically, for every later request. A bundle
//! that fails any check is refused with the file and the reason, and the
//! running CA keeps signing. As in istiod without `ISTIO_MULTIROOT_MESH`, the
//! roots may not change at run time: rotating an intermediate under the same
//! root is supported, changing the trust bundle needs a restart (and a
//! planned roll-out of the new roots to every workload first).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tokio::sync::Notify;

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
    #[error("the roots changed: changing the trust bundle at run time is not supported; restart meshsign after distributing the new roots")]
    RootsChanged,
}

/// Loads `dir` and, if it is valid and keeps the same roots as `current`,
/// returns the new CA.
pub fn reload(dir: &Path, current: &Ca, now: OffsetDateTime) -> Result<Ca, ReloadError> {
    let next = Ca::load_for(dir, current.test_trust_domain(), now)?;
    if next.bundle().roots != current.bundle().roots {
        return Err(ReloadError::RootsChanged);
    }
    Ok(next)
}

/// Longest wait between retries of a refused bundle whose files did not change.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Polls `dir` every `every` and swaps `ca` when a changed bundle passes
/// every check; `changed` is notified after each swap. A refused bundle is
/// tried again even if its files do not change (a certificate that is not
/// valid yet, a permission fixed with `chmod`, which changes no size or
/// modification time), first after `every`, then backing off to 5 minutes.
pub async fn watch(dir: PathBuf, ca: Arc<ArcSwap<Ca>>, every: Duration, changed: Arc<Notify>) {
    let mut seen = fingerprint(&dir);
    // After a refusal: when to try the same files again, and the wait after that.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        tokio::time::sleep(every).await;
        let now_seen = fingerprint(&dir);
        let files_changed = now_seen != seen && now_seen.is_some();
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
                tracing::info!(
                    dir = %dir.display(),
                    key = %b.key_kind,
                    signer_expires = %b.not_after,
                    "CA bundle changed: new signing CA verified and in use"
                );
                ca.store(Arc::new(next));
                changed.notify_waiters();
                retry = None;
            }
            Ok(Err(e)) => {
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
