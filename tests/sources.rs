//! Configuration sources beyond the defaults: a serving certificate given as
//! files, and a JWKS fetched over HTTPS (with the bearer token Kubernetes
//! wants) instead of read from a file.

mod common;

use std::sync::Arc;

use common::Workload;
use meshsign::ca::generate::{self, KeyType};
use meshsign::ca::{Ca, LeafSpec, SanEntry};
use meshsign::client::{CaEndpoint, WorkloadKeyType};
use meshsign::config::Config;
use meshsign::pki;
use meshsign::token::DevTokenIssuer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A root + intermediate bundle in `dir`, and a serving certificate for
/// `localhost` signed by it (chain PEM, key PEM).
fn bundle_and_serving_cert(dir: &std::path::Path) -> (String, String) {
    let now = ::time::OffsetDateTime::now_utc();
    let root = generate::root(
        &common::ca_spec("root", KeyType::EcdsaP256, ::time::Duration::days(10)),
        now,
    )
    .unwrap();
    let inter = generate::intermediate(
        &root,
        &common::ca_spec("inter", KeyType::EcdsaP256, ::time::Duration::days(10)),
        now,
    )
    .unwrap();
    generate::write_istio_layout(dir, &inter, &inter.cert_pem, &root.cert_pem).unwrap();
    let ca = Ca::load(dir, now).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let leaf = ca
        .sign(&LeafSpec {
            spki_der: &spki,
            common_name: None,
            sans: &[SanEntry::Dns("localhost".into())],
            not_before: now - ::time::Duration::minutes(1),
            not_after: now + ::time::Duration::hours(1),
        })
        .unwrap();
    (pki::cert_pem(&leaf) + &inter.cert_pem, key.serialize_pem())
}

#[tokio::test]
async fn serving_certificate_from_files_and_jwks_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let (chain_pem, key_pem) = bundle_and_serving_cert(&bundle);
    std::fs::write(dir.path().join("tls.crt"), &chain_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &key_pem).unwrap();
    std::fs::write(dir.path().join("sa-token"), "kube-api-token\n").unwrap();
    let issuer = DevTokenIssuer::load_or_create(&dir.path().join("issuer")).unwrap();

    // A one-endpoint HTTPS server for the JWKS, recording the requests it gets.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let chain = pki::parse_certificates_nonempty(chain_pem.as_bytes()).unwrap();
    let key = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap()
    };
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_port = listener.local_addr().unwrap().port();
    let jwks = issuer.jwks().to_owned();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let jwks = jwks.clone();
            let seen = seen_tx.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = seen.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
                    jwks.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });

    let yaml = format!(
        r#"
listen: "127.0.0.1:0"
server_tls: {{ cert_file: {cert:?}, key_file: {key:?} }}
ca: {{ dir: {bundle:?} }}
authn:
  jwt:
    - issuer: meshsign-dev
      jwks_uri: "https://localhost:{jwks_port}/openid/v1/jwks"
      jwks_ca_file: {root:?}
      jwks_bearer_token_file: {token:?}
"#,
        cert = dir.path().join("tls.crt").display().to_string(),
        key = dir.path().join("tls.key").display().to_string(),
        bundle = bundle.display().to_string(),
        root = bundle.join("root-cert.pem").display().to_string(),
        token = dir.path().join("sa-token").display().to_string(),
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let server = meshsign::server::start(&config)
        .await
        .expect("server starts");

    // The JWKS was fetched at start-up, with the bearer token from the file.
    let request = seen_rx.recv().await.expect("JWKS fetched");
    assert!(request.starts_with("GET /openid/v1/jwks "), "{request}");
    assert!(
        request
            .to_ascii_lowercase()
            .contains("authorization: bearer kube-api-token"),
        "{request}"
    );

    // The configured serving certificate is the one presented (clients verify it
    // against the bundle's root for `localhost`), and tokens verify against the fetched keys.
    let roots = pki::parse_certificates_nonempty(server.roots_pem.as_bytes()).unwrap();
    let ep = CaEndpoint {
        addr: format!("localhost:{}", server.local_addr.port()),
        server_name: None,
        roots,
        client_identity: None,
    };
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let token = issuer
        .mint(&meshsign::token::TokenRequest::new("default", "web"))
        .unwrap();
    wl.obtain(&ep, Some(&token), 600)
        .await
        .expect("issued with keys from the JWKS URL");

    // The file-configured serving name is only `localhost`: another name fails the handshake.
    let other = CaEndpoint {
        server_name: Some("istiod.istio-system.svc".into()),
        ..ep
    };
    assert!(meshsign::client::connect(&other).await.is_err());
    server.shutdown().await.unwrap();
}

#[test]
fn plain_http_jwks_is_refused() {
    let err = Config::from_yaml(
        "ca: { dir: /x }\nauthn: { jwt: [ { issuer: i, jwks_uri: \"http://kubernetes.default.svc/openid/v1/jwks\" } ] }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("authn.jwt[0].jwks_uri") && err.contains("https://"),
        "{err}"
    );
}
