//! Root distribution against a real API server (`tests/kube/apiserver.sh`):
//! the `istio-ca-root-cert` ConfigMaps, the optional ClusterTrustBundle, and
//! leader election between two replicas.
//!
//! Each replica gets its own client that records every request that is not
//! a read (method and path), so "only the leader writes" is checked on the
//! wire rather than inferred from the objects.
//!
//! The tests take turns (one lock): a publisher without a namespace
//! selector writes into every namespace, including the ones another test
//! expects to stay empty.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::kube::{Kube, KubeApiServer};
use k8s_openapi::api::certificates::v1beta1::ClusterTrustBundle;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use meshsign::config::RootPublisherConfig;
use meshsign::k8s::roots::{self, CONFIGMAP_KEY, CONFIGMAP_NAME, TRUST_BUNDLE_NAME};
use tokio::sync::watch;
use tokio::time::Instant;

const LEASE_DURATION: Duration = Duration::from_secs(2);
/// How long anything may take to show up on a busy two-core machine.
const PATIENCE: Duration = Duration::from_secs(20);
const TEST_LABEL: (&str, &str) = ("meshsign-test/roots", "main");

static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn init_logging() {
    let filter = std::env::var("MESHSIGN_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

fn root_pem(cn: &str) -> String {
    let spec = common::ca_spec(
        cn,
        meshsign::ca::generate::KeyType::EcdsaP256,
        ::time::Duration::days(1),
    );
    meshsign::ca::generate::root(&spec, ::time::OffsetDateTime::now_utc())
        .expect("root")
        .cert_pem
}

fn settings(holder: &str, lease: &str, selector: &str) -> RootPublisherConfig {
    RootPublisherConfig {
        configmap: true,
        namespace_selector: selector.into(),
        cluster_trust_bundle: false,
        lease_namespace: "roots-leases".into(),
        lease_name: lease.into(),
        lease_duration: LEASE_DURATION,
        holder_identity: holder.into(),
        holder_identity_configured: true,
        resync: Duration::from_secs(1),
    }
}

/// The writes (method, path) one replica's client sent.
#[derive(Clone, Default)]
struct Writes(Arc<Mutex<Vec<(String, String)>>>);

impl Writes {
    fn all(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().clone()
    }

    /// Writes to root ConfigMaps (in `namespace`, when given).
    fn configmaps(&self, namespace: Option<&str>) -> Vec<(String, String)> {
        let needle = match namespace {
            Some(ns) => format!("/namespaces/{ns}/configmaps/"),
            None => "/configmaps/".to_owned(),
        };
        self.all()
            .into_iter()
            .filter(|(_, path)| path.contains(&needle))
            .collect()
    }

    /// Any write touching `namespace`.
    fn in_namespace(&self, namespace: &str) -> Vec<(String, String)> {
        let needle = format!("/namespaces/{namespace}/");
        self.all()
            .into_iter()
            .filter(|(_, path)| path.contains(&needle))
            .collect()
    }
}

/// A client of the test API server that records its writes.
async fn recording_client(server: &KubeApiServer) -> (Client, Writes) {
    let kubeconfig = kube::config::Kubeconfig::read_from(&server.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    let writes = Writes::default();
    let log = writes.clone();
    let layer =
        tower::util::MapRequestLayer::new(move |req: hyper::Request<kube::client::Body>| {
            if req.method() != hyper::Method::GET {
                log.0
                    .lock()
                    .unwrap()
                    .push((req.method().to_string(), req.uri().path().to_owned()));
            }
            req
        });
    let client = kube::client::ClientBuilder::try_from(config)
        .expect("client builder")
        .with_layer(&layer)
        .build();
    (client, writes)
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn root_configmap(client: &Client, ns: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(CONFIGMAP_NAME)
        .await
        .expect("get ConfigMap")
}

fn roots_of(cm: &ConfigMap) -> Option<&str> {
    cm.data
        .as_ref()
        .and_then(|d| d.get(CONFIGMAP_KEY))
        .map(String::as_str)
}

/// Waits for the root ConfigMap of `ns` to hold exactly `roots` (and, when
/// given, to be a different object than `not_uid`).
async fn wait_for_roots(
    client: &Client,
    ns: &str,
    roots: &str,
    not_uid: Option<&str>,
) -> ConfigMap {
    eventually(&format!("root ConfigMap in {ns}"), PATIENCE, || async {
        root_configmap(client, ns).await.filter(|cm| {
            roots_of(cm) == Some(roots)
                && (not_uid.is_none() || cm.metadata.uid.as_deref() != not_uid)
        })
    })
    .await
}

async fn lease(client: &Client, name: &str) -> Option<(String, i32)> {
    let lease = Api::<Lease>::namespaced(client.clone(), "roots-leases")
        .get_opt(name)
        .await
        .expect("get lease")?;
    let spec = lease.spec?;
    Some((spec.holder_identity?, spec.lease_transitions.unwrap_or(0)))
}

async fn ensure_namespace(kube: &Kube, name: &str) {
    let api = Api::<Namespace>::all(kube.client.clone());
    if api.get_opt(name).await.expect("get namespace").is_none() {
        kube.namespace(name, &[]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_keeps_root_configmaps_and_a_follower_takes_over() {
    init_logging();
    let Some(server) = KubeApiServer::shared() else {
        return;
    };
    let _turn = TURNS.lock().await;
    let kube = Kube::new(server).await;
    let c = kube.client.clone();
    ensure_namespace(&kube, "roots-leases").await;
    let selector = format!("{}={}", TEST_LABEL.0, TEST_LABEL.1);

    // One namespace before the replicas start (the initial list), one after.
    kube.namespace("roots-before", &[TEST_LABEL]).await;
    let roots1 = root_pem("root one");
    let (tx, rx) = watch::channel(roots1.clone());
    let (client_a, writes_a) = recording_client(server).await;
    let (client_b, writes_b) = recording_client(server).await;
    let mut a = Some(tokio::spawn(roots::run(
        client_a,
        "c1".into(),
        settings("replica-a", "roots-main", &selector),
        rx.clone(),
    )));
    let mut b = Some(tokio::spawn(roots::run(
        client_b,
        "c1".into(),
        settings("replica-b", "roots-main", &selector),
        rx.clone(),
    )));

    let before = wait_for_roots(&c, "roots-before", &roots1, None).await;
    kube.namespace("roots-app", &[TEST_LABEL]).await;
    let cm = wait_for_roots(&c, "roots-app", &roots1, None).await;
    let labels = cm.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("istio.io/config").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("meshsign")
    );
    let managers: Vec<_> = cm
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["meshsign"], "written by server-side apply only");

    // One holder; it is the one writing.
    let (holder, transitions) = lease(&c, "roots-main").await.expect("lease");
    let (leader_writes, follower_writes, leader_is_a) = match holder.as_str() {
        "replica-a" => (writes_a.clone(), writes_b.clone(), true),
        "replica-b" => (writes_b.clone(), writes_a.clone(), false),
        other => panic!("unexpected lease holder {other:?}"),
    };
    eprintln!("leader: {holder} (transitions {transitions})");

    // Deleted: restored.
    let api = Api::<ConfigMap>::namespaced(c.clone(), "roots-app");
    api.delete(CONFIGMAP_NAME, &DeleteParams::default())
        .await
        .expect("delete ConfigMap");
    let restored = wait_for_roots(&c, "roots-app", &roots1, cm.metadata.uid.as_deref()).await;

    // Edited (plus a key of our own): root-cert.pem restored, our key kept.
    api.patch(
        CONFIGMAP_NAME,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({
            "data": { CONFIGMAP_KEY: "tampered", "extra": "mine" },
            "metadata": { "labels": { "team": "blue" } },
        })),
    )
    .await
    .expect("edit ConfigMap");
    let fixed = eventually("edited ConfigMap restored", PATIENCE, || async {
        root_configmap(&c, "roots-app")
            .await
            .filter(|cm| roots_of(cm) == Some(roots1.as_str()))
            .filter(|cm| cm.metadata.resource_version != restored.metadata.resource_version)
    })
    .await;
    assert_eq!(
        fixed.metadata.uid, restored.metadata.uid,
        "updated in place"
    );
    assert_eq!(
        fixed
            .data
            .as_ref()
            .and_then(|d| d.get("extra"))
            .map(String::as_str),
        Some("mine"),
        "other keys are left alone"
    );
    assert_eq!(
        fixed
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("team"))
            .map(String::as_str),
        Some("blue"),
        "other labels are left alone"
    );

    // The roots change: every ConfigMap follows.
    let roots2 = format!("{}{}", root_pem("root two"), roots1);
    tx.send(roots2.clone()).expect("roots watch");
    wait_for_roots(&c, "roots-app", &roots2, None).await;
    let before2 = wait_for_roots(&c, "roots-before", &roots2, None).await;
    assert_eq!(before2.metadata.uid, before.metadata.uid);

    // Not selected, and terminating (no namespace controller here: a
    // deleted namespace stays Terminating); labeled only once terminating,
    // so it matches the selector.
    kube.namespace("roots-excluded", &[]).await;
    kube.namespace("roots-terminating", &[]).await;
    let namespaces = Api::<Namespace>::all(c.clone());
    namespaces
        .delete("roots-terminating", &DeleteParams::default())
        .await
        .expect("delete namespace");
    namespaces
        .patch(
            "roots-terminating",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": { "labels": { TEST_LABEL.0: TEST_LABEL.1 } }
            })),
        )
        .await
        .expect("label the terminating namespace");
    let terminating = namespaces
        .get("roots-terminating")
        .await
        .expect("namespace");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    // A namespace made afterwards getting its ConfigMap shows the publisher
    // has seen both events (one ordered watch); give it a resync too.
    kube.namespace("roots-barrier", &[TEST_LABEL]).await;
    wait_for_roots(&c, "roots-barrier", &roots2, None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for ns in ["roots-excluded", "roots-terminating"] {
        assert!(
            root_configmap(&c, ns).await.is_none(),
            "no ConfigMap in {ns}"
        );
        for writes in [&writes_a, &writes_b] {
            assert_eq!(
                writes.in_namespace(ns),
                [],
                "nothing was even tried in {ns}"
            );
        }
    }

    // Only the leader wrote ConfigMaps; the lease never changed hands.
    let leader_cm_writes = leader_writes.configmaps(None);
    assert!(
        leader_cm_writes.len() >= 5,
        "leader wrote {leader_cm_writes:?}"
    );
    assert_eq!(
        follower_writes.configmaps(None),
        [],
        "the follower wrote ConfigMaps"
    );
    for (method, path) in follower_writes.all() {
        assert!(
            path.contains("/leases/") || path.ends_with("/leases"),
            "the follower wrote {method} {path}"
        );
    }
    assert_eq!(
        lease(&c, "roots-main").await,
        Some((holder.clone(), transitions))
    );

    // The leader stops: the follower takes over within two lease durations.
    let (leader_task, follower_name) = if leader_is_a {
        (a.take(), "replica-b")
    } else {
        (b.take(), "replica-a")
    };
    leader_task.expect("leader task").abort();
    let stopped = Instant::now();
    let new_transitions = eventually("takeover", PATIENCE, || async {
        lease(&c, "roots-main")
            .await
            .filter(|(h, _)| h == follower_name)
            .map(|(_, t)| t)
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("{follower_name} took over after {took:?}");
    assert!(
        took <= 2 * LEASE_DURATION + Duration::from_secs(1),
        "takeover took {took:?}"
    );
    assert_eq!(new_transitions, transitions + 1);
    let leader_writes_at_stop = leader_writes.all().len();

    // The new leader restores and creates.
    let gone = root_configmap(&c, "roots-app").await.expect("ConfigMap");
    api.delete(CONFIGMAP_NAME, &DeleteParams::default())
        .await
        .expect("delete ConfigMap");
    wait_for_roots(&c, "roots-app", &roots2, gone.metadata.uid.as_deref()).await;
    kube.namespace("roots-after", &[TEST_LABEL]).await;
    wait_for_roots(&c, "roots-after", &roots2, None).await;
    assert!(!follower_writes.configmaps(Some("roots-app")).is_empty());
    assert!(!follower_writes.configmaps(Some("roots-after")).is_empty());
    assert_eq!(
        leader_writes.all().len(),
        leader_writes_at_stop,
        "the stopped replica wrote nothing more"
    );

    for task in [a, b].into_iter().flatten() {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_the_lease_stops_writing_until_it_wins_it_back() {
    init_logging();
    let Some(server) = KubeApiServer::shared() else {
        return;
    };
    let _turn = TURNS.lock().await;
    let kube = Kube::new(server).await;
    let c = kube.client.clone();
    ensure_namespace(&kube, "roots-leases").await;
    let label = ("meshsign-test/roots", "steal");
    kube.namespace("roots-steal", &[label]).await;
    let roots = root_pem("root steal");
    let (_tx, rx) = watch::channel(roots.clone());
    let (client, writes) = recording_client(server).await;
    let task = tokio::spawn(roots::run(
        client,
        "c1".into(),
        settings("solo", "roots-steal", "meshsign-test/roots=steal"),
        rx,
    ));
    let cm = wait_for_roots(&c, "roots-steal", &roots, None).await;
    let (_, transitions) = lease(&c, "roots-steal").await.expect("lease");

    // Another holder writes the Lease (as a replica with a faster clock, or
    // an operator, might): the next renewal conflicts and meshsign steps down.
    let leases = Api::<Lease>::namespaced(c.clone(), "roots-leases");
    let mut stolen = leases.get("roots-steal").await.expect("lease");
    if let Some(spec) = stolen.spec.as_mut() {
        spec.holder_identity = Some("intruder".into());
        spec.lease_duration_seconds = Some(4);
    }
    leases
        .replace("roots-steal", &PostParams::default(), &stolen)
        .await
        .expect("steal the lease");
    // One renewal period (lease_duration / 3) and then some.
    tokio::time::sleep(LEASE_DURATION).await;
    let writes_before = writes.configmaps(None).len();
    Api::<ConfigMap>::namespaced(c.clone(), "roots-steal")
        .delete(CONFIGMAP_NAME, &DeleteParams::default())
        .await
        .expect("delete ConfigMap");

    // Nothing is restored while the intruder holds the Lease; once it has
    // gone unrenewed for its duration, meshsign takes it back and restores.
    let followed = std::cell::Cell::new(Duration::ZERO);
    let started = Instant::now();
    eventually(
        "the lease back and the ConfigMap restored",
        PATIENCE,
        || {
            let (c, writes, roots) = (&c, &writes, &roots);
            let uid = cm.metadata.uid.clone();
            let followed = &followed;
            async move {
                let (holder, _) = lease(c, "roots-steal").await?;
                let restored = root_configmap(c, "roots-steal").await;
                if holder == "intruder" {
                    assert!(restored.is_none(), "restored while not leader");
                    assert_eq!(
                        writes.configmaps(None).len(),
                        writes_before,
                        "wrote while not leader"
                    );
                    followed.set(started.elapsed());
                    return None;
                }
                restored.filter(|cm| roots_of(cm) == Some(roots.as_str()) && cm.metadata.uid != uid)
            }
        },
    )
    .await;
    assert!(
        followed.get() >= Duration::from_secs(2),
        "the intruder's lease was respected only for {:?}",
        followed.get()
    );
    let (holder, new_transitions) = lease(&c, "roots-steal").await.expect("lease");
    assert_eq!(holder, "solo");
    assert_eq!(new_transitions, transitions + 1, "taken back");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_selector_every_namespace_gets_the_roots() {
    init_logging();
    let Some(server) = KubeApiServer::shared() else {
        return;
    };
    let _turn = TURNS.lock().await;
    let kube = Kube::new(server).await;
    let c = kube.client.clone();
    ensure_namespace(&kube, "roots-leases").await;
    let roots = root_pem("root all");
    // Someone made the ConfigMap immutable, with other roots: it cannot be
    // updated, only replaced.
    kube.namespace("roots-frozen", &[]).await;
    let frozen = Api::<ConfigMap>::namespaced(c.clone(), "roots-frozen")
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(CONFIGMAP_NAME.into()),
                    ..Default::default()
                },
                data: Some([(CONFIGMAP_KEY.to_owned(), "stale".to_owned())].into()),
                immutable: Some(true),
                ..Default::default()
            },
        )
        .await
        .expect("create immutable ConfigMap");
    let (_tx, rx) = watch::channel(roots.clone());
    let task = tokio::spawn(roots::run(
        c.clone(),
        "c1".into(),
        settings("solo", "roots-all", ""),
        rx,
    ));
    // The server's own namespaces and a new one without labels.
    wait_for_roots(&c, "default", &roots, None).await;
    wait_for_roots(&c, "kube-system", &roots, None).await;
    kube.namespace("roots-unlabeled", &[]).await;
    wait_for_roots(&c, "roots-unlabeled", &roots, None).await;
    wait_for_roots(&c, "roots-frozen", &roots, frozen.metadata.uid.as_deref()).await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_trust_bundle_is_published_and_restored() {
    init_logging();
    let Some(server) = KubeApiServer::shared() else {
        return;
    };
    let _turn = TURNS.lock().await;
    let kube = Kube::new(server).await;
    let c = kube.client.clone();
    let served = c
        .list_api_group_resources("certificates.k8s.io/v1beta1")
        .await
        .is_ok_and(|l| l.resources.iter().any(|r| r.name == "clustertrustbundles"));
    if !served {
        eprintln!(
            "SKIP: this API server does not serve certificates.k8s.io/v1beta1 clustertrustbundles"
        );
        return;
    }
    ensure_namespace(&kube, "roots-leases").await;
    let (root_a, root_b) = (root_pem("bundle a"), root_pem("bundle b"));
    // Duplicates and text between blocks are not allowed in a trust bundle.
    let roots1 = format!("{root_a}# a comment\n{root_a}");
    let (tx, rx) = watch::channel(roots1.clone());
    let mut config = settings("solo", "roots-ctb", "");
    config.configmap = false;
    config.cluster_trust_bundle = true;
    let (client, writes) = recording_client(server).await;
    let task = tokio::spawn(roots::run(client, "c1".into(), config, rx));

    let api = Api::<ClusterTrustBundle>::all(c.clone());
    let wait_for_bundle = |bundle: String, not_uid: Option<String>| {
        let api = api.clone();
        async move {
            eventually("ClusterTrustBundle", PATIENCE, || async {
                api.get_opt(TRUST_BUNDLE_NAME)
                    .await
                    .expect("get ClusterTrustBundle")
                    .filter(|b| b.spec.trust_bundle == bundle)
                    .filter(|b| not_uid.is_none() || b.metadata.uid != not_uid)
            })
            .await
        }
    };
    let first = wait_for_bundle(root_a.clone(), None).await;
    assert_eq!(
        first.spec.signer_name.as_deref(),
        Some("istio.io/istiod-ca")
    );

    // Deleted: restored (watched, not only at resync).
    api.delete(TRUST_BUNDLE_NAME, &DeleteParams::default())
        .await
        .expect("delete ClusterTrustBundle");
    let restored = wait_for_bundle(root_a.clone(), first.metadata.uid.clone()).await;

    // Edited: restored.
    api.patch(
        TRUST_BUNDLE_NAME,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "trustBundle": root_b } })),
    )
    .await
    .expect("edit ClusterTrustBundle");
    let fixed = eventually("edited ClusterTrustBundle restored", PATIENCE, || async {
        api.get_opt(TRUST_BUNDLE_NAME)
            .await
            .expect("get")
            .filter(|b| b.spec.trust_bundle == root_a)
            .filter(|b| b.metadata.resource_version != restored.metadata.resource_version)
    })
    .await;
    assert_eq!(fixed.metadata.uid, restored.metadata.uid);

    // The roots change.
    tx.send(format!("{root_b}{root_a}")).expect("roots watch");
    wait_for_bundle(format!("{root_b}{root_a}"), None).await;

    // No ConfigMaps when they are not enabled.
    assert_eq!(writes.configmaps(None), []);
    task.abort();
}
