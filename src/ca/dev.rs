//! Dev mode's self-made CA: on first start a root and an intermediate
//! (ECDSA P-256) are created in the state directory, in Istio's plug-in layout
//! plus the root's key (`root-key.pem`); later starts reuse them, re-issuing the
//! intermediate from the root when it is about to expire.

use std::path::Path;

use time::{Duration, OffsetDateTime};

use super::generate::{self, CaSpec, KeyType};
use super::{BundleError, Ca, CaBundle};

const ROOT_VALIDITY_DAYS: i64 = 3650;
const INTERMEDIATE_VALIDITY_DAYS: i64 = 365;
/// Re-issue the intermediate when less than this is left.
const RENEW_BEFORE_DAYS: i64 = 30;

/// What dev mode did at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevCaState {
    Created,
    Reused,
    IntermediateRenewed,
}

fn err(dir: &Path, reason: impl Into<String>) -> BundleError {
    BundleError {
        file: dir.to_path_buf(),
        reason: reason.into(),
    }
}

/// Loads the dev CA from `dir`, creating or renewing it as needed.
pub fn ensure(
    dir: &Path,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<(Ca, DevCaState), BundleError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| err(dir, format!("cannot create state directory: {e}")))?;
    let root_key_path = dir.join("root-key.pem");
    let have_bundle = CaBundle::detect(dir)?.is_some();

    if have_bundle {
        let bundle = CaBundle::load(dir, now)?;
        if bundle.not_after - now > Duration::days(RENEW_BEFORE_DAYS) {
            return Ok((Ca::new(bundle, trust_domain, now)?, DevCaState::Reused));
        }
        // Renew the intermediate from the stored root.
        let root_pem = std::fs::read_to_string(dir.join("root-cert.pem"))
            .map_err(|e| err(&dir.join("root-cert.pem"), e.to_string()))?;
        let root_key = std::fs::read_to_string(&root_key_path).map_err(|e| {
            err(
                &root_key_path,
                format!("cannot renew the intermediate: {e}"),
            )
        })?;
        let root = generate::reload(&root_pem, &root_key).map_err(|e| err(&root_key_path, e))?;
        write_intermediate(dir, &root, trust_domain, now)?;
        let bundle = CaBundle::load(dir, now)?;
        return Ok((
            Ca::new(bundle, trust_domain, now)?,
            DevCaState::IntermediateRenewed,
        ));
    }

    let root = generate::root(
        &CaSpec {
            organization: trust_domain.to_owned(),
            common_name: "meshsign dev root".into(),
            locality: None,
            key_type: KeyType::EcdsaP256,
            validity: Duration::days(ROOT_VALIDITY_DAYS),
            path_len: Some(1),
        },
        now,
    )
    .map_err(|e| err(dir, format!("cannot create the dev root: {e}")))?;
    generate::write_file(&root_key_path, &root.key_pem(), true)
        .map_err(|e| err(&root_key_path, e.to_string()))?;
    write_intermediate(dir, &root, trust_domain, now)?;
    let bundle = CaBundle::load(dir, now)?;
    Ok((Ca::new(bundle, trust_domain, now)?, DevCaState::Created))
}

fn write_intermediate(
    dir: &Path,
    root: &generate::GeneratedCa,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<(), BundleError> {
    let intermediate = generate::intermediate(
        root,
        &CaSpec {
            organization: trust_domain.to_owned(),
            common_name: "meshsign dev intermediate".into(),
            locality: None,
            key_type: KeyType::EcdsaP256,
            validity: Duration::days(INTERMEDIATE_VALIDITY_DAYS),
            path_len: Some(0),
        },
        now,
    )
    .map_err(|e| err(dir, format!("cannot create the dev intermediate: {e}")))?;
    // cert-chain.pem holds the intermediate only (like Istio's samples), so
    // responses are [leaf, intermediate, root].
    generate::write_istio_layout(dir, &intermediate, &intermediate.cert_pem, &root.cert_pem)
        .map_err(|e| err(dir, e.to_string()))
}
