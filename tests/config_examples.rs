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
