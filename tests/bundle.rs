//! CA bundle loading: good bundles load, and every inconsistency stops
//! start-up with the file and the reason.

mod common;

use std::path::Path;

use meshsign::ca::generate::{self, KeyType};
use meshsign::ca::{Ca, CaBundle, Layout};
use meshsign::config::Config;
use meshsign::pki::der;
use time::{Duration, OffsetDateTime};

fn copy(from: &Path, name: &str, to: &Path, as_name: &str) {
    std::fs::copy(from.join(name), to.join(as_name)).unwrap();
}

/// A copy of the sample bundle with `replace` applied (file → sample file).
fn sample_with(replace: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let samples = common::istio_samples();
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        let src = replace
            .iter()
            .find(|(to, _)| *to == f)
            .map_or(f, |(_, from)| *from);
        copy(&samples, src, dir.path(), f);
    }
    dir
}

/// Asserts the bundle in `dir` is refused with an error naming `file` and saying `reason`.
fn assert_refused(dir: &Path, file: &str, reason: &str) {
    let err = load_err(dir);
    assert!(err.contains(file) && err.contains(reason), "{err}");
}

fn load_err(dir: &Path) -> String {
    let err = Ca::load(dir, OffsetDateTime::now_utc()).expect_err("bundle must be refused");
    err.to_string()
}

#[test]
fn istio_sample_bundle_loads() {
    let ca = Ca::load(&common::istio_samples(), OffsetDateTime::now_utc()).unwrap();
    assert_eq!(ca.bundle().layout, Layout::Istio);
    assert_eq!(ca.bundle().key_kind.to_string(), "RSA 2048");
    assert_eq!(ca.response_tail().len(), 2);
}

#[test]
fn multi_root_bundle_is_one_last_element() {
    let dir = sample_with(&[("root-cert.pem", "root-cert-combined.pem")]);
    let ca = Ca::load(dir.path(), OffsetDateTime::now_utc()).unwrap();
    assert_eq!(ca.bundle().roots.len(), 2);
    let last = ca.response_tail().last().unwrap();
    assert_eq!(last.matches("BEGIN CERTIFICATE").count(), 2);
}

#[test]
fn istio_alt_2_sample_key_really_does_not_match_its_certificate() {
    // Istio's ca-key-alt-2.pem (PKCS#8, RSA 4096) is not the key of
    // ca-cert-alt-2.pem (`openssl pkey -pubout` and `openssl x509 -pubkey`
    // differ); the bundle must be refused with that reason.
    let dir = sample_with(&[
        ("ca-cert.pem", "ca-cert-alt-2.pem"),
        ("ca-key.pem", "ca-key-alt-2.pem"),
        ("cert-chain.pem", "cert-chain-alt-2.pem"),
        ("root-cert.pem", "root-cert-alt.pem"),
    ]);
    assert_refused(dir.path(), "ca-key.pem", "does not match");
}

#[test]
fn pkcs8_and_sec1_keys_load() {
    // The sample's PKCS#1 key re-encoded as PKCS#8.
    let dir = sample_with(&[]);
    let pkcs1 = std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap();
    assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let pkcs8 = rcgen::KeyPair::from_pem(&pkcs1).unwrap().serialize_pem();
    assert!(pkcs8.starts_with("-----BEGIN PRIVATE KEY-----"));
    std::fs::write(dir.path().join("ca-key.pem"), pkcs8).unwrap();
    Ca::load(dir.path(), OffsetDateTime::now_utc()).unwrap();

    // An openssl-made P-384 SEC1 key, self-signed root as signing CA and an
    // empty cert-chain.pem (istiod's self-signed layout): [leaf, root].
    let sec1 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/sec1-self-signed");
    let ca = Ca::load(&sec1, OffsetDateTime::now_utc()).unwrap();
    assert_eq!(ca.bundle().key_kind.to_string(), "ECDSA P-384");
    assert_eq!(ca.response_tail().len(), 1);
}

#[test]
fn key_that_does_not_match_is_refused() {
    let dir = sample_with(&[("ca-key.pem", "ca-key-alt-2.pem")]);
    assert_refused(
        dir.path(),
        "ca-key.pem",
        "does not match the certificate in ca-cert.pem",
    );
}

#[test]
fn wrong_root_is_refused() {
    let dir = sample_with(&[("root-cert.pem", "root-cert-alt.pem")]);
    assert_refused(
        dir.path(),
        "cert-chain.pem",
        "cannot verify ca-cert.pem up to a root in root-cert.pem",
    );
}

#[test]
fn non_ca_signing_certificate_is_refused() {
    let dir = sample_with(&[
        ("ca-cert.pem", "workload-foo-cert.pem"),
        ("ca-key.pem", "workload-foo-key.pem"),
    ]);
    assert_refused(
        dir.path(),
        "ca-cert.pem",
        "not authorized to sign other certificates",
    );
}

#[test]
fn chain_not_starting_with_the_signing_certificate_is_refused() {
    let dir = sample_with(&[("cert-chain.pem", "root-cert.pem")]);
    assert_refused(
        dir.path(),
        "cert-chain.pem",
        "must start with the signing certificate",
    );
}

#[test]
fn incomplete_bundle_names_what_is_missing() {
    let dir = sample_with(&[]);
    std::fs::remove_file(dir.path().join("cert-chain.pem")).unwrap();
    assert_refused(dir.path(), "cert-chain.pem", "incomplete signing CA bundle");
}

#[test]
fn garbage_and_encrypted_keys_are_refused() {
    let dir = sample_with(&[]);
    std::fs::write(
        dir.path().join("ca-key.pem"),
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    assert_refused(dir.path(), "ca-key.pem", "encrypted");
    std::fs::write(dir.path().join("root-cert.pem"), "not pem").unwrap();
    std::fs::copy(
        common::istio_samples().join("ca-key.pem"),
        dir.path().join("ca-key.pem"),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("root-cert.pem"), "{err}");
}

#[test]
fn expired_signing_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let long_ago = OffsetDateTime::now_utc() - Duration::days(400);
    let spec = |cn: &str, days: i64| common::ca_spec(cn, KeyType::EcdsaP384, Duration::days(days));
    let root = generate::root(&spec("root", 3650), long_ago).unwrap();
    let inter = generate::intermediate(&root, &spec("old", 30), long_ago).unwrap();
    generate::write_istio_layout(dir.path(), &inter, &inter.cert_pem, &root.cert_pem).unwrap();
    assert_refused(dir.path(), "ca-cert.pem", "expired at");
}

#[test]
fn kubernetes_tls_layout_loads() {
    let dir = tempfile::tempdir().unwrap();
    let samples = common::istio_samples();
    copy(&samples, "ca-cert.pem", dir.path(), "tls.crt");
    copy(&samples, "ca-key.pem", dir.path(), "tls.key");
    copy(&samples, "root-cert.pem", dir.path(), "ca.crt");
    let bundle = CaBundle::load(dir.path(), OffsetDateTime::now_utc()).unwrap();
    assert_eq!(bundle.layout, Layout::KubernetesTls);
    let ca = Ca::new(bundle, "cluster.local", OffsetDateTime::now_utc()).unwrap();
    // [tls.crt certs..., ca.crt certs..., ca.crt], as istiod.
    assert_eq!(ca.response_tail().len(), 3);
}

#[test]
fn every_supported_ca_key_type_signs() {
    for kt in [
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Rsa2048,
        KeyType::Ed25519,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let spec = |cn: &str| common::ca_spec(cn, kt, Duration::days(10));
        let root = generate::root(&spec("root"), now).unwrap();
        let inter = generate::intermediate(&root, &spec("inter"), now).unwrap();
        generate::write_istio_layout(dir.path(), &inter, &inter.cert_pem, &root.cert_pem).unwrap();
        Ca::load(dir.path(), now).unwrap_or_else(|e| panic!("{kt}: {e}"));
    }
}

/// DER of a NameConstraints extension value permitting URI hosts `permitted`.
fn uri_name_constraints(permitted: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    der::nested(&mut out, der::SEQUENCE, |constraints| {
        // [0] permittedSubtrees: one GeneralSubtree with a [6] URI each.
        der::nested(constraints, 0xa0, |subtrees| {
            for host in permitted {
                der::nested(subtrees, der::SEQUENCE, |subtree| {
                    der::tlv(subtree, 0x86, host.as_bytes())
                });
            }
        });
    });
    out
}

#[test]
fn an_intermediate_with_uri_name_constraints_loads_for_its_own_trust_domain_only() {
    use rcgen::{BasicConstraints, CertificateParams, CustomExtension, IsCa, Issuer, KeyPair};
    let now = OffsetDateTime::now_utc();
    let params = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::days(10);
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = params("constrained root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let inter_key = KeyPair::generate().unwrap();
    let mut inter_params = params("constrained intermediate");
    let mut nc = CustomExtension::from_oid_content(
        &[2, 5, 29, 30],
        uri_name_constraints(&["mesh.example.org"]),
    );
    nc.set_criticality(true);
    inter_params.custom_extensions.push(nc);
    inter_params.use_authority_key_identifier_extension = true;
    let inter = inter_params.signed_by(&inter_key, &root_issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("ca-cert.pem", &inter.pem());
    write("ca-key.pem", &inter_key.serialize_pem());
    write("cert-chain.pem", &inter.pem());
    write("root-cert.pem", &root.pem());

    let ca = Ca::load_for(dir.path(), "mesh.example.org", now)
        .unwrap_or_else(|e| panic!("a permitted trust domain must load: {e}"));
    assert_eq!(ca.uri_name_constraints().unwrap().len(), 1);
    ca.self_test(now).unwrap();
    // Outside the constraints: refused at start-up, with the reason.
    let err = Ca::load_for(dir.path(), "cluster.local", now)
        .expect_err("a trust domain outside the constraints must be refused")
        .to_string();
    assert!(err.contains("name constraints"), "{err}");
}

#[tokio::test]
async fn server_refuses_to_start_on_a_bad_bundle() {
    let dir = sample_with(&[("ca-key.pem", "ca-key-alt-2.pem")]);
    let config = Config::from_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nca: {{ dir: {:?} }}\nauthn: {{ client_certificates: true }}\n",
        dir.path().display().to_string()
    ))
    .unwrap();
    let err = meshsign::server::start(&config)
        .await
        .expect_err("must not start");
    assert!(err.to_string().contains("ca-key.pem"), "{err}");
}

#[cfg(unix)]
#[test]
fn a_key_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let spec = |cn: &str| common::ca_spec(cn, KeyType::EcdsaP256, Duration::days(10));
    let root = generate::root(&spec("root"), now).unwrap();
    let inter = generate::intermediate(&root, &spec("inter"), now).unwrap();
    generate::write_istio_layout(dir.path(), &inter, &inter.cert_pem, &root.cert_pem).unwrap();
    let key = dir.path().join("ca-key.pem");
    // As meshsign writes it: owner only, nothing to say.
    assert_eq!(
        meshsign::ca::bundle::key_file_exposure(dir.path(), Layout::Istio),
        None
    );
    // As a Secret volume mounts it by default.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        meshsign::ca::bundle::key_file_exposure(dir.path(), Layout::Istio),
        Some(meshsign::ca::bundle::KeyExposure {
            path: key.clone(),
            mode: 0o644
        })
    );
    // The bundle still loads: a warning, not a refusal.
    CaBundle::load(dir.path(), now).unwrap();
}
