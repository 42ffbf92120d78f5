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
    let next = Ca::load(dir, now)?;
    if next.bundle().roots != current.bundle().roots {
        return Err(ReloadError::RootsChanged);
    }
    Ok(next)
}

/// Polls `dir` every `every` and swaps `ca` when a changed bundle passes
/// every check; `changed` is notified after each swap.
pub async fn watch(dir: PathBuf, ca: Arc<ArcSwap<Ca>>, every: Duration, changed: Arc<Notify>) {
    let mut seen = fingerprint(&dir);
    loop {
        tokio::time::sleep(every).await;
        let now_seen = fingerprint(&dir);
        if now_seen == seen || now_seen.is_none() {
            continue;
        }
        seen = now_seen;
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
            }
            Ok(Err(e)) => tracing::error!(
                dir = %dir.display(),
                error = %e,
                "CA bundle changed but was refused; still signing with the previous CA"
            ),
            Err(e) => tracing::error!(error = %e, "CA reload task failed"),
        }
    }
}
