//! End-to-end: real servers on loopback, real TLS, mock workloads.

mod common;

use std::sync::Arc;

use ::time::OffsetDateTime;
use common::{spiffe_tls, TestServer, Workload};
use meshsign::client::{self, CaEndpoint, WorkloadKeyType};
use meshsign::pki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::prelude::*;

#[tokio::test]
async fn two_workloads_get_certificates_and_complete_mtls_with_each_other() {
    let ts = TestServer::dev("").await;
    let ep = ts.endpoint();
    let rsa = Workload::new("shop", "frontend", WorkloadKeyType::Rsa2048);
    let ec = Workload::new("shop", "backend", WorkloadKeyType::EcdsaP256);
    let (rsa_chain, rsa_cert) = rsa
        .obtain(&ep, Some(&ts.token("shop", "frontend")), 3600)
        .await
        .expect("RSA workload is issued");
    let (ec_chain, ec_cert) = ec
        .obtain(&ep, Some(&ts.token("shop", "backend")), 3600)
        .await
        .expect("ECDSA workload is issued");
    // Dev mode: [leaf, intermediate, root].
    assert_eq!(rsa_chain.len(), 3);
    assert_eq!(ec_chain.len(), 3);
    assert_eq!(rsa_chain.last(), ec_chain.last());

    // Backend serves, frontend connects; each checks the other's SPIFFE ID against the root.
    let (server_cfg, client_cfg) =
        spiffe_tls::mutual_configs((&ec, &ec_cert), (&rsa, &rsa_cert), &ts.roots);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.expect("server handshake");
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong!").await.unwrap();
        tls.shutdown().await.ok();
        (buf, peer)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let name = rustls_pki_types::ServerName::try_from("backend.shop").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("client handshake");
    tls.write_all(b"ping!").await.unwrap();
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong!");
    let (got, client_cert) = server.await.unwrap();
    assert_eq!(&got, b"ping!");
    assert_eq!(client_cert.as_ref(), rsa_cert.leaf.as_ref());

    // And a workload with the wrong expected identity is refused.
    let (server_cfg, _) = spiffe_tls::mutual_configs((&ec, &ec_cert), (&rsa, &rsa_cert), &ts.roots);
    let (_, wrong_client_cfg) =
        spiffe_tls::mutual_configs((&rsa, &rsa_cert), (&rsa, &rsa_cert), &ts.roots);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(wrong_client_cfg));
    let name = rustls_pki_types::ServerName::try_from("backend.shop").unwrap();
    let err = connector
        .connect(name, tcp)
        .await
        .expect_err("identity mismatch must fail");
    assert!(
        err.to_string()
            .contains("expected spiffe://cluster.local/ns/shop/sa/frontend"),
        "{err}"
    );

    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn renewal_over_mtls_with_the_first_certificate() {
    let ts = TestServer::dev("").await;
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let (_, first) = wl
        .obtain(&ts.endpoint(), Some(&ts.token("default", "sleep")), 3600)
        .await
        .expect("first certificate");

    // No token at all: the client certificate is the credential.
    let ep = CaEndpoint {
        client_identity: Some(wl.client_identity(&first)),
        ..ts.endpoint()
    };
    let (_, second) = wl.obtain(&ep, None, 3600).await.expect("renewed over mTLS");
    assert_ne!(first.serial_hex, second.serial_hex);

    // The certificate authenticates only its own identity.
    let other = Workload {
        id: meshsign::spiffe::SpiffeId::new("cluster.local", "default", "admin").unwrap(),
        key: WorkloadKeyType::EcdsaP256.generate().unwrap(),
    };
    let mut ca = client::connect(&ep).await.unwrap();
    let err = client::create_certificate(
        &mut ca,
        &client::CertificateRequest {
            csr_pem: other.csr(),
            ttl_seconds: 3600,
            token: None,
            cluster_id: "",
            impersonate: None,
        },
    )
    .await
    .expect_err("another identity over mTLS");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn leaf_profile_matches_istiod() {
    let ts = TestServer::dev("").await;
    let wl = Workload::new("default", "httpbin", WorkloadKeyType::Rsa2048);
    let before = OffsetDateTime::now_utc();
    let (chain, issued) = wl
        .obtain(&ts.endpoint(), Some(&ts.token("default", "httpbin")), 7200)
        .await
        .unwrap();
    for e in &chain {
        assert!(e.ends_with("-----END CERTIFICATE-----\n"), "{e}");
    }
    let (_, leaf) = X509Certificate::from_der(&issued.leaf).unwrap();
    let inter_der = pki::parse_certificates_nonempty(chain[1].as_bytes()).unwrap();
    let (_, inter) = X509Certificate::from_der(&inter_der[0]).unwrap();

    assert_eq!(leaf.version(), X509Version::V3);
    assert!(leaf.subject().as_raw() == [0x30, 0x00], "empty subject");
    assert_eq!(leaf.issuer().as_raw(), inter.subject().as_raw());
    let serial = leaf.raw_serial();
    assert!((1..=17).contains(&serial.len()) && serial[0] & 0x80 == 0);
    assert_eq!(
        leaf.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256,
        "dev CA signs with its P-256 key"
    );

    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && ku.value.key_encipherment());
    assert!(!ku.value.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(!eku.critical && eku.value.server_auth && eku.value.client_auth);
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && !bc.value.ca);
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical);
    assert_eq!(san.value.general_names.len(), 1);
    assert_eq!(
        san.value.general_names[0],
        GeneralName::URI("spiffe://cluster.local/ns/default/sa/httpbin")
    );
    let inter_ski = inter
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("dev intermediate has an SKI");
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("leaf has an AKI");
    assert_eq!(aki, inter_ski);
    assert!(
        !leaf.extensions().iter().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::SubjectKeyIdentifier(_)
        )),
        "no SKI on leaves, as Go omits it"
    );

    // Validity: requested TTL, with notBefore back-dated 2 minutes.
    let nb = leaf.validity().not_before.to_datetime();
    let na = leaf.validity().not_after.to_datetime();
    assert_eq!(
        na - nb,
        ::time::Duration::hours(2) + ::time::Duration::minutes(2)
    );
    assert!(nb <= before - ::time::Duration::minutes(2) + ::time::Duration::seconds(1));
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn ttl_defaults_and_dual_use_common_name() {
    let ts = TestServer::dev("").await;
    let wl = Workload::new("default", "ratings", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "ratings");
    for ttl in [0, -10] {
        let (_, issued) = wl.obtain(&ts.endpoint(), Some(&token), ttl).await.unwrap();
        assert_eq!(
            issued.not_after - issued.not_before,
            ::time::Duration::hours(24) + ::time::Duration::minutes(2),
            "ttl {ttl} gets the 24h default"
        );
    }

    // A CSR whose CN equals the identity gets it back as the leaf CN (istiod's dual use).
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, wl.id.to_string());
    params.subject_alt_names = vec![rcgen::SanType::URI(wl.id.to_string().try_into().unwrap())];
    let csr = params.serialize_request(&wl.key).unwrap().pem().unwrap();
    let (code, msg, chain) = common::send(&ts.endpoint(), csr, Some(&token), 600).await;
    assert_eq!(code, tonic::Code::Ok, "{msg}");
    let der = pki::parse_certificates_nonempty(chain[0].as_bytes()).unwrap();
    let (_, leaf) = X509Certificate::from_der(&der[0]).unwrap();
    assert_eq!(
        leaf.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        wl.id.to_string()
    );
    // istiod marks the SAN critical even when the subject is not empty.
    assert!(leaf.subject_alternative_name().unwrap().unwrap().critical);
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn istio_sample_bundle_signs() {
    let ts = TestServer::with_ca_dir(&common::istio_samples(), "").await;
    let wl = Workload::new("foo", "foo", WorkloadKeyType::Rsa2048);
    let (chain, issued) = wl
        .obtain(&ts.endpoint(), Some(&ts.token("foo", "foo")), 3600)
        .await
        .expect("sample bundle issues");
    // cert-chain.pem == ca-cert.pem in the samples: [leaf, Istio CA, root].
    assert_eq!(chain.len(), 3);
    let sample_root =
        std::fs::read_to_string(common::istio_samples().join("root-cert.pem")).unwrap();
    assert_eq!(
        pki::parse_certificates_nonempty(chain[2].as_bytes()).unwrap(),
        pki::parse_certificates_nonempty(sample_root.as_bytes()).unwrap()
    );
    let (_, leaf) = X509Certificate::from_der(&issued.leaf).unwrap();
    assert_eq!(
        leaf.signature_algorithm.algorithm,
        x509_parser::oid_registry::OID_PKCS1_SHA256WITHRSA
    );
    // The 2018 sample CA has no SKI, so (like Go) the leaf carries no AKI.
    assert!(leaf.extensions().iter().all(|e| !matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn istio_sample_client_certificate_renews_in_its_trust_domain() {
    // workload-foo-cert.pem: spiffe://trust-domain-foo/ns/foo/sa/foo, signed by the sample CA.
    let ts =
        TestServer::with_ca_dir(&common::istio_samples(), "trust_domain: trust-domain-foo\n").await;
    let dir = common::istio_samples();
    let chain = pki::parse_certificates_nonempty(
        &std::fs::read(dir.join("workload-foo-cert.pem")).unwrap(),
    )
    .unwrap();
    let key_pem = std::fs::read_to_string(dir.join("workload-foo-key.pem")).unwrap();
    // The sample key is PKCS#1, as istio-agent's PROV_CERT files may be.
    assert!(key_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let ep = CaEndpoint {
        client_identity: Some((chain, key_pem)),
        ..ts.endpoint()
    };
    let wl = Workload {
        id: meshsign::spiffe::SpiffeId::new("trust-domain-foo", "foo", "foo").unwrap(),
        key: WorkloadKeyType::EcdsaP256.generate().unwrap(),
    };
    wl.obtain(&ep, None, 3600)
        .await
        .expect("renewal with the sample workload cert");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_level_bundle_from_ca_init() {
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_meshsign"))
        .args([
            "ca",
            "init",
            "--levels",
            "2",
            "--clusters",
            "east,west",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let east = out.path().join("east");
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        assert!(east.join(f).exists(), "{f}");
    }
    let ts = TestServer::with_ca_dir(&east, "").await;
    let wl = Workload::new("default", "reviews", WorkloadKeyType::EcdsaP256);
    let (chain, _) = wl
        .obtain(&ts.endpoint(), Some(&ts.token("default", "reviews")), 3600)
        .await
        .expect("two-level bundle issues");
    // tools/certs style: [leaf, east CA, intermediate, root (from cert-chain.pem), root bundle].
    assert_eq!(chain.len(), 5);
    assert_eq!(chain[3], chain[4]);
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_reports_serving_and_reflection_lists_services() {
    let ts = TestServer::dev("").await;
    let channel = client::channel(&ts.endpoint()).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    // The watcher sets the status right after start; poll briefly.
    let mut status = 0;
    for _ in 0..50 {
        if let Ok(r) = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: meshsign::proto::SERVICE_NAME.into(),
            })
            .await
        {
            status = r.into_inner().status;
            if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&meshsign::proto::SERVICE_NAME.to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn dev_mode_reuses_its_ca_across_restarts() {
    let ts = TestServer::dev("").await;
    let first_root = ts.server.roots_pem.clone();
    let state = ts.dir.path().join("state");
    ts.server.shutdown().await.unwrap();
    let config = meshsign::config::Config::from_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nstate_dir: {:?}\n",
        state.display().to_string()
    ))
    .unwrap();
    let again = meshsign::server::start(&config).await.unwrap();
    assert_eq!(again.roots_pem, first_root);
    assert_eq!(again.dev, Some(meshsign::ca::dev::DevCaState::Reused));
    again.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_use_istiod_names_and_readiness_follows_the_self_test() {
    let ts = TestServer::dev("").await;
    let base = format!(
        "http://{}",
        ts.server.monitoring_addr.expect("monitoring configured")
    );
    let wl = Workload::new("default", "metrics", WorkloadKeyType::EcdsaP256);
    wl.obtain(&ts.endpoint(), Some(&ts.token("default", "metrics")), 600)
        .await
        .unwrap();
    let (code, _, _) = common::send(&ts.endpoint(), wl.csr(), None, 600).await;
    assert_eq!(code, tonic::Code::Unauthenticated);
    let (code, _, _) = common::send(
        &ts.endpoint(),
        "garbage".into(),
        Some(&ts.token("default", "metrics")),
        600,
    )
    .await;
    assert_eq!(code, tonic::Code::InvalidArgument);

    let http = reqwest::Client::new();
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .unwrap_or_else(|| panic!("{line_start} missing in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("citadel_server_csr_count "), 3.0);
    assert_eq!(value("citadel_server_success_cert_issuance_count "), 1.0);
    assert_eq!(value("citadel_server_authentication_failure_count "), 1.0);
    assert_eq!(
        value("citadel_server_csr_sign_err_count{error=\"CSR_ERROR\"} "),
        1.0
    );
    assert_eq!(value("meshsign_requests_total{code=\"OK\"} "), 1.0);
    assert_eq!(
        value("meshsign_requests_total{code=\"Unauthenticated\"} "),
        1.0
    );
    assert_eq!(value("meshsign_request_duration_seconds_count "), 3.0);
    let root_expiry = value("citadel_server_root_cert_expiry_timestamp ");
    let left = value("citadel_server_root_cert_expiry_seconds ");
    assert!(
        root_expiry > 1.7e9 && left > 86_400.0 * 3000.0,
        "{root_expiry} {left}"
    );

    let mut ready = 0;
    for _ in 0..50 {
        ready = http
            .get(format!("{base}/healthz/ready"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if ready == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ready, 200);
    assert_eq!(
        http.get(format!("{base}/nope"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    ts.server.shutdown().await.unwrap();
}
