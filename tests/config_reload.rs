//! Reloading the configuration while serving (what `SIGHUP` does): the
//! policy, the key policy, rate limits, JWT issuers and per-connection
//! limits change for the next request or connection; a file that is
//! invalid, or that changes what only a restart applies, changes nothing
//! and is counted as refused. The signal itself: tests/signals.rs.

mod common;

use std::time::Duration;

use common::{TestServer, Workload};
use meshsign::client::WorkloadKeyType;
use meshsign::server::ConfigReloadError;
use meshsign::token::{DevTokenIssuer, TokenRequest};
use tonic::Code;

const OK: &str = "meshsign_reloads_total{result=\"ok\",what=\"config\"}";
const REFUSED: &str = "meshsign_reloads_total{result=\"refused\",what=\"config\"}";

async fn ask(ts: &TestServer, ns: &str) -> Code {
    let w = Workload::new(ns, "app", WorkloadKeyType::EcdsaP256);
    let token = ts.token(ns, "app");
    match w.obtain(&ts.endpoint(), Some(&token), 3600).await {
        Ok(_) => Code::Ok,
        Err((code, _)) => code,
    }
}

const DENY_BLOCKED: &str =
    "policy: { deny: [ { namespace: \"blocked\", service_account: \"*\" } ] }\n";

#[tokio::test]
async fn a_policy_change_applies_to_the_next_request() {
    let ts = TestServer::dev("").await;
    assert_eq!(ask(&ts, "blocked").await, Code::Ok);

    let changed = ts.reload_with(DENY_BLOCKED).await.expect("reloads");
    assert_eq!(changed, vec!["policy"]);
    assert_eq!(ask(&ts, "blocked").await, Code::PermissionDenied);
    assert_eq!(ask(&ts, "open").await, Code::Ok);
    assert_eq!(ts.metric(OK).await, 1.0);

    // And back: the file without the rule.
    ts.reload_with("").await.expect("reloads");
    assert_eq!(ask(&ts, "blocked").await, Code::Ok);
    assert_eq!(ts.metric(OK).await, 2.0);
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_is_counted() {
    let ts = TestServer::dev(DENY_BLOCKED).await;
    // Bad YAML, an unknown key, a value out of range.
    for bad in [
        "policy: { deny: [ \n",
        "policy: { dney: [] }\n",
        "policy: { default_ttl: 48h, max_ttl: 24h }\n",
    ] {
        let e = ts.reload_with(bad).await.expect_err(bad);
        assert!(matches!(e, ConfigReloadError::Invalid(_)), "{bad}: {e:?}");
    }
    assert_eq!(ts.metric(REFUSED).await, 3.0);
    assert_eq!(ts.metric(OK).await, 0.0);
    assert_eq!(ask(&ts, "blocked").await, Code::PermissionDenied);
}

#[tokio::test]
async fn a_file_that_needs_a_restart_is_refused_whole_naming_each_key() {
    let ts = TestServer::dev("").await;
    // A reloadable change (the deny rule) next to restart-only ones.
    let next = format!(
        "{DENY_BLOCKED}limits: {{ max_connections: 10, listen_backlog: 16, idle_timeout: 5s }}\n\
         trust_domain: other.example\n"
    );
    match ts.reload_with(&next).await {
        Err(ConfigReloadError::RestartNeeded { mut keys }) => {
            keys.sort_unstable();
            assert_eq!(
                keys,
                vec![
                    "limits.listen_backlog",
                    "limits.max_connections",
                    "trust_domain"
                ]
            );
        }
        other => panic!("expected RestartNeeded, got {other:?}"),
    }
    // Nothing of it applied, the deny rule included.
    assert_eq!(ask(&ts, "blocked").await, Code::Ok);
    assert_eq!(ts.metric(REFUSED).await, 1.0);
}

#[tokio::test]
async fn new_rate_limits_apply_and_unchanged_ones_keep_their_buckets() {
    let ts = TestServer::dev("").await;
    let w = Workload::new("default", "app", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "app");
    for _ in 0..5 {
        w.obtain(&ts.endpoint(), Some(&token), 3600)
            .await
            .expect("no per-caller budget in dev mode");
    }
    let limited = "rate_limits: { per_caller: { per_second: 0.01, burst: 2 } }\n";
    let changed = ts.reload_with(limited).await.expect("reloads");
    assert_eq!(changed, vec!["rate_limits"]);
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(match w.obtain(&ts.endpoint(), Some(&token), 3600).await {
            Ok(_) => Code::Ok,
            Err((c, _)) => c,
        });
    }
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::ResourceExhausted]);

    // The same budgets again, with an unrelated change: the spent bucket stays spent.
    let next = format!("{limited}{DENY_BLOCKED}");
    ts.reload_with(&next).await.expect("reloads");
    let again = w.obtain(&ts.endpoint(), Some(&token), 3600).await;
    assert_eq!(again.map(|_| ()).unwrap_err().0, Code::ResourceExhausted);
}

#[tokio::test]
async fn jwt_issuers_are_replaced_and_a_jwks_file_that_does_not_load_refuses_the_reload() {
    let ts = TestServer::dev("").await;
    let old_token = ts.token("default", "app");
    let w = Workload::new("default", "app", WorkloadKeyType::EcdsaP256);
    w.obtain(&ts.endpoint(), Some(&old_token), 3600)
        .await
        .expect("dev issuer trusted");

    // Another key pair under the same issuer name, trusted through its JWKS file.
    let other_dir = tempfile::tempdir().unwrap();
    let other = DevTokenIssuer::load_or_create(other_dir.path()).unwrap();
    let new_token = other.mint(&TokenRequest::new("default", "app")).unwrap();
    let trusting_other = format!(
        "authn: {{ jwt: [ {{ issuer: meshsign-dev, jwks_file: {:?} }} ] }}\n",
        other.jwks_path().display().to_string()
    );
    let changed = ts.reload_with(&trusting_other).await.expect("reloads");
    assert_eq!(changed, vec!["authn.jwt"]);
    w.obtain(&ts.endpoint(), Some(&new_token), 3600)
        .await
        .expect("the new issuer's key is trusted");
    let refused = w.obtain(&ts.endpoint(), Some(&old_token), 3600).await;
    assert_eq!(refused.map(|_| ()).unwrap_err().0, Code::Unauthenticated);

    // A JWKS file that is not there: nothing changes.
    let missing =
        "authn: { jwt: [ { issuer: meshsign-dev, jwks_file: /nonexistent/jwks.json } ] }\n";
    let e = ts.reload_with(missing).await.expect_err("refused");
    assert!(
        matches!(&e, ConfigReloadError::Issuer { issuer, .. } if issuer == "meshsign-dev"),
        "{e:?}"
    );
    w.obtain(&ts.endpoint(), Some(&new_token), 3600)
        .await
        .expect("still trusted");
    assert_eq!(ts.metric(REFUSED).await, 1.0);
}

#[tokio::test]
async fn new_connection_limits_apply_to_connections_accepted_after_the_reload() {
    let ts = TestServer::dev("").await;
    let closed_idle = "meshsign_connections_closed_total{reason=\"idle\"}";
    let changed = ts
        .reload_with("limits: { idle_timeout: 1s }\n")
        .await
        .expect("reloads");
    assert_eq!(changed, vec!["limits"]);
    // One call on a new connection, which then stays idle.
    let w = Workload::new("default", "app", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "app");
    let channel = meshsign::client::channel(&ts.endpoint()).await.unwrap();
    w.send_on(&channel, Some(&token)).await.unwrap();
    common::eventually(
        "idle GOAWAY under the new limit",
        Duration::from_secs(10),
        || async { ts.metric(closed_idle).await >= 1.0 },
    )
    .await;
}
