//! Configuration sources beyond the defaults: a serving certificate given as
//! files, and a JWKS fetched over HTTPS (with the bearer token Kubernetes
//! wants) instead of read from a file.

mod common;

use std::sync::Arc;

use common::Workload;
use meshsign::client::{CaEndpoint, WorkloadKeyType};
use meshsign::config::Config;
use meshsign::pki;
use meshsign::token::DevTokenIssuer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTPS server on loopback that answers every request with `response()`
/// and reports each request's head.
async fn https_responder(
    chain_pem: &str,
    key_pem: &str,
    response: impl Fn() -> Vec<u8> + Send + Sync + 'static,
) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
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
    let port = listener.local_addr().unwrap().port();
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let response = Arc::new(response);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen, response) = (acceptor.clone(), seen_tx.clone(), response.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = seen.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = s.write_all(&response()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, seen_rx)
}

#[tokio::test]
async fn jwks_client_follows_no_redirect_and_caps_the_body() {
    use meshsign::auth::jwt::{jwks_http_client, JwksSource, MAX_JWKS_BYTES};
    use meshsign::auth::JwtIssuer;

    let dir = tempfile::tempdir().unwrap();
    let (chain_pem, key_pem) = common::bundle_and_serving_cert(dir.path(), "inter");
    let root = dir.path().join("root-cert.pem");
    // Where a redirect would lead: a plain-HTTP listener that must see nothing.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    let (trapped_tx, mut trapped) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while trap.accept().await.is_ok() {
            let _ = trapped_tx.send(());
        }
    });
    let (redirect_port, mut redirect_seen) = https_responder(&chain_pem, &key_pem, move || {
        format!("HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:{trap_port}/jwks\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").into_bytes()
    })
    .await;
    // A valid JWKS padded with whitespace past the cap (it would load without
    // the cap), once with its length announced and once streamed without one.
    let jwks = DevTokenIssuer::load_or_create(&dir.path().join("issuer"))
        .unwrap()
        .jwks()
        .to_owned();
    let mut padded = jwks.clone().into_bytes();
    padded.resize(MAX_JWKS_BYTES + 1, b' ');
    let padded = Arc::new(padded);
    let body = padded.clone();
    let (announced_port, _) = https_responder(&chain_pem, &key_pem, move || {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        [head.as_bytes(), &body[..]].concat()
    })
    .await;
    let body = padded.clone();
    let (streamed_port, _) = https_responder(&chain_pem, &key_pem, move || {
        [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"[..],
            &body[..],
        ]
        .concat()
    })
    .await;
    // The same JWKS unpadded loads: the refusals above are the cap's.
    let (plain_port, _) = https_responder(&chain_pem, &key_pem, move || {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
            jwks.len()
        )
        .into_bytes()
    })
    .await;

    let issuer_for = |port: u16| {
        JwtIssuer::new(
            "https://issuer.example".into(),
            vec!["istio-ca".into()],
            JwksSource::Uri {
                url: format!("https://localhost:{port}/openid/v1/jwks"),
                client: jwks_http_client(Some(&root)).unwrap(),
                bearer_token_file: None,
            },
            std::time::Duration::from_secs(60),
        )
    };
    assert!(issuer_for(plain_port).refresh().await.unwrap() > 0);
    for port in [redirect_port, announced_port, streamed_port] {
        let issuer = issuer_for(port);
        let err = issuer.refresh().await.expect_err("refused");
        assert_eq!(issuer.key_count(), 0, "{err}");
    }
    assert!(
        redirect_seen.recv().await.is_some(),
        "the redirect was asked for"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(trapped.try_recv().is_err(), "the redirect was followed");
}

#[tokio::test]
async fn serving_certificate_from_files_and_jwks_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let (chain_pem, key_pem) = common::bundle_and_serving_cert(&bundle, "inter");
    std::fs::write(dir.path().join("tls.crt"), &chain_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &key_pem).unwrap();
    std::fs::write(dir.path().join("sa-token"), "kube-api-token\n").unwrap();
    let issuer = DevTokenIssuer::load_or_create(&dir.path().join("issuer")).unwrap();

    // A one-endpoint HTTPS server for the JWKS, recording the requests it gets.
    let jwks = issuer.jwks().to_owned();
    let (jwks_port, mut seen_rx) = https_responder(&chain_pem, &key_pem, move || {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
            jwks.len()
        )
        .into_bytes()
    })
    .await;

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
