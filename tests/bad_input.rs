//! Every bad input gets its specified code and message, and the server keeps
//! serving everyone else on the same connection afterwards.

mod common;

use base64::Engine as _;
use common::{send, TestServer, Workload};
use meshsign::client::{self, WorkloadKeyType};
use meshsign::token::{DevTokenIssuer, TokenRequest};
use tonic::Code;

struct Case {
    name: &'static str,
    csr: String,
    token: Option<String>,
    ttl: i64,
    code: Code,
    message: &'static str,
}

fn csr_with(wl: &Workload, f: impl FnOnce(&mut rcgen::CertificateParams)) -> String {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(wl.id.to_string().try_into().unwrap())];
    f(&mut params);
    params.serialize_request(&wl.key).unwrap().pem().unwrap()
}

fn tamper_signature(csr_pem: &str) -> String {
    let mut der = pem::parse(csr_pem).unwrap().into_contents();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
}

/// Swaps a token's payload for another, keeping the original signature.
fn forge_payload(token: &str, other: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let other_parts: Vec<&str> = other.split('.').collect();
    format!("{}.{}.{}", parts[0], other_parts[1], parts[2])
}

#[tokio::test]
async fn every_bad_input_gets_its_code_and_the_server_keeps_serving() {
    let ts = TestServer::dev("").await;
    let ep = ts.endpoint();
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let good_token = ts.token("default", "web");
    let good_csr = wl.csr();

    let mint = |req: TokenRequest<'_>| ts.token_with(&req);
    let stranger = DevTokenIssuer::load_or_create(&ts.dir.path().join("stranger")).unwrap();
    let weak_csr = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/weak-rsa1024.csr"),
    )
    .unwrap();
    let weak_token = ts.token("default", "weak");

    let cases = vec![
        Case {
            name: "no token",
            csr: good_csr.clone(),
            token: None,
            ttl: 3600,
            code: Code::Unauthenticated,
            message: "request authenticate failure",
        },
        Case {
            name: "expired token",
            csr: good_csr.clone(),
            token: Some(mint(TokenRequest {
                expired: true,
                ..TokenRequest::new("default", "web")
            })),
            ttl: 3600,
            code: Code::Unauthenticated,
            message: "request authenticate failure",
        },
        Case {
            name: "wrong audience",
            csr: good_csr.clone(),
            token: Some(mint(TokenRequest {
                audience: "kubernetes",
                ..TokenRequest::new("default", "web")
            })),
            ttl: 3600,
            code: Code::Unauthenticated,
            message: "request authenticate failure",
        },
        Case {
            name: "wrong issuer",
            csr: good_csr.clone(),
            token: Some(mint(TokenRequest {
                issuer: "https://evil.example",
                ..TokenRequest::new("default", "web")
            })),
            ttl: 3600,
            code: Code::Unauthenticated,
            message: "request authenticate failure",
        },
        Case {
            name: "token signed by an untrusted key",
            csr: good_csr.clone(),
            token: Some(stranger.mint(&TokenRequest::new("default", "web")).unwrap()),
            ttl: 3600,
            code: Code::Unauthenticated,
            message: "request authenticate failure",
        },
        Case {
            name: "forged token payload",
            csr: good_csr.clone(),
            token: Some(forge_payload(&ts.token("default", "other"), &good_token)),
            ttl: 3600,
            code: Code::Unauthenticated,
            message: "request authenticate failure",
        },
        Case {
            name: "unsigned token (alg none)",
            csr: good_csr.clone(),
            token: Some({
                let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
                let payload = good_token.split('.').nth(1).unwrap();
                format!("{}.{payload}.", b64.encode(br#"{"alg":"none","typ":"JWT"}"#))
            }),
            ttl: 3600,
            code: Code::Unauthenticated,
            message: "request authenticate failure",
        },
        Case {
            name: "garbage CSR",
            csr: "hello, I am not a CSR".into(),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR signing error (certificate signing request is not properly encoded)",
        },
        Case {
            name: "PEM that is not DER",
            csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", b"\x30\x03\x02\x01".to_vec())),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR signing error (failed to parse X.509 certificate signing request",
        },
        Case {
            name: "CSR with a bad signature",
            csr: tamper_signature(&good_csr),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR signing error (CSR signature does not verify",
        },
        Case {
            name: "CSR for another identity",
            csr: Workload::new("default", "admin", WorkloadKeyType::EcdsaP256).csr(),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::PermissionDenied,
            message: "CSR identity spiffe://cluster.local/ns/default/sa/admin does not match the caller's identity spiffe://cluster.local/ns/default/sa/web",
        },
        Case {
            name: "CSR in a foreign trust domain",
            csr: client::make_csr(
                &wl.key,
                &meshsign::spiffe::SpiffeId::new("evil.org", "default", "web").unwrap(),
                client::CsrSubject::Empty,
            )
            .unwrap(),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::PermissionDenied,
            message: "trust domain of spiffe://evil.org/ns/default/sa/web is not cluster.local",
        },
        Case {
            name: "extra DNS SAN",
            csr: csr_with(&wl, |p| {
                p.subject_alt_names
                    .push(rcgen::SanType::DnsName("web.default.svc".try_into().unwrap()))
            }),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR requests a DNS SAN (\"web.default.svc\")",
        },
        Case {
            name: "extra IP SAN",
            csr: csr_with(&wl, |p| {
                p.subject_alt_names
                    .push(rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()))
            }),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR requests an IP SAN",
        },
        Case {
            name: "two URI SANs",
            csr: csr_with(&wl, |p| {
                p.subject_alt_names.push(rcgen::SanType::URI(
                    "spiffe://cluster.local/ns/default/sa/web2".try_into().unwrap(),
                ))
            }),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR has 2 URI SANs",
        },
        Case {
            name: "no SAN",
            csr: csr_with(&wl, |p| p.subject_alt_names.clear()),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR has no URI SAN",
        },
        Case {
            name: "common name other than the identity",
            csr: csr_with(&wl, |p| p.distinguished_name.push(rcgen::DnType::CommonName, "web")),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR Common Name \"web\" differs from its SPIFFE ID",
        },
        Case {
            name: "CA request",
            csr: csr_with(&wl, |p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR requests CA rights (BasicConstraints CA:TRUE)",
        },
        Case {
            name: "keyCertSign request",
            csr: csr_with(&wl, |p| p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign]),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR requests CA rights (KeyUsage keyCertSign)",
        },
        Case {
            name: "weak RSA key",
            csr: weak_csr,
            token: Some(weak_token),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR public key RSA 1024 is not allowed",
        },
        Case {
            name: "TTL over max",
            csr: good_csr.clone(),
            token: Some(good_token.clone()),
            ttl: 2161 * 3600,
            code: Code::InvalidArgument,
            message: "CSR signing error (requested TTL 2161h0m0s is greater than the max allowed TTL 2160h0m0s)",
        },
        Case {
            name: "absurd TTL",
            csr: good_csr.clone(),
            token: Some(good_token.clone()),
            ttl: i64::MAX,
            code: Code::InvalidArgument,
            message: "is greater than the max allowed TTL 2160h0m0s",
        },
        Case {
            name: "oversized CSR field",
            csr: format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                "A".repeat(24 * 1024)
            ),
            token: Some(good_token.clone()),
            ttl: 3600,
            code: Code::InvalidArgument,
            message: "CSR signing error (certificate signing request is larger than 16384 bytes)",
        },
        Case {
            name: "oversized message",
            csr: "x".repeat(200 * 1024),
            token: Some(good_token.clone()),
            ttl: 3600,
            // As grpc-go (istiod) answers an oversized message.
            code: Code::ResourceExhausted,
            message: "received message larger than max",
        },
    ];

    let mut ca = client::connect(&ep).await.unwrap();
    for case in cases {
        let result = client::create_certificate(
            &mut ca,
            &client::CertificateRequest {
                csr_pem: case.csr,
                ttl_seconds: case.ttl,
                token: case.token.as_deref(),
                cluster_id: "Kubernetes",
                impersonate: None,
            },
        )
        .await;
        let status = result.expect_err(case.name);
        assert_eq!(
            status.code(),
            case.code,
            "{}: {}",
            case.name,
            status.message()
        );
        assert!(
            status.message().contains(case.message),
            "{}: got message {:?}",
            case.name,
            status.message()
        );
        // The same connection still serves a good request.
        let ok = client::create_certificate(
            &mut ca,
            &client::CertificateRequest {
                csr_pem: good_csr.clone(),
                ttl_seconds: 600,
                token: Some(&good_token),
                cluster_id: "Kubernetes",
                impersonate: None,
            },
        )
        .await;
        assert!(ok.is_ok(), "after {}: {:?}", case.name, ok.err());
    }
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn impersonation_is_refused_as_istiod_does_without_a_node_authorizer() {
    let ts = TestServer::dev("").await;
    let wl = Workload::new("istio-system", "ztunnel", WorkloadKeyType::EcdsaP256);
    let mut ca = client::connect(&ts.endpoint()).await.unwrap();
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "ImpersonatedIdentity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                "spiffe://cluster.local/ns/default/sa/web".into(),
            )),
        },
    );
    let mut req = tonic::Request::new(meshsign::proto::IstioCertificateRequest {
        csr: wl.csr(),
        validity_duration: 3600,
        metadata: Some(metadata),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", ts.token("istio-system", "ztunnel"))
            .parse()
            .unwrap(),
    );
    let err = ca.create_certificate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        err.message(),
        "request impersonation authentication failure"
    );
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn policy_rules_deny_and_allow() {
    let ts = TestServer::dev(
        "policy:\n  allow: [ { namespace: \"team-*\" } ]\n  deny: [ { namespace: \"team-x\", service_account: \"admin*\" } ]\n",
    )
    .await;
    let ep = ts.endpoint();
    let ok = Workload::new("team-a", "web", WorkloadKeyType::EcdsaP256);
    ok.obtain(&ep, Some(&ts.token("team-a", "web")), 600)
        .await
        .unwrap();

    let denied = Workload::new("team-x", "admin-bot", WorkloadKeyType::EcdsaP256);
    let (code, msg, _) = send(
        &ep,
        denied.csr(),
        Some(&ts.token("team-x", "admin-bot")),
        600,
    )
    .await;
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(
        msg,
        "identity spiffe://cluster.local/ns/team-x/sa/admin-bot is denied by policy rule team-x/admin*"
    );

    let outside = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let (code, msg, _) = send(&ep, outside.csr(), Some(&ts.token("default", "web")), 600).await;
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("is not allowed by any policy rule"), "{msg}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn ttl_clamped_to_the_signing_certificate() {
    // An intermediate that expires in 2 hours cannot issue a 24h leaf.
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    use meshsign::ca::generate::{self, KeyType};
    let spec = |cn: &str, hours: i64| {
        common::ca_spec(cn, KeyType::EcdsaP256, time::Duration::hours(hours))
    };
    let root = generate::root(&spec("root", 1000), now).unwrap();
    let inter = generate::intermediate(&root, &spec("short", 2), now).unwrap();
    generate::write_istio_layout(dir.path(), &inter, &inter.cert_pem, &root.cert_pem).unwrap();
    let ts = TestServer::with_ca_dir(dir.path(), "").await;
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let (chain, issued) = wl
        .obtain(&ts.endpoint(), Some(&ts.token("default", "web")), 24 * 3600)
        .await
        .unwrap();
    let inter_der = meshsign::pki::parse_certificates_nonempty(chain[1].as_bytes()).unwrap();
    let inter_na = meshsign::pki::parse_cert(&inter_der[0])
        .unwrap()
        .validity()
        .not_after
        .to_datetime();
    assert_eq!(issued.not_after, inter_na);
    ts.server.shutdown().await.unwrap();
}
