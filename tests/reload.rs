//! Hot reload of a plug-in CA directory: a new intermediate under the same
//! root is taken; a broken bundle or one with no root in common is refused and the previous
//! CA keeps signing.

mod common;

use common::{TestServer, Workload};
use meshsign::ca::generate::{self, CaSpec, KeyType};
use meshsign::client::WorkloadKeyType;

fn spec(cn: &str) -> CaSpec {
    common::ca_spec(cn, KeyType::EcdsaP256, ::time::Duration::days(30))
}

/// Issues one certificate and returns its issuer's CN.
async fn issuer_cn(ts: &TestServer, wl: &Workload, token: &str) -> String {
    let (chain, _) = wl
        .obtain(&ts.endpoint(), Some(token), 600)
        .await
        .expect("issued");
    common::leaf_issuer_cn(&chain)
}

async fn wait_for_issuer(ts: &TestServer, wl: &Workload, token: &str, want: &str) -> bool {
    for _ in 0..40 {
        if issuer_cn(ts, wl, token).await == want {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    false
}

#[tokio::test]
async fn intermediate_rotation_is_picked_up_and_bad_bundles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let now = ::time::OffsetDateTime::now_utc();
    let root = generate::root(&spec("root"), now).unwrap();
    let first = generate::intermediate(&root, &spec("first"), now).unwrap();
    generate::write_istio_layout(dir.path(), &first, &first.cert_pem, &root.cert_pem).unwrap();

    // Tests can't wait 10s: a 1s watch interval.
    let ts = TestServer::with_ca_dir_and_reload(dir.path(), "1s").await;
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "web");
    assert_eq!(issuer_cn(&ts, &wl, &token).await, "first");

    // Rotate the intermediate under the same root.
    let second = generate::intermediate(&root, &spec("second"), now).unwrap();
    generate::write_istio_layout(dir.path(), &second, &second.cert_pem, &root.cert_pem).unwrap();
    assert!(
        wait_for_issuer(&ts, &wl, &token, "second").await,
        "new intermediate not taken"
    );

    // A key that does not match: refused, "second" keeps signing.
    let third = generate::intermediate(&root, &spec("third"), now).unwrap();
    generate::write_file(&dir.path().join("ca-cert.pem"), &third.cert_pem, false).unwrap();
    generate::write_file(&dir.path().join("cert-chain.pem"), &third.cert_pem, false).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(issuer_cn(&ts, &wl, &token).await, "second");
    assert!(
        ts.metric("meshsign_reloads_total{result=\"refused\",what=\"ca\"}")
            .await
            >= 1.0
    );
    assert!(
        ts.metric("meshsign_reloads_total{result=\"ok\",what=\"ca\"}")
            .await
            >= 1.0
    );

    // A different root, none in common: refused too.
    let other_root = generate::root(&spec("other root"), now).unwrap();
    let fourth = generate::intermediate(&other_root, &spec("fourth"), now).unwrap();
    generate::write_istio_layout(dir.path(), &fourth, &fourth.cert_pem, &other_root.cert_pem)
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(issuer_cn(&ts, &wl, &token).await, "second");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_bundle_is_retried_without_a_file_change() {
    let dir = tempfile::tempdir().unwrap();
    let now = ::time::OffsetDateTime::now_utc();
    let root = generate::root(&spec("root"), now).unwrap();
    let first = generate::intermediate(&root, &spec("first"), now).unwrap();
    generate::write_istio_layout(dir.path(), &first, &first.cert_pem, &root.cert_pem).unwrap();
    let ts = TestServer::with_ca_dir_and_reload(dir.path(), "1s").await;
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "web");
    assert_eq!(issuer_cn(&ts, &wl, &token).await, "first");

    // An intermediate valid only from 4 seconds on (generate backdates by
    // 5 minutes): refused when first seen, and taken by a later retry of
    // the same, unchanged files.
    let later = ::time::OffsetDateTime::now_utc()
        + ::time::Duration::minutes(5)
        + ::time::Duration::seconds(4);
    let second = generate::intermediate(&root, &spec("second"), later).unwrap();
    generate::write_istio_layout(dir.path(), &second, &second.cert_pem, &root.cert_pem).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        issuer_cn(&ts, &wl, &token).await,
        "first",
        "not valid yet: refused"
    );
    let mut taken = false;
    for _ in 0..60 {
        if issuer_cn(&ts, &wl, &token).await == "second" {
            taken = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(taken, "the refused bundle was never retried");
}

/// A self-signed serving certificate for `localhost`: (certificate PEM, key PEM, DER).
fn serving_pair() -> (String, String, rustls_pki_types::CertificateDer<'static>) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (cert.pem(), signing_key.serialize_pem(), cert.der().clone())
}

#[tokio::test]
async fn serving_certificate_files_are_reloaded_and_a_bad_pair_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let now = ::time::OffsetDateTime::now_utc();
    let root = generate::root(&spec("root"), now).unwrap();
    let ca = generate::intermediate(&root, &spec("ca"), now).unwrap();
    generate::write_istio_layout(dir.path(), &ca, &ca.cert_pem, &root.cert_pem).unwrap();
    let files = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (files.path().join("tls.crt"), files.path().join("tls.key"));
    let (cert1, key1, der1) = serving_pair();
    generate::write_file(&cert_path, &cert1, false).unwrap();
    generate::write_file(&key_path, &key1, true).unwrap();
    let ts = TestServer::with_ca_dir_reload_and(
        dir.path(),
        "1s",
        &format!("server_tls: {{ cert_file: {cert_path:?}, key_file: {key_path:?} }}\n"),
    )
    .await;
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "web");
    let trusting = |der: &rustls_pki_types::CertificateDer<'static>| meshsign::client::CaEndpoint {
        roots: vec![der.clone()],
        ..ts.endpoint()
    };
    wl.obtain(&trusting(&der1), Some(&token), 600)
        .await
        .expect("first serving certificate");

    // cert-manager renews: both files replaced.
    let (cert2, key2, der2) = serving_pair();
    generate::write_file(&key_path, &key2, true).unwrap();
    generate::write_file(&cert_path, &cert2, false).unwrap();
    common::eventually(
        "new serving certificate",
        std::time::Duration::from_secs(10),
        || async { wl.obtain(&trusting(&der2), Some(&token), 600).await.is_ok() },
    )
    .await;
    assert!(wl
        .obtain(&trusting(&der1), Some(&token), 600)
        .await
        .is_err());

    // A certificate that does not match the key: refused, the previous one stays.
    let (cert3, _, _) = serving_pair();
    generate::write_file(&cert_path, &cert3, false).unwrap();
    common::eventually(
        "refusal counted",
        std::time::Duration::from_secs(10),
        || async {
            ts.metric("meshsign_reloads_total{result=\"refused\",what=\"serving_certificate\"}")
                .await
                >= 1.0
        },
    )
    .await;
    wl.obtain(&trusting(&der2), Some(&token), 600)
        .await
        .expect("the previous serving certificate still in use");
    assert!(
        ts.metric("meshsign_reloads_total{result=\"ok\",what=\"serving_certificate\"}")
            .await
            >= 1.0
    );
    ts.server.shutdown().await.unwrap();
}
