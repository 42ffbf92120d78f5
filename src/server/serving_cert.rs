//! The server's own TLS certificate: issued by the CA itself (renewed at half
//! its life and whenever a new signing CA is loaded) or read from files (e.g.
//! written by cert-manager), which are re-read when they change and used only
//! once they pass every check: the chain parses, the key matches its leaf,
//! and the leaf is valid now.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use super::tls::{self, ServingCertificate};
use super::StartError;
use crate::ca::{Ca, LeafSpec, SanEntry};
use crate::config::ServerTls;

/// Issues (or loads) the serving certificate for the configured mode.
pub(super) fn serving_certificate(
    mode: &ServerTls,
    ca: &Ca,
) -> Result<Arc<ServingCertificate>, StartError> {
    let key = match mode {
        ServerTls::Issued { .. } => issue_serving_key(mode, ca).map(|(key, _)| key),
        ServerTls::Files { cert, key } => load_serving_files(cert, key),
        ServerTls::InsecurePlaintext => Err("plaintext has no certificate".into()),
    }
    .map_err(StartError::ServingCertificate)?;
    Ok(ServingCertificate::new(key))
}

fn load_serving_files(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::sign::CertifiedKey, String> {
    let chain_pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let chain = crate::pki::parse_certificates_nonempty(&chain_pem)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key_pem = std::fs::read_to_string(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let block = ::pem::parse(&key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
    let der = match block.tag() {
        "PRIVATE KEY" => PrivateKeyDer::Pkcs8(block.into_contents().into()),
        "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(block.into_contents().into()),
        "EC PRIVATE KEY" => PrivateKeyDer::Sec1(block.into_contents().into()),
        other => return Err(format!("{}: unexpected PEM block {other:?}", key.display())),
    };
    let leaf = crate::pki::parse_cert(&chain[0]).map_err(|e| format!("{}: {e}", cert.display()))?;
    let now = OffsetDateTime::now_utc();
    let validity = leaf.validity();
    if now < validity.not_before.to_datetime() || now > validity.not_after.to_datetime() {
        return Err(format!(
            "{}: the certificate is not valid now (valid {} .. {})",
            cert.display(),
            validity.not_before.to_datetime(),
            validity.not_after.to_datetime()
        ));
    }
    let certified = tls::certified_key(chain, der)?;
    certified.keys_match().map_err(|e| {
        format!(
            "{}: the key does not match {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(certified)
}

/// What the serving files looked like: size and modification time of each
/// (symlinks followed, as Secret volumes swap them).
fn files_state(paths: [&std::path::Path; 2]) -> [Option<(u64, std::time::SystemTime)>; 2] {
    paths.map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)))
    })
}

/// Re-reads the serving certificate files every `every` when they changed
/// (or after a refusal: a pair written one file at a time is caught half
/// way); a pair that passes every check replaces the certificate for new
/// handshakes, one that does not changes nothing but a log line and
/// `meshsign_reloads_total{what="serving_certificate",result="refused"}`.
pub(super) async fn watch_serving_files(
    serving: Arc<ServingCertificate>,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    every: Duration,
    reloads: crate::metrics::ReloadCounters,
) {
    let mut seen = files_state([&cert, &key]);
    let mut refused = false;
    loop {
        tokio::time::sleep(every).await;
        let now_seen = files_state([&cert, &key]);
        if now_seen == seen && !refused {
            continue;
        }
        seen = now_seen;
        let (c, k) = (cert.clone(), key.clone());
        let loaded = tokio::task::spawn_blocking(move || load_serving_files(&c, &k))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match loaded {
            Ok(next) => {
                serving.replace(next);
                refused = false;
                reloads.ok.inc();
                tracing::info!(cert = %cert.display(), "serving certificate files changed: new certificate in use");
            }
            Err(e) => {
                refused = true;
                reloads.refused.inc();
                tracing::error!(error = %e, "serving certificate files changed but were refused; still serving the previous certificate");
            }
        }
    }
}

/// A fresh P-256 key and a certificate for the configured names, signed by the
/// CA and presented with the chain up to (not including) the root.
fn issue_serving_key(
    mode: &ServerTls,
    ca: &Ca,
) -> Result<(rustls::sign::CertifiedKey, OffsetDateTime), String> {
    let ServerTls::Issued {
        dns_names,
        ip_addresses,
        ttl,
    } = mode
    else {
        return Err("not an issued serving certificate".into());
    };
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let sans: Vec<SanEntry> = dns_names
        .iter()
        .cloned()
        .map(SanEntry::Dns)
        .chain(ip_addresses.iter().copied().map(SanEntry::Ip))
        .collect();
    let now = OffsetDateTime::now_utc();
    let leaf = ca
        .sign(&LeafSpec {
            spki_der: &spki,
            common_name: None,
            sans: &sans,
            not_before: now - time::Duration::minutes(5),
            not_after: now + *ttl,
        })
        .map_err(|e| e.to_string())?;
    let roots = &ca.bundle().roots;
    let mut chain: Vec<CertificateDer<'static>> = vec![leaf];
    chain.extend(
        ca.bundle()
            .chain
            .iter()
            .filter(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()))
            .cloned(),
    );
    let not_after = crate::pki::parse_cert(&chain[0])?
        .validity()
        .not_after
        .to_datetime();
    let key = tls::certified_key(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))?;
    Ok((key, not_after))
}

/// Re-issues the serving certificate at half its remaining lifetime (which
/// may be shorter than `cert_ttl` when the CA itself expires sooner), and as
/// soon as a new signing CA is loaded.
pub(super) async fn renew_serving_certificate(
    serving: Arc<ServingCertificate>,
    ca: Arc<ArcSwap<Ca>>,
    mode: ServerTls,
    ca_changed: Arc<tokio::sync::watch::Sender<u64>>,
) {
    let ServerTls::Issued { ttl, .. } = &mode else {
        return;
    };
    let half_life = |not_after: OffsetDateTime| {
        let left = (not_after - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        Duration::try_from(left / 2)
            .unwrap_or_default()
            .max(Duration::from_secs(60))
    };
    let mut wait = *ttl / 2;
    if let Some(leaf) = serving.current().cert.first() {
        if let Ok(cert) = crate::pki::parse_cert(leaf) {
            wait = half_life(cert.validity().not_after.to_datetime());
        }
    }
    let mut ca_swaps = ca_changed.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Ok(()) = ca_swaps.changed() => {}
        }
        let current = ca.load_full();
        let mode = mode.clone();
        let issued = tokio::task::spawn_blocking(move || issue_serving_key(&mode, &current))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match issued {
            Ok((key, not_after)) => {
                serving.replace(key);
                wait = half_life(not_after);
                tracing::info!(expires = %crate::logging::Rfc3339(not_after), "serving certificate renewed");
            }
            Err(e) => {
                tracing::error!(error = %e, "serving certificate renewal failed; retrying in 1m");
                wait = Duration::from_secs(60);
            }
        }
    }
}
