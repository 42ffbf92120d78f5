//! meshsign inside Kubernetes, against a real kube-apiserver + etcd
//! (`tests/kube/apiserver.sh`): TokenReview with its cache, `clusterid`
//! selection across two real API servers, and ztunnel's node-authorized
//! impersonation read from the pod watch.

mod common;

use std::time::{Duration, Instant};

use common::kube::{Kube, KubeApiServer};
use common::{eventually, TestServer, Workload};
use meshsign::client::{self, CertificateRequest, CsrSubject, IssuedCertificate, WorkloadKeyType};
use time::OffsetDateTime;
use tonic::Code;

/// How long kube-apiserver itself keeps a successful token authentication.
const APISERVER_TOKEN_CACHE: u64 = 10;

fn unique(prefix: &str) -> String {
    let mut b = [0u8; 4];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    format!(
        "{prefix}-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// One request as istio-agent (or, with `impersonate`, ztunnel) sends it.
async fn request(
    ts: &TestServer,
    wl: &Workload,
    subject: CsrSubject,
    token: &str,
    cluster_id: &str,
    impersonate: Option<&str>,
) -> Result<IssuedCertificate, Code> {
    let mut ca = client::connect(&ts.endpoint()).await.expect("connect");
    let csr = client::make_csr(&wl.key, &wl.id, subject).expect("csr");
    let elements = client::create_certificate(
        &mut ca,
        &CertificateRequest {
            csr_pem: csr,
            ttl_seconds: 3600,
            token: Some(token),
            cluster_id,
            impersonate,
        },
    )
    .await
    .map_err(|s| s.code())?;
    Ok(
        client::verify_response(&elements, &wl.key, &wl.id, OffsetDateTime::now_utc())
            .expect("the answer verifies for the CSR's identity"),
    )
}

fn cluster_entry(id: &str, aliases: &[&str], api: &KubeApiServer) -> String {
    format!(
        "    - {{ id: {id:?}, aliases: {aliases:?}, kubeconfig: {:?} }}\n",
        api.kubeconfig.display().to_string()
    )
}

/// ztunnel's request shape: its own `token`, an empty-subject P-256 CSR for
/// `wl`, and `ImpersonatedIdentity: identity`.
async fn as_ztunnel(
    ts: &TestServer,
    wl: &Workload,
    token: &str,
    cluster_id: &str,
    identity: &str,
) -> Result<IssuedCertificate, Code> {
    request(ts, wl, CsrSubject::Empty, token, cluster_id, Some(identity)).await
}

/// Flips a character of the signature: a forged token.
fn forge(token: &str) -> String {
    let mut t = token.as_bytes().to_vec();
    let i = t.len() - 10;
    t[i] = if t[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(t).unwrap()
}

#[tokio::test]
async fn tokenreview_accepts_pod_bound_tokens_and_refuses_the_rest() {
    let Some(api) = KubeApiServer::shared() else {
        return;
    };
    let k = Kube::new(api).await;
    let ns = unique("tr");
    k.namespace(&ns, &[]).await;
    for sa in ["sleep", "gone"] {
        k.service_account(&ns, sa).await;
    }
    let uid = k.pod(&ns, "sleep-1", "sleep", "node-1").await;
    let cache_ttl = 3;
    let ts = TestServer::dev(&format!(
        "kubernetes:\n  clusters:\n{}  token_review: {{ cache_ttl: {cache_ttl}s }}\n",
        cluster_entry("Kubernetes", &[], api)
    ))
    .await;

    let sleep = Workload::new(&ns, "sleep", WorkloadKeyType::EcdsaP256);
    let token = k
        .token(&ns, "sleep", "istio-ca", Some(("sleep-1", &uid)))
        .await;
    // verify_response checks the leaf names exactly spiffe://cluster.local/ns/<ns>/sa/sleep.
    request(
        &ts,
        &sleep,
        CsrSubject::IstioAgent,
        &token,
        "Kubernetes",
        None,
    )
    .await
    .expect("a pod-bound token is accepted");
    // The CSR must ask for the token's identity.
    let other = Workload::new(&ns, "other", WorkloadKeyType::EcdsaP256);
    assert_eq!(
        request(
            &ts,
            &other,
            CsrSubject::IstioAgent,
            &token,
            "Kubernetes",
            None
        )
        .await
        .err(),
        Some(Code::PermissionDenied)
    );

    let wrong_audience = k
        .token(&ns, "sleep", "not-istio-ca", Some(("sleep-1", &uid)))
        .await;
    let dev_token = ts.token(&ns, "sleep");
    for (what, bad) in [
        ("wrong audience", wrong_audience),
        ("forged signature", forge(&token)),
        ("signed by another issuer", dev_token),
    ] {
        assert_eq!(
            request(
                &ts,
                &sleep,
                CsrSubject::IstioAgent,
                &bad,
                "Kubernetes",
                None
            )
            .await
            .err(),
            Some(Code::Unauthenticated),
            "{what}"
        );
    }

    // A deleted pod's token and a deleted service account's token keep
    // working from the cache for at most cache_ttl, then are refused.
    let uid2 = k.pod(&ns, "sleep-2", "sleep", "node-1").await;
    let pod_token = k
        .token(&ns, "sleep", "istio-ca", Some(("sleep-2", &uid2)))
        .await;
    let gone = Workload::new(&ns, "gone", WorkloadKeyType::EcdsaP256);
    let sa_token = k.token(&ns, "gone", "istio-ca", None).await;
    let reviewed = Instant::now();
    request(
        &ts,
        &sleep,
        CsrSubject::IstioAgent,
        &pod_token,
        "Kubernetes",
        None,
    )
    .await
    .unwrap();
    request(
        &ts,
        &gone,
        CsrSubject::IstioAgent,
        &sa_token,
        "Kubernetes",
        None,
    )
    .await
    .unwrap();
    k.delete_pod(&ns, "sleep-2").await;
    k.delete_service_account(&ns, "gone").await;
    if reviewed.elapsed() < Duration::from_secs(cache_ttl - 1) {
        // Still cached: the README's bound is the cache, not the API server.
        request(
            &ts,
            &sleep,
            CsrSubject::IstioAgent,
            &pod_token,
            "Kubernetes",
            None,
        )
        .await
        .expect("cached review");
    }
    // The bound: kube-apiserver caches a successful token authentication for
    // 10 s itself (seen here: a force-deleted pod's token still passed
    // TokenReview for 9 s), and meshsign's entry adds at most cache_ttl.
    let deleted = Instant::now();
    tokio::time::sleep_until(
        (deleted
            + Duration::from_secs(APISERVER_TOKEN_CACHE + cache_ttl)
            + Duration::from_millis(500))
        .into(),
    )
    .await;
    assert_eq!(
        request(
            &ts,
            &sleep,
            CsrSubject::IstioAgent,
            &pod_token,
            "Kubernetes",
            None
        )
        .await
        .err(),
        Some(Code::Unauthenticated),
        "deleted pod refused within 10 s + cache_ttl"
    );
    assert_eq!(
        request(
            &ts,
            &gone,
            CsrSubject::IstioAgent,
            &sa_token,
            "Kubernetes",
            None
        )
        .await
        .err(),
        Some(Code::Unauthenticated),
        "deleted service account refused within 10 s + cache_ttl"
    );
    // The first token's pod still exists: still accepted after its entry expired.
    request(
        &ts,
        &sleep,
        CsrSubject::IstioAgent,
        &token,
        "Kubernetes",
        None,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_thousand_renewals_with_one_token_cost_one_review() {
    let Some(api) = KubeApiServer::shared() else {
        return;
    };
    let k = Kube::new(api).await;
    let ns = unique("storm");
    k.namespace(&ns, &[]).await;
    k.service_account(&ns, "sleep").await;
    let uid = k.pod(&ns, "sleep-1", "sleep", "node-1").await;
    let token = k
        .token(&ns, "sleep", "istio-ca", Some(("sleep-1", &uid)))
        .await;
    // One pod asking 1,000 times is far over its rate limit: switched off
    // here, as this measures the review cache.
    let ts = std::sync::Arc::new(
        TestServer::dev(&format!(
            "rate_limits: {{ per_caller: {{ per_second: 0 }} }}\nkubernetes:\n  clusters:\n{}",
            cluster_entry("Kubernetes", &[], api)
        ))
        .await,
    );
    let wl = std::sync::Arc::new(Workload::new(&ns, "sleep", WorkloadKeyType::EcdsaP256));
    let csr = wl.csr();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (ts, token, csr) = (ts.clone(), token.clone(), csr.clone());
            tokio::spawn(async move {
                let mut ca = client::connect(&ts.endpoint()).await.unwrap();
                for _ in 0..20 {
                    client::create_certificate(
                        &mut ca,
                        &CertificateRequest {
                            csr_pem: csr.clone(),
                            ttl_seconds: 3600,
                            token: Some(&token),
                            cluster_id: "Kubernetes",
                            impersonate: None,
                        },
                    )
                    .await
                    .expect("renewal succeeds");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let sent = |result: &'static str| {
        let ts = ts.clone();
        async move {
            ts.metric(&format!(
                "meshsign_token_reviews_total{{cluster=\"Kubernetes\",result=\"{result}\"}}"
            ))
            .await
        }
    };
    assert_eq!(sent("authenticated").await, 1.0);
    assert_eq!(sent("refused").await + sent("unavailable").await, 0.0);
    let issued = ts
        .metric("citadel_server_success_cert_issuance_count")
        .await;
    assert_eq!(issued, 1000.0);
    let lookups = ts
        .metric("meshsign_token_review_cache_total{cluster=\"Kubernetes\",lookup=\"hit\"}")
        .await
        + ts.metric("meshsign_token_review_cache_total{cluster=\"Kubernetes\",lookup=\"joined\"}")
            .await;
    assert_eq!(lookups, 999.0);
}

#[tokio::test]
async fn unreachable_api_server_is_unavailable_not_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{ server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true }}\nusers:\n- name: u\n  user: {{ token: t }}\ncontexts:\n- name: c\n  context: {{ cluster: c, user: u }}\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let ts = TestServer::dev(&format!(
        "kubernetes:\n  clusters:\n    - {{ id: Kubernetes, kubeconfig: {:?} }}\n  token_review: {{ timeout: 2s }}\n",
        kubeconfig.display().to_string()
    ))
    .await;
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    // A well-formed, unexpired token: it must reach the (missing) API server.
    let token = ts.token("default", "sleep");
    assert_eq!(
        request(&ts, &wl, CsrSubject::IstioAgent, &token, "Kubernetes", None)
            .await
            .err(),
        Some(Code::Unavailable)
    );
    // Garbage never gets that far: refused, not unavailable.
    assert_eq!(
        request(
            &ts,
            &wl,
            CsrSubject::IstioAgent,
            "not-a-jwt",
            "Kubernetes",
            None
        )
        .await
        .err(),
        Some(Code::Unauthenticated)
    );
    assert_eq!(
        ts.metric("meshsign_token_reviews_total{cluster=\"Kubernetes\",result=\"unavailable\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn clusterid_selects_the_cluster_as_istiod_does() {
    let Some(local) = KubeApiServer::shared() else {
        return;
    };
    let remote = KubeApiServer::start_another().expect("second API server");
    let (kl, kr) = (Kube::new(local).await, Kube::new(&remote).await);
    let ns = unique("mc");
    for k in [&kl, &kr] {
        k.namespace(&ns, &[]).await;
        k.service_account(&ns, "sleep").await;
    }
    let uid_l = kl.pod(&ns, "sleep-l", "sleep", "node-1").await;
    let uid_r = kr.pod(&ns, "sleep-r", "sleep", "node-1").await;
    // A ztunnel in each cluster, on node-1 (each cluster has its own node-1).
    kr.service_account(&ns, "ztunnel").await;
    kl.service_account(&ns, "ztunnel").await;
    let uid_zr = kr.pod(&ns, "ztunnel-r", "ztunnel", "node-1").await;
    let token_zr = kr
        .token(&ns, "ztunnel", "istio-ca", Some(("ztunnel-r", &uid_zr)))
        .await;
    let token_l = kl
        .token(&ns, "sleep", "istio-ca", Some(("sleep-l", &uid_l)))
        .await;
    let token_r = kr
        .token(&ns, "sleep", "istio-ca", Some(("sleep-r", &uid_r)))
        .await;
    let ts = TestServer::dev(&format!(
        "kubernetes:\n  clusters:\n{}{}  trusted_node_accounts: [\"{ns}/ztunnel\"]\n",
        cluster_entry("primary", &["Kubernetes"], local),
        cluster_entry("remote", &["remote-alias"], &remote),
    ))
    .await;
    let wl = Workload::new(&ns, "sleep", WorkloadKeyType::EcdsaP256);
    for (token, cluster_id, expected) in [
        (&token_l, "", None),
        (&token_l, "primary", None),
        (&token_l, "Kubernetes", None),
        (&token_r, "remote", None),
        (&token_r, "remote-alias", None),
        // A token checked by the wrong cluster's API server is refused.
        (&token_r, "", Some(Code::Unauthenticated)),
        (&token_l, "remote", Some(Code::Unauthenticated)),
        // An unknown cluster is refused.
        (&token_l, "non-exist", Some(Code::Unauthenticated)),
    ] {
        let got = request(&ts, &wl, CsrSubject::IstioAgent, token, cluster_id, None)
            .await
            .err();
        assert_eq!(got, expected, "clusterid {cluster_id:?}");
    }
    // Impersonation from the remote cluster's ztunnel is checked against the
    // remote cluster's pods (istiod's "from remote cluster" case); the same
    // request claiming the local cluster is refused.
    let sleep_id = wl.id.to_string();
    eventually("remote impersonation", Duration::from_secs(10), || async {
        as_ztunnel(&ts, &wl, &token_zr, "remote", &sleep_id)
            .await
            .is_ok()
    })
    .await;
    assert_eq!(
        as_ztunnel(&ts, &wl, &token_zr, "", &sleep_id).await.err(),
        Some(Code::Unauthenticated)
    );
    let reviews = |c: &'static str| {
        let ts = &ts;
        async move {
            ts.metric(&format!(
                "meshsign_token_reviews_total{{cluster=\"{c}\",result=\"authenticated\"}}"
            ))
            .await
        }
    };
    assert_eq!(reviews("primary").await, 1.0);
    assert_eq!(
        reviews("remote").await,
        2.0,
        "the sidecar's and ztunnel's tokens"
    );
}

#[tokio::test]
async fn ztunnel_impersonates_only_pods_on_its_own_node() {
    let Some(api) = KubeApiServer::shared() else {
        return;
    };
    let k = Kube::new(api).await;
    let (zt, app) = (unique("zt"), unique("app"));
    let (node_a, node_b) = (unique("node-a"), unique("node-b"));
    k.namespace(&zt, &[]).await;
    k.namespace(&app, &[]).await;
    k.service_account(&zt, "ztunnel").await;
    for sa in ["sleep", "web", "crash"] {
        k.service_account(&app, sa).await;
    }
    let uid_a = k.pod(&zt, "ztunnel-a", "ztunnel", &node_a).await;
    let uid_b = k.pod(&zt, "ztunnel-b", "ztunnel", &node_b).await;
    let uid_c = k.pod(&zt, "ztunnel-c", "ztunnel", &node_a).await;
    let uid_sleep = k.pod(&app, "sleep-1", "sleep", &node_a).await;
    k.pod(&app, "web-1", "web", &node_b).await;
    k.pod(&app, "crash-1", "crash", &node_a).await;
    k.set_pod_phase(&app, "crash-1", "Failed").await;

    // Two views of the same API server: TokenReview, and offline JWT checks
    // against its JWKS (where only node authorization notices a re-created pod).
    let ts = TestServer::dev(&format!(
        "authn:\n  jwt:\n    - {{ issuer: {server:?}, jwks_uri: \"{server}/openid/v1/jwks\", jwks_ca_file: {ca:?}, jwks_bearer_token_file: {tok:?} }}\n\
         kubernetes:\n  clusters:\n{}    - {{ id: offline, kubeconfig: {kc:?}, tokens: jwt, jwt_issuer: {server:?} }}\n  trusted_node_accounts: [\"{zt}/ztunnel\"]\n",
        cluster_entry("Kubernetes", &[], api),
        server = api.server,
        ca = api.dir.join("ca.crt").display().to_string(),
        tok = api.dir.join("admin-token").display().to_string(),
        kc = api.kubeconfig.display().to_string(),
    ))
    .await;

    let id = |sa: &str| format!("spiffe://cluster.local/ns/{app}/sa/{sa}");
    let pod_wl = |sa: &str| Workload::new(&app, sa, WorkloadKeyType::EcdsaP256);
    let token_a = k
        .token(&zt, "ztunnel", "istio-ca", Some(("ztunnel-a", &uid_a)))
        .await;
    let token_b = k
        .token(&zt, "ztunnel", "istio-ca", Some(("ztunnel-b", &uid_b)))
        .await;
    let token_c = k
        .token(&zt, "ztunnel", "istio-ca", Some(("ztunnel-c", &uid_c)))
        .await;

    // Readiness waits for the pod watches' first list; once ready, every pod
    // created before the start is known.
    ts.wait_ready(Duration::from_secs(10)).await;

    // ztunnel's request shape: its own token, an empty-subject P-256 CSR for
    // the pod's identity, and ImpersonatedIdentity. The leaf is verified to
    // carry exactly the impersonated identity.
    let sleep = pod_wl("sleep");
    as_ztunnel(&ts, &sleep, &token_a, "Kubernetes", &id("sleep"))
        .await
        .expect("same-node impersonation");
    // Offline-verified token, same rules.
    as_ztunnel(&ts, &sleep, &token_a, "offline", &id("sleep"))
        .await
        .expect("impersonation through the JWKS-verified cluster");
    // ztunnel-b serves node-b's pods.
    as_ztunnel(&ts, &pod_wl("web"), &token_b, "Kubernetes", &id("web"))
        .await
        .expect("web on node-b for ztunnel-b");

    let unauth = Some(Code::Unauthenticated);
    // A pod on another node.
    assert_eq!(
        as_ztunnel(&ts, &pod_wl("web"), &token_a, "Kubernetes", &id("web"))
            .await
            .err(),
        unauth
    );
    // A failed pod.
    assert_eq!(
        as_ztunnel(&ts, &pod_wl("crash"), &token_a, "Kubernetes", &id("crash"))
            .await
            .err(),
        unauth
    );
    // An untrusted caller (a workload's own token).
    let sleep_token = k
        .token(&app, "sleep", "istio-ca", Some(("sleep-1", &uid_sleep)))
        .await;
    assert_eq!(
        as_ztunnel(&ts, &sleep, &sleep_token, "Kubernetes", &id("sleep"))
            .await
            .err(),
        unauth
    );
    // A foreign trust domain and a malformed identity.
    for bad in [
        format!("spiffe://evil.example/ns/{app}/sa/sleep"),
        format!("spiffe://cluster.local/ns/{app}"),
    ] {
        assert_eq!(
            as_ztunnel(&ts, &sleep, &token_a, "Kubernetes", &bad)
                .await
                .err(),
            unauth,
            "{bad}"
        );
    }
    // The CSR must carry exactly the impersonated identity.
    assert_eq!(
        as_ztunnel(&ts, &pod_wl("web"), &token_a, "Kubernetes", &id("sleep"))
            .await
            .err(),
        Some(Code::PermissionDenied)
    );

    // A caller whose pod UID does not match its token: ztunnel-c is deleted
    // and re-created under the same name, same account, same node. The API
    // server's TokenReview refuses the old token; offline verification
    // cannot, so node authorization's UID check must.
    as_ztunnel(&ts, &sleep, &token_c, "offline", &id("sleep"))
        .await
        .expect("ztunnel-c before re-creation");
    k.delete_pod(&zt, "ztunnel-c").await;
    let new_uid = k.pod(&zt, "ztunnel-c", "ztunnel", &node_a).await;
    assert_ne!(new_uid, uid_c);
    let new_token = k
        .token(&zt, "ztunnel", "istio-ca", Some(("ztunnel-c", &new_uid)))
        .await;
    // Wait until the watch has seen the new pod (its new token works)...
    eventually(
        "new ztunnel-c authorized",
        Duration::from_secs(10),
        || async {
            as_ztunnel(&ts, &sleep, &new_token, "offline", &id("sleep"))
                .await
                .is_ok()
        },
    )
    .await;
    // ...then the old token, still valid offline, is refused.
    assert_eq!(
        as_ztunnel(&ts, &sleep, &token_c, "offline", &id("sleep"))
            .await
            .err(),
        unauth
    );
    assert_eq!(
        as_ztunnel(&ts, &sleep, &token_c, "Kubernetes", &id("sleep"))
            .await
            .err(),
        unauth
    );

    // Pods that leave the node take their identities with them.
    k.delete_pod(&app, "sleep-1").await;
    eventually(
        "deleted pod no longer impersonable",
        Duration::from_secs(10),
        || async {
            as_ztunnel(&ts, &sleep, &token_a, "Kubernetes", &id("sleep"))
                .await
                .is_err()
        },
    )
    .await;
}

#[tokio::test]
async fn impersonation_without_trusted_node_accounts_is_refused() {
    let Some(api) = KubeApiServer::shared() else {
        return;
    };
    let k = Kube::new(api).await;
    let ns = unique("nonode");
    k.namespace(&ns, &[]).await;
    k.service_account(&ns, "ztunnel").await;
    let uid = k.pod(&ns, "ztunnel-a", "ztunnel", "node-1").await;
    let ts = TestServer::dev(&format!(
        "kubernetes:\n  clusters:\n{}",
        cluster_entry("Kubernetes", &[], api)
    ))
    .await;
    let token = k
        .token(&ns, "ztunnel", "istio-ca", Some(("ztunnel-a", &uid)))
        .await;
    let wl = Workload::new(&ns, "ztunnel", WorkloadKeyType::EcdsaP256);
    assert_eq!(
        request(
            &ts,
            &wl,
            CsrSubject::Empty,
            &token,
            "Kubernetes",
            Some(&wl.id.to_string())
        )
        .await
        .err(),
        Some(Code::Unauthenticated)
    );
}

#[tokio::test]
async fn the_server_publishes_its_roots_into_selected_namespaces() {
    let Some(api) = KubeApiServer::shared() else {
        return;
    };
    let k = Kube::new(api).await;
    let label = unique("sel");
    let (lease_ns, selected, other) = (unique("lease"), unique("sel-ns"), unique("other-ns"));
    k.namespace(&lease_ns, &[]).await;
    k.namespace(&selected, &[("meshsign-test", &label)]).await;
    k.namespace(&other, &[]).await;
    let ts = TestServer::dev(&format!(
        "kubernetes:\n  clusters:\n{}  root_certificates: {{ namespace_selector: \"meshsign-test={label}\", lease_namespace: {lease_ns:?}, lease_duration: 2s, resync: 1s }}\n",
        cluster_entry("Kubernetes", &[], api)
    ))
    .await;
    let configmaps = |ns: &str| {
        kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(k.client.clone(), ns)
    };
    eventually("root ConfigMap", Duration::from_secs(15), || async {
        configmaps(&selected)
            .get_opt("istio-ca-root-cert")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let published = configmaps(&selected)
        .get("istio-ca-root-cert")
        .await
        .unwrap();
    let data = published.data.unwrap_or_default();
    assert_eq!(data.get("root-cert.pem"), Some(&ts.server.roots_pem));
    assert!(configmaps(&other)
        .get_opt("istio-ca-root-cert")
        .await
        .unwrap()
        .is_none());
    // The Lease names this server's replica.
    let lease = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        k.client.clone(),
        &lease_ns,
    )
    .get("meshsign-root-publisher")
    .await
    .unwrap();
    assert!(lease
        .spec
        .and_then(|s| s.holder_identity)
        .is_some_and(|h| !h.is_empty()));
}

/// A root rotation step (a second root added to the CA directory while
/// serving) reaches the published ConfigMaps, and so does the removal of the
/// old root.
#[tokio::test]
async fn published_roots_follow_a_root_rotation() {
    let Some(api) = KubeApiServer::shared() else {
        return;
    };
    use meshsign::ca::generate;
    let k = Kube::new(api).await;
    let label = unique("rot");
    let (lease_ns, selected) = (unique("lease"), unique("rot-ns"));
    k.namespace(&lease_ns, &[]).await;
    k.namespace(&selected, &[("meshsign-test", &label)]).await;
    let now = OffsetDateTime::now_utc();
    let spec =
        |cn: &str| common::ca_spec(cn, generate::KeyType::EcdsaP256, ::time::Duration::days(1));
    let old_root = generate::root(&spec("old root"), now).unwrap();
    let new_root = generate::root(&spec("new root"), now).unwrap();
    let old_int = generate::intermediate(&old_root, &spec("old int"), now).unwrap();
    let new_int = generate::intermediate(&new_root, &spec("new int"), now).unwrap();
    let dir = tempfile::tempdir().unwrap();
    generate::write_istio_layout(dir.path(), &old_int, &old_int.cert_pem, &old_root.cert_pem)
        .unwrap();
    let ts = TestServer::with_ca_dir_reload_and(
        dir.path(),
        "1s",
        &format!(
            "kubernetes:\n  clusters:\n{}  root_certificates: {{ namespace_selector: \"meshsign-test={label}\", lease_namespace: {lease_ns:?}, lease_duration: 2s, resync: 1s }}\n",
            cluster_entry("Kubernetes", &[], api)
        ),
    )
    .await;
    let published = || async {
        kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(k.client.clone(), &selected)
            .get_opt("istio-ca-root-cert")
            .await
            .unwrap()
            .and_then(|cm| cm.data)
            .and_then(|d| d.get("root-cert.pem").cloned())
    };
    let count =
        |pem: &str| meshsign::pki::parse_certificates(pem.as_bytes()).map_or(0, |c| c.len());
    eventually("old root published", Duration::from_secs(20), || async {
        published().await.is_some_and(|p| count(&p) == 1)
    })
    .await;
    let both = format!("{}{}", old_root.cert_pem, new_root.cert_pem);
    generate::write_file(&dir.path().join("root-cert.pem"), &both, false).unwrap();
    eventually("both roots published", Duration::from_secs(20), || async {
        published().await.is_some_and(|p| count(&p) == 2)
    })
    .await;
    generate::write_istio_layout(dir.path(), &new_int, &new_int.cert_pem, &both).unwrap();
    k.service_account(&selected, "web").await;
    let wl = Workload::new(&selected, "web", WorkloadKeyType::EcdsaP256);
    let token = k.token(&selected, "web", "istio-ca", None).await;
    // Trusting both roots, as every workload does by now.
    let ep = meshsign::client::CaEndpoint {
        roots: meshsign::pki::parse_certificates(both.as_bytes()).unwrap(),
        ..ts.endpoint()
    };
    eventually(
        "new intermediate in use",
        Duration::from_secs(20),
        || async {
            match wl.obtain(&ep, Some(&token), 600).await {
                Ok((_, issued)) => issued.chain_pem.contains(&new_int.cert_pem),
                Err(e) => panic!("renewal failed during the rotation: {e:?}"),
            }
        },
    )
    .await;
    generate::write_file(&dir.path().join("root-cert.pem"), &new_root.cert_pem, false).unwrap();
    eventually(
        "only the new root published",
        Duration::from_secs(20),
        || async { published().await.is_some_and(|p| p == new_root.cert_pem) },
    )
    .await;
}

#[tokio::test]
async fn each_node_agent_has_its_own_budget_apart_from_its_callers_budget() {
    let Some(api) = KubeApiServer::shared() else {
        return;
    };
    let k = Kube::new(api).await;
    let (zt, app, node) = (unique("zt"), unique("app"), unique("node"));
    k.namespace(&zt, &[]).await;
    k.namespace(&app, &[]).await;
    k.service_account(&zt, "ztunnel").await;
    k.service_account(&app, "sleep").await;
    let uid_a = k.pod(&zt, "ztunnel-a", "ztunnel", &node).await;
    let uid_b = k.pod(&zt, "ztunnel-b", "ztunnel", &node).await;
    k.pod(&app, "sleep-1", "sleep", &node).await;
    let ts = TestServer::dev(&format!(
        "rate_limits: {{ per_node_agent: {{ per_second: 0.01, burst: 2 }} }}\n\
         kubernetes:\n  clusters:\n{}  trusted_node_accounts: [\"{zt}/ztunnel\"]\n",
        cluster_entry("Kubernetes", &[], api),
    ))
    .await;
    ts.wait_ready(Duration::from_secs(10)).await;
    let sleep_id = format!("spiffe://cluster.local/ns/{app}/sa/sleep");
    let sleep = Workload::new(&app, "sleep", WorkloadKeyType::EcdsaP256);
    let token_a = k
        .token(&zt, "ztunnel", "istio-ca", Some(("ztunnel-a", &uid_a)))
        .await;
    let token_b = k
        .token(&zt, "ztunnel", "istio-ca", Some(("ztunnel-b", &uid_b)))
        .await;
    for _ in 0..2 {
        as_ztunnel(&ts, &sleep, &token_a, "Kubernetes", &sleep_id)
            .await
            .expect("within the node agent's budget");
    }
    assert_eq!(
        as_ztunnel(&ts, &sleep, &token_a, "Kubernetes", &sleep_id)
            .await
            .err(),
        Some(Code::ResourceExhausted)
    );
    // Another ztunnel instance (another node's, in a real cluster) has its own budget...
    as_ztunnel(&ts, &sleep, &token_b, "Kubernetes", &sleep_id)
        .await
        .expect("a second node agent is not throttled by the first");
    // ...and ztunnel's certificate for itself comes from its caller budget.
    let own = Workload::new(&zt, "ztunnel", WorkloadKeyType::EcdsaP256);
    request(&ts, &own, CsrSubject::Empty, &token_a, "Kubernetes", None)
        .await
        .expect("ztunnel's own certificate");
    assert_eq!(
        ts.metric("meshsign_requests_shed_total{reason=\"per_node_agent\"}")
            .await,
        1.0
    );
}
