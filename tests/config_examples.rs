//! The example configurations in config/ must stay valid.

use meshsign::config::{CaSource, Config, JwksLocation};

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
fn plugin_ca_example_uses_kubernetes_jwks() {
    let c = example("plugin-ca-kubernetes.yaml");
    assert_eq!(c.ca, CaSource::Dir("/etc/cacerts".into()));
    assert!(matches!(c.authn.jwt[0].jwks, JwksLocation::Uri { .. }));
    assert_eq!(c.authn.jwt[0].audiences, ["istio-ca"]);
    assert_eq!(c.policy.deny.len(), 1);
    assert_eq!(c.monitoring_listen.map(|a| a.port()), Some(15014));
}
