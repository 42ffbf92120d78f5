//! Root rotation: which changes of the trust bundle are safe steps, where a
//! CA directory stands in a rotation, and the staged directories a rotation
//! goes through.
//!
//! A rotation is four states of a plug-in CA directory:
//! 1. old root, old intermediate;
//! 2. old + new roots, old intermediate (the new root reaches every workload);
//! 3. old + new roots, new intermediate under the new root;
//! 4. new root, new intermediate.
//!
//! Between any two states the server runs [`check_step`], the same rule at
//! every reload: one root bundle contains the other (istiod's multi-root
//! rule), the new signer chains to a root both bundles hold, and no root is
//! removed while the signer in use chains to it. [`stage_rotation`] writes
//! states 2-4 from state 1 and proves each step with that rule; [`stage`]
//! tells where a directory stands.

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::bundle::CertSummary;
use super::generate::{self, GeneratedCa};
use super::Ca;
use crate::pki;

/// Why a change of roots is not a safe step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(
        "{}: neither the new roots nor the roots in use contain the other, so workloads \
         would be stranded; rotate in steps: add the new root next to the old one, move \
         the intermediate, then remove the old root (README, \"Rotating the root\")",
        file.display()
    )]
    RootsNotNested { file: PathBuf },
    #[error(
        "{}: the new signing certificate does not chain to a root the workloads trust \
         already ({reason}); add its root to the roots first and wait until every \
         workload has it (README, \"Rotating the root\")",
        file.display()
    )]
    SignerUnderUntrustedRoot { file: PathBuf, reason: String },
    #[error(
        "{}: removes the root the signing certificate in use chains to, while the \
         certificates it issued are still out there; first move the intermediate to a root \
         that stays, wait one workload certificate lifetime, then remove the old root \
         (README, \"Rotating the root\")",
        file.display()
    )]
    RemovesRootInUse { file: PathBuf },
}

/// Checks that replacing `current` by `next` (loaded from `dir`, named in
/// the errors) is a safe step; see the module docs.
pub fn check_step(
    current: &Ca,
    next: &Ca,
    dir: &Path,
    now: OffsetDateTime,
) -> Result<(), StepError> {
    let (old, new) = (&current.bundle().roots, &next.bundle().roots);
    if old == new {
        return Ok(());
    }
    let layout = next.bundle().layout;
    let added_only = old.iter().all(|r| new.contains(r));
    let removed_only = new.iter().all(|r| old.contains(r));
    if !added_only && !removed_only {
        return Err(StepError::RootsNotNested {
            file: dir.join(layout.root_file()),
        });
    }
    // Roots are being removed: not the one the current signer stands on.
    if !added_only && current.verifies_under(new, now).is_err() {
        return Err(StepError::RemovesRootInUse {
            file: dir.join(layout.root_file()),
        });
    }
    let common: Vec<_> = new.iter().filter(|r| old.contains(r)).cloned().collect();
    next.verifies_under(&common, now)
        .map_err(|reason| StepError::SignerUnderUntrustedRoot {
            file: dir.join(layout.signing_cert_file()),
            reason,
        })
}

/// Where a CA stands in a root rotation.
#[derive(Debug, Clone)]
pub enum Stage {
    /// One root, the signer under it.
    Steady,
    /// Several roots, and one newer than the signer's: the new root is being
    /// distributed (step 2).
    NewRootTrusted {
        signer_root: CertSummary,
        newer: Vec<CertSummary>,
    },
    /// Several roots, the signer under the newest: the old roots wait to be
    /// removed (step 3).
    NewIntermediate {
        signer_root: CertSummary,
        unused: Vec<CertSummary>,
    },
}

impl Stage {
    /// What the stage means and what comes next, for `ca check`.
    pub fn explain(&self) -> String {
        let name = |s: &CertSummary| format!("{:?} (from {})", s.subject, s.not_before.date());
        let names = |v: &[CertSummary]| v.iter().map(name).collect::<Vec<_>>().join(", ");
        match self {
            Stage::Steady => "not rotating: one root, the signing certificate under it. \
                To rotate the root: `meshsign ca rotate-root --current DIR --out STAGES` \
                writes the next three states of this directory."
                .into(),
            Stage::NewRootTrusted { signer_root, newer } => format!(
                "root rotation step 2 of 4: the new root {} is trusted, the signing \
                 certificate is still under {}. Next, once every workload has renewed (one \
                 workload certificate lifetime) and every consumer of the root ConfigMaps has \
                 the new bundle: install the intermediate under the new root, keeping both roots \
                 (step 3).",
                names(newer),
                name(signer_root)
            ),
            Stage::NewIntermediate {
                signer_root,
                unused,
            } => format!(
                "root rotation step 3 of 4: the signing certificate is under the new root {}; \
                 no longer used for signing: {}. Next, after one workload certificate lifetime \
                 (every certificate from the old intermediate has expired): remove them from \
                 the roots (step 4).",
                name(signer_root),
                names(unused)
            ),
        }
    }
}

/// Where `ca` stands in a root rotation.
pub fn stage(ca: &Ca, now: OffsetDateTime) -> Stage {
    let roots = &ca.bundle().roots;
    // (position in the bundle, certificate, summary)
    let summaries: Vec<(usize, &CertificateDer<'static>, CertSummary)> = roots
        .iter()
        .enumerate()
        .filter_map(|(i, r)| CertSummary::of(r).map(|s| (i, r, s)))
        .collect();
    let signer = summaries
        .iter()
        .find(|(_, der, _)| ca.verifies_under(std::slice::from_ref(*der), now).is_ok());
    let (Some((signer_at, _, signer_root)), true) = (signer, summaries.len() > 1) else {
        return Stage::Steady;
    };
    // Newer: made later, or (same second) listed later, as `ca rotate-root`
    // appends the new root.
    let age = |at: usize, s: &CertSummary| (s.not_before, at);
    let others = summaries.iter().filter(|(at, _, _)| at != signer_at);
    let newer: Vec<CertSummary> = others
        .clone()
        .filter(|(at, _, s)| age(*at, s) > age(*signer_at, signer_root))
        .map(|(_, _, s)| s.clone())
        .collect();
    if newer.is_empty() {
        Stage::NewIntermediate {
            signer_root: signer_root.clone(),
            unused: others.map(|(_, _, s)| s.clone()).collect(),
        }
    } else {
        Stage::NewRootTrusted {
            signer_root: signer_root.clone(),
            newer,
        }
    }
}

/// The staged directories [`stage_rotation`] writes, in order.
pub const STAGES: [&str; 3] = [
    "step-2-both-roots",
    "step-3-new-intermediate",
    "step-4-new-root-only",
];

/// Writes the three later states of a root rotation for the CA in
/// `current_dir` (state 1) into `out/<STAGES[i]>`, with `new_intermediate`
/// issued under `new_root`, and proves each step with [`check_step`].
/// Returns the directories written.
pub fn stage_rotation(
    current_dir: &Path,
    new_root: &GeneratedCa,
    new_intermediate: &GeneratedCa,
    out: &Path,
    now: OffsetDateTime,
) -> Result<Vec<PathBuf>, String> {
    let current = Ca::load(current_dir, now).map_err(|e| e.to_string())?;
    let trust_domain = current.test_trust_domain().to_owned();
    let bundle = current.bundle();
    let files = |f: &str| {
        let path = current_dir.join(f);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let old_key = files(bundle.layout.key_file())?;
    let old_cert = pki::cert_pem(&bundle.signing_cert);
    let old_chain = pki::certs_pem(&bundle.chain);
    let old_roots = pki::certs_pem(&bundle.roots);
    let both = format!("{old_roots}{}", new_root.cert_pem);
    let new_chain = format!("{}{}", new_intermediate.cert_pem, new_root.cert_pem);
    let new_key = new_intermediate.key_pem();

    let states: [(&str, &str, &str, &str); 3] = [
        (&old_key, &old_cert, &old_chain, &both),
        (&new_key, &new_intermediate.cert_pem, &new_chain, &both),
        (
            &new_key,
            &new_intermediate.cert_pem,
            &new_chain,
            &new_root.cert_pem,
        ),
    ];
    let mut previous = current;
    let mut written = Vec::new();
    for (name, (key, cert, chain, roots)) in STAGES.iter().zip(states) {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (file, contents, private) in [
            ("ca-key.pem", key, true),
            ("ca-cert.pem", cert, false),
            ("cert-chain.pem", chain, false),
            ("root-cert.pem", roots, false),
        ] {
            generate::write_file(&dir.join(file), contents, private)
                .map_err(|e| format!("{}: {e}", dir.join(file).display()))?;
        }
        let next = Ca::load_for(&dir, &trust_domain, now).map_err(|e| e.to_string())?;
        check_step(&previous, &next, &dir, now).map_err(|e| e.to_string())?;
        previous = next;
        written.push(dir);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::generate::{CaSpec, KeyType};

    fn spec(cn: &str) -> CaSpec {
        CaSpec {
            organization: "test".into(),
            common_name: cn.into(),
            locality: None,
            key_type: KeyType::EcdsaP256,
            validity: time::Duration::days(10),
            path_len: None,
        }
    }

    #[test]
    fn staged_rotation_goes_through_every_stage() {
        let now = OffsetDateTime::now_utc();
        let old_root = generate::root(&spec("old root"), now).unwrap();
        let old_int = generate::intermediate(&old_root, &spec("old int"), now).unwrap();
        let current = tempfile::tempdir().unwrap();
        generate::write_istio_layout(
            current.path(),
            &old_int,
            &old_int.cert_pem,
            &old_root.cert_pem,
        )
        .unwrap();
        assert!(matches!(
            stage(&Ca::load(current.path(), now).unwrap(), now),
            Stage::Steady
        ));

        // The new root is made a second later, as a real one would be.
        let later = now + time::Duration::seconds(1);
        let new_root = generate::root(&spec("new root"), later).unwrap();
        let new_int = generate::intermediate(&new_root, &spec("new int"), later).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dirs = stage_rotation(current.path(), &new_root, &new_int, out.path(), later).unwrap();
        assert_eq!(dirs.len(), 3);
        let stages: Vec<Stage> = dirs
            .iter()
            .map(|d| stage(&Ca::load(d, later).unwrap(), later))
            .collect();
        assert!(matches!(&stages[0], Stage::NewRootTrusted { newer, .. } if newer.len() == 1));
        assert!(matches!(&stages[1], Stage::NewIntermediate { unused, .. } if unused.len() == 1));
        assert!(matches!(stages[2], Stage::Steady));
        for s in &stages {
            assert!(!s.explain().is_empty());
        }
    }
}
