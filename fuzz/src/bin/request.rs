//! Fuzz target `request`: one `CreateCertificate` through the real handler,
//! in process: `CertificateService::authorize` (transport checks, client
//! certificate and JWT authentication, `ImpersonatedIdentity` node
//! authorization, CSR validation, policy, TTL) and then `sign` (the leaf
//! signed by the RSA intermediate of tests/testdata/istio-samples and the
//! response chain).
//!
//! The service trusts the test JWT issuer of fuzz/keys (trust domain
//! `cluster.local`, alias `trust-domain-foo`: the domain of the sample
//! workload certificate), denies namespace `kube-system`, and lets
//! `istio-system/ztunnel` impersonate (no pod cache: impersonation stops at
//! the pod lookup).
//!
//! Input: a flags byte, then fields separated by `"\n|\n"` (`FIELD_SEPARATOR`):
//!   `authorization | clusterid | ImpersonatedIdentity | validity seconds | csr | client cert DER`
//! Flags:
//! - bit 0: the connection is TLS (else plaintext, which is refused);
//! - bit 1: no connection info at all (`peer` = None);
//! - bit 2: `authorization` is a claims JSON that the harness signs (EdDSA,
//!   test key) into `Bearer <token>`; else it is the header value as sent;
//! - bit 3: `csr` is a CertificationRequestInfo DER that the harness signs
//!   with the Ed25519 CSR test key; else it is the PEM text as sent;
//! - bit 4: present a client certificate: the `client cert` field as DER,
//!   or tests/testdata/istio-samples/workload-foo-cert.pem when it is empty;
//! - bit 5: that certificate was verified at the handshake under the CA's
//!   roots (else under other roots, so the request path verifies it again);
//! - bit 6: send the `clusterid` header twice;
//! - bit 7: `ImpersonatedIdentity` as a number value instead of a string.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use meshsign::auth::Authenticator;
use meshsign::auth::ClientChain;
use meshsign::ca::Ca;
use meshsign::csr::KeyPolicy;
use meshsign::k8s::node_auth::NodeAuthorizer;
use meshsign::metrics::Metrics;
use meshsign::pki::RootsId;
use meshsign::policy::{Policy, Rule};
use meshsign::proto::IstioCertificateRequest;
use meshsign::server::{CertificateService, PeerInfo};
use meshsign_fuzz::{
    binary_fields, jwt_authenticator, pem, pem_der, text, warm_up_once, CsrKey, CsrSigner,
    TokenSigner, ALIAS_TRUST_DOMAIN, TRUST_DOMAIN,
};
use prost_types::value::Kind;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tonic::metadata::{MetadataMap, MetadataValue};

const SAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/testdata/istio-samples"
);

struct Harness {
    service: CertificateService,
    runtime: tokio::runtime::Runtime,
    tokens: TokenSigner,
    csrs: CsrSigner,
    workload_cert: CertificateDer<'static>,
    roots_id: RootsId,
}

impl Harness {
    fn new() -> Self {
        let ca = Ca::load(SAMPLES.as_ref(), OffsetDateTime::now_utc()).expect("istio-samples CA");
        let roots_id = ca.trusted_roots().id;
        let authenticator = Authenticator::new(
            true,
            vec![TRUST_DOMAIN.to_owned(), ALIAS_TRUST_DOMAIN.to_owned()],
            jwt_authenticator(),
        );
        let mut policy = Policy::new(TRUST_DOMAIN);
        policy.trust_domain_aliases = vec![ALIAS_TRUST_DOMAIN.to_owned()];
        policy.deny = vec![Rule::new("kube-system", "*").expect("glob")];
        let key_policy = KeyPolicy {
            ed25519: true,
            ..KeyPolicy::default()
        };
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let service = CertificateService::new(
            Arc::new(ArcSwap::from_pointee(ca)),
            authenticator,
            policy,
            key_policy,
            false,
            metrics,
        )
        .expect("signer threads")
        .with_node_authorizer(NodeAuthorizer::new([(
            "istio-system".to_owned(),
            "ztunnel".to_owned(),
        )]));
        let workload_pem = std::fs::read_to_string(format!("{SAMPLES}/workload-foo-cert.pem"))
            .expect("workload-foo-cert.pem");
        Harness {
            service,
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("tokio runtime"),
            tokens: TokenSigner::new(),
            csrs: CsrSigner::new(),
            workload_cert: CertificateDer::from(pem_der(&workload_pem)),
            roots_id,
        }
    }

    fn run(&self, data: &[u8]) {
        let Some((&flags, rest)) = data.split_first() else {
            return;
        };
        let f = binary_fields(rest, 6);
        let (auth, cluster, impersonate, ttl, csr, client_cert) =
            (f[0], f[1], f[2], f[3], f[4], f[5]);

        let mut metadata = MetadataMap::new();
        let authorization = if flags & 4 != 0 {
            let token = self
                .tokens
                .sign(br#"{"alg":"EdDSA","kid":"fuzz-ed25519"}"#, auth);
            format!("Bearer {token}")
        } else {
            text(auth).into_owned()
        };
        // A value the transport could not carry is not sent at all.
        if let Ok(v) = MetadataValue::try_from(authorization.as_str()) {
            metadata.insert("authorization", v);
        }
        if let Ok(v) = MetadataValue::try_from(text(cluster).as_ref()) {
            metadata.insert("clusterid", v.clone());
            if flags & 64 != 0 {
                metadata.append("clusterid", v);
            }
        }

        let mut request = IstioCertificateRequest {
            csr: if flags & 8 != 0 {
                pem(
                    "CERTIFICATE REQUEST",
                    &self.csrs.sign_info(csr, CsrKey::Ed25519),
                )
            } else {
                text(csr).into_owned()
            },
            validity_duration: text(ttl).trim().parse().unwrap_or(0),
            metadata: None,
        };
        if !impersonate.is_empty() {
            let kind = if flags & 128 != 0 {
                Kind::NumberValue(impersonate.len() as f64)
            } else {
                Kind::StringValue(text(impersonate).into_owned())
            };
            let mut s = prost_types::Struct::default();
            s.fields.insert(
                "ImpersonatedIdentity".to_owned(),
                prost_types::Value { kind: Some(kind) },
            );
            request.metadata = Some(s);
        }

        // A chain "verified at the handshake" under the CA's roots (flag 32)
        // or under other roots, which the request path must verify again.
        let client_chain = (flags & 16 != 0).then(|| {
            let leaf = if client_cert.is_empty() {
                self.workload_cert.clone()
            } else {
                CertificateDer::from(client_cert.to_vec())
            };
            let under = if flags & 32 != 0 {
                self.roots_id
            } else {
                RootsId::of(&[])
            };
            ClientChain::new(vec![leaf], under).map(Arc::new)
        });
        let peer = PeerInfo {
            remote: None,
            tls: flags & 1 != 0,
            client_chain: client_chain.flatten(),
        };
        let peer = (flags & 2 == 0).then_some(&peer);

        self.runtime.block_on(async {
            let authorized = self.service.authorize(peer, &metadata, &request).await;
            if meshsign_fuzz::debug() {
                match &authorized {
                    Ok((caller, impersonated, _)) => {
                        eprintln!("authorized: {} (impersonating {impersonated:?})", caller.id)
                    }
                    Err(e) => eprintln!("refused: {e}"),
                }
            }
            let Ok((caller, impersonated, job)) = authorized else {
                return;
            };
            // Whoever got through asked for a certificate in the mesh.
            let subject = impersonated.as_ref().unwrap_or(&caller.id);
            assert!(
                [TRUST_DOMAIN, ALIAS_TRUST_DOMAIN].contains(&subject.trust_domain()),
                "authorized a foreign identity {subject}"
            );
            assert_ne!(subject.namespace(), "kube-system", "deny rule bypassed");
            let chain = self
                .service
                .sign(job)
                .await
                .expect("an authorized job signs");
            assert!(chain.len() >= 2, "response chain too short");
            if meshsign_fuzz::debug() {
                eprintln!("signed: {} certificates", chain.len());
            }
        });
    }
}

/// Run once per fuzzed process before the first input (see `warm_up_once`).
const WARM_UP: &[&[u8]] = &[
    include_bytes!("../../seeds/request/token-p256"),
    include_bytes!("../../seeds/request/token-rsa-csr"),
    include_bytes!("../../seeds/request/signed-claims-resigned-csr"),
    include_bytes!("../../seeds/request/client-cert-alias"),
    include_bytes!("../../seeds/request/ztunnel-impersonation"),
];

fn main() {
    // Built in the fuzzed process, after AFL++'s fork server has forked it:
    // the signer threads of the CertificateService would not survive a fork.
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    afl::fuzz!(|data: &[u8]| {
        let harness = HARNESS.get_or_init(Harness::new);
        warm_up_once(|| WARM_UP.iter().for_each(|seed| harness.run(seed)));
        harness.run(data);
    });
}
