//! Fuzz target `config`: `meshsign::config::Config::from_yaml` on arbitrary
//! text (YAML parsing, the file schema, and every validation rule: durations,
//! addresses, globs, trust domains, limits, clusters).

fn run(data: &[u8]) {
    let text = meshsign_fuzz::text(data);
    let result = meshsign::config::Config::from_yaml(&text);
    if meshsign_fuzz::debug() {
        eprintln!("{result:?}");
    }
    if let Ok(config) = result {
        // A validated config has a trust domain (the one every SPIFFE ID is built on).
        assert!(!config.trust_domain().is_empty());
    }
}

/// Run once per fuzzed process before the first input (see `warm_up_once`).
const WARM_UP: &[&[u8]] = &[
    include_bytes!("../../seeds/config/plugin-ca-kubernetes.yaml"),
    include_bytes!("../../seeds/config/multi-cluster.yaml"),
    include_bytes!("../../seeds/config/jwt-issuers.yaml"),
];

fn main() {
    afl::fuzz!(|data: &[u8]| {
        meshsign_fuzz::warm_up_once(|| WARM_UP.iter().for_each(|seed| run(seed)));
        run(data);
    });
}
