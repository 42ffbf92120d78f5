//! The example configurations in config/ must stay valid.

use meshsign::config::{CaSource, ClusterTokens, Config, JwksLocation, KubeAccess};

fn example(name: &str) -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name);
    Config::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn dev_example_is_dev_mode() {
    let c = example("dev.yaml");
    assert_eq!(c.ca, CaSource::Dev);
    assert_eq!(c.listen.to_string(), "127.0.0.1:15012");
}

/// dev.yaml says it spells out what a bare `meshsign serve` does: it must.
#[test]
fn dev_example_is_what_serve_does_without_a_config() {
    let (file, bare) = (example("dev.yaml"), Config::dev_default());
    assert_eq!(file.ca, bare.ca);
    assert_eq!(file.listen, bare.listen);
    assert_eq!(file.state_dir, bare.state_dir);
    assert_eq!(file.trust_domain(), bare.trust_domain());
    assert_eq!(file.server_tls, bare.server_tls);
    assert_eq!(
        file.authn.client_certificates,
        bare.authn.client_certificates
    );
    assert_eq!(file.authn.jwt.len(), bare.authn.jwt.len());
    assert_eq!(file.policy.default_ttl, bare.policy.default_ttl);
    assert_eq!(file.policy.max_ttl, bare.policy.max_ttl);
    assert_eq!(file.policy.backdate, bare.policy.backdate);
}

#[test]
fn plugin_ca_example_checks_tokens_offline_with_a_jwks_file() {
    let c = example("plugin-ca.yaml");
    assert_eq!(c.ca, CaSource::Dir("certs/cluster1".into()));
    assert!(c.kubernetes.is_none());
    assert_eq!(c.listen.to_string(), "0.0.0.0:15012");
    assert_eq!(c.authn.jwt.len(), 1);
    assert_eq!(c.authn.jwt[0].audiences, ["istio-ca"]);
    assert_eq!(
        c.authn.jwt[0].jwks,
        JwksLocation::File("/etc/meshsign/jwks.json".into())
    );
    assert!(c.authn.client_certificates);
    // It leaves a way to a first certificate: no warning.
    assert_eq!(c.startup_warnings(), Vec::<String>::new());
}

/// Every file in config/ is parsed and validated by a test of this file.
#[test]
fn every_example_is_tested() {
    let tested = [
        "dev.yaml",
        "plugin-ca.yaml",
        "plugin-ca-kubernetes.yaml",
        "multi-cluster.yaml",
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    for name in &found {
        assert!(
            tested.contains(&name.as_str()),
            "config/{name} has no test in tests/config_examples.rs"
        );
        // Each leaves workloads a way to their first certificate.
        assert_eq!(
            example(name).startup_warnings(),
            Vec::<String>::new(),
            "{name}"
        );
    }
}

#[test]
fn plugin_ca_example_uses_tokenreview_in_cluster() {
    let c = example("plugin-ca-kubernetes.yaml");
    assert_eq!(c.ca, CaSource::Dir("/etc/cacerts".into()));
    assert!(c.authn.jwt.is_empty());
    let k = c.kubernetes.as_ref().expect("kubernetes section");
    assert_eq!(k.clusters.len(), 1);
    assert_eq!(k.clusters[0].id, "Kubernetes");
    assert_eq!(k.clusters[0].access, KubeAccess::InCluster);
    assert_eq!(k.clusters[0].tokens, ClusterTokens::TokenReview);
    assert_eq!(k.token_review.audiences, ["istio-ca"]);
    assert_eq!(
        k.trusted_node_accounts,
        [("istio-system".to_owned(), "ztunnel".to_owned())]
    );
    let roots = k.root_publisher.as_ref().expect("root publishing");
    assert!(roots.configmap);
    assert_eq!(roots.lease_namespace, "istio-system");
    assert_eq!(c.policy.deny.len(), 1);
    assert_eq!(c.monitoring_listen.map(|a| a.port()), Some(15014));
}

#[test]
fn multi_cluster_example_lists_three_clusters() {
    let c = example("multi-cluster.yaml");
    let k = c.kubernetes.as_ref().expect("kubernetes section");
    let ids: Vec<&str> = k.clusters.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["cluster1", "cluster2", "cluster3"]);
    assert_eq!(k.clusters[0].aliases, ["Kubernetes"]);
    assert_eq!(
        k.clusters[2].tokens,
        ClusterTokens::Jwt {
            issuer: "https://oidc.cluster3.example".into()
        }
    );
    assert!(matches!(c.authn.jwt[0].jwks, JwksLocation::File(_)));
}
